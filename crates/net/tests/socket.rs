//! The driver over real loopback sockets: handshake, echo, close codes, pings.

use std::time::Duration;

use switchboard_net::{
    accept, connect, ClientOptions, CloseCode, CloseFrame, Config, Error, Message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/echo", listener.local_addr().unwrap());
    (listener, url)
}

#[tokio::test]
async fn echo_and_a_clean_close_both_ways() {
    let (listener, url) = bind().await;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut socket, head) = accept(stream, Config::default()).await.unwrap();
        assert_eq!(head.target, "/echo");
        while let Some(message) = socket.recv().await.unwrap() {
            socket.feed(&message).await.unwrap();
        }
        socket.peer_close().cloned()
    });

    let mut socket = connect(&url, ClientOptions::default())
        .await
        .unwrap()
        .socket;
    socket.send_text("hello ✓").await.unwrap();
    socket
        .send(&Message::Binary(vec![0u8, 159, 146, 150].into()))
        .await
        .unwrap();
    let big = "x".repeat(200_000);
    socket.send_text(&big).await.unwrap();
    assert_eq!(
        socket.recv().await.unwrap(),
        Some(Message::Text("hello ✓".into()))
    );
    assert_eq!(
        socket.recv().await.unwrap(),
        Some(Message::Binary(vec![0u8, 159, 146, 150].into()))
    );
    match socket.recv().await.unwrap() {
        Some(Message::Text(text)) => assert_eq!(text.as_str(), big),
        other => panic!("unexpected {other:?}"),
    }
    let reply = socket
        .close(Some(CloseFrame::new(CloseCode::NORMAL, "done")))
        .await
        .unwrap();
    assert_eq!(reply.map(|f| f.code), Some(CloseCode::NORMAL));
    let seen_by_server = server.await.unwrap();
    assert_eq!(
        seen_by_server,
        Some(CloseFrame::new(CloseCode::NORMAL, "done"))
    );
}

#[tokio::test]
async fn server_initiated_close_reaches_the_client() {
    let (listener, url) = bind().await;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut socket, _) = accept(stream, Config::default()).await.unwrap();
        socket
            .close(Some(CloseFrame::new(CloseCode::GOING_AWAY, "bye")))
            .await
            .unwrap()
    });
    let mut socket = connect(&url, ClientOptions::default())
        .await
        .unwrap()
        .socket;
    assert_eq!(socket.recv().await.unwrap(), None);
    assert_eq!(
        socket.peer_close(),
        Some(&CloseFrame::new(CloseCode::GOING_AWAY, "bye"))
    );
    assert_eq!(
        server.await.unwrap().map(|f| f.code),
        Some(CloseCode::GOING_AWAY)
    );
}

#[tokio::test]
async fn a_silent_peer_is_dropped_and_a_live_one_is_kept() {
    let config = Config::default()
        .with_ping_interval(Some(Duration::from_millis(50)))
        .with_pong_timeout(Duration::from_millis(500));
    let (listener, url) = bind().await;
    let cfg = config.clone();
    let server = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (stream, _) = listener.accept().await.unwrap();
            let (mut socket, _) = accept(stream, cfg.clone()).await.unwrap();
            let outcome = tokio::time::timeout(Duration::from_millis(2000), socket.recv()).await;
            results.push(match outcome {
                Err(_) => "still open".to_owned(),
                Ok(Err(Error::PingTimeout)) => "ping timeout".to_owned(),
                Ok(other) => format!("{other:?}"),
            });
        }
        results
    });

    // A peer that completes the handshake and then never answers anything.
    let mut silent = TcpStream::connect(url.trim_start_matches("ws://").trim_end_matches("/echo"))
        .await
        .unwrap();
    silent
        .write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    // A client whose driver answers pings by itself while it waits for messages.
    let live = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut socket = connect(&url, ClientOptions::default())
            .await
            .unwrap()
            .socket;
        tokio::time::timeout(Duration::from_secs(10), socket.recv()).await
    });
    let results = server.await.unwrap();
    assert_eq!(results, ["ping timeout", "still open"]);
    drop(silent);
    live.abort();
}

