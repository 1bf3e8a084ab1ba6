//! `/healthz`, `/readyz` and `/metrics`, the HTTP surface every kvroute binary
//! serves next to its own routes.
//!
//! Liveness is unconditional (the process answers). Readiness is the AND of
//! named checks that components flip as their state changes (the ingester:
//! Redis reachable, sockets bound); the scorer never lets Redis decide its
//! readiness, because it still routes by load without it.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One readiness condition, owned by the component that knows it.
#[derive(Debug, Clone)]
pub struct Check(Arc<AtomicBool>);

impl Check {
    pub fn set(&self, ok: bool) {
        self.0.store(ok, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The set of readiness checks of a process.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<Vec<(&'static str, Check)>>>,
}

impl Readiness {
    /// Registers a check, initially failing.
    pub fn check(&self, name: &'static str) -> Check {
        let c = Check(Arc::new(AtomicBool::new(false)));
        self.checks.lock().push((name, c.clone()));
        c
    }

    /// Whether every check passes, and the report `/readyz` prints.
    pub fn report(&self) -> (bool, String) {
        let checks = self.checks.lock();
        let mut ok = true;
        let mut text = String::new();
        for (name, c) in checks.iter() {
            let pass = c.get();
            ok &= pass;
            text.push_str(name);
            text.push_str(if pass { ": ok\n" } else { ": failing\n" });
        }
        (ok, text)
    }
}

#[derive(Clone)]
struct HealthState {
    readiness: Readiness,
    metrics: Option<PrometheusHandle>,
}

/// The router with `/healthz`, `/readyz` and (when a recorder is installed) `/metrics`.
pub fn router(readiness: Readiness, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(HealthState { readiness, metrics })
}

async fn readyz(State(s): State<HealthState>) -> (StatusCode, String) {
    let (ok, text) = s.readiness.report();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, text)
}

async fn render_metrics(State(s): State<HealthState>) -> (StatusCode, String) {
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::NOT_FOUND,
            "no metrics recorder installed\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let r = Readiness::default();
        let redis = r.check("redis");
        let sockets = r.check("sockets");
        assert!(!r.report().0);
        redis.set(true);
        assert!(!r.report().0);
        sockets.set(true);
        let (ok, text) = r.report();
        assert!(ok);
        assert_eq!(text, "redis: ok\nsockets: ok\n");
    }
}
