//! Rooms over real WebSocket connections to a real server on port 0.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_net::{connect, ClientOptions, CloseCode, Message};
use switchboard_server::Config;
use switchboard_test_support::room::Room;
use tokio::net::TcpStream;

mod support;
use support::Server;

impl Server {
    /// Opens a room connection; its first event, the welcome, is still to be read.
    async fn open(&self, room: &str, query: &str) -> Room {
        Room::open(&format!("ws://{}/room/{room}?{query}", self.address)).await
    }

    async fn join(&self, room: &str, query: &str) -> Room {
        Room::join(&format!("ws://{}/room/{room}?{query}", self.address))
            .await
            .0
    }
}

#[tokio::test]
async fn two_users_chat_with_presence_and_typing() {
    let server = Server::start(Config::default()).await;
    let mut alice = server.join("lobby", "name=Alice").await;
    let mut bob = server.join("lobby", "name=Bob").await;
    assert_eq!(alice.next().await, json!({"type": "join", "user": "Bob"}));

    alice.send(json!({"type": "message", "text": "Hello!", "timestamp": "2026-11-23T10:00:00Z", "nonce": "c-1", "from": "Mallory"})).await;
    for client in [&mut alice, &mut bob] {
        let m = client.next().await;
        assert_eq!(
            (m["type"].as_str(), m["id"].as_u64(), m["from"].as_str()),
            (Some("message"), Some(1), Some("Alice")),
            "{m}"
        );
        assert_eq!(
            (m["room"].as_str(), m["text"].as_str(), m["nonce"].as_str()),
            (Some("lobby"), Some("Hello!"), Some("c-1"))
        );
        assert!(m["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(bob.say("Hi Alice").await, 2);
    assert_eq!(alice.next().await["text"], "Hi Alice");

    // Typing goes to the others only.
    bob.send(json!({"type": "typing", "isTyping": true})).await;
    assert_eq!(
        alice.next().await,
        json!({"type": "typing", "user": "Bob", "isTyping": true})
    );
    // Alice's next event is her own message, not Bob's typing echoed to him.
    assert_eq!(alice.say("still here").await, 3);
    assert_eq!(bob.next().await["text"], "still here");

    // A second tab of Bob's is not a new member; closing one of two is not a leave.
    let mut bob_tab = server.join("lobby", "name=Bob").await;
    bob_tab.socket.close(None).await.unwrap();
    bob.socket.close(None).await.unwrap();
    // Bob was still "typing": that stops first, then he leaves.
    assert_eq!(alice.next().await["isTyping"], false);
    assert_eq!(alice.next().await, json!({"type": "leave", "user": "Bob"}));
    alice.socket.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_error_events_and_the_connection_stays() {
    let server = Server::start(Config::default()).await;
    let mut alice = server.join("r1", "name=Alice").await;
    alice.socket.send_text("{not json").await.unwrap();
    assert_eq!(alice.next().await["code"], "bad_json");
    alice.send(json!({"type": "dance"})).await;
    assert_eq!(alice.next().await["code"], "unknown_type");
    alice
        .send(json!({"type": "message", "text": "x".repeat(5000)}))
        .await;
    assert_eq!(alice.next().await["code"], "too_long");
    assert_eq!(alice.say("still connected").await, 1);

    // A message over the room's 64 KiB limit closes with 1009.
    alice
        .socket
        .send_text(&"y".repeat(70 * 1024))
        .await
        .unwrap();
    assert_eq!(alice.socket.recv().await.unwrap(), None);
    assert_eq!(
        alice.socket.peer_close().map(|f| f.code),
        Some(CloseCode::TOO_BIG)
    );

    // Refused at the handshake: bad room id, missing name, bad since.
    for path in [
        "room/bad%20room?name=a",
        "room/ok",
        "room/ok?name=a&since=x",
    ] {
        let url = format!("ws://{}/{path}", server.address);
        let error = connect(&url, ClientOptions::default()).await.unwrap_err();
        assert!(error.to_string().contains("400"), "{path}: {error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn binary_frames_are_relayed_to_the_others() {
    let server = Server::start(Config::default()).await;
    let mut alice = server.join("bin", "name=Alice").await;
    let mut bob = server.join("bin", "name=Bob").await;
    assert_eq!(alice.next().await["type"], "join");
    alice
        .socket
        .send(&Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), bob.socket.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, Some(Message::Binary(vec![1, 2, 3].into())));
    // Not back to the sender: its next event is its own chat message.
    assert_eq!(alice.say("after binary").await, 1);
    server.stop().await;
}

#[tokio::test]
async fn resume_with_since_misses_nothing_while_others_send() {
    // Senders here go faster than the default rate limit allows.
    let server = Server::start(Config::default().with_rate_limit(1e6, 1_000_000)).await;
    let mut writer = server.join("resume", "name=Writer").await;
    for i in 1..=20 {
        assert_eq!(writer.say(&format!("m{i}")).await, i);
    }
    // A third client keeps sending while the reader reconnects from id 5.
    let address = server.address;
    let background = tokio::spawn(async move {
        let url = format!("ws://{address}/room/resume?name=Chatty");
        let mut chatty = connect(&url, ClientOptions::default())
            .await
            .unwrap()
            .socket;
        for i in 0..200 {
            let text = json!({"type": "message", "text": format!("c{i}")});
            chatty.send_text(&text.to_string()).await.unwrap();
        }
        chatty
    });
    let mut reader = server.join("resume", "name=Reader&since=5").await;
    let mut ids = Vec::new();
    while ids.len() < 215 {
        let event = reader.next_of("message").await;
        ids.push(event["id"].as_u64().unwrap());
    }
    assert_eq!(ids, (6..=220).collect::<Vec<_>>());
    let mut chatty = background.await.unwrap();
    chatty.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn history_survives_a_restart_and_nonces_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = || Config::default().with_data_dir(Some(dir.path().to_path_buf()));
    let server = Server::start(config()).await;
    let mut alice = server.join("durable", "name=Alice").await;
    for i in 1..=3 {
        alice.say(&format!("before {i}")).await;
    }
    // A retry with the same nonce is stored once and acknowledged again.
    for _ in 0..2 {
        alice
            .send(json!({"type": "message", "text": "retried", "nonce": "n-42"}))
            .await;
        let ack = alice.next_of("message").await;
        assert_eq!(
            (ack["id"].as_u64(), ack["nonce"].as_str()),
            (Some(4), Some("n-42"))
        );
    }
    alice.socket.close(None).await.unwrap();
    server.stop().await;

    let server = Server::start(config()).await;
    let mut bob = server.open("durable", "name=Bob").await;
    let welcome = bob.next().await;
    assert_eq!(welcome["lastId"], 4);
    let history: Vec<String> = [(); 4].iter().map(|_| String::new()).collect();
    let mut texts = history;
    for text in texts.iter_mut() {
        *text = bob.next().await["text"].as_str().unwrap().to_owned();
    }
    assert_eq!(texts, ["before 1", "before 2", "before 3", "retried"]);
    // The retry after the restart is still recognised.
    bob.send(json!({"type": "message", "text": "new"})).await;
    assert_eq!(bob.next_of("message").await["id"], 5);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_4008_and_others_are_unaffected() {
    let server = Server::start(
        Config::default()
            .with_outbound_queue(8)
            .with_rate_limit(1e6, 1_000_000),
    )
    .await;
    // The slow client joins but never reads; its socket buffers fill, then its queue.
    let url = format!("ws://{}/room/flood?name=Slow", server.address);
    // Uncompressed, so its socket buffers fill up quickly.
    let mut options = ClientOptions::default();
    options.config = options.config.with_deflate(None);
    let mut slow = connect(&url, options).await.unwrap().socket;
    let mut fast = server.join("flood", "name=Fast").await;
    let big = "z".repeat(4000);
    let mut last = 0;
    for _ in 0..4000 {
        last = fast.say(&big).await;
    }
    assert_eq!(last, 4000);
    // Now the slow client reads: what it gets ends with a 4008 close.
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match slow.recv().await {
                Ok(Some(_)) => continue,
                Ok(None) => return slow.peer_close().map(|f| f.code),
                Err(error) => panic!("{error}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(closed, Some(switchboard_server::SLOW_CONSUMER));
    server.stop().await;
}

#[tokio::test]
async fn shutdown_says_1001_to_room_members() {
    let server = Server::start(Config::default()).await;
    let mut alice = server.join("bye", "name=Alice").await;
    let stopping = tokio::spawn(server.stop());
    assert_eq!(alice.socket.recv().await.unwrap(), None);
    assert_eq!(
        alice.socket.peer_close().map(|f| f.code),
        Some(CloseCode::GOING_AWAY)
    );
    stopping.await.unwrap();
}

/// A plain HTTP/1.1 call; returns the status and the JSON body.
async fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<Value>,
) -> (u16, Value) {
    switchboard_test_support::http::request(
        &address.to_string(),
        method,
        path,
        headers,
        body.as_ref(),
    )
    .await
    .expect("an answer")
}

#[tokio::test]
async fn the_http_api_posts_and_reads() {
    let server = Server::start(Config::default()).await;
    let a = server.address;
    let mut alice = server.join("prices", "name=Alice").await;

    let (status, body) = http(
        a,
        "POST",
        "/api/rooms/prices/messages",
        "",
        Some(json!({"from": "ticker", "text": "BTC 100k", "nonce": "t-1"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (
            body["message"]["id"].as_u64(),
            body["message"]["from"].as_str()
        ),
        (Some(1), Some("ticker"))
    );
    let pushed = alice.next_of("message").await;
    assert_eq!(pushed["text"], "BTC 100k");

    // A retry with the nonce is answered with the stored message, stored once.
    let (status, body) = http(
        a,
        "POST",
        "/api/rooms/prices/messages",
        "",
        Some(json!({"from": "ticker", "text": "BTC 100k", "nonce": "t-1"})),
    )
    .await;
    assert_eq!((status, body["message"]["id"].as_u64()), (200, Some(1)));
    let (status, body) = http(
        a,
        "GET",
        "/api/rooms/prices/messages?since=0&limit=10",
        "",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);

    let (_, body) = http(a, "GET", "/api/rooms/prices/members", "", None).await;
    assert_eq!(body, json!({"members": ["Alice"]}));
    let (_, body) = http(a, "GET", "/api/rooms", "", None).await;
    assert_eq!(body, json!({"rooms": [{"room": "prices", "members": 1}]}));

    // Without `from` it is the server's own publication (the issue that brought `data`
    // made `from` optional); without `text` and `data` there is nothing to publish.
    let (status, body) = http(
        a,
        "POST",
        "/api/rooms/prices/messages",
        "",
        Some(json!({"text": "no sender"})),
    )
    .await;
    assert_eq!(status, 201);
    assert!(body["message"].get("from").is_none(), "{body}");
    let (status, _) = http(
        a,
        "POST",
        "/api/rooms/prices/messages",
        "",
        Some(json!({"from": "bot"})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = http(a, "GET", "/api/rooms/prices/messages?since=soon", "", None).await;
    assert_eq!(status, 400);
    alice.socket.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn the_http_api_wants_its_key_when_configured() {
    let server = Server::start(Config::default().with_api_key(Some("s3cret".into()))).await;
    let a = server.address;
    let body = || Some(json!({"from": "bot", "text": "hi"}));
    assert_eq!(
        http(a, "POST", "/api/rooms/r/messages", "", body()).await.0,
        401
    );
    assert_eq!(
        http(
            a,
            "POST",
            "/api/rooms/r/messages",
            "Authorization: Bearer wrong\r\n",
            body()
        )
        .await
        .0,
        401
    );
    assert_eq!(
        http(
            a,
            "POST",
            "/api/rooms/r/messages",
            "Authorization: Bearer s3cret\r\n",
            body()
        )
        .await
        .0,
        201
    );
    assert_eq!(
        http(a, "GET", "/api/rooms", "X-Api-Key: s3cret\r\n", None)
            .await
            .0,
        200
    );
    assert_eq!(http(a, "GET", "/api/rooms", "", None).await.0, 401);
    server.stop().await;
}

#[tokio::test]
async fn the_rate_limit_answers_with_errors_then_closes_with_1008() {
    let mut config = Config::default().with_rate_limit(0.5, 3);
    config.rate_limit_strikes = 5;
    let server = Server::start(config).await;
    // The welcome announces the limits, so well-behaved clients can keep under them.
    let mut watcher = server.open("spam", "name=Watcher").await;
    let welcome = watcher.next().await;
    assert_eq!(
        welcome["limits"],
        json!({"eventsPerSec": 0.5, "burst": 3, "maxTextChars": 4096})
    );
    let mut spammer = server.join("spam", "name=Spammer").await;
    for i in 1..=3 {
        assert_eq!(spammer.say(&format!("ok {i}")).await, i);
    }
    spammer
        .send(json!({"type": "message", "text": "one too many", "nonce": "n-4"}))
        .await;
    let refused = spammer.next().await;
    assert_eq!(refused["code"], "rate_limited");
    // The refusal names the message, so its sender can send it again later.
    assert_eq!(refused["nonce"], "n-4");
    for _ in 0..10 {
        // The server may already have closed; later sends can fail.
        if spammer
            .socket
            .send_text(&json!({"type": "typing", "isTyping": true}).to_string())
            .await
            .is_err()
        {
            break;
        }
    }
    let code = loop {
        match spammer.socket.recv().await {
            Ok(Some(_)) => continue,
            Ok(None) => break spammer.socket.peer_close().map(|f| f.code),
            Err(error) => panic!("{error}"),
        }
    };
    assert_eq!(code, Some(CloseCode::POLICY));
    // Nothing refused was stored.
    let (_, body) = http(server.address, "GET", "/api/rooms/spam/messages", "", None).await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let config = Config::default().with_allowed_origins(vec!["https://chat.example".into()]);
    let server = Server::start(config).await;
    let url = format!("ws://{}/room/o?name=a", server.address);
    let with_origin = |origin: &str| {
        let mut options = ClientOptions::default();
        options.origin = Some(origin.to_owned());
        options
    };
    let refused = connect(&url, with_origin("https://evil.example"))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
    let mut allowed = connect(&url, with_origin("https://chat.example"))
        .await
        .unwrap()
        .socket;
    allowed.close(None).await.unwrap();
    // Clients that send no Origin are not browsers and are not limited.
    let mut plain = connect(&url, ClientOptions::default())
        .await
        .unwrap()
        .socket;
    plain.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn metrics_count_connections_messages_and_failures() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(Config::default()).await;
    let mut alice = server.join("metered", "name=Alice").await;
    alice.say("counted").await;
    let bad = format!("ws://{}/room/metered", server.address);
    assert!(connect(&bad, ClientOptions::default()).await.is_err());
    let refused = connect(
        &format!("ws://{}/nowhere", server.address),
        ClientOptions::default(),
    )
    .await;
    assert!(refused.is_err());
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut plain = String::new();
    stream.read_to_string(&mut plain).await.unwrap();

    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let value = |name: &str| -> f64 {
        answer
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{answer}"))
    };
    // Counters are process-wide (other tests' servers add to them): check lower bounds.
    assert!(value("switchboard_connections_total") >= 1.0);
    assert!(value("switchboard_messages_stored_total") >= 1.0);
    assert!(value("switchboard_messages_delivered_total") >= 1.0);
    assert!(value("switchboard_bytes_received_total") >= 1.0);
    assert!(value("switchboard_bytes_sent_total") >= 1.0);
    assert!(value("switchboard_handshake_failures_total{reason=\"not_upgrade\"}") >= 1.0);
    assert!(
        answer.contains("switchboard_history_write_seconds"),
        "{answer}"
    );
    assert!(answer.contains("switchboard_rooms"), "{answer}");
    alice.socket.close(None).await.unwrap();
    server.stop().await;
}

fn token(
    claims: Value,
    key: &jsonwebtoken::EncodingKey,
    algorithm: jsonwebtoken::Algorithm,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, key).unwrap()
}

fn in_an_hour() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

#[tokio::test]
async fn hs256_tokens_set_the_name_and_bad_ones_are_refused() {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let server = Server::start(
        Config::default()
            .with_jwt_secret(Some("room-secret".into()))
            .with_api_key(Some("api".into())),
    )
    .await;
    let good = EncodingKey::from_secret(b"room-secret");
    let alice = token(
        json!({"sub": "u-1", "name": "Alice", "exp": in_an_hour()}),
        &good,
        Algorithm::HS256,
    );
    // The token names the user; ?name= cannot override it.
    let mut client = server
        .join("secure", &format!("token={alice}&name=Mallory"))
        .await;
    client
        .send(json!({"type": "message", "text": "signed"}))
        .await;
    assert_eq!(client.next_of("message").await["from"], "Alice");

    // The bearer header works too, and a `rooms` claim limits where the token goes.
    let url = format!("ws://{}/room/secure", server.address);
    let limited = token(
        json!({"name": "Bob", "rooms": ["other"], "exp": in_an_hour()}),
        &good,
        Algorithm::HS256,
    );
    let options =
        ClientOptions::default().with_header("Authorization", format!("Bearer {limited}"));
    let refused = connect(&url, options).await.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");

    let forged = token(
        json!({"name": "Alice", "exp": in_an_hour()}),
        &EncodingKey::from_secret(b"guess"),
        Algorithm::HS256,
    );
    let expired = token(
        json!({"name": "Alice", "exp": 1_000_000}),
        &good,
        Algorithm::HS256,
    );
    for (query, status) in [
        (format!("token={forged}"), "403"),
        (format!("token={expired}"), "403"),
        ("name=Alice".to_owned(), "401"),
    ] {
        let error = connect(&format!("{url}?{query}"), ClientOptions::default())
            .await
            .unwrap_err();
        assert!(error.to_string().contains(status), "{query}: {error}");
    }
    client.socket.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn rs256_tokens_are_checked_against_the_public_key() {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("private.pem");
    let public = dir.path().join("public.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is needed to make a test key");
    assert!(made.success());
    let exported = std::process::Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap();
    assert!(exported.success());
    let server = Server::start(
        Config::default()
            .with_jwt_public_key_file(Some(public))
            .with_api_key(Some("api".into())),
    )
    .await;
    let key = EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap();
    let carol = token(
        json!({"sub": "Carol", "exp": in_an_hour()}),
        &key,
        Algorithm::RS256,
    );
    let mut client = server.join("rsa", &format!("token={carol}")).await;
    assert_eq!(client.say("rsa signed").await, 1);
    // An HS256 token is not accepted where RS256 is configured.
    let hs = token(
        json!({"sub": "Carol", "exp": in_an_hour()}),
        &EncodingKey::from_secret(b"x"),
        Algorithm::HS256,
    );
    let error = connect(
        &format!("ws://{}/room/rsa?token={hs}", server.address),
        ClientOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("403"), "{error}");
    client.socket.close(None).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn typing_expires_and_stops_when_the_typist_leaves() {
    let mut config = Config::default();
    config.typing_expiry_ms = 300;
    let server = Server::start(config).await;
    let mut alice = server.join("typing", "name=Alice").await;
    let mut bob = server.join("typing", "name=Bob").await;
    assert_eq!(alice.next().await["type"], "join");

    bob.send(json!({"type": "typing", "isTyping": true})).await;
    assert_eq!(
        alice.next().await,
        json!({"type": "typing", "user": "Bob", "isTyping": true})
    );
    // Not refreshed: the server says Bob stopped.
    assert_eq!(
        alice.next().await,
        json!({"type": "typing", "user": "Bob", "isTyping": false})
    );

    bob.send(json!({"type": "typing", "isTyping": true})).await;
    assert_eq!(alice.next().await["isTyping"], true);
    bob.socket.close(None).await.unwrap();
    assert_eq!(
        alice.next().await,
        json!({"type": "typing", "user": "Bob", "isTyping": false})
    );
    assert_eq!(alice.next().await, json!({"type": "leave", "user": "Bob"}));
    alice.socket.close(None).await.unwrap();
    server.stop().await;
}
