//! Per-channel subscriptions over Redis, measured with Redis's own counters: a node
//! subscribes to a channel's Pub/Sub channel while it has members there and only then,
//! so Redis sends each message once per node that needs it (`PUBSUB NUMSUB`, or
//! `PUBSUB SHARDNUMSUB` on a Redis Cluster, `CLIENT LIST`'s `sub=` and the
//! `total_net_output_bytes` of `INFO stats`), and a node that just subscribed misses
//! nothing published around its subscription.

use std::time::Duration;

use serde_json::json;
use switchboard_server::Config;
use switchboard_test_support::http;
use switchboard_test_support::redis::{Persistence, RedisCluster, RedisServer};
use switchboard_test_support::relay::Relay;
use switchboard_test_support::room::Room;

mod support;
use support::Server;

fn node(redis: &RedisServer) -> Config {
    serde_json::from_value(json!({
        "redis": redis.url(),
        "presence_expiry_secs": 3,
        "rate_limit_per_sec": 100000.0,
        "rate_limit_burst": 100000,
        "handshakes_per_ip_per_sec": 100000.0,
        "handshake_burst_per_ip": 100000,
    }))
    .expect("a valid config")
}

async fn nodes(redis: &RedisServer, count: usize) -> Vec<Server> {
    let mut servers = Vec::new();
    for _ in 0..count {
        servers.push(Server::start(node(redis)).await);
    }
    servers
}

/// How many clients subscribe to `channel`, as Redis counts them.
fn numsub(redis: &RedisServer, channel: &str) -> u64 {
    let answer = redis.cli(&["PUBSUB", "NUMSUB", channel]);
    answer
        .lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("PUBSUB NUMSUB answered {answer:?}"))
}

/// The `sub=` count of every client that subscribes to anything, sorted.
fn subscriptions_per_client(redis: &RedisServer) -> Vec<u64> {
    let mut counts: Vec<u64> = redis
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter_map(|line| {
            let sub = line.split(' ').find_map(|f| f.strip_prefix("sub="))?;
            let psub = line.split(' ').find_map(|f| f.strip_prefix("psub="))?;
            let total = sub.parse::<u64>().ok()? + psub.parse::<u64>().ok()?;
            (total > 0).then_some(total)
        })
        .collect();
    counts.sort_unstable();
    counts
}

fn output_bytes(redis: &RedisServer) -> u64 {
    output_bytes_of(&redis.cli(&["INFO", "stats"]))
}

fn output_bytes_of(info: &str) -> u64 {
    info.lines()
        .find_map(|line| line.strip_prefix("total_net_output_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total_net_output_bytes in {info}"))
}

/// Waits until `check` holds (bounded), so a subscription change Redis has not applied
/// yet is waited for rather than raced.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not come to hold");
}

