//! llm-d's precise prefix-cache routing, in its two published forms:
//!
//! - [`LlmdPrecise`]: the `precise-prefix-cache-routing` guide since llm-d
//!   PR #2071 (llm-d-router @ebab687927f5): the prefix-cache affinity
//!   filter, then the token-load scorer over router-counted in-flight
//!   prompt tokens (peer notes 1.11);
//! - [`LlmdPreciseClassic`]: the older `precise-prefix-cache-aware` guide's
//!   weighted stack 2·precise prefix + 1·(1 − kv usage) + 1·queue min-max
//!   (v0.8.0-rc.1 values, peer notes 1.3–1.5, 1.8).
//!
//! Both index the engines' KV events ([`EventIndex`]) and can add llm-d's
//! speculative entries: right after a pick, the chosen pod is believed to
//! hold every full block of the request for `speculativeTTL`, before any
//! `BlockStored` arrives. The helpers shared with the approximate stack
//! ([`super::gie`]) — scraped gauges, the queue scorer and the max-score
//! picker — live here too.

use super::config_error::{ConfigError, check, check_pods};
use super::event_index::{EventIndex, key};
use super::podset::{PodSet, leading_runs};
use super::rng::{SplitMix64, pick_best};
use super::{PodIndex, Policy, Signals};
use crate::request::SimRequest;
use fnv::FnvHashMap;
use kvroute_core::events::KvEvent;
use std::collections::VecDeque;
use std::sync::Arc;

/// `(num_requests_waiting, kv_cache_usage_perc)` of `pod` as last scraped;
/// before the first scrape both read 0, as the EPP's empty metrics do.
pub(crate) fn scraped(signals: &Signals<'_>, pod: PodIndex) -> (f64, f64) {
    match signals.scrapes.get(pod).copied().flatten() {
        Some(s) => (f64::from(s.waiting), s.kv_usage),
        None => (0.0, 0.0),
    }
}

/// llm-d's `queue-scorer`: min-max of the waiting queue over the pods, 1.0
/// everywhere when all queues are equal.
pub(crate) fn queue_scores(signals: &Signals<'_>, pods: usize, out: &mut Vec<f64>) {
    out.clear();
    out.extend((0..pods).map(|p| scraped(signals, p).0));
    let min = out.iter().copied().fold(f64::INFINITY, f64::min);
    let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for q in out.iter_mut() {
        *q = if max == min {
            1.0
        } else {
            (max - *q) / (max - min)
        };
    }
}

/// llm-d's `kv-cache-utilization-scorer`: `1 − u`, clamped as the
/// framework clamps every score.
pub(crate) fn kv_util_score(signals: &Signals<'_>, pod: PodIndex) -> f64 {
    (1.0 - scraped(signals, pod).1).clamp(0.0, 1.0)
}

/// `max-score-picker`: the highest total, exact ties uniformly at random
/// (the picker shuffles, then stable-sorts by score).
pub(crate) fn max_score(
    rng: &mut SplitMix64,
    totals: impl IntoIterator<Item = (PodIndex, f64)>,
) -> PodIndex {
    pick_best(rng, totals, |a, b| a > b).unwrap_or(0)
}

/// llm-d's speculative index entries: `(pod, expiry)` per block key, for
/// the keys of requests dispatched within the last TTL.
#[derive(Debug, Default)]
struct Speculative {
    entries: FnvHashMap<u64, Vec<(PodIndex, f64)>>,
    queue: VecDeque<(f64, PodIndex, Arc<[u64]>)>,
}

impl Speculative {
    fn add(&mut self, pod: PodIndex, keys: Arc<[u64]>, expires: f64) {
        for &k in keys.iter() {
            let v = self.entries.entry(k).or_default();
            match v.iter_mut().find(|(p, _)| *p == pod) {
                Some(e) => e.1 = e.1.max(expires),
                None => v.push((pod, expires)),
            }
        }
        self.queue.push_back((expires, pod, keys));
    }

