//! `kvroute-sim`: a simulated vLLM engine and the workloads that drive it,
//! for the fleet simulator (`sim` mode, virtual time) and the live load
//! test (`live` mode, simulated pods behind real kvroute processes).
//!
//! | module | what it owns |
//! |---|---|
//! | `cache` | the paged prefix cache with vLLM v1's block-pool semantics and its KV events |
//! | `engine` | the simulated vLLM engine: v1 scheduler, step-cost model, vLLM's metrics |
//! | `hashing` | vLLM's chained block hashes of a request, extended as it decodes |
//! | `request` | a request as simulated: arrival, tokens, output length, session, hashes |
//! | `policy` | the routing-policy interface and the policies (baselines, oracle, peers) |
//! | `report` | what a run measured and its renderings (table, CSV, Markdown, PNG) |
//! | `trace` | Mooncake-format traces and their deterministic token ids |
//! | `workload` | the seeded workloads (texts and token ids), the simulator's word-level tokenizer |
#![forbid(unsafe_code)]

pub mod cache;
pub mod engine;
pub mod fleet;
pub mod hashing;
pub mod policy;
pub mod report;
pub mod request;
pub mod trace;
pub mod workload;
