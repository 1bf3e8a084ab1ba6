//! A set of pods as a bitmap: the value type of every peer's block index
//! (block -> pods believed to hold it).
//!
//! Fleets under simulation have 8 to 16 pods, so one inline `u64` word
//! covers them with no allocation per block entry (an index holds ~10^6
//! entries); a pod at 64 or above moves the set to a heap of words, so any
//! fleet size still works.

use super::PodIndex;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodSet {
    Inline(u64),
    Heap(Vec<u64>),
}

impl Default for PodSet {
    fn default() -> Self {
        PodSet::Inline(0)
    }
}

impl PodSet {
    pub fn new() -> PodSet {
        PodSet::default()
    }

    /// The set `{0, .., pods - 1}`.
    pub fn all(pods: usize) -> PodSet {
        let mut s = PodSet::new();
        let words = pods.div_ceil(64);
        for w in 0..words {
            let bits = if (w + 1) * 64 <= pods {
                u64::MAX
            } else {
                (1u64 << (pods - w * 64)) - 1
            };
            s.set_word(w, bits);
        }
        s
    }

    fn words(&self) -> &[u64] {
        match self {
            PodSet::Inline(w) => std::slice::from_ref(w),
            PodSet::Heap(v) => v,
        }
    }

    fn word(&self, i: usize) -> u64 {
        self.words().get(i).copied().unwrap_or(0)
    }

    fn set_word(&mut self, i: usize, bits: u64) {
        match self {
            PodSet::Inline(w) if i == 0 => *w = bits,
            PodSet::Inline(w) => {
                if bits != 0 {
                    let mut v = vec![0u64; i + 1];
                    v[0] = *w;
                    v[i] = bits;
                    *self = PodSet::Heap(v);
                }
            }
            PodSet::Heap(v) => {
                if i >= v.len() {
                    if bits == 0 {
                        return;
                    }
                    v.resize(i + 1, 0);
                }
                v[i] = bits;
            }
        }
    }

    /// Adds `pod`; returns whether it was absent.
    pub fn insert(&mut self, pod: PodIndex) -> bool {
        let (w, b) = (pod / 64, 1u64 << (pod % 64));
        let old = self.word(w);
        self.set_word(w, old | b);
        old & b == 0
    }

    /// Removes `pod`; returns whether it was present.
    pub fn remove(&mut self, pod: PodIndex) -> bool {
        let (w, b) = (pod / 64, 1u64 << (pod % 64));
        let old = self.word(w);
        if old & b == 0 {
            return false;
        }
        self.set_word(w, old & !b);
        true
    }

    pub fn contains(&self, pod: PodIndex) -> bool {
        self.word(pod / 64) & (1u64 << (pod % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.words().iter().all(|&w| w == 0)
    }

    pub fn len(&self) -> usize {
        self.words().iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn clear(&mut self) {
        *self = PodSet::Inline(0);
    }

    /// `self |= other`.
    pub fn union_with(&mut self, other: &PodSet) {
        for (i, &w) in other.words().iter().enumerate() {
            if w != 0 {
                let old = self.word(i);
                self.set_word(i, old | w);
            }
        }
    }

    /// `self &= other`.
    pub fn intersect_with(&mut self, other: &PodSet) {
        match (&mut *self, other) {
            (PodSet::Inline(a), _) => *a &= other.word(0),
            (PodSet::Heap(v), _) => {
                for (i, w) in v.iter_mut().enumerate() {
                    *w &= other.word(i);
                }
            }
        }
    }

    /// The pods in `self` and not in `other`.
    pub fn difference(&self, other: &PodSet) -> PodSet {
        match self {
            PodSet::Inline(a) => PodSet::Inline(a & !other.word(0)),
            PodSet::Heap(v) => PodSet::Heap(
                v.iter()
                    .enumerate()
                    .map(|(i, w)| w & !other.word(i))
                    .collect(),
            ),
        }
    }

    /// The pods in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = PodIndex> + '_ {
        self.words().iter().enumerate().flat_map(|(i, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(i * 64 + b)
            })
        })
    }
}

