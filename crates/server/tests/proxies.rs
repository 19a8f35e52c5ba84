//! Behind a proxy: with `trusted_proxies`, the per-address limits count the client a
//! trusted proxy names in `X-Forwarded-For` (or, with `forwarded_header = "forwarded"`,
//! in `Forwarded`; only that one is read), per request once its head is read, and ignore
//! those headers from anyone else; with `proxy_protocol`, they
//! count the client a trusted peer's PROXY header (version 1 or 2) names, a trusted
//! peer without one is refused, and so is a PROXY header from an untrusted address.

use serde_json::json;
use switchboard_server::Config;
use switchboard_test_support::http;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
use support::Server;

fn config(extra: serde_json::Value) -> Config {
    let mut base = json!({
        "max_connections_per_ip": 2,
        "handshakes_per_ip_per_sec": 1000.0,
        "handshake_burst_per_ip": 1000,
        // The tests' raw sockets never answer a Close: shutdown waits only this long.
        "close_timeout_secs": 1,
        "drain_timeout_secs": 1,
    });
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(base).expect("a valid config")
}

/// `http::upgrade_echo` on a new connection to `server`; the connection is kept.
async fn upgrade(server: &Server, prefix: &[u8], headers: &str) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let (status, text) = http::upgrade_echo(&mut stream, prefix, headers).await;
    (status, text, stream)
}

fn v1(source: &str) -> Vec<u8> {
    format!("PROXY TCP4 {source} 127.0.0.1 40000 80\r\n").into_bytes()
}

