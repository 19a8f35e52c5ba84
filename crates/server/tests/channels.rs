//! Channels over real connections, on one node and on two nodes sharing one Redis: each
//! namespace option, `data` publications from clients and from the HTTP API,
//! `recover = "latest"`, history kept by size and by age, channels limited to named
//! users, `forbidden` refusals, and epochs with `recovered` across restarts.
//!
//! Every scenario runs twice: with one server (a client's "node 1" is the same server
//! as "node 0") and with two servers on one `redis-server` (what a client does on one
//! node, another sees on the other).

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_server::Config;
use switchboard_test_support::http;
use switchboard_test_support::redis::{Persistence, RedisServer};
use switchboard_test_support::room::Room;

mod support;
use support::Server;

/// The namespaces every scenario's servers have.
fn namespaces() -> Value {
    json!({
        "prices": {
            "history_size": 1, "presence": false, "client_publish": false,
            "typing": false, "recover": "latest",
        },
        "chat": {"history_size": 3},
        "news": {"history_ttl_secs": 1},
        "quiet": {"join_leave": false},
    })
}

fn config(extra: Value) -> Config {
    let mut settings = json!({
        "namespaces": namespaces(),
        "rate_limit_per_sec": 10000.0,
        "rate_limit_burst": 10000,
    });
    for (key, value) in extra.as_object().expect("an object") {
        settings[key] = value.clone();
    }
    serde_json::from_value(settings).expect("a valid config")
}

/// One server, or two on one Redis.
struct Nodes {
    servers: Vec<Server>,
    /// Kept running for the servers.
    redis: Option<RedisServer>,
}

impl Nodes {
    async fn single(extra: Value) -> Self {
        Self {
            servers: vec![Server::start(config(extra)).await],
            redis: None,
        }
    }

    /// `None` (the test passes, having said why) without `redis-server` outside CI.
    async fn pair(persistence: Persistence) -> Option<Self> {
        let redis = RedisServer::start(persistence).await?;
        let node = || config(json!({"redis": redis.url(), "presence_expiry_secs": 3}));
        let servers = vec![Server::start(node()).await, Server::start(node()).await];
        Some(Self {
            servers,
            redis: Some(redis),
        })
    }

    fn address(&self, node: usize) -> String {
        self.servers[node % self.servers.len()].address.to_string()
    }

    fn url(&self, node: usize, path: &str) -> String {
        format!("ws://{}{path}", self.address(node))
    }

    async fn join(&self, node: usize, path: &str) -> (Room, Value) {
        Room::join(&self.url(node, path)).await
    }

    /// Publishes `body` to `room` through node `node`'s HTTP API; its id.
    async fn post(&self, node: usize, room: &str, body: Value) -> u64 {
        let path = format!("/api/rooms/{room}/messages");
        let (status, answer) = http::post(&self.address(node), &path, &body).await;
        assert_eq!(status, 201, "{answer}");
        answer["message"]["id"].as_u64().expect("an id")
    }

    async fn stop(self) {
        for server in self.servers {
            server.stop().await;
        }
        drop(self.redis);
    }
}

/// Each scenario on one node and on two over Redis.
macro_rules! on_one_and_two_nodes {
    ($($scenario:ident),* $(,)?) => {
        mod one_node {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let nodes = super::Nodes::single(serde_json::json!({})).await;
                    super::$scenario(&nodes).await;
                    nodes.stop().await;
                }
            )*
        }
        mod two_nodes_over_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let persistence = switchboard_test_support::redis::Persistence::None;
                    let Some(nodes) = super::Nodes::pair(persistence).await else { return };
                    super::$scenario(&nodes).await;
                    nodes.stop().await;
                }
            )*
        }
    };
}

on_one_and_two_nodes!(
    a_price_channel_keeps_its_latest_value_has_no_presence_and_takes_no_client_publishes,
    history_size_keeps_the_newest_and_says_when_a_resume_is_not_complete,
    join_leave_off_keeps_presence_and_sends_no_join_or_leave,
    data_publications_come_from_clients_and_from_the_http_api,
    publications_older_than_the_history_ttl_are_not_replayed,
    limited_channels_refuse_other_users_with_403,
);

