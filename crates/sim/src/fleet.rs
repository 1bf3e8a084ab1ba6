//! The fleet simulator (`sim` mode): N simulated engines behind one routing
//! policy, in virtual time, deterministic for a seed.
//!
//! One event queue orders everything by (virtual time, insertion order):
//! - arrivals: the policy routes the request (the wall-clock time of that
//!   call is the policy's decision latency), the chosen engine queues it;
//! - engine steps: an engine with work runs back to back; a step's effects
//!   (first tokens, finished requests, KV events) exist at its end;
//! - KV-event batches reach the policy `event_delay` after the step that
//!   produced them (the ingest path's lag), in per-pod order;
//! - metric scrapes every `scrape_interval` (llm-d's 50 ms).
//!
//! Nothing here reads the wall clock except to time decisions, so two runs
//! with the same inputs and seeds make the same decisions.

use crate::engine::{Engine, EngineConfig, StepOutcome};
use crate::policy::{PodIndex, Policy, Scrape, Signals, Truth};
use crate::report::{Quantiles, RunResult};
use crate::request::SimRequest;
use kvroute_core::events::KvEvent;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Virtual time in nanoseconds: integer, so ordering is exact.
type Nanos = u64;

fn nanos(s: f64) -> Nanos {
    if s.is_finite() && s > 0.0 {
        (s * 1e9).round() as Nanos
    } else {
        0
    }
}

fn secs(n: Nanos) -> f64 {
    n as f64 / 1e9
}

/// How the fleet is built and observed.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub pods: usize,
    pub engine: EngineConfig,
    /// Event -> router lag, seconds.
    pub event_delay_s: f64,
    /// Metric scrape interval, seconds.
    pub scrape_interval_s: f64,
}

/// Default event propagation delay: the ingest lag `bench ingest` measured
/// at 16 pods (ts -> applied p50 17.7 ms, BENCHMARKS.md), rounded up.
pub const DEFAULT_EVENT_DELAY_S: f64 = 0.020;
/// llm-d's `refresh-metrics-interval` default.
pub const DEFAULT_SCRAPE_INTERVAL_S: f64 = 0.050;

enum Ev {
    Arrival(usize),
    StepDone(PodIndex),
    Deliver(PodIndex, Vec<KvEvent>),
    Scrape,
}

struct Queue {
    heap: BinaryHeap<Reverse<(Nanos, u64)>>,
    items: std::collections::HashMap<u64, Ev>,
    seq: u64,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            heap: BinaryHeap::new(),
            items: std::collections::HashMap::new(),
            seq: 0,
        }
    }

    fn push(&mut self, at: Nanos, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq)));
        self.items.insert(self.seq, ev);
    }

    fn pop(&mut self) -> Option<(Nanos, Ev)> {
        let Reverse((at, seq)) = self.heap.pop()?;
        self.items.remove(&seq).map(|ev| (at, ev))
    }
}

/// The engines' true state, as the oracle is shown it.
struct Engines<'a>(&'a [Engine]);

impl Truth for Engines<'_> {
    fn cached_blocks(&self, pod: PodIndex, req: &SimRequest) -> usize {
        self.0[pod].cached_blocks(req)
    }

    fn pending_prefill_tokens(&self, pod: PodIndex) -> u64 {
        self.0[pod].pending_prefill_tokens()
    }

    fn requests(&self, pod: PodIndex) -> (u32, u32) {
        let m = self.0[pod].metrics();
        (m.running, m.waiting)
    }

    fn prefill_tokens_per_s(&self, pod: PodIndex) -> f64 {
        let c = self.0[pod].config();
        c.cost
            .prefill_tokens_per_s(u64::from(c.max_num_batched_tokens))
    }

    fn block_size(&self) -> usize {
        self.0.first().map_or(16, |e| e.config().block_size)
    }
}

/// Per-request timeline.
#[derive(Clone, Copy, Default)]
struct Timeline {
    pod: PodIndex,
    first_token: Option<Nanos>,
    finished: Option<Nanos>,
}

