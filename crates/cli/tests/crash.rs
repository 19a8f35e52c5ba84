//! `switchboard serve` on SQLite, killed with SIGKILL while 100 clients send, then
//! started again on the same data directory and port.
//!
//! What must hold: every message acknowledged before the kill is in the stored history
//! exactly once; every message sent at all (the ones still unacknowledged at the kill
//! are sent again by the client library, with their nonces) is stored exactly once; the
//! history's ids run 1, 2, 3, … in every room; and every client, across the restart,
//! received exactly the stored messages from its first one to the last, in order.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use switchboard_client::{connect, Backoff, Event, Events, Options, RoomClient, State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

const CLIENTS: usize = 100;
const ROOMS: usize = 4;
/// Load before the kill, and after the restart before the clients stop sending.
const BEFORE_KILL: Duration = Duration::from_secs(3);
const AFTER_RESTART: Duration = Duration::from_secs(2);
/// How long the server stays dead.
const DOWN_FOR: Duration = Duration::from_millis(300);
/// The bound on every wait (reconnection, acknowledgement, delivery): a failure, never
/// a pause the test relies on.
const PATIENCE: Duration = Duration::from_secs(40);

fn room_of(client: usize) -> String {
    format!("crash-{}", client % ROOMS)
}

fn name_of(client: usize) -> String {
    format!("u{client:03}")
}

/// Between one client's messages: 20 to 50 ms, varying from message to message.
fn pause(client: usize, seq: usize) -> Duration {
    Duration::from_millis(20 + ((client * 7 + seq * 13) % 31) as u64)
}

/// A message a client handed to the library.
#[derive(Debug)]
struct Sent {
    text: String,
    nonce: String,
    at: Instant,
}

#[derive(Debug)]
struct Received {
    id: u64,
    from: String,
    text: String,
    nonce: Option<String>,
    at: Instant,
}

/// What one client's event stream delivered.
#[derive(Debug, Default)]
struct Log {
    received: Vec<Received>,
    /// When each welcome came, and the room's last id it announced.
    welcomes: Vec<(Instant, u64)>,
    /// When each connection came up.
    connected: Vec<Instant>,
    reconnections: usize,
    errors: Vec<String>,
}

impl Log {
    fn last_id(&self) -> Option<u64> {
        self.received.last().map(|r| r.id)
    }
}

struct Client {
    index: usize,
    room: String,
    name: String,
    handle: RoomClient,
    log: Arc<Mutex<Log>>,
    reader: JoinHandle<()>,
    sender: Option<JoinHandle<Vec<Sent>>>,
    sent: Vec<Sent>,
}

fn read_events(mut events: Events, log: Arc<Mutex<Log>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let at = Instant::now();
            let mut log = log.lock().unwrap();
            match event {
                Event::Message(m) => log.received.push(Received {
                    id: m.id,
                    from: m.from.unwrap_or_default(),
                    text: m.text.unwrap_or_default(),
                    nonce: m.nonce,
                    at,
                }),
                Event::Welcome { welcome: w, .. } => log.welcomes.push((at, w.last_id)),
                Event::State(State::Connected) => log.connected.push(at),
                Event::State(State::Reconnecting { .. }) => log.reconnections += 1,
                Event::Error(e) => log.errors.push(format!("{e:?}")),
                _ => {}
            }
        }
    })
}

/// Sends `NAME-SEQ` every 20-50 ms until `stop`; returns what it sent.
fn send_steadily(
    handle: RoomClient,
    index: usize,
    name: String,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<Sent>> {
    tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut seq = 0;
        while !stop.load(Ordering::Relaxed) {
            let text = format!("{name}-{seq:05}");
            let nonce = handle
                .send_message(text.clone())
                .unwrap_or_else(|e| panic!("{name}: sending {text}: {e}"));
            sent.push(Sent {
                text,
                nonce,
                at: Instant::now(),
            });
            sleep(pause(index, seq)).await;
            seq += 1;
        }
        sent
    })
}

/// A port free now (the restarted server must come back on the same one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 GET; the body of a 200.
async fn http_get(address: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an HTTP answer within 10 s")
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_owned()
}

#[derive(Debug, Clone)]
struct Stored {
    id: u64,
    from: String,
    text: String,
    nonce: Option<String>,
    timestamp: SystemTime,
}

