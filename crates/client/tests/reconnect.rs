//! The client against a real server: restarts, cut connections, backoff, dead peers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_client::{connect, connect_raw, Backoff, Error, Event, Events, Options, State};
use switchboard_server::{run, Config};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// A server on a fixed address that can be stopped and started again.
struct Server {
    address: SocketAddr,
    config: Config,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Server {
    async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = Self {
            address: listener.local_addr().unwrap(),
            config,
            running: None,
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let config = self.config.clone();
        let task = tokio::spawn(async move {
            run(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        self.running = Some((stop, task));
    }

    /// Shuts down (every connection closed with 1001) and waits until it is gone.
    async fn stop(&mut self) {
        let (stop, task) = self.running.take().expect("running");
        stop.send(()).unwrap();
        timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
    }

    async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.address).await.unwrap();
        self.serve(listener);
    }
}

/// A TCP relay in front of the server whose connections can all be cut at once,
/// abruptly (a reset, no close frame), as a network failure would.
#[derive(Clone)]
struct Relay {
    address: SocketAddr,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Self {
            address: listener.local_addr().unwrap(),
            links: Arc::default(),
        };
        let links = relay.links.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let link = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    // Linger 0: dropping the link resets both connections. (Deprecated
                    // because a nonzero linger blocks on drop; zero does not.)
                    #[allow(deprecated)]
                    {
                        client.set_linger(Some(Duration::ZERO)).unwrap();
                        server.set_linger(Some(Duration::ZERO)).unwrap();
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                links.lock().unwrap().push(link);
            }
        });
        relay
    }

    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.address)
    }
}

fn data_config(dir: &tempfile::TempDir) -> Config {
    // A rate limit above what this test sends: pacing under the default one is tested
    // on its own below.
    Config::default()
        .with_data_dir(Some(dir.path().to_owned()))
        .with_rate_limit(5000.0, 1000)
}

/// Fails with the first place `got` departs from `expected`, not 1,000 lines of both.
fn assert_once_in_order(got: &[String], expected: &[String], what: &str) {
    if let Some(at) = (0..got.len().max(expected.len())).find(|&i| got.get(i) != expected.get(i)) {
        panic!(
            "{what} {} messages, not each once in order: at {at} got {:?}, expected {:?}",
            got.len(),
            &got[at.saturating_sub(2)..(at + 3).min(got.len())],
            expected.get(at),
        );
    }
}

async fn next_event(events: &mut Events) -> Event {
    timeout(Duration::from_secs(30), events.recv())
        .await
        .expect("an event within 30 s")
        .expect("the client is open")
}

fn quick_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_millis(500))
}