#[tokio::test]
async fn a_peer_that_answers_is_pinged_again_after_each_quiet_interval() {
    // A pong long before the pong timeout: the next ping comes one quiet interval
    // later, so a proxy between never sees the link idle for longer than about two.
    let config = Config::default()
        .with_ping_interval(Some(Duration::from_millis(50)))
        .with_pong_timeout(Duration::from_secs(30));
    let (listener, url) = bind().await;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut socket, _) = accept(stream, config).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(1500), socket.recv()).await;
    });
    let mut peer = TcpStream::connect(url.trim_start_matches("ws://").trim_end_matches("/echo"))
        .await
        .unwrap();
    peer.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut chunk = [0u8; 1024];
    while let Ok(Ok(read)) = tokio::time::timeout_at(deadline, peer.read(&mut chunk)).await {
        if read == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..read]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            if received.starts_with(b"HTTP/1.1 101") {
                received.drain(..end + 4);
            }
        }
        // Each empty ping (0x89 0x00) is answered with an empty masked pong.
        while received.starts_with(&[0x89, 0x00]) {
            received.drain(..2);
            pings += 1;
            peer.write_all(&[0x8a, 0x80, 0, 0, 0, 0]).await.unwrap();
        }
    }
    server.abort();
    // About one every 50-100 ms; before each answer reset the timer, one in all.
    assert!(pings >= 5, "{pings} pings in a second");
}

#[tokio::test]
async fn bad_handshakes_get_their_status() {
    let (listener, _) = bind().await;
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                // Rejections are the point of this test.
                let _ = accept(stream, Config::default()).await;
            });
        }
    });
    let cases: [(&str, &str); 3] = [
        ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n", "426"),
        ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n", "400"),
        ("POST / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "405"),
    ];
    for (request, status) in cases {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
        if status == "426" {
            assert!(answer.contains("Sec-WebSocket-Version: 13\r\n"), "{answer}");
        }
    }
}

#[tokio::test]
async fn refused_and_non_101_connects_fail_with_a_reason() {
    let (listener, url) = bind().await;
    drop(listener);
    assert!(matches!(
        connect(&url, ClientOptions::default()).await,
        Err(Error::Io(_))
    ));

    let (listener, url) = bind().await;
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf).await;
        stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
    });
    let error = connect(&url, ClientOptions::default()).await.unwrap_err();
    assert!(error.to_string().contains("404 Not Found"), "{error}");
}

