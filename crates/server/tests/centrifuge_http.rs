//! The Centrifugo door without WebSocket: `/connection/http_stream` (JSON lines or
//! Protobuf length-delimited) and `/connection/sse` carry the replies, `/emulation`
//! carries the commands after connect, and what `/emulation` answers when it cannot
//! deliver. (centrifuge-js itself runs over them in scripts/sdk/centrifuge-http.test.mjs.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use switchboard_protocol::centrifuge::{
    encode_command, encode_emulation, Command, EmulationRequest, Encoding, PublishRequest,
    SubscribeRequest,
};
use switchboard_server::Config;
use switchboard_test_support::centrifuge::{post_emulation, Centrifuge, HttpStream};
use switchboard_test_support::http;

mod support;
use support::Server;

const SECRET: &str = "centrifuge-http-secret";
const API_KEY: &str = "centrifuge-http-api-key";

/// The three transports: http_stream in either encoding, and SSE (JSON only).
const TRANSPORTS: [(Encoding, bool); 3] = [
    (Encoding::Json, false),
    (Encoding::Protobuf, false),
    (Encoding::Json, true),
];

fn config(extra: Value) -> Config {
    let mut settings = json!({"jwt_secret": SECRET, "api_key": API_KEY});
    for (key, value) in extra.as_object().expect("an object") {
        settings[key] = value.clone();
    }
    serde_json::from_value(settings).expect("a valid config")
}

