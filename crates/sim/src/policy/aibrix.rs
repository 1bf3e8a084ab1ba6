//! AIBrix's `prefix-cache` router (`pkg/plugins/gateway/algorithms/
//! prefix_cache.go` @e3e10f9e4aeb; shipped values: 128-byte blocks,
//! imbalance 16, factor 2; peer notes 4):
//!
//! ```text
//! imbalanced = fmax − fmin > 16                               (f: in flight)
//! cand       = {p : f_p = fmin} if imbalanced else all pods
//! matched    = {p ∈ cand : m_p ≥ 1},  pct_p = floor(100·m_p / n)
//! pick       = first of matched by (pct desc, f asc, random)
//!              with f_p ≤ mean(f) + 2·stddev(f)    (sample stddev)
//!              else the least-loaded pod, ties at random
//! ```
//!
//! The index is one global LRU of block hashes (200,000 entries, each with
//! the pods it was routed to), whose entries also expire 20 minutes after
//! their last write; it is written only after each decision, for the chosen
//! pod, and lookups do not refresh it.

use super::blockhash::{Tail, chained_block_hashes};
use super::config_error::{ConfigError, check, check_pods};
use super::lru::Lru;
use super::podset::{PodSet, leading_runs};
use super::rng::{SplitMix64, pick_best};
use super::{PodIndex, Policy, Signals};
use crate::request::SimRequest;

/// [`AibrixPrefix`]'s parameters; `Default` is AIBrix's shipped manifests.
#[derive(Debug, Clone, PartialEq)]
pub struct AibrixConfig {
    /// `AIBRIX_PREFIX_CACHE_BLOCK_SIZE`, bytes of the character tokenizer
    /// (128).
    pub block_bytes: usize,
    /// Bytes a token stands for (4, the simulator's convention): a
    /// 128-byte block is 32 tokens.
    pub bytes_per_token: usize,
    /// `AIBRIX_PREFIX_CACHE_BLOCK_NUMBER`: global LRU entries (200,000).
    pub block_number: usize,
    /// `..._POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT` (16).
    pub imbalance_abs_count: u64,
    /// `..._STANDARD_DEVIATION_FACTOR` (2).
    pub std_factor: f64,
    /// `..._EVICTION_DURATION_MINS` in seconds (20 min).
    pub eviction_duration_s: f64,
    /// `..._EVICTION_INTERVAL_SECONDS` (1 s).
    pub eviction_interval_s: f64,
}

impl Default for AibrixConfig {
    fn default() -> Self {
        AibrixConfig {
            block_bytes: 128,
            bytes_per_token: 4,
            block_number: 200_000,
            imbalance_abs_count: 16,
            std_factor: 2.0,
            eviction_duration_s: 20.0 * 60.0,
            eviction_interval_s: 1.0,
        }
    }
}

/// One global index entry: the pods a block was routed to, and when the
/// entry was last written.
#[derive(Debug, Default)]
struct Entry {
    pods: PodSet,
    written: f64,
}

#[derive(Debug)]
pub struct AibrixPrefix {
    cfg: AibrixConfig,
    pods: usize,
    block_tokens: usize,
    /// The hash seed: random per gateway process in AIBrix; drawn from the
    /// policy's seed here.
    hash_seed: u64,
    rng: SplitMix64,
    index: Lru<Entry>,
    running: Vec<u64>,
    next_sweep: f64,
    /// The last routed request and its hashes, for `on_dispatch`.
    pending: Option<(u64, Vec<u64>)>,
    runs: Vec<usize>,
}

impl AibrixPrefix {
    pub fn new(pods: usize, seed: u64, cfg: AibrixConfig) -> Result<AibrixPrefix, ConfigError> {
        check_pods(pods)?;
        let k = cfg.bytes_per_token;
        check(k > 0, "bytes per token", k as f64, "must be positive")?;
        let b = cfg.block_bytes;
        check(
            b >= k && b.is_multiple_of(k),
            "AIBRIX_PREFIX_CACHE_BLOCK_SIZE",
            b as f64,
            "must be a positive multiple of the bytes per token",
        )?;
        let n = cfg.block_number;
        check(
            n > 0,
            "AIBRIX_PREFIX_CACHE_BLOCK_NUMBER",
            n as f64,
            "must be positive",
        )?;
        let f = cfg.std_factor;
        check(
            f >= 0.0,
            "STANDARD_DEVIATION_FACTOR",
            f,
            "must not be negative",
        )?;
        let i = cfg.eviction_interval_s;
        check(i > 0.0, "EVICTION_INTERVAL_SECONDS", i, "must be positive")?;
        let mut rng = SplitMix64::new(seed);
        Ok(AibrixPrefix {
            block_tokens: b / k,
            hash_seed: rng.next_u64(),
            index: Lru::new(cfg.block_number),
            next_sweep: cfg.eviction_interval_s,
            cfg,
            pods,
            rng,
            running: vec![0; pods],
            pending: None,
            runs: vec![0; pods],
        })
    }