/// Every message of a room, read with a fresh client from the start of its history.
async fn history(url: &str) -> Vec<(u64, String, String)> {
    let options = Options::default().with_name("auditor").with_since(Some(0));
    let (client, mut events) = connect(url, options).await.unwrap();
    let mut last_id = None;
    let mut messages = Vec::new();
    loop {
        match next_event(&mut events).await {
            Event::Welcome { welcome, .. } => last_id = Some(welcome.last_id),
            Event::Message(m) => {
                let done = Some(m.id) == last_id;
                messages.push((m.id, m.from.unwrap_or_default(), m.text.unwrap_or_default()));
                if done {
                    break;
                }
            }
            _ => {}
        }
        if last_id == Some(0) {
            break;
        }
    }
    client.close().await;
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_through_two_restarts_and_two_cuts_land_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(data_config(&dir)).await;
    let relay = Relay::start(server.address).await;
    let url = relay.url("/room/exactly-once");
    let options = |name: &str| {
        Options::default()
            .with_name(name)
            .with_backoff(quick_backoff())
    };

    // Connections made so far, per client: each disruption waits for both to be up, so
    // that it hits live connections.
    let bob_up = Arc::new(AtomicUsize::new(0));
    let alice_up = Arc::new(AtomicUsize::new(0));
    let (_bob, mut bob_events) = connect(&url, options("bob")).await.unwrap();
    let up = bob_up.clone();
    let receiver = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut reconnections = 0;
        while seen.len() < 1000 {
            match next_event(&mut bob_events).await {
                Event::Message(m) => {
                    seen.push((m.id, m.from.unwrap_or_default(), m.text.unwrap_or_default()))
                }
                Event::State(State::Reconnecting { .. }) => reconnections += 1,
                Event::State(State::Connected) => {
                    up.fetch_add(1, Ordering::SeqCst);
                }
                Event::State(State::Closed { reason, .. }) => panic!("bob closed: {reason}"),
                _ => {}
            }
        }
        (seen, reconnections)
    });

    let (alice, mut alice_events) = connect(&url, options("alice")).await.unwrap();
    let up = alice_up.clone();
    let alice_watch = tokio::spawn(async move {
        let mut reconnections = 0;
        let mut acknowledged = Vec::new();
        while let Some(event) = alice_events.recv().await {
            match event {
                Event::Message(m) => acknowledged.push(m.text.unwrap_or_default()),
                Event::State(State::Reconnecting { .. }) => reconnections += 1,
                Event::State(State::Connected) => {
                    up.fetch_add(1, Ordering::SeqCst);
                }
                Event::Error(error) => panic!("alice was refused: {error:?}"),
                _ => {}
            }
        }
        (acknowledged, reconnections)
    });

    let mut disruptions = 0;
    for i in 0..1000 {
        alice.send_message(format!("m-{i:04}")).unwrap();
        if matches!(i, 200 | 400 | 600 | 800) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while bob_up.load(Ordering::SeqCst) < disruptions + 1
                || alice_up.load(Ordering::SeqCst) < disruptions + 1
            {
                assert!(Instant::now() < deadline, "the clients did not reconnect");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            disruptions += 1;
            match i {
                200 | 600 => server.restart().await,
                _ => relay.cut(),
            }
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while alice.queued() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} never acknowledged",
            alice.queued()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let expected: Vec<String> = (0..1000).map(|i| format!("m-{i:04}")).collect();
    let (seen, bob_reconnections) = timeout(Duration::from_secs(60), receiver)
        .await
        .unwrap()
        .unwrap();
    let texts: Vec<String> = seen.iter().map(|(_, _, text)| text.clone()).collect();
    assert_once_in_order(&texts, &expected, "bob saw");
    assert!(seen.iter().all(|(_, from, _)| from == "alice"));
    assert!(
        seen.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "ids without gaps"
    );

    let stored = history(&url).await;
    let texts: Vec<String> = stored.iter().map(|(_, _, text)| text.clone()).collect();
    assert_once_in_order(&texts, &expected, "the room stored");

    alice.close().await;
    let (acknowledged, alice_reconnections) = timeout(Duration::from_secs(10), alice_watch)
        .await
        .unwrap()
        .unwrap();
    // The sender sees its own messages once each too, though some were acknowledged
    // twice (sent again after a cut that lost the first acknowledgement).
    assert_once_in_order(&acknowledged, &expected, "alice saw");
    // Each restart and each cut dropped both clients, and both came back every time.
    assert!(
        bob_reconnections >= 4,
        "bob reconnected {bob_reconnections} times"
    );
    assert!(
        alice_reconnections >= 4,
        "alice reconnected {alice_reconnections} times"
    );
    // And each came back after all four.
    assert_eq!(bob_up.load(Ordering::SeqCst), 5);
    assert_eq!(alice_up.load(Ordering::SeqCst), 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnection_delays_grow_with_jitter_up_to_the_cap() {
    let mut server = Server::start(Config::default()).await;
    let url = format!("ws://{}/room/backoff", server.address);
    let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(160));
    let options = Options::default()
        .with_name("carol")
        .with_backoff(backoff.clone());
    let (_carol, mut events) = connect(&url, options).await.unwrap();
    let stopped = Instant::now();
    server.stop().await;

    // Attempts against a server that is down: (attempt, delay).
    let mut attempts: Vec<(u32, Duration)> = Vec::new();
    while attempts.len() < 12 {
        if let Event::State(State::Reconnecting { attempt, delay, .. }) =
            next_event(&mut events).await
        {
            attempts.push((attempt, delay));
        }
    }
    let elapsed = stopped.elapsed();
    let numbers: Vec<u32> = attempts.iter().map(|a| a.0).collect();
    assert_eq!(numbers, (1..=12).collect::<Vec<u32>>());
    for (attempt, delay) in &attempts {
        assert!(
            *delay <= backoff.ceiling(*attempt),
            "attempt {attempt}: {delay:?}"
        );
        assert!(*delay <= Duration::from_millis(160), "capped: {delay:?}");
    }
    // The ceiling doubles until the cap: 20, 40, 80, 160, 160, …
    let ceilings: Vec<u128> = numbers
        .iter()
        .map(|&a| backoff.ceiling(a).as_millis())
        .collect();
    assert_eq!(&ceilings[..5], &[20, 40, 80, 160, 160]);
    // Jitter: the capped attempts do not all wait the same time.
    let capped: Vec<Duration> = attempts[4..].iter().map(|a| a.1).collect();
    assert!(
        capped.iter().any(|d| *d != capped[0]),
        "no jitter: {capped:?}"
    );
    // And each announced delay was waited before the next attempt: the twelfth
    // announcement came after the eleven delays before it (a lower bound that a busy
    // machine can only make later).
    let waited: Duration = attempts[..11].iter().map(|a| a.1).sum();
    assert!(elapsed >= waited, "{elapsed:?} < {waited:?}");

    // When the server is back, the client is too.
    let listener = TcpListener::bind(server.address).await.unwrap();
    server.serve(listener);
    loop {
        if let Event::Welcome { welcome, .. } = next_event(&mut events).await {
            assert_eq!(welcome.user, "carol");
            break;
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_is_detected_by_ping() {
    // A server that completes the handshake, then never reads nor answers again while
    // keeping the TCP connection open: only a ping can tell it is gone.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let config = switchboard_net::Config::default().with_ping_interval(None);
            if let Ok(socket) = switchboard_net::accept(stream, config).await {
                let _ = held_tx.send(socket);
            }
        }
    });
    let options = Options::default()
        .with_heartbeat(Duration::from_millis(300), Duration::from_millis(500))
        .with_backoff(Backoff::new(Duration::from_secs(5), Duration::from_secs(5)));
    let started = Instant::now();
    let (_client, mut events) = connect_raw(&format!("ws://{address}/"), options)
        .await
        .unwrap();
    let _socket = held.recv().await.unwrap();
    let reason = loop {
        if let Event::State(State::Reconnecting { reason, .. }) = next_event(&mut events).await {
            break reason;
        }
    };
    assert!(reason.contains("ping"), "{reason}");
    let noticed = started.elapsed();
    // Detected after the ping interval plus the pong timeout, long before TCP would.
    assert!(noticed >= Duration::from_millis(800), "{noticed:?}");
    assert!(noticed < Duration::from_secs(20), "{noticed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_paced_under_the_announced_rate_limit() {
    // The default limit: 20 a second, bursts of 40. Sixty messages at once would be
    // refused past the burst without pacing.
    let mut server = Server::start(Config::default()).await;
    let url = format!("ws://{}/room/paced", server.address);
    let (dave, mut events) = connect(&url, Options::default().with_name("dave"))
        .await
        .unwrap();
    let nonces: Vec<String> = (0..60)
        .map(|i| dave.send_message(format!("p-{i}")).unwrap())
        .collect();
    let mut acknowledged = Vec::new();
    while acknowledged.len() < nonces.len() {
        match next_event(&mut events).await {
            Event::Message(m) => acknowledged.push(m.nonce.unwrap()),
            Event::Error(error) => panic!("refused: {error:?}"),
            _ => {}
        }
    }
    assert_eq!(
        acknowledged, nonces,
        "every message once, in the order sent"
    );
    server.stop().await;
}

#[tokio::test]
async fn refusals_that_retrying_cannot_fix_are_errors_at_once() {
    let mut server = Server::start(Config::default()).await;
    let bad_room = format!("ws://{}/room/not%20valid", server.address);
    let refused = connect(&bad_room, Options::default().with_name("erin")).await;
    match refused {
        Err(Error::Net(error)) => assert!(error.to_string().contains("400"), "{error}"),
        other => panic!("expected a 400 refusal, got {other:?}"),
    }
    let echo = format!("ws://{}/echo", server.address);
    let not_a_room = connect(&echo, Options::default().with_name("erin")).await;
    assert!(matches!(not_a_room, Err(Error::Room(_))), "{not_a_room:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_bounded_when_the_server_never_acknowledges() {
    // A room that welcomes, then never answers anything again.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let config = switchboard_net::Config::default().with_ping_interval(None);
        let (mut socket, _) = switchboard_net::accept(stream, config).await.unwrap();
        let welcome =
            r#"{"type":"welcome","room":"mute","user":"frank","members":["frank"],"lastId":0}"#;
        socket.send_text(welcome).await.unwrap();
        std::future::pending::<()>().await;
        drop(socket);
    });
    let options = Options::default()
        .with_name("frank")
        .with_connect_timeout(Duration::from_millis(500));
    let url = format!("ws://{address}/room/mute");
    let (frank, mut events) = connect(&url, options).await.unwrap();
    frank.send_message("never acknowledged").unwrap();
    assert_eq!(frank.queued(), 1);
    let started = Instant::now();
    // Not reading events meanwhile must not hold the close up either.
    timeout(Duration::from_secs(15), frank.close())
        .await
        .expect("close() returned");
    let waited = started.elapsed();
    // It waited for the acknowledgement (up to the connect timeout), then for the
    // server's Close (which never came), and gave up on both.
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    let mut last = None;
    while let Some(event) = events.recv().await {
        last = Some(event);
    }
    assert!(
        matches!(
            last,
            Some(Event::State(State::Closed { failed: false, .. }))
        ),
        "{last:?}"
    );
    assert_eq!(frank.queued(), 0);
    assert!(matches!(frank.send_message("late"), Err(Error::Closed)));
}

#[tokio::test]
async fn a_room_whose_history_was_reset_is_said_so_and_its_new_messages_are_not_taken_as_seen() {
    // History in memory: a restart starts the room's ids again, in a new epoch.
    let mut server = Server::start(Config::default().with_rate_limit(5000.0, 1000)).await;
    let url = format!("ws://{}/room/reset", server.address);
    let options = |name: &str| {
        Options::default()
            .with_name(name)
            .with_backoff(quick_backoff())
    };
    let (bot, _bot_events) = connect(&url, options("bot").with_reconnect(false))
        .await
        .unwrap();
    let (_reader, mut events) = connect(&url, options("reader")).await.unwrap();
    for i in 1..=5 {
        bot.send_message(format!("before {i}")).unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        if let Event::Message(m) = next_event(&mut events).await {
            seen.push(m.id);
        }
    }
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    server.restart().await;
    let (bot, _bot_events) = connect(&url, options("bot2")).await.unwrap();
    bot.send_message("after 1").unwrap();
    bot.send_message("after 2").unwrap();
    // The reader comes back, resuming after 5 in the old epoch: the room says that was
    // not recovered, and its new messages 1 and 2 arrive although 5 was seen before.
    let mut resumed = None;
    let mut after = Vec::new();
    while after.len() < 2 {
        match next_event(&mut events).await {
            Event::Welcome {
                resumed: Some(r), ..
            } => resumed = Some(r),
            Event::Message(m) => after.push((m.id, m.text.unwrap_or_default())),
            _ => {}
        }
    }
    let resumed = resumed.expect("a welcome that resumed");
    assert_eq!((resumed.after, resumed.complete), (5, false));
    assert_eq!(
        after,
        [(1, "after 1".to_owned()), (2, "after 2".to_owned())]
    );
    server.stop().await;
}
