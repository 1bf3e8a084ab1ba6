//! `/healthz`, `/readyz` and `/metrics`, the HTTP surface every kvroute binary
//! serves next to its own routes.
//!
//! Liveness is unconditional (the process answers). Readiness is the AND of
//! named checks that components flip as their state changes (the ingester:
//! Redis reachable, index writes succeeding, sockets bound); the scorer never
//! lets Redis decide its readiness, because it still routes by load without
//! it. A failing check may carry a reason, printed by `/readyz`, so an
//! operator reading a 503 learns why without searching the logs.

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
pub struct Check(Arc<CheckState>);

#[derive(Debug)]
struct CheckState {
    ok: AtomicBool,
    /// Why the check fails (empty: no reason given). A mutex rather than an
    /// atomic pointer: written when the state changes, read per `/readyz`.
    reason: Mutex<String>,
}

impl Check {
    /// Passes (`true`) or fails without a reason (`false`).
    pub fn set(&self, ok: bool) {
        if ok {
            self.pass();
        } else {
            self.fail("");
        }
    }

    /// Passes; any earlier reason is forgotten.
    pub fn pass(&self) {
        self.0.ok.store(true, Ordering::Relaxed);
        self.0.reason.lock().clear();
    }

    /// Fails, saying why (`/readyz` prints it after the check's name).
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        *self.0.reason.lock() = reason;
        self.0.ok.store(false, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.ok.load(Ordering::Relaxed)
    }

    /// The reason given with the last [`Check::fail`] (empty when passing).
    pub fn reason(&self) -> String {
        self.0.reason.lock().clone()
    }
}

/// A registered check: its name, the check, and whether it is advisory.
type Entry = (&'static str, Check, bool);

/// The set of readiness checks of a process.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    /// (name, check, advisory): an advisory check prints its reason but
    /// never fails readiness.
    checks: Arc<Mutex<Vec<Entry>>>,
}

impl Readiness {
    /// Registers a check, initially failing.
    pub fn check(&self, name: &'static str) -> Check {
        let c = Check(Arc::new(CheckState {
            ok: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
        }));
        self.checks.lock().push((name, c.clone(), false));
        c
    }

    /// Registers an advisory check, initially passing: when it fails,
    /// `/readyz` prints `name: reason` but readiness is unaffected (a
    /// condition worth an operator's eye that must not take traffic away,
    /// such as the scorer's keying disagreeing with the ingesters').
    pub fn advisory(&self, name: &'static str) -> Check {
        let c = Check(Arc::new(CheckState {
            ok: AtomicBool::new(true),
            reason: Mutex::new(String::new()),
        }));
        self.checks.lock().push((name, c.clone(), true));
        c
    }

    /// Whether every check passes, and the report `/readyz` prints.
    pub fn report(&self) -> (bool, String) {
        let checks = self.checks.lock();
        let mut ok = true;
        let mut text = String::new();
        for (name, c, advisory) in checks.iter() {
            let pass = c.get();
            text.push_str(name);
            if !pass && *advisory {
                text.push_str(": ");
                text.push_str(&c.reason());
                text.push('\n');
                continue;
            }
            ok &= pass;
            if pass {
                text.push_str(": ok\n");
            } else {
                let reason = c.reason();
                if reason.is_empty() {
                    text.push_str(": failing\n");
                } else {
                    text.push_str(": failing: ");
                    text.push_str(&reason);
                    text.push('\n');
                }
            }
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
        redis.fail("3 writes in a row failed");
        let (ok, text) = r.report();
        assert!(!ok);
        assert_eq!(
            text,
            "redis: failing: 3 writes in a row failed\nsockets: ok\n"
        );
        redis.pass();
        assert_eq!(r.report(), (true, "redis: ok\nsockets: ok\n".into()));
        let keying = r.advisory("keying");
        keying.fail("mismatch: a vs b");
        assert_eq!(
            r.report(),
            (
                true,
                "redis: ok\nsockets: ok\nkeying: mismatch: a vs b\n".into()
            )
        );
    }
}