async fn post(server: &Server, room: &str, text: &str) -> u64 {
    let path = format!("/api/rooms/{room}/messages");
    let (status, answer) =
        http::post(&server.address.to_string(), &path, &json!({"text": text})).await;
    assert_eq!(status, 201, "{answer}");
    answer["message"]["id"].as_u64().expect("an id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sends_a_message_once_to_the_one_node_with_members_and_others_hear_only_their_own() {
    let Some(redis) = RedisServer::start(Persistence::None).await else {
        return;
    };
    let servers = nodes(&redis, 4).await;
    let room = "switchboard:{lobby}:room";
    // Nobody anywhere: each node holds the notices channel and its own inbox (for
    // posts addressed to it alone), nothing else.
    eventually("four clients with two subscriptions each", || {
        subscriptions_per_client(&redis) == [2, 2, 2, 2]
    })
    .await;
    assert_eq!(numsub(&redis, room), 0);

    // Two members, both on node 0.
    let (mut ann, _) = Room::join(&servers[0].url("/room/lobby?name=ann")).await;
    let (mut bob, _) = Room::join(&servers[0].url("/room/lobby?name=bob")).await;
    eventually("node 0 subscribed to the room", || {
        numsub(&redis, room) == 1
    })
    .await;
    assert_eq!(subscriptions_per_client(&redis), [2, 2, 2, 3]);
    assert_eq!(numsub(&redis, "switchboard:{%control}:notices"), 4);
    let inboxes = redis.cli(&["PUBSUB", "CHANNELS", "switchboard:{%control}:to:*"]);
    assert_eq!(inboxes.lines().count(), 4, "one inbox per node: {inboxes}");

    // 200 messages of 1,000 characters, published through node 3, which has no member there.
    let text = "x".repeat(1000);
    let before = output_bytes(&redis);
    let mut last = 0;
    for _ in 0..200 {
        last = post(&servers[3], "lobby", &text).await;
    }
    let sent = output_bytes(&redis) - before;
    assert_eq!(ann.ids_upto(last).await.len(), 200);
    assert_eq!(bob.ids_upto(last).await.len(), 200);
    // Once per message is 200 × 1,000 bytes plus framing and the publisher's small replies;
    // four nodes hearing every message would be four times that.
    let payload = 200 * 1000;
    eprintln!(
        "Redis sent {sent} bytes for {payload} bytes of messages ({:.2}x)",
        sent as f64 / payload as f64
    );
    assert!(sent >= payload, "{sent} bytes sent for {payload}");
    assert!(
        sent < payload * 3 / 2,
        "{sent} bytes sent for {payload}: more than once per message"
    );

    // The last member leaves: node 0 leaves the room's channel too.
    drop(ann);
    drop(bob);
    eventually("node 0 left the room's channel", || {
        numsub(&redis, room) == 0
    })
    .await;
    assert_eq!(subscriptions_per_client(&redis), [2, 2, 2, 2]);

    // Back later: node 0, which stopped hearing the room, reads where it stands again
    // (a joiner is not told an id it left behind), and elsewhere what was published
    // meanwhile is recovered from history.
    let missed = post(&servers[3], "lobby", "while nobody was here").await;
    let (cat, welcome) = Room::join(&servers[0].url("/room/lobby?name=cat")).await;
    assert_eq!(welcome["lastId"], missed, "{welcome}");
    drop(cat);
    let path = format!("/room/lobby?name=ann&since={last}");
    let (mut ann, welcome) = Room::join(&servers[2].url(&path)).await;
    assert_eq!(welcome["lastId"], missed, "{welcome}");
    assert_eq!(ann.ids_upto(missed).await, [missed]);
    eventually("node 2 subscribed", || numsub(&redis, room) == 1).await;
    let next = post(&servers[1], "lobby", "live again").await;
    assert_eq!(ann.ids_upto(next).await, [next]);

    drop(ann);
    for server in servers {
        server.stop().await;
    }
}

/// A joiner on a node whose link to Redis is slow, while another node publishes: every
/// publication after the one its welcome names arrives, once and in order, those made
/// in the moment between its join reading the channel and its node's subscription
/// taking effect (stretched here to 100 ms by the relay) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_just_subscribed_misses_nothing_published_around_its_subscription() {
    let Some(redis) = RedisServer::start(Persistence::None).await else {
        return;
    };
    let relay = Relay::start(redis.address()).await;
    let mut slow = node(&redis);
    slow.redis = vec![relay.url("redis")];
    let servers = [Server::start(slow).await, Server::start(node(&redis)).await];
    relay.set_delay(Duration::from_millis(50));
    let publisher = servers[1].address.to_string();
    for round in 0..6u64 {
        let room = format!("race-{round}");
        let burst = {
            let (publisher, room) = (publisher.clone(), room.clone());
            tokio::spawn(async move {
                let mut last = 0;
                // About 120 ms: it ends after the joiner read the channel (50 ms after
                // its start) and before its subscription takes effect (100 ms later).
                for n in 0..24 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let path = format!("/api/rooms/{room}/messages");
                    let body = json!({"text": format!("m{n}")});
                    let (status, answer) = http::post(&publisher, &path, &body).await;
                    assert_eq!(status, 201, "{answer}");
                    last = answer["message"]["id"].as_u64().unwrap();
                }
                last
            })
        };
        // Joins at a different point of the burst each round.
        tokio::time::sleep(Duration::from_millis(round * 8)).await;
        let url = servers[0].url(&format!("/room/{room}?name=ann"));
        let (mut ann, welcome) = Room::join(&url).await;
        let from = welcome["lastId"].as_u64().unwrap_or(0);
        let last = burst.await.unwrap();
        if from < last {
            // The recent backlog up to `from`, then everything after it: one run of ids.
            let ids = ann.ids_upto(last).await;
            let want: Vec<u64> = (ids[0]..=last).collect();
            assert!(
                ids[0] <= from + 1,
                "round {round}: joined after {from}: {ids:?}"
            );
            assert_eq!(ids, want, "round {round}: joined after {from}");
        }
    }
    for server in servers {
        server.stop().await;
    }
}