    fn hashes(&self, req: &SimRequest) -> Vec<u64> {
        chained_block_hashes(
            self.hash_seed,
            &req.tokens,
            self.block_tokens,
            Tail::Drop,
            usize::MAX,
        )
    }

    /// The TTL sweeps due by `now`: each removes the entries last written
    /// more than the eviction duration before it. Writes refresh recency,
    /// lookups do not, so the LRU end is the oldest write.
    fn sweep(&mut self, now: f64) {
        if now < self.next_sweep {
            return;
        }
        let step = self.cfg.eviction_interval_s;
        let at = self.next_sweep + ((now - self.next_sweep) / step).floor() * step;
        while self
            .index
            .peek_lru()
            .is_some_and(|(_, e)| at - e.written > self.cfg.eviction_duration_s)
        {
            self.index.pop_lru();
        }
        self.next_sweep = at + step;
    }

    /// Requests in flight on `pod` as the gateway counts them.
    pub fn running(&self, pod: PodIndex) -> u64 {
        self.running.get(pod).copied().unwrap_or(0)
    }

    /// Index entries held.
    pub fn indexed_blocks(&self) -> usize {
        self.index.len()
    }
}

impl Policy for AibrixPrefix {
    fn name(&self) -> &str {
        "aibrix"
    }

    fn route(&mut self, req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        self.sweep(signals.now);
        let hashes = self.hashes(req);
        let n = hashes.len();
        let index = &self.index;
        leading_runs(n, &mut self.runs, |i, set| {
            if let Some(e) = index.get(hashes[i]) {
                set.union_with(&e.pods);
            }
        });

        let f = &self.running;
        let fmin = f.iter().copied().min().unwrap_or(0);
        let fmax = f.iter().copied().max().unwrap_or(0);
        let imbalanced = fmax - fmin > self.cfg.imbalance_abs_count;
        let mut matched: Vec<(PodIndex, usize)> = (0..self.pods)
            .filter(|&p| self.runs[p] >= 1 && (!imbalanced || f[p] == fmin))
            .map(|p| (p, self.runs[p] * 100 / n))
            .collect();

        let mut pick = None;
        if !matched.is_empty() {
            let count = self.pods as f64;
            let mean = f.iter().map(|&x| x as f64).sum::<f64>() / count;
            let std = if self.pods > 1 {
                let var = f.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (count - 1.0);
                var.sqrt()
            } else {
                0.0
            };
            let limit = mean + self.cfg.std_factor * std;
            self.rng.shuffle(&mut matched);
            matched.sort_by(|a, b| b.1.cmp(&a.1).then(f[a.0].cmp(&f[b.0])));
            pick = matched
                .iter()
                .find(|&&(p, _)| f[p] as f64 <= limit)
                .map(|&(p, _)| p);
        }
        let pick = pick.unwrap_or_else(|| {
            pick_best(&mut self.rng, f.iter().copied().enumerate(), |a, b| a < b).unwrap_or(0)
        });
        self.pending = Some((req.id, hashes));
        pick
    }

    fn on_dispatch(&mut self, now: f64, req: &SimRequest, pod: PodIndex) {
        if pod >= self.pods {
            return;
        }
        self.sweep(now);
        let hashes = match self.pending.take() {
            Some((id, h)) if id == req.id => h,
            _ => self.hashes(req),
        };
        for h in hashes {
            let e = self.index.insert(h, |_, _| {});
            e.pods.insert(pod);
            e.written = now;
        }
        self.running[pod] += 1;
    }

