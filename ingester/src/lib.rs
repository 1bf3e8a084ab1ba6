//! `kvroute-ingester`: the write path. vLLM KV events arrive over ZeroMQ and
//! leave as index operations, in per-pod publication order:
//!
//! [`socket`] (frames -> [`socket::RawBatch`]) -> [`pipeline`] (dispatcher:
//! the batch to its worker) -> [`worker`] (topic parsed, payload decoded by
//! `kvroute_core::events`) -> [`order`] (sequence: gap, restart, duplicate) ->
//! [`keys`] (router keys from token ids) -> [`writes`] (index writes, several
//! in flight, one per pod at a time) -> index.
//!
//! Around it: [`service`] wires the stages, [`write_health`] turns write
//! outcomes into readiness, [`purge`] removes pods that went away without
//! saying so, [`admin`] serves health, metrics and the operator's purge.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bookkeeping;
pub mod config;
pub mod early;
pub mod keys;
pub mod metrics;
pub mod order;
pub mod pipeline;
pub mod purge;
pub mod replay;
pub mod service;
pub mod socket;
pub mod targets;
#[cfg(test)]
pub(crate) mod testing;
pub mod worker;
pub mod write_health;
pub mod writes;
