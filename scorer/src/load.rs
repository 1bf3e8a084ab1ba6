//! Load signals for picking:
//! - requests in flight, counted by this scorer at decision and completion and
//!   shared with the other replicas through Redis (each replica publishes its
//!   own counts every sync interval and reads the others'), so no Redis call
//!   sits on a request's path and one replica's burst is seen by all within
//!   one interval;
//! - pending prefill tokens: the uncached prompt tokens of each request this
//!   scorer sent to an endpoint, charged at the decision and released at the
//!   response's first byte (the prefill is done then) or its end, whichever
//!   comes first; shared like the request counts. A queued 100k-token
//!   prefill makes a pod busy for seconds although it counts as one request;
//! - vLLM's own `/metrics` (`vllm:num_requests_waiting`,
//!   `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`) scraped per
//!   endpoint; values older than a staleness bound are ignored;
//! - whether an endpoint answers at all: after `--down-after-failures`
//!   scrapes in a row that could not connect or timed out, the endpoint is
//!   *down* and leaves the candidate set (a dead pod that still holds a
//!   prefix in the index would otherwise keep winning it, and every request
//!   for that prompt would fail at Envoy). The first scrape it answers
//!   brings it back. When every candidate is down the scorer routes among
//!   all of them by load rather than answer "no endpoint": the scrape may be
//!   what is broken.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// In-flight requests and pending prefill tokens per endpoint: this
/// replica's live counts plus the other replicas' last published ones.
#[derive(Debug, Default)]
pub struct InFlight {
    local: Mutex<Local>,
    remote: RwLock<Remote>,
}

/// One replica's counts, as published to the others.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counts {
    pub requests: HashMap<String, u32>,
    /// Uncached prompt tokens whose prefill has not produced a first byte.
    pub tokens: HashMap<String, u64>,
}

#[derive(Debug, Default)]
struct Local {
    counts: Counts,
    /// Open token charges by ticket: released once, by whichever of the
    /// first response byte and the request's end comes first.
    charges: HashMap<u64, (String, u64)>,
    next_ticket: u64,
}

type Remote = Counts;

/// Subtracts `n` from `map[key]`, dropping the entry at 0 (idle endpoints
/// leave no trace in what is published).
fn take<N: Copy + PartialOrd + Default + std::ops::SubAssign>(
    map: &mut HashMap<String, N>,
    key: &str,
    n: N,
) {
    if let Some(v) = map.get_mut(key) {
        if *v > n {
            *v -= n;
        } else {
            map.remove(key);
        }
    }
}

impl InFlight {
    pub fn start(&self, endpoint: &str) {
        *self
            .local
            .lock()
            .counts
            .requests
            .entry(endpoint.to_string())
            .or_insert(0) += 1;
    }

    pub fn finish(&self, endpoint: &str) {
        take(&mut self.local.lock().counts.requests, endpoint, 1);
    }

    /// Charges `tokens` of pending prefill to `endpoint`; the ticket
    /// releases them ([`Self::release`]). Tickets start at 1.
    pub fn charge(&self, endpoint: &str, tokens: u64) -> u64 {
        let mut local = self.local.lock();
        local.next_ticket += 1;
        let ticket = local.next_ticket;
        if tokens > 0 {
            *local.counts.tokens.entry(endpoint.to_string()).or_insert(0) += tokens;
            local.charges.insert(ticket, (endpoint.to_string(), tokens));
        }
        ticket
    }

    /// Releases a charge; a ticket released before (or unknown) releases
    /// nothing, so the first byte and the request's end may both call it.
    /// Returns the tokens released.
    pub fn release(&self, ticket: u64) -> u64 {
        let mut local = self.local.lock();
        let Some((endpoint, tokens)) = local.charges.remove(&ticket) else {
            return 0;
        };
        take(&mut local.counts.tokens, &endpoint, tokens);
        tokens
    }