    fn on_finish(&mut self, _now: f64, _req: &SimRequest, pod: PodIndex) {
        if let Some(f) = self.running.get_mut(pod) {
            *f = f.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::{req_range, route_dispatch, signals};

    fn aibrix(pods: usize) -> AibrixPrefix {
        AibrixPrefix::new(pods, 1, AibrixConfig::default()).expect("valid")
    }

    /// Sends `count` unrelated requests straight to `pod`.
    fn load(a: &mut AibrixPrefix, pod: PodIndex, count: u64, id0: u64) {
        for i in 0..count {
            a.on_dispatch(
                0.0,
                &req_range(id0 + i, 900_000 + (id0 + i) as u32 * 40, 8),
                pod,
            );
        }
    }

    #[test]
    fn the_best_match_wins_within_mean_plus_two_sigma() {
        let mut a = aibrix(4);
        assert_eq!(a.name(), "aibrix");
        let none = vec![None; 4];
        // 128 tokens = 4 blocks of 32 on pod 2.
        a.on_dispatch(0.0, &req_range(0, 0, 128), 2);
        assert_eq!(a.indexed_blocks(), 4);
        // f = [0, 0, 1, 0]: mean 0.25, sample σ = 0.5, limit 1.25 ≥ 1.
        assert_eq!(a.route(&req_range(1, 0, 128), &signals(0.0, &none)), 2);
    }

    #[test]
    fn a_match_above_mean_plus_two_sigma_falls_back_to_least_loaded() {
        let mut a = aibrix(4);
        let none = vec![None; 4];
        a.on_dispatch(0.0, &req_range(0, 0, 128), 2);
        // f = [2, 2, 6, 2] (pod 2: 1 + 5): mean 3, sample σ = 2, limit 7 ≥ 6:
        // pod 2 still wins.
        load(&mut a, 2, 5, 100);
        for p in [0, 1, 3] {
            load(&mut a, p, 2, 200 + 10 * p as u64);
        }
        assert_eq!(a.route(&req_range(1, 0, 128), &signals(0.0, &none)), 2);
        // f = [2, 2, 12, 2]: gap 10 ≤ 16 (balanced); mean 4.5, σ = 5,
        // limit 14.5 ≥ 12: still pod 2.
        load(&mut a, 2, 6, 300);
        assert_eq!(a.route(&req_range(1, 0, 128), &signals(0.0, &none)), 2);
        // One hot pod among many idle ones is refused: with 9 pods,
        let mut b = aibrix(9);
        let none9 = vec![None; 9];
        b.on_dispatch(0.0, &req_range(0, 0, 128), 2);
        load(&mut b, 2, 11, 400);
        load(&mut b, 0, 1, 500);
        // f = [1, 0, 12, 0, 0, 0, 0, 0, 0]: mean 13/9 = 1.444, sample σ =
        // sqrt((0.198 + 7·2.086 + 111.42) / 8) = 3.97, limit 9.39 < 12:
        // the match is refused and the least-loaded pods (f = 0) draw.
        let pick = b.route(&req_range(1, 0, 128), &signals(0.0, &none9));
        assert!(![0, 2].contains(&pick), "{pick}");
    }

    #[test]
    fn imbalance_restricts_to_the_least_loaded_pods() {
        let mut a = aibrix(3);
        let none = vec![None; 3];
        // Prompt on pod 0 (f 1 → 18 with 17 more) and on pod 1 (f = 1).
        a.on_dispatch(0.0, &req_range(0, 0, 128), 0);
        a.on_dispatch(0.0, &req_range(1, 0, 64), 1);
        load(&mut a, 0, 17, 100);
        load(&mut a, 2, 1, 200);
        // f = [18, 1, 1]: 17 > 16 → candidates {1, 2}; pod 1 matches 2 of 4
        // blocks (50 %) → pod 1.
        assert_eq!(a.route(&req_range(2, 0, 128), &signals(0.0, &none)), 1);
        // An unmatched prompt under imbalance: random among {1, 2}.
        let mut seen = [0; 3];
        for i in 0..100 {
            seen[a.route(&req_range(10 + i, 70_000, 128), &signals(0.0, &none))] += 1;
        }
        assert_eq!(seen[0], 0);
        assert!(seen[1] > 20 && seen[2] > 20, "{seen:?}");
    }

    #[test]
    fn higher_percentage_beats_lower_load() {
        let mut a = aibrix(2);
        let none = vec![None; 2];
        a.on_dispatch(0.0, &req_range(0, 0, 128), 0); // 4 blocks
        a.on_dispatch(0.0, &req_range(1, 0, 96), 1); // 3 blocks
        load(&mut a, 0, 3, 100);
        // pct 100 (f 4) vs 75 (f 1): mean 2.5, σ = 2.12, limit 6.74 → pod 0.
        assert_eq!(route_dispatch(&mut a, &req_range(2, 0, 128), 0.0, &none), 0);
        assert_eq!(a.running(0), 5);
    }

    #[test]
    fn entries_expire_twenty_minutes_after_their_last_write() {
        let mut a = aibrix(2);
        a.on_dispatch(0.0, &req_range(0, 0, 64), 1);
        a.on_dispatch(600.0, &req_range(1, 5000, 64), 1);
        assert_eq!(a.indexed_blocks(), 4);
        // Sweep at 1200 s: 1200 − 0 is not > 1200.
        a.route(&req_range(2, 0, 64), &signals(1200.0, &[None, None]));
        assert_eq!(a.indexed_blocks(), 4);
        // Sweep at 1201 s drops request 0's blocks only.
        let pick = a.route(&req_range(3, 0, 64), &signals(1201.5, &[None, None]));
        assert_eq!(a.indexed_blocks(), 2);
        // Unmatched now: the least-loaded pod (0) wins, not pod 1.
        assert_eq!(pick, 0);
    }

    #[test]
    fn the_global_capacity_evicts_the_oldest_write() {
        let cfg = AibrixConfig {
            block_number: 3,
            ..AibrixConfig::default()
        };
        let mut a = AibrixPrefix::new(2, 1, cfg).expect("valid");
        a.on_dispatch(0.0, &req_range(0, 0, 64), 1); // 2 blocks
        a.on_dispatch(1.0, &req_range(1, 5000, 64), 0); // 2 more: evicts 1
        assert_eq!(a.indexed_blocks(), 3);
        // Request 0's first block is gone: no match for it anywhere.
        a.route(&req_range(2, 0, 64), &signals(2.0, &[None, None]));
        assert_eq!(a.runs, vec![0, 0]);
    }
}
