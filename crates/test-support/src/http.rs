//! One plain HTTP/1.1 request per connection, its answer read whole.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `method path` with `headers` (each line ending in `\r\n`) and a JSON `body`;
/// the status and the body read as JSON (`Null` when it is not JSON). `None` when the
/// server cannot be reached or does not answer within 10 s.
pub async fn request(
    address: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<&Value>,
) -> Option<(u16, Value)> {
    let (status, body) = raw(address, method, path, headers, body).await?;
    Some((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

/// Like [`request`], with the body as text.
pub async fn raw(
    address: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<&Value>,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .ok()?
        .ok()?;
    let status = answer.get(9..12)?.parse().ok()?;
    let (_, body) = answer.split_once("\r\n\r\n")?;
    Some((status, body.to_owned()))
}

/// `GET path`, its status and JSON body; panics when there is no answer.
pub async fn get(address: &str, path: &str) -> (u16, Value) {
    request(address, "GET", path, "", None)
        .await
        .unwrap_or_else(|| panic!("no answer to GET {path} from {address}"))
}

/// `POST path` with a JSON body, its status and JSON body; panics when there is no
/// answer.
pub async fn post(address: &str, path: &str, body: &Value) -> (u16, Value) {
    request(address, "POST", path, "", Some(body))
        .await
        .unwrap_or_else(|| panic!("no answer to POST {path} from {address}"))
}

/// Sends `prefix` (a PROXY header, or nothing) and a WebSocket upgrade of `/echo` with
/// `headers` (each line ending in `\r\n`) on `stream`, and reads the answer: its status
/// and its text (for a refusal, with the body its `Content-Length` gives). The stream
/// stays open: a WebSocket holds its client's places under the limits.
pub async fn upgrade_echo(stream: &mut TcpStream, prefix: &[u8], headers: &str) -> (u16, String) {
    let request = format!(
        "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    stream
        .write_all(&[prefix, request.as_bytes()].concat())
        .await
        .expect("sent");
    // Byte by byte: nothing of what follows the head is taken from the stream.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => answer.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&answer).into_owned();
    let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut text = head.clone();
    if status != 101 {
        let length = head
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|n| n.trim().parse::<usize>().expect("a length"))
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.expect("the body");
        text.push_str(&String::from_utf8_lossy(&body));
    }
    (status, text)
}
