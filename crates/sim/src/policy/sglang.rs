//! SGLang router's `cache_aware` policy (sgl-router
//! `src/policies/cache_aware.rs` @026f853b, `tree.rs`; defaults of the
//! current CLI; peer notes 3):
//!
//! ```text
//! imbalanced = fmax − fmin > 64  and  fmax > 1.5·fmin        (f: in flight)
//! imbalanced:  pick = min-load worker (first in list order)
//! otherwise:   (len, tenant) = prefix_match(tree, prompt)
//!              pick = tenant            if len / |prompt| > 0.3
//!                   = smallest tree     otherwise (SMG: min-load)
//! then insert the prompt into pick's branch of the tree
//! ```
//!
//! Every 120 s a sweep shrinks each worker's share of the tree to at most
//! 2^26 characters (oldest leaves first). The router learns only from its
//! own routing: it never sees the engines' caches.

use super::config_error::{ConfigError, check, check_pods};
use super::radix::RadixTree;
use super::rng::{SplitMix64, pick_best};
use super::{PodIndex, Policy, Signals};
use crate::request::SimRequest;

/// What a cache miss (match rate at or below the threshold) picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMiss {
    /// sgl-router: the worker whose tree holds the fewest characters.
    SmallestTree,
    /// SMG (SGLang Model Gateway): the least-loaded worker.
    MinLoad,
}

/// [`SglangCacheAware`]'s parameters; `Default` is the current CLI's.
#[derive(Debug, Clone, PartialEq)]
pub struct SglangConfig {
    /// `cache_threshold` (0.3).
    pub cache_threshold: f64,
    /// `balance_abs_threshold` (64 requests).
    pub balance_abs_threshold: u64,
    /// `balance_rel_threshold` (1.5).
    pub balance_rel_threshold: f64,
    /// `eviction_interval_secs` (120).
    pub eviction_interval_s: f64,
    /// `max_tree_size`, characters per worker (2^26).
    pub max_tree_size_chars: u64,
    /// Characters a token stands for (4, the simulator's convention).
    pub chars_per_token: u64,
    /// The miss rule (sgl-router's smallest tree).
    pub miss: CacheMiss,
}

impl Default for SglangConfig {
    fn default() -> Self {
        SglangConfig {
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
            eviction_interval_s: 120.0,
            max_tree_size_chars: 1 << 26,
            chars_per_token: 4,
            miss: CacheMiss::SmallestTree,
        }
    }
}

#[derive(Debug)]
pub struct SglangCacheAware {
    cfg: SglangConfig,
    pods: usize,
    rng: SplitMix64,
    tree: RadixTree,
    load: Vec<u64>,
    next_eviction: f64,
    name: &'static str,
}

impl SglangCacheAware {
    pub fn new(pods: usize, seed: u64, cfg: SglangConfig) -> Result<SglangCacheAware, ConfigError> {
        check_pods(pods)?;
        let c = cfg.cache_threshold;
        check(
            (0.0..=1.0).contains(&c),
            "cache_threshold",
            c,
            "must be in [0, 1]",
        )?;
        let r = cfg.balance_rel_threshold;
        check(r >= 0.0, "balance_rel_threshold", r, "must not be negative")?;
        let e = cfg.eviction_interval_s;
        check(e > 0.0, "eviction_interval_secs", e, "must be positive")?;
        let k = cfg.chars_per_token;
        check(k > 0, "chars_per_token", k as f64, "must be positive")?;
        let name = match cfg.miss {
            CacheMiss::SmallestTree => "sglang",
            CacheMiss::MinLoad => "sglang-smg",
        };
        Ok(SglangCacheAware {
            next_eviction: cfg.eviction_interval_s,
            cfg,
            pods,
            rng: SplitMix64::new(seed),
            tree: RadixTree::new(pods),
            load: vec![0; pods],
            name,
        })
    }

    /// Runs the eviction sweeps due by `now` (the real router runs them on
    /// a timer; nothing changes between calls, so one sweep at the first
    /// call after the due time sees the same tree).
    fn maybe_evict(&mut self, now: f64) {
        if now < self.next_eviction {
            return;
        }
        let max_tokens = self.cfg.max_tree_size_chars / self.cfg.chars_per_token;
        self.tree.evict_by_size(max_tokens);
        let step = self.cfg.eviction_interval_s;
        let periods = ((now - self.next_eviction) / step).floor() + 1.0;
        self.next_eviction += periods * step;
    }

