//! The Pusher door on the wire: connection refusals with the protocol's codes, public,
//! private, presence and personal channels, client events, sign-in, the HTTP API and
//! its signatures, apps with channel spaces of their own, and one sequence shared with
//! the other doors. (The libraries themselves run against it in scripts/sdk.sh.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use switchboard_protocol::centrifuge::{Encoding, SubscribeRequest};
use switchboard_server::Config;
use switchboard_test_support::centrifuge::{connect_command, Centrifuge};
use switchboard_test_support::http;
use switchboard_test_support::pusher::{channel_auth, data_of, signed_path, user_auth, Pusher};
use switchboard_test_support::room::{refused, Room};

mod support;
use support::Server;

const KEY: &str = "test-key";
const SECRET: &str = "test-secret";
const APP: &str = "42";

fn config(extra: Value) -> Config {
    let mut settings = json!({
        "apps": [
            {"id": APP, "key": KEY, "secret": SECRET},
            {"id": "7", "key": "other-key", "secret": "other-secret"},
        ],
        "namespaces": {"quiet": {"prefix": "presence-quiet", "presence": false}},
    });
    for (key, value) in extra.as_object().expect("an object") {
        settings[key] = value.clone();
    }
    serde_json::from_value(settings).expect("a valid config")
}

fn url(server: &Server, key: &str) -> String {
    server.url(&format!("/app/{key}?protocol=7&client=test&version=1.0"))
}

async fn open(server: &Server) -> Pusher {
    Pusher::open(&url(server, KEY)).await
}

/// Subscribes to a private or presence channel with a good signature.
async fn join(client: &mut Pusher, channel: &str, channel_data: Option<&str>) -> Value {
    let auth = channel_auth(KEY, SECRET, &client.socket_id, channel, channel_data);
    client.subscribe(channel, Some(&auth), channel_data).await
}

fn member(id: &str, name: &str) -> String {
    json!({"user_id": id, "user_info": {"name": name}}).to_string()
}

/// A signed API request; its status and JSON body.
async fn api(
    server: &Server,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let text = body.as_ref().map(Value::to_string);
    let signed = signed_path(method, path, params, text.as_deref(), KEY, SECRET, None);
    http::request(
        &server.address.to_string(),
        method,
        &signed,
        "",
        body.as_ref(),
    )
    .await
    .expect("an answer")
}

async fn trigger(server: &Server, body: Value) -> (u16, Value) {
    api(
        server,
        "POST",
        &format!("/apps/{APP}/events"),
        &[],
        Some(body),
    )
    .await
}

