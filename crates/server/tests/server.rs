//! The server over real sockets: routes, statuses, the connection cap, graceful shutdown,
//! and an outside client (Python's `websockets`) talking to `/echo`.

use std::net::SocketAddr;

use bytes::BytesMut;
use std::path::PathBuf;
use std::time::Duration;

use switchboard_net::{connect, ClientOptions, CloseCode, Message};
use switchboard_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
use support::Server;

/// Sends a raw request and returns the whole answer.
async fn raw(address: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the head and a short body are in (hyper keeps the connection alive).
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if n == 0
            || text.contains("\r\n\r\n")
                && (text.ends_with('\n') && !text.ends_with("\r\n\r\n")
                    || text.contains("101 Switching"))
        {
            return text.into_owned();
        }
    }
}

const UPGRADE: &str =
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn routes_and_statuses() {
    let server = Server::start(Config::default()).await;
    let a = server.address;
    let health = raw(a, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");

    // The chat page and its assets, from the binary, under a policy that lets nothing
    // but them run.
    for (path, kind, start) in [
        ("/", "text/html", "<!doctype html>"),
        ("/assets/app.js", "text/javascript", "// Switchboard"),
        ("/assets/style.css", "text/css", ":root"),
    ] {
        let page = raw(a, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        let lower = page.to_ascii_lowercase();
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{path}: {page}");
        assert!(
            lower.contains(&format!("content-type: {kind}")),
            "{path}: {page}"
        );
        assert!(lower.contains("content-security-policy: default-src 'none'; script-src 'self'"));
        assert!(lower.contains("x-content-type-options: nosniff"));
        let body = &page[page.find("\r\n\r\n").unwrap() + 4..];
        assert!(body.starts_with(start), "{path}: {body:.80}");
    }

    let plain = raw(a, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(plain.starts_with("HTTP/1.1 426 "), "{plain}");
    assert!(plain.contains("speaks WebSocket"), "{plain}");

    let version = raw(
        a,
        &format!("GET /echo HTTP/1.1\r\nHost: x\r\n{UPGRADE}Sec-WebSocket-Version: 12\r\n\r\n"),
    )
    .await;
    assert!(version.starts_with("HTTP/1.1 426 "), "{version}");
    assert!(
        version
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13\r\n"),
        "{version}"
    );

    let no_key = raw(a, "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n").await;
    assert!(no_key.starts_with("HTTP/1.1 400 "), "{no_key}");

    let ok = raw(
        a,
        &format!("GET /echo HTTP/1.1\r\nHost: x\r\n{UPGRADE}Sec-WebSocket-Version: 13\r\n\r\n"),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 101 "), "{ok}");
    assert!(
        ok.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{ok}"
    );

    let missing = raw(a, "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    server.stop().await;
}

#[tokio::test]
async fn echo_keeps_types_and_order() {
    let server = Server::start(Config::default()).await;
    let mut socket = connect(&server.url("/echo"), ClientOptions::default())
        .await
        .unwrap()
        .socket;
    let sent: Vec<Message> = (0..100)
        .map(|i| {
            if i % 3 == 0 {
                Message::Binary(vec![i as u8; i].into())
            } else {
                Message::Text(format!("message {i}").into())
            }
        })
        .collect();
    for message in &sent {
        socket.feed(message).await.unwrap();
    }
    socket.flush().await.unwrap();
    for message in &sent {
        assert_eq!(socket.recv().await.unwrap().as_ref(), Some(message));
    }
    let reply = socket.close(None).await.unwrap();
    assert_eq!(reply.map(|f| f.code), Some(CloseCode::NORMAL));
    server.stop().await;
}

#[tokio::test]
async fn over_capacity_gets_503() {
    let server = Server::start(Config::default().with_max_connections(1)).await;
    let mut first = connect(&server.url("/echo"), ClientOptions::default())
        .await
        .unwrap()
        .socket;
    let refused = raw(server.address, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    first.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn one_address_gets_429_past_its_open_connections_and_back_after_one_closes() {
    let server = Server::start(Config::default().with_per_ip_limits(2, 0.0, 0)).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let socket = connect(&server.url("/echo"), ClientOptions::default())
            .await
            .unwrap()
            .socket;
        open.push(socket);
    }
    let refused = raw(server.address, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 429 "), "{refused}");
    assert!(refused.contains("too many open connections"), "{refused}");
    // The client library reports the status.
    let error = connect(&server.url("/echo"), ClientOptions::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("429"), "{error}");
    // The two that are open still work, and closing one makes room.
    open[0].send_text("still here").await.unwrap();
    assert_eq!(
        open[0].recv().await.unwrap(),
        Some(Message::Text("still here".into()))
    );
    open.pop().unwrap().close(None).await.unwrap();
    // The server lets go of the slot once its side of the connection is closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let again = raw(server.address, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if again.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a close: {again}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn one_address_opening_too_fast_gets_429_then_its_rate() {
    // A burst of 3, then one every 2 seconds.
    let server = Server::start(Config::default().with_per_ip_limits(0, 0.5, 3)).await;
    let health = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    for i in 0..3 {
        let answer = raw(server.address, health).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "burst {i}: {answer}");
    }
    let refused = raw(server.address, health).await;
    assert!(refused.starts_with("HTTP/1.1 429 "), "{refused}");
    assert!(refused.contains("Retry-After: 1"), "{refused}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let refilled = raw(server.address, health).await;
    assert!(refilled.starts_with("HTTP/1.1 200 "), "{refilled}");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001() {
    let server = Server::start(Config::default()).await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(
            connect(&server.url("/echo"), ClientOptions::default())
                .await
                .unwrap()
                .socket,
        );
    }
    // Each connection is known to be upgraded once it has echoed a message.
    for socket in &mut sockets {
        socket.send_text("ping").await.unwrap();
        assert!(socket.recv().await.unwrap().is_some());
    }
    let stopping = tokio::spawn(server.stop());
    for socket in &mut sockets {
        assert_eq!(socket.recv().await.unwrap(), None);
        assert_eq!(
            socket.peer_close().map(|f| f.code),
            Some(CloseCode::GOING_AWAY)
        );
    }
    stopping.await.unwrap();
}

fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("SWITCHBOARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
        });
    let ok = std::process::Command::new(&candidate)
        .args(["-c", "import websockets"])
        .output()
        .is_ok_and(|out| out.status.success());
    ok.then_some(candidate)
}

#[tokio::test]
async fn python_websockets_client_talks_to_echo() {
    let Some(python) = python() else {
        if std::env::var_os("CI").is_some() {
            panic!("CI needs Python's websockets package: run scripts/test.sh, which installs it into .venv");
        }
        eprintln!("SKIPPED python_websockets_client_talks_to_echo: no .venv with `websockets` (scripts/test.sh makes one)");
        return;
    };
    let server = Server::start(Config::default()).await;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/python_echo_client.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .arg(server.url("/echo"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for label in ["plain", "deflate"] {
        assert!(stdout.contains(&format!("{label} text ok")), "{stdout}");
        assert!(stdout.contains(&format!("{label} binary ok")), "{stdout}");
        assert!(
            stdout.contains(&format!("{label} close sent 1000 received 1000")),
            "{stdout}"
        );
    }
    server.stop().await;
}

/// A raw client that offers permessage-deflate and sends hand-made frames.
async fn raw_deflate_client(address: SocketAddr) -> (TcpStream, BytesMut) {
    use switchboard_wire::handshake::{client_key, parse_response, ClientRequest};
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut request = ClientRequest::new(address.to_string(), "/echo", client_key([7; 16]));
    request.extensions = Some("permessage-deflate".into());
    stream.write_all(&request.to_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Some((head, len)) = parse_response(&buf, 16 * 1024).unwrap() {
            assert_eq!(head.status, 101);
            let extensions = head
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions"))
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
            assert_eq!(
                extensions.as_deref(),
                Some("permessage-deflate; client_no_context_takeover")
            );
            let _ = buf.split_to(len);
            return (stream, buf);
        }
        stream.read_buf(&mut buf).await.unwrap();
    }
}

#[tokio::test]
async fn deflate_bomb_is_closed_with_1009_and_others_keep_chatting() {
    use flate2::{Compress, Compression, FlushCompress};
    use switchboard_wire::frame::{encode_frame, FrameHeader};
    use switchboard_wire::{Connection, OpCode};

    let mut config = Config::default();
    config.echo_max_message = 1 << 20;
    let server = Server::start(config).await;
    let mut bystander = connect(&server.url("/echo"), ClientOptions::default())
        .await
        .unwrap()
        .socket;
    bystander.send_text("before").await.unwrap();
    assert_eq!(
        bystander.recv().await.unwrap(),
        Some(Message::Text("before".into()))
    );

    // 8 MiB of zeros deflate to a few KB: the server must stop at its 1 MiB limit.
    let mut compressor = Compress::new(Compression::best(), false);
    let mut bomb = Vec::with_capacity(64 * 1024);
    compressor
        .compress_vec(&vec![0u8; 8 << 20], &mut bomb, FlushCompress::Sync)
        .unwrap();
    assert!(bomb.len() < 10_000, "the bomb is {} bytes", bomb.len());
    bomb.truncate(bomb.len() - 4);
    let mut header = FrameHeader::new(OpCode::Binary, bomb.len() as u64);
    header.rsv1 = true;
    header.mask = Some([1, 2, 3, 4]);
    let mut frame = BytesMut::new();
    encode_frame(&mut frame, &header, &bomb);

    let (mut attacker, mut buf) = raw_deflate_client(server.address).await;
    attacker.write_all(&frame).await.unwrap();
    let mut decoder = Connection::client(Default::default(), [0; 32]);
    let close = loop {
        if let Some(message) = decoder.read(&mut buf).unwrap() {
            break message;
        }
        assert!(
            attacker.read_buf(&mut buf).await.unwrap() > 0,
            "closed without a close frame"
        );
    };
    match close {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::TOO_BIG),
        other => panic!("expected a close frame, got {other:?}"),
    }

    bystander.send_text("after").await.unwrap();
    assert_eq!(
        bystander.recv().await.unwrap(),
        Some(Message::Text("after".into()))
    );
    bystander.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn compression_is_negotiated_and_used_by_default() {
    let server = Server::start(Config::default()).await;
    let connected = connect(&server.url("/echo"), ClientOptions::default())
        .await
        .unwrap();
    assert!(connected
        .accepted
        .extensions
        .iter()
        .any(|e| e.name == "permessage-deflate"));
    let mut socket = connected.socket;
    let json = r#"{"type":"message","room":"lobby","from":"alice","text":"compressed both ways"}"#;
    socket.send_text(json).await.unwrap();
    assert_eq!(
        socket.recv().await.unwrap(),
        Some(Message::Text(json.into()))
    );
    assert_eq!(socket.protocol().deflate_state(), Some((true, true)));
    socket.close(None).await.unwrap();

    let off = Server::start(Config::default().with_compression(false)).await;
    let connected = connect(&off.url("/echo"), ClientOptions::default())
        .await
        .unwrap();
    assert!(connected.accepted.extensions.is_empty());
    let mut plain = connected.socket;
    assert_eq!(plain.protocol().deflate_state(), None);
    plain.close(None).await.unwrap();
    server.stop().await;
    off.stop().await;
}
