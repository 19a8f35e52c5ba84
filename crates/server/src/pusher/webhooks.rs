//! Webhooks: the engine's hooks (see `switchboard_engine::hooks`) sent to each app's
//! webhook URLs in Pusher's format, for every door's channels: `{"time_ms", "events":
//! [...]}` with `X-Pusher-Key`, `X-Pusher-Signature` (the HMAC-SHA256 hex of the body
//! with the app's secret) and `Content-Type: application/json`.
//!
//! One task per node takes due hooks in batches (up to [`IN_FLIGHT`] batches at once),
//! groups them by app and URL (keeping the events each URL asked for), and posts each
//! group until it is answered with a 2xx, retrying with a doubling backoff up to
//! [`ATTEMPTS`] times while it keeps the hooks' lease. Only then are the hooks done
//! with: a node that dies before leaves them to another node (in a cluster their queue
//! is in Redis).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use switchboard_engine::hooks::Taken;
use switchboard_engine::{Engine, HookKind};
use switchboard_protocol::pusher as proto;
use tracing::{debug, info, warn};

use super::{App, Apps};
use crate::shutdown::Shutdown;

/// Hooks taken at a time (one batch: at most one request per app and URL).
const BATCH: usize = 100;

/// How long a taken batch is held before another node may take it, renewed while it is
/// being retried.
const LEASE: Duration = Duration::from_secs(60);

/// Tries per request before it is given up (logged and counted).
pub(crate) const ATTEMPTS: u32 = 8;

/// The first retry's wait; each next one doubles it.
const BACKOFF: Duration = Duration::from_millis(500);

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an idle sender looks for due hooks.
const POLL: Duration = Duration::from_millis(200);

/// Whether any app has webhooks (hooks are recorded only then).
pub(crate) fn wanted(apps: &Apps) -> bool {
    apps.apps.iter().any(|app| !app.config.webhooks.is_empty())
}

/// How long a removal or vacancy of an engine channel waits: its app's delay.
pub(crate) fn leave_delay(apps: &Arc<Apps>) -> impl Fn(&str) -> Duration + Send + Sync + 'static {
    let apps = apps.clone();
    move |channel: &str| {
        let app = match channel.split_once('~') {
            Some((id, _)) => apps.by_id(id),
            None => apps.apps.first(),
        };
        Duration::from_millis(app.map_or(0, |a| a.config.webhook_leave_delay_ms))
    }
}

/// The app an engine channel's hook belongs to, and the channel's name in it. The
/// first app's are every door's channels (a room's name is kept as it is, `#ID` is
/// `#server-to-user-ID`).
fn app_of<'a>(apps: &'a Apps, engine: &str) -> Option<(&'a Arc<App>, String)> {
    let (app, name) = match engine.split_once('~') {
        Some((id, name)) => (apps.by_id(id)?, name),
        None => (apps.apps.first()?, engine),
    };
    let name = match name.strip_prefix('#') {
        Some(user) => format!("{}{user}", proto::USER_CHANNEL_PREFIX),
        None => name.to_owned(),
    };
    Some((app, name))
}

/// A hook as a webhook's event.
fn event_of(taken: &Taken, channel: &str) -> Value {
    let hook = &taken.hook;
    let mut event = json!({ "name": hook.kind.name(), "channel": channel });
    if let Some(user) = &hook.user {
        event["user_id"] = user.clone().into();
    }
    if let Some(detail) = &hook.detail {
        if let Ok(Value::Object(detail)) = serde_json::from_str::<Value>(detail.get()) {
            for (key, value) in detail {
                event[key] = value;
            }
        }
    }
    event
}

/// Batches sent at once: a receiver that does not answer holds up its own batches'
/// retries, not every other webhook.
const IN_FLIGHT: usize = 8;

/// Runs until shutdown: takes due hooks and sends them.
pub(crate) async fn run(engine: Engine, apps: Arc<Apps>, shutdown: Shutdown) {
    let client = Arc::new(Client::new());
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let stopping = shutdown.stopping();
    tokio::pin!(stopping);
    loop {
        let permit = tokio::select! {
            () = &mut stopping => return,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore stays open"),
        };
        let taken = tokio::select! {
            () = &mut stopping => return,
            taken = engine.take_hooks(BATCH, LEASE) => taken,
        };
        let taken = match taken {
            Ok(taken) => taken,
            Err(cause) => {
                debug!(%cause, "taking hooks failed; trying again");
                Vec::new()
            }
        };
        if let Ok(waiting) = engine.hooks_waiting().await {
            metrics::gauge!("switchboard_webhooks_queue").set(waiting as f64);
        }
        if taken.is_empty() {
            drop(permit);
            tokio::select! {
                () = &mut stopping => return,
                () = tokio::time::sleep(POLL) => {}
            }
            continue;
        }
        let (engine, apps, client, shutdown) = (
            engine.clone(),
            apps.clone(),
            client.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                // The lease runs out; another node (or this one, restarted) sends them.
                () = shutdown.stopping() => return,
                () = send_batch(&client, &engine, &apps, &taken) => {}
            }
            for hook in &taken {
                if let Err(cause) = engine.hook_sent(hook).await {
                    warn!(%cause, "a sent hook could not be marked done; it may be sent again");
                }
            }
        });
    }
}