async fn a_price_channel_keeps_its_latest_value_has_no_presence_and_takes_no_client_publishes(
    nodes: &Nodes,
) {
    let (mut alice, welcome) = nodes.join(0, "/room/prices:btc?name=alice").await;
    assert_eq!(welcome["members"], json!([]));
    let (_bob, welcome) = nodes.join(1, "/room/prices:btc?name=bob").await;
    assert_eq!(
        welcome["members"],
        json!([]),
        "no presence: nobody is listed"
    );

    // Clients may not publish, type or relay here; the connection stays.
    alice
        .send(json!({"type": "message", "text": "buy", "nonce": "n-1"}))
        .await;
    let refused = alice.next().await;
    assert_eq!(
        (refused["code"].as_str(), refused["nonce"].as_str()),
        (Some("forbidden"), Some("n-1")),
        "{refused}"
    );
    alice
        .send(json!({"type": "typing", "isTyping": true}))
        .await;
    assert_eq!(alice.next().await["code"], "forbidden");
    let tick = switchboard_net::Message::Binary(bytes::Bytes::from_static(b"tick"));
    alice.socket.send(&tick).await.unwrap();
    assert_eq!(alice.next().await["code"], "forbidden");

    // The server publishes, through the other node.
    for price in [100, 101, 102] {
        let body = json!({"data": {"price": price}, "event": "tick"});
        nodes.post(1, "prices:btc", body).await;
    }
    for (id, price) in [(1, 100), (2, 101), (3, 102)] {
        // Bob's joining was not announced: the ticks come first.
        let tick = alice.next().await;
        assert_eq!(tick["type"], "message", "{tick}");
        assert_eq!(tick["id"], id);
        assert_eq!(tick["data"], json!({"price": price}));
        assert_eq!(tick["event"], "tick");
        assert!(
            tick.get("from").is_none() && tick.get("text").is_none(),
            "{tick}"
        );
    }
    let (status, members) = http::get(&nodes.address(0), "/api/rooms/prices:btc/members").await;
    assert_eq!((status, members), (200, json!({"members": []})));

    // A joiner gets the latest value only, then what comes live.
    let (mut carol, welcome) = nodes.join(1, "/room/prices:btc?name=carol").await;
    assert_eq!(welcome["lastId"], 3);
    assert!(welcome.get("recovered").is_none(), "{welcome}");
    assert_eq!(carol.next().await["id"], 3);
    nodes
        .post(0, "prices:btc", json!({"data": {"price": 103}}))
        .await;
    assert_eq!(carol.next().await["id"], 4, "nothing older than the latest");
    // A resume from before what is kept (1 publication) is not complete.
    let (mut late, welcome) = nodes.join(0, "/room/prices:btc?name=dave&since=1").await;
    assert_eq!(welcome["recovered"], false);
    assert_eq!(late.next().await["id"], 4);
}

async fn history_size_keeps_the_newest_and_says_when_a_resume_is_not_complete(nodes: &Nodes) {
    for i in 1..=6 {
        nodes
            .post(
                0,
                "chat:team",
                json!({"from": "bot", "text": format!("m{i}")}),
            )
            .await;
    }
    let (mut far, welcome) = nodes.join(1, "/room/chat:team?name=far&since=1").await;
    assert_eq!(
        (welcome["lastId"].as_u64(), welcome["recovered"].as_bool()),
        (Some(6), Some(false))
    );
    assert_eq!(
        far.ids_upto(6).await,
        [4, 5, 6],
        "2 and 3 are no longer kept"
    );
    let (mut near, welcome) = nodes.join(1, "/room/chat:team?name=near&since=4").await;
    assert_eq!(welcome["recovered"], true);
    assert_eq!(near.ids_upto(6).await, [5, 6]);
    let (mut fresh, welcome) = nodes.join(0, "/room/chat:team?name=fresh").await;
    assert!(welcome.get("recovered").is_none());
    assert_eq!(fresh.ids_upto(6).await, [4, 5, 6]);
    let (status, history) =
        http::get(&nodes.address(0), "/api/rooms/chat:team/messages?since=0").await;
    assert_eq!(status, 200);
    let ids: Vec<u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [4, 5, 6]);
    // Ids go on from the last one, kept or not.
    assert_eq!(nodes.post(1, "chat:team", json!({"text": "m7"})).await, 7);
    assert_eq!(far.next_of("message").await["id"], 7);
}

