//! NVIDIA Dynamo's KV router, current cost form (peer notes 2;
//! `lib/kv-router/src/scheduling/selector/default.rs` @07a6c9ce, docs
//! `router-concepts.md` @03037af0):
//!
//! ```text
//! prefill_w = max((active_prefill_tokens_w + isl)/B − credit·dev_w, 0)
//! decode_w  = active_decode_blocks_w + new_blocks_w
//! cost_w    = scale·prefill_w + decode_w + request_weight·active_requests_w
//! pick      = argmin cost (T = 0, exact ties uniformly at random)
//! ```
//!
//! `dev_w` comes from the KV-event index; the load terms are the router's
//! own predictions, updated synchronously: a request's uncached prompt
//! tokens `isl − dev·B` count in `active_prefill_tokens` from dispatch to
//! its first token, and its prompt blocks count in the worker's set of
//! active blocks (distinct hashes, so shared prefixes count once) from
//! dispatch to finish.

use super::config_error::{ConfigError, check, check_pods};
use super::event_index::{EventIndex, key};
use super::podset::{PodSet, leading_runs};
use super::rng::{SplitMix64, pick_best};
use super::{PodIndex, Policy, Signals};
use crate::request::SimRequest;
use fnv::FnvHashMap;
use kvroute_core::events::KvEvent;
use std::sync::Arc;

/// [`Dynamo`]'s parameters; `Default` is Dynamo's.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamoConfig {
    /// B: the engines' KV block size (vLLM's 16).
    pub block_size: usize,
    /// `overlap_score_credit` (1.0).
    pub overlap_score_credit: f64,
    /// `prefill_load_scale`, formerly `kv_overlap_score_weight` (1.0).
    pub prefill_load_scale: f64,
    /// `decode_active_request_weight` (0.0).
    pub decode_active_request_weight: f64,
    /// `router_temperature` (0.0: argmin; above 0: softmax over min-max
    /// normalised costs).
    pub router_temperature: f64,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig {
            block_size: 16,
            overlap_score_credit: 1.0,
            prefill_load_scale: 1.0,
            decode_active_request_weight: 0.0,
            router_temperature: 0.0,
        }
    }
}

#[derive(Debug)]
struct Active {
    pod: PodIndex,
    /// Prefill tokens still counted (0 once the first token is out).
    prefill_tokens: u64,
    keys: Arc<[u64]>,
}

#[derive(Debug)]
pub struct Dynamo {
    cfg: DynamoConfig,
    pods: usize,
    rng: SplitMix64,
    index: EventIndex,
    /// `active_prefill_tokens_w`.
    prefill_tokens: Vec<u64>,
    /// `active_decode_blocks_w`: distinct hashes with a nonzero count.
    active_blocks: Vec<u64>,
    active_requests: Vec<u64>,
    /// `(hash, worker)` → unfinished requests on the worker holding it.
    block_refs: FnvHashMap<(u64, u32), u32>,
    /// hash → workers with a nonzero count (for the prefix walk).
    block_workers: FnvHashMap<u64, PodSet>,
    requests: FnvHashMap<u64, Active>,
    /// The last routed request's keys, overlaps and active-block depths.
    last: Option<u64>,
    keys: Arc<[u64]>,
    overlap: Vec<usize>,
    depth: Vec<usize>,
}