fn token(user: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn subscribe(channel: &str) -> Command {
    Command {
        subscribe: Some(SubscribeRequest {
            channel: channel.into(),
            ..SubscribeRequest::default()
        }),
        ..Command::default()
    }
}

fn publish(channel: &str, data: &Value) -> Command {
    Command {
        publish: Some(PublishRequest {
            channel: channel.into(),
            data: data.to_string().into_bytes(),
        }),
        ..Command::default()
    }
}

async fn api_publish(server: &Server, channel: &str, data: Value) {
    let headers = format!("X-API-Key: {API_KEY}\r\n");
    let body = json!({"channel": channel, "data": data});
    let (status, answer) = http::request(
        &server.address.to_string(),
        "POST",
        "/api/publish",
        &headers,
        Some(&body),
    )
    .await
    .expect("an answer");
    assert_eq!(status, 200, "{answer}");
}

fn name((encoding, sse): (Encoding, bool)) -> String {
    let transport = if sse { "sse" } else { "http_stream" };
    format!("{transport} {encoding:?}")
}

#[tokio::test]
async fn over_each_http_transport_a_session_subscribes_publishes_and_is_heard() {
    let server = Server::start(config(json!({}))).await;
    let address = server.address.to_string();
    let (mut watcher, _) = Centrifuge::connect(
        &server.url("/connection/websocket"),
        Encoding::Json,
        &token("watcher"),
    )
    .await;
    watcher.call(subscribe("lobby")).await;
    let mut offset = 0;
    for transport in TRANSPORTS {
        let what = name(transport);
        let (encoding, sse) = transport;
        let (mut client, reply) =
            Centrifuge::connect_over_http(&address, encoding, sse, &token("ann")).await;
        let result = reply
            .connect
            .clone()
            .unwrap_or_else(|| panic!("{what}: {reply:?}"));
        assert_eq!(result.session.len(), 32, "{what}: a session id {result:?}");
        assert_ne!(
            result.session, result.client,
            "{what}: the session is not the client id"
        );
        assert_eq!(
            result.node.len(),
            16,
            "{what}: the node's address {result:?}"
        );
        assert!(result.pong, "{what}");
        let head = &client.http().unwrap().head;
        let content_type = match (encoding, sse) {
            (_, true) => "text/event-stream; charset=utf-8",
            (Encoding::Json, false) => "application/json",
            (Encoding::Protobuf, false) => "application/octet-stream",
        };
        assert!(
            head.contains(&format!("content-type: {content_type}")),
            "{what}: {head}"
        );
        assert!(head.contains("x-accel-buffering: no"), "{what}: {head}");

        let subscribed = client.call(subscribe("lobby")).await;
        let subscribed = subscribed
            .subscribe
            .clone()
            .unwrap_or_else(|| panic!("{what}: {subscribed:?}"));
        assert!(subscribed.recoverable, "{what}");
        assert_eq!(subscribed.offset, offset, "{what}");

        // Its publication (posted to /emulation) reaches the WebSocket watcher, and the
        // API's reaches it.
        let published = client.call(publish("lobby", &json!({"from": what}))).await;
        assert!(published.error.is_none(), "{what}: {published:?}");
        offset += 1;
        assert_eq!(
            watcher.publication().await,
            ("lobby".to_owned(), offset, json!({"from": what}))
        );
        assert_eq!(client.publication().await.1, offset, "{what}: its own");
        api_publish(&server, "lobby", json!({"api": what})).await;
        offset += 1;
        assert_eq!(
            client.publication().await,
            ("lobby".to_owned(), offset, json!({"api": what})),
            "{what}"
        );
        assert_eq!(watcher.publication().await.1, offset);
    }
}

#[tokio::test]
async fn a_stream_whose_client_sends_no_pongs_is_disconnected_with_3012_on_the_stream() {
    let server = Server::start(config(json!({"ping_interval_secs": 1}))).await;
    for (encoding, sse) in TRANSPORTS {
        let (mut client, _) = Centrifuge::connect_over_http(
            &server.address.to_string(),
            encoding,
            sse,
            &token("quiet"),
        )
        .await;
        let started = std::time::Instant::now();
        assert_eq!(
            client.closed().await,
            (3012, "no pong".to_owned()),
            "{encoding:?} {sse}"
        );
        assert!(client.pings >= 1, "it was pinged first");
        assert!(started.elapsed() < Duration::from_secs(6));
    }
}

#[tokio::test]
async fn a_shutdown_is_a_3001_disconnect_pushed_on_the_stream() {
    let server = Server::start(config(json!({}))).await;
    let (mut client, _) = Centrifuge::connect_over_http(
        &server.address.to_string(),
        Encoding::Json,
        false,
        &token("ann"),
    )
    .await;
    let ((code, reason), ()) = tokio::join!(client.closed(), server.stop());
    assert_eq!((code, &reason[..]), (3001, "shutdown"));
}

#[tokio::test]
async fn emulation_requests_that_cannot_be_delivered_get_a_clear_refusal() {
    let server = Server::start(config(json!({}))).await;
    let address = server.address.to_string();
    let (mut ann, reply) =
        Centrifuge::connect_over_http(&address, Encoding::Json, false, &token("ann")).await;
    let connected = reply.connect.unwrap();
    ann.call(subscribe("lobby")).await;
    let stream = ann.http().unwrap();
    let (session, node) = (stream.session.clone(), stream.node.clone());
    let frame = encode_command(Encoding::Json, &publish("lobby", &json!({"forged": true})));
    let request = |session: &str, node: &str| {
        encode_emulation(
            Encoding::Json,
            &EmulationRequest {
                node: node.to_owned(),
                session: session.to_owned(),
                data: frame.to_vec(),
            },
        )
    };

    // Ann's client id is public (presence shows it): it names no session.
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "the client id as the session",
            request(&connected.client, &node).to_vec(),
            410,
        ),
        (
            "a session nobody has",
            request(&"0".repeat(32), &node).to_vec(),
            410,
        ),
        (
            "a session id of the wrong form",
            request("../../etc", &node).to_vec(),
            400,
        ),
        (
            "a node of the wrong form",
            request(&session, "node-1").to_vec(),
            400,
        ),
        (
            "a node nobody is",
            request(&session, "0123456789abcdef").to_vec(),
            404,
        ),
        ("not JSON", b"{\"session\":".to_vec(), 400),
        ("no data", br#"{"session":"x","node":"y"}"#.to_vec(), 400),
        ("over 64 KiB", vec![b' '; 64 * 1024 + 1], 413),
    ];
    for (what, body, status) in cases {
        let (got, answer) = post_emulation(&address, Encoding::Json, &body).await;
        assert_eq!(got, status, "{what}: {answer}");
    }
    let (got, _) = post_emulation(&address, Encoding::Protobuf, &[0xff, 0xff]).await;
    assert_eq!(got, 400, "Protobuf that is no emulation request");

    // None of it reached Ann's session: the next publication is the API's, offset 1.
    api_publish(&server, "lobby", json!({"api": 1})).await;
    assert_eq!(
        ann.publication().await,
        ("lobby".to_owned(), 1, json!({"api": 1}))
    );

    // A malformed frame for her own session ends it with 3501, as on a WebSocket.
    let (status, _) = ann.http().unwrap().post(Encoding::Json, b"{not json").await;
    assert_eq!(status, 204);
    assert_eq!(ann.closed().await, (3501, "bad request".to_owned()));
    // And once it ended, its session is gone.
    let (status, _) = post_emulation(&address, Encoding::Json, &request(&session, &node)).await;
    assert_eq!(status, 410);
}

#[tokio::test]
async fn opening_requests_without_a_connect_command_are_refused() {
    let server = Server::start(config(json!({}))).await;
    let address = server.address.to_string();
    let (status, _) = http::raw(&address, "GET", "/connection/sse", "", None)
        .await
        .unwrap();
    assert_eq!(status, 400, "SSE without cf_connect");
    let (status, _) = http::raw(&address, "GET", "/connection/http_stream", "", None)
        .await
        .unwrap();
    assert_eq!(status, 405, "http_stream is a POST");
    let (status, _) = http::raw(&address, "OPTIONS", "/emulation", "", None)
        .await
        .unwrap();
    assert_eq!(status, 204, "a browser's preflight");
    // A first frame that is not connect: the session ends with 3501 at once.
    let first = encode_command(Encoding::Json, &subscribe("lobby"));
    let (stream, status) = HttpStream::open(&address, Encoding::Json, false, &first).await;
    assert_eq!(status, 200);
    let mut client = Centrifuge::from_http(stream, Encoding::Json);
    assert_eq!(client.closed().await, (3501, "bad request".to_owned()));
}
