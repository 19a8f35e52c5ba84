//! HTTP/2 on the TLS listener: the page, the APIs and WebSockets (RFC 8441, extended
//! CONNECT) on one connection, permessage-deflate included, beside HTTP/1.1 clients of
//! the same listener. (Streams that break the rules are rows of tests/hostile.rs.)

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard_net::wire::deflate::DeflateConfig;
use switchboard_net::{connect, ClientOptions, Message};
use switchboard_server::Config;
use switchboard_test_support::h2::{certificate, H2};

mod support;
use support::Server;

const VERSION: (&str, &str) = ("sec-websocket-version", "13");

fn config(dir: &std::path::Path, extra: Value) -> (Config, std::path::PathBuf) {
    let (cert, key) = certificate(dir);
    let mut settings = json!({"tls_cert": cert, "tls_key": key});
    for (k, v) in extra.as_object().expect("an object") {
        settings[k] = v.clone();
    }
    (
        serde_json::from_value(settings).expect("a valid config"),
        cert,
    )
}

/// The value of the metric line starting with `series`, or 0.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn next_text(socket: &mut switchboard_net::WebSocket<switchboard_net::Stream>) -> String {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.recv())
            .await
            .expect("a message in time")
            .expect("a readable WebSocket")
            .expect("still open");
        if let Message::Text(text) = message {
            return text.as_str().to_owned();
        }
    }
}

#[tokio::test]
async fn the_page_the_api_and_websockets_share_one_http2_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (config, ca) = config(dir.path(), json!({}));
    let server = Server::start(config).await;
    let address = server.address.to_string();
    let mut h2 = H2::connect(&address, &ca).await;

    let (status, page) = h2.request(Method::GET, "/", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<html"), "{page}");
    let (status, body) = h2.request(Method::GET, "/healthz", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));

    // Two room members and an echo, each a stream of the one connection.
    let mut ann = h2
        .websocket("/room/lobby?name=ann", &[VERSION], None)
        .await
        .socket
        .expect("ann's WebSocket");
    assert!(next_text(&mut ann).await.contains(r#""type":"welcome""#));
    let mut bob = h2
        .websocket("/room/lobby?name=bob", &[VERSION], None)
        .await
        .socket
        .expect("bob's WebSocket");
    assert!(next_text(&mut bob).await.contains(r#""type":"welcome""#));
    bob.send_text(r#"{"type":"message","text":"over h2"}"#)
        .await
        .unwrap();
    loop {
        let event: Value = serde_json::from_str(&next_text(&mut ann).await).unwrap();
        if event["type"] == "message" {
            assert_eq!(
                (event["text"].as_str(), event["from"].as_str()),
                (Some("over h2"), Some("bob"))
            );
            break;
        }
    }

    // permessage-deflate over the stream: agreed, and a large compressible message
    // comes back whole.
    let deflate = DeflateConfig::default();
    let opened = h2.websocket("/echo", &[VERSION], Some(&deflate)).await;
    assert_eq!(opened.status, StatusCode::OK);
    let agreed = opened
        .headers
        .get("sec-websocket-extensions")
        .expect("deflate agreed");
    assert!(
        agreed.to_str().unwrap().starts_with("permessage-deflate"),
        "{agreed:?}"
    );
    let mut echo = opened.socket.unwrap();
    let big = "switchboard ".repeat(50_000);
    echo.send_text(&big).await.unwrap();
    assert_eq!(next_text(&mut echo).await, big);
    echo.send(&Message::Binary(vec![7u8; 300_000].into()))
        .await
        .unwrap();
    match echo.recv().await.unwrap().unwrap() {
        Message::Binary(data) => assert_eq!(data.len(), 300_000),
        other => panic!("{other:?}"),
    }

    // An HTTP/1.1 client of the same listener still upgrades as before.
    let tls = switchboard_net::tls::client_config(Some(&ca)).unwrap();
    let url = format!("wss://localhost:{}/echo", server.address.port());
    let mut options = ClientOptions::default().with_tls(tls);
    options.connect_timeout = Duration::from_secs(10);
    let mut old = connect(&url, options)
        .await
        .expect("an HTTP/1.1 upgrade")
        .socket;
    old.send_text("over 1.1").await.unwrap();
    assert_eq!(next_text(&mut old).await, "over 1.1");

    let (_, metrics) = h2.request(Method::GET, "/metrics", "").await;
    let over = |http: &str| {
        metric(
            &metrics,
            &format!("switchboard_websocket_connections_total{{http=\"{http}\"}}"),
        )
    };
    assert_eq!(over("2"), 3.0, "{metrics}");
    assert_eq!(over("1.1"), 1.0, "{metrics}");
    assert!(
        metric(
            &metrics,
            "switchboard_http_connections_total{version=\"2\"}"
        ) >= 1.0
    );
    drop((ann, bob, echo, old));
    server.stop().await;
}
