//! `kvroute-service`: the plumbing both binaries share, so a flag, an
//! endpoint or a metric means the same thing in each.
//!
//! [`config`] holds the flag groups both binaries flatten (key scheme, Redis
//! address) and opens the configured index; [`health`] serves `/healthz`,
//! `/readyz` and `/metrics`; [`duration`] is the one duration grammar of
//! every flag; [`telemetry`] installs tracing and the
//! Prometheus recorder and turns SIGTERM/SIGINT into a cancellation.
#![forbid(unsafe_code)]

pub mod config;
pub mod duration;
pub mod health;
pub mod telemetry;