/// Replays `requests` (in arrival order) through `policy` over a fresh
/// fleet; `progress` is called with the number of finished requests as the
/// run goes (for a progress bar).
pub fn run(
    config: &FleetConfig,
    workload: &str,
    requests: &[SimRequest],
    policy: &mut dyn Policy,
    progress: &mut dyn FnMut(u64),
) -> RunResult {
    let pods = config.pods.max(1);
    let mut engines: Vec<Engine> = (0..pods)
        .map(|_| Engine::new(config.engine.clone()))
        .collect();
    let mut stepping: Vec<Option<StepOutcome>> = vec![None; pods];
    let mut scrapes: Vec<Option<Scrape>> = vec![None; pods];
    let mut timeline = vec![Timeline::default(); requests.len()];
    let mut per_pod = vec![0u64; pods];
    let mut decisions = Vec::with_capacity(requests.len());
    let by_id: std::collections::HashMap<u64, usize> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id, i))
        .collect();
    let delay = nanos(config.event_delay_s);
    let scrape_every = nanos(config.scrape_interval_s).max(1);
    let wants_events = policy.wants_events();
    let wants_truth = policy.wants_truth();

    let mut q = Queue::new();
    for (i, r) in requests.iter().enumerate() {
        q.push(nanos(r.arrival), Ev::Arrival(i));
    }
    q.push(0, Ev::Scrape);
    let mut finished = 0u64;
    let mut last = 0;

    while let Some((now, ev)) = q.pop() {
        last = last.max(now);
        match ev {
            Ev::Arrival(i) => {
                let req = &requests[i];
                let truth = Engines(&engines);
                let signals = Signals {
                    now: secs(now),
                    scrapes: &scrapes,
                    truth: wants_truth.then_some(&truth as &dyn Truth),
                };
                let t0 = Instant::now();
                let pod = policy.route(req, &signals).min(pods - 1);
                decisions.push(t0.elapsed().as_secs_f64());
                policy.on_dispatch(secs(now), req, pod);
                per_pod[pod] += 1;
                timeline[i].pod = pod;
                engines[pod].submit(secs(now), req);
                if stepping[pod].is_none() {
                    stepping[pod] = start_step(&mut engines[pod], pod, now, &mut q);
                }
            }
            Ev::StepDone(pod) => {
                let outcome = stepping[pod].take().unwrap_or_default();
                for id in &outcome.first_tokens {
                    if let Some(&i) = by_id.get(id) {
                        timeline[i].first_token.get_or_insert(now);
                        policy.on_first_token(secs(now), &requests[i], pod);
                    }
                }
                for id in &outcome.rejected {
                    if let Some(&i) = by_id.get(id) {
                        tracing::warn!(
                            request = id,
                            tokens = requests[i].prompt_len(),
                            pod,
                            "the engine refused a request larger than its KV cache"
                        );
                        policy.on_finish(secs(now), &requests[i], pod);
                        finished += 1;
                        progress(finished);
                    }
                }
                for id in &outcome.finished {
                    if let Some(&i) = by_id.get(id) {
                        timeline[i].finished = Some(now);
                        policy.on_finish(secs(now), &requests[i], pod);
                        finished += 1;
                        progress(finished);
                    }
                }
                let events = engines[pod].take_events();
                if wants_events && !events.is_empty() {
                    q.push(now + delay, Ev::Deliver(pod, events));
                }
                if engines[pod].has_work() {
                    stepping[pod] = start_step(&mut engines[pod], pod, now, &mut q);
                }
            }
            Ev::Deliver(pod, events) => policy.on_events(secs(now), pod, &events),
            Ev::Scrape => {
                for (p, e) in engines.iter().enumerate() {
                    let m = e.metrics();
                    scrapes[p] = Some(Scrape {
                        running: m.running,
                        waiting: m.waiting,
                        kv_usage: m.kv_usage,
                        num_gpu_blocks: m.num_gpu_blocks,
                        block_size: m.block_size,
                        at: secs(now),
                    });
                }
                // Keep scraping while anything is left to happen.
                if finished < requests.len() as u64 && !q.heap.is_empty() {
                    q.push(now + scrape_every, Ev::Scrape);
                }
            }
        }
    }

    let ttft: Vec<f64> = requests
        .iter()
        .zip(&timeline)
        .filter_map(|(r, t)| t.first_token.map(|f| secs(f) - r.arrival))
        .collect();
    let e2e: Vec<f64> = requests
        .iter()
        .zip(&timeline)
        .filter_map(|(r, t)| t.finished.map(|f| secs(f) - r.arrival))
        .collect();
    let (mut query, mut hit, mut out, mut preempt) = (0, 0, 0, 0);
    for e in &engines {
        let m = e.metrics();
        query += m.prefix_cache_queries;
        hit += m.prefix_cache_hits;
        out += m.generation_tokens;
        preempt += m.preemptions;
    }
    let first_arrival = requests.first().map_or(0.0, |r| r.arrival);
    RunResult {
        workload: workload.to_string(),
        mode: "sim".into(),
        pods,
        policy: policy.name().to_string(),
        requests: finished,
        query_tokens: query,
        hit_tokens: hit,
        ttft: Quantiles::of(&ttft),
        e2e: Quantiles::of(&e2e),
        makespan_s: (secs(last) - first_arrival).max(0.0),
        output_tokens: out,
        per_pod_requests: per_pod,
        preemptions: preempt,
        decision: Quantiles::of(&decisions),
        fidelity: None,
    }
}

