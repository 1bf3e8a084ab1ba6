//! What the index is asked to do ([`IndexOp`]) and what a lookup returns
//! ([`Lookup`]), plus the prefix walk every backend shares so that they agree
//! by construction on what "consecutive depth" means.

use crate::ids::{BlockKey, EngineHash, ModelName, PodId, Tier};
use std::collections::BTreeMap;

/// A block being stored: its router key and, when the engine published a
/// different hash for it, that hash (kept as an `engine:` mapping so that
/// later `BlockRemoved` events and `parent_block_hash` references resolve).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBlock {
    pub key: BlockKey,
    pub engine: Option<EngineHash>,
}

/// How a removal names a block: by router key, or by the engine's hash (resolved
/// through the engine mapping; with no mapping the engine hash is the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRef {
    Key(BlockKey),
    Engine(EngineHash),
}

/// One change to the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexOp {
    /// (pod, tier) now holds these blocks.
    Store {
        model: ModelName,
        pod: PodId,
        tier: Tier,
        blocks: Vec<StoredBlock>,
    },
    /// (pod, tier) no longer holds these blocks. A block left with no holder
    /// is deleted together with its engine mapping.
    Remove {
        model: ModelName,
        pod: PodId,
        tier: Tier,
        blocks: Vec<BlockRef>,
    },
    /// Everything the pod holds, in every model and tier, is gone
    /// (AllBlocksCleared, an engine restart, a purge).
    ClearPod { pod: PodId },
}

impl IndexOp {
    /// `Store` of blocks whose engine hash is the router key itself (what
    /// every engine that hashes as kvroute does publishes): the one way
    /// tests, benchmarks and the simulator build a store.
    pub fn store_keys(model: &ModelName, pod: &PodId, tier: Tier, keys: &[BlockKey]) -> IndexOp {
        IndexOp::Store {
            model: model.clone(),
            pod: pod.clone(),
            tier,
            blocks: keys
                .iter()
                .map(|&key| StoredBlock { key, engine: None })
                .collect(),
        }
    }
}

/// One candidate's match against a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPrefix {
    pub pod: PodId,
    /// Consecutive blocks from block 0 held in any tier.
    pub depth: u32,
    /// Consecutive blocks from block 0 held in each tier (only tiers with a
    /// non-zero depth appear), sorted by tier name.
    pub tiers: Vec<(Tier, u32)>,
}

/// The result of a lookup: pods with a non-empty prefix, sorted by pod id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lookup {
    pub pods: Vec<PodPrefix>,
    /// How many blocks the linear walk examines: up to and including the
    /// first block that no candidate with an unbroken run holds. Every
    /// backend and [`super::LookupMode`] reports this same number for the
    /// same answer; how many blocks a lookup actually read is in the
    /// backend's stats (a bisecting lookup reads far fewer).
    pub blocks_examined: usize,
}

impl Lookup {
    /// The deepest prefix any candidate holds.
    pub fn max_depth(&self) -> u32 {
        self.pods.iter().map(|p| p.depth).max().unwrap_or(0)
    }
}

/// Walks a prompt's blocks in order and keeps each candidate's unbroken run.
///
/// Backends feed it one block's holders at a time and stop reading as soon as
/// [`PrefixWalk::push`] returns `false`: no candidate still has an unbroken
/// run, so no later block can change the result.
#[derive(Debug)]
pub struct PrefixWalk<'c> {
    candidates: Option<&'c [PodId]>,
    /// Per pod: run length in any tier, and per tier. A pod whose run broke
    /// keeps its entry but is no longer extended.
    runs: BTreeMap<PodId, Run>,
    examined: usize,
}

#[derive(Debug, Default)]
struct Run {
    depth: u32,
    tiers: BTreeMap<Tier, u32>,
}

impl<'c> PrefixWalk<'c> {
    pub fn new(candidates: Option<&'c [PodId]>) -> Self {
        PrefixWalk {
            candidates,
            runs: BTreeMap::new(),
            examined: 0,
        }
    }

    fn is_candidate(&self, pod: &PodId) -> bool {
        match self.candidates {
            None => true,
            Some(c) => c.contains(pod),
        }
    }

