//! A Pusher-protocol connection for tests that look at the wire, and HTTP API requests
//! signed as the Pusher libraries sign them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use switchboard_net::{connect, ClientOptions, Message, Stream, WebSocket};
use switchboard_protocol::pusher::{api_string_to_sign, body_md5, sign};

/// How long a test waits for a message.
const PATIENCE: Duration = Duration::from_secs(10);

/// One connection to `/app/{key}`.
#[derive(Debug)]
pub struct Pusher {
    pub socket: WebSocket<Stream>,
    /// From `pusher:connection_established`.
    pub socket_id: String,
}

/// A message's `data` as JSON: the server sends it as a string of JSON.
pub fn data_of(message: &Value) -> Value {
    match &message["data"] {
        Value::String(text) => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
        }
        other => other.clone(),
    }
}

impl Pusher {
    /// Opens `url` (`ws://HOST/app/KEY?protocol=7`) and reads the connection's socket id.
    pub async fn open(url: &str) -> Self {
        let socket = connect(url, ClientOptions::default())
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
            .socket;
        let mut client = Self {
            socket,
            socket_id: String::new(),
        };
        let established = client.next().await;
        assert_eq!(
            established["event"], "pusher:connection_established",
            "{established}"
        );
        let data = data_of(&established);
        client.socket_id = data["socket_id"].as_str().expect("a socket id").to_owned();
        client
    }

    pub async fn send(&mut self, message: &Value) {
        self.socket.send_text(&message.to_string()).await.unwrap();
    }

    /// The next message.
    pub async fn next(&mut self) -> Value {
        let message = tokio::time::timeout(PATIENCE, self.socket.recv())
            .await
            .expect("a message in time")
            .expect("a readable connection")
            .unwrap_or_else(|| {
                panic!(
                    "the server closed: {:?}",
                    self.socket
                        .peer_close()
                        .map(|f| (f.code.0, f.reason.clone()))
                )
            });
        match message {
            Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
            other => panic!("expected a JSON message, got {other:?}"),
        }
    }

    /// The next message with event `event`, skipping others.
    pub async fn next_of(&mut self, event: &str) -> Value {
        loop {
            let message = self.next().await;
            if message["event"] == event {
                return message;
            }
        }
    }

    /// Sends `pusher:subscribe` and returns the answer (`subscription_succeeded` or
    /// `pusher:error`).
    pub async fn subscribe(
        &mut self,
        channel: &str,
        auth: Option<&str>,
        channel_data: Option<&str>,
    ) -> Value {
        let mut data = json!({ "channel": channel });
        if let Some(auth) = auth {
            data["auth"] = auth.into();
        }
        if let Some(channel_data) = channel_data {
            data["channel_data"] = channel_data.into();
        }
        self.send(&json!({"event": "pusher:subscribe", "data": data}))
            .await;
        loop {
            let answer = self.next().await;
            let event = answer["event"].as_str().unwrap_or_default();
            if event == "pusher:error"
                || (event == "pusher_internal:subscription_succeeded"
                    && answer["channel"] == channel)
            {
                return answer;
            }
        }
    }

    /// Opens `url` and joins presence channel `channel` as `user` (no `user_info`),
    /// signed with the app's `key` and `secret`.
    pub async fn join_presence(
        url: &str,
        key: &str,
        secret: &str,
        channel: &str,
        user: &str,
    ) -> Self {
        let mut client = Self::open(url).await;
        let data = json!({ "user_id": user }).to_string();
        let auth = channel_auth(key, secret, &client.socket_id, channel, Some(&data));
        let ok = client.subscribe(channel, Some(&auth), Some(&data)).await;
        assert_eq!(
            ok["event"], "pusher_internal:subscription_succeeded",
            "{ok}"
        );
        client
    }

    /// Whether nothing arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) -> Result<(), Value> {
        match tokio::time::timeout(wait, self.socket.recv()).await {
            Err(_) => Ok(()),
            Ok(Ok(Some(Message::Text(text)))) => Err(serde_json::from_str(text.as_str()).unwrap()),
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }

    /// Waits until the server closes; its close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(PATIENCE, self.socket.recv()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return self.socket.peer_close().map_or(1005, |f| f.code.0),
                Ok(Err(error)) => panic!("the connection failed instead of closing: {error}"),
                Err(_) => panic!("the server did not close in time"),
            }
        }
    }
}

/// `KEY:SIGNATURE` authorising `socket_id` on `channel` (with `channel_data` on a
/// presence channel).
pub fn channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let mut message = format!("{socket_id}:{channel}");
    if let Some(data) = channel_data {
        message.push(':');
        message.push_str(data);
    }
    format!("{key}:{}", sign(secret, message.as_bytes()))
}

/// `KEY:SIGNATURE` signing `socket_id` in as the user of `user_data`.
pub fn user_auth(key: &str, secret: &str, socket_id: &str, user_data: &str) -> String {
    format!(
        "{key}:{}",
        sign(secret, format!("{socket_id}::user::{user_data}").as_bytes())
    )
}

/// The path and query of an HTTP API request signed with `key` and `secret` at
/// `timestamp` (seconds; `None`: now), with `params` and the body's MD5 when it has one.
pub fn signed_path(
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: Option<&str>,
    key: &str,
    secret: &str,
    timestamp: Option<u64>,
) -> String {
    let timestamp = timestamp.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    });
    let mut all: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    all.push(("auth_key".into(), key.into()));
    all.push(("auth_timestamp".into(), timestamp.to_string()));
    all.push(("auth_version".into(), "1.0".into()));
    if let Some(body) = body {
        all.push(("body_md5".into(), body_md5(body.as_bytes())));
    }
    let signature = sign(secret, api_string_to_sign(method, path, &all).as_bytes());
    all.push(("auth_signature".into(), signature));
    let query: Vec<String> = all
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                v.replace('%', "%25")
                    .replace('#', "%23")
                    .replace('&', "%26")
                    .replace(',', "%2C")
            )
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}