/// Runs one step of `engine` at `now` and queues its end; the outcome is
/// kept until then. An engine that cannot make progress (a request larger
/// than its whole cache) stays idle until the next arrival instead of
/// spinning.
fn start_step(
    engine: &mut Engine,
    pod: PodIndex,
    now: Nanos,
    q: &mut Queue,
) -> Option<StepOutcome> {
    let outcome = engine.step(secs(now));
    let dur = nanos(outcome.duration_s);
    let progressed = dur > 0
        || !outcome.first_tokens.is_empty()
        || !outcome.finished.is_empty()
        || !outcome.rejected.is_empty();
    if !progressed {
        return None;
    }
    q.push(now + dur.max(1), Ev::StepDone(pod));
    Some(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::basic::{Random, RoundRobin};
    use kvroute_core::keys::{HashScheme, KeyScheme};

    fn config(pods: usize) -> FleetConfig {
        let mut engine = EngineConfig::llama31_8b_h100(0.9);
        engine.scheme = KeyScheme::new(HashScheme::Sha256Cbor, "0", 16).expect("scheme");
        FleetConfig {
            pods,
            engine,
            event_delay_s: 0.02,
            scrape_interval_s: 0.05,
        }
    }

    fn requests(n: u64, spacing: f64, len: u32) -> Vec<SimRequest> {
        let scheme = config(1).engine.scheme;
        (0..n)
            .map(|i| SimRequest::new(i, i as f64 * spacing, (0..len).collect(), 8, None, &scheme))
            .collect()
    }

    #[test]
    fn round_robin_over_two_pods_hits_from_the_second_round() {
        // Four copies of one 160-token prompt, 1 s apart: pods 0 and 1 miss,
        // then each hits its 9 full blocks (capped one token short: 159/16).
        let reqs = requests(4, 1.0, 160);
        let r = run(
            &config(2),
            "t",
            &reqs,
            &mut RoundRobin::default(),
            &mut |_| {},
        );
        assert_eq!(r.requests, 4);
        assert_eq!(r.query_tokens, 640);
        assert_eq!(r.hit_tokens, 2 * 9 * 16);
        assert_eq!(r.per_pod_requests, [2, 2]);
        assert_eq!(r.output_tokens, 32);
        // A cold request's TTFT is one step of its whole prompt; a warm
        // one's a step of the 16 uncached tokens.
        let cost = &config(1).engine.cost;
        let cold = cost.step_time(160, 0, 0);
        let warm = cost.step_time(16, 0, 0);
        assert!((r.ttft.p99 - cold).abs() < 1e-6, "{:?} vs {cold}", r.ttft);
        assert!((r.ttft.p50 - warm).abs() < 1e-6, "{:?} vs {warm}", r.ttft);
        assert_eq!(r.mode, "sim");
        assert_eq!(r.policy, "round-robin");
    }

    /// Records when events arrive relative to the steps that made them.
    #[derive(Default)]
    struct Recorder {
        first_tokens: Vec<f64>,
        deliveries: Vec<(f64, usize)>,
    }

    impl Policy for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }
        fn wants_events(&self) -> bool {
            true
        }
        fn route(&mut self, _req: &SimRequest, _signals: &Signals<'_>) -> PodIndex {
            0
        }
        fn on_first_token(&mut self, now: f64, _req: &SimRequest, _pod: PodIndex) {
            self.first_tokens.push(now);
        }
        fn on_events(&mut self, now: f64, _pod: PodIndex, events: &[KvEvent]) {
            self.deliveries.push((now, events.len()));
        }
    }

    #[test]
    fn events_reach_the_router_after_the_delay() {
        let reqs = requests(1, 0.0, 160);
        let mut rec = Recorder::default();
        run(&config(1), "t", &reqs, &mut rec, &mut |_| {});
        // The prefill step stores 10 blocks in one batch, delivered 20 ms
        // after that step ends (when the first token appears).
        let first = rec.first_tokens[0];
        let (at, n) = rec.deliveries[0];
        assert_eq!(n, 1);
        assert!((at - (first + 0.02)).abs() < 1e-9, "{at} vs {first}");
    }

    #[test]
    fn a_seed_replays_the_same_run() {
        let reqs = requests(40, 0.01, 400);
        let a = run(&config(4), "t", &reqs, &mut Random::new(7), &mut |_| {});
        let b = run(&config(4), "t", &reqs, &mut Random::new(7), &mut |_| {});
        let c = run(&config(4), "t", &reqs, &mut Random::new(8), &mut |_| {});
        assert_eq!(a.per_pod_requests, b.per_pod_requests);
        assert_eq!((a.hit_tokens, a.ttft), (b.hit_tokens, b.ttft));
        assert_ne!(a.per_pod_requests, c.per_pod_requests);
    }
}
