//! The binary as a user runs it: `serve` logs its address, `connect` pipes stdin through
//! `/echo`, and SIGTERM closes every WebSocket with 1001 before the process exits.

use std::process::Stdio;
use std::time::Duration;

use switchboard_net::{connect, ClientOptions, CloseCode, Message};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

mod support;

use support::{run, serve, succeeded, BIN};

#[tokio::test]
async fn connect_pipes_lines_through_echo() {
    let (mut server, address) = serve().await;
    let output = run(
        &["connect", &format!("ws://{address}/echo")],
        "first line\nsecond, ünïcødé\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(succeeded(output), "first line\nsecond, ünïcødé\n");
    server.kill().await.unwrap();
}

#[tokio::test]
async fn connect_explains_a_refusal_in_one_line() {
    let (mut server, address) = serve().await;
    let nowhere = format!("ws://{address}/nowhere");
    refused_in_one_line(&["connect", &nowhere], "404").await;
    server.kill().await.unwrap();
}

/// Runs the binary with `args`, which must fail with one line on stderr naming `status`.
async fn refused_in_one_line(args: &[&str], status: &str) {
    let output = Command::new(BIN).args(args).output().await.unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(status), "{stderr}");
}

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_exits() {
    let (mut server, address) = serve().await;
    let mut socket = connect(&format!("ws://{address}/echo"), ClientOptions::default())
        .await
        .unwrap()
        .socket;
    socket.send_text("hello").await.unwrap();
    assert_eq!(
        socket.recv().await.unwrap(),
        Some(Message::Text("hello".into()))
    );

    let pid = server.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    assert_eq!(socket.recv().await.unwrap(), None);
    assert_eq!(
        socket.peer_close().map(|f| f.code),
        Some(CloseCode::GOING_AWAY)
    );
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn logs_can_be_json_lines() {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--memory", "--log-json"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("a log line");
            if line.contains("listening on") {
                return line;
            }
        }
    })
    .await
    .unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(parsed["level"], "INFO");
    assert!(parsed["fields"]["message"]
        .as_str()
        .unwrap()
        .starts_with("listening on http://127.0.0.1:"));
    child.kill().await.unwrap();
}

#[tokio::test]
async fn send_prints_the_stored_id_or_one_line_of_refusal() {
    let (mut server, address) = serve().await;
    let url = format!("ws://{address}/room/sent");
    for expected in ["1", "2"] {
        let output = Command::new(BIN)
            .args(["send", &url, "--name", "bot", "hello"])
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(String::from_utf8(output.stdout).unwrap().trim(), expected);
    }
    let bad_room = format!("ws://{address}/room/no%20spaces");
    refused_in_one_line(&["send", &bad_room, "--name", "bot", "hello"], "400").await;
    server.kill().await.unwrap();
}
