//! Folding per-pod scores into the answers a caller reports: the best tier
//! of one pod's prefix, and the best of several index pods that answer to
//! one name (the data-parallel ranks of one endpoint; a bare IP and its
//! `ip:port`).

use super::TierWeights;
use crate::ids::Tier;
use crate::index::PodPrefix;
use std::collections::BTreeMap;

/// The best-weighted tier holding the start of `prefix` (the last listed of
/// equally weighted ones); `None` when it lists no tier.
pub fn best_tier<'a>(prefix: &'a PodPrefix, weights: &TierWeights) -> Option<&'a Tier> {
    prefix
        .tiers
        .iter()
        .max_by(|a, b| weights.weight(&a.0).total_cmp(&weights.weight(&b.0)))
        .map(|(tier, _)| tier)
}

/// Keeps, per key, the item of the highest `score`: the first of equal ones,
/// and none scoring 0 or less (a pod without the prompt's first block is no
/// answer). `items` pair each pod's score with the key it answers to.
pub fn fold_best<K: Ord, T>(
    items: impl IntoIterator<Item = (K, T)>,
    score: impl Fn(&T) -> f64,
) -> BTreeMap<K, T> {
    let mut best: BTreeMap<K, T> = BTreeMap::new();
    for (key, item) in items {
        let s = score(&item);
        if s <= 0.0 || s.is_nan() {
            continue;
        }
        match best.get(&key) {
            Some(kept) if score(kept) >= s => {}
            _ => {
                best.insert(key, item);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PodId;

    fn prefix(tiers: &[(&str, u32)]) -> PodPrefix {
        PodPrefix {
            pod: PodId::new("127.0.0.11:8000"),
            depth: tiers.iter().map(|t| t.1).max().unwrap_or(0),
            tiers: tiers.iter().map(|(t, d)| (Tier::new(t), *d)).collect(),
        }
    }

    #[test]
    fn best_tier_is_the_heaviest_listed() {
        let w = TierWeights::default();
        assert_eq!(best_tier(&prefix(&[]), &w), None);
        let p = prefix(&[("cpu", 8), ("gpu", 2)]);
        assert_eq!(best_tier(&p, &w), Some(&Tier::gpu()));
        let p = prefix(&[("cpu", 8), ("disk", 9)]);
        assert_eq!(best_tier(&p, &w), Some(&Tier::cpu()));
        // Equal weights (two unlisted tiers): the last one.
        let p = prefix(&[("disk", 8), ("nvme", 9)]);
        assert_eq!(best_tier(&p, &w), Some(&Tier::new("nvme")));
    }

    #[test]
    fn fold_keeps_the_best_per_key_and_drops_zeros() {
        let items = [
            ("a", (0.5, "a rank 0")),
            ("b", (0.0, "b nothing")),
            ("a", (0.75, "a rank 1")),
            ("c", (0.25, "c first")),
            ("c", (0.25, "c tie")),
            ("a", (0.5, "a rank 2")),
        ];
        let best = fold_best(items, |x| x.0);
        let got: Vec<_> = best.iter().map(|(k, v)| (*k, v.1)).collect();
        assert_eq!(got, [("a", "a rank 1"), ("c", "c first")]);
        assert!(fold_best([((), f64::NAN)], |x| *x).is_empty());
    }
}
