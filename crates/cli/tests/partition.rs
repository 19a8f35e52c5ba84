//! A node cut off from Redis by a network that goes silent (no reset, no close: relays
//! that stop forwarding its links for 20 s) while another node goes on, on one Redis and
//! on a Redis Cluster (three masters, one replica each, every node behind a relay it
//! announces, so the cut-off node's links to every shard go silent and the other
//! node's do not): the cut-off node says it is unhealthy within `redis_timeout_ms`,
//! refuses messages with `unavailable`, keeps its clients, and its users leave on the
//! other node; once the links speak again it serves again by itself, and every message
//! is delivered and stored once, in order.
//!
//! Needs `redis-server` and `redis-cli`; without them the tests say so and pass
//! locally, with `CI=true` they fail (`switchboard_test_support::redis`).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_test_support::http;
use switchboard_test_support::redis::{Persistence, RedisCluster, RedisServer};
use switchboard_test_support::relay::Relay;
use switchboard_test_support::room::Room;

const TIMEOUT_MS: u64 = 1000;

/// A node's configuration file, in `dir`.
fn config(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        format!(
            "presence_expiry_secs = 2\nredis_timeout_ms = {TIMEOUT_MS}\n\
             rate_limit_per_sec = 1000.0\nrate_limit_burst = 1000\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

async fn health(address: &str) -> u16 {
    http::raw(address, "GET", "/healthz", "", None)
        .await
        .map_or(0, |(status, _)| status)
}

/// Waits (up to `bound`) until the server's `/healthz` answers `status`; how long it took.
async fn until_health(address: &str, status: u16, bound: Duration) -> Duration {
    let start = Instant::now();
    while health(address).await != status {
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
async fn a_node_behind_a_silent_link_to_redis_says_so_refuses_and_comes_back_whole() {
    let Some(redis) = RedisServer::start(Persistence::None).await else {
        return;
    };
    let relay = Relay::start(redis.address()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let through_relay = relay.url("redis");
    let (_cut, cut) = support::serve_with(
        "127.0.0.1:0",
        &["--memory", "--redis", &through_relay, "--config", &config],
    )
    .await;
    let (_other, other) = support::serve_with(
        "127.0.0.1:0",
        &["--memory", "--redis", &redis.url(), "--config", &config],
    )
    .await;
    cut_off_and_back(&cut, &other, || relay.silence(), || relay.speak()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_silent_links_to_a_redis_cluster_says_so_refuses_and_comes_back_whole() {
    let Some(cluster) = RedisCluster::start_relayed(3, 2000).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let seeds = cluster.urls().join(",");
    let args = ["--memory", "--redis-cluster", &seeds, "--config", &config];
    let (cut_node, cut) = support::serve_with("127.0.0.1:0", &args).await;
    let (_other, other) = support::serve_with("127.0.0.1:0", &args).await;
    let pid = cut_node.id().expect("a running node");
    cut_off_and_back(
        &cut,
        &other,
        || cluster.silence_process(pid),
        || cluster.speak(),
    )
    .await;
}

/// Ann on the node at `cut`, Bob on the node at `other`; `silence` makes the cut-off
/// node's links to Redis go silent for 20 s, `speak` ends it.
async fn cut_off_and_back(cut: &str, other: &str, silence: impl Fn(), speak: impl Fn()) {
    let url = |address: &str, name: &str| format!("ws://{address}/room/cut?name={name}");
    let (mut bob, _) = Room::join(&url(other, "bob")).await;
    let (mut ann, welcome) = Room::join(&url(cut, "ann")).await;
    assert_eq!(welcome["members"], json!(["ann", "bob"]), "{welcome}");
    assert_eq!(bob.next_of("join").await["user"], "ann");
    let first = ann.say("before").await;
    assert_eq!(bob.ids_upto(first).await, [first]);
    assert_eq!(health(cut).await, 200);

    silence();
    let silent = Instant::now();
    let noticed = until_health(cut, 503, Duration::from_secs(5)).await;
    eprintln!("the cut-off node answered 503 after {noticed:?} (bound {TIMEOUT_MS} ms)");
    // The bound, with room for a loaded machine's scheduling.
    assert!(
        noticed <= Duration::from_millis(TIMEOUT_MS * 3 / 2),
        "{noticed:?}"
    );
    assert_eq!(health(other).await, 200);

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
    let (status, members) = http::get(other, "/api/rooms/cut/members").await;
    assert_eq!(
        (status, &members["members"]),
        (200, &json!(["bob"])),
        "{members}"
    );

    tokio::time::sleep(Duration::from_secs(20).saturating_sub(silent.elapsed())).await;
    assert_eq!(health(cut).await, 503, "still cut off after 20 s");
    speak();
    let back = until_health(cut, 200, Duration::from_secs(10)).await;
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
    let (_, history) = http::get(other, "/api/rooms/cut/messages?since=0&limit=100").await;
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
}