fn v2(source: [u8; 4]) -> Vec<u8> {
    let mut bytes = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    bytes.extend_from_slice(&[0x21, 0x11, 0, 12]);
    bytes.extend_from_slice(&source);
    bytes.extend_from_slice(&[127, 0, 0, 1, 0x9c, 0x40, 0, 80]);
    bytes
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client_that_the_limits_count() {
    let server = Server::start(config(
        json!({"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}),
    ))
    .await;
    let ann = "X-Forwarded-For: 203.0.113.1\r\n";
    let (first, _, _a) = upgrade(&server, b"", ann).await;
    let (second, _, _b) = upgrade(&server, b"", ann).await;
    let (third, text, _) = upgrade(&server, b"", ann).await;
    assert_eq!((first, second), (101, 101));
    assert_eq!(third, 429, "{text}");
    assert!(
        text.contains("too many open connections from your address"),
        "{text}"
    );
    // Another client behind the same proxy has places of its own, named either way
    // (and the proxy, 127.0.0.1, is not limited as one client: it holds more than two).
    let (bob, text, _c) = upgrade(&server, b"", "X-Forwarded-For: 203.0.113.2\r\n").await;
    assert_eq!(bob, 101, "{text}");
    // Forwarded is not the header this server reads: a client's own is no name.
    let (claimed, _, _) = upgrade(&server, b"", "Forwarded: for=203.0.113.1\r\n").await;
    assert_eq!(claimed, 101, "counted as the proxy, not as Ann");
    // A client's own header on the left is passed over: the proxy's entry on the right
    // (here a second trusted hop, then Ann) decides.
    let (forged, _, _) = upgrade(
        &server,
        b"",
        "X-Forwarded-For: 198.51.100.9, 203.0.113.1, 10.1.2.3\r\n",
    )
    .await;
    assert_eq!(forged, 429);
    server.stop().await;
}

#[tokio::test]
async fn a_proxy_that_writes_forwarded_names_the_client_there() {
    let server = Server::start(config(json!({
        "trusted_proxies": ["127.0.0.1"],
        "forwarded_header": "forwarded",
    })))
    .await;
    let cat = "Forwarded: for=203.0.113.3;proto=http\r\n";
    let (first, _, _a) = upgrade(&server, b"", cat).await;
    let (second, _, _b) = upgrade(&server, b"", cat).await;
    let (third, _, _) = upgrade(&server, b"", cat).await;
    assert_eq!((first, second, third), (101, 101, 429));
    // X-Forwarded-For is then the one a client could have written.
    let (dan, _, _c) = upgrade(
        &server,
        b"",
        "Forwarded: for=\"[2001:db8::1]:80\"\r\nX-Forwarded-For: 203.0.113.3\r\n",
    )
    .await;
    assert_eq!(dan, 101);
    server.stop().await;
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_address_are_ignored() {
    let server = Server::start(config(json!({"trusted_proxies": ["10.0.0.0/8"]}))).await;
    let (first, _, _a) = upgrade(&server, b"", "X-Forwarded-For: 203.0.113.1\r\n").await;
    let (second, _, _b) = upgrade(&server, b"", "X-Forwarded-For: 203.0.113.2\r\n").await;
    let (third, text, _) = upgrade(&server, b"", "Forwarded: for=203.0.113.3\r\n").await;
    assert_eq!((first, second), (101, 101));
    // All three are 127.0.0.1, whatever they claim.
    assert_eq!(third, 429, "{text}");
    server.stop().await;
}

#[tokio::test]
async fn a_proxy_protocol_header_names_the_client_of_a_trusted_peer() {
    let server = Server::start(config(json!({
        "trusted_proxies": ["127.0.0.1"],
        "proxy_protocol": true,
    })))
    .await;
    let (first, _, _a) = upgrade(&server, &v1("203.0.113.1"), "").await;
    let (second, _, _b) = upgrade(&server, &v2([203, 0, 113, 1]), "").await;
    let (third, text, _) = upgrade(&server, &v1("203.0.113.1"), "").await;
    assert_eq!((first, second), (101, 101));
    assert_eq!(third, 429, "{text}");
    let (other, text, _c) = upgrade(&server, &v2([203, 0, 113, 2]), "").await;
    assert_eq!(other, 101, "{text}");
    // A health check of the proxy's own (LOCAL) is served as the proxy.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let (health, text, _) = upgrade(&server, &local, "").await;
    assert_eq!(health, 101, "{text}");
    // Without the header, or with a broken one: 400, saying why.
    let (bare, text, _) = upgrade(&server, b"", "").await;
    assert_eq!(bare, 400, "{text}");
    assert!(
        text.contains("must start with a PROXY protocol header"),
        "{text}"
    );
    let (broken, text, _) = upgrade(&server, b"PROXY TCP4 203.0.113.1 nowhere 1 2\r\n", "").await;
    assert_eq!(broken, 400, "{text}");
    assert!(text.contains("malformed PROXY protocol header"), "{text}");
    // A header cut in two segments is read whole.
    let mut split = TcpStream::connect(server.address).await.unwrap();
    split.write_all(b"PROXY TCP4 203.0.1").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    split
        .write_all(
            b"13.7 127.0.0.1 1 80\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = String::new();
    split.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn a_proxy_protocol_header_from_an_untrusted_address_is_refused() {
    let server = Server::start(config(json!({
        "trusted_proxies": ["10.0.0.0/8"],
        "proxy_protocol": true,
    })))
    .await;
    let (status, text, _) = upgrade(&server, &v1("203.0.113.1"), "").await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not a trusted proxy"), "{text}");
    let (status, text, _) = upgrade(&server, &v2([203, 0, 113, 1]), "").await;
    assert_eq!(status, 400, "{text}");
    // Without one, the connection is its own client.
    let (status, text, _a) = upgrade(&server, b"", "").await;
    assert_eq!(status, 101, "{text}");
    server.stop().await;
}

#[tokio::test]
async fn proxy_settings_that_cannot_work_stop_the_start() {
    for (settings, said) in [
        (
            json!({"proxy_protocol": true}),
            "proxy_protocol needs trusted_proxies",
        ),
        (json!({"trusted_proxies": ["10.0.0.0/40"]}), "prefix length"),
        (
            json!({"trusted_proxies": ["proxy.example"]}),
            "not an address",
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = switchboard_server::run(listener, config(settings), std::future::pending())
            .await
            .expect_err("refused at start");
        assert!(error.to_string().contains(said), "{error}");
    }
}
