//! Three `switchboard serve --redis` nodes on one Redis, and again on three standalone
//! Redis servers that share the channels between them (`--redis` three times): one room
//! across the nodes, a node killed with SIGKILL under load, and a restart of the Redis
//! that holds the room.
//!
//! Needs `redis-server` (Debian's package). Without it the test says so and passes
//! locally; with `CI=true` it fails (`switchboard_test_support::redis`).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use switchboard_client::{connect, Backoff, Options};
use switchboard_test_support::http;
use switchboard_test_support::redis::{Persistence, RedisServer};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;
use tokio::time::Instant;

use support::{collect, members, wait_acknowledged};

fn signal(child: &Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A TCP load balancer: each connection goes to the first backend that accepts it, so
/// when a node dies its clients land on the next one.
async fn balancer(backends: Vec<String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let backends = backends.clone();
            tokio::spawn(async move {
                for backend in &backends {
                    if let Ok(mut outbound) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    });
    address
}

/// Posts a message over the HTTP API and returns the status.
async fn post_status(node: &str, room: &str, text: &str) -> Option<u16> {
    let body = serde_json::json!({"from": "api", "text": text});
    let path = format!("/api/rooms/{room}/messages");
    http::request(node, "POST", &path, "", Some(&body))
        .await
        .map(|(status, _)| status)
}

async fn healthz_status(node: &str) -> Option<u16> {
    http::request(node, "GET", "/healthz", "", None)
        .await
        .map(|(status, _)| status)
}

/// The body of a 200 answer to `GET path`.
async fn http_get(node: &str, path: &str) -> Option<String> {
    let (status, body) = http::raw(node, "GET", path, "", None).await?;
    (status == 200).then_some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_a_room_through_a_killed_node_and_a_redis_restart() {
    three_nodes(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_three_redis_shards_share_a_room_through_a_killed_node_and_a_restart() {
    three_nodes(3).await;
}

async fn three_nodes(shards: usize) {
    const ROOM: &str = "cluster";
    const EACH: usize = 300;
    const EXPIRY_SECS: u64 = 6;
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    for _ in 0..shards {
        let Some(redis) = RedisServer::start(Persistence::AppendOnly).await else {
            return;
        };
        servers.push(redis);
    }
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "presence_expiry_secs = {EXPIRY_SECS}\nrate_limit_per_sec = 100000.0\nrate_limit_burst = 100000\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let mut node_args = vec!["--memory".to_owned(), "--config".into(), config.into()];
    for redis in &servers {
        node_args.extend(["--redis".into(), redis.url()]);
    }
    let node_args: Vec<&str> = node_args.iter().map(String::as_str).collect();
    let (mut n1, a1) = support::serve_with("127.0.0.1:0", &node_args).await;
    let (_n2, a2) = support::serve_with("127.0.0.1:0", &node_args).await;
    let (_n3, a3) = support::serve_with("127.0.0.1:0", &node_args).await;

    let room_url = |address: &str| format!("ws://{address}/room/{ROOM}");
    let quick = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    let options = |name: &str| {
        Options::default()
            .with_name(name)
            .with_backoff(quick.clone())
    };
    // Alice starts on node 1 and Erin on node 2, both sending; Bob (node 2) and Carol
    // (node 3) read; Dave sits on node 1 and does not reconnect.
    let alice_lb = balancer(vec![a1.clone(), a2.clone(), a3.clone()]).await;
    let erin_lb = balancer(vec![a2.clone(), a3.clone()]).await;
    let (bob, bob_events) = connect(&room_url(&a2), options("bob")).await.unwrap();
    let (carol, carol_events) = connect(&room_url(&a3), options("carol")).await.unwrap();
    let bob_seen = collect("bob", bob_events, 2 * EACH, false);
    let carol_seen = collect("carol", carol_events, 2 * EACH, false);
    let (dave, _dave_events) = connect(&room_url(&a1), options("dave").with_reconnect(false))
        .await
        .unwrap();
    let (alice, alice_events) = connect(&room_url(&alice_lb), options("alice"))
        .await
        .unwrap();
    let (erin, erin_events) = connect(&room_url(&erin_lb), options("erin")).await.unwrap();
    let alice_seen = collect("alice", alice_events, 2 * EACH, false);
    let erin_seen = collect("erin", erin_events, 2 * EACH, false);

    // Every node sees the same members.
    let everyone: Vec<String> = ["alice", "bob", "carol", "dave", "erin"]
        .map(String::from)
        .into();
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in [&a1, &a2, &a3] {
        while members(node, ROOM).await.as_ref() != Some(&everyone) {
            assert!(
                Instant::now() < deadline,
                "node {node} never listed everyone"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Typing crosses nodes: Bob types on node 2, Carol on node 3 is told.
    bob.set_typing(true).unwrap();

    let mut dave_gone_after = None;
    let mut outage_seen = false;
    for i in 0..EACH {
        alice.send_message(format!("alice-{i:03}")).unwrap();
        erin.send_message(format!("erin-{i:03}")).unwrap();
        if i == 100 {
            // Node 1 dies under load, taking Alice's and Dave's connections with it.
            signal(&n1, "-KILL");
            let killed = Instant::now();
            n1.wait().await.unwrap();
            let watch_from = a2.clone();
            dave_gone_after = Some(tokio::spawn(async move {
                loop {
                    if let Some(list) = members(&watch_from, ROOM).await {
                        if !list.iter().any(|u| u == "dave") {
                            return killed.elapsed();
                        }
                    }
                    assert!(
                        killed.elapsed() < Duration::from_secs(40),
                        "dave never left"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        if i == 200 {
            let gone = dave_gone_after.take().unwrap().await.unwrap();
            assert!(
                gone <= Duration::from_secs(EXPIRY_SECS + EXPIRY_SECS / 3 + 1),
                "the killed node's user stayed {gone:?} (expiry {EXPIRY_SECS} s)"
            );
            eprintln!("dave left the member list {gone:?} after his node was killed");
            // The Redis that holds the room restarts: the nodes report it, keep their
            // clients, and recover.
            let key = format!("switchboard:{{{ROOM}}}:seq");
            let holders: Vec<usize> = (0..servers.len())
                .filter(|&i| servers[i].cli(&["EXISTS", &key]) == "1")
                .collect();
            assert_eq!(holders.len(), 1, "the room's keys are on {holders:?}");
            let redis = &mut servers[holders[0]];
            redis.stop().await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while healthz_status(&a3).await != Some(503) {
                assert!(
                    Instant::now() < deadline,
                    "healthz never reported Redis down"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let metrics = http_get(&a3, "/metrics").await.expect("metrics");
            assert!(
                metrics.lines().any(|l| l == "switchboard_redis_up 0"),
                "metrics do not show Redis down"
            );
            // A publish meanwhile is refused with a clear error, not lost or queued.
            assert_eq!(post_status(&a3, ROOM, "during the outage").await, Some(503));
            outage_seen = true;
            redis.run().await;
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(outage_seen);
    let deadline = Instant::now() + Duration::from_secs(20);
    while healthz_status(&a3).await != Some(200) {
        assert!(Instant::now() < deadline, "healthz never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_acknowledged(&alice, "alice").await;
    wait_acknowledged(&erin, "erin").await;

    let sent: BTreeSet<String> = (0..EACH)
        .flat_map(|i| [format!("alice-{i:03}"), format!("erin-{i:03}")])
        .collect();
    let (bob_seen, _) = bob_seen.await.unwrap();
    let (carol_seen, carol_typists) = carol_seen.await.unwrap();
    let (alice_seen, _) = alice_seen.await.unwrap();
    let (erin_seen, _) = erin_seen.await.unwrap();
    assert!(
        carol_typists.iter().any(|u| u == "bob"),
        "carol (node 3) never saw bob (node 2) typing: {carol_typists:?}"
    );
    // One id sequence, 1, 2, 3, … with each message once, whichever node it came in on.
    let ids: Vec<u64> = bob_seen.iter().map(|m| m.0).collect();
    assert_eq!(ids, (1..=(2 * EACH) as u64).collect::<Vec<_>>());
    let texts: BTreeSet<String> = bob_seen.iter().map(|m| m.2.clone()).collect();
    assert_eq!(texts, sent, "bob's messages are not every one sent, once");
    for m in &bob_seen {
        assert!(m.2.starts_with(&m.1), "{m:?} names the wrong sender");
    }
    // Every reader, on every node, saw the same sequence, across reconnections.
    assert_eq!(carol_seen, bob_seen, "carol (node 3) saw another sequence");
    assert_eq!(
        alice_seen, bob_seen,
        "alice (moved to node 2) saw another sequence"
    );
    assert_eq!(erin_seen, bob_seen, "erin saw another sequence");
    // The stored history, read from another node, is that sequence.
    let body = http_get(
        &a3,
        &format!("/api/rooms/{ROOM}/messages?since=0&limit=1000"),
    )
    .await
    .expect("history over HTTP");
    let history: serde_json::Value = serde_json::from_str(&body).unwrap();
    let stored: Vec<(u64, String, String)> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["from"].as_str().unwrap().to_owned(),
                m["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        stored, bob_seen,
        "the history differs from what was delivered"
    );
    // Alice reconnected through another node; Dave, who did not, is gone.
    let now = members(&a2, ROOM).await.unwrap();
    assert_eq!(now, ["alice", "bob", "carol", "erin"].map(String::from));
    for client in [&alice, &erin, &bob, &carol, &dave] {
        client.close().await;
    }
}
