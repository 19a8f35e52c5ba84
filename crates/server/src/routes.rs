//! The HTTP routes.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::StatusCode;

use crate::api;
use crate::echo::echo_session;
use crate::serve::AppState;
use crate::upgrade::upgrade;

pub(crate) fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/rooms", get(api::get_rooms))
        .route(
            "/api/rooms/{room}/messages",
            get(api::get_messages).post(api::post_message),
        )
        .route("/api/rooms/{room}/members", get(api::get_members))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::require_key,
        ));
    Router::new()
        .merge(api)
        .merge(crate::centrifuge::router(state.clone()))
        .route("/connection/websocket", get(crate::centrifuge::websocket))
        .route(
            "/connection/http_stream",
            post(crate::centrifuge::http_stream).options(crate::centrifuge::http_stream),
        )
        .route(
            "/connection/sse",
            get(crate::centrifuge::sse).post(crate::centrifuge::sse),
        )
        .route(
            "/emulation",
            post(crate::centrifuge::emulation).options(crate::centrifuge::emulation),
        )
        .merge(crate::pusher::router(state.clone()))
        .route("/app/{key}", get(crate::pusher::websocket))
        .route("/echo", get(echo))
        .route("/room/{room}", get(crate::room::room))
        .route("/room/{room}/events", post(crate::room_http::post_event))
        .route("/", get(crate::web::index))
        .route("/assets/app.js", get(crate::web::script))
        .route("/assets/style.css", get(crate::web::style))
        .route("/favicon.ico", get(crate::web::favicon))
        .route("/healthz", get(healthz))
        .route("/metrics", get(crate::metrics::render))
        .fallback(not_found)
        .with_state(state)
}

async fn echo(State(state): State<AppState>, request: Request) -> Response {
    let config = state.config.socket_config(state.config.echo_max_message);
    let shutdown = state.shutdown.clone();
    upgrade(&state, request, config, move |socket, _| {
        echo_session(socket, shutdown)
    })
}

/// `ok`, or 503 when this node's link to the cluster's Redis is down (its clients stay
/// connected; a load balancer should send new ones elsewhere).
async fn healthz(State(state): State<AppState>) -> Response {
    match state.engine.health() {
        Some(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "redis unreachable: connected clients stay, messages are refused until it is back\n",
        )
            .into_response(),
        _ => "ok\n".into_response(),
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}