    /// The first least-loaded worker (sgl-router's list-order tie-break).
    fn min_load(&self) -> PodIndex {
        let min = self.load.iter().copied().min().unwrap_or(0);
        self.load.iter().position(|&f| f == min).unwrap_or(0)
    }

    /// Characters of the tree `pod` holds.
    pub fn tree_chars(&self, pod: PodIndex) -> u64 {
        self.tree.tenant_tokens(pod) * self.cfg.chars_per_token
    }

    /// Requests in flight on `pod` as this router counts them.
    pub fn load(&self, pod: PodIndex) -> u64 {
        self.load.get(pod).copied().unwrap_or(0)
    }
}

impl Policy for SglangCacheAware {
    fn name(&self) -> &str {
        self.name
    }

    fn route(&mut self, req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        let now = signals.now;
        self.maybe_evict(now);
        let fmax = self.load.iter().copied().max().unwrap_or(0);
        let fmin = self.load.iter().copied().min().unwrap_or(0);
        let imbalanced = fmax - fmin > self.cfg.balance_abs_threshold
            && fmax as f64 > fmin as f64 * self.cfg.balance_rel_threshold;
        if imbalanced {
            return self.min_load();
        }
        let (matched, tenant) = self.tree.prefix_match(&req.tokens, now, &mut self.rng);
        let len = req.prompt_len();
        let rate = if len == 0 {
            0.0
        } else {
            matched as f64 / len as f64
        };
        match tenant {
            Some(t) if rate > self.cfg.cache_threshold && t < self.pods => t,
            _ => match self.cfg.miss {
                CacheMiss::SmallestTree => {
                    let sizes = self.tree.tenant_sizes();
                    let items = (0..self.pods).map(|p| (p, sizes.get(p).copied().unwrap_or(0)));
                    pick_best(&mut self.rng, items, |a, b| a < b).unwrap_or(0)
                }
                CacheMiss::MinLoad => self.min_load(),
            },
        }
    }

    fn on_dispatch(&mut self, now: f64, req: &SimRequest, pod: PodIndex) {
        if pod >= self.pods {
            return;
        }
        self.maybe_evict(now);
        self.tree.insert(&req.tokens, pod, now);
        self.load[pod] += 1;
    }

