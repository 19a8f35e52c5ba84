//! The hub without sockets: ordering, presence, typing, resume, de-duplication, slow
//! consumers and durable ids.

use std::sync::Arc;

use switchboard_hub::{Hub, HubConfig, Membership, MemoryStore, Outbound, SqliteStore};

fn memory_hub() -> Hub {
    Hub::new(Arc::new(MemoryStore::new()), HubConfig::default())
}

fn json(item: &Outbound) -> serde_json::Value {
    match item {
        Outbound::Text(bytes) | Outbound::Message(_, bytes) => {
            serde_json::from_slice(bytes).unwrap()
        }
        Outbound::Binary(_) => panic!("unexpected binary"),
    }
}

/// The ids of every history page of a membership.
async fn backlog_ids(member: &mut Membership) -> Vec<u64> {
    let mut ids = Vec::new();
    loop {
        let page = member.next_backlog().await.unwrap();
        if page.is_empty() {
            return ids;
        }
        for event in page {
            ids.push(
                serde_json::from_slice::<serde_json::Value>(&event).unwrap()["id"]
                    .as_u64()
                    .unwrap(),
            );
        }
    }
}

async fn next(member: &mut Membership) -> serde_json::Value {
    json(&member.recv().await.expect("event"))
}

#[tokio::test]
async fn two_users_chat_and_see_each_other() {
    let hub = memory_hub();
    let mut alice = hub.join("lobby", "Alice", None).await.unwrap();
    let mut bob = hub.join("lobby", "Bob", None).await.unwrap();
    let welcome: serde_json::Value = serde_json::from_slice(&bob.welcome).unwrap();
    assert_eq!(welcome["members"], serde_json::json!(["Alice", "Bob"]));
    assert_eq!(
        next(&mut alice).await,
        serde_json::json!({"type": "join", "user": "Bob"})
    );

    let posted = alice
        .post("Hi there!".into(), Some("c-1".into()))
        .await
        .unwrap()
        .unwrap();
    posted.stored.await.unwrap().unwrap();
    for member in [&mut alice, &mut bob] {
        let m = next(member).await;
        assert_eq!(
            (m["type"].as_str(), m["id"].as_u64(), m["from"].as_str()),
            (Some("message"), Some(1), Some("Alice"))
        );
        assert_eq!(m["nonce"], "c-1");
    }
    drop(bob);
    assert_eq!(
        next(&mut alice).await,
        serde_json::json!({"type": "leave", "user": "Bob"})
    );
}

#[tokio::test]
async fn typing_reaches_only_other_users_and_presence_counts_users_once() {
    let hub = memory_hub();
    let mut alice_tab1 = hub.join("r", "Alice", None).await.unwrap();
    let mut alice_tab2 = hub.join("r", "Alice", None).await.unwrap();
    let mut bob = hub.join("r", "Bob", None).await.unwrap();
    assert_eq!(next(&mut alice_tab1).await["type"], "join");
    assert_eq!(next(&mut alice_tab2).await["type"], "join");
    let welcome: serde_json::Value = serde_json::from_slice(&bob.welcome).unwrap();
    assert_eq!(welcome["members"], serde_json::json!(["Alice", "Bob"]));

    alice_tab1.typing(true);
    assert_eq!(
        next(&mut bob).await,
        serde_json::json!({"type": "typing", "user": "Alice", "isTyping": true})
    );
    assert!(alice_tab1.try_recv().is_none());
    assert!(alice_tab2.try_recv().is_none());

    // Closing one of Alice's tabs is not a leave (the tab was typing: that stops);
    // closing the second is.
    drop(alice_tab1);
    assert_eq!(next(&mut bob).await["isTyping"], false);
    assert!(bob.try_recv().is_none());
    drop(alice_tab2);
    assert_eq!(
        next(&mut bob).await,
        serde_json::json!({"type": "leave", "user": "Alice"})
    );
}

