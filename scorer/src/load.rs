//! Load signals for picking:
//! - requests in flight, counted by this scorer at decision and completion and
//!   shared with the other replicas through Redis (each replica publishes its
//!   own counts every sync interval and reads the others'), so no Redis call
//!   sits on a request's path and one replica's burst is seen by all within
//!   one interval;
//! - vLLM's own `/metrics` (`vllm:num_requests_waiting`,
//!   `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`) scraped per
//!   endpoint; values older than a staleness bound are ignored.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// In-flight requests per endpoint: this replica's live counts plus the other
/// replicas' last published ones.
#[derive(Debug, Default)]
pub struct InFlight {
    local: Mutex<HashMap<String, u32>>,
    remote: RwLock<HashMap<String, u32>>,
}

impl InFlight {
    pub fn start(&self, endpoint: &str) {
        *self.local.lock().entry(endpoint.to_string()).or_insert(0) += 1;
    }

    pub fn finish(&self, endpoint: &str) {
        let mut local = self.local.lock();
        if let Some(n) = local.get_mut(endpoint) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                local.remove(endpoint);
            }
        }
    }

    /// In flight to `endpoint` across all replicas.
    pub fn get(&self, endpoint: &str) -> u32 {
        let local = self.local.lock().get(endpoint).copied().unwrap_or(0);
        local + self.remote.read().get(endpoint).copied().unwrap_or(0)
    }

    /// This replica's counts (what it publishes).
    pub fn local_snapshot(&self) -> HashMap<String, u32> {
        self.local.lock().clone()
    }

    /// Replaces the other replicas' summed counts.
    pub fn set_remote(&self, remote: HashMap<String, u32>) {
        *self.remote.write() = remote;
    }
}

/// The scraped vLLM metrics of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineLoad {
    pub waiting: f64,
    pub running: f64,
    /// 0..1
    pub kv_usage: Option<f64>,
}

/// Parses vLLM's Prometheus text: sums each metric over its label sets (one
/// per model served). Accepts the pre-0.10 name `vllm:gpu_cache_usage_perc`.
pub fn parse_vllm_metrics(text: &str) -> EngineLoad {
    let mut load = EngineLoad::default();
    let mut kv: Option<f64> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        // The value is the first field after the labels (a timestamp may follow).
        let rest = match line[name_end..].find('}') {
            Some(i) if line[name_end..].starts_with('{') => &line[name_end + i + 1..],
            _ => &line[name_end..],
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        match name {
            "vllm:num_requests_waiting" => load.waiting += value,
            "vllm:num_requests_running" => load.running += value,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                kv = Some(kv.map_or(value, |k: f64| k.max(value)));
            }
            _ => {}
        }
    }
    load.kv_usage = kv.map(|k| k.clamp(0.0, 1.0));
    load
}

/// Latest scrape per endpoint, with its time.
#[derive(Debug, Default)]
pub struct EngineLoads {
    by_endpoint: RwLock<HashMap<String, (Instant, EngineLoad)>>,
}

impl EngineLoads {
    pub fn record(&self, endpoint: &str, load: EngineLoad) {
        self.by_endpoint
            .write()
            .insert(endpoint.to_string(), (Instant::now(), load));
    }

    /// The load of `endpoint` if scraped within `max_age`.
    pub fn fresh(&self, endpoint: &str, max_age: Duration) -> Option<EngineLoad> {
        let map = self.by_endpoint.read();
        let (at, load) = map.get(endpoint)?;
        (at.elapsed() <= max_age).then_some(*load)
    }

    pub fn forget_except(&self, keep: &[String]) {
        self.by_endpoint.write().retain(|k, _| keep.contains(k));
    }
}

/// Shared load state handed to the router.
#[derive(Debug, Default, Clone)]
pub struct Load {
    pub in_flight: Arc<InFlight>,
    pub engines: Arc<EngineLoads>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_metric_text() {
        let text = "\
# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"lora\"} 2.0
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 7.0 1712345678
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.42
vllm:num_requests_waiting_total 99
garbage line
vllm:num_requests_running{x=\"}\"} NaN
";
        let l = parse_vllm_metrics(text);
        assert_eq!(l.waiting, 5.0);
        assert_eq!(l.running, 7.0);
        assert_eq!(l.kv_usage, Some(0.42));
        assert_eq!(
            parse_vllm_metrics("vllm:gpu_cache_usage_perc 0.5").kv_usage,
            Some(0.5)
        );
        assert_eq!(parse_vllm_metrics("").kv_usage, None);
    }

    #[test]
    fn in_flight_sums_local_and_remote() {
        let f = InFlight::default();
        f.start("127.0.0.11:8000");
        f.start("127.0.0.11:8000");
        f.finish("127.0.0.11:8000");
        f.finish("127.0.0.12:8000");
        assert_eq!(f.get("127.0.0.11:8000"), 1);
        f.set_remote(HashMap::from([("127.0.0.11:8000".to_string(), 4)]));
        assert_eq!(f.get("127.0.0.11:8000"), 5);
        f.finish("127.0.0.11:8000");
        assert!(f.local_snapshot().is_empty());
    }
}