    fn expire(&mut self, now: f64) {
        while self.queue.front().is_some_and(|(e, _, _)| *e <= now) {
            let Some((_, pod, keys)) = self.queue.pop_front() else {
                break;
            };
            for k in keys.iter() {
                if let Some(v) = self.entries.get_mut(k) {
                    // A later dispatch to the same pod may have renewed it.
                    v.retain(|(p, e)| !(*p == pod && *e <= now));
                    if v.is_empty() {
                        self.entries.remove(k);
                    }
                }
            }
        }
    }

    fn holders(&self, k: u64, now: f64, set: &mut PodSet) {
        if let Some(v) = self.entries.get(&k) {
            for &(p, e) in v {
                if e > now {
                    set.insert(p);
                }
            }
        }
    }
}

/// The precise producer's state: the event index, speculative entries, and
/// the last request's keys and per-pod matched blocks (`M_p`).
#[derive(Debug)]
struct PreciseMatch {
    index: EventIndex,
    spec: Speculative,
    keys: Arc<[u64]>,
    runs: Vec<usize>,
    /// The request `keys` / `runs` belong to.
    matched: Option<u64>,
}

impl PreciseMatch {
    fn new(pods: usize) -> PreciseMatch {
        PreciseMatch {
            index: EventIndex::new(pods),
            spec: Speculative::default(),
            keys: Arc::from(Vec::new()),
            runs: vec![0; pods],
            matched: None,
        }
    }

    /// Computes `M_p` of `req` for every pod: its leading run in the event
    /// index or the speculative entries (a block counts for a pod if either
    /// holds it; single tier, so `M_p = floor(raw_p) = m_p`).
    fn match_request(&mut self, req: &SimRequest, now: f64) {
        self.spec.expire(now);
        self.keys = req.block_hashes().iter().map(key).collect();
        let (index, spec, keys) = (&self.index, &self.spec, &self.keys);
        leading_runs(keys.len(), &mut self.runs, |i, set| {
            if let Some(s) = index.get(keys[i]) {
                set.union_with(s);
            }
            spec.holders(keys[i], now, set);
        });
        self.matched = Some(req.id);
    }

    /// `M_pod` of `req`, from the routing decision when it was the last one
    /// matched.
    fn matched_blocks(&mut self, req: &SimRequest, pod: PodIndex, now: f64) -> usize {
        if self.matched != Some(req.id) {
            self.match_request(req, now);
        }
        self.runs.get(pod).copied().unwrap_or(0)
    }
}

/// What the token-load scorer's `U_p` and the in-flight charge count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UncachedTokens {
    /// `U_p = L − M_p·B` in the score and in the charge: the design intent
    /// (#2148's producer name), the peer notes' primary run.
    Discounted,
    /// `U_p = L` in the score, the charge still discounted: what about 3 of
    /// 4 EPP starts do when the in-flight producer runs before the precise
    /// producer (peer notes 1.11.5 caveat).
    PromptLen,
    /// `U_p = L` and a full-`L` charge: the #2071 configuration, whose
    /// in-flight producer had no producer name.
    Pr2071,
}

/// [`LlmdPrecise`]'s parameters; `Default` is the guide's values.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmdPreciseConfig {
    /// θ, `affinityThreshold`: a pod is sticky when `M_p / n ≥ θ` (0.80).
    pub affinity_threshold: f64,
    /// `explorationProbability`: per request, skip the filter (0).
    pub exploration_probability: f64,
    /// Δ, `maxTTFTPenaltyMs` (18000 ms): stickiness breaks when the best
    /// sticky pod's estimated wait exceeds the best other pod's by more.
    pub max_ttft_penalty_ms: f64,
    /// R, `peakPrefillThroughput` in tokens/s (the guide's 15926; the
    /// simulator should pass its engines' own single-chunk prefill rate).
    pub peak_prefill_throughput: f64,
    /// T, `queueThresholdTokens` (4,194,304); 0 falls back to it.
    pub queue_threshold_tokens: u64,
    /// B, tokens per block: the engines' block size (the simulated engines
    /// use 16; the guide's 64 needs engines at 64 too).
    pub block_size: usize,
    /// `speculativeIndexing` (on in the guide).
    pub speculative_indexing: bool,
    /// `speculativeTTL` in seconds (2).
    pub speculative_ttl_s: f64,
    /// Which `U_p` / charge variant to run.
    pub uncached: UncachedTokens,
}

