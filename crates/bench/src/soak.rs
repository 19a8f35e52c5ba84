//! `switchboard bench soak`: many room connections with steady traffic for a set time,
//! printing the server's resident memory, its open file descriptors and the delivery
//! latency every interval, then a summary with the memory drift.
//!
//! Connections are spread over rooms. In each room a few connections post at a steady
//! rate; every connection checks that the ids it receives go up by exactly one (a gap or
//! a repeat is counted), and a share of the readers hang up and come back with `since`
//! every interval, so connection setup and teardown run all along. The run fails when a
//! message goes missing, is repeated, is not acknowledged, or a connection is dropped by
//! the server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde::Serialize;
use switchboard_net::{connect, ClientOptions, Message};
use tokio::sync::{watch, Semaphore};

use super::fanout::{marker, parse_marker, Histogram};
use super::{raise_fd_limit, resident_kib, source_address};

#[derive(Debug, Clone, Args)]
// A flag given twice takes its last value (scripts add to their defaults).
#[command(args_override_self = true)]
pub(crate) struct SoakArgs {
    /// The server's base URL, such as ws://127.0.0.1:8080 (rooms are /room/soak-N).
    url: String,
    /// Process id of the server, to read its memory and open files.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Room connections held open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Rooms the connections are spread over.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Connections per room that post.
    #[arg(long, default_value_t = 2)]
    senders_per_room: usize,
    /// Messages posted per second, all rooms together.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// How long the traffic runs once every connection is open (such as 30m or 45s).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How often a line of figures is printed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Share of the reading connections that hang up and reconnect (with `since`) per
    /// interval.
    #[arg(long, default_value_t = 0.02)]
    churn: f64,
    /// Source addresses to spread the connections over (127.0.0.1 up to 127.0.0.N).
    #[arg(long, default_value_t = 1)]
    source_addrs: u8,
    /// Print the summary as one JSON object after the lines.
    #[arg(long)]
    json: bool,
}

/// One interval's figures.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    secs: f64,
    open: u64,
    rss_kib: Option<u64>,
    fds: Option<u64>,
    sent: u64,
    delivered: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    reconnects: u64,
}

/// What the whole run measured.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    connections: usize,
    rooms: usize,
    rate: f64,
    secs: f64,
    sent: u64,
    acknowledged: u64,
    delivered: u64,
    reconnects: u64,
    gaps: u64,
    repeats: u64,
    dropped: u64,
    connect_failures: u64,
    errors: u64,
    /// Ids connections still lacked of their room's last message at the end.
    behind: u64,
    unchecked: u64,
    rss_first_kib: Option<u64>,
    rss_mid_kib: Option<u64>,
    rss_last_kib: Option<u64>,
    rss_max_kib: Option<u64>,
    fds_first: Option<u64>,
    fds_last: Option<u64>,
    fds_max: Option<u64>,
    p50_ms: f64,
    p99_ms: f64,
    p99_median_of_intervals_ms: f64,
    p99_worst_interval_ms: f64,
    max_ms: f64,
    samples: Vec<Sample>,
}

/// Counters every connection adds to.
struct Shared {
    /// Tags this run's messages apart from those of earlier runs in the same rooms.
    run: u64,
    epoch: Instant,
    /// Nanoseconds after `epoch` when the run (its first interval) started.
    origin_ns: AtomicU64,
    interval: Duration,
    /// One latency histogram per interval (by the time a message was posted), and one
    /// for the whole run.
    intervals: Vec<Histogram>,
    all: Histogram,
    /// Connections open now, and connections that opened at least once.
    open: AtomicU64,
    opened: AtomicU64,
    sent: AtomicU64,
    acknowledged: AtomicU64,
    delivered: AtomicU64,
    reconnects: AtomicU64,
    gaps: AtomicU64,
    repeats: AtomicU64,
    /// Connections the server closed or broke while the run was on.
    dropped: AtomicU64,
    /// Connection attempts that failed (refused, timed out).
    connect_failures: AtomicU64,
    /// `error` events received.
    errors: AtomicU64,
    /// The highest id seen in each room, and the ids connections still lacked of it
    /// when the run ended (after a catch-up).
    room_last: Vec<AtomicU64>,
    behind: AtomicU64,
    /// Connections that were between two lives when the run ended (not checked).
    unchecked: AtomicU64,
    /// Set when posting stops: connections then stay until told to go.
    posting_over: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn interval_now(&self) -> usize {
        let since_origin = self
            .now_ns()
            .saturating_sub(self.origin_ns.load(Ordering::Relaxed));
        (u128::from(since_origin) / self.interval.as_nanos().max(1)) as usize
    }

