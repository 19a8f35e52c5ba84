//! The Pusher door: the Pusher Channels protocol (version 7) at `/app/{key}` and its
//! HTTP API under `/apps/{id}` (docs/PROTOCOL.md), for the apps of `[[apps]]`.
//!
//! Every Pusher channel is an engine channel, so what any door publishes reaches every
//! door's subscribers. The first app's channels are the engine's channels by the same
//! name (`#server-to-user-{id}` is the engine's personal channel `#{id}`); every other
//! app's live under `{id}~`, a prefix no other door can name.
//!
//! - `session.rs`: one connection.
//! - `api.rs`: the HTTP API and its request signing.
//! - `registry.rs`: this node's Pusher connections, by channel and by signed-in user.
//! - `webhooks.rs`: the engine's hooks, sent to each app's webhook URLs.

mod api;
mod registry;
mod session;
pub(crate) mod webhooks;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::response::Response;
use bytes::Bytes;
use serde_json::value::RawValue;
use switchboard_engine::{Format, Publication};
use switchboard_protocol::pusher::{self as proto, USER_CHANNEL_PREFIX};

pub(crate) use api::router;
pub(crate) use registry::{apply_notices, Registry};

use crate::config::{Config, PusherApp};
use crate::serve::AppState;
use crate::upgrade::upgrade;

/// This door's slot in each publication's encoding cache.
const PUSHER: Format = Format(3);

/// An application as the door serves it.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) config: PusherApp,
    /// What its channels' engine names start with: nothing for the first app.
    scope: String,
}

impl App {
    /// Whether its channels are the other doors' too (the first app's).
    pub(crate) fn shares_rooms(&self) -> bool {
        self.scope.is_empty()
    }

    /// The engine channel of this app's `channel`.
    pub(crate) fn engine_channel(&self, channel: &str) -> String {
        match channel.strip_prefix(USER_CHANNEL_PREFIX) {
            Some(user) => format!("{}#{user}", self.scope),
            None => format!("{}{channel}", self.scope),
        }
    }

    /// This app's name for `engine` channel, when it is one of this app's and a name
    /// the protocol allows.
    pub(crate) fn pusher_channel(&self, engine: &str) -> Option<String> {
        let name = engine.strip_prefix(self.scope.as_str())?;
        if self.scope.is_empty() && name.contains('~') {
            return None;
        }
        let name = match name.strip_prefix('#') {
            Some(user) => format!("{USER_CHANNEL_PREFIX}{user}"),
            None => name.to_owned(),
        };
        proto::valid_channel(&name).then_some(name)
    }
}

/// The apps, by key and by id.
#[derive(Debug)]
pub(crate) struct Apps {
    apps: Vec<Arc<App>>,
    by_key: HashMap<String, usize>,
    by_id: HashMap<String, usize>,
}

/// Why `[[apps]]` cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("[[apps]]: {0}")]
pub struct AppsError(String);

impl Apps {
    pub(crate) fn from_config(config: &Config) -> Result<Self, AppsError> {
        let open = config.jwt_secret.is_none()
            && config.jwt_public_key_file.is_none()
            && config.api_key.is_none();
        let configured = match (config.apps.is_empty(), open) {
            // Open mode only: a server that wants tokens or an API key does not serve an
            // app whose secret everyone knows.
            (true, true) => vec![PusherApp::new("1", "app-key", "app-secret")],
            (true, false) => Vec::new(),
            (false, _) => config.apps.clone(),
        };
        let mut apps = Vec::new();
        let mut by_key = HashMap::new();
        let mut by_id = HashMap::new();
        for (index, app) in configured.into_iter().enumerate() {
            if app.id.is_empty() || !app.id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(AppsError(format!(
                    "app id {:?} is not a numeric string (the libraries expect one)",
                    app.id
                )));
            }
            if app.key.is_empty() || app.secret.is_empty() {
                return Err(AppsError(format!(
                    "app {} needs a key and a secret",
                    app.id
                )));
            }
            for hook in &app.webhooks {
                if !hook.url.starts_with("http://") && !hook.url.starts_with("https://") {
                    return Err(AppsError(format!(
                        "app {}: webhook url {:?} is not http:// or https://",
                        app.id, hook.url
                    )));
                }
            }
            if by_key.insert(app.key.clone(), index).is_some() {
                return Err(AppsError(format!("two apps have the key {:?}", app.key)));
            }
            if by_id.insert(app.id.clone(), index).is_some() {
                return Err(AppsError(format!("two apps have the id {:?}", app.id)));
            }
            let scope = if index == 0 {
                String::new()
            } else {
                format!("{}~", app.id)
            };
            apps.push(Arc::new(App { config: app, scope }));
        }
        Ok(Self {
            apps,
            by_key,
            by_id,
        })
    }

    /// Whether no app is served (a server with tokens or an API key and no `[[apps]]`).
    pub(crate) fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    pub(crate) fn by_key(&self, key: &str) -> Option<&Arc<App>> {
        self.by_key.get(key).map(|&i| &self.apps[i])
    }

    pub(crate) fn by_id(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id).map(|&i| &self.apps[i])
    }
}