/// A room's whole stored history, read page by page over the HTTP API.
async fn history(address: &str, room: &str) -> Vec<Stored> {
    let mut messages = Vec::new();
    let mut since = 0;
    loop {
        let body = http_get(
            address,
            &format!("/api/rooms/{room}/messages?since={since}&limit=1000"),
        )
        .await;
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        let page = page["messages"].as_array().unwrap();
        if page.is_empty() {
            return messages;
        }
        for m in page {
            let timestamp = chrono::DateTime::parse_from_rfc3339(m["timestamp"].as_str().unwrap())
                .unwrap()
                .into();
            messages.push(Stored {
                id: m["id"].as_u64().unwrap(),
                from: m["from"].as_str().unwrap().to_owned(),
                text: m["text"].as_str().unwrap().to_owned(),
                nonce: m["nonce"].as_str().map(str::to_owned),
                timestamp,
            });
        }
        since = messages.last().unwrap().id;
    }
}

/// Waits, within [`PATIENCE`], until `done` holds; fails saying `what` otherwise.
async fn wait_until(what: &str, mut done: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let Some(missing) = done() else { return };
        assert!(Instant::now() < deadline, "{what}: {missing}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_a_sigkill_under_load() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("crash.toml");
    // Above what the clients send (about 30 a second each, and a burst of resends after
    // the restart), so no message is refused and paced for the limit's sake.
    std::fs::write(
        &config,
        "rate_limit_per_sec = 2000.0\nrate_limit_burst = 2000\n",
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let (mut server, address) = support::serve_with(&listen, &args).await;

    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    let mut clients = Vec::with_capacity(CLIENTS);
    for index in 0..CLIENTS {
        let (room, name) = (room_of(index), name_of(index));
        let options = Options::default()
            .with_name(&name)
            .with_backoff(backoff.clone())
            // Compressing every message for 100 connections in a debug build would use
            // up the machine; this test is about durability, not deflate.
            .with_compression(false);
        let (handle, events) = connect(&format!("ws://{address}/room/{room}"), options)
            .await
            .unwrap_or_else(|e| panic!("{name} could not join {room}: {e}"));
        let log = Arc::new(Mutex::new(Log::default()));
        let reader = read_events(events, log.clone());
        clients.push(Client {
            index,
            room,
            name,
            handle,
            log,
            reader,
            sender: None,
            sent: Vec::new(),
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    for client in &mut clients {
        client.sender = Some(send_steadily(
            client.handle.clone(),
            client.index,
            client.name.clone(),
            stop.clone(),
        ));
    }

    // Under load, the server dies without a chance to flush or say goodbye.
    sleep(BEFORE_KILL).await;
    // A few messages from each client right before the kill, so that some are certainly
    // unacknowledged when it comes (queued in the library, on the wire, or stored with
    // their acknowledgement not yet out).
    for client in &mut clients {
        for k in 0..3 {
            let text = format!("{}-last-{k}", client.name);
            let nonce = client.handle.send_message(text.clone()).unwrap();
            client.sent.push(Sent {
                text,
                nonce,
                at: Instant::now(),
            });
        }
    }
    let killed_at = Instant::now();
    server.start_kill().unwrap(); // SIGKILL on Unix
    let status = timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("the killed server gone within 10 s")
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "not killed by SIGKILL: {status:?}"
    );
    // Whatever the first server stored has a timestamp before this.
    let dead_at = SystemTime::now();
    sleep(DOWN_FOR).await;
    // The listening socket went with the process; the restart binds the same port.
    wait_until("the port is free again", || {
        std::net::TcpListener::bind(&listen)
            .err()
            .map(|e| e.to_string())
    })
    .await;
    let (mut server, again) = support::serve_with(&listen, &args).await;
    let restarted_at = Instant::now();
    assert_eq!(again, address, "the restarted server listens elsewhere");
    wait_until("every client reconnected", || {
        let behind: Vec<&str> = clients
            .iter()
            .filter(|c| {
                !c.log
                    .lock()
                    .unwrap()
                    .connected
                    .iter()
                    .any(|&t| t > killed_at)
            })
            .map(|c| c.name.as_str())
            .collect();
        (!behind.is_empty()).then(|| format!("not yet: {behind:?}"))
    })
    .await;
    let all_back_at = Instant::now();
    let mut back_after: Vec<Duration> = clients
        .iter()
        .map(|c| {
            let log = c.log.lock().unwrap();
            let back = log.connected.iter().find(|&&t| t > killed_at).unwrap();
            back.saturating_duration_since(restarted_at)
        })
        .collect();
    back_after.sort();

    sleep(AFTER_RESTART).await;
    stop.store(true, Ordering::Relaxed);
    for client in &mut clients {
        let steady = client.sender.take().unwrap().await.unwrap();
        client.sent.extend(steady);
    }
    wait_until("every message acknowledged", || {
        let queued: usize = clients.iter().map(|c| c.handle.queued()).sum();
        (queued > 0).then(|| format!("{queued} still queued"))
    })
    .await;

    let mut rooms: BTreeMap<String, Vec<Stored>> = BTreeMap::new();
    for room in (0..ROOMS).map(room_of) {
        let stored = history(&address, &room).await;
        rooms.insert(room, stored);
    }
    let final_id: HashMap<&str, u64> = rooms
        .iter()
        .map(|(room, stored)| (room.as_str(), stored.last().map_or(0, |m| m.id)))
        .collect();
    wait_until("every client received its room's last message", || {
        let behind: Vec<String> = clients
            .iter()
            .filter_map(|c| {
                let last = c.log.lock().unwrap().last_id();
                let end = final_id[c.room.as_str()];
                (last != Some(end)).then(|| format!("{} at {last:?} of {end}", c.name))
            })
            .collect();
        (!behind.is_empty()).then(|| format!("{behind:?}"))
    })
    .await;
    for client in &clients {
        client.handle.close().await;
    }
    for client in &mut clients {
        timeout(Duration::from_secs(10), &mut client.reader)
            .await
            .expect("the event stream ends after close")
            .unwrap();
    }

    // The history: ids 1, 2, 3, … in each room; each text stored once in all.
    let mut where_stored: HashMap<&str, (&str, &Stored)> = HashMap::new();
    for (room, stored) in &rooms {
        let ids: Vec<u64> = stored.iter().map(|m| m.id).collect();
        if let Some(at) = (0..ids.len()).find(|&i| ids[i] != i as u64 + 1) {
            panic!(
                "{room}: stored ids are not 1, 2, 3, …: {:?} at position {at}",
                &ids[at.saturating_sub(2)..(at + 3).min(ids.len())]
            );
        }
        for m in stored {
            if let Some((other, first)) = where_stored.insert(&m.text, (room, m)) {
                panic!(
                    "{:?} is stored twice: {room} #{} and {other} #{}",
                    m.text, m.id, first.id
                );
            }
        }
    }

    let mut acked_before_kill = 0;
    let mut sent_before_kill = 0;
    let mut pending_at_kill = 0;
    let mut pending_stored_before_kill = 0;
    let mut reconnections = 0;
    let mut total_sent = 0;
    let mut last_seen_before_kill: BTreeMap<&str, u64> = BTreeMap::new();
    for client in &clients {
        let log = client.log.lock().unwrap();
        let name = client.name.as_str();
        assert!(
            log.errors.is_empty(),
            "{name} was refused: {:?}",
            log.errors
        );
        reconnections += log.reconnections;
        total_sent += client.sent.len();

        // Every message it sent is stored once, in its room, as it sent it.
        for sent in &client.sent {
            let Some((room, stored)) = where_stored.get(sent.text.as_str()) else {
                panic!("{name}: {:?} was sent but is not stored", sent.text);
            };
            assert_eq!(*room, client.room, "{:?} stored in another room", sent.text);
            assert_eq!(
                stored.from, name,
                "{:?} stored from another sender",
                sent.text
            );
            assert_eq!(stored.nonce.as_deref(), Some(sent.nonce.as_str()));
        }
        let stored_from_it = rooms[&client.room]
            .iter()
            .filter(|m| m.from == name)
            .count();
        assert_eq!(
            stored_from_it,
            client.sent.len(),
            "{name}: stored messages it never sent"
        );

        // Its acknowledgements: its own messages delivered back, each once, with the
        // id they are stored under. The ones before the kill must have survived it.
        let mut acked: HashMap<&str, (u64, Instant)> = HashMap::new();
        for r in log.received.iter().filter(|r| r.from == name) {
            let stored = where_stored[r.text.as_str()].1;
            assert_eq!(
                stored.id, r.id,
                "{name}: {:?} acknowledged as another id",
                r.text
            );
            assert_eq!(
                r.nonce, stored.nonce,
                "{name}: {:?} with another nonce",
                r.text
            );
            assert!(
                acked.insert(&r.text, (r.id, r.at)).is_none(),
                "{name}: {:?} acknowledged twice",
                r.text
            );
        }
        assert_eq!(
            acked.len(),
            client.sent.len(),
            "{name}: not all acknowledged"
        );
        for sent in client.sent.iter().filter(|s| s.at < killed_at) {
            sent_before_kill += 1;
            let (id, at) = acked[sent.text.as_str()];
            if at < killed_at {
                acked_before_kill += 1;
            } else {
                // Unacknowledged at the kill: sent again after the restart with its
                // nonce, and stored once all the same — by the first server (whose
                // acknowledgement was lost) or by the second.
                pending_at_kill += 1;
                if where_stored[sent.text.as_str()].1.timestamp < dead_at {
                    pending_stored_before_kill += 1;
                }
                assert!(id > 0);
            }
        }

        // What it received is exactly the stored history, from the first message it
        // received to the end of its room: no gap, no duplicate, across the restart.
        let stored = &rooms[&client.room];
        let first = log
            .received
            .first()
            .expect("a client that received nothing");
        let expected = &stored[first.id as usize - 1..];
        let got: Vec<(u64, &str)> = log
            .received
            .iter()
            .map(|r| (r.id, r.text.as_str()))
            .collect();
        let want: Vec<(u64, &str)> = expected.iter().map(|m| (m.id, m.text.as_str())).collect();
        if let Some(at) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
            panic!(
                "{name} received {} messages, not the stored {}..={}: at {at} got {:?}, stored {:?}",
                got.len(),
                first.id,
                final_id[client.room.as_str()],
                got.get(at),
                want.get(at)
            );
        }
        // Nothing broadcast before the kill was lost with it: the room it came back to
        // went at least as far as what it had been sent.
        let seen = log
            .received
            .iter()
            .take_while(|r| r.at < killed_at)
            .last()
            .map_or(0, |r| r.id);
        let back_at = log
            .welcomes
            .iter()
            .find(|(at, _)| *at > killed_at)
            .map(|&(_, last)| last)
            .expect("a welcome after the restart");
        assert!(
            back_at >= seen,
            "{name} was sent #{seen} before the kill, but the restarted room ends at #{back_at}"
        );
        let room_seen = last_seen_before_kill
            .entry(client.room.as_str())
            .or_default();
        *room_seen = (*room_seen).max(seen);
    }
    let stored_before_kill: usize = rooms
        .values()
        .map(|stored| stored.iter().filter(|m| m.timestamp < dead_at).count())
        .sum();
    let stored_total: usize = rooms.values().map(Vec::len).sum();
    assert_eq!(stored_total, total_sent);
    assert!(
        acked_before_kill > 0,
        "nothing was acknowledged before the kill"
    );
    assert!(
        pending_at_kill > 0,
        "no message was in flight at the kill: the test did not test resending"
    );
    assert!(reconnections >= CLIENTS, "{reconnections} reconnections");

    let took = started.elapsed();
    let resent_and_stored_after = pending_at_kill - pending_stored_before_kill;
    let (server_back, all_back) = (restarted_at - killed_at, all_back_at - killed_at);
    let (all_after_restart, median) = (all_back_at - restarted_at, back_after[CLIENTS / 2]);
    eprintln!(
        "crash: {CLIENTS} clients in {ROOMS} rooms, SIGKILL after {BEFORE_KILL:?} of load\n\
         before the kill: {sent_before_kill} sent, {acked_before_kill} acknowledged, \
         {stored_before_kill} stored (last ids delivered per room: {last_seen_before_kill:?})\n\
         unacknowledged at the kill and sent again: {pending_at_kill} \
         ({pending_stored_before_kill} already stored, deduplicated by nonce; \
         {resent_and_stored_after} stored after the restart)\n\
         in all: {total_sent} sent, {stored_total} stored, each once\n\
         server listening again {server_back:?} after the kill; every client back {all_back:?} after it \
         ({all_after_restart:?} after the restart, half within {median:?}; {reconnections} reconnection attempts)\n\
         took {took:?}"
    );
    server.start_kill().unwrap();
    let _ = server.wait().await;
}
