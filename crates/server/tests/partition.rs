//! A node cut off from Redis by a network that goes silent (no reset, no close: a relay
//! that stops forwarding for 20 s) while another node goes on: the cut-off node says
//! it is unhealthy within `redis_timeout_ms`, refuses messages with `unavailable`,
//! keeps its clients, and its users leave on the other node; once the link speaks again
//! it serves again by itself, and every message is delivered and stored once, in order.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_server::Config;
use switchboard_test_support::http;
use switchboard_test_support::redis::{Persistence, RedisServer};
use switchboard_test_support::relay::Relay;
use switchboard_test_support::room::Room;

mod support;
use support::Server;

const TIMEOUT_MS: u64 = 1000;

fn node(redis_url: String) -> Config {
    serde_json::from_value(json!({
        "redis": redis_url,
        "presence_expiry_secs": 2,
        "redis_timeout_ms": TIMEOUT_MS,
        "rate_limit_per_sec": 1000.0,
        "rate_limit_burst": 1000,
    }))
    .expect("a valid config")
}

async fn health(server: &Server) -> u16 {
    http::raw(&server.address.to_string(), "GET", "/healthz", "", None)
        .await
        .map_or(0, |(status, _)| status)
}

/// Waits (up to `bound`) until the server's `/healthz` answers `status`; how long it took.
async fn until_health(server: &Server, status: u16, bound: Duration) -> Duration {
    let start = Instant::now();
    while health(server).await != status {
        assert!(
            start.elapsed() < bound,
            "/healthz did not answer {status} within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// The next event that is not typing (presence and messages are what this test reads).
async fn next_event(room: &mut Room) -> Value {
    loop {
        let event = room.next().await;
        if event["type"] != "typing" {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_silent_link_says_so_refuses_keeps_its_clients_and_comes_back_whole() {
    let Some(redis) = RedisServer::start(Persistence::None).await else {
        return;
    };
    let port: u16 = redis.url().rsplit(':').next().unwrap().parse().unwrap();
    let relay = Relay::start(([127, 0, 0, 1], port).into()).await;
    let cut = Server::start(node(relay.url("redis"))).await;
    let other = Server::start(node(redis.url())).await;

    let (mut bob, _) = Room::join(&other.url("/room/cut?name=bob")).await;
    let (mut ann, welcome) = Room::join(&cut.url("/room/cut?name=ann")).await;
    assert_eq!(welcome["members"], json!(["ann", "bob"]), "{welcome}");
    assert_eq!(bob.next_of("join").await["user"], "ann");
    let first = ann.say("before").await;
    assert_eq!(bob.ids_upto(first).await, [first]);
    assert_eq!(health(&cut).await, 200);

    relay.silence();
    let silent = Instant::now();
    let noticed = until_health(&cut, 503, Duration::from_secs(5)).await;
    eprintln!("the cut-off node answered 503 after {noticed:?} (bound {TIMEOUT_MS} ms)");
    // The bound, with room for a loaded machine's scheduling.
    assert!(
        noticed <= Duration::from_millis(TIMEOUT_MS * 3 / 2),
        "{noticed:?}"
    );
    assert_eq!(health(&other).await, 200);

    ann.send(json!({"type": "message", "text": "during", "nonce": "n-during"}))
        .await;
    let refused = next_event(&mut ann).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert_eq!(refused["nonce"], "n-during", "{refused}");

    // The other node reaps the silent node's users (expiry 2 s) and goes on.
    let leave = bob.next_of("leave").await;
    assert_eq!(leave["user"], "ann", "{leave}");
    let mut bobs = Vec::new();
    for n in 0..3 {
        bobs.push(bob.say(&format!("meanwhile {n}")).await);
    }
    let (status, members) = http::get(&other.address.to_string(), "/api/rooms/cut/members").await;
    assert_eq!(
        (status, &members["members"]),
        (200, &json!(["bob"])),
        "{members}"
    );

    tokio::time::sleep(Duration::from_secs(20).saturating_sub(silent.elapsed())).await;
    assert_eq!(health(&cut).await, 503, "still cut off after 20 s");
    relay.speak();
    let back = until_health(&cut, 200, Duration::from_secs(10)).await;
    eprintln!("the node answered 200 again {back:?} after the link spoke");

    // Ann was kept connected: she receives what Bob said while she was cut off, and
    // sends her refused message again, with its nonce.
    ann.send(json!({"type": "message", "text": "during", "nonce": "n-during"}))
        .await;
    let mut got: Vec<(u64, String)> = Vec::new();
    let mut acknowledged = None;
    while acknowledged.is_none() || got.len() < 4 {
        let event = next_event(&mut ann).await;
        match event["type"].as_str() {
            Some("message") => {
                let id = event["id"].as_u64().unwrap();
                if event["nonce"] == "n-during" {
                    acknowledged = Some(id);
                }
                if !got.iter().any(|(seen, _)| *seen == id) {
                    got.push((id, event["text"].as_str().unwrap().to_owned()));
                } else {
                    // Only the acknowledgement of a retried nonce may come twice.
                    assert_eq!(event["nonce"], "n-during", "{event} twice");
                }
            }
            Some("join" | "leave") => {}
            other => panic!("unexpected {other:?}: {event}"),
        }
    }
    let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (first + 1..=first + 4).collect::<Vec<_>>(), "{got:?}");
    for id in &bobs {
        assert!(ids.contains(id), "{id} missing from {got:?}");
    }

    // Bob sees Ann again, without her doing anything: her node told its presence again.
    assert_eq!(bob.next_of("join").await["user"], "ann");
    let last = *ids.last().unwrap();
    let (_, history) = http::get(
        &other.address.to_string(),
        "/api/rooms/cut/messages?since=0&limit=100",
    )
    .await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 5, "{texts:?}");
    assert_eq!(
        texts.iter().filter(|t| **t == "during").count(),
        1,
        "{texts:?}"
    );
    assert_eq!(history["messages"][4]["id"], last);

    // And it serves as before.
    let after = ann.say("after").await;
    assert_eq!(bob.ids_upto(after).await.last(), Some(&after));
    drop((ann, bob));
    cut.stop().await;
    other.stop().await;
}
