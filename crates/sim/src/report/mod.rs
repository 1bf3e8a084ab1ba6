//! What a run measured, per workload and policy, and its renderings: a
//! terminal table, CSV, Markdown and PNG charts.
//!
//! The numbers are defined as vLLM and the issue define them: the hit rate
//! is vLLM's token-level one (`prefix_cache_hits_total /
//! prefix_cache_queries_total` summed over the fleet); TTFT is a request's
//! first-token time minus its arrival at the router.

/// Latency summary in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Quantiles {
    /// Nearest-rank quantiles of `samples` (any order); zeros when empty.
    pub fn of(samples: &[f64]) -> Quantiles {
        if samples.is_empty() {
            return Quantiles::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
            s[rank - 1]
        };
        Quantiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

/// Index fidelity (live mode): the index's answers sampled against the
/// engines' true caches.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Fidelity {
    /// Sampled lookups.
    pub lookups: u64,
    /// Share of lookups whose answer named a block the pod no longer held.
    pub stale_lookup_share: f64,
    /// Share of truly cached (sampled) blocks the index did not list.
    pub missed_block_share: f64,
    /// Event -> index lag, seconds.
    pub ingest_lag: Quantiles,
}

/// One policy's run of one workload.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct RunResult {
    /// Workload name (`mooncake`, `tenants`, ...).
    pub workload: String,
    /// `sim` or `live`.
    pub mode: String,
    pub pods: usize,
    pub policy: String,
    pub requests: u64,
    /// Fleet-wide `vllm:prefix_cache_queries_total` (prompt tokens looked up).
    pub query_tokens: u64,
    /// Fleet-wide `vllm:prefix_cache_hits_total`.
    pub hit_tokens: u64,
    /// Time to first token, seconds.
    pub ttft: Quantiles,
    /// Request end-to-end latency, seconds.
    pub e2e: Quantiles,
    /// First arrival to last completion, seconds.
    pub makespan_s: f64,
    pub output_tokens: u64,
    /// Requests routed to each pod, by pod index.
    pub per_pod_requests: Vec<u64>,
    /// Engine preemptions (KV cache exhausted mid-run).
    pub preemptions: u64,
    /// Wall-clock time of one routing decision, seconds (the policy's own
    /// code in `sim`; the scorer's in `live`).
    pub decision: Quantiles,
    /// Live mode only.
    pub fidelity: Option<Fidelity>,
}

impl RunResult {
    /// vLLM's token-level prefix-cache hit rate.
    pub fn hit_rate(&self) -> f64 {
        if self.query_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.query_tokens as f64
        }
    }

    /// Output tokens per second over the makespan.
    pub fn throughput_tok_s(&self) -> f64 {
        if self.makespan_s > 0.0 {
            self.output_tokens as f64 / self.makespan_s
        } else {
            0.0
        }
    }

    /// Max over mean of the per-pod request counts (1.0 is perfectly even).
    pub fn max_mean_share(&self) -> f64 {
        let n = self.per_pod_requests.len();
        let total: u64 = self.per_pod_requests.iter().sum();
        if n == 0 || total == 0 {
            return 0.0;
        }
        let max = self.per_pod_requests.iter().copied().max().unwrap_or(0);
        max as f64 * n as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        let q = Quantiles::of(&s);
        assert_eq!((q.p50, q.p90, q.p99), (50.0, 90.0, 99.0));
        assert_eq!(q.mean, 50.5);
        assert_eq!(Quantiles::of(&[]), Quantiles::default());
    }

    #[test]
    fn share_and_rate() {
        let r = RunResult {
            query_tokens: 200,
            hit_tokens: 50,
            per_pod_requests: vec![3, 1, 0, 0],
            ..RunResult::default()
        };
        assert_eq!(r.hit_rate(), 0.25);
        assert_eq!(r.max_mean_share(), 3.0);
    }
}

pub mod chart;
pub mod csv;
pub mod error;
pub mod group;
pub mod headline;
pub mod table;
pub mod write;

pub use chart::write_charts;
pub use csv::{CSV_COLUMNS, csv_string, write_csv};
pub use error::ReportError;
pub use headline::headline;
pub use table::{markdown, terminal_table};
pub use write::{Written, write_all};
