//! A Server-Sent Events stream read over a plain socket: the request goes as HTTP/1.0,
//! so the answer's body is the stream itself, up to the close (no chunked framing).

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One event: its `id`, if it had one, and its `data` read as JSON (`Null` when not).
#[derive(Debug, Clone)]
pub struct Event {
    pub id: Option<String>,
    pub data: Value,
}

#[derive(Debug)]
pub struct EventStream {
    stream: TcpStream,
    buffer: Vec<u8>,
    /// The answer's status.
    pub status: u16,
    /// The answer's head, and for an answer that is not a stream, its body.
    pub head: String,
}

/// Reads an answer's head from `stream`: its status, the head (and for an answer other
/// than 200, its body, read to the close) and what came after the head. Panics after
/// 10 s without a head.
pub async fn read_head(stream: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(
            read > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&buffer)
        );
        buffer.extend_from_slice(&chunk[..read]);
    };
    let mut head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    buffer.drain(..end + 4);
    if status != 200 {
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buffer)).await;
        head.push_str("\r\n\r\n");
        head.push_str(&String::from_utf8_lossy(&buffer));
    }
    (status, head, buffer)
}

impl EventStream {
    /// `GET path` with `Accept: text/event-stream` and `headers` (each line ending in
    /// `\r\n`). For an answer other than 200 the body is read into `head`.
    pub async fn open(address: &str, path: &str, headers: &str) -> Self {
        let mut stream = TcpStream::connect(address).await.expect("the server");
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: x\r\nAccept: text/event-stream\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await.expect("sent");
        let (status, head, buffer) = read_head(&mut stream).await;
        Self {
            stream,
            buffer,
            status,
            head,
        }
    }

    /// The next event with data (comments and `retry` hints are passed over); `None`
    /// when the stream ends. Panics after 10 s without one.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&block).into_owned();
                let mut id = None;
                let mut data: Option<String> = None;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim_start().to_owned());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        let value = value.strip_prefix(' ').unwrap_or(value);
                        match &mut data {
                            Some(data) => {
                                data.push('\n');
                                data.push_str(value);
                            }
                            None => data = Some(value.to_owned()),
                        }
                    }
                }
                if let Some(data) = data {
                    let data = serde_json::from_str(&data).unwrap_or(Value::Null);
                    return Some(Event { id, data });
                }
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("an event within 10 s")
                .ok()?;
            if read == 0 {
                return None;
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// The next event of `kind` (its data's `type`), passing over the others.
    pub async fn next_of(&mut self, kind: &str) -> Event {
        loop {
            let event = self.next().await.expect("the stream goes on");
            if event.data["type"] == kind {
                return event;
            }
        }
    }
}