async fn join_leave_off_keeps_presence_and_sends_no_join_or_leave(nodes: &Nodes) {
    let (mut carol, _) = nodes.join(0, "/room/quiet:desk?name=carol").await;
    let (mut dave, welcome) = nodes.join(1, "/room/quiet:desk?name=dave").await;
    assert_eq!(welcome["members"], json!(["carol", "dave"]));
    let (_, members) = http::get(&nodes.address(0), "/api/rooms/quiet:desk/members").await;
    assert_eq!(members, json!({"members": ["carol", "dave"]}));
    // Typing is on here: the first thing carol hears is dave typing, not his join.
    dave.send(json!({"type": "typing", "isTyping": true})).await;
    assert_eq!(
        carol.next().await,
        json!({"type": "typing", "user": "dave", "isTyping": true})
    );
    dave.socket.close(None).await.unwrap();
    assert_eq!(carol.next().await["isTyping"], false);
    nodes
        .post(1, "quiet:desk", json!({"text": "after dave"}))
        .await;
    assert_eq!(
        carol.next().await["text"],
        "after dave",
        "no leave came first"
    );
    carol.socket.close(None).await.unwrap();
}

async fn data_publications_come_from_clients_and_from_the_http_api(nodes: &Nodes) {
    let (mut alice, _) = nodes.join(0, "/room/lobby?name=alice").await;
    let (mut bob, _) = nodes.join(1, "/room/lobby?name=bob").await;
    assert_eq!(alice.next().await, json!({"type": "join", "user": "bob"}));
    alice
        .send(json!({"type": "message", "data": {"x": [1, 2]}, "nonce": "d-1"}))
        .await;
    for member in [&mut alice, &mut bob] {
        let m = member.next_of("message").await;
        assert_eq!(
            (m["from"].as_str(), m["nonce"].as_str()),
            (Some("alice"), Some("d-1"))
        );
        assert_eq!(m["data"], json!({"x": [1, 2]}));
        assert!(m.get("text").is_none(), "{m}");
    }
    bob.send(json!({"type": "message", "text": "and words", "data": true}))
        .await;
    for member in [&mut alice, &mut bob] {
        let m = member.next_of("message").await;
        assert_eq!(
            (m["from"].as_str(), m["text"].as_str()),
            (Some("bob"), Some("and words"))
        );
        assert_eq!(m["data"], true);
    }
    // From the API: without `from` a publication of the server, with an event name.
    let id = nodes
        .post(
            1,
            "lobby",
            json!({"data": {"level": "info"}, "event": "notice"}),
        )
        .await;
    for member in [&mut alice, &mut bob] {
        let m = member.next_of("message").await;
        assert_eq!(m["id"], id);
        assert_eq!(
            (m["event"].as_str(), m["data"]["level"].as_str()),
            (Some("notice"), Some("info"))
        );
        assert!(m.get("from").is_none(), "{m}");
    }
    // A retried API nonce is stored once and answered with the original.
    let body = json!({"from": "api", "data": [1], "nonce": "api-1"});
    let path = "/api/rooms/lobby/messages";
    let (first, stored) = http::post(&nodes.address(0), path, &body).await;
    let (again, original) = http::post(&nodes.address(1), path, &body).await;
    assert_eq!((first, again), (201, 200));
    assert_eq!(stored["message"]["id"], original["message"]["id"]);
    // Data over the room's message size is refused with 413, and nothing is published.
    let big = json!({"data": "x".repeat(70 * 1024)});
    let (status, _) = http::post(&nodes.address(0), path, &big).await;
    assert_eq!(status, 413);
}

