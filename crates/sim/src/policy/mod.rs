//! Routing policies under simulation: one trait, driven identically by the
//! fleet simulator for every policy, so every policy sees the same arrivals.
//!
//! What a policy may know is what its real counterpart knows:
//! - scraped engine metrics ([`Scrape`]), refreshed on the scrape interval
//!   (llm-d's 50 ms default), so they lag as real scrapes do;
//! - KV events ([`Policy::on_events`]), delivered after the configured
//!   propagation delay (event-driven policies: kvroute, llm-d precise,
//!   Dynamo);
//! - its own routing history and counters ([`Policy::on_dispatch`],
//!   [`Policy::on_first_token`], [`Policy::on_finish`]);
//! - the engines' true state ([`Signals::truth`]) is given to the oracle
//!   only: history-based peers never see it.

use crate::request::SimRequest;
use kvroute_core::events::KvEvent;

pub mod basic;

/// Index of a pod in the fleet (`0..pods`).
pub type PodIndex = usize;

/// One pod's metrics as the last scrape read them (vLLM's gauges).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scrape {
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// `vllm:kv_cache_usage_perc` as a fraction in 0..1.
    pub kv_usage: f64,
    /// `vllm:cache_config_info{num_gpu_blocks}` (GIE's autotune reads it).
    pub num_gpu_blocks: u32,
    /// `vllm:cache_config_info{block_size}`.
    pub block_size: u32,
    /// Virtual time of the scrape, in seconds.
    pub at: f64,
}

/// What the engines really hold: only the oracle is given this.
pub trait Truth {
    /// Full blocks of `req`'s prompt cached on `pod` right now, capped as
    /// vLLM caps a hit (one token short of the prompt).
    fn cached_blocks(&self, pod: PodIndex, req: &SimRequest) -> usize;
    /// Prompt tokens waiting to be prefilled on `pod` (queued requests'
    /// uncached tokens plus running requests' remaining prefill).
    fn pending_prefill_tokens(&self, pod: PodIndex) -> u64;
    /// Requests running and waiting on `pod`.
    fn requests(&self, pod: PodIndex) -> (u32, u32);
    /// The pod's prefill rate in tokens per second (its cost model).
    fn prefill_tokens_per_s(&self, pod: PodIndex) -> f64;
    /// Tokens per KV block.
    fn block_size(&self) -> usize;
}

/// What the driver hands a policy at a decision.
pub struct Signals<'a> {
    /// Virtual time now, in seconds.
    pub now: f64,
    /// Last scrape per pod (`None` before the first scrape).
    pub scrapes: &'a [Option<Scrape>],
    /// The engines' true state, for [`Policy::wants_truth`] policies only.
    pub truth: Option<&'a dyn Truth>,
}

impl Signals<'_> {
    pub fn pods(&self) -> usize {
        self.scrapes.len()
    }
}

/// A routing policy. Calls arrive in virtual-time order: `route` then
/// `on_dispatch` for each arrival; `on_first_token` and `on_finish` as the
/// engine produces them; `on_events` when an engine's event batch reaches
/// the router (after the propagation delay).
pub trait Policy {
    /// Short stable name for tables and files (`kvroute`, `round-robin`).
    fn name(&self) -> &str;

    /// Whether the driver passes the engines' true state (the oracle).
    fn wants_truth(&self) -> bool {
        false
    }

    /// Whether this policy consumes KV events (the driver skips delivering
    /// them to policies that do not).
    fn wants_events(&self) -> bool {
        false
    }

    /// Chooses the pod for `req`. Must return an index below
    /// `signals.pods()`.
    fn route(&mut self, req: &SimRequest, signals: &Signals<'_>) -> PodIndex;

    /// `req` was sent to `pod` (history-based policies record it here).
    fn on_dispatch(&mut self, _now: f64, _req: &SimRequest, _pod: PodIndex) {}

    /// `req`'s first token left `pod` (streaming clients see it now).
    fn on_first_token(&mut self, _now: f64, _req: &SimRequest, _pod: PodIndex) {}

    /// `req` finished on `pod`.
    fn on_finish(&mut self, _now: f64, _req: &SimRequest, _pod: PodIndex) {}

    /// One engine step's KV events from `pod`, as vLLM publishes them.
    fn on_events(&mut self, _now: f64, _pod: PodIndex, _events: &[KvEvent]) {}
}

pub mod aibrix;
pub mod blockhash;
pub mod config_error;
pub mod dynamo;
pub mod event_index;
pub mod gie;
pub mod llmd;
pub mod lru;
pub mod podset;
pub mod radix;
pub mod rng;
pub mod sglang;
#[cfg(test)]
mod testutil;