#[tokio::test]
async fn idle_connections_free_their_compressors() {
    let config = Config::default().with_idle_release(Some(Duration::from_millis(100)));
    let (listener, url) = bind().await;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut socket, _) = accept(stream, config).await.unwrap();
        let message = socket.recv().await.unwrap().unwrap();
        socket.send(&message).await.unwrap();
        let busy = socket.protocol().deflate_state();
        // Nothing arrives: the timer fires inside recv and frees what can be rebuilt.
        let _ = tokio::time::timeout(Duration::from_millis(400), socket.recv()).await;
        (busy, socket.protocol().deflate_state())
    });
    let connected = connect(&url, ClientOptions::default()).await.unwrap();
    let mut socket = connected.socket;
    let text = r#"{"type":"message","text":"compress me, compress me, compress me"}"#;
    socket.send_text(text).await.unwrap();
    assert_eq!(
        socket.recv().await.unwrap(),
        Some(Message::Text(text.into()))
    );
    let (busy, idle) = server.await.unwrap();
    assert_eq!(
        busy,
        Some((true, true)),
        "compressor and decompressor in use"
    );
    // The client compresses each message on its own, so the server keeps no history.
    assert_eq!(idle, Some((false, false)), "both freed once idle");
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_given_up_on() {
    let config = Config::default()
        .with_write_timeout(Duration::from_millis(200))
        .with_close_timeout(Duration::from_millis(200));
    // The client's end of the pipe is never read.
    let (server_io, _client_io) = tokio::io::duplex(64 * 1024);
    let mut socket = switchboard_net::WebSocket::server(server_io, &[], config, None);
    let chunk = Message::Binary(vec![0u8; 64 * 1024].into());
    let sending = async {
        loop {
            socket.send(&chunk).await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), Error>(())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .expect("the send gave up");
    assert!(matches!(outcome, Err(Error::Timeout(_))), "{outcome:?}");

    // The close handshake is bounded too, even with the Close frame stuck.
    let (server_io, _client_io) = tokio::io::duplex(16);
    let config = Config::default()
        .with_write_timeout(Duration::from_secs(60))
        .with_close_timeout(Duration::from_millis(200));
    let mut socket = switchboard_net::WebSocket::server(server_io, &[], config, None);
    let closing = tokio::time::timeout(
        Duration::from_secs(5),
        socket.close(Some(CloseFrame::new(
            CloseCode::GOING_AWAY,
            "a long reason that does not fit",
        ))),
    );
    assert!(matches!(
        closing.await.expect("close gave up"),
        Err(Error::Timeout(_))
    ));
}

#[tokio::test]
async fn a_protocol_error_survives_a_cancelled_recv() {
    let (server_io, mut client_io) = tokio::io::duplex(8);
    let mut socket = switchboard_net::WebSocket::server(server_io, &[], Config::default(), None);
    // An unmasked frame: the server must fail with 1002, but its close frame does not fit
    // the 8-byte pipe until the client reads.
    client_io.write_all(&[0x81, 0x01, b'x']).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), socket.recv())
            .await
            .is_err(),
        "blocked on the write"
    );
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        client_io.read_to_end(&mut seen).await.unwrap();
        seen
    });
    let error = socket.recv().await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::Protocol(switchboard_net::wire::ProtocolError::UnmaskedFrame)
        ),
        "{error:?}"
    );
    let seen = reader.await.unwrap();
    assert_eq!(
        &seen[..4],
        &[0x88, seen[1], 0x03, 0xea],
        "a close frame with 1002"
    );
    assert_eq!(socket.recv().await.unwrap(), None);
}

#[tokio::test]
async fn large_messages_go_out_in_place_and_in_order_through_partial_writes() {
    use switchboard_net::wire::Connection;
    use switchboard_net::WebSocket;

    // A 64-byte pipe: every write is partial, vectored ones included.
    let (server_end, client_end) = tokio::io::duplex(64);
    let config = Config::default()
        .with_deflate(None)
        .with_ping_interval(None);
    let mut server = WebSocket::server(server_end, &[], config.clone(), None);
    let client_conn = Connection::client(config.wire.clone(), [7; 32]);
    let mut client = WebSocket::from_upgraded(client_end, client_conn, &[], config);
    let messages = vec![
        Message::Text("small first".into()),
        Message::Binary(
            (0..100_000u32)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<_>>()
                .into(),
        ),
        Message::Text("small between".into()),
        Message::Text("é".repeat(10_000).into()),
        Message::Binary(vec![7u8; 5000].into()),
        Message::Text("small last".into()),
    ];
    let sent = messages.clone();
    let sender = tokio::spawn(async move {
        for message in &sent {
            server.feed(message).await.unwrap();
        }
        server
            .start_close(Some(CloseFrame::new(CloseCode::NORMAL, "")))
            .await
            .unwrap();
        while server.recv().await.unwrap().is_some() {}
    });
    let mut received = Vec::new();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), client.recv())
        .await
        .unwrap()
        .unwrap()
    {
        received.push(message);
    }
    assert_eq!(received, messages);
    assert_eq!(client.peer_close().map(|f| f.code), Some(CloseCode::NORMAL));
    sender.await.unwrap();
}
