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
//!
//! Exposure: the health endpoints are open (Kubernetes probes, Prometheus);
//! `/admin/*` answers a loopback peer (unless `--admin-allow-loopback
//! false`) or a request carrying `Authorization: Bearer <--admin-token>`,
//! compared in constant time; anything else gets 401 (token configured) or
//! 403 (none configured), counted in `kvroute_ingester_admin_refused_total`.

use crate::metrics as m;
use crate::pipeline::Purger;
use crate::purge::{resolve, with_ranks};
use axum::Router;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kvroute_core::ids::PodId;
use kvroute_redis::AnyIndex;
use kvroute_service::health::Readiness;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use subtle::ConstantTimeEq;

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

/// Who may call `/admin/*`.
#[derive(Clone, Default)]
pub struct AdminAuth {
    /// Authorizes any peer that presents it as a bearer token.
    pub token: Option<Arc<str>>,
    /// Whether a loopback peer needs no token.
    pub allow_loopback: bool,
}

impl AdminAuth {
    /// Whether a request from `peer` with `authorization` may pass.
    fn allows(&self, peer: Option<SocketAddr>, authorization: Option<&[u8]>) -> bool {
        if self.allow_loopback && peer.is_some_and(|p| p.ip().is_loopback()) {
            return true;
        }
        let (Some(token), Some(auth)) = (&self.token, authorization) else {
            return false;
        };
        let Some(given) = auth.strip_prefix(b"Bearer ") else {
            return false;
        };
        // Constant time over the token's bytes; the length is not secret.
        given.ct_eq(token.as_bytes()).into()
    }
}

/// The full router: health endpoints (open) and the admin API (behind
/// [`AdminAuth`]). Serve it with `into_make_service_with_connect_info::<SocketAddr>`
/// so the peer address is known; without it only the token authorizes.
pub fn router(
    readiness: Readiness,
    metrics: Option<PrometheusHandle>,
    admin: AdminSlot,
    auth: AdminAuth,
) -> Router {
    let api = Router::new()
        .route("/admin/purge", post(purge))
        .with_state(admin)
        .layer(middleware::from_fn_with_state(auth, require_admin));
    kvroute_service::health::router(readiness, metrics).merge(api)
}

async fn require_admin(State(auth): State<AdminAuth>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if auth.allows(peer, authorization) {
        return next.run(req).await;
    }
    let (code, why, body) = if auth.token.is_some() {
        (
            StatusCode::UNAUTHORIZED,
            if authorization.is_some() {
                "bad_token"
            } else {
                "no_token"
            },
            "admin endpoints need Authorization: Bearer <--admin-token>\n",
        )
    } else {
        (
            StatusCode::FORBIDDEN,
            "not_loopback",
            "admin endpoints answer loopback peers only; set --admin-token to allow others\n",
        )
    };
    metrics::counter!(m::ADMIN_REFUSED, "reason" => why).increment(1);
    // Loud once, then quiet: refused requests must not flood the log.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!(peer = ?peer, path = %req.uri().path(), reason = why, "admin request refused");
    } else {
        tracing::warn!(peer = ?peer, path = %req.uri().path(), reason = why, "admin request refused (further ones logged at debug, counted in kvroute_ingester_admin_refused_total)");
    }
    (code, body).into_response()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_or_token() {
        let local: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let v6: SocketAddr = "[::1]:4000".parse().expect("addr");
        let open = AdminAuth {
            token: None,
            allow_loopback: true,
        };
        assert!(open.allows(Some(local), None));
        assert!(open.allows(Some(v6), None));
        assert!(!open.allows(None, Some(b"Bearer x")));
        let token = AdminAuth {
            token: Some("s3cret".into()),
            allow_loopback: false,
        };
        assert!(!token.allows(Some(local), None));
        assert!(token.allows(Some(local), Some(b"Bearer s3cret")));
        assert!(!token.allows(Some(local), Some(b"Bearer s3cre")));
        assert!(!token.allows(Some(local), Some(b"Bearer s3cretX")));
        assert!(!token.allows(Some(local), Some(b"s3cret")));
        assert!(!token.allows(Some(local), Some(b"Basic s3cret")));
    }
}