impl Dynamo {
    pub fn new(pods: usize, seed: u64, cfg: DynamoConfig) -> Result<Dynamo, ConfigError> {
        check_pods(pods)?;
        let b = cfg.block_size;
        check(b > 0, "block_size", b as f64, "must be positive")?;
        let c = cfg.overlap_score_credit;
        check(c >= 0.0, "overlap_score_credit", c, "must not be negative")?;
        let s = cfg.prefill_load_scale;
        check(s >= 0.0, "prefill_load_scale", s, "must not be negative")?;
        let w = cfg.decode_active_request_weight;
        check(
            w >= 0.0,
            "decode_active_request_weight",
            w,
            "must not be negative",
        )?;
        let t = cfg.router_temperature;
        check(t >= 0.0, "router_temperature", t, "must not be negative")?;
        Ok(Dynamo {
            cfg,
            pods,
            rng: SplitMix64::new(seed),
            index: EventIndex::new(pods),
            prefill_tokens: vec![0; pods],
            active_blocks: vec![0; pods],
            active_requests: vec![0; pods],
            block_refs: FnvHashMap::default(),
            block_workers: FnvHashMap::default(),
            requests: FnvHashMap::default(),
            last: None,
            keys: Arc::from(Vec::new()),
            overlap: vec![0; pods],
            depth: vec![0; pods],
        })
    }

    /// Each worker's overlap (leading blocks in the event index) and active
    /// depth (leading blocks among its active blocks) for `req`.
    fn analyse(&mut self, req: &SimRequest) {
        self.keys = req.block_hashes().iter().map(key).collect();
        self.index.leading_runs(&self.keys, &mut self.overlap);
        let (workers, keys) = (&self.block_workers, &self.keys);
        leading_runs(keys.len(), &mut self.depth, |i, set| {
            if let Some(s) = workers.get(&keys[i]) {
                set.union_with(s);
            }
        });
        self.last = Some(req.id);
    }

    /// Worker `w`'s cost for the last analysed request of `isl` tokens.
    pub(crate) fn cost(&self, w: PodIndex, isl: usize) -> f64 {
        let b = self.cfg.block_size as f64;
        let raw_prefill = (self.prefill_tokens[w] as f64 + isl as f64) / b;
        let credit = self.cfg.overlap_score_credit * self.overlap[w] as f64;
        let prefill = (raw_prefill - credit).max(0.0);
        let new_blocks = self.keys.len() - self.depth[w];
        let decode = (self.active_blocks[w] + new_blocks as u64) as f64;
        self.cfg.prefill_load_scale * prefill
            + decode
            + self.cfg.decode_active_request_weight * self.active_requests[w] as f64
    }

    fn select(&mut self, costs: &[f64]) -> PodIndex {
        let t = self.cfg.router_temperature;
        if t <= 0.0 {
            return pick_best(&mut self.rng, costs.iter().copied().enumerate(), |a, b| {
                a < b
            })
            .unwrap_or(0);
        }
        let min = costs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = costs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let span = max - min;
        if span <= 0.0 {
            return self.rng.below(costs.len());
        }
        let weights: Vec<f64> = costs
            .iter()
            .map(|c| (-(c - min) / (span * t)).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut x = self.rng.next_f64() * total;
        for (w, &p) in weights.iter().enumerate() {
            if x < p {
                return w;
            }
            x -= p;
        }
        costs.len() - 1
    }

    /// Router-predicted prefill tokens in flight on `w`.
    pub fn active_prefill_tokens(&self, w: PodIndex) -> u64 {
        self.prefill_tokens.get(w).copied().unwrap_or(0)
    }

    /// Router-predicted distinct active blocks on `w`.
    pub fn active_decode_blocks(&self, w: PodIndex) -> u64 {
        self.active_blocks.get(w).copied().unwrap_or(0)
    }
}

impl Policy for Dynamo {
    fn name(&self) -> &str {
        "dynamo"
    }

    fn wants_events(&self) -> bool {
        true
    }

    fn route(&mut self, req: &SimRequest, _signals: &Signals<'_>) -> PodIndex {
        self.analyse(req);
        let isl = req.prompt_len();
        let costs: Vec<f64> = (0..self.pods).map(|w| self.cost(w, isl)).collect();
        self.select(&costs)
    }