    fn on_finish(&mut self, _now: f64, _req: &SimRequest, pod: PodIndex) {
        if let Some(f) = self.load.get_mut(pod) {
            *f = f.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::{req_range, req_tokens, route_dispatch, signals};

    fn sglang(pods: usize) -> SglangCacheAware {
        SglangCacheAware::new(pods, 1, SglangConfig::default()).expect("valid")
    }

    #[test]
    fn a_match_above_the_threshold_goes_to_its_tenant() {
        let mut s = sglang(3);
        assert_eq!(s.name(), "sglang");
        let none = vec![None; 3];
        // Cold: every tree is empty, the smallest-tree tie is random.
        let first = route_dispatch(&mut s, &req_range(0, 0, 100), 0.0, &none);
        assert_eq!(s.tree_chars(first), 400);
        // 40 of 100 tokens shared: 0.4 > 0.3 → the tenant holding them.
        let mut t: Vec<u32> = (0..40).collect();
        t.extend(5000..5060);
        assert_eq!(s.route(&req_tokens(1, t), &signals(1.0, &none)), first);
    }

    #[test]
    fn a_match_at_or_below_the_threshold_goes_to_the_smallest_tree() {
        let mut s = sglang(2);
        let none = vec![None; 2];
        // Pod 0 gets 100 tokens, pod 1 10 (forced dispatches).
        s.on_dispatch(0.0, &req_range(0, 0, 100), 0);
        s.on_dispatch(0.0, &req_range(1, 9000, 10), 1);
        // 30 of 100 shared with pod 0: 0.3 is not > 0.3 → smallest (pod 1).
        let mut t: Vec<u32> = (0..30).collect();
        t.extend(7000..7070);
        assert_eq!(s.route(&req_tokens(2, t), &signals(0.0, &none)), 1);
        // 31 of 100: 0.31 > 0.3 → pod 0.
        let mut t: Vec<u32> = (0..31).collect();
        t.extend(7000..7069);
        assert_eq!(s.route(&req_tokens(3, t), &signals(0.0, &none)), 0);
    }

    #[test]
    fn imbalance_sends_to_the_least_loaded_whatever_the_cache() {
        let mut s = sglang(3);
        let none = vec![None; 3];
        let hot = req_range(0, 0, 100);
        s.on_dispatch(0.0, &hot, 0);
        // Pod 0 at 66 in flight (65 more), pod 1 at 1, pod 2 at 2.
        for i in 0..65 {
            s.on_dispatch(0.0, &req_range(100 + i, 0, 100), 0);
        }
        s.on_dispatch(0.0, &req_range(200, 50_000, 10), 1);
        s.on_dispatch(0.0, &req_range(201, 60_000, 10), 2);
        s.on_dispatch(0.0, &req_range(202, 70_000, 10), 2);
        // 66 − 1 = 65 > 64 and 66 > 1.5: imbalanced → pod 1 (min load),
        // although pod 0 holds the whole prompt.
        assert_eq!(s.route(&hot, &signals(0.0, &none)), 1);
        // One finish on pod 0: 65 − 1 = 64, not > 64 → balanced → pod 0.
        s.on_finish(0.0, &hot, 0);
        assert_eq!(s.load(0), 65);
        assert_eq!(s.route(&hot, &signals(0.0, &none)), 0);
    }

    #[test]
    fn the_relative_threshold_also_has_to_fire() {
        let mut s = sglang(2);
        let none = vec![None; 2];
        let hot = req_range(0, 0, 100);
        // Pod 0 at 200, pod 1 at 135: gap 65 > 64 but 200 < 1.5·135.
        for i in 0..200 {
            s.on_dispatch(0.0, &req_range(i, 0, 100), 0);
        }
        for i in 0..135 {
            s.on_dispatch(0.0, &req_range(1000 + i, 90_000, 10), 1);
        }
        assert_eq!(s.route(&hot, &signals(0.0, &none)), 0);
    }

    #[test]
    fn the_smg_variant_misses_to_min_load() {
        let cfg = SglangConfig {
            miss: CacheMiss::MinLoad,
            ..SglangConfig::default()
        };
        let mut s = SglangCacheAware::new(2, 1, cfg).expect("valid");
        assert_eq!(s.name(), "sglang-smg");
        let none = vec![None; 2];
        // Pod 1 has the smaller tree but more load.
        s.on_dispatch(0.0, &req_range(0, 0, 100), 0);
        s.on_dispatch(0.0, &req_range(1, 9000, 10), 1);
        s.on_dispatch(0.0, &req_range(2, 9000, 10), 1);
        assert_eq!(s.route(&req_range(3, 40_000, 50), &signals(0.0, &none)), 0);
    }

    #[test]
    fn the_sweep_runs_every_interval_and_caps_each_worker() {
        let cfg = SglangConfig {
            max_tree_size_chars: 400, // 100 tokens
            ..SglangConfig::default()
        };
        let mut s = SglangCacheAware::new(1, 1, cfg).expect("valid");
        s.on_dispatch(0.0, &req_range(0, 0, 100), 0);
        s.on_dispatch(1.0, &req_range(1, 5000, 100), 0);
        assert_eq!(s.tree_chars(0), 800);
        // Before 120 s nothing is swept.
        s.on_dispatch(119.0, &req_range(2, 0, 100), 0);
        assert_eq!(s.tree_chars(0), 800);
        // At 120 s the oldest leaf goes: request 1's (ts 1; request 0's path
        // was refreshed at 119 s).
        s.on_dispatch(120.5, &req_range(3, 0, 100), 0);
        assert_eq!(s.tree_chars(0), 400);
        let none = vec![None; 1];
        let (len, _) = s
            .tree
            .prefix_match(&req_range(4, 5000, 100).tokens, 121.0, &mut s.rng);
        assert_eq!(len, 0);
        s.route(&req_range(5, 0, 1), &signals(121.0, &none));
        assert_eq!(s.next_eviction, 240.0);
    }
}