    /// Times a message posted at or after `not_before_ns`.
    fn observe(&self, payload: &[u8], not_before_ns: u64) {
        let Some((interval, sent_ns)) = parse_marker(payload) else {
            return;
        };
        if sent_ns < not_before_ns {
            return;
        }
        let now = self.now_ns();
        let latency = now.saturating_sub(sent_ns);
        if let Some(histogram) = self.intervals.get(interval) {
            histogram.record(latency, now);
        }
        self.all.record(latency, now);
    }
}

/// The number after `"id":` in a message event.
fn message_id(text: &str) -> Option<u64> {
    let at = text.find(r#""id":"#)? + 5;
    let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
    text[at..at + digits].parse().ok()
}

/// A small deterministic generator for reconnection times (no two connections in step).
fn spread(seed: u64) -> f64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

struct Member {
    index: usize,
    room: usize,
    sender: bool,
    /// Seconds between posts (senders).
    period: Duration,
    /// Mean seconds a reader stays before reconnecting (`None`: it stays).
    lifetime: Option<f64>,
}

/// What one connection has seen, across its reconnections.
struct Seen {
    name: String,
    room: usize,
    /// `"from":"NAME"`: this connection's own messages, its acknowledgements.
    mine: String,
    /// Marks this run's messages.
    tag: String,
    last: Option<u64>,
    /// A sender's messages not acknowledged yet: sequence number to the time it was
    /// posted (nanoseconds after the epoch).
    pending: std::collections::BTreeMap<u64, u64>,
    posted: u64,
}

/// The sequence number a sender puts in each message (`#N `).
fn sequence_of(text: &str) -> Option<u64> {
    let at = text.find(" #")? + 2;
    let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
    text[at..at + digits].parse().ok()
}

impl Seen {
    /// Checks and counts one received text; `since_ns` is when this connection opened
    /// (messages posted before it, replayed on joining, are not timed).
    fn take(&mut self, text: &str, shared: &Shared, since_ns: u64) {
        if text.starts_with(r#"{"type":"error""#) {
            if shared.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("soak: {} got an error event: {text}", self.name);
            }
            return;
        }
        if !text.starts_with(r#"{"type":"message""#) {
            return;
        }
        let Some(id) = message_id(text) else { return };
        match self.last {
            Some(before) if id <= before => {
                shared.repeats.fetch_add(1, Ordering::Relaxed);
            }
            Some(before) if id > before + 1 => {
                shared.gaps.fetch_add(id - before - 1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.last = Some(self.last.map_or(id, |before| before.max(id)));
        shared.room_last[self.room].fetch_max(id, Ordering::Relaxed);
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        // Messages of earlier runs in the same rooms are neither timed nor counted.
        if !text.contains(&self.tag) {
            return;
        }
        shared.observe(text.as_bytes(), since_ns);
        if text.contains(&self.mine) {
            shared.acknowledged.fetch_add(1, Ordering::Relaxed);
            if let Some(sequence) = sequence_of(text) {
                self.pending.remove(&sequence);
            }
        }
    }
}

/// One connection's life: connect (again with `since` after a hang-up), read, check ids,
/// post if it is a sender, until `stop` says so; then read on until it has the room's
/// last message (or counts what it is missing).
async fn member(
    args: Arc<SoakArgs>,
    me: Member,
    shared: Arc<Shared>,
    opening: Arc<Semaphore>,
    mut go: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let name = format!("u{}", me.index);
    let mut seen = Seen {
        mine: format!(r#""from":"{name}""#),
        tag: format!("soak {} ", shared.run),
        name,
        room: me.room,
        last: None,
        pending: std::collections::BTreeMap::new(),
        posted: 0,
    };
    let mut options = ClientOptions::default();
    options.config = options.config.with_deflate(None);
    options.local_address = source_address(me.index, args.source_addrs);
    let mut lives = 0u64;
    let mut failures = 0u32;
    'lives: loop {
        let since = seen
            .last
            .map_or_else(String::new, |id| format!("&since={id}"));
        let url = format!(
            "{}/room/soak-{}?name={}{since}",
            args.url, me.room, seen.name
        );
        let connected = {
            let _permit = opening.acquire().await;
            tokio::select! {
                connected = connect(&url, options.clone()) => connected,
                _ = stop.changed() => {
                    shared.unchecked.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        };
        let mut socket = match connected {
            Ok(connected) => connected.socket,
            Err(cause) => {
                if shared.connect_failures.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("soak: {} could not connect: {cause}", seen.name);
                }
                failures += 1;
                let backoff = 200u64 << failures.min(5);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                continue;
            }
        };
        failures = 0;
        let since_ns = shared.now_ns();
        shared.open.fetch_add(1, Ordering::Relaxed);
        if lives == 0 {
            shared.opened.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        lives += 1;
        // The run starts when every connection is open.
        if !*go.borrow() {
            let _ = go.wait_for(|on| *on).await;
        }
        let life = me.lifetime.map(|mean| {
            // Memoryless (exponential), so the same share goes in every interval.
            let secs = -mean * (1.0 - spread(me.index as u64 * 7919 + lives)).ln();
            tokio::time::Instant::now() + Duration::from_secs_f64(secs)
        });
        let mut posting = tokio::time::interval_at(
            tokio::time::Instant::now() + me.period.mul_f64(spread(me.index as u64)),
            me.period,
        );
        posting.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            tokio::select! {
                received = socket.recv() => match received {
                    Ok(Some(Message::Text(text))) => seen.take(text.as_str(), &shared, since_ns),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break None,
                },
                _ = posting.tick(), if me.sender => {
                    // Counted before it goes, with no wait between the check and the
                    // count: once posting is over, the count only waits for its acks.
                    if shared.posting_over.load(Ordering::Relaxed) {
                        continue;
                    }
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                    let now = shared.now_ns();
                    let text = marker(shared.interval_now(), now, 0);
                    let sequence = seen.posted;
                    let event = format!(
                        r#"{{"type":"message","text":"{}#{sequence} {text}"}}"#,
                        seen.tag
                    );
                    seen.posted += 1;
                    seen.pending.insert(sequence, now);
                    // A failed send is a broken connection: the next receive says so.
                    let _ = socket.send_text(&event).await;
                }
                () = async {
                    match life {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => break Some(false),
                _ = stop.changed() => break Some(true),
            }
        };
        match ended {
            // The server closed the connection or it broke while the run was on.
            None => {
                shared.open.fetch_sub(1, Ordering::Relaxed);
                if *stop.borrow() {
                    shared.unchecked.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                let why = socket.peer_close().map_or_else(
                    || "connection lost".to_owned(),
                    |frame| format!("closed {} {}", frame.code.0, frame.reason),
                );
                eprintln!("soak: {} was dropped: {why}", seen.name);
            }
            // Its time to reconnect.
            Some(false) => {
                let _ = socket.close(None).await;
                shared.open.fetch_sub(1, Ordering::Relaxed);
            }
            // The run is over: catch up with the room's last message, then leave.
            Some(true) => {
                let target = shared.room_last[me.room].load(Ordering::Relaxed);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while seen.last.unwrap_or(0) < target {
                    match tokio::time::timeout_at(deadline, socket.recv()).await {
                        Ok(Ok(Some(Message::Text(text)))) => {
                            seen.take(text.as_str(), &shared, since_ns);
                        }
                        Ok(Ok(Some(_))) => {}
                        _ => break,
                    }
                }
                let missing = target.saturating_sub(seen.last.unwrap_or(0));
                shared.behind.fetch_add(missing, Ordering::Relaxed);
                for (sequence, posted_ns) in seen.pending.iter().take(3) {
                    eprintln!(
                        "soak: {} never got back its message #{sequence}, posted {:.1} s into the run (of {} it posted; its last id {:?}, the room's {target})",
                        seen.name,
                        posted_ns.saturating_sub(shared.origin_ns.load(Ordering::Relaxed)) as f64 / 1e9,
                        seen.posted,
                        seen.last,
                    );
                }
                let _ = socket.close(None).await;
                shared.open.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
        continue 'lives;
    }
}

fn open_fds(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|entries| entries.count() as u64)
}

fn median(values: &[f64]) -> f64 {
    let mut values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn kib_to_mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "-".to_owned(),
        |kib| format!("{:.1}", kib as f64 / 1024.0),
    )
}

fn or_dash(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

// The figures are this command's output.
#[allow(clippy::print_stdout)]
pub(crate) async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    if args.rooms == 0 || args.connections < args.rooms {
        bail!("need at least one connection per room");
    }
    let limit = raise_fd_limit();
    if args.connections as u64 + 64 > limit {
        bail!(
            "{} connections need more open files than this process may have ({limit})",
            args.connections
        );
    }
    let senders = (args.senders_per_room * args.rooms).min(args.connections);
    let period = Duration::from_secs_f64(senders as f64 / args.rate.max(0.001));
    let interval = args.interval.max(Duration::from_millis(100));
    let intervals = (args.duration.as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 2;
    let args = Arc::new(args);
    let (go_tx, go) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let opening = Arc::new(Semaphore::new(64));
    let shared = Arc::new(Shared {
        run: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        epoch: Instant::now(),
        origin_ns: AtomicU64::new(0),
        interval,
        intervals: (0..intervals).map(|_| Histogram::new()).collect(),
        all: Histogram::new(),
        open: AtomicU64::new(0),
        opened: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        acknowledged: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        repeats: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        room_last: (0..args.rooms).map(|_| AtomicU64::new(0)).collect(),
        behind: AtomicU64::new(0),
        unchecked: AtomicU64::new(0),
        posting_over: AtomicBool::new(false),
    });
    let lifetime = (args.churn > 0.0).then(|| interval.as_secs_f64() / args.churn);
    let rss_at_start = args.server_pid.and_then(|pid| resident_kib(pid).ok());
    println!(
        "soak: {} connections in {} rooms ({senders} posting, {:.0} msg/s in all), {} of readers reconnecting per {:?}, for {:?}",
        args.connections,
        args.rooms,
        args.rate,
        format_args!("{:.1}%", args.churn * 100.0),
        interval,
        args.duration
    );
    let opened_at = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.connections {
        let me = Member {
            index,
            room: index % args.rooms,
            sender: index < senders,
            period,
            lifetime: if index < senders { None } else { lifetime },
        };
        tasks.spawn(member(
            args.clone(),
            me,
            shared.clone(),
            opening.clone(),
            go.clone(),
            stop.clone(),
        ));
    }
    while shared.opened.load(Ordering::Relaxed) < args.connections as u64 {
        if opened_at.elapsed() > Duration::from_secs(300) {
            bail!(
                "only {} of {} connections opened in 5 minutes",
                shared.opened.load(Ordering::Relaxed),
                args.connections
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "opened {} connections in {:.1} s; server RSS {} MiB before, {} MiB now",
        args.connections,
        opened_at.elapsed().as_secs_f64(),
        kib_to_mib(rss_at_start),
        kib_to_mib(args.server_pid.and_then(|pid| resident_kib(pid).ok())),
    );
    // The first interval starts now.
    shared.origin_ns.store(shared.now_ns(), Ordering::Relaxed);
    go_tx.send_replace(true);
    println!(
        "{:>7} {:>6} {:>8} {:>6} {:>7} {:>10} {:>7} {:>7} {:>7} {:>6}",
        "secs",
        "open",
        "rss_MiB",
        "fds",
        "sent/s",
        "deliv/s",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "reconn"
    );
    let mut samples: Vec<Sample> = Vec::new();
    let (mut sent_before, mut delivered_before, mut reconnects_before) = (0, 0, 0);
    let started = tokio::time::Instant::now();
    let mut k = 0;
    while started.elapsed() < args.duration {
        k += 1;
        tokio::time::sleep_until(started + interval * k as u32).await;
        let sent = shared.sent.load(Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let reconnects = shared.reconnects.load(Ordering::Relaxed);
        let histogram = &shared.intervals[k - 1];
        let (_, max_ms) = histogram.count_and_max_ms();
        let secs = interval.as_secs_f64();
        let sample = Sample {
            secs: started.elapsed().as_secs_f64(),
            open: shared.open.load(Ordering::Relaxed),
            rss_kib: args.server_pid.and_then(|pid| resident_kib(pid).ok()),
            fds: args.server_pid.and_then(open_fds),
            sent: sent - sent_before,
            delivered: delivered - delivered_before,
            p50_ms: histogram.quantile_ms(0.5),
            p99_ms: histogram.quantile_ms(0.99),
            max_ms,
            reconnects: reconnects - reconnects_before,
        };
        (sent_before, delivered_before, reconnects_before) = (sent, delivered, reconnects);
        println!(
            "{:>7.0} {:>6} {:>8} {:>6} {:>7.0} {:>10.0} {:>7.2} {:>7.2} {:>7.1} {:>6}",
            sample.secs,
            sample.open,
            kib_to_mib(sample.rss_kib),
            or_dash(sample.fds),
            sample.sent as f64 / secs,
            sample.delivered as f64 / secs,
            sample.p50_ms,
            sample.p99_ms,
            sample.max_ms,
            sample.reconnects
        );
        if let Some(pid) = args.server_pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!("the server (pid {pid}) is gone");
            }
        }
        samples.push(sample);
    }
    // Stop posting, then wait for every posted message to come back to its sender.
    shared.posting_over.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = Instant::now();
    while shared.acknowledged.load(Ordering::Relaxed) < shared.sent.load(Ordering::Relaxed)
        && waiting.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    stop_tx.send_replace(true);
    let closing = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if closing.is_err() {
        tasks.abort_all();
    }

    let rss: Vec<u64> = samples.iter().filter_map(|s| s.rss_kib).collect();
    let fds: Vec<u64> = samples.iter().filter_map(|s| s.fds).collect();
    let p99s: Vec<f64> = samples.iter().map(|s| s.p99_ms).collect();
    let summary = Summary {
        connections: args.connections,
        rooms: args.rooms,
        rate: args.rate,
        secs,
        sent: shared.sent.load(Ordering::Relaxed),
        acknowledged: shared.acknowledged.load(Ordering::Relaxed),
        delivered: shared.delivered.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        gaps: shared.gaps.load(Ordering::Relaxed),
        repeats: shared.repeats.load(Ordering::Relaxed),
        dropped: shared.dropped.load(Ordering::Relaxed),
        connect_failures: shared.connect_failures.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        behind: shared.behind.load(Ordering::Relaxed),
        unchecked: shared.unchecked.load(Ordering::Relaxed),
        rss_first_kib: rss.first().copied(),
        rss_mid_kib: rss.get(rss.len() / 2).copied(),
        rss_last_kib: rss.last().copied(),
        rss_max_kib: rss.iter().max().copied(),
        fds_first: fds.first().copied(),
        fds_last: fds.last().copied(),
        fds_max: fds.iter().max().copied(),
        p50_ms: shared.all.quantile_ms(0.5),
        p99_ms: shared.all.quantile_ms(0.99),
        p99_median_of_intervals_ms: median(&p99s),
        p99_worst_interval_ms: p99s.iter().copied().fold(f64::NAN, f64::max),
        max_ms: shared.all.count_and_max_ms().1,
        samples,
    };
    let drift = |from: Option<u64>| match (from, summary.rss_last_kib) {
        (Some(a), Some(b)) => format!("{:+.1} MiB", (b as f64 - a as f64) / 1024.0),
        _ => "-".to_owned(),
    };
    println!(
        "summary: {:.0} s; sent {}, acknowledged {}, delivered {}; reconnects {}; gaps {}, repeats {}, short at the end {} ({} not checked); dropped {}, failed connects {}, error events {}",
        summary.secs,
        summary.sent,
        summary.acknowledged,
        summary.delivered,
        summary.reconnects,
        summary.gaps,
        summary.repeats,
        summary.behind,
        summary.unchecked,
        summary.dropped,
        summary.connect_failures,
        summary.errors
    );
    println!(
        "server RSS: first interval {} MiB, middle {} MiB, last {} MiB, highest {} MiB; drift {} from the first interval, {} over the second half",
        kib_to_mib(summary.rss_first_kib),
        kib_to_mib(summary.rss_mid_kib),
        kib_to_mib(summary.rss_last_kib),
        kib_to_mib(summary.rss_max_kib),
        drift(summary.rss_first_kib),
        drift(summary.rss_mid_kib),
    );
    println!(
        "server open files: first {}, last {}, highest {}",
        or_dash(summary.fds_first),
        or_dash(summary.fds_last),
        or_dash(summary.fds_max)
    );
    println!(
        "latency: p50 {:.2} ms, p99 {:.2} ms (median interval {:.2} ms, worst interval {:.2} ms), max {:.1} ms",
        summary.p50_ms,
        summary.p99_ms,
        summary.p99_median_of_intervals_ms,
        summary.p99_worst_interval_ms,
        summary.max_ms
    );
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    let mut failures = Vec::new();
    if summary.acknowledged < summary.sent {
        failures.push(format!(
            "{} messages were not acknowledged",
            summary.sent - summary.acknowledged
        ));
    }
    if summary.gaps > 0 || summary.repeats > 0 {
        failures.push(format!(
            "{} ids missing and {} repeated",
            summary.gaps, summary.repeats
        ));
    }
    if summary.behind > 0 {
        failures.push(format!(
            "connections ended {} ids short of their rooms' last messages",
            summary.behind
        ));
    }
    if summary.errors > 0 {
        failures.push(format!("{} error events", summary.errors));
    }
    if summary.connect_failures > 0 {
        failures.push(format!(
            "{} connection attempts failed",
            summary.connect_failures
        ));
    }
    if summary.dropped > 0 {
        failures.push(format!("{} connections dropped", summary.dropped));
    }
    if summary.sent == 0 {
        failures.push("nothing was sent".to_owned());
    }
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_out_of_message_events() {
        let event = r#"{"type":"message","id":4021,"room":"soak-3","from":"u3","text":"x"}"#;
        assert_eq!(message_id(event), Some(4021));
        assert_eq!(message_id(r#"{"type":"message"}"#), None);
    }

    #[test]
    fn sequence_numbers_come_out_of_the_text() {
        assert_eq!(sequence_of("soak 17 #42 ~T3:100~"), Some(42));
        assert_eq!(sequence_of("soak 17 ~T3:100~"), None);
    }

    #[test]
    fn spread_stays_in_the_unit_interval_and_varies() {
        let values: Vec<f64> = (0..1000).map(spread).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }
}
