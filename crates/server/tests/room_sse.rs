//! The room protocol without WebSocket: the room's events as Server-Sent Events
//! (`GET /room/{room}`, `Accept: text/event-stream`), resumed with `Last-Event-ID`, and
//! client events posted to `/room/{room}/events`, beside WebSocket members.

use serde_json::{json, Value};
use switchboard_server::Config;
use switchboard_test_support::http;
use switchboard_test_support::room::Room;
use switchboard_test_support::sse::EventStream;

mod support;
use support::Server;

fn config() -> Config {
    serde_json::from_value(json!({
        "typing_expiry_ms": 300,
        "ping_interval_secs": 1,
        "channels": {"history_size": 100},
        "namespaces": {"news": {"client_publish": false}},
    }))
    .expect("a valid config")
}

/// Posts `event` as `name`; the status and the answer's JSON.
async fn post(server: &Server, room: &str, name: &str, event: &Value) -> (u16, Value) {
    http::request(
        &server.address.to_string(),
        "POST",
        &format!("/room/{room}/events?name={name}"),
        "",
        Some(event),
    )
    .await
    .expect("an answer")
}

#[tokio::test]
async fn an_event_stream_member_chats_with_websocket_members_both_ways() {
    let server = Server::start(config()).await;
    let address = server.address.to_string();
    let (mut bob, _) = Room::join(&server.url("/room/lobby?name=bob")).await;
    let mut ann = EventStream::open(&address, "/room/lobby?name=ann", "").await;
    assert_eq!(ann.status, 200, "{}", ann.head);
    assert!(
        ann.head.contains("content-type: text/event-stream"),
        "{}",
        ann.head
    );
    let welcome = ann.next().await.unwrap();
    assert_eq!(welcome.data["type"], "welcome", "{:?}", welcome);
    assert_eq!(welcome.data["members"], json!(["ann", "bob"]));
    assert_eq!(welcome.id, None);
    let epoch = welcome.data["epoch"].as_str().unwrap().to_owned();
    assert_eq!(bob.next_of("join").await["user"], "ann");

    // Bob's message reaches Ann with its id; Ann's posted message reaches both, and her
    // post is answered with the stored message.
    let first = bob.say("hello ann").await;
    let got = ann.next_of("message").await;
    assert_eq!(got.id, Some(format!("{epoch}:{first}")));
    assert_eq!(
        (got.data["from"].as_str(), got.data["text"].as_str()),
        (Some("bob"), Some("hello ann"))
    );
    let (status, answer) = post(
        &server,
        "lobby",
        "ann",
        &json!({"type": "message", "text": "hi bob", "nonce": "a-1"}),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["nonce"], "a-1");
    let second = answer["id"].as_u64().unwrap();
    assert_eq!(second, first + 1);
    let heard = bob.next_of("message").await;
    assert_eq!(
        (heard["from"].as_str(), heard["text"].as_str()),
        (Some("ann"), Some("hi bob"))
    );
    let own = ann.next_of("message").await;
    assert_eq!(own.id, Some(format!("{epoch}:{second}")));
    assert_eq!(own.data["nonce"], "a-1");

    // The same nonce again: the same message, stored once.
    let (status, again) = post(
        &server,
        "lobby",
        "ann",
        &json!({"type": "message", "text": "hi bob", "nonce": "a-1"}),
    )
    .await;
    assert_eq!((status, &again["id"]), (202, &json!(second)), "{again}");
    let (_, history) = http::get(&address, "/api/rooms/lobby/messages?since=0").await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        2,
        "{history}"
    );

    // Typing reaches Bob and, unrefreshed, stops by itself.
    let (status, _) = post(
        &server,
        "lobby",
        "ann",
        &json!({"type": "typing", "isTyping": true}),
    )
    .await;
    assert_eq!(status, 202);
    let typing = bob.next_of("typing").await;
    assert_eq!(
        (typing["user"].as_str(), typing["isTyping"].as_bool()),
        (Some("ann"), Some(true))
    );
    let stopped = bob.next_of("typing").await;
    assert_eq!(
        (stopped["user"].as_str(), stopped["isTyping"].as_bool()),
        (Some("ann"), Some(false))
    );

    // Ann leaves when her stream closes.
    drop(ann);
    assert_eq!(bob.next_of("leave").await["user"], "ann");
    server.stop().await;
}

