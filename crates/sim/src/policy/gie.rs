//! llm-d's approximate prefix routing (the GIE design, now llm-d-router's
//! `approx-prefix-cache-producer` + `prefix-cache-scorer`) inside the
//! "optimized-baseline" scorer stack (peer notes 1.8, 1.10):
//!
//! ```text
//! total_p = 3·m_p/n + 2·(1 − u_p) + 2·queue_minmax_p + 2·no_hit_lru_p
//! ```
//!
//! The router never sees the engines' caches: it assumes every request it
//! routed is now cached where it sent it, keeps per pod an LRU of those
//! block hashes (capacity = the pod's `num_gpu_blocks`, else 31,250), and
//! forgets a pod for a hash when that pod's LRU evicts it.

use super::blockhash::{Tail, chained_block_hashes};
use super::config_error::{ConfigError, check, check_pods};
use super::llmd::{kv_util_score, max_score, queue_scores};
use super::lru::Lru;
use super::podset::PodSet;
use super::rng::SplitMix64;
use super::{PodIndex, Policy, Signals};
use crate::request::SimRequest;
use fnv::FnvHashMap;

/// The seed of the hash chain: llm-d-router seeds it with the model name's
/// hash (plus `cache_salt`); one model, so one constant.
const MODEL_SEED: u64 = 0x6170_7072_6f78_0001;

/// [`LlmdApprox`]'s parameters; `Default` is llm-d-router's code defaults
/// and the optimized-baseline guide's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmdApproxConfig {
    /// `autoTune`: block size from the first pod's `cache_config_info`, LRU
    /// capacity from the chosen pod's `num_gpu_blocks` (true).
    pub auto_tune: bool,
    /// `blockSizeTokens` without autotune or metric (16 tokens = 64
    /// characters at the assumed 4 characters per token).
    pub block_size_tokens: usize,
    /// `maxPrefixBlocksToMatch` (256).
    pub max_prefix_blocks: usize,
    /// `lruCapacityPerServer` without autotune or metric (31,250).
    pub lru_capacity_per_server: usize,
    /// Weights of the optimized-baseline stack: prefix 3, kv-util 2,
    /// queue 2, no-hit-LRU 2.
    pub prefix_weight: f64,
    pub kv_util_weight: f64,
    pub queue_weight: f64,
    pub no_hit_lru_weight: f64,
    /// `no-hit-lru-scorer` `lruSize`: pods it tracks (1024).
    pub no_hit_lru_size: usize,
}

impl Default for LlmdApproxConfig {
    fn default() -> Self {
        LlmdApproxConfig {
            auto_tune: true,
            block_size_tokens: 16,
            max_prefix_blocks: 256,
            lru_capacity_per_server: 31_250,
            prefix_weight: 3.0,
            kv_util_weight: 2.0,
            queue_weight: 2.0,
            no_hit_lru_weight: 2.0,
            no_hit_lru_size: 1024,
        }
    }
}

/// What `route` leaves for `on_dispatch` (the producer's PreRequest reads
/// the hashes computed at scheduling; the no-hit scorer reads its cold
/// flag).
#[derive(Debug)]
struct Pending {
    id: u64,
    hashes: Vec<u64>,
    cold: bool,
}

#[derive(Debug)]
pub struct LlmdApprox {
    cfg: LlmdApproxConfig,
    pods: usize,
    rng: SplitMix64,
    hash_to_pods: FnvHashMap<u64, PodSet>,
    /// Per-pod LRU of hashes, created at the pod's first dispatch with the
    /// capacity known then (as llm-d-router creates it).
    lrus: Vec<Option<Lru<()>>>,
    /// `num_gpu_blocks` per pod at the last scrape seen.
    gpu_blocks: Vec<u32>,
    /// Pods in the order they last received a cold request, oldest first.
    cold_order: Vec<PodIndex>,
    pending: Option<Pending>,
    /// Block size of the last decision (autotuned or configured).
    last_block: usize,
    matches: Vec<usize>,
    queue: Vec<f64>,
}