async fn publications_older_than_the_history_ttl_are_not_replayed(nodes: &Nodes) {
    nodes.post(0, "news:today", json!({"text": "old"})).await;
    // The TTL is one second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut reader, welcome) = nodes.join(1, "/room/news:today?name=reader").await;
    assert_eq!(welcome["lastId"], 1);
    let (mut resumer, welcome) = nodes.join(0, "/room/news:today?name=resumer&since=0").await;
    assert_eq!(welcome["recovered"], false, "the first publication expired");
    nodes.post(1, "news:today", json!({"text": "new"})).await;
    for member in [&mut reader, &mut resumer] {
        let m = member.next_of("message").await;
        assert_eq!(
            (m["id"].as_u64(), m["text"].as_str()),
            (Some(2), Some("new"))
        );
    }
    let (_, history) = http::get(&nodes.address(0), "/api/rooms/news:today/messages").await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["new"]);
}

async fn limited_channels_refuse_other_users_with_403(nodes: &Nodes) {
    let (mut alice, _) = nodes.join(0, "/room/dm:%23alice,bob?name=alice").await;
    let (_bob, _) = nodes.join(1, "/room/dm:%23alice,bob?name=bob").await;
    for (node, path) in [
        (1, "/room/dm:%23alice,bob?name=mallory"),
        (0, "/room/notify:%23alice?name=bob"),
        (1, "/room/%23alice?name=alicia"),
    ] {
        let status = switchboard_test_support::room::refused(&nodes.url(node, path)).await;
        assert_eq!(status, 403, "{path}");
    }
    // The HTTP API may always publish to it.
    nodes
        .post(1, "dm:%23alice,bob", json!({"text": "from the app"}))
        .await;
    assert_eq!(alice.next_of("message").await["text"], "from the app");
    let (_alice_alone, _) = nodes.join(1, "/room/%23alice?name=alice").await;
}

// Epochs across restarts.

/// The welcome's epoch and last id.
fn position(welcome: &Value) -> (String, u64) {
    (
        welcome["epoch"].as_str().expect("an epoch").to_owned(),
        welcome["lastId"].as_u64().expect("a last id"),
    )
}