    fn on_dispatch(&mut self, _now: f64, req: &SimRequest, pod: PodIndex) {
        if pod >= self.pods {
            return;
        }
        if self.last != Some(req.id) {
            self.analyse(req);
        }
        let cached = (self.overlap[pod] * self.cfg.block_size) as u64;
        let prefill = (req.prompt_len() as u64).saturating_sub(cached);
        self.prefill_tokens[pod] += prefill;
        self.active_requests[pod] += 1;
        for &k in self.keys.iter() {
            let n = self.block_refs.entry((k, pod as u32)).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.active_blocks[pod] += 1;
                self.block_workers.entry(k).or_default().insert(pod);
            }
        }
        let active = Active {
            pod,
            prefill_tokens: prefill,
            keys: Arc::clone(&self.keys),
        };
        // Depths change with the active set: the next request re-analyses.
        self.last = None;
        if let Some(old) = self.requests.insert(req.id, active) {
            self.release(old);
        }
    }

    fn on_first_token(&mut self, _now: f64, req: &SimRequest, _pod: PodIndex) {
        if let Some(a) = self.requests.get_mut(&req.id) {
            self.prefill_tokens[a.pod] =
                self.prefill_tokens[a.pod].saturating_sub(a.prefill_tokens);
            a.prefill_tokens = 0;
        }
    }

    fn on_finish(&mut self, _now: f64, req: &SimRequest, _pod: PodIndex) {
        if let Some(a) = self.requests.remove(&req.id) {
            self.release(a);
            self.last = None;
        }
    }

    fn on_events(&mut self, _now: f64, pod: PodIndex, events: &[KvEvent]) {
        self.index.apply(pod, events);
        self.last = None;
    }
}