/// The guide's and the code's default T.
pub const DEFAULT_QUEUE_THRESHOLD_TOKENS: u64 = 4_194_304;

impl Default for LlmdPreciseConfig {
    fn default() -> Self {
        LlmdPreciseConfig {
            affinity_threshold: 0.80,
            exploration_probability: 0.0,
            max_ttft_penalty_ms: 18_000.0,
            peak_prefill_throughput: 15_926.0,
            queue_threshold_tokens: DEFAULT_QUEUE_THRESHOLD_TOKENS,
            block_size: 16,
            speculative_indexing: true,
            speculative_ttl_s: 2.0,
            uncached: UncachedTokens::Discounted,
        }
    }
}

/// llm-d's current precise guide: affinity filter + token-load scorer.
///
/// ```text
/// S  = {p : M_p/n ≥ θ},  N = P \ S
/// P' = P if |P| ≤ 1, θ ≤ 0, exploration fires, S = ∅,
///         or N ≠ ∅ and Δ > 0 and (min_S F − min_N F)·1000/R > Δ
///    = S otherwise
/// pick = argmax_{P'} 1 − min(F_p + U_p, T)/T, ties at random
/// ```
///
/// `F_p` (router-counted uncached prompt tokens in flight) is charged at
/// dispatch with the chosen pod's `U` and released at the first token (or
/// at finish if no first token was seen). No scraped metric enters.
#[derive(Debug)]
pub struct LlmdPrecise {
    cfg: LlmdPreciseConfig,
    pods: usize,
    rng: SplitMix64,
    state: PreciseMatch,
    /// `F_p`.
    in_flight: Vec<u64>,
    /// Tokens each in-flight request still holds on its pod.
    charged: FnvHashMap<u64, (PodIndex, u64)>,
    name: &'static str,
}

impl LlmdPrecise {
    pub fn new(
        pods: usize,
        seed: u64,
        mut cfg: LlmdPreciseConfig,
    ) -> Result<LlmdPrecise, ConfigError> {
        check_pods(pods)?;
        let t = cfg.affinity_threshold;
        check(
            t <= 1.0 && !t.is_nan(),
            "affinityThreshold",
            t,
            "must be at most 1",
        )?;
        let e = cfg.exploration_probability;
        check(
            (0.0..=1.0).contains(&e),
            "explorationProbability",
            e,
            "must be in [0, 1]",
        )?;
        let d = cfg.max_ttft_penalty_ms;
        check(d >= 0.0, "maxTTFTPenaltyMs", d, "must not be negative")?;
        let r = cfg.peak_prefill_throughput;
        check(
            d == 0.0 || r > 0.0,
            "peakPrefillThroughput",
            r,
            "must be positive when maxTTFTPenaltyMs > 0",
        )?;
        let b = cfg.block_size;
        check(b > 0, "blockSize", b as f64, "must be positive")?;
        let ttl = cfg.speculative_ttl_s;
        check(ttl >= 0.0, "speculativeTTL", ttl, "must not be negative")?;
        if cfg.queue_threshold_tokens == 0 {
            cfg.queue_threshold_tokens = DEFAULT_QUEUE_THRESHOLD_TOKENS;
        }
        let name = match cfg.uncached {
            UncachedTokens::Discounted => "llm-d-precise",
            UncachedTokens::PromptLen => "llm-d-precise-u=L",
            UncachedTokens::Pr2071 => "llm-d-precise-2071",
        };
        Ok(LlmdPrecise {
            cfg,
            pods,
            rng: SplitMix64::new(seed),
            state: PreciseMatch::new(pods),
            in_flight: vec![0; pods],
            charged: FnvHashMap::default(),
            name,
        })
    }

