//! The pure half of [`super::Writes::launch`]: which pending operations go
//! out now, in how many writes, and what stays behind. No index, no clock, no
//! metrics: the caller executes the plan (spawns the writes, records lag).
//!
//! The rules (why: the module doc of `writes.rs`):
//! - a pod with a write in flight (`busy`) gets nothing: its operations wait
//!   for that write, so they cannot overtake it;
//! - every other pod with pending operations, or marked dirty, goes out, all
//!   of its operations in one write, in order;
//! - pods are spread over the free write slots longest-processing-time first
//!   (the pod with the most operations to the lightest write);
//! - a dirty pod that goes out ends its write with its ClearPod;
//! - publisher timestamps travel with their pod's write, stay with a busy
//!   pod, and are "applied now" for a pod with nothing to write.

use kvroute_core::ids::PodId;
use kvroute_core::index::IndexOp;
use std::collections::{HashMap, HashSet, VecDeque};

/// One index write to start.
#[derive(Debug, Default, PartialEq)]
pub(super) struct PlannedWrite {
    /// The pod of each operation, in order.
    pub pods: Vec<PodId>,
    pub ops: Vec<IndexOp>,
    /// Publisher timestamps of the batches this write completes.
    pub ts: Vec<(PodId, f64)>,
    /// The pods this write holds, sorted, each once.
    pub holds: Vec<PodId>,
}

/// What [`plan`] decided.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Plan {
    pub writes: Vec<PlannedWrite>,
    /// Timestamps of batches of idle pods that left no operation (empty, or
    /// nothing keyable): applied as far as the index is concerned.
    pub applied_now: Vec<f64>,
}

/// Takes out of `pending`, `pending_ts` and `dirty` what goes into at most
/// `slots` writes now; what stays is left in place, in order.
pub(super) fn plan(
    pending: &mut Vec<(PodId, IndexOp)>,
    pending_ts: &mut VecDeque<(PodId, f64)>,
    dirty: &mut HashSet<PodId>,
    busy: &HashSet<PodId>,
    slots: usize,
) -> Plan {
    // Free pods and how many operations each would write.
    let mut free: HashMap<PodId, usize> = HashMap::new();
    for pod in pending.iter().map(|(p, _)| p).chain(dirty.iter()) {
        if !busy.contains(pod) {
            *free.entry(pod.clone()).or_default() += 1;
        }
    }
    let mut applied_now = Vec::new();
    pending_ts.retain(|(pod, ts)| {
        let idle = !busy.contains(pod) && !free.contains_key(pod);
        if idle {
            applied_now.push(*ts);
        }
        !idle
    });
    if slots == 0 || free.is_empty() {
        return Plan {
            writes: Vec::new(),
            applied_now,
        };
    }
    let group_of = assign(free, slots);
    let mut writes: Vec<PlannedWrite> = (0..slots.min(group_of.len()))
        .map(|_| PlannedWrite::default())
        .collect();
    let mut rest = Vec::with_capacity(pending.len());
    for (pod, op) in pending.drain(..) {
        match group_of.get(&pod) {
            Some(&g) => {
                writes[g].pods.push(pod);
                writes[g].ops.push(op);
            }
            None => rest.push((pod, op)),
        }
    }
    *pending = rest;
    // Shed pods still marked have had no operation since (the next one would
    // have taken the mark): clear them now, or what they removed in the
    // dropped operations would outlive their cache for as long as they stay
    // quiet.
    let mut cleared: Vec<PodId> = dirty
        .iter()
        .filter(|p| group_of.contains_key(*p))
        .cloned()
        .collect();
    cleared.sort();
    for pod in cleared {
        dirty.remove(&pod);
        if let Some(&g) = group_of.get(&pod) {
            writes[g].pods.push(pod.clone());
            writes[g].ops.push(IndexOp::ClearPod { pod });
        }
    }
    pending_ts.retain(|(pod, t)| match group_of.get(pod) {
        Some(&g) => {
            writes[g].ts.push((pod.clone(), *t));
            false
        }
        None => true,
    });
    for w in &mut writes {
        w.holds = w.pods.clone();
        w.holds.sort();
        w.holds.dedup();
    }
    Plan {
        writes,
        applied_now,
    }
}

