//! A webhook receiver: a plain HTTP/1.1 server on a free port that records each
//! request's headers and JSON body, and answers 500 to the first `failures` of them
//! (then 200).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    /// The body as sent.
    pub body: String,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Debug, Clone)]
pub struct Receiver {
    /// `http://127.0.0.1:PORT/hooks`.
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub async fn start(failures: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut headers = HashMap::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let trimmed = line.trim_end();
                        if trimmed.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = trimmed.split_once(':') {
                            headers
                                .insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
                        }
                    }
                    let length: usize = headers
                        .get("content-length")
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let status = {
                        let mut log = log.lock().unwrap();
                        let status = if log.len() < failures { 500 } else { 200 };
                        log.push(Received {
                            headers,
                            body: String::from_utf8_lossy(&body).into_owned(),
                            status,
                        });
                        status
                    };
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = reader.get_mut().write_all(answer.as_bytes()).await;
                });
            }
        });
        Self { url, received }
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The events of the requests answered 200, in order, as `(name, channel, user_id)`.
    pub fn events(&self) -> Vec<(String, String, Option<String>)> {
        self.received()
            .iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| r.json()["events"].as_array().cloned().unwrap_or_default())
            .map(|e| {
                (
                    e["name"].as_str().unwrap_or_default().to_owned(),
                    e["channel"].as_str().unwrap_or_default().to_owned(),
                    e["user_id"].as_str().map(str::to_owned),
                )
            })
            .collect()
    }

    /// Waits until `check` holds of the events (at most `limit`); the events then.
    pub async fn wait_for(
        &self,
        limit: Duration,
        check: impl Fn(&[(String, String, Option<String>)]) -> bool,
    ) -> Vec<(String, String, Option<String>)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let events = self.events();
            if check(&events) || tokio::time::Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