    /// `F_p`: uncached prompt tokens in flight on `pod`, as this router
    /// counts them.
    pub fn in_flight_tokens(&self, pod: PodIndex) -> u64 {
        self.in_flight.get(pod).copied().unwrap_or(0)
    }

    /// The in-flight margin in tokens beyond which stickiness breaks:
    /// `Δ·R/1000` (286,668 with the guide's values).
    pub fn break_margin_tokens(&self) -> f64 {
        self.cfg.max_ttft_penalty_ms * self.cfg.peak_prefill_throughput / 1000.0
    }

    fn release(&mut self, req: &SimRequest) {
        if let Some((pod, tokens)) = self.charged.remove(&req.id) {
            self.in_flight[pod] = self.in_flight[pod].saturating_sub(tokens);
        }
    }
}

impl Policy for LlmdPrecise {
    fn name(&self) -> &str {
        self.name
    }

    fn wants_events(&self) -> bool {
        true
    }

    fn route(&mut self, req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        let now = signals.now;
        self.state.match_request(req, now);
        let n = self.state.keys.len();
        let runs = &self.state.runs;
        let l = req.prompt_len() as u64;
        let b = self.cfg.block_size as u64;
        let u = |p: PodIndex| match self.cfg.uncached {
            UncachedTokens::Discounted => l.saturating_sub(runs[p] as u64 * b),
            UncachedTokens::PromptLen | UncachedTokens::Pr2071 => l,
        };
        let affinity = |p: PodIndex| {
            if n == 0 {
                0.0
            } else {
                runs[p] as f64 / n as f64
            }
        };

        // The filter, in the plugin's order of checks.
        let theta = self.cfg.affinity_threshold;
        let mut keep_all = self.pods <= 1 || theta <= 0.0;
        let explore = self.cfg.exploration_probability;
        if !keep_all && explore > 0.0 && self.rng.next_f64() < explore {
            keep_all = true;
        }
        let mut sticky = PodSet::new();
        if !keep_all {
            let (mut min_s, mut min_n) = (u64::MAX, u64::MAX);
            for p in 0..self.pods {
                if affinity(p) >= theta {
                    sticky.insert(p);
                    min_s = min_s.min(self.in_flight[p]);
                } else {
                    min_n = min_n.min(self.in_flight[p]);
                }
            }
            let delta = self.cfg.max_ttft_penalty_ms;
            if sticky.is_empty() {
                keep_all = true;
            } else if min_n != u64::MAX && delta > 0.0 {
                let gap_ms =
                    (min_s as f64 - min_n as f64) * 1000.0 / self.cfg.peak_prefill_throughput;
                keep_all = gap_ms > delta;
            }
        }

        let t = self.cfg.queue_threshold_tokens as f64;
        let in_flight = &self.in_flight;
        let scored = (0..self.pods)
            .filter(|&p| keep_all || sticky.contains(p))
            .map(|p| (p, 1.0 - ((in_flight[p] + u(p)) as f64).min(t) / t));
        max_score(&mut self.rng, scored)
    }

    fn on_dispatch(&mut self, now: f64, req: &SimRequest, pod: PodIndex) {
        if pod >= self.pods {
            return;
        }
        let m = self.state.matched_blocks(req, pod, now) as u64;
        let l = req.prompt_len() as u64;
        let charge = match self.cfg.uncached {
            UncachedTokens::Pr2071 => l,
            _ => l.saturating_sub(m * self.cfg.block_size as u64),
        };
        self.release(req);
        self.in_flight[pod] += charge;
        self.charged.insert(req.id, (pod, charge));
        if self.cfg.speculative_indexing && !self.state.keys.is_empty() {
            let keys = Arc::clone(&self.state.keys);
            self.state
                .spec
                .add(pod, keys, now + self.cfg.speculative_ttl_s);
        }
    }

