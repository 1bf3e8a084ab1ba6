//! The ingester's HTTP surface: `/healthz`, `/readyz`, `/metrics` (from
//! `shared::health`) plus `POST /admin/purge?pod=<pod-id>`, which removes a
//! pod's entries from the index in order with its pending events.

use crate::metrics as m;
use crate::pipeline::Purger;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use metrics_exporter_prometheus::PrometheusHandle;
use shared::health::Readiness;
use shared::ids::PodId;

#[derive(serde::Deserialize)]
struct PurgeQuery {
    pod: String,
}

/// The full router: health endpoints and the admin API.
pub fn router(readiness: Readiness, metrics: Option<PrometheusHandle>, purger: Purger) -> Router {
    let admin = Router::new()
        .route("/admin/purge", post(purge))
        .with_state(purger);
    shared::health::router(readiness, metrics).merge(admin)
}

async fn purge(State(purger): State<Purger>, Query(q): Query<PurgeQuery>) -> (StatusCode, String) {
    let pod = q.pod.trim();
    if pod.is_empty() || pod.contains('@') {
        return (
            StatusCode::BAD_REQUEST,
            "pod must be a pod id like 127.0.0.11:8000\n".into(),
        );
    }
    purger.purge(&PodId::new(pod)).await;
    metrics::counter!(m::PURGES, "reason" => "admin").increment(1);
    tracing::info!(pod, "purge requested over the admin API");
    (StatusCode::ACCEPTED, format!("purging {pod}\n"))
}
