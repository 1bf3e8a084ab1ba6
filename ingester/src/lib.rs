//! `kvroute-ingester`: the write path. vLLM KV events arrive over ZeroMQ and
//! leave as index operations, in per-pod publication order:
//!
//! socket (frames) -> `shared::events` (decode) -> [`order`] (sequence: gap,
//! restart, duplicate) -> [`keys`] (router keys from token ids) -> [`writes`]
//! (index writes, several in flight, one per pod at a time) -> index.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod order;
pub mod pipeline;
pub mod replay;
pub mod service;
pub mod socket;
pub mod targets;
pub mod worker;
pub mod writes;
