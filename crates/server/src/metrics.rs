//! `/metrics` in Prometheus text format.
//!
//! Counters are recorded through the `metrics` facade by the engine and the server; the
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

/// A session's counters (every door's), looked up in the registry once per connection
/// rather than per event: the send side runs once per member for every message in a
/// channel.
pub(crate) struct Counters {
    pub(crate) events_sent: metrics::Counter,
    pub(crate) bytes_sent: metrics::Counter,
    pub(crate) events_received: metrics::Counter,
    pub(crate) bytes_received: metrics::Counter,
}

impl Counters {
    pub(crate) fn new() -> Self {
        Self {
            events_sent: metrics::counter!("switchboard_events_sent_total"),
            bytes_sent: metrics::counter!("switchboard_bytes_sent_total"),
            events_received: metrics::counter!("switchboard_events_received_total"),
            bytes_received: metrics::counter!("switchboard_bytes_received_total"),
        }
    }
}

/// How often histogram samples are folded into their summaries.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the recorder (once) and returns the handle that renders it.
pub(crate) fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            warn!("another metrics recorder is installed; /metrics will be empty");
        }
        // Histogram samples pile up in the recorder until upkeep folds them into its
        // summaries: without it, memory grows with every sample when nobody scrapes.
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            });
        if let Err(cause) = spawned {
            warn!(%cause, "no metrics upkeep thread; histogram samples wait for a scrape");
        }
        handle
    })
}

pub(crate) async fn render(State(state): State<AppState>) -> Response {
    metrics::gauge!("switchboard_rooms").set(state.engine.local_channels() as f64);
    let body = install().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