    /// Feed block `i`'s holders (block `i` must be the next block). Returns
    /// whether any candidate's run is still unbroken, i.e. whether reading the
    /// next block can still matter.
    pub fn push<'h>(&mut self, holders: impl IntoIterator<Item = (&'h PodId, &'h Tier)>) -> bool {
        let i = self.examined as u32;
        self.examined += 1;
        let mut alive = false;
        for (pod, tier) in holders {
            if !self.is_candidate(pod) {
                continue;
            }
            if i == 0 && !self.runs.contains_key(pod) {
                self.runs.insert(pod.clone(), Run::default());
            }
            let Some(run) = self.runs.get_mut(pod) else {
                continue;
            };
            // The any-tier run extends when the pod held every earlier block
            // (its depth is i); a pod may list several tiers for one block.
            if run.depth == i {
                run.depth = i + 1;
            }
            if run.depth == i + 1 {
                alive = true;
                let t = run.tiers.entry(tier.clone()).or_insert(0);
                if *t == i {
                    *t = i + 1;
                }
            }
        }
        alive
    }

    pub fn finish(self) -> Lookup {
        let pods = self
            .runs
            .into_iter()
            .filter(|(_, run)| run.depth > 0)
            .map(|(pod, run)| PodPrefix {
                pod,
                depth: run.depth,
                tiers: run.tiers.into_iter().filter(|(_, d)| *d > 0).collect(),
            })
            .collect();
        Lookup {
            pods,
            blocks_examined: self.examined,
        }
    }
}

/// Runs the walk over blocks already in hand (each block's holders), stopping
/// early; used by backends that fetched holders in one round trip.
pub fn lookup_in_order<'h, B, I>(blocks: B, candidates: Option<&[PodId]>) -> Lookup
where
    B: IntoIterator<Item = I>,
    I: IntoIterator<Item = (&'h PodId, &'h Tier)>,
{
    let mut walk = PrefixWalk::new(candidates);
    for holders in blocks {
        if !walk.push(holders) {
            break;
        }
    }
    walk.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PodId {
        PodId::new(s)
    }

    #[test]
    fn walk_counts_consecutive_runs_per_tier() {
        let (a, b) = (p("127.0.0.11:8000"), p("127.0.0.12:8000"));
        let (g, c) = (Tier::gpu(), Tier::cpu());
        let blocks = vec![
            vec![(&a, &g), (&b, &g)],
            vec![(&a, &c), (&b, &g)],
            vec![(&a, &g), (&a, &c)],
            vec![(&b, &g)],
        ];
        let l = lookup_in_order(blocks, None);
        assert_eq!(l.pods.len(), 2);
        assert_eq!(l.pods[0].pod, a);
        assert_eq!(l.pods[0].depth, 3);
        assert_eq!(l.pods[0].tiers, vec![(Tier::gpu(), 1)]);
        assert_eq!(l.pods[1].pod, b);
        assert_eq!(l.pods[1].depth, 2);
        assert_eq!(l.pods[1].tiers, vec![(Tier::gpu(), 2)]);
        // After block 2 only a is alive; block 3 is held only by b, whose run
        // broke: the walk stops there.
        assert_eq!(l.blocks_examined, 4);
    }

    #[test]
    fn walk_stops_at_first_block_no_live_candidate_holds() {
        let (a, b) = (p("127.0.0.11:8000"), p("127.0.0.12:8000"));
        let g = Tier::gpu();
        let blocks = vec![
            vec![(&a, &g)],
            vec![(&b, &g)],
            vec![(&a, &g)],
            vec![(&a, &g)],
        ];
        let l = lookup_in_order(blocks.clone(), None);
        assert_eq!(l.blocks_examined, 2);
        assert_eq!(l.pods.len(), 1);
        assert_eq!(l.pods[0].depth, 1);
        let only_b = [b.clone()];
        let l = lookup_in_order(blocks, Some(&only_b));
        assert_eq!(l.blocks_examined, 1);
        assert!(l.pods.is_empty());
    }
}
