//! Switchboard behind a real nginx (Debian's package), configured with the block that
//! docs/DEPLOY.md documents: WebSocket, the room's event stream and the HTTP API pass;
//! with `proxy_read_timeout` cut to 3 s (the server pings after 1 s of quiet, noticed within 2 s), a quiet WebSocket and a quiet event stream live
//! through three times that on the server's pings; and the per-address limit counts the
//! client that nginx names in `X-Forwarded-For` only when nginx is a trusted proxy, while
//! a client's forged header is ignored.
//!
//! Needs nginx (`apt-get install nginx`). Without it the test says so and passes
//! locally; with `CI=true` it fails.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use switchboard_test_support::http;
use switchboard_test_support::room::Room;
use switchboard_test_support::sse::EventStream;
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

/// nginx's `proxy_read_timeout` in these tests.
const READ_TIMEOUT_SECS: u64 = 3;

fn nginx_binary() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
}

/// The first `nginx` block of docs/DEPLOY.md, pointed at `upstream`, listening on
/// `port`, with a short read timeout.
fn documented_config(upstream: &str, port: u16) -> String {
    let deploy =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/DEPLOY.md"))
            .expect("docs/DEPLOY.md");
    let block = deploy
        .split("```nginx\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("an nginx block in docs/DEPLOY.md");
    let mut config = block.to_owned();
    for (documented, here) in [
        (
            "server 127.0.0.1:8080;".to_owned(),
            format!("server {upstream};"),
        ),
        ("listen 80;".to_owned(), format!("listen 127.0.0.1:{port};")),
        (
            "proxy_read_timeout 60s;".to_owned(),
            format!("proxy_read_timeout {READ_TIMEOUT_SECS}s;"),
        ),
    ] {
        assert!(
            config.contains(&documented),
            "docs/DEPLOY.md's block has no `{documented}`"
        );
        config = config.replace(&documented, &here);
    }
    config
}

struct Nginx {
    _child: Child,
    _dir: tempfile::TempDir,
    address: String,
}

/// nginx in the foreground, in a directory of its own, in front of `upstream`.
async fn nginx(binary: &str, upstream: &str) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.path().display().to_string();
    let config = format!(
        "daemon off;\nmaster_process off;\npid {path}/nginx.pid;\nerror_log {path}/error.log info;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {path}/body;\n  proxy_temp_path {path}/proxy;\n\
         fastcgi_temp_path {path}/fastcgi;\n  uwsgi_temp_path {path}/uwsgi;\n  scgi_temp_path {path}/scgi;\n{}\n}}\n",
        documented_config(upstream, port)
    );
    std::fs::write(dir.path().join("nginx.conf"), config).unwrap();
    let child = Command::new(binary)
        .args(["-p", &path, "-c", &format!("{path}/nginx.conf")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting nginx");
    let address = format!("127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&address).await.is_err() {
        let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
        assert!(
            tokio::time::Instant::now() < deadline,
            "nginx did not start: {log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Nginx {
        _child: child,
        _dir: {
            let kept = dir;
            std::mem::forget(kept.path().to_owned());
            kept
        },
        address,
    }
}

/// A server with `settings` in its config file (and `extra` flags).
async fn server(settings: &str, extra: &[&str]) -> (Child, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, settings).unwrap();
    let mut args = vec!["--memory", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (child, address) = support::serve_with("127.0.0.1:0", &args).await;
    (child, address, dir)
}

/// A WebSocket upgrade of `/echo` at `address` from the loopback address `from`, with
/// `headers`; the answer's status, and the connection (a WebSocket holds its place).
async fn upgrade_from(from: [u8; 4], address: &str, headers: &str) -> (u16, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
    let mut stream = socket.connect(address.parse().unwrap()).await.unwrap();
    let (status, _) = http::upgrade_echo(&mut stream, b"", headers).await;
    (status, stream)
}

const LIMITED: &str = "max_connections_per_ip = 2\nhandshakes_per_ip_per_sec = 1000.0\nhandshake_burst_per_ip = 1000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_documented_nginx_everything_passes_and_clients_are_told_apart() {
    let Some(binary) = nginx_binary() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nginx is not installed; CI needs it (apt-get install -y nginx)"
        );
        eprintln!("SKIPPED: nginx is not installed (apt-get install -y nginx)");
        return;
    };

    // WebSocket, the event stream and the HTTP API through nginx, quiet for three of
    // its read timeouts in between.
    let (_open, open_address, _d1) = server(
        "ping_interval_secs = 1\n",
        &["--trusted-proxy", "127.0.0.1"],
    )
    .await;
    let front = nginx(binary, &open_address).await;
    let (mut ann, welcome) =
        Room::join(&format!("ws://{}/room/proxied?name=ann", front.address)).await;
    assert_eq!(welcome["members"], json!(["ann"]));
    let mut bob = EventStream::open(&front.address, "/room/proxied?name=bob", "").await;
    assert_eq!(bob.status, 200, "{}", bob.head);
    assert_eq!(
        bob.next_of("welcome").await.data["members"],
        json!(["ann", "bob"])
    );
    assert_eq!(ann.next_of("join").await["user"], "bob");
    let quiet = Duration::from_secs(3 * READ_TIMEOUT_SECS + 1);
    // Ann's client reads meanwhile (and so answers the server's pings, as any client
    // does), but nothing comes.
    ann.stays_quiet(quiet).await;
    let id = ann.say("after the quiet").await;
    let heard = bob.next_of("message").await;
    assert_eq!(
        (heard.data["id"].as_u64(), heard.data["text"].as_str()),
        (Some(id), Some("after the quiet"))
    );
    let (status, posted) = http::post(
        &front.address,
        "/api/rooms/proxied/messages",
        &json!({"from": "api", "text": "through nginx"}),
    )
    .await;
    assert_eq!(status, 201, "{posted}");
    assert_eq!(ann.next_of("message").await["text"], "through nginx");
    assert_eq!(bob.next_of("message").await.data["text"], "through nginx");
    let (status, members) = http::get(&front.address, "/api/rooms/proxied/members").await;
    assert_eq!(
        (status, &members["members"]),
        (200, &json!(["ann", "bob"])),
        "{members}"
    );

    // nginx trusted: each client has its own two places, whatever it forges.
    let (_trusting, trusting_address, _d2) =
        server(LIMITED, &["--trusted-proxy", "127.0.0.1"]).await;
    let front = nginx(binary, &trusting_address).await;
    let (first, _a) = upgrade_from([127, 0, 0, 2], &front.address, "").await;
    let (second, _b) = upgrade_from(
        [127, 0, 0, 2],
        &front.address,
        "X-Forwarded-For: 203.0.113.9\r\n",
    )
    .await;
    let (third, _) = upgrade_from(
        [127, 0, 0, 2],
        &front.address,
        "X-Forwarded-For: 203.0.113.10\r\n",
    )
    .await;
    assert_eq!(
        (first, second, third),
        (101, 101, 429),
        "the forged headers do not make 127.0.0.2 someone else"
    );
    let (other, _c) = upgrade_from([127, 0, 0, 3], &front.address, "").await;
    let (other_again, _d) = upgrade_from([127, 0, 0, 3], &front.address, "").await;
    assert_eq!(
        (other, other_again),
        (101, 101),
        "127.0.0.3 has places of its own"
    );

    // nginx not trusted: every connection is nginx's own, and one address's two places
    // are all there are.
    let (_wary, wary_address, _d3) = server(LIMITED, &[]).await;
    let front = nginx(binary, &wary_address).await;
    let (first, _e) = upgrade_from([127, 0, 0, 2], &front.address, "").await;
    let (second, _f) = upgrade_from([127, 0, 0, 3], &front.address, "").await;
    let (third, _) = upgrade_from([127, 0, 0, 4], &front.address, "").await;
    assert_eq!((first, second, third), (101, 101, 429));
    // And a client straight at it is itself, whatever header it sends.
    let (direct, _g) = upgrade_from(
        [127, 0, 0, 5],
        &wary_address,
        "X-Forwarded-For: 127.0.0.6\r\n",
    )
    .await;
    let (again, _h) = upgrade_from(
        [127, 0, 0, 5],
        &wary_address,
        "X-Forwarded-For: 127.0.0.7\r\n",
    )
    .await;
    let (over, _) = upgrade_from(
        [127, 0, 0, 5],
        &wary_address,
        "X-Forwarded-For: 127.0.0.8\r\n",
    )
    .await;
    assert_eq!((direct, again, over), (101, 101, 429));
}
