//! Running the binary: `switchboard serve` on a free (or given) port, and a command
//! fed its standard input; what the cluster tests ask of their nodes and clients.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Starts `switchboard serve --listen LISTEN EXTRA…` and returns it with its address, read
/// from its `listening on http://ADDR` (or `https://`) log line.
pub(crate) async fn serve_with(listen: &str, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", listen, "--drain-timeout", "5"])
        .args(extra)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let url = line.split_once("listening on ").map(|(_, url)| url);
            if let Some((_, rest)) = url.and_then(|url| url.split_once("://")) {
                return rest.trim().to_owned();
            }
        }
        panic!("serve exited without logging its address");
    })
    .await
    .unwrap();
    // Keep draining the log so the server never blocks on a full pipe (shown with
    // SWITCHBOARD_TEST_LOGS=1, when a test needs looking into).
    let show = std::env::var_os("SWITCHBOARD_TEST_LOGS").is_some();
    let name = address.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if show {
                eprintln!("[{name}] {line}");
            }
        }
    });
    (child, address)
}

/// A server keeping history in memory, on a free port.
#[allow(dead_code)] // Not every test file needs it.
pub(crate) async fn serve() -> (Child, String) {
    serve_with("127.0.0.1:0", &["--memory"]).await
}

/// Runs `switchboard ARGS…` with `stdin` as its standard input, waiting up to `limit`.
#[allow(dead_code)] // Not every test file needs it.
pub(crate) async fn run(args: &[&str], stdin: &str, limit: Duration) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("the command finishes")
        .unwrap()
}

/// The standard output of a command that must have succeeded (its stderr otherwise).
#[allow(dead_code)] // Not every test file needs it.
pub(crate) fn succeeded(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The room's member list as `node`'s HTTP API gives it (`None` when it does not answer).
#[allow(dead_code)] // The cluster tests' alone.
pub(crate) async fn members(node: &str, room: &str) -> Option<Vec<String>> {
    let (status, body) = switchboard_test_support::http::request(
        node,
        "GET",
        &format!("/api/rooms/{room}/members"),
        "",
        None,
    )
    .await?;
    (status == 200)
        .then(|| serde_json::from_value(body["members"].clone()).ok())
        .flatten()
}

/// Waits (at most a minute) until every message `client` sent was acknowledged.
#[allow(dead_code)] // The cluster tests' alone.
pub(crate) async fn wait_acknowledged(client: &switchboard_client::RoomClient, who: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client.queued() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{who}: {} messages never acknowledged",
            client.queued()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a room client received: each message's id, sender and text, in order.
#[allow(dead_code)] // The cluster tests' alone.
pub(crate) type Messages = Vec<(u64, String, String)>;

/// Every message a room client receives, in order, until it has `count` (or nothing came
/// for a minute), and who it was told started typing; with `first_connection`, only
/// until it loses its first connection (one whose node is killed, and which it cannot
/// get back). Panics when the client gives up.
#[allow(dead_code)] // The cluster tests' alone.
pub(crate) fn collect(
    who: &'static str,
    mut events: switchboard_client::Events,
    count: usize,
    first_connection: bool,
) -> tokio::task::JoinHandle<(Messages, Vec<String>)> {
    use switchboard_client::{Event, State};
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut typists = Vec::new();
        while seen.len() < count {
            match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
                Ok(Some(Event::Message(m))) => {
                    seen.push((m.id, m.from.unwrap_or_default(), m.text.unwrap_or_default()))
                }
                Ok(Some(Event::Typing {
                    user,
                    is_typing: true,
                })) => typists.push(user),
                Ok(Some(Event::State(State::Closed { reason, .. }))) => {
                    panic!("{who} closed after {} messages: {reason}", seen.len())
                }
                Ok(Some(Event::State(State::Reconnecting { .. }))) if first_connection => break,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        (seen, typists)
    })
}