#[tokio::test]
async fn a_stream_resumes_after_its_last_event_id_with_nothing_lost_or_repeated() {
    let server = Server::start(config()).await;
    let address = server.address.to_string();
    let (mut bob, _) = Room::join(&server.url("/room/resume?name=bob")).await;
    let mut ann = EventStream::open(&address, "/room/resume?name=ann", "").await;
    let welcome = ann.next_of("welcome").await;
    let epoch = welcome.data["epoch"].as_str().unwrap().to_owned();
    let first = bob.say("one").await;
    let last = ann.next_of("message").await.id.unwrap();
    assert_eq!(last, format!("{epoch}:{first}"));
    drop(ann);
    let mut missed = Vec::new();
    for text in ["two", "three", "four"] {
        missed.push(bob.say(text).await);
    }
    // An EventSource reconnects to the same URL with the last id it saw.
    let mut ann = EventStream::open(
        &address,
        "/room/resume?name=ann&since=0",
        &format!("Last-Event-ID: {last}\r\n"),
    )
    .await;
    let welcome = ann.next_of("welcome").await;
    assert_eq!(welcome.data["recovered"], true, "{:?}", welcome);
    let mut got = Vec::new();
    while got.len() < 3 {
        let event = ann.next_of("message").await;
        got.push(event.data["id"].as_u64().unwrap());
        assert_eq!(event.id, Some(format!("{epoch}:{}", event.data["id"])));
    }
    assert_eq!(got, missed);
    let fifth = bob.say("five").await;
    assert_eq!(ann.next_of("message").await.data["id"], fifth);

    // From another epoch: not a silent gap, the welcome says nothing was recovered.
    let mut other = EventStream::open(
        &address,
        "/room/resume?name=cat",
        "Last-Event-ID: elsewhere:2\r\n",
    )
    .await;
    let welcome = other.next_of("welcome").await;
    assert_eq!(welcome.data["recovered"], false, "{:?}", welcome);
    server.stop().await;
}

#[tokio::test]
async fn event_streams_and_posts_refuse_what_they_cannot_take() {
    let server = Server::start(config()).await;
    let address = server.address.to_string();
    for last in [
        "nothing".to_owned(),
        "e:notanumber".to_owned(),
        ":5".to_owned(),
        format!("{}:1", "e".repeat(10_000)),
    ] {
        let refused = EventStream::open(
            &address,
            "/room/lobby?name=ann",
            &format!("Last-Event-ID: {last}\r\n"),
        )
        .await;
        assert_eq!(refused.status, 400, "{last}: {}", refused.head);
        assert!(
            refused.head.contains("Last-Event-ID must be"),
            "{}",
            refused.head
        );
    }
    let bad_room = EventStream::open(&address, "/room/bad%20room?name=ann", "").await;
    assert_eq!(bad_room.status, 400);

    let (status, error) = post(&server, "lobby", "ann", &json!({"type": "dance"})).await;
    assert_eq!(
        (status, error["type"].as_str(), error["code"].as_str()),
        (400, Some("error"), Some("unknown_type")),
        "{error}"
    );
    let (status, error) = post(
        &server,
        "lobby",
        "ann",
        &json!({"type": "message", "nonce": "n"}),
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str(), error["nonce"].as_str()),
        (400, Some("bad_event"), Some("n")),
        "{error}"
    );
    let (status, error) = post(
        &server,
        "news:today",
        "ann",
        &json!({"type": "message", "text": "x"}),
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("forbidden")),
        "{error}"
    );
    let long = "x".repeat(5000);
    let (status, error) = post(
        &server,
        "lobby",
        "ann",
        &json!({"type": "message", "text": long}),
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("too_long")),
        "{error}"
    );
    let raw = http::raw(&address, "POST", "/room/lobby/events?name=ann", "", None)
        .await
        .unwrap();
    assert_eq!(raw.0, 400, "{raw:?}");
    let nobody = http::request(
        &address,
        "POST",
        "/room/lobby/events",
        "",
        Some(&json!({"type": "typing", "isTyping": true})),
    )
    .await
    .unwrap();
    assert_eq!(nobody.0, 400, "{nobody:?}");
    server.stop().await;
}