impl LlmdApprox {
    pub fn new(pods: usize, seed: u64, cfg: LlmdApproxConfig) -> Result<LlmdApprox, ConfigError> {
        check_pods(pods)?;
        let b = cfg.block_size_tokens;
        check(b > 0, "blockSizeTokens", b as f64, "must be positive")?;
        let m = cfg.max_prefix_blocks;
        check(
            m > 0,
            "maxPrefixBlocksToMatch",
            m as f64,
            "must be positive",
        )?;
        let c = cfg.lru_capacity_per_server;
        check(c > 0, "lruCapacityPerServer", c as f64, "must be positive")?;
        for (name, w) in [
            ("prefix weight", cfg.prefix_weight),
            ("kv-util weight", cfg.kv_util_weight),
            ("queue weight", cfg.queue_weight),
            ("no-hit-lru weight", cfg.no_hit_lru_weight),
        ] {
            check(w >= 0.0, name, w, "must not be negative")?;
        }
        Ok(LlmdApprox {
            cfg,
            pods,
            rng: SplitMix64::new(seed),
            hash_to_pods: FnvHashMap::default(),
            lrus: (0..pods).map(|_| None).collect(),
            gpu_blocks: vec![0; pods],
            cold_order: Vec::new(),
            pending: None,
            last_block: b,
            matches: vec![0; pods],
            queue: Vec::with_capacity(pods),
        })
    }

    fn block_size(&self, signals: &Signals<'_>) -> usize {
        match signals.scrapes.first().copied().flatten() {
            Some(s) if self.cfg.auto_tune && s.block_size > 0 => s.block_size as usize,
            _ => self.cfg.block_size_tokens,
        }
    }

    /// Hashes of `req` this router would compute with blocks of `block`
    /// tokens (4 characters each), partial tail included, at most
    /// `maxPrefixBlocksToMatch`.
    fn hashes(&self, req: &SimRequest, block: usize) -> Vec<u64> {
        chained_block_hashes(
            MODEL_SEED,
            &req.tokens,
            block,
            Tail::Keep,
            self.cfg.max_prefix_blocks,
        )
    }

    /// The `no-hit-lru-scorer` for a cold request: never-cold pods first
    /// (in pod order), then the others from least to most recently cold;
    /// rank `r` scores `1 − r/(N − 1)`.
    fn no_hit_scores(&self, out: &mut [f64]) {
        let n = self.pods;
        if n == 1 {
            out[0] = 1.0;
            return;
        }
        let mut position = vec![usize::MAX; n];
        for (i, &p) in self.cold_order.iter().enumerate() {
            position[p] = i;
        }
        let never = position.iter().filter(|&&x| x == usize::MAX).count();
        let mut next_never = 0;
        for p in 0..n {
            let rank = if position[p] == usize::MAX {
                next_never += 1;
                next_never - 1
            } else {
                never + position[p]
            };
            out[p] = (1.0 - rank as f64 / (n - 1) as f64).max(0.0);
        }
    }

    /// Blocks of `hash` this router believes `pod` holds.
    pub fn believes(&self, pod: PodIndex, hash: u64) -> bool {
        self.hash_to_pods
            .get(&hash)
            .is_some_and(|s| s.contains(pod))
    }

    fn add(&mut self, pod: PodIndex, hashes: &[u64]) {
        let capacity = match self.gpu_blocks[pod] {
            g if self.cfg.auto_tune && g > 0 => g as usize,
            _ => self.cfg.lru_capacity_per_server,
        };
        let lru = self.lrus[pod].get_or_insert_with(|| Lru::new(capacity));
        let map = &mut self.hash_to_pods;
        for &h in hashes {
            lru.insert(h, |old, ()| {
                if let Some(set) = map.get_mut(&old) {
                    set.remove(pod);
                    if set.is_empty() {
                        map.remove(&old);
                    }
                }
            });
            map.entry(h).or_default().insert(pod);
        }
    }
}

impl Policy for LlmdApprox {
    fn name(&self) -> &str {
        "gie-approx"
    }

