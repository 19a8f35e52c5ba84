//! Webhooks of a cluster: two `switchboard serve --redis` nodes, each sending webhooks.
//! Every arrival is told once, by one node; a node killed with SIGKILL is reaped by the
//! other, which tells exactly one `member_removed` per user the dead node held and one
//! `channel_vacated` per channel it emptied, within the presence expiry plus the delay.
//!
//! Needs `redis-server` (Debian's package). Without it the test says so and passes
//! locally; with `CI=true` it fails (`switchboard_test_support::redis`).

mod support;

use std::time::Duration;

use switchboard_test_support::pusher::Pusher;
use switchboard_test_support::redis::{Persistence, RedisServer};
use switchboard_test_support::room::Room;
use switchboard_test_support::webhook::Receiver;

const KEY: &str = "cluster-key";
const SECRET: &str = "cluster-secret";
const EXPIRY_SECS: u64 = 3;
const DELAY_MS: u64 = 500;

fn event(name: &str, channel: &str, user: Option<&str>) -> (String, String, Option<String>) {
    (name.to_owned(), channel.to_owned(), user.map(str::to_owned))
}

async fn join_presence(node: &str, channel: &str, user: &str) -> Pusher {
    Pusher::join_presence(
        &format!("ws://{node}/app/{KEY}?protocol=7"),
        KEY,
        SECRET,
        channel,
        user,
    )
    .await
}

#[tokio::test]
async fn a_killed_nodes_members_are_removed_once_by_the_node_that_reaps_it() {
    let Some(redis) = RedisServer::start(Persistence::None).await else {
        return;
    };
    let receiver = Receiver::start(0).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "presence_expiry_secs = {EXPIRY_SECS}\n\n[[apps]]\nid = \"9\"\nkey = \"{KEY}\"\nsecret = \"{SECRET}\"\nwebhook_leave_delay_ms = {DELAY_MS}\nwebhooks = [{{ url = \"{}\" }}]\n",
            receiver.url
        ),
    )
    .unwrap();
    let url = redis.url();
    let args = [
        "--memory",
        "--redis",
        &url,
        "--config",
        config.to_str().unwrap(),
    ];
    let (mut doomed, a) = support::serve_with("127.0.0.1:0", &args).await;
    let (_survivor, b) = support::serve_with("127.0.0.1:0", &args).await;

    // Ann and Bob on the doomed node, Carol on the other one, in one presence channel;
    // Rita alone in a room on the doomed node.
    let _ann = join_presence(&a, "presence-team", "ann").await;
    let _carol = join_presence(&b, "presence-team", "carol").await;
    let _bob = join_presence(&a, "presence-team", "bob").await;
    let (_rita, _) = Room::join(&format!("ws://{a}/room/lobby?name=rita")).await;
    let arrived = receiver
        .wait_for(Duration::from_secs(15), |e| e.len() >= 6)
        .await;
    let mut sorted = arrived.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            event("channel_occupied", "lobby", None),
            event("channel_occupied", "presence-team", None),
            event("member_added", "lobby", Some("rita")),
            event("member_added", "presence-team", Some("ann")),
            event("member_added", "presence-team", Some("bob")),
            event("member_added", "presence-team", Some("carol")),
        ],
        "each arrival once, though both nodes send"
    );

    let killed = tokio::time::Instant::now();
    doomed.start_kill().unwrap();
    doomed.wait().await.unwrap();
    // The expiry and the delay, with room for a heartbeat and a busy machine.
    let limit =
        Duration::from_secs(EXPIRY_SECS) + Duration::from_millis(DELAY_MS) + Duration::from_secs(5);
    let all = receiver.wait_for(limit, |e| e.len() >= 10).await;
    let took = killed.elapsed();
    let mut leaves = all[6..].to_vec();
    leaves.sort();
    assert_eq!(
        leaves,
        [
            event("channel_vacated", "lobby", None),
            event("member_removed", "lobby", Some("rita")),
            event("member_removed", "presence-team", Some("ann")),
            event("member_removed", "presence-team", Some("bob")),
        ],
        "the dead node's users and its emptied channel, once each ({took:?} after the kill)"
    );
    // Nothing more comes (no second sender, no vacancy of Carol's channel).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.events().len(), 10, "{:?}", receiver.events());
    eprintln!("webhooks of the killed node's leaves arrived {took:?} after SIGKILL (expiry {EXPIRY_SECS} s, delay {DELAY_MS} ms)");
}
