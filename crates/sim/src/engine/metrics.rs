//! The engine's counters under vLLM's metric names, and their Prometheus
//! text: what a router or autoscaler scraping `/metrics` of a real pod
//! reads, so simulated pods can stand in for real ones behind kvroute.

use std::fmt::Write as _;

/// vLLM's bucket bounds of `vllm:time_to_first_token_seconds` (seconds),
/// as in `vllm/v1/metrics/loggers.py`.
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// A Prometheus histogram: per-bucket counts (not cumulative), the last
/// bucket being `+Inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Upper bounds (inclusive), ascending.
    pub bounds: Vec<f64>,
    /// `bounds.len() + 1` counts; `counts[i]` holds observations in
    /// `(bounds[i-1], bounds[i]]`, the last one those above every bound.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    /// vLLM's TTFT histogram, empty.
    fn default() -> Self {
        Histogram::new(&TTFT_BUCKETS)
    }
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts `v` in the first bucket whose bound is at least `v`
    /// (Prometheus's `le`). A NaN is dropped: it has no bucket.
    pub fn observe(&mut self, v: f64) {
        if v.is_nan() {
            return;
        }
        let i = self.bounds.partition_point(|&b| b < v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Cumulative counts per bound, then `+Inf` (what `_bucket` lines show).
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |acc, &c| {
                *acc += c;
                Some(*acc)
            })
            .collect()
    }
}

/// A snapshot of the engine's metrics, named after vLLM's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineMetrics {
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// `vllm:kv_cache_usage_perc` (a fraction, 0..1, as vLLM reports it).
    pub kv_usage: f64,
    /// `vllm:prefix_cache_queries_total`: prompt tokens of new requests'
    /// lookups (resumed preempted requests are counted apart, as vLLM does).
    pub prefix_cache_queries: u64,
    /// `vllm:prefix_cache_hits_total`: of those, tokens found cached.
    pub prefix_cache_hits: u64,
    /// `vllm:prompt_tokens_total`: prompt tokens of requests that produced
    /// their first token.
    pub prompt_tokens: u64,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: u64,
    /// `vllm:num_preemptions_total`.
    pub preemptions: u64,
    /// `vllm:cache_config_info{num_gpu_blocks}`.
    pub num_gpu_blocks: u32,
    /// `vllm:cache_config_info{block_size}`.
    pub block_size: u32,
    /// `vllm:time_to_first_token_seconds`: first token minus arrival at
    /// the engine.
    pub ttft: Histogram,
}

/// A Prometheus label value, escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A float as Python's `repr` prints one for whole numbers (`3.0`), so the
/// text reads like prometheus_client's.
fn float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v:?}")
    }
}

impl EngineMetrics {
    /// Prometheus text exposition under vLLM's names and labels
    /// (`model_name`, `engine`), one engine (`engine="0"`).
    pub fn render(&self, model_name: &str) -> String {
        let labels = format!("model_name=\"{}\",engine=\"0\"", escape(model_name));
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        };
        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            float(f64::from(self.running)),
        );
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            float(f64::from(self.waiting)),
        );
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            float(self.kv_usage),
        );
        let counters = [
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                self.prefix_cache_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                self.prefix_cache_hits,
            ),
            (
                "vllm:num_preemptions",
                "Cumulative number of preemption from the engine.",
                self.preemptions,
            ),
            (
                "vllm:prompt_tokens",
                "Number of prefill tokens processed.",
                self.prompt_tokens,
            ),
            (
                "vllm:generation_tokens",
                "Number of generation tokens processed.",
                self.generation_tokens,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name}_total {help}");
            let _ = writeln!(out, "# TYPE {name}_total counter");
            let _ = writeln!(out, "{name}_total{{{labels}}} {v}.0");
        }
        let name = "vllm:time_to_first_token_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Histogram of time to first token in seconds."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        let cumulative = self.ttft.cumulative();
        for (i, c) in cumulative.iter().enumerate() {
            let le = self
                .ttft
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| float(*b));
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {c}.0");
        }
        let _ = writeln!(out, "{name}_count{{{labels}}} {}.0", self.ttft.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", float(self.ttft.sum));
        let name = "vllm:cache_config_info";
        let _ = writeln!(
            out,
            "# HELP {name} Information of the LLMEngine CacheConfig"
        );
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(
            out,
            "{name}{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",num_gpu_blocks=\"{}\"}} 1.0",
            self.block_size, self.num_gpu_blocks
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_inclusive_upper_bounds() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0, f64::NAN] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1, 1]);
        assert_eq!(h.cumulative(), vec![2, 3, 4]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 3.65).abs() < 1e-12);
        assert_eq!(Histogram::default().bounds.len(), 22);
    }

    #[test]
    fn floats_print_like_python() {
        assert_eq!(float(3.0), "3.0");
        assert_eq!(float(0.25), "0.25");
        assert_eq!(float(2560.0), "2560.0");
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