    fn on_first_token(&mut self, _now: f64, req: &SimRequest, _pod: PodIndex) {
        self.release(req);
    }

    fn on_finish(&mut self, _now: f64, req: &SimRequest, _pod: PodIndex) {
        self.release(req);
    }

    fn on_events(&mut self, _now: f64, pod: PodIndex, events: &[KvEvent]) {
        self.state.index.apply(pod, events);
        self.state.matched = None;
    }
}

/// [`LlmdPreciseClassic`]'s parameters; `Default` is the v0.8.0-rc.1 guide.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmdPreciseClassicConfig {
    /// `precise-prefix-cache-scorer` weight (2).
    pub prefix_weight: f64,
    /// `kv-cache-utilization-scorer` weight (1).
    pub kv_util_weight: f64,
    /// `queue-scorer` weight (1).
    pub queue_weight: f64,
    /// `speculativeIndexing` (off: the scorer's default).
    pub speculative_indexing: bool,
    /// `speculativeTTL` in seconds (2).
    pub speculative_ttl_s: f64,
}

impl Default for LlmdPreciseClassicConfig {
    fn default() -> Self {
        LlmdPreciseClassicConfig {
            prefix_weight: 2.0,
            kv_util_weight: 1.0,
            queue_weight: 1.0,
            speculative_indexing: false,
            speculative_ttl_s: 2.0,
        }
    }
}

/// llm-d's older precise guide: argmax of
/// `w_prefix·M_p/n + w_kv·(1 − u_p) + w_queue·queue_minmax_p`, with `u`
/// and the queue scraped.
#[derive(Debug)]
pub struct LlmdPreciseClassic {
    cfg: LlmdPreciseClassicConfig,
    pods: usize,
    rng: SplitMix64,
    state: PreciseMatch,
    queue: Vec<f64>,
    name: String,
}

impl LlmdPreciseClassic {
    pub fn new(
        pods: usize,
        seed: u64,
        cfg: LlmdPreciseClassicConfig,
    ) -> Result<LlmdPreciseClassic, ConfigError> {
        check_pods(pods)?;
        for (name, w) in [
            ("prefix weight", cfg.prefix_weight),
            ("kv-util weight", cfg.kv_util_weight),
            ("queue weight", cfg.queue_weight),
        ] {
            check(w >= 0.0, name, w, "must not be negative")?;
        }
        let ttl = cfg.speculative_ttl_s;
        check(ttl >= 0.0, "speculativeTTL", ttl, "must not be negative")?;
        let name = format!(
            "llm-d-precise-{}:{}:{}",
            cfg.prefix_weight, cfg.kv_util_weight, cfg.queue_weight
        );
        Ok(LlmdPreciseClassic {
            cfg,
            pods,
            rng: SplitMix64::new(seed),
            state: PreciseMatch::new(pods),
            queue: Vec::with_capacity(pods),
            name,
        })
    }
}

impl Policy for LlmdPreciseClassic {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants_events(&self) -> bool {
        true
    }

    fn route(&mut self, req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        self.state.match_request(req, signals.now);
        queue_scores(signals, self.pods, &mut self.queue);
        let n = self.state.keys.len();
        let (runs, queue, cfg) = (&self.state.runs, &self.queue, &self.cfg);
        let totals = (0..self.pods).map(|p| {
            let prefix = if n == 0 || runs[p] == 0 {
                0.0
            } else {
                (runs[p] as f64 / n as f64).min(1.0)
            };
            let total = cfg.prefix_weight * prefix
                + cfg.kv_util_weight * kv_util_score(signals, p)
                + cfg.queue_weight * queue[p];
            (p, total)
        });
        max_score(&mut self.rng, totals)
    }

