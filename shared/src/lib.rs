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
//! Tokens: [`tokens`] turns completion prompts and chat messages into the
//! token ids vLLM computes (tokenizers, chat templates, a tokenized-prefix
//! cache), for the scorer and the simulator alike.
//!
//! Support: [`config`] holds the flag groups both binaries flatten; [`ids`] holds the newtypes every module speaks in;
//! [`redis_server`] starts throwaway `redis-server` processes (single node or
//! a local cluster) for tests and benchmarks.
#![forbid(unsafe_code)]

pub mod config;
pub mod events;
pub mod health;
pub mod ids;
pub mod index;
pub mod keys;
pub mod redis_server;
pub mod scoring;
pub mod telemetry;
pub mod test_env;
pub mod tokens;