/// `GET /app/{key}`.
pub(crate) async fn websocket(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let app = state.pusher_apps.by_key(&key).cloned();
    // A refusal is told after the upgrade, as the protocol's error and close code, so
    // the libraries know not to retry.
    let refusal = match (&app, query.get("protocol")) {
        (None, _) => Some(errors::APP_NOT_FOUND),
        (_, None) => Some(errors::NO_PROTOCOL),
        (_, Some(version)) => match version.parse::<u32>() {
            Ok(version) if proto::PROTOCOLS.contains(&version) => None,
            Ok(_) => Some(errors::UNSUPPORTED_PROTOCOL),
            Err(_) => Some(errors::INVALID_VERSION),
        },
    };
    // The door pings in its own protocol.
    let config = state
        .config
        .socket_config(state.config.room_max_message)
        .with_ping_interval(None);
    let session_state = state.clone();
    upgrade(&state, request, config, move |socket, _| async move {
        match (app, refusal) {
            (Some(app), None) => session::run(socket, app, session_state).await,
            (_, Some(refusal)) => session::refuse(socket, refusal).await,
            (None, None) => unreachable!("no app is a refusal"),
        }
    })
}

/// A publication's `data` here: its data, or `{"text": TEXT}` for a text-only message
/// (with `from` when it has a sender).
fn data_of(publication: &Publication) -> Box<RawValue> {
    match (&publication.data, &publication.text) {
        (Some(data), _) => data.clone(),
        (None, text) => {
            let mut object = serde_json::Map::new();
            if let Some(text) = text {
                object.insert("text".into(), text.clone().into());
            }
            if let Some(from) = &publication.from {
                object.insert("from".into(), from.clone().into());
            }
            serde_json::value::to_raw_value(&object).expect("JSON serializes")
        }
    }
}

/// A publication as this protocol's event on `channel` (its name here): named by its
/// event, `message` for a plain message; a client event on a presence channel names
/// its sender.
fn event_of(channel: &str, publication: &Publication) -> Bytes {
    let name = publication.event.as_deref().unwrap_or("message");
    let user = publication
        .from
        .as_deref()
        .filter(|_| proto::ChannelKind::of(channel) == proto::ChannelKind::Presence);
    proto::event(name, channel, &data_of(publication), user)
}

/// What data a publisher of this door gives the engine: its data as JSON (see
/// [`proto::stored_data`]), and a string `text` in it, which the room protocol shows
/// as a chat message.
fn draft_of(event: &str, data: &RawValue, socket_id: Option<String>) -> switchboard_engine::Draft {
    let data = proto::stored_data(data);
    let text = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(data.get())
        .ok()
        .and_then(|object| match object.get("text") {
            Some(serde_json::Value::String(text)) => Some(text.clone()),
            _ => None,
        });
    switchboard_engine::Draft {
        text,
        data: Some(data),
        event: Some(event.to_owned()),
        nonce: None,
        client: socket_id,
        client_info: None,
    }
}

/// The protocol's error codes: the close code of a connection the server ends, or the
/// `code` of a `pusher:error`.
pub(crate) mod errors {
    /// `(code, message)`.
    pub(crate) type Code = (u16, &'static str);
    pub(crate) const APP_NOT_FOUND: Code = (4001, "Application does not exist");
    pub(crate) const INVALID_VERSION: Code = (4006, "Invalid version string format");
    pub(crate) const UNSUPPORTED_PROTOCOL: Code = (4007, "Unsupported protocol version");
    pub(crate) const NO_PROTOCOL: Code = (4008, "No protocol version supplied");
    pub(crate) const UNAUTHORIZED: Code = (4009, "Connection is unauthorized");
    pub(crate) const OVER_CAPACITY: Code = (4100, "Over capacity");
    pub(crate) const SHUTDOWN: Code = (4200, "Server shutting down: reconnect");
    pub(crate) const RESUBSCRIBE: Code = (4200, "Channel reset: reconnect");
    pub(crate) const SLOW: Code = (4201, "Slow consumer: reconnect");
    pub(crate) const NO_PONG: Code = (4201, "Pong reply not received");
    pub(crate) const RATE_LIMITED: Code = (4301, "Client event rejected due to rate limit");
    /// What closes a connection that keeps sending what is refused: the libraries
    /// reconnect after a backoff (they never do after 4000-4099 or 4300-4399).
    pub(crate) const TOO_MANY_REFUSALS: Code = (4100, "Too many refused messages: slow down");
    pub(crate) const TERMINATED: Code = (4009, "Connections of this user were terminated");
}
