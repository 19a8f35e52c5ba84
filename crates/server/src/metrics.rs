//! `/metrics` in Prometheus text format.
//!
//! Counters are recorded through the `metrics` facade by the hub and the server; the
//! Prometheus recorder is installed once per process (the first server to start), and
//! every server renders it.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::warn;

use crate::serve::AppState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once) and returns the handle that renders it.
pub(crate) fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            warn!("another metrics recorder is installed; /metrics will be empty");
        }
        handle
    })
}

pub(crate) async fn render(State(state): State<AppState>) -> Response {
    metrics::gauge!("switchboard_rooms").set(state.hub.active_rooms().len() as f64);
    let body = install().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