#[tokio::test]
async fn refusals_carry_the_protocols_close_codes() {
    let server = Server::start(config(json!({}))).await;
    for (path, code) in [
        ("/app/nobody?protocol=7", 4001),
        ("/app/test-key", 4008),
        ("/app/test-key?protocol=3", 4007),
        ("/app/test-key?protocol=x", 4006),
    ] {
        let code: u16 = code;
        let mut client = switchboard_test_support::pusher::Pusher {
            socket: switchboard_net::connect(&server.url(path), Default::default())
                .await
                .unwrap()
                .socket,
            socket_id: String::new(),
        };
        let error = client.next().await;
        assert_eq!(
            (error["event"].as_str(), error["data"]["code"].as_u64()),
            (Some("pusher:error"), Some(u64::from(code))),
            "{path}: {error}"
        );
        assert_eq!(client.closed().await, code, "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn public_channels_take_api_events_with_the_excluded_socket_left_out() {
    let server = Server::start(config(json!({}))).await;
    let mut one = open(&server).await;
    let mut two = open(&server).await;
    assert!(
        one.socket_id
            .split_once('.')
            .is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok()),
        "{}",
        one.socket_id
    );
    let ok = one.subscribe("prices", None, None).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    two.subscribe("prices", None, None).await;
    two.subscribe("news", None, None).await;

    let (status, body) = trigger(
        &server,
        json!({"name": "tick", "channels": ["prices", "news"], "data": "{\"eur\":1.1}"}),
    )
    .await;
    assert_eq!((status, body), (200, json!({})));
    let tick = one.next_of("tick").await;
    assert_eq!(
        (tick["channel"].as_str(), data_of(&tick)),
        (Some("prices"), json!({"eur": 1.1}))
    );
    // Data goes out as a string of JSON, as the service sends it.
    assert!(tick["data"].is_string(), "{tick}");
    let mut channels = vec![
        two.next_of("tick").await["channel"].clone(),
        two.next_of("tick").await["channel"].clone(),
    ];
    channels.sort_by_key(|c| c.to_string());
    assert_eq!(channels, [json!("news"), json!("prices")]);

    // The excluded socket does not get it; the other one does.
    let (status, _) = trigger(
        &server,
        json!({"name": "tick", "channel": "prices", "data": "2", "socket_id": one.socket_id}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(data_of(&two.next_of("tick").await), json!(2));
    let (status, _) = api(
        &server,
        "POST",
        &format!("/apps/{APP}/batch_events"),
        &[],
        Some(json!({"batch": [
            {"name": "a", "channel": "prices", "data": "\"first\""},
            {"name": "b", "channel": "prices", "data": "not json"},
        ]})),
    )
    .await;
    assert_eq!(status, 200);
    let first = one.next().await;
    assert_eq!(
        (first["event"].as_str(), first["data"].as_str()),
        (Some("a"), Some("first")),
        "the excluded tick never came: {first}"
    );
    let second = one.next().await;
    assert_eq!(
        (second["event"].as_str(), second["data"].as_str()),
        (Some("b"), Some("not json"))
    );

    // Unsubscribed: nothing more.
    one.send(&json!({"event": "pusher:unsubscribe", "data": {"channel": "prices"}}))
        .await;
    one.send(&json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(one.next().await["event"], "pusher:pong");
    trigger(
        &server,
        json!({"name": "late", "channel": "prices", "data": "{}"}),
    )
    .await;
    two.next_of("late").await;
    assert!(one.quiet_for(Duration::from_millis(300)).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn private_channels_need_the_apps_signature() {
    let server = Server::start(config(json!({}))).await;
    let mut client = open(&server).await;
    let unsigned = client.subscribe("private-a", None, None).await;
    assert_eq!(
        (unsigned["event"].as_str(), &unsigned["data"]["code"]),
        (Some("pusher:error"), &Value::Null),
        "{unsigned}"
    );
    let forged = channel_auth(KEY, "wrong-secret", &client.socket_id, "private-a", None);
    let answer = client.subscribe("private-a", Some(&forged), None).await;
    assert_eq!(answer["event"], "pusher:error");
    assert!(
        answer["data"]["message"]
            .as_str()
            .unwrap()
            .contains("Invalid signature"),
        "{answer}"
    );
    // Another socket's signature is no good either.
    let stolen = channel_auth(KEY, SECRET, "1.2", "private-a", None);
    assert_eq!(
        client.subscribe("private-a", Some(&stolen), None).await["event"],
        "pusher:error"
    );
    // The connection stays, and a good signature works.
    let ok = join(&mut client, "private-a", None).await;
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");
    // No other door lets clients into it.
    assert_eq!(refused(&server.url("/room/private-a?name=x")).await, 403);
    let (mut centrifuge, _) =
        Centrifuge::connect(&server.url("/connection/websocket"), Encoding::Json, "").await;
    let reply = centrifuge
        .call(switchboard_protocol::centrifuge::Command {
            subscribe: Some(SubscribeRequest {
                channel: "presence-a".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(reply.error.map(|e| e.code), Some(103));
    let _ = connect_command;
    server.stop().await;
}

#[tokio::test]
async fn presence_counts_a_user_once_over_its_connections() {
    let server = Server::start(config(json!({}))).await;
    let mut ann = open(&server).await;
    let ok = join(&mut ann, "presence-room", Some(&member("1", "Ann"))).await;
    let data = data_of(&ok);
    assert_eq!(data["presence"]["ids"], json!(["1"]), "{ok}");
    assert_eq!(data["presence"]["hash"]["1"]["name"], "Ann");

    let mut bob = open(&server).await;
    let ok = join(&mut bob, "presence-room", Some(&member("2", "Bob"))).await;
    let presence = &data_of(&ok)["presence"];
    assert_eq!(
        (
            presence["count"].as_u64(),
            presence["hash"]["1"]["name"].as_str()
        ),
        (Some(2), Some("Ann"))
    );
    let added = ann.next_of("pusher_internal:member_added").await;
    assert_eq!(
        data_of(&added),
        json!({"user_id": "2", "user_info": {"name": "Bob"}})
    );

    // A second tab of Ann's: nobody is told; closing one of the two neither.
    let mut ann2 = open(&server).await;
    join(&mut ann2, "presence-room", Some(&member("1", "Ann"))).await;
    ann2.socket.close(None).await.unwrap();
    let (status, users) = api(
        &server,
        "GET",
        &format!("/apps/{APP}/channels/presence-room/users"),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (status, users),
        (200, json!({"users": [{"id": "1"}, {"id": "2"}]}))
    );
    assert!(bob.quiet_for(Duration::from_millis(300)).await.is_ok());
    ann.socket.close(None).await.unwrap();
    let removed = bob.next_of("pusher_internal:member_removed").await;
    assert_eq!(data_of(&removed), json!({"user_id": "1"}));

    // A presence channel needs a user_id, and presence on.
    let mut carol = open(&server).await;
    assert_eq!(
        join(&mut carol, "presence-room", Some("{}")).await["event"],
        "pusher:error"
    );
    assert_eq!(
        join(&mut carol, "presence-quiet", Some(&member("3", "C"))).await["event"],
        "pusher:error"
    );
    // A numeric user_id is taken as its string.
    let ok = join(&mut carol, "presence-room", Some(r#"{"user_id":3}"#)).await;
    let ids = &data_of(&ok)["presence"]["ids"];
    assert_eq!(ids, &json!(["2", "3"]), "{ok}");
    server.stop().await;
}

#[tokio::test]
async fn client_events_reach_the_others_but_not_their_sender() {
    let server = Server::start(config(json!({}))).await;
    let mut ann = open(&server).await;
    let mut bob = open(&server).await;
    for client in [&mut ann, &mut bob] {
        join(client, "private-chat", None).await;
    }
    join(&mut ann, "presence-team", Some(&member("1", "Ann"))).await;
    join(&mut bob, "presence-team", Some(&member("2", "Bob"))).await;
    ann.send(&json!({"event": "client-typing", "channel": "private-chat", "data": {"on": true}}))
        .await;
    let typing = bob.next_of("client-typing").await;
    assert_eq!(
        (typing["channel"].as_str(), data_of(&typing)),
        (Some("private-chat"), json!({"on": true}))
    );
    assert!(typing.get("user_id").is_none(), "{typing}");
    ann.send(&json!({"event": "client-wave", "channel": "presence-team", "data": "hi"}))
        .await;
    let wave = bob.next_of("client-wave").await;
    assert_eq!(
        wave["user_id"], "1",
        "a presence channel names the sender: {wave}"
    );
    // Nothing came back to Ann: the next events she gets are ones published after both.
    trigger(
        &server,
        json!({"name": "marker", "channels": ["private-chat", "presence-team"], "data": "{}"}),
    )
    .await;
    loop {
        let next = ann.next().await;
        assert!(
            !next["event"].as_str().unwrap().starts_with("client-"),
            "echoed to its sender: {next}"
        );
        if next["event"] == "marker" && next["channel"] == "presence-team" {
            break;
        }
    }

    // Refused elsewhere, the connection staying.
    ann.subscribe("public", None, None).await;
    join(&mut ann, "private-encrypted-x", None).await;
    for channel in ["public", "private-encrypted-x", "private-never"] {
        ann.send(&json!({"event": "client-x", "channel": channel, "data": {}}))
            .await;
        let error = ann.next_of("pusher:error").await;
        assert!(
            error["data"]["message"].as_str().unwrap().contains(channel),
            "{error}"
        );
    }
    let big = "x".repeat(11 * 1024);
    ann.send(&json!({"event": "client-big", "channel": "private-chat", "data": big}))
        .await;
    assert!(ann.next_of("pusher:error").await["data"]["message"]
        .as_str()
        .unwrap()
        .contains("too large"));
    server.stop().await;
}

#[tokio::test]
async fn signed_in_users_get_their_channel_and_can_be_terminated() {
    let server = Server::start(config(json!({}))).await;
    let mut ann = open(&server).await;
    let refused_early = ann.subscribe("#server-to-user-ann", None, None).await;
    assert_eq!(refused_early["event"], "pusher:error");
    let user_data = json!({"id": "ann", "name": "Ann"}).to_string();
    let auth = user_auth(KEY, SECRET, &ann.socket_id, &user_data);
    ann.send(&json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}))
        .await;
    let success = ann.next_of("pusher:signin_success").await;
    assert_eq!(success["data"]["user_data"], user_data);
    assert_eq!(
        ann.subscribe("#server-to-user-ann", None, None).await["event"],
        "pusher_internal:subscription_succeeded"
    );
    assert_eq!(
        ann.subscribe("#server-to-user-bob", None, None).await["event"],
        "pusher:error"
    );
    // What the libraries' sendToUser sends; and the room door's personal channel is
    // the same engine channel.
    trigger(
        &server,
        json!({"name": "note", "channel": "#server-to-user-ann", "data": "{\"n\":1}"}),
    )
    .await;
    assert_eq!(data_of(&ann.next_of("note").await), json!({"n": 1}));
    http::post(
        &server.address.to_string(),
        "/api/rooms/%23ann/messages",
        &json!({"text": "from the room API"}),
    )
    .await;
    let message = ann.next_of("message").await;
    assert_eq!(
        (
            message["channel"].as_str(),
            data_of(&message)["text"].as_str()
        ),
        (Some("#server-to-user-ann"), Some("from the room API"))
    );

    // A bad sign-in ends the connection with 4009.
    let mut mallory = open(&server).await;
    let forged = user_auth(KEY, "nope", &mallory.socket_id, &user_data);
    mallory
        .send(&json!({"event": "pusher:signin", "data": {"auth": forged, "user_data": user_data}}))
        .await;
    assert_eq!(mallory.closed().await, 4009);

    let (status, _) = api(
        &server,
        "POST",
        &format!("/apps/{APP}/users/ann/terminate_connections"),
        &[],
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ann.closed().await, 4009);
    server.stop().await;
}

#[tokio::test]
async fn the_api_checks_signatures_and_reads_channels() {
    let server = Server::start(config(json!({}))).await;
    let address = server.address.to_string();
    let path = format!("/apps/{APP}/channels");
    // Wrong secret, old timestamp, tampered body: 401 with the reason.
    let wrong = signed_path("GET", &path, &[], None, KEY, "wrong", None);
    let (status, reason) = http::raw(&address, "GET", &wrong, "", None).await.unwrap();
    assert_eq!(status, 401);
    assert!(reason.contains("Invalid signature"), "{reason}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let old = signed_path("GET", &path, &[], None, KEY, SECRET, Some(now - 601));
    let (status, reason) = http::raw(&address, "GET", &old, "", None).await.unwrap();
    assert_eq!(status, 401);
    assert!(reason.contains("Timestamp expired"), "{reason}");
    let body = json!({"name": "x", "channel": "a", "data": "{}"});
    let signed = signed_path(
        "POST",
        &format!("/apps/{APP}/events"),
        &[],
        Some(&body.to_string()),
        KEY,
        SECRET,
        None,
    );
    let tampered = json!({"name": "x", "channel": "b", "data": "{}"});
    let (status, reason) = http::raw(&address, "POST", &signed, "", Some(&tampered))
        .await
        .unwrap();
    assert_eq!(status, 401, "{reason}");
    // The Python library signs the empty body's MD5 on a GET: taken.
    let (status, _) = {
        let signed = signed_path("GET", &path, &[], Some(""), KEY, SECRET, None);
        http::request(&address, "GET", &signed, "", None)
            .await
            .unwrap()
    };
    assert_eq!(status, 200);
    assert_eq!(
        http::raw(&address, "GET", "/apps/999/channels", "", None)
            .await
            .unwrap()
            .0,
        404
    );

    let mut ann = open(&server).await;
    join(&mut ann, "presence-lobby", Some(&member("1", "Ann"))).await;
    ann.subscribe("quotes", None, None).await;
    let mut bob = open(&server).await;
    bob.subscribe("quotes", None, None).await;
    let (status, all) = api(&server, "GET", &path, &[], None).await;
    assert_eq!(
        (status, all),
        (
            200,
            json!({"channels": {"presence-lobby": {}, "quotes": {}}})
        )
    );
    let (_, presence) = api(
        &server,
        "GET",
        &path,
        &[("filter_by_prefix", "presence-"), ("info", "user_count")],
        None,
    )
    .await;
    assert_eq!(
        presence,
        json!({"channels": {"presence-lobby": {"user_count": 1}}})
    );
    let (status, _) = api(&server, "GET", &path, &[("info", "user_count")], None).await;
    assert_eq!(status, 400, "user_count needs the presence- filter");
    let (_, quotes) = api(
        &server,
        "GET",
        &format!("{path}/quotes"),
        &[("info", "subscription_count")],
        None,
    )
    .await;
    assert_eq!(quotes, json!({"occupied": true, "subscription_count": 2}));
    let (_, empty) = api(&server, "GET", &format!("{path}/nobody-here"), &[], None).await;
    assert_eq!(empty, json!({"occupied": false}));
    let (_, lobby) = api(
        &server,
        "GET",
        &format!("{path}/presence-lobby"),
        &[("info", "user_count,subscription_count")],
        None,
    )
    .await;
    assert_eq!(
        lobby,
        json!({"occupied": true, "user_count": 1, "subscription_count": 1})
    );
    let (_, info) = trigger(
        &server,
        json!({"name": "e", "channels": ["quotes"], "data": "{}", "info": "subscription_count"}),
    )
    .await;
    assert_eq!(
        info,
        json!({"channels": {"quotes": {"subscription_count": 2}}})
    );
    // Bad events: 400 and 413.
    assert_eq!(
        trigger(
            &server,
            json!({"name": "e", "channel": "bad:name", "data": "{}"})
        )
        .await
        .0,
        400
    );
    assert_eq!(
        trigger(
            &server,
            json!({"name": "e", "channel": "a", "data": "x".repeat(11 * 1024)})
        )
        .await
        .0,
        413
    );
    assert_eq!(
        trigger(&server, json!({"name": "e", "data": "{}"})).await.0,
        400
    );
    server.stop().await;
}

#[tokio::test]
async fn every_door_shares_the_first_apps_channels_and_other_apps_keep_their_own() {
    let server = Server::start(config(json!({}))).await;
    let mut pusher = open(&server).await;
    pusher.subscribe("mixed", None, None).await;
    let (mut room, _) = Room::join(&server.url("/room/mixed?name=rita")).await;
    room.say("hello from the room").await;
    let message = pusher.next_of("message").await;
    assert_eq!(
        data_of(&message),
        json!({"text": "hello from the room", "from": "rita"})
    );
    trigger(
        &server,
        json!({"name": "price", "channel": "mixed", "data": "{\"text\":\"from pusher\",\"v\":2}"}),
    )
    .await;
    let seen = room.next_of("message").await;
    assert_eq!(
        (
            seen["event"].as_str(),
            seen["text"].as_str(),
            &seen["data"]["v"]
        ),
        (Some("price"), Some("from pusher"), &json!(2)),
        "{seen}"
    );

    // App 7's "mixed" is another channel.
    let mut other = Pusher::open(&url(&server, "other-key")).await;
    other.subscribe("mixed", None, None).await;
    trigger(
        &server,
        json!({"name": "only-42", "channel": "mixed", "data": "{}"}),
    )
    .await;
    pusher.next_of("only-42").await;
    assert!(other.quiet_for(Duration::from_millis(300)).await.is_ok());
    // And its API is signed with its own secret.
    let path = "/apps/7/events";
    let body = json!({"name": "only-7", "channel": "mixed", "data": "{}"});
    let signed = signed_path(
        "POST",
        path,
        &[],
        Some(&body.to_string()),
        "other-key",
        "other-secret",
        None,
    );
    let (status, _) = http::request(
        &server.address.to_string(),
        "POST",
        &signed,
        "",
        Some(&body),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    other.next_of("only-7").await;
    let data = member("9", "Zed");
    let auth = channel_auth(
        "other-key",
        "other-secret",
        &other.socket_id,
        "presence-7",
        Some(&data),
    );
    assert_eq!(
        other
            .subscribe("presence-7", Some(&auth), Some(&data))
            .await["event"],
        "pusher_internal:subscription_succeeded"
    );
    let (_, rooms) = http::get(&server.address.to_string(), "/api/rooms").await;
    assert!(
        !rooms.to_string().contains('~'),
        "other apps' channels stay out of the room API: {rooms}"
    );
    assert!(pusher.quiet_for(Duration::from_millis(300)).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn members_user_info_reaches_every_node_of_a_cluster() {
    let Some(redis) = switchboard_test_support::redis::RedisServer::start(
        switchboard_test_support::redis::Persistence::None,
    )
    .await
    else {
        return;
    };
    let node = || config(json!({"redis": redis.url(), "data_dir": null}));
    let (one, two) = (Server::start(node()).await, Server::start(node()).await);
    let mut ann = open(&one).await;
    join(&mut ann, "presence-cluster", Some(&member("ann", "Ann"))).await;
    // Bob, on the other node, gets Ann's user_info in his member list.
    let mut bob = open(&two).await;
    let ok = join(&mut bob, "presence-cluster", Some(&member("bob", "Bob"))).await;
    let presence = &data_of(&ok)["presence"];
    assert_eq!(presence["hash"]["ann"]["name"], "Ann", "{ok}");
    assert_eq!(presence["count"], 2);
    // Ann, on the first node, gets Bob's with his join; and Carol's on the other node.
    let added = ann.next_of("pusher_internal:member_added").await;
    assert_eq!(
        data_of(&added),
        json!({"user_id": "bob", "user_info": {"name": "Bob"}})
    );
    let mut carol = open(&one).await;
    join(
        &mut carol,
        "presence-cluster",
        Some(&member("carol", "Carol")),
    )
    .await;
    let added = bob.next_of("pusher_internal:member_added").await;
    assert_eq!(
        data_of(&added),
        json!({"user_id": "carol", "user_info": {"name": "Carol"}})
    );
    drop(carol);
    let removed = bob.next_of("pusher_internal:member_removed").await;
    assert_eq!(data_of(&removed), json!({"user_id": "carol"}));
    // A public channel with an (anonymous) subscriber on one node is occupied, and
    // listed, on the other.
    let mut dan = open(&one).await;
    let ok = dan.subscribe("quiet-public", None, None).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    let path = format!("/apps/{APP}/channels/quiet-public");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api(&two, "GET", &path, &[], None).await;
        assert_eq!(status, 200, "{body}");
        if body["occupied"] == true {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never occupied on the other node: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = api(&two, "GET", &format!("/apps/{APP}/channels"), &[], None).await;
    assert_eq!(status, 200, "{body}");
    let listed: Vec<&String> = body["channels"].as_object().unwrap().keys().collect();
    assert_eq!(listed, ["presence-cluster", "quiet-public"], "{body}");
    drop(dan);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = api(&two, "GET", &path, &[], None).await;
        if body["occupied"] == false {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still occupied: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn a_server_with_tokens_serves_no_open_app_and_no_public_channels_of_the_first() {
    // Tokens and no [[apps]]: no app with the well-known secret.
    let closed: Config =
        serde_json::from_value(json!({"jwt_secret": "s3cret", "api_key": "k"})).unwrap();
    let server = Server::start(closed).await;
    let mut client = Pusher {
        socket: switchboard_net::connect(
            &server.url("/app/app-key?protocol=7"),
            Default::default(),
        )
        .await
        .unwrap()
        .socket,
        socket_id: String::new(),
    };
    assert_eq!(client.next().await["data"]["code"], 4001);
    let (status, _) = http::raw(
        &server.address.to_string(),
        "GET",
        "/apps/1/channels",
        "",
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    server.stop().await;

    // Tokens and apps: the first app's channels are the rooms', which want tokens, so
    // its public channels are refused; private ones and another app's public ones are not.
    let server = Server::start(config(json!({"jwt_secret": "s3cret", "api_key": "k"}))).await;
    let mut client = open(&server).await;
    let refused = client.subscribe("lobby", None, None).await;
    assert_eq!(
        (refused["event"].as_str(), &refused["data"]["code"]),
        (Some("pusher:error"), &json!(4009)),
        "{refused}"
    );
    assert_eq!(
        join(&mut client, "private-lobby", None).await["event"],
        "pusher_internal:subscription_succeeded"
    );
    let mut other = Pusher::open(&url(&server, "other-key")).await;
    assert_eq!(
        other.subscribe("lobby", None, None).await["event"],
        "pusher_internal:subscription_succeeded"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_signed_in_user_joins_presence_without_channel_data() {
    let server = Server::start(config(json!({}))).await;
    let mut ann = open(&server).await;
    let user_data = json!({"id": "ann", "user_info": {"name": "Ann"}}).to_string();
    let auth = user_auth(KEY, SECRET, &ann.socket_id, &user_data);
    ann.send(&json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}))
        .await;
    ann.next_of("pusher:signin_success").await;
    // The auth response had no channel_data: the signature is over socket:channel.
    let ok = join(&mut ann, "presence-signed", None).await;
    let presence = &data_of(&ok)["presence"];
    assert_eq!(
        (&presence["ids"], &presence["hash"]["ann"]["name"]),
        (&json!(["ann"]), &json!("Ann")),
        "{ok}"
    );
    // Without a sign-in that is refused.
    let mut bob = open(&server).await;
    assert_eq!(
        join(&mut bob, "presence-signed", None).await["event"],
        "pusher:error"
    );
    server.stop().await;
}