#[tokio::test]
async fn resume_while_others_send_has_no_gap_and_no_duplicate() {
    // A queue deep enough that a busy test machine never makes the reader "slow".
    let mut config = HubConfig::default();
    config.outbound_queue = 8192;
    let hub = Hub::new(Arc::new(MemoryStore::new()), config);
    let sender = hub.join("busy", "Sender", None).await.unwrap();
    let (halfway, reached) = tokio::sync::oneshot::channel();
    let poster = tokio::spawn(async move {
        let mut halfway = Some(halfway);
        let mut last = None;
        for i in 1..=2000 {
            last = sender.post(format!("m{i}"), None).await.unwrap();
            if i == 500 {
                // 500 messages are stored when the reader resumes; 1500 more follow.
                last.take().unwrap().stored.await.unwrap().unwrap();
                halfway.take().unwrap().send(()).unwrap();
            } else if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        last.unwrap().stored.await.unwrap().unwrap();
        sender
    });
    reached.await.unwrap();
    let since = 10;
    let mut reader = hub.join("busy", "Reader", Some(since)).await.unwrap();
    let mut ids = backlog_ids(&mut reader).await;
    assert!(ids.len() >= 490, "the backlog holds the stored messages");
    // Read while the sender keeps sending.
    while ids.last().copied().unwrap_or(since) < 2000 {
        let event = next(&mut reader).await;
        if event["type"] == "message" {
            ids.push(event["id"].as_u64().unwrap());
        }
    }
    let _sender = poster.await.unwrap();
    assert_eq!(ids, (since + 1..=2000).collect::<Vec<_>>());
    assert!(!reader.was_slow());
}

#[tokio::test]
async fn a_retried_nonce_is_stored_once() {
    let hub = memory_hub();
    let mut alice = hub.join("r", "Alice", None).await.unwrap();
    let first = alice
        .post("once".into(), Some("n-1".into()))
        .await
        .unwrap()
        .unwrap();
    first.stored.await.unwrap().unwrap();
    assert_eq!(next(&mut alice).await["id"], 1);
    // The retry is not stored again; the stored message comes back as the acknowledgement.
    assert!(alice
        .post("once".into(), Some("n-1".into()))
        .await
        .unwrap()
        .is_none());
    let again = next(&mut alice).await;
    assert_eq!(
        (again["id"].as_u64(), again["nonce"].as_str()),
        (Some(1), Some("n-1"))
    );
    // Another user may use the same nonce.
    let bob = hub.join("r", "Bob", None).await.unwrap();
    let posted = bob
        .post("mine".into(), Some("n-1".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(posted.id, 2);
    posted.stored.await.unwrap().unwrap();
    assert_eq!(hub.history("r", 0, 100).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_slow_consumer_is_dropped_and_others_keep_receiving() {
    let mut config = HubConfig::default();
    config.outbound_queue = 4;
    let hub = Hub::new(Arc::new(MemoryStore::new()), config);
    let slow = hub.join("r", "Slow", None).await.unwrap();
    let mut fast = hub.join("r", "Fast", None).await.unwrap();
    for i in 0..10 {
        let posted = fast.post(format!("m{i}"), None).await.unwrap().unwrap();
        posted.stored.await.unwrap().unwrap();
        // Fast keeps up; Slow never reads.
        while fast.try_recv().is_some() {}
    }
    assert!(slow.was_slow());
    let posted = fast.post("after".into(), None).await.unwrap().unwrap();
    posted.stored.await.unwrap().unwrap();
    assert_eq!(next(&mut fast).await["text"], "after");
    assert!(!fast.was_slow());
}

#[tokio::test]
async fn history_and_ids_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let hub = Hub::new(
            Arc::new(SqliteStore::open_dir(dir.path()).unwrap()),
            HubConfig::default(),
        );
        for i in 0..3 {
            hub.post("lobby", "bot", format!("m{i}"), None)
                .await
                .unwrap();
        }
        hub.shutdown();
    }
    let hub = Hub::new(
        Arc::new(SqliteStore::open_dir(dir.path()).unwrap()),
        HubConfig::default(),
    );
    let mut member = hub.join("lobby", "Alice", None).await.unwrap();
    assert_eq!(backlog_ids(&mut member).await, [1, 2, 3]);
    let posted = member
        .post("after restart".into(), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(posted.id, 4);
    posted.stored.await.unwrap().unwrap();
    let ids: Vec<u64> = hub
        .history("lobby", 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    hub.shutdown();
}

#[tokio::test]
async fn a_long_resume_comes_in_pages_without_a_gap() {
    let mut config = HubConfig::default();
    config.replay_page = 3;
    let hub = Hub::new(Arc::new(MemoryStore::new()), config);
    let mut last = None;
    for i in 0..10 {
        last = hub
            .post("paged", "bot", format!("m{i}"), None)
            .await
            .unwrap();
    }
    last.unwrap().stored.await.unwrap().unwrap();
    let mut reader = hub.join("paged", "Reader", Some(0)).await.unwrap();
    assert_eq!(backlog_ids(&mut reader).await, (1..=10).collect::<Vec<_>>());
    hub.post("paged", "bot", "live".into(), None).await.unwrap();
    assert_eq!(next(&mut reader).await["id"], 11);
    // A client that claims ids the room does not have gets what is new, not a skip.
    let mut ahead = hub.join("paged", "Ahead", Some(500)).await.unwrap();
    assert!(backlog_ids(&mut ahead).await.is_empty());
    hub.post("paged", "bot", "newer".into(), None)
        .await
        .unwrap();
    assert_eq!(next(&mut ahead).await["text"], "newer");
}

/// A store whose writes fail until told otherwise.
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    failing: std::sync::atomic::AtomicBool,
}

impl switchboard_hub::HistoryStore for Flaky {
    fn append(
        &self,
        batch: &[switchboard_hub::StoredMessage],
    ) -> Result<(), switchboard_hub::StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(switchboard_hub::StoreError::DataDir {
                path: "flaky".into(),
                source: std::io::Error::other("disk unplugged"),
            });
        }
        self.inner.append(batch)
    }
    fn range(
        &self,
        room: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<switchboard_hub::StoredMessage>, switchboard_hub::StoreError> {
        self.inner.range(room, after, upto, limit)
    }
    fn recent(
        &self,
        room: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<switchboard_hub::StoredMessage>, switchboard_hub::StoreError> {
        self.inner.recent(room, upto, limit)
    }
    fn last_id(&self, room: &str) -> Result<u64, switchboard_hub::StoreError> {
        self.inner.last_id(room)
    }
    fn find_nonce(
        &self,
        room: &str,
        user: &str,
        nonce: &str,
    ) -> Result<Option<switchboard_hub::StoredMessage>, switchboard_hub::StoreError> {
        self.inner.find_nonce(room, user, nonce)
    }
}

#[tokio::test]
async fn a_failing_store_delays_messages_but_loses_none_and_skips_no_id() {
    let store = Arc::new(Flaky::default());
    store
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let hub = Hub::new(store.clone(), HubConfig::default());
    let mut alice = hub.join("r", "Alice", None).await.unwrap();
    let first = alice
        .post("first".into(), Some("n-1".into()))
        .await
        .unwrap()
        .unwrap();
    // A retry while the store is down is recognised and not stored twice.
    assert!(alice
        .post("first".into(), Some("n-1".into()))
        .await
        .unwrap()
        .is_none());
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        alice.try_recv().is_none(),
        "nothing is sent before it is stored"
    );
    store
        .failing
        .store(false, std::sync::atomic::Ordering::Relaxed);
    first.stored.await.unwrap().unwrap();
    assert_eq!(next(&mut alice).await["id"], 1);
    let second = alice.post("second".into(), None).await.unwrap().unwrap();
    assert_eq!(second.id, 2);
    second.stored.await.unwrap().unwrap();
    let ids: Vec<u64> = hub
        .history("r", 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [1, 2]);
}