    /// In flight to `endpoint` across all replicas.
    pub fn get(&self, endpoint: &str) -> u32 {
        let local = self
            .local
            .lock()
            .counts
            .requests
            .get(endpoint)
            .copied()
            .unwrap_or(0);
        local
            + self
                .remote
                .read()
                .requests
                .get(endpoint)
                .copied()
                .unwrap_or(0)
    }

    /// Pending prefill tokens on `endpoint` across all replicas.
    pub fn tokens(&self, endpoint: &str) -> u64 {
        let local = self
            .local
            .lock()
            .counts
            .tokens
            .get(endpoint)
            .copied()
            .unwrap_or(0);
        local
            + self
                .remote
                .read()
                .tokens
                .get(endpoint)
                .copied()
                .unwrap_or(0)
    }

    /// This replica's counts (what it publishes).
    pub fn local_snapshot(&self) -> Counts {
        self.local.lock().counts.clone()
    }

    /// Replaces the other replicas' summed counts.
    pub fn set_remote(&self, remote: Counts) {
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

/// Default of `--down-after-failures`: three scrapes in a row (0.6 s at the
/// default 200 ms interval when the connection is refused) is long enough
/// not to flap on one lost packet, short enough that few requests fail.
pub const DEFAULT_DOWN_AFTER: u32 = 3;

/// Scrape failures in a row of one endpoint, and whether it is down.
#[derive(Debug, Default, Clone, Copy)]
struct Health {
    failures: u32,
    down: bool,
}

/// Latest scrape per endpoint, with its time, and which endpoints stopped
/// answering.
#[derive(Debug)]
pub struct EngineLoads {
    by_endpoint: RwLock<HashMap<String, (Instant, EngineLoad)>>,
    health: RwLock<HashMap<String, Health>>,
    /// Consecutive unreachable scrapes that mark an endpoint down (0: never).
    down_after: u32,
}

impl Default for EngineLoads {
    fn default() -> Self {
        Self::new(DEFAULT_DOWN_AFTER)
    }
}

impl EngineLoads {
    /// `down_after`: unreachable scrapes in a row that take an endpoint out
    /// of the candidates (0 disables).
    pub fn new(down_after: u32) -> Self {
        EngineLoads {
            by_endpoint: RwLock::default(),
            health: RwLock::default(),
            down_after,
        }
    }

    /// A scrape answered: the load, and the endpoint is up (again).
    pub fn record(&self, endpoint: &str, load: EngineLoad) {
        self.by_endpoint
            .write()
            .insert(endpoint.to_string(), (Instant::now(), load));
        self.record_answered(endpoint);
    }

    /// The endpoint answered (with or without usable metrics): it is up.
    pub fn record_answered(&self, endpoint: &str) {
        let was_down = {
            let mut health = self.health.write();
            match health.get_mut(endpoint) {
                Some(h) => {
                    let was = h.down;
                    *h = Health::default();
                    was
                }
                None => false,
            }
        };
        if was_down {
            tracing::info!(
                endpoint,
                "endpoint answers again: back among the candidates"
            );
            metrics::counter!(crate::metrics::ENDPOINT_TRANSITIONS, "to" => "up").increment(1);
        }
    }

    /// A scrape could not reach `endpoint` (refused, reset, timed out).
    /// Returns true when this failure took it down.
    pub fn record_unreachable(&self, endpoint: &str, error: &str) -> bool {
        if self.down_after == 0 {
            return false;
        }
        let (went_down, failures) = {
            let mut health = self.health.write();
            let h = health.entry(endpoint.to_string()).or_default();
            h.failures = h.failures.saturating_add(1);
            let went = !h.down && h.failures >= self.down_after;
            h.down |= went;
            (went, h.failures)
        };
        if went_down {
            tracing::warn!(
                endpoint,
                failures,
                error,
                "endpoint unreachable: out of the candidates until it answers again"
            );
            metrics::counter!(crate::metrics::ENDPOINT_TRANSITIONS, "to" => "down").increment(1);
        }
        went_down
    }

    /// Whether `endpoint` is down (unreachable `down_after` times in a row).
    pub fn is_down(&self, endpoint: &str) -> bool {
        self.health.read().get(endpoint).is_some_and(|h| h.down)
    }

    /// How many endpoints are down now.
    pub fn down_count(&self) -> usize {
        self.health.read().values().filter(|h| h.down).count()
    }

    /// The load of `endpoint` if scraped within `max_age`.
    pub fn fresh(&self, endpoint: &str, max_age: Duration) -> Option<EngineLoad> {
        let map = self.by_endpoint.read();
        let (at, load) = map.get(endpoint)?;
        (at.elapsed() <= max_age).then_some(*load)
    }

    pub fn forget_except(&self, keep: &[String]) {
        self.by_endpoint.write().retain(|k, _| keep.contains(k));
        self.health.write().retain(|k, _| keep.contains(k));
    }
}

/// Shared load state handed to the router.
#[derive(Debug, Default, Clone)]
pub struct Load {
    pub in_flight: Arc<InFlight>,
    pub engines: Arc<EngineLoads>,
}

impl Load {
    /// Load state whose endpoints go down after `down_after` unreachable
    /// scrapes in a row (`--down-after-failures`).
    pub fn new(down_after: u32) -> Self {
        Load {
            in_flight: Arc::default(),
            engines: Arc::new(EngineLoads::new(down_after)),
        }
    }
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
    fn unreachable_in_a_row_takes_an_endpoint_down_until_it_answers() {
        let e = EngineLoads::new(3);
        let ep = "127.0.0.11:8000";
        assert!(!e.record_unreachable(ep, "refused"));
        // One answer in between resets the run.
        e.record(ep, EngineLoad::default());
        assert!(!e.record_unreachable(ep, "refused"));
        assert!(!e.record_unreachable(ep, "refused"));
        assert!(!e.is_down(ep));
        assert!(e.record_unreachable(ep, "refused"));
        assert!(e.is_down(ep));
        // Already down: no second transition.
        assert!(!e.record_unreachable(ep, "refused"));
        assert_eq!(e.down_count(), 1);
        e.record(ep, EngineLoad::default());
        assert!(!e.is_down(ep));
        let never = EngineLoads::new(0);
        for _ in 0..10 {
            assert!(!never.record_unreachable(ep, "refused"));
        }
        assert!(!never.is_down(ep));
    }

    #[test]
    fn in_flight_sums_local_and_remote() {
        let f = InFlight::default();
        f.start("127.0.0.11:8000");
        f.start("127.0.0.11:8000");
        f.finish("127.0.0.11:8000");
        f.finish("127.0.0.12:8000");
        assert_eq!(f.get("127.0.0.11:8000"), 1);
        f.set_remote(Counts {
            requests: HashMap::from([("127.0.0.11:8000".to_string(), 4)]),
            tokens: HashMap::from([("127.0.0.11:8000".to_string(), 900)]),
        });
        assert_eq!(f.get("127.0.0.11:8000"), 5);
        assert_eq!(f.tokens("127.0.0.11:8000"), 900);
        f.finish("127.0.0.11:8000");
        assert_eq!(f.local_snapshot(), Counts::default());
    }

    #[test]
    fn token_charges_release_once() {
        let f = InFlight::default();
        let a = "127.0.0.11:8000";
        let t1 = f.charge(a, 1000);
        let t2 = f.charge(a, 250);
        let none = f.charge(a, 0);
        assert_eq!(f.tokens(a), 1250);
        assert_eq!(f.release(t1), 1000);
        assert_eq!(f.tokens(a), 250);
        // The request's end after its first byte: nothing more.
        assert_eq!(f.release(t1), 0);
        assert_eq!(f.release(none), 0);
        assert_eq!(f.tokens(a), 250);
        assert_eq!(f.release(t2), 250);
        assert_eq!(f.tokens(a), 0);
        assert!(f.local_snapshot().tokens.is_empty());
    }
}