/// One request: an app's URL and the events it gets.
struct Request<'a> {
    app: &'a Arc<App>,
    url: &'a str,
    events: Vec<Value>,
}

async fn send_batch(client: &Client, engine: &Engine, apps: &Apps, taken: &[Taken]) {
    let mut requests: BTreeMap<(String, usize), Request<'_>> = BTreeMap::new();
    for hook in taken {
        let Some((app, channel)) = app_of(apps, &hook.hook.channel) else {
            continue;
        };
        for (index, webhook) in app.config.webhooks.iter().enumerate() {
            if !takes(webhook, hook.hook.kind) {
                continue;
            }
            requests
                .entry((app.config.id.clone(), index))
                .or_insert_with(|| Request {
                    app,
                    url: &webhook.url,
                    events: Vec::new(),
                })
                .events
                .push(event_of(hook, &channel));
        }
    }
    let sends = requests
        .into_values()
        .map(|request| send(client, engine, taken, request));
    futures_util::future::join_all(sends).await;
}

/// Posts one request until a 2xx, or [`ATTEMPTS`] tries.
async fn send(client: &Client, engine: &Engine, taken: &[Taken], request: Request<'_>) {
    let count = request.events.len();
    let body = serde_json::to_vec(&json!({
        "time_ms": switchboard_engine::hooks::now_ms(),
        "events": request.events,
    }))
    .expect("JSON serializes");
    let signature = proto::sign(&request.app.config.secret, &body);
    let body = Bytes::from(body);
    let app = request.app.config.id.clone();
    let mut wait = BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let outcome = client
            .post(
                request.url,
                &request.app.config.key,
                &signature,
                body.clone(),
            )
            .await;
        match outcome {
            Ok(status) if (200..300).contains(&status) => {
                metrics::counter!("switchboard_webhooks_sent_total", "app" => app.clone())
                    .increment(count as u64);
                return;
            }
            Ok(status) => debug!(url = request.url, status, attempt, "a webhook was refused"),
            Err(cause) => debug!(url = request.url, %cause, attempt, "a webhook was not delivered"),
        }
        if attempt == ATTEMPTS {
            break;
        }
        metrics::counter!("switchboard_webhooks_retried_total", "app" => app.clone()).increment(1);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(30));
        for hook in taken {
            // Still ours while it is retried.
            let _ = engine.keep_hook(hook, LEASE).await;
        }
    }
    metrics::counter!("switchboard_webhooks_failed_total", "app" => app.clone())
        .increment(count as u64);
    warn!(
        url = request.url,
        app,
        events = count,
        attempts = ATTEMPTS,
        "a webhook was given up: its receiver did not answer with a 2xx"
    );
}

/// Posts to `http://` and `https://` URLs, one connection per request.
struct Client {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    fn new() -> Self {
        let tls = match switchboard_net::tls::client_config(None) {
            Ok(tls) => Some(tls),
            Err(cause) => {
                info!(%cause, "https webhooks are off: no root certificates");
                None
            }
        };
        Self { tls }
    }

    /// The status of a POST of `body` to `url`.
    async fn post(
        &self,
        url: &str,
        key: &str,
        signature: &str,
        body: Bytes,
    ) -> Result<u16, String> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(url, key, signature, body))
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    async fn exchange(
        &self,
        url: &str,
        key: &str,
        signature: &str,
        body: Bytes,
    ) -> Result<u16, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("{url} is not a URL"))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or("no host")?.to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let address = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tcp = tokio::net::TcpStream::connect((address.as_str(), port))
            .await
            .map_err(|e| e.to_string())?;
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let request = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("X-Pusher-Key", key)
            .header("X-Pusher-Signature", signature)
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        if https {
            let tls = self.tls.clone().ok_or("no root certificates for https")?;
            let name = rustls::pki_types::ServerName::try_from(address)
                .map_err(|_| "not a TLS server name".to_owned())?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            exchange_on(stream, request).await
        } else {
            exchange_on(tcp, request).await
        }
    }
}

async fn exchange_on<S>(stream: S, request: http::Request<Full<Bytes>>) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    // Read to the end, so the receiver is not cut off mid-answer.
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// The webhook event for a client event, as a hook's detail.
pub(crate) fn client_event_detail(
    event: &str,
    data: &str,
    socket_id: &str,
) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(&json!({
        "event": event,
        "data": data,
        "socket_id": socket_id,
    }))
    .expect("JSON serializes")
}

/// Whether `kind` goes to any webhook of the app of `engine`'s channel.
pub(crate) fn any_wants(apps: &Apps, engine: &str, kind: HookKind) -> bool {
    app_of(apps, engine)
        .is_some_and(|(app, _)| app.config.webhooks.iter().any(|hook| takes(hook, kind)))
}

/// Whether `webhook` asked for `kind` (no `event_types`: every kind).
fn takes(webhook: &crate::config::Webhook, kind: HookKind) -> bool {
    webhook
        .event_types
        .as_ref()
        .map_or(true, |types| types.iter().any(|t| t == kind.name()))
}
