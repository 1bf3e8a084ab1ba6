//! `kvroute-core`: what the ingester (write path) and the scorer (read path)
//! must agree on, so that both compute the same block keys and read the same
//! index. Pure domain: no runtime, no network, no command line.
//!
//! Write path (ingester): [`events`] decodes vLLM's ZeroMQ payloads ->
//! [`keys`] computes router block keys from token ids -> [`index`] applies
//! [`index::IndexOp`]s through the [`index::Index`] trait (the in-memory
//! backend lives here; Redis is `kvroute-redis`).
//!
//! Read path (scorer): [`keys`] on the prompt's tokens -> [`index`] lookup of
//! each candidate's consecutive prefix -> [`scoring`] turns depths into
//! tier-weighted scores and blends them with load.
//!
//! [`ids`] holds the newtypes every module speaks in.
#![forbid(unsafe_code)]

pub mod events;
pub mod ids;
pub mod index;
pub mod keys;
pub mod scoring;
