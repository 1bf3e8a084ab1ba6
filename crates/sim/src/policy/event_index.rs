//! The block index the event-driven peers (llm-d precise, Dynamo) build
//! from the engines' KV events: engine block hash -> pods holding it.
//!
//! Both peers keep such an index fed by vLLM's `BlockStored` /
//! `BlockRemoved` / `AllBlocksCleared` and look a request's engine block
//! hashes up in it; neither reference-counts copies (a `BlockRemoved` for a
//! pod drops the pod even if vLLM still holds a second copy of the block),
//! and neither does this index. Only the device tier is indexed: the
//! simulated engines do not offload, and an event for another tier must not
//! add or remove the GPU entry.

use super::PodIndex;
use super::podset::{PodSet, leading_runs};
use fnv::FnvHashMap;
use kvroute_core::events::{BlockHash, KvEvent};
use kvroute_core::ids::Tier;

/// A block hash as the index keys it: vLLM's hash reduced to 64 bits the
/// way the rest of kvroute reduces it ([`BlockHash::engine`]).
pub fn key(hash: &BlockHash) -> u64 {
    hash.engine().0
}

#[derive(Debug, Default)]
pub struct EventIndex {
    blocks: FnvHashMap<u64, PodSet>,
    /// Blocks indexed per pod.
    per_pod: Vec<usize>,
}

impl EventIndex {
    pub fn new(pods: usize) -> EventIndex {
        EventIndex {
            blocks: FnvHashMap::default(),
            per_pod: vec![0; pods],
        }
    }

    fn is_device(medium: &Option<Tier>) -> bool {
        medium.as_ref().is_none_or(|t| t.as_str() == "gpu")
    }

    /// Applies one engine step's events from `pod`.
    pub fn apply(&mut self, pod: PodIndex, events: &[KvEvent]) {
        if pod >= self.per_pod.len() {
            self.per_pod.resize(pod + 1, 0);
        }
        for ev in events {
            match ev {
                KvEvent::BlockStored(s) if Self::is_device(&s.medium) => {
                    for h in &s.block_hashes {
                        if self.blocks.entry(key(h)).or_default().insert(pod) {
                            self.per_pod[pod] += 1;
                        }
                    }
                }
                KvEvent::BlockRemoved(r) if Self::is_device(&r.medium) => {
                    for h in &r.block_hashes {
                        let k = key(h);
                        if let Some(set) = self.blocks.get_mut(&k)
                            && set.remove(pod)
                        {
                            self.per_pod[pod] -= 1;
                            if set.is_empty() {
                                self.blocks.remove(&k);
                            }
                        }
                    }
                }
                KvEvent::AllBlocksCleared(c) if Self::is_device(&c.medium) => self.clear_pod(pod),
                _ => {}
            }
        }
    }

    /// Forgets everything `pod` held (a scan of the index: rare, as cache
    /// resets are).
    pub fn clear_pod(&mut self, pod: PodIndex) {
        if self.per_pod.get(pod).copied().unwrap_or(0) == 0 {
            return;
        }
        self.blocks.retain(|_, set| {
            set.remove(pod);
            !set.is_empty()
        });
        self.per_pod[pod] = 0;
    }

    /// The pods holding `hash` (`None`: none).
    pub fn get(&self, hash: u64) -> Option<&PodSet> {
        self.blocks.get(&hash)
    }

    /// Blocks indexed for `pod`.
    pub fn blocks_of(&self, pod: PodIndex) -> usize {
        self.per_pod.get(pod).copied().unwrap_or(0)
    }

    /// Each pod's leading run of `hashes` (index keys, in prompt order) into
    /// `runs` (one slot per pod); returns the longest.
    pub fn leading_runs(&self, hashes: &[u64], runs: &mut [usize]) -> usize {
        leading_runs(hashes.len(), runs, |i, set| {
            if let Some(s) = self.blocks.get(&hashes[i]) {
                set.union_with(s);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_core::events::{AllBlocksCleared, BlockRemoved, BlockStored};

    fn stored(hashes: &[u64]) -> KvEvent {
        KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.iter().map(|&h| BlockHash::U64(h)).collect(),
            parent_block_hash: None,
            token_ids: vec![0; 16 * hashes.len()],
            block_size: 16,
            ..BlockStored::default()
        })
    }

    fn removed(hashes: &[u64]) -> KvEvent {
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: hashes.iter().map(|&h| BlockHash::U64(h)).collect(),
            medium: None,
        })
    }

    #[test]
    fn stored_removed_cleared_maintain_the_sets() {
        let mut ix = EventIndex::new(3);
        ix.apply(0, &[stored(&[1, 2, 3])]);
        ix.apply(1, &[stored(&[1, 2])]);
        ix.apply(2, &[stored(&[1]), stored(&[1])]);
        assert_eq!(ix.blocks_of(0), 3);
        assert_eq!(ix.blocks_of(2), 1, "a second copy is not counted twice");
        let mut runs = vec![0; 3];
        assert_eq!(ix.leading_runs(&[1, 2, 3, 4], &mut runs), 3);
        assert_eq!(runs, vec![3, 2, 1]);

        ix.apply(0, &[removed(&[2])]);
        ix.leading_runs(&[1, 2, 3, 4], &mut runs);
        assert_eq!(runs, vec![1, 2, 1], "pod 0 lost block 2: its run stops");

        ix.apply(1, &[KvEvent::AllBlocksCleared(AllBlocksCleared::default())]);
        ix.leading_runs(&[1, 2, 3, 4], &mut runs);
        assert_eq!(runs, vec![1, 0, 1]);
        assert_eq!(ix.blocks_of(1), 0);
        assert!(ix.get(2).is_none(), "an emptied entry is dropped");
    }

    #[test]
    fn other_tiers_are_ignored() {
        let mut ix = EventIndex::new(1);
        let cpu = KvEvent::BlockStored(BlockStored {
            block_hashes: vec![BlockHash::U64(5)],
            block_size: 16,
            medium: Some(Tier::cpu()),
            ..BlockStored::default()
        });
        ix.apply(0, &[cpu]);
        assert_eq!(ix.blocks_of(0), 0);
        ix.apply(0, &[stored(&[5])]);
        ix.apply(
            0,
            &[KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![BlockHash::U64(5)],
                medium: Some(Tier::cpu()),
            })],
        );
        assert_eq!(ix.blocks_of(0), 1, "a CPU-tier removal keeps the GPU entry");
    }

    #[test]
    fn keys_reduce_digests_as_the_engine_hash() {
        let mut d = [0u8; 32];
        d[31] = 7;
        assert_eq!(key(&BlockHash::Bytes32(d)), 7);
        assert_eq!(key(&BlockHash::U64(9)), 9);
    }
}
