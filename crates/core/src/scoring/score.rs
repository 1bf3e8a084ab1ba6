//! Tier-weighted prefix scores from a lookup's per-pod depths.
//!
//! Kept apart from picking (which blends these scores with load, in the
//! scorer) so that the load test, the scorer and llm-d-compatible APIs all
//! score identically.

use crate::ids::Tier;
use crate::index::PodPrefix;
use std::collections::HashMap;
use std::str::FromStr;

/// Weight of a block by the tier it is cached in: a GPU hit skips prefill
/// outright, a CPU hit costs a transfer, storage more so. Defaults follow
/// llm-d's kv-cache library for gpu/cpu.
#[derive(Debug, Clone, PartialEq)]
pub struct TierWeights {
    weights: HashMap<Tier, f64>,
    /// Weight of a tier not listed (a new offloading medium).
    other: f64,
}

impl Default for TierWeights {
    fn default() -> Self {
        TierWeights {
            weights: HashMap::from([(Tier::gpu(), 1.0), (Tier::cpu(), 0.8)]),
            other: 0.5,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("tier weights: expected `tier=weight,...` with weights in [0, 1], got {0:?}")]
pub struct TierWeightsError(String);

impl FromStr for TierWeights {
    type Err = TierWeightsError;
    /// `gpu=1,cpu=0.8,other=0.5`: listed tiers override the defaults.
    fn from_str(s: &str) -> Result<Self, TierWeightsError> {
        let mut w = TierWeights::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (tier, value) = part
                .split_once('=')
                .ok_or_else(|| TierWeightsError(s.into()))?;
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| TierWeightsError(s.into()))?;
            if !(0.0..=1.0).contains(&value) {
                return Err(TierWeightsError(s.into()));
            }
            match tier.trim() {
                "other" => w.other = value,
                t => {
                    w.weights.insert(Tier::new(t), value);
                }
            }
        }
        Ok(w)
    }
}

impl TierWeights {
    pub fn weight(&self, tier: &Tier) -> f64 {
        self.weights.get(tier).copied().unwrap_or(self.other)
    }

    /// The tier-weighted length of a pod's consecutive prefix: each block
    /// counts the weight of the best tier holding it.
    ///
    /// A block's tier is known exactly while it lies inside some tier's own
    /// unbroken run (the index reports per-tier depths from block 0); the best
    /// such tier is taken greedily by descending weight. Blocks past every
    /// tier's run but inside the any-tier run (held in alternating tiers) count
    /// the lowest weight among the pod's tiers: a conservative estimate that is
    /// exact whenever each tier's blocks of a chain form a prefix, which is how
    /// vLLM fills and offloads them.
    pub fn prefix_score(&self, prefix: &PodPrefix) -> f64 {
        let mut tiers: Vec<(f64, u32)> = prefix
            .tiers
            .iter()
            .map(|(t, d)| (self.weight(t), *d))
            .collect();
        tiers.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut covered = 0u32;
        let mut score = 0.0;
        for &(w, d) in &tiers {
            let d = d.min(prefix.depth);
            if d > covered {
                score += w * f64::from(d - covered);
                covered = d;
            }
        }
        if prefix.depth > covered {
            let lowest = tiers.last().map(|t| t.0).unwrap_or(self.other);
            score += lowest * f64::from(prefix.depth - covered);
        }
        score
    }
}

/// One pod's prefix score, raw (in weighted blocks) and normalised by the
/// prompt's block count to [0, 1] for blending with load.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixScore {
    pub pod: crate::ids::PodId,
    pub blocks: u32,
    pub weighted: f64,
    pub normalized: f64,
}

/// Scores every pod of a lookup against a prompt of `prompt_blocks` blocks.
pub fn score_prefixes(
    pods: &[PodPrefix],
    prompt_blocks: usize,
    weights: &TierWeights,
) -> Vec<PrefixScore> {
    pods.iter()
        .map(|p| {
            let weighted = weights.prefix_score(p);
            PrefixScore {
                pod: p.pod.clone(),
                blocks: p.depth,
                weighted,
                normalized: if prompt_blocks == 0 {
                    0.0
                } else {
                    (weighted / prompt_blocks as f64).min(1.0)
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PodId;

    fn prefix(depth: u32, tiers: &[(&str, u32)]) -> PodPrefix {
        PodPrefix {
            pod: PodId::new("127.0.0.11:8000"),
            depth,
            tiers: tiers.iter().map(|(t, d)| (Tier::new(t), *d)).collect(),
        }
    }

    #[test]
    fn best_tier_counts_per_block() {
        let w = TierWeights::default();
        assert_eq!(w.prefix_score(&prefix(10, &[("gpu", 10)])), 10.0);
        // gpu holds 0..4, cpu holds 0..10: 4 blocks at 1.0, 6 at 0.8.
        let s = w.prefix_score(&prefix(10, &[("gpu", 4), ("cpu", 10)]));
        assert!((s - 8.8).abs() < 1e-9, "{s}");
        // Alternating tiers: gpu run 1, cpu run 0, any-tier run 3.
        let s = w.prefix_score(&prefix(3, &[("gpu", 1)]));
        assert!((s - 3.0).abs() < 1e-9, "{s}");
        let s = w.prefix_score(&prefix(3, &[("gpu", 1), ("cpu", 2)]));
        assert!((s - (1.0 + 0.8 + 0.8)).abs() < 1e-9, "{s}");
    }

    #[test]
    fn parse_weights() {
        let w: TierWeights = "gpu=1, cpu=0.5, disk=0.25, other=0.1"
            .parse()
            .expect("weights");
        assert_eq!(w.weight(&Tier::cpu()), 0.5);
        assert_eq!(w.weight(&Tier::new("DISK")), 0.25);
        assert_eq!(w.weight(&Tier::new("nvme")), 0.1);
        assert!("gpu=2".parse::<TierWeights>().is_err());
        assert!("gpu".parse::<TierWeights>().is_err());
    }

    #[test]
    fn normalised_by_prompt_length() {
        let s = score_prefixes(&[prefix(4, &[("gpu", 4)])], 8, &TierWeights::default());
        assert_eq!(s[0].normalized, 0.5);
        assert_eq!(s[0].blocks, 4);
    }
}