/// Longest-processing-time first: each pod, largest first, to the write with
/// the fewest operations so far. Returns each pod's write, `0..min(slots,
/// pods)`.
fn assign(free: HashMap<PodId, usize>, slots: usize) -> HashMap<PodId, usize> {
    let mut by_size: Vec<(PodId, usize)> = free.into_iter().collect();
    by_size.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let k = slots.min(by_size.len());
    let mut loads = vec![0usize; k];
    let mut group_of = HashMap::with_capacity(by_size.len());
    for (pod, n) in by_size {
        let g = (0..k).min_by_key(|&g| loads[g]).unwrap_or(0);
        loads[g] += n;
        group_of.insert(pod, g);
    }
    group_of
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(p: &str) -> PodId {
        PodId::new(p)
    }

    fn clear(p: &str) -> IndexOp {
        IndexOp::ClearPod { pod: pod(p) }
    }

    fn pending(ops: &[&str]) -> Vec<(PodId, IndexOp)> {
        ops.iter().map(|p| (pod(p), clear(p))).collect()
    }

    fn set(pods: &[&str]) -> HashSet<PodId> {
        pods.iter().map(|p| pod(p)).collect()
    }

    #[test]
    fn a_busy_pod_waits_and_the_others_go_out_in_order() {
        let mut p = pending(&["a", "b", "a", "c"]);
        let mut ts = VecDeque::new();
        let out = plan(&mut p, &mut ts, &mut HashSet::new(), &set(&["a"]), 1);
        assert_eq!(p, pending(&["a", "a"]), "a's operations stay, in order");
        assert_eq!(out.writes.len(), 1);
        assert_eq!(out.writes[0].pods, [pod("b"), pod("c")]);
        assert_eq!(out.writes[0].holds, [pod("b"), pod("c")]);
    }

    #[test]
    fn pods_are_spread_over_the_slots_largest_first_and_never_split() {
        let mut p = pending(&["a", "b", "a", "c", "a", "b"]);
        let out = plan(
            &mut p,
            &mut VecDeque::new(),
            &mut HashSet::new(),
            &HashSet::new(),
            2,
        );
        assert!(p.is_empty());
        let holds: Vec<_> = out.writes.iter().map(|w| w.holds.clone()).collect();
        assert_eq!(holds, [vec![pod("a")], vec![pod("b"), pod("c")]]);
        assert_eq!(out.writes[0].ops.len(), 3);
        // More slots than pods: one write per pod, no empty write.
        let mut p = pending(&["a", "b"]);
        let empty = &mut VecDeque::new();
        let out = plan(&mut p, empty, &mut HashSet::new(), &HashSet::new(), 8);
        assert_eq!(out.writes.len(), 2);
    }

    #[test]
    fn a_dirty_pod_ends_its_write_with_a_clear_unless_busy() {
        let mut p = pending(&["a"]);
        let mut dirty = set(&["a", "q", "busy"]);
        let out = plan(&mut p, &mut VecDeque::new(), &mut dirty, &set(&["busy"]), 1);
        assert_eq!(dirty, set(&["busy"]), "a busy pod's clear waits");
        assert_eq!(out.writes.len(), 1);
        assert_eq!(out.writes[0].pods, [pod("a"), pod("a"), pod("q")]);
        assert_eq!(out.writes[0].ops.last(), Some(&clear("q")));
        assert_eq!(out.writes[0].holds, [pod("a"), pod("q")]);
    }

    #[test]
    fn timestamps_go_with_their_write_stay_when_busy_or_apply_when_idle() {
        let mut p = pending(&["a"]);
        let mut ts: VecDeque<_> = [(pod("a"), 1.0), (pod("busy"), 2.0), (pod("idle"), 3.0)]
            .into_iter()
            .collect();
        let out = plan(&mut p, &mut ts, &mut HashSet::new(), &set(&["busy"]), 1);
        assert_eq!(out.applied_now, [3.0]);
        assert_eq!(out.writes[0].ts, [(pod("a"), 1.0)]);
        assert_eq!(ts, [(pod("busy"), 2.0)]);
    }

    #[test]
    fn no_free_slot_starts_nothing_but_idle_batches_still_apply() {
        let mut p = pending(&["a"]);
        let mut ts: VecDeque<_> = [(pod("a"), 1.0), (pod("idle"), 3.0)].into_iter().collect();
        let mut dirty = set(&["d"]);
        let out = plan(&mut p, &mut ts, &mut dirty, &HashSet::new(), 0);
        assert!(out.writes.is_empty());
        assert_eq!(out.applied_now, [3.0]);
        assert_eq!(p, pending(&["a"]));
        assert_eq!(dirty, set(&["d"]));
        assert_eq!(ts, [(pod("a"), 1.0)]);
    }
}
