//! The engine without sockets: ordering, presence, typing, resume, de-duplication, slow
//! consumers, durable ids, and the channel rules (namespaces, epochs, recovery, limited
//! channels, policy refusals).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use switchboard_engine::{
    ChannelOptions, Clock, Draft, Engine, EngineConfig, EngineError, MemoryStore, NamespaceTable,
    Namespaces, Outbound, Outcome, Position, Publication, Receipt, Resume, SqliteStore, Store,
    StoreError, Subscription,
};
use switchboard_protocol::room;

fn memory_engine() -> Engine {
    Engine::local(Arc::new(MemoryStore::new()), EngineConfig::default())
}

/// An engine whose channels take `namespaces` (a `[namespaces]` table as JSON) and whose
/// time is `clock`.
fn engine_with(store: Arc<dyn Store>, namespaces: Value, clock: &TestClock) -> Engine {
    let table: NamespaceTable = serde_json::from_value(namespaces).unwrap();
    let namespaces = Namespaces::new(ChannelOptions::default(), &table).unwrap();
    let config = EngineConfig::default()
        .with_namespaces(namespaces)
        .with_clock(clock.clock());
    Engine::local(store, config)
}

/// A clock that moves only when told.
#[derive(Clone, Default)]
struct TestClock(Arc<AtomicU64>);

impl TestClock {
    fn clock(&self) -> Clock {
        let millis = self.0.clone();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Clock::new(move || start + Duration::from_millis(millis.load(Ordering::Relaxed)))
    }

    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }
}

/// An event as the room protocol would send it.
fn json(item: &Outbound) -> Value {
    let bytes = match item {
        Outbound::Publication { delivery: d, .. } | Outbound::Ack(d) => {
            room::message(&d.publication)
        }
        Outbound::Join(user) => room::presence(true, user),
        Outbound::Leave(user) => room::presence(false, user),
        Outbound::Typing { user, is_typing } => room::typing(user, *is_typing),
        Outbound::Refused { nonce } => room::unavailable(nonce.as_deref()),
        Outbound::Binary(_) => panic!("unexpected binary"),
    };
    serde_json::from_slice(&bytes).unwrap()
}

fn since(id: u64) -> Resume {
    Resume {
        since: Some(id),
        ..Resume::default()
    }
}

fn text(body: impl Into<String>, nonce: Option<&str>) -> Draft {
    Draft {
        text: Some(body.into()),
        nonce: nonce.map(Into::into),
        ..Draft::default()
    }
}

async fn say(member: &Subscription, body: impl Into<String>, nonce: Option<&str>) -> Receipt {
    member.publish(text(body, nonce)).await.unwrap()
}

/// The id of a publication once stored.
async fn stored(receipt: Receipt) -> u64 {
    match receipt.settled().await.unwrap() {
        Outcome::Stored(delivery) => delivery.publication.id,
        other => panic!("not stored: {other:?}"),
    }
}

/// The ids of every history page of a subscription.
async fn backlog_ids(member: &mut Subscription) -> Vec<u64> {
    let mut ids = Vec::new();
    loop {
        let page = member.next_backlog().await.unwrap();
        if page.is_empty() {
            return ids;
        }
        ids.extend(page.iter().map(|p| p.id));
    }
}

async fn next(member: &mut Subscription) -> Value {
    let item = tokio::time::timeout(Duration::from_secs(10), member.recv())
        .await
        .expect("an event in time")
        .expect("event");
    json(&item)
}