    fn route(&mut self, req: &SimRequest, signals: &Signals<'_>) -> PodIndex {
        for p in 0..self.pods {
            if let Some(s) = signals.scrapes.get(p).copied().flatten() {
                self.gpu_blocks[p] = s.num_gpu_blocks;
            }
        }
        let block = self.block_size(signals);
        self.last_block = block;
        let hashes = self.hashes(req, block);
        // Count, per pod, the blocks it is listed for, walking until a block
        // no pod is listed for (a pod is not required to be continuous).
        self.matches.iter_mut().for_each(|m| *m = 0);
        for h in &hashes {
            match self.hash_to_pods.get(h) {
                Some(set) if !set.is_empty() => {
                    for p in set.iter() {
                        if let Some(m) = self.matches.get_mut(p) {
                            *m += 1;
                        }
                    }
                }
                _ => break,
            }
        }
        let n = hashes.len();
        let cold = self.matches.iter().all(|&m| m == 0);
        let mut no_hit = vec![0.5; self.pods];
        if cold {
            self.no_hit_scores(&mut no_hit);
        }
        queue_scores(signals, self.pods, &mut self.queue);
        let (cfg, matches, queue) = (&self.cfg, &self.matches, &self.queue);
        let totals = (0..self.pods).map(|p| {
            let prefix = if n == 0 {
                0.0
            } else {
                matches[p] as f64 / n as f64
            };
            let total = cfg.prefix_weight * prefix
                + cfg.kv_util_weight * kv_util_score(signals, p)
                + cfg.queue_weight * queue[p]
                + cfg.no_hit_lru_weight * no_hit[p];
            (p, total)
        });
        let pick = max_score(&mut self.rng, totals);
        self.pending = Some(Pending {
            id: req.id,
            hashes,
            cold,
        });
        pick
    }

