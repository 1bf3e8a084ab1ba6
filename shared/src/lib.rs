//! `kvroute-shared`: everything the ingester (write path) and the scorer (read
//! path) must agree on, so that both compute the same block keys and read the
//! same index.
//!
//! Write path (ingester): [`events`] decodes vLLM's ZeroMQ payloads ->
//! [`keys`] computes router block keys from token ids -> [`index`] applies
//! [`index::IndexOp`]s (memory, or Redis through the scripts in `lua/`).
//!
//! Read path (scorer): [`keys`] on the prompt's tokens -> [`index`] lookup of
//! each candidate's consecutive prefix -> [`scoring`] turns depths into
//! tier-weighted scores.
//!
//! Support: [`config`] holds the flag groups both binaries flatten; [`ids`] holds the newtypes every module speaks in;
//! [`redis_server`] starts throwaway `redis-server` processes (single node or
//! a local cluster) for tests and benchmarks.
#![forbid(unsafe_code)]

pub mod config;
pub mod health;
pub mod ids;
pub mod events;
pub mod keys;
pub mod index;
pub mod scoring;
pub mod redis_server;
pub mod telemetry;