async fn post(engine: &Engine, channel: &str, body: &str) -> u64 {
    stored(
        engine
            .publish(channel, Some("bot"), text(body, None))
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn two_users_chat_and_see_each_other() {
    let engine = memory_engine();
    let mut alice = engine
        .subscribe("lobby", "Alice", Resume::default())
        .await
        .unwrap();
    let mut bob = engine
        .subscribe("lobby", "Bob", Resume::default())
        .await
        .unwrap();
    assert_eq!(bob.members(), ["Alice", "Bob"]);
    assert_eq!(
        next(&mut alice).await,
        json!({"type": "join", "user": "Bob"})
    );

    let posted = say(&alice, "Hi there!", Some("c-1")).await;
    stored(posted).await;
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
        json!({"type": "leave", "user": "Bob"})
    );
}

#[tokio::test]
async fn typing_reaches_only_other_users_and_presence_counts_users_once() {
    let engine = memory_engine();
    let mut alice_tab1 = engine
        .subscribe("r", "Alice", Resume::default())
        .await
        .unwrap();
    let mut alice_tab2 = engine
        .subscribe("r", "Alice", Resume::default())
        .await
        .unwrap();
    let mut bob = engine
        .subscribe("r", "Bob", Resume::default())
        .await
        .unwrap();
    assert_eq!(next(&mut alice_tab1).await["type"], "join");
    assert_eq!(next(&mut alice_tab2).await["type"], "join");
    assert_eq!(bob.members(), ["Alice", "Bob"]);

    alice_tab1.typing(true).unwrap();
    assert_eq!(
        next(&mut bob).await,
        json!({"type": "typing", "user": "Alice", "isTyping": true})
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
        json!({"type": "leave", "user": "Alice"})
    );
}

#[tokio::test]
async fn resume_while_others_send_has_no_gap_and_no_duplicate() {
    // A queue deep enough that a busy test machine never makes the reader "slow".
    let mut config = EngineConfig::default();
    config.outbound_queue = 8192;
    let engine = Engine::local(Arc::new(MemoryStore::new()), config);
    let sender = engine
        .subscribe("busy", "Sender", Resume::default())
        .await
        .unwrap();
    let (halfway, reached) = tokio::sync::oneshot::channel();
    let poster = tokio::spawn(async move {
        let mut halfway = Some(halfway);
        let mut last = None;
        for i in 1..=2000 {
            last = Some(say(&sender, format!("m{i}"), None).await);
            if i == 500 {
                // 500 messages are stored when the reader resumes; 1500 more follow.
                stored(last.take().unwrap()).await;
                halfway.take().unwrap().send(()).unwrap();
            } else if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        stored(last.unwrap()).await;
        sender
    });
    reached.await.unwrap();
    let since_id = 10;
    let mut reader = engine
        .subscribe("busy", "Reader", since(since_id))
        .await
        .unwrap();
    assert_eq!(reader.recovered(), Some(true));
    let mut ids = backlog_ids(&mut reader).await;
    assert!(ids.len() >= 490, "the backlog holds the stored messages");
    // Read while the sender keeps sending.
    while ids.last().copied().unwrap_or(since_id) < 2000 {
        let event = next(&mut reader).await;
        if event["type"] == "message" {
            ids.push(event["id"].as_u64().unwrap());
        }
    }
    let _sender = poster.await.unwrap();
    assert_eq!(ids, (since_id + 1..=2000).collect::<Vec<_>>());
    assert!(reader.ended().is_none());
}

#[tokio::test]
async fn a_retried_nonce_is_stored_once() {
    let engine = memory_engine();
    let mut alice = engine
        .subscribe("r", "Alice", Resume::default())
        .await
        .unwrap();
    let first = say(&alice, "once", Some("n-1")).await;
    stored(first).await;
    assert_eq!(next(&mut alice).await["id"], 1);
    // The retry is not stored again; the stored message comes back as the acknowledgement.
    let retry = say(&alice, "once", Some("n-1")).await;
    assert!(matches!(
        retry.settled().await.unwrap(),
        Outcome::Duplicate(1)
    ));
    let again = next(&mut alice).await;
    assert_eq!(
        (again["id"].as_u64(), again["nonce"].as_str()),
        (Some(1), Some("n-1"))
    );
    // Another user may use the same nonce.
    let bob = engine
        .subscribe("r", "Bob", Resume::default())
        .await
        .unwrap();
    let posted = say(&bob, "mine", Some("n-1")).await;
    assert_eq!(stored(posted).await, 2);
    assert_eq!(engine.history("r", 0, 100).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_slow_consumer_is_dropped_and_others_keep_receiving() {
    let mut config = EngineConfig::default();
    config.outbound_queue = 4;
    let engine = Engine::local(Arc::new(MemoryStore::new()), config);
    let slow = engine
        .subscribe("r", "Slow", Resume::default())
        .await
        .unwrap();
    let mut fast = engine
        .subscribe("r", "Fast", Resume::default())
        .await
        .unwrap();
    for i in 0..10 {
        stored(say(&fast, format!("m{i}"), None).await).await;
        // Fast keeps up; Slow never reads.
        while fast.try_recv().is_some() {}
    }
    assert_eq!(slow.ended(), Some(switchboard_engine::Ended::Slow));
    stored(say(&fast, "after", None).await).await;
    assert_eq!(next(&mut fast).await["text"], "after");
    assert!(fast.ended().is_none());
}

#[tokio::test]
async fn history_and_ids_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::local(
            Arc::new(SqliteStore::open_dir(dir.path()).unwrap()),
            EngineConfig::default(),
        );
        for i in 0..3 {
            engine
                .publish("lobby", Some("bot"), text(format!("m{i}"), None))
                .await
                .unwrap();
        }
        engine.shutdown();
    }
    let engine = Engine::local(
        Arc::new(SqliteStore::open_dir(dir.path()).unwrap()),
        EngineConfig::default(),
    );
    let mut member = engine
        .subscribe("lobby", "Alice", Resume::default())
        .await
        .unwrap();
    assert_eq!(backlog_ids(&mut member).await, [1, 2, 3]);
    let posted = say(&member, "after restart", None).await;
    assert_eq!(stored(posted).await, 4);
    let ids: Vec<u64> = engine
        .history("lobby", 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    engine.shutdown();
}

#[tokio::test]
async fn a_long_resume_comes_in_pages_without_a_gap() {
    let mut config = EngineConfig::default();
    config.replay_page = 3;
    let engine = Engine::local(Arc::new(MemoryStore::new()), config);
    for i in 0..10 {
        post(&engine, "paged", &format!("m{i}")).await;
    }
    let mut reader = engine.subscribe("paged", "Reader", since(0)).await.unwrap();
    assert_eq!(backlog_ids(&mut reader).await, (1..=10).collect::<Vec<_>>());
    post(&engine, "paged", "live").await;
    assert_eq!(next(&mut reader).await["id"], 11);
    // A client that claims ids the channel does not have gets what is new, not a skip.
    let mut ahead = engine
        .subscribe("paged", "Ahead", since(500))
        .await
        .unwrap();
    assert_eq!(ahead.recovered(), Some(false));
    assert!(backlog_ids(&mut ahead).await.is_empty());
    post(&engine, "paged", "newer").await;
    assert_eq!(next(&mut ahead).await["text"], "newer");
}

/// A store whose writes fail until told otherwise.
#[derive(Debug, Default)]
struct Flaky {
    inner: MemoryStore,
    failing: std::sync::atomic::AtomicBool,
}

impl Store for Flaky {
    fn position(&self, channel: &str) -> Result<Position, StoreError> {
        self.inner.position(channel)
    }
    fn append(&self, batch: &[&Publication]) -> Result<(), StoreError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(StoreError::DataDir {
                path: "flaky".into(),
                source: std::io::Error::other("disk unplugged"),
            });
        }
        self.inner.append(batch)
    }
    fn read(
        &self,
        channel: &str,
        window: &switchboard_engine::store::Window,
    ) -> Result<Vec<Publication>, StoreError> {
        self.inner.read(channel, window)
    }
    fn find_nonce(
        &self,
        channel: &str,
        from: Option<&str>,
        nonce: &str,
        not_before: &str,
    ) -> Result<Option<Publication>, StoreError> {
        self.inner.find_nonce(channel, from, nonce, not_before)
    }
    fn trim(
        &self,
        channel: &str,
        trim: &switchboard_engine::store::Trim,
    ) -> Result<(), StoreError> {
        self.inner.trim(channel, trim)
    }
}

#[tokio::test]
async fn a_failing_store_delays_messages_but_loses_none_and_skips_no_id() {
    let store = Arc::new(Flaky::default());
    store.failing.store(true, Ordering::Relaxed);
    let engine = Engine::local(store.clone(), EngineConfig::default());
    let mut alice = engine
        .subscribe("r", "Alice", Resume::default())
        .await
        .unwrap();
    let first = say(&alice, "first", Some("n-1")).await;
    // A retry while the store is down is recognised and not stored twice.
    let retry = say(&alice, "first", Some("n-1")).await;
    assert!(matches!(
        retry.settled().await.unwrap(),
        Outcome::Duplicate(1)
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        alice.try_recv().is_none(),
        "nothing is sent before it is stored"
    );
    store.failing.store(false, Ordering::Relaxed);
    stored(first).await;
    assert_eq!(next(&mut alice).await["id"], 1);
    let second = say(&alice, "second", None).await;
    assert_eq!(stored(second).await, 2);
    let ids: Vec<u64> = engine
        .history("r", 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [1, 2]);
}

// The channel rules.

#[tokio::test]
async fn data_publications_carry_json_an_event_name_and_no_sender_from_the_server() {
    let engine = memory_engine();
    let mut reader = engine
        .subscribe("prices:btc", "reader", Resume::default())
        .await
        .unwrap();
    let data = serde_json::value::to_raw_value(&json!({"price": 101.5})).unwrap();
    let draft = Draft {
        data: Some(data),
        event: Some("tick".into()),
        ..Draft::default()
    };
    stored(engine.publish("prices:btc", None, draft).await.unwrap()).await;
    let m = next(&mut reader).await;
    assert_eq!(m["data"], json!({"price": 101.5}));
    assert_eq!(m["event"], "tick");
    assert!(m.get("from").is_none() && m.get("text").is_none(), "{m}");
    // A client's data publication names its sender.
    let both = Draft {
        text: Some("and words".into()),
        data: Some(serde_json::value::to_raw_value(&json!([1, 2])).unwrap()),
        ..Draft::default()
    };
    stored(reader.publish(both).await.unwrap()).await;
    let m = next(&mut reader).await;
    assert_eq!(
        (m["from"].as_str(), m["text"].as_str()),
        (Some("reader"), Some("and words"))
    );
    assert_eq!(m["data"], json!([1, 2]));
}

#[tokio::test]
async fn presence_join_leave_typing_and_client_publish_follow_the_namespace() {
    let clock = TestClock::default();
    let engine = engine_with(
        Arc::new(MemoryStore::new()),
        json!({
            "prices": {"presence": false, "client_publish": false, "typing": false},
            "quiet": {"join_leave": false},
        }),
        &clock,
    );
    // No presence: nobody is listed, no join or leave, and the channel is not active.
    let mut a = engine
        .subscribe("prices:btc", "a", Resume::default())
        .await
        .unwrap();
    let b = engine
        .subscribe("prices:btc", "b", Resume::default())
        .await
        .unwrap();
    assert!(b.members().is_empty());
    assert!(engine.presence("prices:btc").await.unwrap().is_empty());
    assert!(engine.channels().await.unwrap().is_empty());
    // Clients may not publish, type or relay; the server may publish.
    for refused in [
        a.publish(text("no", None)).await.map(drop),
        a.typing(true),
        a.relay_binary(bytes::Bytes::from_static(b"x")),
    ] {
        assert!(
            matches!(refused, Err(EngineError::Forbidden(_))),
            "{refused:?}"
        );
    }
    drop(b);
    post(&engine, "prices:btc", "tick").await;
    assert_eq!(
        next(&mut a).await["text"],
        "tick",
        "no join or leave came first"
    );

    // Presence without join and leave events.
    let mut c = engine
        .subscribe("quiet:room", "c", Resume::default())
        .await
        .unwrap();
    let d = engine
        .subscribe("quiet:room", "d", Resume::default())
        .await
        .unwrap();
    assert_eq!(d.members(), ["c", "d"]);
    assert_eq!(engine.presence("quiet:room").await.unwrap(), ["c", "d"]);
    d.typing(true).unwrap();
    drop(d);
    assert_eq!(next(&mut c).await["type"], "typing");
    assert_eq!(next(&mut c).await["isTyping"], false);
    post(&engine, "quiet:room", "still here").await;
    assert_eq!(
        next(&mut c).await["text"],
        "still here",
        "no leave was sent"
    );
}

#[tokio::test]
async fn recover_latest_gives_a_joiner_only_the_latest_and_a_resume_what_is_kept() {
    let clock = TestClock::default();
    let engine = engine_with(
        Arc::new(MemoryStore::new()),
        json!({"prices": {"recover": "latest"}}),
        &clock,
    );
    for i in 1..=5 {
        post(&engine, "prices:eth", &format!("p{i}")).await;
    }
    let mut joiner = engine
        .subscribe("prices:eth", "j", Resume::default())
        .await
        .unwrap();
    assert_eq!(joiner.recovered(), None);
    assert_eq!(backlog_ids(&mut joiner).await, [5]);
    let mut resumer = engine.subscribe("prices:eth", "r", since(2)).await.unwrap();
    assert_eq!(resumer.recovered(), Some(true));
    assert_eq!(backlog_ids(&mut resumer).await, [3, 4, 5]);
}

#[tokio::test]
async fn history_size_keeps_the_newest_and_a_resume_from_before_them_is_not_recovered() {
    let clock = TestClock::default();
    let dir = tempfile::tempdir().unwrap();
    let stores: [Arc<dyn Store>; 2] = [
        Arc::new(MemoryStore::new()),
        Arc::new(SqliteStore::open_dir(dir.path()).unwrap()),
    ];
    for store in stores {
        let engine = engine_with(
            store,
            json!({"chat": {"history_size": 3}, "none": {"history_size": 0}}),
            &clock,
        );
        for i in 1..=10 {
            post(&engine, "chat:a", &format!("m{i}")).await;
            post(&engine, "none:a", &format!("m{i}")).await;
        }
        let mut late = engine.subscribe("chat:a", "late", since(2)).await.unwrap();
        assert_eq!(late.recovered(), Some(false), "4 to 7 are gone");
        assert_eq!(backlog_ids(&mut late).await, [8, 9, 10]);
        let mut close = engine.subscribe("chat:a", "close", since(7)).await.unwrap();
        assert_eq!(close.recovered(), Some(true));
        assert_eq!(backlog_ids(&mut close).await, [8, 9, 10]);
        let mut fresh = engine
            .subscribe("chat:a", "fresh", Resume::default())
            .await
            .unwrap();
        assert_eq!(backlog_ids(&mut fresh).await, [8, 9, 10]);
        let ids: Vec<u64> = engine
            .history("chat:a", 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, [8, 9, 10]);
        // None kept: ids still go on, nothing is replayed.
        let mut none = engine.subscribe("none:a", "n", since(9)).await.unwrap();
        assert_eq!(none.recovered(), Some(false));
        assert!(backlog_ids(&mut none).await.is_empty());
        assert_eq!(none.last_id(), 10);
        assert!(engine.history("none:a", 0, 100).await.unwrap().is_empty());
        engine.shutdown();
    }
}

#[tokio::test]
async fn publications_older_than_the_ttl_are_neither_replayed_nor_kept() {
    let clock = TestClock::default();
    let store = Arc::new(MemoryStore::new());
    let engine = engine_with(
        store.clone(),
        json!({"news": {"history_ttl_secs": 60}}),
        &clock,
    );
    post(&engine, "news:x", "old 1").await;
    post(&engine, "news:x", "old 2").await;
    clock.advance(Duration::from_secs(45));
    post(&engine, "news:x", "new 3").await;
    clock.advance(Duration::from_secs(30));
    // 1 and 2 are 75 s old, 3 is 30 s old.
    let mut fresh = engine
        .subscribe("news:x", "f", Resume::default())
        .await
        .unwrap();
    assert_eq!(backlog_ids(&mut fresh).await, [3]);
    let mut resumer = engine.subscribe("news:x", "r", since(0)).await.unwrap();
    assert_eq!(resumer.recovered(), Some(false));
    assert_eq!(backlog_ids(&mut resumer).await, [3]);
    let ids: Vec<u64> = engine
        .history("news:x", 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(ids, [3]);
    // Trimmed from the store with the next publication, not only filtered.
    post(&engine, "news:x", "new 4").await;
    let window = switchboard_engine::store::Window {
        after: 0,
        upto: 10,
        limit: 10,
        newest: false,
        not_before: None,
    };
    let kept: Vec<u64> = store
        .read("news:x", &window)
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(kept, [3, 4]);
}

#[tokio::test]
async fn a_nonce_is_remembered_for_its_ttl_even_when_its_publication_is_not_kept() {
    let clock = TestClock::default();
    let table: NamespaceTable =
        serde_json::from_value(json!({"ticks": {"history_size": 0}})).unwrap();
    let mut config = EngineConfig::default()
        .with_namespaces(Namespaces::new(ChannelOptions::default(), &table).unwrap())
        .with_clock(clock.clock());
    config.nonce_ttl = Duration::from_secs(600);
    let engine = Engine::local(Arc::new(MemoryStore::new()), config);
    let publish = |nonce: &'static str| {
        let engine = engine.clone();
        async move {
            engine
                .publish("ticks:a", None, text("t", Some(nonce)))
                .await
                .unwrap()
                .settled()
                .await
                .unwrap()
        }
    };
    assert!(matches!(publish("n-1").await, Outcome::Stored(_)));
    assert!(matches!(publish("n-1").await, Outcome::Duplicate(1)));
    assert_eq!(
        engine
            .find_nonce("ticks:a", None, "n-1")
            .await
            .unwrap()
            .map(|p| p.id),
        Some(1)
    );
    clock.advance(Duration::from_secs(601));
    assert!(matches!(publish("n-1").await, Outcome::Stored(d) if d.publication.id == 2));
}

#[tokio::test]
async fn a_memory_store_restarted_is_a_new_epoch_and_sqlite_keeps_its_own() {
    // Memory: the restarted engine's stream is another one.
    let first = memory_engine();
    post(&first, "lobby", "m1").await;
    let reader = first
        .subscribe("lobby", "r", Resume::default())
        .await
        .unwrap();
    let (old_epoch, old_id) = (reader.epoch().to_owned(), reader.last_id());
    first.shutdown();
    let restarted = memory_engine();
    for i in 0..3 {
        post(&restarted, "lobby", &format!("after {i}")).await;
    }
    let resume = Resume {
        since: Some(old_id),
        epoch: Some(old_epoch.clone()),
        ..Resume::default()
    };
    let mut back = restarted.subscribe("lobby", "r", resume).await.unwrap();
    assert_ne!(back.epoch(), old_epoch);
    assert_eq!(back.recovered(), Some(false));
    assert_eq!(
        backlog_ids(&mut back).await,
        [1, 2, 3],
        "the newest of the new stream"
    );

    // SQLite: the same epoch after a restart, and exactly what was missed.
    let dir = tempfile::tempdir().unwrap();
    let sqlite = || {
        Engine::local(
            Arc::new(SqliteStore::open_dir(dir.path()).unwrap()),
            EngineConfig::default(),
        )
    };
    let engine = sqlite();
    for i in 1..=5 {
        post(&engine, "lobby", &format!("m{i}")).await;
    }
    let epoch = engine
        .subscribe("lobby", "r", Resume::default())
        .await
        .unwrap()
        .epoch()
        .to_owned();
    for i in 6..=8 {
        post(&engine, "lobby", &format!("m{i}")).await;
    }
    engine.shutdown();
    let engine = sqlite();
    let resume = Resume {
        since: Some(5),
        epoch: Some(epoch.clone()),
        ..Resume::default()
    };
    let mut back = engine.subscribe("lobby", "r", resume).await.unwrap();
    assert_eq!(
        (back.epoch(), back.recovered()),
        (epoch.as_str(), Some(true))
    );
    assert_eq!(backlog_ids(&mut back).await, [6, 7, 8]);
    engine.shutdown();
}

#[tokio::test]
async fn a_limited_channel_admits_only_its_users_and_the_server_publishes_to_it() {
    let engine = memory_engine();
    let mut alice = engine
        .subscribe("dm:#alice,bob", "alice", Resume::default())
        .await
        .unwrap();
    let _bob = engine
        .subscribe("dm:#alice,bob", "bob", Resume::default())
        .await
        .unwrap();
    let refused = engine
        .subscribe("dm:#alice,bob", "mallory", Resume::default())
        .await;
    assert!(matches!(refused, Err(EngineError::Forbidden(_))));
    assert!(matches!(
        engine
            .subscribe("notify:#alice", "bob", Resume::default())
            .await,
        Err(EngineError::Forbidden(_))
    ));
    stored(
        engine
            .publish("dm:#alice,bob", None, text("from the app", None))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(next(&mut alice).await["type"], "join");
    assert_eq!(next(&mut alice).await["text"], "from the app");
}

#[tokio::test]
async fn history_trimmed_during_a_paged_replay_ends_it_instead_of_skipping() {
    let store = Arc::new(MemoryStore::new());
    let mut config = EngineConfig::default();
    config.replay_page = 2;
    let engine = Engine::local(store.clone(), config);
    for i in 1..=6 {
        post(&engine, "paged", &format!("m{i}")).await;
    }
    let mut reader = engine.subscribe("paged", "r", since(0)).await.unwrap();
    assert_eq!(reader.recovered(), Some(true));
    let first: Vec<u64> = reader
        .next_backlog()
        .await
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(first, [1, 2]);
    // 3 and 4 go while the first page is being sent.
    let trim = switchboard_engine::store::Trim {
        upto: 4,
        older_than: None,
        nonces_from: String::new(),
    };
    store.trim("paged", &trim).unwrap();
    assert!(matches!(
        reader.next_backlog().await,
        Err(EngineError::HistoryChanged)
    ));
}

#[tokio::test]
async fn one_inbox_carries_many_channels_in_order_and_says_when_it_is_woken_or_too_slow() {
    let engine = memory_engine();
    let mut inbox = switchboard_engine::Inbox::new(64);
    let a = engine
        .subscribe_in(&inbox, "a", "ann", Resume::default())
        .await
        .unwrap();
    let b = engine
        .subscribe_in(&inbox, "b", "ann", Resume::default())
        .await
        .unwrap();
    for (channel, text) in [("a", "a1"), ("b", "b1"), ("a", "a2")] {
        let draft = Draft {
            text: Some(text.into()),
            ..Draft::default()
        };
        stored(engine.publish(channel, None, draft).await.unwrap()).await;
    }
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let (key, item) = inbox.recv().await.expect("an event");
        assert!(key == a.key() || key == b.key());
        let subscription = if key == a.key() { &a } else { &b };
        assert!(subscription.wants(&item));
        seen.push((
            subscription.channel().to_owned(),
            json(&item)["text"].clone(),
        ));
    }
    assert_eq!(
        seen,
        [("a", "a1"), ("b", "b1"), ("a", "a2")].map(|(c, t)| (c.to_owned(), json!(t)))
    );
    // A door's own wake-up: `None`, once.
    inbox.waker().wake();
    assert!(inbox.recv().await.is_none());
    assert!(inbox.try_recv().is_none());
    // An inbox that fills up cuts its members off, and says so.
    let mut small = switchboard_engine::Inbox::new(2);
    let slow = engine
        .subscribe_in(&small, "a", "sam", Resume::default())
        .await
        .unwrap();
    for i in 0..4 {
        let draft = Draft {
            text: Some(format!("x{i}")),
            ..Draft::default()
        };
        stored(engine.publish("a", None, draft).await.unwrap()).await;
    }
    assert_eq!(slow.ended(), Some(switchboard_engine::Ended::Slow));
    assert!(small.recv().await.is_none(), "the cut is news at once");
    let mut events = 0;
    while let Some(event) = small.try_recv() {
        assert_eq!(event.0, slow.key());
        events += 1;
    }
    assert_eq!(
        events, 2,
        "what was queued before the cut is still there to read"
    );
    drop((a, b));
}