/// Each pod's leading run over `n` blocks: `runs[p]` becomes the number of
/// blocks from block 0 that `p` holds without a gap. `holders(i, set)` fills
/// `set` (given empty) with the pods holding block `i`. The walk stops as
/// soon as no pod continues, so a request costs what its longest hit costs,
/// not its length (the longest hit is what it returns).
pub fn leading_runs(
    n: usize,
    runs: &mut [usize],
    mut holders: impl FnMut(usize, &mut PodSet),
) -> usize {
    runs.iter_mut().for_each(|r| *r = 0);
    let mut alive = PodSet::all(runs.len());
    let mut here = PodSet::new();
    let mut depth = 0;
    while depth < n && !alive.is_empty() {
        here.clear();
        holders(depth, &mut here);
        let dropped = alive.difference(&here);
        for p in dropped.iter() {
            runs[p] = depth;
        }
        alive.intersect_with(&here);
        depth += 1;
    }
    let mut longest = 0;
    for p in alive.iter() {
        runs[p] = depth;
    }
    for &r in runs.iter() {
        longest = longest.max(r);
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_and_heap_sets_agree() {
        let mut s = PodSet::new();
        assert!(s.insert(3));
        assert!(!s.insert(3));
        assert!(s.insert(70));
        assert!(matches!(s, PodSet::Heap(_)));
        assert!(s.contains(3) && s.contains(70) && !s.contains(4));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 70]);
        assert_eq!(s.len(), 2);
        assert!(s.remove(70));
        assert!(!s.remove(70));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3]);
        s.clear();
        assert!(s.is_empty());
    }

    #[test]
    fn all_sets_exactly_the_first_pods() {
        assert_eq!(PodSet::all(3).iter().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(PodSet::all(64).len(), 64);
        let s = PodSet::all(66);
        assert_eq!(s.len(), 66);
        assert!(s.contains(65) && !s.contains(66));
        assert!(PodSet::all(0).is_empty());
    }

    #[test]
    fn set_algebra() {
        let mut a = PodSet::new();
        let mut b = PodSet::new();
        for p in [1, 2, 65] {
            a.insert(p);
        }
        for p in [2, 3] {
            b.insert(p);
        }
        assert_eq!(a.difference(&b).iter().collect::<Vec<_>>(), vec![1, 65]);
        let mut u = a.clone();
        u.union_with(&b);
        assert_eq!(u.iter().collect::<Vec<_>>(), vec![1, 2, 3, 65]);
        let mut i = a.clone();
        i.intersect_with(&b);
        assert_eq!(i.iter().collect::<Vec<_>>(), vec![2]);
        let mut i2 = b.clone();
        i2.intersect_with(&a);
        assert_eq!(i2.iter().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn leading_runs_stop_at_each_pods_first_gap() {
        // Block holders: 0: {0,1,2}, 1: {0,1}, 2: {1, 2}, 3: {1}. Pod 2 has
        // a gap at block 1, so its block 2 does not count.
        let holders = [vec![0, 1, 2], vec![0, 1], vec![1, 2], vec![1]];
        let mut runs = vec![9; 4];
        let mut asked = 0;
        let longest = leading_runs(4, &mut runs, |i, set| {
            asked += 1;
            for &p in &holders[i] {
                set.insert(p);
            }
        });
        assert_eq!(runs, vec![2, 4, 1, 0]);
        assert_eq!(longest, 4);
        assert_eq!(asked, 4);
    }

    #[test]
    fn leading_runs_stop_early_when_no_pod_continues() {
        let mut runs = vec![0; 2];
        let mut asked = 0;
        let longest = leading_runs(100, &mut runs, |i, set| {
            asked += 1;
            if i < 3 {
                set.insert(1);
            }
        });
        assert_eq!(runs, vec![0, 3]);
        assert_eq!(longest, 3);
        assert_eq!(asked, 4, "blocks 0..=3 looked up, then the walk stops");
    }
}
