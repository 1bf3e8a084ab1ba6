//! A deterministic `Decide` for tests: the model name picks the endpoint, a
//! subset hint narrows it, and every call is recorded so tests can check
//! what the front end passed, that `prefill_done` ran at most once and
//! `finished` exactly once.

use parking_lot::Mutex;
use scorer::decide::{Charge, Decide, DecideError, Decision, RouteRequest};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

/// The model that makes [`TableDecide`] report no candidates (503).
pub const NO_CANDIDATES_MODEL: &str = "no-candidates";

#[derive(Debug, Default)]
pub struct TableDecide {
    /// model -> endpoint.
    routes: HashMap<String, String>,
    /// For models not in `routes` (including the empty model of body-less requests).
    fallback: String,
    /// Every `decide` call: the request and the subset hint.
    pub calls: Mutex<Vec<(RouteRequest, Option<Vec<String>>)>>,
    /// Endpoints passed to `finished`, in order.
    pub finished: Mutex<Vec<String>>,
    /// Endpoints passed to `prefill_done`, in order.
    pub prefill_done: Mutex<Vec<String>>,
}

/// The prefill charge every [`TableDecide`] decision carries.
pub const CHARGE_TOKENS: u64 = 100;

impl TableDecide {
    pub fn new(routes: &[(&str, &str)], fallback: &str) -> Self {
        Self {
            routes: routes
                .iter()
                .map(|(m, e)| (m.to_string(), e.to_string()))
                .collect(),
            fallback: fallback.to_owned(),
            ..Default::default()
        }
    }

    pub fn endpoint_for(&self, model: &str) -> &str {
        self.routes
            .get(model)
            .map_or(&self.fallback, String::as_str)
    }

    pub fn decided(&self) -> usize {
        self.calls.lock().len()
    }

    pub fn finished_count(&self) -> usize {
        self.finished.lock().len()
    }

    pub fn prefill_done_count(&self) -> usize {
        self.prefill_done.lock().len()
    }

    pub fn last_call(&self) -> Option<(RouteRequest, Option<Vec<String>>)> {
        self.calls.lock().last().cloned()
    }

    /// Waits (up to 5 s) until `finished` has been called `n` times.
    pub async fn wait_finished(&self, n: usize) -> usize {
        for _ in 0..500 {
            if self.finished_count() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.finished_count()
    }
}

impl Decide for TableDecide {
    fn decide(
        &self,
        request: RouteRequest,
        subset: Option<Vec<String>>,
    ) -> impl Future<Output = Result<Decision, DecideError>> + Send {
        let mut endpoint = Some(self.endpoint_for(&request.model).to_owned());
        if request.model == NO_CANDIDATES_MODEL {
            endpoint = None;
        }
        if let (Some(subset), Some(e)) = (&subset, &endpoint)
            && !subset.contains(e)
        {
            endpoint = subset.first().cloned();
        }
        let ticket = {
            let mut calls = self.calls.lock();
            calls.push((request, subset));
            calls.len() as u64
        };
        async move {
            endpoint
                .map(|endpoint| Decision {
                    endpoint,
                    reason: "table",
                    charge: Some(Charge {
                        ticket,
                        tokens: CHARGE_TOKENS,
                    }),
                })
                .ok_or(DecideError::NoCandidates)
        }
    }

    fn prefill_done(&self, decision: &Decision) {
        self.prefill_done.lock().push(decision.endpoint.clone());
    }

    fn finished(&self, decision: &Decision) {
        self.finished.lock().push(decision.endpoint.clone());
    }
}
