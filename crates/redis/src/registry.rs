//! In-process memory of which slots were already registered for a pod in
//! `kvroute:pod:<pod>:slots` (and which pods in `kvroute:pods`), so a batch
//! does not re-send the same SADDs.
//!
//! Only an optimisation: when it is wrong (FLUSHALL, a Redis restart without
//! persistence, another process' cleanup) the store script reports that the
//! pod's per-slot entry was created fresh and the writer registers the slot
//! again (`apply.rs`). Entries are added only after Redis acknowledged the
//! SADD.

use super::slots::SLOT_COUNT;
use fnv::FnvHashMap;
use kvroute_core::ids::PodId;
use parking_lot::Mutex;

const WORDS: usize = SLOT_COUNT as usize / 64;
/// Pods remembered (2 KiB each). Past it the cache starts over: forgetting
/// costs a few SADDs that re-register, while keeping every pod ever seen let
/// a stream of new topics grow memory without bound.
pub const MAX_PODS: usize = 4096;

/// One bit per slot: 2 KiB per pod.
struct SlotBits(Box<[u64; WORDS]>);

impl SlotBits {
    fn new() -> Self {
        SlotBits(Box::new([0; WORDS]))
    }
    fn contains(&self, slot: u16) -> bool {
        let s = usize::from(slot % SLOT_COUNT);
        self.0[s / 64] & (1 << (s % 64)) != 0
    }
    fn insert(&mut self, slot: u16) {
        let s = usize::from(slot % SLOT_COUNT);
        self.0[s / 64] |= 1 << (s % 64);
    }
}

/// Slots known to be registered, per pod. A pod present in the map is known
/// to be in `kvroute:pods`.
#[derive(Default)]
pub struct Registry {
    /// A std-like mutex (parking_lot): held for a few bit operations, never
    /// across an await.
    pods: Mutex<FnvHashMap<PodId, SlotBits>>,
}

impl Registry {
    /// Whether `pod` is known to be in `kvroute:pods`.
    pub fn has_pod(&self, pod: &PodId) -> bool {
        self.pods.lock().contains_key(pod)
    }

    /// Whether `slot` is known to be registered for `pod`.
    pub fn has_slot(&self, pod: &PodId, slot: u16) -> bool {
        self.pods
            .lock()
            .get(pod)
            .is_some_and(|bits| bits.contains(slot))
    }

    /// Records acknowledged registrations.
    pub fn mark<'a>(&self, entries: impl IntoIterator<Item = (&'a PodId, u16)>) {
        let mut pods = self.pods.lock();
        for (pod, slot) in entries {
            match pods.get_mut(pod) {
                Some(bits) => bits.insert(slot),
                None => {
                    if pods.len() >= MAX_PODS {
                        pods.clear();
                    }
                    let mut bits = SlotBits::new();
                    bits.insert(slot);
                    pods.insert(pod.clone(), bits);
                }
            }
        }
    }

    /// Forgets everything (after a FLUSHALL through this client).
    pub fn clear(&self) {
        self.pods.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_per_pod_and_slot() {
        let r = Registry::default();
        let (a, b) = (PodId::new("127.0.0.11:8000"), PodId::new("127.0.0.12:8000"));
        assert!(!r.has_pod(&a));
        r.mark([(&a, 0), (&a, 16383), (&b, 77)]);
        assert!(r.has_pod(&a) && r.has_slot(&a, 0) && r.has_slot(&a, 16383));
        assert!(!r.has_slot(&a, 77) && r.has_slot(&b, 77));
        r.clear();
        assert!(!r.has_pod(&b));
    }

    #[test]
    fn bounded_in_pods() {
        let r = Registry::default();
        let pods: Vec<PodId> = (0..MAX_PODS + 10)
            .map(|i| PodId::new(format!("127.0.{}.{}:8000", i / 250, i % 250)))
            .collect();
        for p in &pods {
            r.mark([(p, 1)]);
        }
        assert!(r.pods.lock().len() <= MAX_PODS);
        assert!(r.has_pod(pods.last().expect("pods")));
    }
}
