//! Webhooks: Pusher's format and signature, every door's channels, the leave delay, a
//! receiver that fails at first, and event filters. (A killed node of a cluster is in
//! crates/cli/tests/webhooks.rs; the pusher libraries' own webhook check in
//! scripts/sdk/.)

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_protocol::pusher::sign;
use switchboard_server::Config;
use switchboard_test_support::pusher::Pusher;
use switchboard_test_support::room::Room;
use switchboard_test_support::webhook::Receiver;

mod support;
use support::Server;

const KEY: &str = "hook-key";
const SECRET: &str = "hook-secret";

fn config(hooks: Value, delay_ms: u64) -> Config {
    serde_json::from_value(json!({
        "apps": [{"id": "3", "key": KEY, "secret": SECRET, "webhooks": hooks, "webhook_leave_delay_ms": delay_ms}],
    }))
    .unwrap()
}

fn event(name: &str, channel: &str, user: Option<&str>) -> (String, String, Option<String>) {
    (name.to_owned(), channel.to_owned(), user.map(str::to_owned))
}

async fn join_presence(server: &Server, channel: &str, user: &str) -> Pusher {
    Pusher::join_presence(
        &server.url(&format!("/app/{KEY}?protocol=7")),
        KEY,
        SECRET,
        channel,
        user,
    )
    .await
}

const PATIENCE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn arrivals_and_leaves_are_signed_pusher_webhooks_after_the_delay() {
    let receiver = Receiver::start(0).await;
    let server = Server::start(config(json!([{"url": receiver.url}]), 300)).await;
    let mut ann = join_presence(&server, "presence-a", "ann").await;
    let events = receiver.wait_for(PATIENCE, |e| e.len() >= 2).await;
    assert_eq!(
        events,
        [
            event("channel_occupied", "presence-a", None),
            event("member_added", "presence-a", Some("ann"))
        ]
    );
    // Pusher's format: time_ms, events; the key and the body's signature.
    let request = &receiver.received()[0];
    assert_eq!(request.headers["content-type"], "application/json");
    assert_eq!(request.headers["x-pusher-key"], KEY);
    assert_eq!(
        request.headers["x-pusher-signature"],
        sign(SECRET, request.body.as_bytes())
    );
    assert!(request.json()["time_ms"].as_u64().unwrap() > 1_700_000_000_000);

    // A client event names its event, data, socket and user.
    let mut bob = join_presence(&server, "presence-a", "bob").await;
    bob.send(&json!({"event": "client-hi", "channel": "presence-a", "data": {"x": 1}}))
        .await;
    ann.next_of("client-hi").await;
    let events = receiver.wait_for(PATIENCE, |e| e.len() >= 4).await;
    assert_eq!(
        events[2..],
        [
            event("member_added", "presence-a", Some("bob")),
            event("client_event", "presence-a", Some("bob"))
        ]
    );
    let client_event = receiver
        .received()
        .iter()
        .flat_map(|r| r.json()["events"].as_array().cloned().unwrap_or_default())
        .find(|e| e["name"] == "client_event")
        .unwrap();
    assert_eq!(
        (
            client_event["event"].as_str(),
            client_event["data"].as_str(),
            client_event["socket_id"].as_str()
        ),
        (
            Some("client-hi"),
            Some(r#"{"x":1}"#),
            Some(bob.socket_id.as_str())
        )
    );

    // Ann reloads within the delay: nothing is told. Then Bob and Ann go for good.
    ann.socket.close(None).await.unwrap();
    // Gone from presence (her removal waits out the delay) before she is back.
    let users = || {
        switchboard_test_support::pusher::signed_path(
            "GET",
            "/apps/3/channels/presence-a/users",
            &[],
            None,
            KEY,
            SECRET,
            None,
        )
    };
    for _ in 0..200 {
        let (_, listed) =
            switchboard_test_support::http::get(&server.address.to_string(), &users()).await;
        if listed["users"].as_array().is_some_and(|u| u.len() == 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ann_again = join_presence(&server, "presence-a", "ann").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        receiver.events().len(),
        4,
        "a reload within the delay is not told: {:?}",
        receiver.events()
    );
    bob.socket.close(None).await.unwrap();
    drop(_ann_again);
    let events = receiver.wait_for(PATIENCE, |e| e.len() >= 7).await;
    let mut leaves = events[4..].to_vec();
    leaves[..2].sort();
    assert_eq!(
        leaves,
        [
            event("member_removed", "presence-a", Some("ann")),
            event("member_removed", "presence-a", Some("bob")),
            event("channel_vacated", "presence-a", None),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn every_door_is_told_and_a_failing_receiver_gets_each_event_once() {
    // The first three requests fail: the batch is sent again until it is taken.
    let receiver = Receiver::start(3).await;
    let only_rooms = Receiver::start(0).await;
    let hooks = json!([
        {"url": receiver.url},
        {"url": only_rooms.url, "event_types": ["channel_occupied"]},
    ]);
    let server = Server::start(config(hooks, 0)).await;
    let (room, _) = Room::join(&server.url("/room/lobby?name=rita")).await;
    let mut events = receiver
        .wait_for(Duration::from_secs(20), |e| e.len() >= 2)
        .await;
    // One batch, or two sent side by side: each event once either way.
    events.sort();
    assert_eq!(
        events,
        [
            event("channel_occupied", "lobby", None),
            event("member_added", "lobby", Some("rita"))
        ]
    );
    let failed = receiver
        .received()
        .iter()
        .filter(|r| r.status == 500)
        .count();
    assert_eq!(failed, 3, "three failures, then success");
    assert_eq!(
        only_rooms.wait_for(PATIENCE, |e| !e.is_empty()).await,
        [event("channel_occupied", "lobby", None)]
    );
    drop(room);
    let events = receiver.wait_for(PATIENCE, |e| e.len() >= 4).await;
    assert_eq!(
        events[2..],
        [
            event("member_removed", "lobby", Some("rita")),
            event("channel_vacated", "lobby", None)
        ]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        only_rooms.events().len(),
        1,
        "the filter keeps the other events out"
    );
    assert_eq!(receiver.events().len(), 4, "each event once");
    server.stop().await;
}