    fn on_dispatch(&mut self, now: f64, req: &SimRequest, pod: PodIndex) {
        if self.cfg.speculative_indexing && pod < self.pods {
            self.state.matched_blocks(req, pod, now);
            if !self.state.keys.is_empty() {
                let keys = Arc::clone(&self.state.keys);
                self.state
                    .spec
                    .add(pod, keys, now + self.cfg.speculative_ttl_s);
            }
        }
    }

    fn on_events(&mut self, _now: f64, pod: PodIndex, events: &[KvEvent]) {
        self.state.index.apply(pod, events);
        self.state.matched = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::{req_range, route_dispatch, scrapes, signals, stored_prefix};

    /// The shared 165-token prompt: 10 full blocks of 16 plus 5 tokens.
    fn prompt(id: u64) -> SimRequest {
        req_range(id, 0, 165)
    }

    /// Pod 0 holds all 10 blocks (a = 1.0), pod 1 eight (0.8, sticky at
    /// exactly θ), pod 2 five (0.5).
    fn warm(p: &mut dyn Policy) {
        let r = prompt(0);
        p.on_events(0.0, 0, &[stored_prefix(&r, 10)]);
        p.on_events(0.0, 1, &[stored_prefix(&r, 8)]);
        p.on_events(0.0, 2, &[stored_prefix(&r, 5)]);
    }

    fn small_margin() -> LlmdPreciseConfig {
        // Δ·R/1000 = 100 ms · 1000 tok/s = 100 tokens of margin.
        LlmdPreciseConfig {
            max_ttft_penalty_ms: 100.0,
            peak_prefill_throughput: 1000.0,
            speculative_indexing: false,
            ..LlmdPreciseConfig::default()
        }
    }

    /// Loads pod `pod` with an unrelated, uncached `len`-token request.
    fn load(p: &mut LlmdPrecise, id: u64, pod: PodIndex, len: u32) {
        let r = req_range(id, 1_000_000 + id as u32 * 10_000, len);
        p.on_dispatch(0.0, &r, pod);
    }

    #[test]
    fn defaults_are_the_guides() {
        let p = LlmdPrecise::new(4, 1, LlmdPreciseConfig::default()).expect("valid");
        assert_eq!(p.name(), "llm-d-precise");
        assert!(p.wants_events() && !p.wants_truth());
        // 18 s × 15926 tok/s.
        assert_eq!(p.break_margin_tokens(), 286_668.0);
    }

    #[test]
    fn sticks_to_the_best_sticky_pod_when_idle() {
        let mut p = LlmdPrecise::new(3, 1, small_margin()).expect("valid");
        warm(&mut p);
        // S = {0, 1}; U = 165 − 160 = 5 on pod 0, 165 − 128 = 37 on pod 1.
        let none = scrapes(&[(0, 0.0); 3]);
        assert_eq!(p.route(&prompt(1), &signals(0.0, &none)), 0);
    }

    #[test]
    fn a_margin_of_exactly_delta_keeps_the_filter() {
        let mut p = LlmdPrecise::new(3, 1, small_margin()).expect("valid");
        warm(&mut p);
        load(&mut p, 10, 0, 100);
        load(&mut p, 11, 1, 100);
        // min_S F − min_N F = 100 − 0 = 100 tokens = 100 ms: not > Δ, so
        // P' = S; pod 0: 100 + 5 = 105 < pod 1: 100 + 37.
        let none = scrapes(&[(0, 0.0); 3]);
        assert_eq!(p.in_flight_tokens(0), 100);
        assert_eq!(p.route(&prompt(1), &signals(0.0, &none)), 0);
    }

    #[test]
    fn breaks_to_the_cold_pod_past_the_margin_and_returns_after_first_token() {
        let mut p = LlmdPrecise::new(3, 1, small_margin()).expect("valid");
        warm(&mut p);
        load(&mut p, 10, 0, 101);
        load(&mut p, 11, 1, 101);
        // 101 ms > 100 ms: P' = P. F + U: 101 + 5, 101 + 37, 0 + 85.
        let none = scrapes(&[(0, 0.0); 3]);
        assert_eq!(p.route(&prompt(1), &signals(0.0, &none)), 2);
        // Pod 0's first token releases its 101 tokens: the gap is 0 again.
        let r10 = req_range(10, 1_000_000 + 10 * 10_000, 101);
        p.on_first_token(0.1, &r10, 0);
        assert_eq!(p.in_flight_tokens(0), 0);
        assert_eq!(p.route(&prompt(2), &signals(0.1, &none)), 0);
        // Finishing after the first token releases nothing more.
        p.on_finish(0.2, &r10, 0);
        assert_eq!(p.in_flight_tokens(0), 0);
    }

    #[test]
    fn without_sticky_pods_the_least_loaded_wins_and_charges_its_uncached_tokens() {
        let mut p = LlmdPrecise::new(3, 1, small_margin()).expect("valid");
        let r = prompt(0);
        // Pod 1 holds 7/10 = 0.7 < θ: no sticky pod.
        p.on_events(0.0, 1, &[stored_prefix(&r, 7)]);
        load(&mut p, 10, 0, 40);
        load(&mut p, 11, 2, 60);
        // F + U: pod 0 40 + 165 = 205, pod 1 0 + (165 − 112) = 53, pod 2 60 + 165.
        let none = scrapes(&[(0, 0.0); 3]);
        assert_eq!(route_dispatch(&mut p, &prompt(1), 0.0, &none), 1);
        assert_eq!(p.in_flight_tokens(1), 53);
    }

    #[test]
    fn prompt_len_mode_ties_sticky_pods_at_random() {
        let cfg = LlmdPreciseConfig {
            uncached: UncachedTokens::PromptLen,
            ..small_margin()
        };
        let none = scrapes(&[(0, 0.0); 3]);
        let mut seen = [0u32; 3];
        for seed in 0..64 {
            let mut p = LlmdPrecise::new(3, seed, cfg.clone()).expect("valid");
            assert_eq!(p.name(), "llm-d-precise-u=L");
            warm(&mut p);
            // U = L on every pod and F = 0: pods 0 and 1 (S) tie.
            seen[p.route(&prompt(1), &signals(0.0, &none))] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 10 && seen[1] > 10, "{seen:?}");
    }

    #[test]
    fn pr2071_charges_the_full_prompt() {
        let cfg = LlmdPreciseConfig {
            uncached: UncachedTokens::Pr2071,
            ..small_margin()
        };
        let mut p = LlmdPrecise::new(3, 1, cfg).expect("valid");
        warm(&mut p);
        let none = scrapes(&[(0, 0.0); 3]);
        let pod = route_dispatch(&mut p, &prompt(1), 0.0, &none);
        assert_eq!(p.in_flight_tokens(pod), 165);
    }

    #[test]
    fn speculative_entries_make_the_chosen_pod_sticky_for_the_ttl() {
        let cfg = LlmdPreciseConfig::default();
        let mut p = LlmdPrecise::new(3, 7, cfg).expect("valid");
        let none = scrapes(&[(0, 0.0); 3]);
        // Cold fleet: all tie, some pod is chosen and charged 165 tokens.
        let first = route_dispatch(&mut p, &prompt(1), 0.0, &none);
        assert_eq!(p.in_flight_tokens(first), 165);
        // 0.5 s later, with no event yet: the speculative entries give
        // `first` all 10 blocks (sticky), and the 165-token gap is far below
        // the 286,668-token margin.
        assert_eq!(p.route(&prompt(2), &signals(0.5, &none)), first);
        // After the 2 s TTL the entries are gone: no sticky pod, and `first`
        // is the only one with tokens in flight.
        let later = p.route(&prompt(3), &signals(2.5, &none));
        assert_ne!(later, first);
    }

    #[test]
    fn a_prompt_shorter_than_a_block_has_no_affinity() {
        let mut p = LlmdPrecise::new(2, 3, small_margin()).expect("valid");
        load(&mut p, 10, 0, 10);
        let none = scrapes(&[(0, 0.0); 2]);
        let short = req_range(1, 0, 15);
        assert_eq!(route_dispatch(&mut p, &short, 0.0, &none), 1);
        assert_eq!(p.in_flight_tokens(1), 15);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = |cfg: LlmdPreciseConfig| LlmdPrecise::new(2, 0, cfg).is_err();
        let d = LlmdPreciseConfig::default;
        assert!(bad(LlmdPreciseConfig {
            affinity_threshold: 1.1,
            ..d()
        }));
        assert!(bad(LlmdPreciseConfig {
            max_ttft_penalty_ms: -1.0,
            ..d()
        }));
        assert!(bad(LlmdPreciseConfig {
            peak_prefill_throughput: 0.0,
            ..d()
        }));
        assert!(bad(LlmdPreciseConfig {
            exploration_probability: 2.0,
            ..d()
        }));
        assert!(bad(LlmdPreciseConfig {
            block_size: 0,
            ..d()
        }));
        assert!(matches!(
            LlmdPrecise::new(0, 0, d()),
            Err(ConfigError::NoPods)
        ));
        // Δ = 0 (always stick) needs no R.
        assert!(!bad(LlmdPreciseConfig {
            max_ttft_penalty_ms: 0.0,
            peak_prefill_throughput: 0.0,
            ..d()
        }));
    }

    #[test]
    fn classic_weighs_prefix_kv_and_queue_two_one_one() {
        let mut p =
            LlmdPreciseClassic::new(2, 1, LlmdPreciseClassicConfig::default()).expect("valid");
        assert_eq!(p.name(), "llm-d-precise-2:1:1");
        let r = prompt(0);
        p.on_events(0.0, 0, &[stored_prefix(&r, 8)]);
        // Pod 0: 2·0.8 + (1 − 0.5) + queue (4 is the max: 0) = 2.1;
        // pod 1: 0 + (1 − 0.1) + 1 = 1.9.
        let s = scrapes(&[(4, 0.5), (0, 0.1)]);
        assert_eq!(p.route(&prompt(1), &signals(0.0, &s)), 0);
        // Pod 0 at 90 % usage: 1.6 + 0.1 + 0 = 1.7 < 1.9.
        let s = scrapes(&[(4, 0.9), (0, 0.1)]);
        assert_eq!(p.route(&prompt(2), &signals(0.0, &s)), 1);
    }

    #[test]
    fn classic_before_any_scrape_reads_zero_load() {
        let mut p =
            LlmdPreciseClassic::new(3, 1, LlmdPreciseClassicConfig::default()).expect("valid");
        let r = prompt(0);
        p.on_events(0.0, 2, &[stored_prefix(&r, 3)]);
        // Every pod: kv 1, queue 1; only pod 2 adds 2·0.3.
        let none = vec![None; 3];
        assert_eq!(p.route(&prompt(1), &signals(0.0, &none)), 2);
    }

    #[test]
    fn queue_scores_are_min_max() {
        let s = scrapes(&[(2, 0.0), (6, 0.0), (4, 0.0)]);
        let mut out = Vec::new();
        queue_scores(&signals(0.0, &s), 3, &mut out);
        assert_eq!(out, vec![1.0, 0.0, 0.5]);
        let s = scrapes(&[(3, 0.0), (3, 0.0)]);
        queue_scores(&signals(0.0, &s), 2, &mut out);
        assert_eq!(out, vec![1.0, 1.0]);
    }
}
