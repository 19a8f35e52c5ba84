//! Three `switchboard serve --redis-cluster` nodes on a real Redis Cluster (three
//! masters, one replica each), with clients of every door on every node: messages,
//! history, presence, typing and resume across nodes; the Redis master that owns a busy
//! channel killed with SIGKILL while messages are sent with `redis_wait_replicas = 1`
//! (its replica takes over: every acknowledged message is stored once, every client
//! resumes with no gap and no duplicate); a Switchboard node killed with SIGKILL (its
//! users leave everywhere within the expiry, no ghost remains).
//!
//! Needs `redis-server` and `redis-cli` (Debian's package). Without them the test says
//! so and passes locally; with `CI=true` it fails (`switchboard_test_support::redis`).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_client::{connect, Backoff, Options};
use switchboard_protocol::centrifuge::{Command, Encoding, SubscribeRequest};
use switchboard_test_support::centrifuge::Centrifuge;
use switchboard_test_support::http;
use switchboard_test_support::pusher::{data_of, Pusher};
use switchboard_test_support::redis::RedisCluster;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use support::{collect, members, wait_acknowledged};

const ROOM: &str = "busy";
const EXPIRY_SECS: u64 = 6;

fn kill(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until every node in `nodes` lists exactly `want` in the room.
async fn until_members(nodes: &[&str], want: &[&str], bound: Duration) -> Duration {
    let start = Instant::now();
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    for node in nodes {
        while members(node, ROOM).await.as_ref() != Some(&want) {
            assert!(
                start.elapsed() < bound,
                "node {node} lists {:?}, not {want:?}",
                members(node, ROOM).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    start.elapsed()
}

type Seen = Vec<(u64, String, String)>;

/// The room's stored history, read through `node`.
async fn history(node: &str) -> Seen {
    let path = format!("/api/rooms/{ROOM}/messages?since=0&limit=10000");
    let (status, body) = http::get(node, &path).await;
    assert_eq!(status, 200, "{body}");
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["from"].as_str().unwrap_or_default().to_owned(),
                m["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A Centrifugo client subscribed to the room, as an SDK is: when its connection is
/// lost (its node cut it off, or died) it connects again and subscribes with `recover`
/// from the last offset it has. The offsets and texts of its publications, in order,
/// until it has `count`.
fn centrifuge_reader(nodes: Vec<String>, count: usize) -> JoinHandle<Vec<(u64, String)>> {
    tokio::spawn(async move {
        let mut got: Vec<(u64, String)> = Vec::new();
        let mut epoch = String::new();
        for attempt in 0..8 {
            let node = nodes[attempt % nodes.len()].clone();
            let (tx, mut rx) = mpsc::unbounded_channel::<(String, u64, String)>();
            let offset = got.last().map_or(0, |g| g.0);
            let since = (offset > 0).then(|| epoch.clone());
            // One connection; it panics when the connection is lost, which only ends it.
            let session = tokio::spawn(async move {
                let url = format!("ws://{node}/connection/websocket");
                let (mut client, reply) = Centrifuge::connect(&url, Encoding::Json, "").await;
                assert!(reply.error.is_none(), "{reply:?}");
                let reply = client
                    .call(Command {
                        subscribe: Some(SubscribeRequest {
                            channel: ROOM.into(),
                            recover: since.is_some(),
                            epoch: since.clone().unwrap_or_default(),
                            offset,
                            ..SubscribeRequest::default()
                        }),
                        ..Command::default()
                    })
                    .await;
                assert!(reply.error.is_none(), "{reply:?}");
                let result = reply.subscribe.expect("a subscribe result");
                if since.is_some() {
                    assert!(result.recovered, "not recovered from {offset}: {result:?}");
                }
                for publication in result.publications {
                    let data: Value = serde_json::from_slice(&publication.data).unwrap();
                    let text = data["text"].as_str().unwrap_or_default().to_owned();
                    let _ = tx.send((result.epoch.clone(), publication.offset, text));
                }
                loop {
                    let (channel, offset, data) = client.publication().await;
                    assert_eq!(channel, ROOM);
                    let text = data["text"].as_str().unwrap_or_default().to_owned();
                    let _ = tx.send((result.epoch.clone(), offset, text));
                }
            });
            while let Some((now, offset, text)) = rx.recv().await {
                epoch = now;
                got.push((offset, text));
                if got.len() >= count {
                    session.abort();
                    return got;
                }
            }
            let ended = session.await;
            eprintln!(
                "the Centrifugo reader connects again after {} publications ({ended:?})",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "the Centrifugo reader never got everything: {} of {count}",
            got.len()
        );
    })
}

/// A Pusher client subscribed to the room (a public channel of the open-mode app): the
/// texts of its events, until it has `count` or its connection ends (Pusher's protocol
/// has no recovery: a client cut off misses what it missed).
fn pusher_reader(node: String, count: usize) -> JoinHandle<Vec<String>> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let session = tokio::spawn(async move {
        let mut client = Pusher::open(&format!("ws://{node}/app/app-key?protocol=7")).await;
        let ok = client.subscribe(ROOM, None, None).await;
        assert_eq!(
            ok["event"], "pusher_internal:subscription_succeeded",
            "{ok}"
        );
        loop {
            let event = client.next().await;
            if event["channel"] == ROOM && event["event"] == "message" {
                let data = data_of(&event);
                let _ = tx.send(data["text"].as_str().unwrap_or_default().to_owned());
            }
        }
    });
    tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(text) = rx.recv().await {
            got.push(text);
            if got.len() >= count {
                break;
            }
        }
        session.abort();
        got
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_redis_cluster_through_a_master_killed_and_a_node_killed() {
    const EACH: usize = 200;
    let Some(mut cluster) = RedisCluster::start(3, 2000).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "presence_expiry_secs = {EXPIRY_SECS}\nrate_limit_per_sec = 100000.0\n\
             rate_limit_burst = 100000\nredis_wait_replicas = 1\nredis_wait_timeout_ms = 500\n\
             redis_timeout_ms = 1500\n"
        ),
    )
    .unwrap();
    let seeds = cluster.urls().join(",");
    let config = config.to_str().unwrap();
    let node_args = ["--memory", "--redis-cluster", &seeds, "--config", config];
    let (_n1, a1) = support::serve_with("127.0.0.1:0", &node_args).await;
    let (mut n2, a2) = support::serve_with("127.0.0.1:0", &node_args).await;
    let (_n3, a3) = support::serve_with("127.0.0.1:0", &node_args).await;

    let room_url = |address: &str| format!("ws://{address}/room/{ROOM}");
    let quick = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    let options = |name: &str| {
        Options::default()
            .with_name(name)
            .with_backoff(quick.clone())
    };
    // Room clients on every node: Ann (node 1) and Cat (node 3) send, Bob (node 2) and
    // Dan (node 3) read; a Centrifugo reader on node 3 and a Pusher reader on node 1.
    let (ann, ann_events) = connect(&room_url(&a1), options("ann")).await.unwrap();
    let (bob, bob_events) = connect(&room_url(&a2), options("bob")).await.unwrap();
    let (cat, cat_events) = connect(&room_url(&a3), options("cat")).await.unwrap();
    let (dan, dan_events) = connect(&room_url(&a3), options("dan")).await.unwrap();
    let total = 2 * EACH;
    let seen: Vec<_> = [
        ("ann", ann_events),
        ("cat", cat_events),
        ("dan", dan_events),
    ]
    .into_iter()
    .map(|(who, events)| collect(who, events, total, false))
    .collect();
    let bob_seen = collect("bob", bob_events, total, true);
    let centrifuge = centrifuge_reader(vec![a3.clone(), a1.clone()], total);
    let pusher = pusher_reader(a1.clone(), total);
    let everyone = ["ann", "bob", "cat", "dan"];
    until_members(&[&a1, &a2, &a3], &everyone, Duration::from_secs(10)).await;

    // Typing crosses nodes.
    bob.set_typing(true).unwrap();

    let room_key = format!("switchboard:{{{ROOM}}}:seq");
    let master = cluster.master_of(&room_key).expect("a master for the room");
    let mut killed_master_at = None;
    for i in 0..EACH {
        ann.send_message(format!("ann-{i:03}")).unwrap();
        cat.send_message(format!("cat-{i:03}")).unwrap();
        if i == 40 {
            // The master that owns the room dies: its replica takes over (after the
            // cluster's node timeout), messages meanwhile are refused and sent again.
            cluster.kill(master).await;
            killed_master_at = Some(Instant::now());
        }
        if i == 80 {
            // Its replica is master now; with no replica of its own it cannot confirm
            // anything (`redis_wait_replicas = 1`), so messages wait until the old
            // master, restarted, comes back as its replica.
            let deadline = Instant::now() + Duration::from_secs(30);
            while cluster.master_of(&room_key).is_none_or(|now| now == master) {
                assert!(
                    Instant::now() < deadline,
                    "no replica took over from {master}: {}\n{}",
                    cluster.cli(cluster.any_port(), &["CLUSTER", "NODES"]),
                    cluster.replicas_logs(master)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!(
                "a replica took over {:?} after the master was killed",
                killed_master_at.unwrap().elapsed()
            );
            cluster.restart(master).await;
        }
        if i == 140 {
            // A Switchboard node dies: Bob's user leaves everywhere, no ghost stays.
            kill(&n2);
            let killed = Instant::now();
            n2.wait().await.unwrap();
            let gone =
                until_members(&[&a1, &a3], &["ann", "cat", "dan"], Duration::from_secs(40)).await;
            let bound = Duration::from_secs(EXPIRY_SECS + EXPIRY_SECS / 3 + 2);
            eprintln!(
                "bob left every member list {:?} after his node was killed",
                killed.elapsed()
            );
            assert!(
                gone <= bound,
                "bob stayed {gone:?} (expiry {EXPIRY_SECS} s)"
            );
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!(
        "sent everything {:?} after the master was killed",
        killed_master_at.unwrap().elapsed()
    );
    wait_acknowledged(&ann, "ann").await;
    wait_acknowledged(&cat, "cat").await;
    eprintln!("every message acknowledged");

    // One id sequence with each message once, the same for every reader on every node,
    // and what is stored.
    let sent: BTreeSet<String> = (0..EACH)
        .flat_map(|i| [format!("ann-{i:03}"), format!("cat-{i:03}")])
        .collect();
    let mut sequences = Vec::new();
    for (who, handle) in ["ann", "cat", "dan"].into_iter().zip(seen) {
        let (got, typists) = handle.await.unwrap();
        // Bob typed on node 2; Ann is on node 1, Cat and Dan on node 3.
        assert!(
            typists.iter().any(|u| u == "bob"),
            "{who} never saw bob typing: {typists:?}"
        );
        sequences.push(got);
    }
    eprintln!(
        "room readers done: {:?}",
        sequences.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let (bob_got, _) = bob_seen.await.unwrap();
    let first = &sequences[0];
    let ids: Vec<u64> = first.iter().map(|m| m.0).collect();
    assert_eq!(ids, (1..=total as u64).collect::<Vec<_>>());
    let texts: BTreeSet<String> = first.iter().map(|m| m.2.clone()).collect();
    assert_eq!(texts, sent, "not every message sent, once");
    for other in &sequences[1..] {
        assert_eq!(other, first, "another reader saw another sequence");
    }
    assert_eq!(
        &first[..bob_got.len()],
        &bob_got[..],
        "bob saw another start"
    );
    assert_eq!(
        history(&a3).await,
        *first,
        "the history differs from what was delivered"
    );
    let centrifuge = centrifuge.await.unwrap();
    let offsets: Vec<u64> = centrifuge.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, ids, "the Centrifugo reader's offsets");
    // The Pusher reader, which cannot resume, saw the sequence in order with nothing
    // twice (all of it unless it was cut off).
    let pushed = pusher.await.unwrap();
    let texts: Vec<String> = first.iter().map(|m| m.2.clone()).collect();
    let mut rest = texts.iter();
    for text in &pushed {
        assert!(
            rest.any(|t| t == text),
            "the Pusher reader's {text} is out of order"
        );
    }
    eprintln!(
        "the Pusher reader saw {} of {} messages",
        pushed.len(),
        texts.len()
    );
    assert!(
        pushed.len() >= EACH / 2,
        "the Pusher reader saw only {}",
        pushed.len()
    );

    // Resume across nodes: Dan leaves, messages go on, he comes back on node 1 with
    // `since` and receives exactly what he missed.
    let last = first.last().unwrap().0;
    dan.close().await;
    let mut missed = Vec::new();
    for i in 0..5 {
        let body = json!({"from": "api", "text": format!("later-{i}")});
        let path = format!("/api/rooms/{ROOM}/messages");
        let (status, answer): (u16, Value) = http::post(&a3, &path, &body).await;
        assert_eq!(status, 201, "{answer}");
        missed.push(answer["message"]["id"].as_u64().unwrap());
    }
    let (dan, dan_events) = connect(&room_url(&a1), options("dan").with_since(Some(last)))
        .await
        .unwrap();
    let (again, _) = collect("dan", dan_events, 5, false).await.unwrap();
    assert_eq!(again.iter().map(|m| m.0).collect::<Vec<_>>(), missed);
    for client in [&ann, &cat, &dan, &bob] {
        client.close().await;
    }
}
