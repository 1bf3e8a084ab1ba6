//! The front end's metrics, counted in one place per condition (through the
//! `metrics` facade; the binary installs the Prometheus recorder).

use crate::metrics::{DECISION_SECONDS, IMMEDIATE_RESPONSES, REQUESTS};
use std::time::Duration;

/// How a request's ext_proc stream ended, as the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An endpoint was chosen and sent to Envoy.
    Routed,
    /// The body was not a request: 400.
    BadRequest,
    /// The body exceeded the cap: 413.
    TooLarge,
    /// `Decide` had no candidate: 503.
    NoCandidates,
    /// The request body stalled longer than `--body-idle-timeout`: 408.
    Idle,

    /// The stream ended before a decision (client gone, Envoy reset).
    Abandoned,
}

impl Outcome {
    pub fn as_label(self) -> &'static str {
        match self {
            Self::Routed => "routed",
            Self::BadRequest => "bad_request",
            Self::TooLarge => "too_large",
            Self::NoCandidates => "no_candidates",
            Self::Idle => "idle",

            Self::Abandoned => "abandoned",
        }
    }

    /// The HTTP status of the immediate response this outcome sends, if any.
    pub fn immediate_code(self) -> Option<u16> {
        match self {
            Self::BadRequest => Some(400),
            Self::TooLarge => Some(413),
            Self::NoCandidates => Some(503),
            Self::Idle => Some(408),
            Self::Routed | Self::Abandoned => None,
        }
    }
}

/// Counts one finished decision (and its immediate response, if any).
pub fn record(outcome: Outcome) {
    metrics::counter!(REQUESTS, "outcome" => outcome.as_label()).increment(1);
    if let Some(code) = outcome.immediate_code() {
        metrics::counter!(IMMEDIATE_RESPONSES, "code" => code_label(code)).increment(1);
    }
}

/// A request routed by load without buffering its body (the streams'
/// buffers were at `--max-buffered-bytes`); it also counts as routed.
pub fn unbuffered() {
    metrics::counter!(crate::metrics::UNBUFFERED).increment(1);
}

pub fn decision_time(elapsed: Duration) {
    metrics::histogram!(DECISION_SECONDS).record(elapsed.as_secs_f64());
}

fn code_label(code: u16) -> &'static str {
    match code {
        400 => "400",
        408 => "408",
        413 => "413",
        503 => "503",
        _ => "other",
    }
}
