//! The ingester's HTTP surface: `/healthz`, `/readyz`, `/metrics` (from
//! `kvroute_service::health`) plus `POST /admin/purge?pod=<pod-id>`, which removes a
//! pod's entries from the index in order with its pending events.
//!
//! A pod id without a data-parallel rank (`127.0.0.11:8000`) purges every
//! rank of that endpoint: the ranks this process heard (the workers know
//! them) and the ranks registered in the index (`kvroute:pods`), which an
//! ingester that restarted, or another replica, wrote. The response lists
//! the pod ids purged and the entries they held when the purge was queued;
//! an id that matches nothing (not registered, no entries) answers 404.
//!
//! The server starts before the index is connected (so `/readyz` can say
//! what is missing); until the workers run, a purge answers 503.

use crate::metrics as m;
use crate::pipeline::Purger;
use crate::purge::{resolve, with_ranks};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use kvroute_core::ids::PodId;
use kvroute_redis::AnyIndex;
use kvroute_service::health::Readiness;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::{Arc, OnceLock};

#[derive(serde::Deserialize)]
struct PurgeQuery {
    pod: String,
}

/// What the admin API acts through, available once the workers run.
#[derive(Clone)]
pub struct Admin {
    pub purger: Purger,
    /// Read for the registry of pods (ranks of an endpoint), never written
    /// here: purges go through the workers, in order with pending events.
    pub index: Arc<AnyIndex>,
}

/// Filled by the service when the workers start; empty before.
pub type AdminSlot = Arc<OnceLock<Admin>>;

/// The full router: health endpoints and the admin API.
pub fn router(readiness: Readiness, metrics: Option<PrometheusHandle>, admin: AdminSlot) -> Router {
    let api = Router::new()
        .route("/admin/purge", post(purge))
        .with_state(admin);
    kvroute_service::health::router(readiness, metrics).merge(api)
}

async fn purge(State(slot): State<AdminSlot>, Query(q): Query<PurgeQuery>) -> (StatusCode, String) {
    let Some(s) = slot.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the index is not connected yet; retry later\n".into(),
        );
    };
    let pod = q.pod.trim();
    if pod.is_empty() || pod.contains('@') {
        return (
            StatusCode::BAD_REQUEST,
            "pod must be a pod id like 127.0.0.11:8000\n".into(),
        );
    }
    let target = PodId::new(pod);
    let mut body = String::new();
    let known = match s.index.known_pods().await {
        Ok(k) => Some(k),
        Err(e) => {
            // Still purge what this process knows; say what could not be read.
            tracing::warn!(pod, error = %e, "pod registry unreadable: purging the ranks this process heard");
            body.push_str(&format!(
                "warning: pod registry unreadable ({e}); ranks only other ingesters heard are not purged\n"
            ));
            None
        }
    };
    // With the registry read, an id that matches nothing is refused (a typo
    // would otherwise "purge" nothing and answer success); entry counts are
    // what the pods held when the purge was queued.
    let resolved = match &known {
        Some(known) => match resolve(&s.index, &target, known).await {
            Ok(r) if !r.matched => {
                return (
                    StatusCode::NOT_FOUND,
                    format!(
                        "no pod matches {pod:?}: it is not in kvroute:pods and holds no entries \
                         (pod ids look like 127.0.0.11:8000 or 127.0.0.11:8000#dp1)\n"
                    ),
                );
            }
            Ok(r) => Some(r),
            Err(e) => {
                body.push_str(&format!("warning: entries not counted ({e})\n"));
                None
            }
        },
        None => None,
    };
    let targets: Vec<PodId> = match &resolved {
        Some(r) => r.pods.iter().map(|(p, _)| p.clone()).collect(),
        None => with_ranks(&target, known.as_deref().unwrap_or(&[])),
    };
    for p in &targets {
        s.purger.purge(p).await;
        metrics::counter!(m::PURGES, "reason" => "admin").increment(1);
        tracing::info!(pod = %p, "purge requested over the admin API");
        body.push_str(&format!("purging {p}\n"));
    }
    match &resolved {
        Some(r) => body.push_str(&format!(
            "purging {} pods holding {} entries\n",
            targets.len(),
            r.entries()
        )),
        None => body.push_str(&format!("purging {} pods\n", targets.len())),
    }
    (StatusCode::ACCEPTED, body)
}
