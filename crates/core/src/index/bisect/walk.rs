//! The prefix walk over *changes*: the holders of block 0, then at each
//! later block read only who left and who appeared. It computes exactly
//! what [`PrefixWalk`](crate::index::ops::PrefixWalk) computes over the
//! blocks those changes describe (each read block standing for the blocks
//! up to the next one), in time linear in the changes instead of in
//! holders x read blocks: with 64 pods at 64 depths that is ~130 updates
//! instead of ~2,000 holder visits (measured ~0.3 ms).
//!
//! Per pod it keeps how many fields of each tier it holds at the current
//! block (a field can repeat after normalisation, e.g. `GPU` and `gpu`):
//! the pod's run goes on while it holds any tier, a tier's run while that
//! tier was held at every block since block 0.

use crate::ids::{PodId, Tier};
use crate::index::{Lookup, PodPrefix};
use fnv::FnvHashMap;

#[derive(Debug, Default)]
struct PodRun {
    /// `None` while the run goes on.
    depth: Option<u32>,
    /// Fields held at the current block, per tier.
    held: Vec<(Tier, u32)>,
    /// Tiers held at block 0 and their runs (`None`: still going).
    tiers: Vec<(Tier, Option<u32>)>,
}

#[derive(Debug)]
pub struct DiffWalk<'c> {
    candidates: Option<&'c [PodId]>,
    n: u32,
    pods: FnvHashMap<PodId, PodRun>,
    alive: usize,
    /// The block where the last run ended, once none goes on.
    stopped: Option<u32>,
}

impl<'c> DiffWalk<'c> {
    /// A prompt of `n >= 1` blocks whose block 0 has `holders`.
    pub fn new<'h>(
        n: u32,
        holders: impl IntoIterator<Item = &'h (PodId, Tier)>,
        candidates: Option<&'c [PodId]>,
    ) -> Self {
        let mut pods: FnvHashMap<PodId, PodRun> = FnvHashMap::default();
        for (pod, tier) in holders {
            if candidates.is_some_and(|c| !c.contains(pod)) {
                continue;
            }
            let run = pods.entry(pod.clone()).or_default();
            add(&mut run.held, tier);
            if !run.tiers.iter().any(|(t, _)| t == tier) {
                run.tiers.push((tier.clone(), None));
            }
        }
        let alive = pods.len();
        DiffWalk {
            candidates,
            n,
            pods,
            alive,
            stopped: (alive == 0).then_some(0),
        }
    }

    /// At `block` (increasing, > 0), `removed` fields left and `added` ones
    /// appeared, relative to the previous block applied.
    pub fn apply<'h>(
        &mut self,
        block: u32,
        removed: impl IntoIterator<Item = &'h (PodId, Tier)>,
        added: impl IntoIterator<Item = &'h (PodId, Tier)>,
    ) {
        if self.stopped.is_some() {
            return;
        }
        let mut touched: Vec<&PodId> = Vec::new();
        for (pod, tier) in removed {
            let Some(run) = self.pods.get_mut(pod) else {
                continue;
            };
            if let Some(at) = run.held.iter().position(|(t, _)| t == tier) {
                run.held[at].1 -= 1;
                if run.held[at].1 == 0 {
                    run.held.swap_remove(at);
                    if let Some(t) = run.tiers.iter_mut().find(|(t, _)| t == tier)
                        && t.1.is_none()
                    {
                        t.1 = Some(block);
                    }
                }
                touched.push(pod);
            }
        }
        for (pod, tier) in added {
            if self.candidates.is_some_and(|c| !c.contains(pod)) {
                continue;
            }
            if let Some(run) = self.pods.get_mut(pod) {
                add(&mut run.held, tier);
            }
        }
        for pod in touched {
            if let Some(run) = self.pods.get_mut(pod)
                && run.depth.is_none()
                && run.held.is_empty()
            {
                run.depth = Some(block);
                self.alive -= 1;
            }
        }
        if self.alive == 0 {
            self.stopped = Some(block);
        }
    }

    pub fn finish(self) -> Lookup {
        let n = self.n;
        let mut pods: Vec<PodPrefix> = self
            .pods
            .into_iter()
            .map(|(pod, run)| {
                let depth = run.depth.unwrap_or(n);
                // A tier's run cannot outlast the pod's.
                let mut tiers: Vec<(Tier, u32)> = run
                    .tiers
                    .into_iter()
                    .map(|(t, d)| (t, d.unwrap_or(depth).min(depth)))
                    .filter(|(_, d)| *d > 0)
                    .collect();
                tiers.sort_by(|a, b| a.0.cmp(&b.0));
                PodPrefix { pod, depth, tiers }
            })
            .filter(|p| p.depth > 0)
            .collect();
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        Lookup {
            pods,
            blocks_examined: self.stopped.map_or(n as usize, |b| b as usize + 1),
        }
    }
}

fn add(held: &mut Vec<(Tier, u32)>, tier: &Tier) {
    match held.iter_mut().find(|(t, _)| t == tier) {
        Some((_, c)) => *c += 1,
        None => held.push((tier.clone(), 1)),
    }
}