impl Dynamo {
    fn release(&mut self, a: Active) {
        let pod = a.pod;
        self.prefill_tokens[pod] = self.prefill_tokens[pod].saturating_sub(a.prefill_tokens);
        self.active_requests[pod] = self.active_requests[pod].saturating_sub(1);
        for &k in a.keys.iter() {
            if let Some(n) = self.block_refs.get_mut(&(k, pod as u32)) {
                *n -= 1;
                if *n == 0 {
                    self.block_refs.remove(&(k, pod as u32));
                    self.active_blocks[pod] = self.active_blocks[pod].saturating_sub(1);
                    if let Some(s) = self.block_workers.get_mut(&k) {
                        s.remove(pod);
                        if s.is_empty() {
                            self.block_workers.remove(&k);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::{req_range, route_dispatch, scrapes, signals, stored_prefix};

    fn dynamo(pods: usize) -> Dynamo {
        Dynamo::new(pods, 1, DynamoConfig::default()).expect("valid")
    }

    #[test]
    fn picks_the_worker_with_the_overlap_when_idle() {
        let mut d = dynamo(2);
        assert_eq!(d.name(), "dynamo");
        let r = req_range(0, 0, 160); // 10 blocks
        d.on_events(0.0, 1, &[stored_prefix(&r, 6)]);
        // w0: 160/16 − 0 + (0 + 10) = 20; w1: 10 − 6 + 10 = 14.
        let s = scrapes(&[(0, 0.0); 2]);
        assert_eq!(d.route(&r, &signals(0.0, &s)), 1);
        assert_eq!(d.cost(0, 160), 20.0);
        assert_eq!(d.cost(1, 160), 14.0);
    }

    #[test]
    fn prefill_load_moves_the_pick_and_the_first_token_releases_it() {
        let mut d = dynamo(2);
        let s = scrapes(&[(0, 0.0); 2]);
        let r = req_range(0, 0, 160);
        d.on_events(0.0, 1, &[stored_prefix(&r, 6)]);
        // An unrelated 320-token request (20 blocks) on w1.
        let big = req_range(1, 50_000, 320);
        d.on_dispatch(0.0, &big, 1);
        assert_eq!(d.active_prefill_tokens(1), 320);
        assert_eq!(d.active_decode_blocks(1), 20);
        // w0: 10 + 10 = 20; w1: (320 + 160)/16 − 6 + (20 + 10) = 54.
        assert_eq!(d.route(&r, &signals(0.0, &s)), 0);
        assert_eq!(d.cost(1, 160), 54.0);
        // First token: prefill released, decode blocks stay: w1 = 4 + 30 = 34.
        d.on_first_token(0.1, &big, 1);
        d.route(&r, &signals(0.1, &s));
        assert_eq!(d.cost(1, 160), 34.0);
        // Finish: w1 = 4 + 10 = 14 < 20.
        d.on_finish(0.2, &big, 1);
        assert_eq!(d.route(&r, &signals(0.2, &s)), 1);
        assert_eq!(d.active_decode_blocks(1), 0);
    }

    #[test]
    fn shared_active_blocks_count_once_and_reduce_new_blocks() {
        let mut d = dynamo(2);
        let s = scrapes(&[(0, 0.0); 2]);
        let a = req_range(0, 0, 160);
        d.on_dispatch(0.0, &a, 0);
        d.on_first_token(0.0, &a, 0);
        // The same prompt again on w0: its 10 blocks are already active.
        let a2 = req_range(1, 0, 160);
        d.on_dispatch(0.0, &a2, 0);
        d.on_first_token(0.0, &a2, 0);
        assert_eq!(d.active_decode_blocks(0), 10);
        // A third copy: w0 = 10 (prefill, no event overlap) + 10 + 0 new =
        // 20; w1 = 10 + 0 + 10 = 20: an exact tie, broken at random.
        let a3 = req_range(2, 0, 160);
        d.route(&a3, &signals(0.0, &s));
        assert_eq!(d.cost(0, 160), 20.0);
        assert_eq!(d.cost(1, 160), 20.0);
        let mut seen = [0; 2];
        for _ in 0..200 {
            seen[d.route(&a3, &signals(0.0, &s))] += 1;
        }
        assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
        // One copy finishing leaves the blocks active for the other.
        d.on_finish(0.1, &a, 0);
        assert_eq!(d.active_decode_blocks(0), 10);
        d.on_finish(0.1, &a2, 0);
        assert_eq!(d.active_decode_blocks(0), 0);
    }

    #[test]
    fn the_prefill_term_is_clamped_at_zero() {
        let cfg = DynamoConfig {
            overlap_score_credit: 3.0,
            ..DynamoConfig::default()
        };
        let mut d = Dynamo::new(1, 1, cfg).expect("valid");
        let r = req_range(0, 0, 160);
        d.on_events(0.0, 0, &[stored_prefix(&r, 10)]);
        d.route(&r, &signals(0.0, &scrapes(&[(0, 0.0)])));
        // max(10 − 3·10, 0) + 10 new blocks.
        assert_eq!(d.cost(0, 160), 10.0);
    }

    #[test]
    fn dispatch_charges_the_uncached_prompt_of_the_chosen_worker() {
        let mut d = dynamo(2);
        let s = scrapes(&[(0, 0.0); 2]);
        let r = req_range(0, 0, 170); // 10 full blocks + 10 tokens
        d.on_events(0.0, 1, &[stored_prefix(&r, 4)]);
        let pod = route_dispatch(&mut d, &r, 0.0, &s);
        assert_eq!(pod, 1);
        assert_eq!(d.active_prefill_tokens(1), 170 - 64);
    }

    #[test]
    fn positive_temperature_favours_but_does_not_force_the_cheapest() {
        let cfg = DynamoConfig {
            router_temperature: 0.5,
            ..DynamoConfig::default()
        };
        let mut d = Dynamo::new(2, 5, cfg).expect("valid");
        // Costs 0 and 1 after normalisation: p = 1/(1 + e^-2) = 0.881.
        let mut seen = [0u32; 2];
        for _ in 0..2000 {
            seen[d.select(&[3.0, 5.0])] += 1;
        }
        assert!((1650..1870).contains(&seen[0]), "{seen:?}");
    }
}