    fn on_dispatch(&mut self, _now: f64, req: &SimRequest, pod: PodIndex) {
        if pod >= self.pods {
            return;
        }
        let pending = match self.pending.take() {
            Some(p) if p.id == req.id => p,
            // Dispatched without this router's decision: hash it as the
            // producer would have (block size from the last decision).
            _ => Pending {
                id: req.id,
                hashes: self.hashes(req, self.last_block),
                cold: false,
            },
        };
        self.add(pod, &pending.hashes);
        if pending.cold {
            self.cold_order.retain(|&p| p != pod);
            self.cold_order.push(pod);
            if self.cold_order.len() > self.cfg.no_hit_lru_size {
                self.cold_order.remove(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Scrape;
    use crate::policy::testutil::{req_range, route_dispatch, scrapes, signals};

    fn idle(pods: usize) -> Vec<Option<Scrape>> {
        scrapes(&vec![(0, 0.0); pods])
    }

    #[test]
    fn cold_requests_spread_by_no_hit_lru_and_warm_ones_follow_history() {
        let mut p = LlmdApprox::new(3, 1, LlmdApproxConfig::default()).expect("valid");
        assert_eq!(p.name(), "gie-approx");
        let s = idle(3);
        // Cold: never-cold pods rank 0, 1, 2 in pod order: scores 1, 0.5, 0;
        // everything else equal, so pod 0 wins, then pods 1 and 2.
        assert_eq!(route_dispatch(&mut p, &req_range(0, 0, 64), 0.0, &s), 0);
        assert_eq!(
            route_dispatch(&mut p, &req_range(1, 10_000, 64), 0.0, &s),
            1
        );
        assert_eq!(
            route_dispatch(&mut p, &req_range(2, 20_000, 64), 0.0, &s),
            2
        );
        // All pods now cold-used, oldest first 0, 1, 2: pod 0 scores 1.
        assert_eq!(
            route_dispatch(&mut p, &req_range(3, 30_000, 64), 0.0, &s),
            0
        );
        // A request sharing request 1's first 64 tokens (4 blocks of 16,
        // then a 1-token partial tail): pod 1 matches 4 of 5 hashes, 3·0.8 =
        // 2.4 beats the neutral no-hit 0.5 everywhere.
        let mut t: Vec<u32> = (10_000..10_064).collect();
        t.push(7);
        let warm = crate::policy::testutil::req_tokens(4, t);
        assert_eq!(p.route(&warm, &signals(0.0, &s)), 1);
    }

    #[test]
    fn load_outweighs_a_partial_hit() {
        let mut p = LlmdApprox::new(2, 1, LlmdApproxConfig::default()).expect("valid");
        let s = idle(2);
        assert_eq!(route_dispatch(&mut p, &req_range(0, 0, 64), 0.0, &s), 0);
        // 64 shared tokens + 64 new: pod 0 matches 4 of 8 blocks.
        let r = req_range(1, 0, 128);
        // Pod 0: 3·0.5 + 2·(1 − 0.9) + 2·0 + 2·0.5 = 2.7;
        // pod 1: 0 + 2·1 + 2·1 + 2·0.5 = 5.0.
        let s = scrapes(&[(3, 0.9), (0, 0.0)]);
        assert_eq!(p.route(&r, &signals(0.0, &s)), 1);
        // Idle pods: pod 0: 1.5 + 2 + 2 + 1 = 6.5 > 5.
        assert_eq!(p.route(&r, &signals(0.0, &idle(2))), 0);
    }

    #[test]
    fn lru_eviction_forgets_the_pod() {
        let mut p = LlmdApprox::new(2, 1, LlmdApproxConfig::default()).expect("valid");
        // Pod 0 reports 4 GPU blocks: its LRU holds 4 hashes.
        let mut s = idle(2);
        if let Some(sc) = s[0].as_mut() {
            sc.num_gpu_blocks = 4;
        }
        let a = req_range(0, 0, 64); // 4 blocks
        assert_eq!(route_dispatch(&mut p, &a, 0.0, &s), 0);
        let ha = p.hashes(&a, 16);
        assert!(ha.iter().all(|&h| p.believes(0, h)));
        // Pod 1 is the cold-LRU choice now; force request b onto pod 0.
        let b = req_range(1, 50_000, 32); // 2 blocks, evicting a's first 2
        p.on_dispatch(0.0, &b, 0);
        assert!(!p.believes(0, ha[0]) && !p.believes(0, ha[1]));
        assert!(p.believes(0, ha[2]) && p.believes(0, ha[3]));
        // a's first block is now unknown, so a matches nothing anywhere:
        // the walk stops at block 0 although pod 0 still lists blocks 2, 3.
        p.route(&a, &signals(0.0, &s));
        assert_eq!(p.matches, vec![0, 0]);
    }

    #[test]
    fn a_pod_reappearing_after_a_gap_still_counts() {
        let mut p = LlmdApprox::new(2, 1, LlmdApproxConfig::default()).expect("valid");
        let a = req_range(0, 0, 48); // 3 blocks
        let ha = p.hashes(&a, 16);
        // Pod 0 listed for blocks 0 and 2, pod 1 for blocks 0 and 1.
        p.add(0, &[ha[0], ha[2]]);
        p.add(1, &[ha[0], ha[1]]);
        p.route(&a, &signals(0.0, &idle(2)));
        assert_eq!(p.matches, vec![2, 2]);
    }

    #[test]
    fn without_autotune_the_default_capacity_applies() {
        let cfg = LlmdApproxConfig {
            auto_tune: false,
            ..LlmdApproxConfig::default()
        };
        let mut p = LlmdApprox::new(1, 1, cfg).expect("valid");
        let s = idle(1);
        route_dispatch(&mut p, &req_range(0, 0, 64), 0.0, &s);
        let cap = p.lrus[0].as_ref().map(Lru::capacity);
        assert_eq!(cap, Some(31_250));
    }

    #[test]
    fn no_hit_scores_follow_the_lru_ranks() {
        let mut p = LlmdApprox::new(4, 1, LlmdApproxConfig::default()).expect("valid");
        // Pods 2 then 0 received cold requests; 1 and 3 never did.
        p.cold_order = vec![2, 0];
        let mut out = vec![0.0; 4];
        p.no_hit_scores(&mut out);
        // Ranks: pod 1 → 0, pod 3 → 1, pod 2 → 2, pod 0 → 3 (of N − 1 = 3).
        assert_eq!(out, vec![0.0, 1.0, 1.0 - 2.0 / 3.0, 1.0 - 1.0 / 3.0]);
    }
}
