//! `wss://` end to end: `serve --tls-cert/--tls-key` with a certificate made for the test,
//! `send` and `connect` trusting it with `--ca`, the client library with its own TLS
//! settings, and the refusals: an unknown issuer, plain `ws://` to a TLS port, a client
//! that never finishes its TLS handshake.

use std::path::Path;
use std::time::Duration;

use switchboard_client::{Event, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

mod support;

use support::{serve_with, succeeded, BIN};

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM into `dir`.
fn certificate(dir: &Path) -> (String, String) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("a certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
}

/// Long enough for a debug build under load.
const LIMIT: Duration = Duration::from_secs(20);

async fn run(args: &[&str], stdin: &str) -> std::process::Output {
    support::run(args, stdin, LIMIT).await
}

#[tokio::test]
async fn rooms_and_echo_over_wss() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, "handshake_timeout_secs = 2\n").unwrap();
    let (mut server, address) = serve_with(
        "127.0.0.1:0",
        &[
            "--memory",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .await;
    let port = address.rsplit(':').next().unwrap();
    let room = format!("wss://localhost:{port}/room/secure");

    // The client library, trusting the test's certificate, reads what `send` posts.
    let tls = switchboard_net::tls::client_config(Some(Path::new(&cert))).unwrap();
    let (_reader, mut events) =
        switchboard_client::connect(&room, Options::default().with_name("reader").with_tls(tls))
            .await
            .expect("the library joins over wss://");

    let sent = run(
        &["send", &room, "--ca", &cert, "--name", "alice", "over TLS"],
        "",
    )
    .await;
    let id: u64 = succeeded(sent).trim().parse().expect("send prints the id");
    let received = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.recv().await {
            if let Event::Message(message) = event {
                return message;
            }
        }
        panic!("the reader's events ended");
    })
    .await
    .expect("the message arrives");
    assert_eq!(
        (
            received.id,
            received.from.as_deref(),
            received.text.as_deref()
        ),
        (id, Some("alice"), Some("over TLS"))
    );

    // `connect` pipes lines through /echo, over TLS, to an IP address in the certificate.
    let echoed = run(
        &[
            "connect",
            &format!("wss://127.0.0.1:{port}/echo"),
            "--ca",
            &cert,
        ],
        "secret line\n",
    )
    .await;
    assert_eq!(succeeded(echoed), "secret line\n");

    // Without --ca the system's roots do not know the certificate: a one-line refusal.
    let untrusted = run(&["send", &room, "--name", "mallory", "nope"], "").await;
    assert!(!untrusted.status.success());
    let stderr = String::from_utf8(untrusted.stderr).unwrap();
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the refusal names the certificate: {stderr}"
    );

    // Plain HTTP on the TLS port gets no upgrade.
    let plain = run(
        &["connect", &format!("ws://127.0.0.1:{port}/echo")],
        "hello\n",
    )
    .await;
    assert!(!plain.status.success());

    // A client that sends half a ClientHello and stalls does not keep the server from
    // serving others, and is dropped at the handshake timeout (2 s here).
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled.write_all(b"\x16\x03\x01").await.unwrap();
    let started = std::time::Instant::now();
    let again = run(
        &["send", &room, "--ca", &cert, "--name", "bob", "still here"],
        "",
    )
    .await;
    succeeded(again);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(8), stalled.read_to_end(&mut rest))
        .await
        .expect("the server drops a stalled TLS handshake");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "dropped too early"
    );
    assert!(rest.is_empty(), "no answer to half a handshake");
    server.kill().await.unwrap();
}

#[tokio::test]
async fn serve_refuses_a_certificate_without_its_key_file() {
    let output = Command::new(BIN)
        .args(["serve", "--memory", "--tls-cert", "/nonexistent/cert.pem"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--tls-key"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let output = Command::new(BIN)
        .args([
            "serve",
            "--memory",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            missing.to_str().unwrap(),
            "--tls-key",
            missing.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("missing.pem"), "{stderr}");
}