#[tokio::test]
async fn a_memory_store_restarted_is_a_new_epoch_and_the_resume_says_it_is_not_recovered() {
    let nodes = Nodes::single(json!({})).await;
    for i in 1..=2 {
        nodes
            .post(0, "lobby", json!({"text": format!("before {i}")}))
            .await;
    }
    let (_, welcome) = nodes.join(0, "/room/lobby?name=r").await;
    let (epoch, last) = position(&welcome);
    nodes.stop().await;
    let nodes = Nodes::single(json!({})).await;
    for i in 1..=3 {
        nodes
            .post(0, "lobby", json!({"text": format!("after {i}")}))
            .await;
    }
    let (mut back, welcome) = nodes
        .join(0, &format!("/room/lobby?name=r&since={last}&epoch={epoch}"))
        .await;
    assert_ne!(welcome["epoch"], epoch.as_str());
    assert_eq!(welcome["recovered"], false);
    // The newest of the new history follow, never a silent gap.
    let texts: Vec<String> = {
        let mut texts = Vec::new();
        for _ in 0..3 {
            texts.push(
                back.next_of("message").await["text"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        texts
    };
    assert_eq!(texts, ["after 1", "after 2", "after 3"]);
    nodes.stop().await;
}

#[tokio::test]
async fn sqlite_restarted_keeps_its_epoch_and_the_resume_gets_exactly_what_was_missed() {
    let dir = tempfile::tempdir().unwrap();
    let on_disk = || json!({"data_dir": dir.path()});
    let nodes = Nodes::single(on_disk()).await;
    for i in 1..=5 {
        nodes
            .post(0, "lobby", json!({"text": format!("m{i}")}))
            .await;
    }
    let (_, welcome) = nodes.join(0, "/room/lobby?name=r").await;
    let (epoch, seen) = position(&welcome);
    assert_eq!(seen, 5);
    for i in 6..=7 {
        nodes
            .post(0, "lobby", json!({"text": format!("m{i}")}))
            .await;
    }
    nodes.stop().await;
    let nodes = Nodes::single(on_disk()).await;
    nodes.post(0, "lobby", json!({"text": "m8"})).await;
    let (mut back, welcome) = nodes
        .join(0, &format!("/room/lobby?name=r&since=5&epoch={epoch}"))
        .await;
    assert_eq!(
        (welcome["epoch"].as_str(), welcome["recovered"].as_bool()),
        (Some(epoch.as_str()), Some(true))
    );
    assert_eq!(back.ids_upto(8).await, [6, 7, 8]);
    nodes.post(0, "lobby", json!({"text": "m9"})).await;
    assert_eq!(back.next_of("message").await["id"], 9);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_keeps_its_data_keeps_the_epoch_across_a_restart() {
    let Some(mut nodes) = Nodes::pair(Persistence::AppendOnly).await else {
        return;
    };
    post_numbered(&nodes, 1, 1..=3).await;
    let (_, welcome) = nodes.join(0, "/room/lobby?name=r").await;
    let (epoch, _) = position(&welcome);
    nodes.redis.as_mut().unwrap().restart().await;
    wait_healthy(&nodes).await;
    nodes.post(0, "lobby", json!({"text": "m4"})).await;
    let (mut back, welcome) = nodes
        .join(1, &format!("/room/lobby?name=r&since=1&epoch={epoch}"))
        .await;
    assert_eq!(
        (welcome["epoch"].as_str(), welcome["recovered"].as_bool()),
        (Some(epoch.as_str()), Some(true))
    );
    assert_eq!(back.ids_upto(4).await, [2, 3, 4]);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_is_a_new_epoch_and_its_subscribers_are_told() {
    let Some(mut nodes) = Nodes::pair(Persistence::None).await else {
        return;
    };
    post_numbered(&nodes, 1, 1..=3).await;
    let (mut watching, welcome) = nodes.join(0, "/room/lobby?name=w").await;
    let (epoch, last) = position(&welcome);
    assert_eq!(last, 3);
    nodes.redis.as_mut().unwrap().restart().await;
    // The node notices the new epoch when it subscribes again: the ids its members hold
    // belong to a history that is gone, so it closes them to resume.
    assert_eq!(watching.closed().await, switchboard_server::HISTORY_RESET.0);
    wait_healthy(&nodes).await;
    nodes
        .post(1, "lobby", json!({"text": "after the loss"}))
        .await;
    let mut back = resume_into_a_new_epoch(&nodes, 0, last, &epoch).await;
    let m = back.next_of("message").await;
    assert_eq!(
        (m["id"].as_u64(), m["text"].as_str()),
        (Some(1), Some("after the loss"))
    );
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_went_back_under_the_same_epoch_renew_it() {
    let Some(nodes) = Nodes::pair(Persistence::None).await else {
        return;
    };
    post_numbered(&nodes, 1, 1..=3).await;
    let (mut watching, welcome) = nodes.join(0, "/room/lobby?name=w").await;
    let (epoch, last) = position(&welcome);
    assert_eq!(last, 3);
    // Redis comes back without its last two writes (a restart from an append-only
    // file synced once a second, say), the epoch key intact: its ids went back.
    let redis = nodes.redis.as_ref().unwrap();
    redis.cli(&["SET", "switchboard:{lobby}:seq", "1"]);
    redis.cli(&["DEL", "switchboard:{lobby}:history"]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    // The nodes subscribe again and catch up: the history is not what members were
    // told, so the epoch is renewed and they resume.
    assert_eq!(watching.closed().await, switchboard_server::HISTORY_RESET.0);
    // On the node that has caught up (the other may still be subscribing again; its
    // members are cut off when it has).
    let mut back = resume_into_a_new_epoch(&nodes, 0, last, &epoch).await;
    // The next publication takes id 2 again, and is delivered, not taken for one seen.
    assert_eq!(nodes.post(0, "lobby", json!({"text": "m2 again"})).await, 2);
    let m = back.next_of("message").await;
    assert_eq!(
        (m["id"].as_u64(), m["text"].as_str()),
        (Some(2), Some("m2 again"))
    );
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_go_on_above_the_stored_history_when_the_counter_was_lost() {
    let Some(nodes) = Nodes::pair(Persistence::None).await else {
        return;
    };
    post_numbered(&nodes, 0, 1..=3).await;
    nodes
        .redis
        .as_ref()
        .unwrap()
        .cli(&["DEL", "switchboard:{lobby}:seq"]);
    assert_eq!(nodes.post(1, "lobby", json!({"text": "m4"})).await, 4);
    let (status, history) = http::get(&nodes.address(0), "/api/rooms/lobby/messages").await;
    assert_eq!(status, 200);
    assert_eq!(history["messages"].as_array().unwrap().len(), 4);
    nodes.stop().await;
}

/// Joins `lobby` on `node` resuming after `last` in `epoch`, which the channel no longer
/// has: the welcome names another epoch and says the resume was not recovered.
async fn resume_into_a_new_epoch(nodes: &Nodes, node: usize, last: u64, epoch: &str) -> Room {
    let (back, welcome) = nodes
        .join(
            node,
            &format!("/room/lobby?name=w&since={last}&epoch={epoch}"),
        )
        .await;
    assert_ne!(welcome["epoch"], epoch);
    assert_eq!(welcome["recovered"], false);
    back
}

/// Publishes `m{i}` for each `i` to `lobby` through `node`.
async fn post_numbered(nodes: &Nodes, node: usize, numbers: std::ops::RangeInclusive<u32>) {
    for i in numbers {
        nodes
            .post(node, "lobby", json!({"text": format!("m{i}")}))
            .await;
    }
}

/// Waits until every node's `/healthz` answers 200 (its Redis answers again).
async fn wait_healthy(nodes: &Nodes) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for node in 0..nodes.servers.len() {
        while http::get(&nodes.address(node), "/healthz").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {node} never recovered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A Redis written by a version before hash tags (`switchboard:seq:lobby` and the like):
/// the first node of this version renames the room's keys in place, so its ids, epoch
/// and history carry on, and a resume from before the upgrade is recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_the_first_layout_are_renamed_and_resumes_carry_on() {
    let Some(redis) = RedisServer::start(Persistence::None).await else {
        return;
    };
    let record = |n: u32| {
        json!({"from": "ann", "text": format!("m{n}"), "timestamp": "2026-12-01T00:00:00.000Z"})
            .to_string()
    };
    for n in 1..=3u32 {
        let id = format!("{n}-0");
        redis.cli(&[
            "XADD",
            "switchboard:history:lobby",
            &id,
            "m",
            &record(n),
            "t",
            "1",
        ]);
    }
    redis.cli(&["SET", "switchboard:seq:lobby", "3"]);
    redis.cli(&["SET", "switchboard:epoch:lobby", "e-before"]);
    redis.cli(&["HSET", "switchboard:nonces:lobby", "ann\nn3", "3"]);
    redis.cli(&["SADD", "switchboard:rooms", "lobby"]);
    let server = Server::start(config(json!({"redis": redis.url()}))).await;
    // Healthy once it has joined the cluster, migration done, and subscribed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while http::get(&server.address.to_string(), "/healthz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redis.cli(&["GET", "switchboard:{%control}:layout"]), "2");
    assert_eq!(redis.cli(&["EXISTS", "switchboard:seq:lobby"]), "0");
    assert_eq!(redis.cli(&["EXISTS", "switchboard:rooms"]), "0");
    assert_eq!(redis.cli(&["GET", "switchboard:{lobby}:seq"]), "3");
    let url = server.url("/room/lobby?name=ann&since=1&epoch=e-before");
    let (mut ann, welcome) = Room::join(&url).await;
    assert_eq!(
        (&welcome["epoch"], &welcome["lastId"], &welcome["recovered"]),
        (&json!("e-before"), &json!(3), &json!(true)),
        "{welcome}"
    );
    let texts: Vec<Value> = [ann.next_of("message").await, ann.next_of("message").await]
        .into_iter()
        .map(|m| m["text"].clone())
        .collect();
    assert_eq!(texts, [json!("m2"), json!("m3")]);
    // The nonce carried over too: sent again, it is the stored message, not a new one.
    ann.send(json!({"type": "message", "text": "m3", "nonce": "n3"}))
        .await;
    assert_eq!(ann.next_of("message").await["id"], 3);
    assert_eq!(ann.say("m4").await, 4);
    server.stop().await;
}
