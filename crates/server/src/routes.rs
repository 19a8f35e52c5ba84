//! The HTTP routes.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::StatusCode;

use crate::echo::echo_session;
use crate::serve::AppState;
use crate::upgrade::upgrade;

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/echo", get(echo))
        .route("/room/{room}", get(crate::room::room))
        .route("/healthz", get(healthz))
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

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}