/// The same on a Redis Cluster: the room's messages go out with `SPUBLISH` on the shard
/// that owns its slot, to the one node with members there, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_owning_shard_sends_a_message_once_to_the_one_node_with_members() {
    let Some(cluster) = RedisCluster::start(3, 5000).await else {
        return;
    };
    let config = || -> Config {
        serde_json::from_value(json!({
            "redis_cluster": cluster.urls(),
            "presence_expiry_secs": 3,
            "rate_limit_per_sec": 100000.0,
            "rate_limit_burst": 100000,
            "handshakes_per_ip_per_sec": 100000.0,
            "handshake_burst_per_ip": 100000,
        }))
        .expect("a valid config")
    };
    let mut servers = Vec::new();
    for _ in 0..4 {
        servers.push(Server::start(config()).await);
    }
    let room = "switchboard:{lobby}:room";
    let owner = cluster.master_of(room).expect("a master for the room");
    let shard_subscribers = |port: u16| -> u64 {
        let answer = cluster.cli(port, &["PUBSUB", "SHARDNUMSUB", room]);
        answer
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let (mut ann, _) = Room::join(&servers[0].url("/room/lobby?name=ann")).await;
    eventually("node 0 subscribed to the room's shard channel", || {
        shard_subscribers(owner) == 1
    })
    .await;
    let text = "x".repeat(1000);
    // Bytes to clients: all that the shard sent but what it sent its replica.
    let to_clients = || {
        let stats = cluster.cli(owner, &["INFO", "stats"]);
        let replicated = stats
            .lines()
            .find_map(|line| line.strip_prefix("total_net_repl_output_bytes:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("total_net_repl_output_bytes");
        output_bytes_of(&stats) - replicated
    };
    let before = to_clients();
    let mut last = 0;
    for _ in 0..200 {
        last = post(&servers[3], "lobby", &text).await;
    }
    let sent = to_clients() - before;
    assert_eq!(ann.ids_upto(last).await.len(), 200);
    let payload = 200 * 1000;
    eprintln!(
        "the owning shard sent {sent} bytes to clients for {payload} bytes of messages ({:.2}x)",
        sent as f64 / payload as f64
    );
    assert!(sent >= payload, "{sent} bytes sent for {payload}");
    assert!(
        sent < payload * 3 / 2,
        "{sent} bytes sent for {payload}: more than once per message"
    );
    drop(ann);
    eventually("node 0 left the room's shard channel", || {
        shard_subscribers(owner) == 0
    })
    .await;
    for server in servers {
        server.stop().await;
    }
}

/// A channel that keeps no history, published to all the time from another node: a
/// joiner behind a slow link is not cut off for what was published while its node
/// subscribed (nothing could give it that; it joined as it happened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_on_a_channel_without_history_is_not_cut_off_for_the_moment_it_joined_in() {
    let Some(redis) = RedisServer::start(Persistence::None).await else {
        return;
    };
    let relay = Relay::start(redis.address()).await;
    let with_ticker = |url: String| -> Config {
        let mut config = node(&redis);
        config.redis = vec![url];
        config.namespaces =
            serde_json::from_value(json!({"ticker": {"history_size": 0}})).expect("a namespace");
        config
    };
    let servers = [
        Server::start(with_ticker(relay.url("redis"))).await,
        Server::start(with_ticker(redis.url())).await,
    ];
    relay.set_delay(Duration::from_millis(50));
    let publisher = servers[1].address.to_string();
    let publishing = tokio::spawn(async move {
        for n in 0..4000 {
            let body = json!({"text": format!("tick {n}")});
            let (status, answer) =
                http::post(&publisher, "/api/rooms/ticker:btc/messages", &body).await;
            assert_eq!(status, 201, "{answer}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for round in 0..4 {
        let url = servers[0].url("/room/ticker:btc?name=ann");
        let (mut ann, welcome) = Room::join(&url).await;
        // Live ticks arrive, and the connection stays (a cut would close it with 4009).
        let first = ann.next_of("message").await;
        assert!(first["id"].as_u64().unwrap() > welcome["lastId"].as_u64().unwrap());
        for _ in 0..5 {
            let event = ann.next_of("message").await;
            assert_eq!(event["type"], "message", "round {round}: {event}");
        }
        drop(ann);
        // Its node leaves the channel before the next round joins it again.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    publishing.abort();
    for server in servers {
        server.stop().await;
    }
}
