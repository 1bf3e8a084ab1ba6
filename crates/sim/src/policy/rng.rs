//! A small seeded generator for the peers' random tie-breaks.
//!
//! Every peer breaks exact ties (and AIBrix shuffles) at random; seeding it
//! makes a run reproducible, and a private SplitMix64 keeps the simulator
//! free of a `rand` dependency and of any change in `rand`'s streams between
//! versions (the same seed gives the same run forever).

/// SplitMix64 (Steele, Lea, Flood 2014): one 64-bit state, one add and a
/// mix per draw; passes BigCrush, which is far more than tie-breaking needs.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser: a bijective avalanche of a 64-bit value, also
/// used to hash token ids into block hashes ([`super::blockhash`]).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// Uniform in `0..n` (`n > 0`; 0 for `n == 0`), without modulo bias:
    /// Lemire's multiply-shift with rejection of the short last interval.
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let n = n as u64;
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as usize;
            }
        }
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fisher-Yates shuffle (AIBrix shuffles before a stable sort, which is
    /// how its exact ties end up in random order).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// Picks uniformly among the items that share the best key, in one pass
/// (reservoir sampling of size 1 over the ties, as Dynamo does): `better(a,
/// b)` says `a` beats `b`; equal keys (neither beats the other) tie.
pub fn pick_best<T: Copy, K: Copy>(
    rng: &mut SplitMix64,
    items: impl IntoIterator<Item = (T, K)>,
    better: impl Fn(K, K) -> bool,
) -> Option<T> {
    let mut best: Option<(T, K)> = None;
    let mut ties = 0usize;
    for (item, key) in items {
        match best {
            None => {
                best = Some((item, key));
                ties = 1;
            }
            Some((_, b)) if better(key, b) => {
                best = Some((item, key));
                ties = 1;
            }
            Some((_, b)) if !better(b, key) => {
                ties += 1;
                if rng.below(ties) == 0 {
                    best = Some((item, key));
                }
            }
            Some(_) => {}
        }
    }
    best.map(|(item, _)| item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_stream() {
        // Reference values of SplitMix64 seeded with 1234567 (from the
        // published C reference implementation, splitmix64.c).
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        assert_eq!(r.next_u64(), 9817491932198370423);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64::new(7);
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            seen[r.below(5)] += 1;
        }
        // Each of 5 outcomes expects 1000; 800..1200 is over 6 sigma wide.
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
        assert_eq!(r.below(0), 0);
        assert_eq!(r.below(1), 0);
    }

    #[test]
    fn next_f64_is_in_the_unit_interval() {
        let mut r = SplitMix64::new(3);
        for _ in 0..1000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn pick_best_is_uniform_over_ties_and_ignores_losers() {
        let mut r = SplitMix64::new(11);
        let mut counts = [0u32; 4];
        for _ in 0..3000 {
            // Items 0 and 2 share the lowest key 1; 1 and 3 lose.
            let got = pick_best(&mut r, [(0, 1), (1, 5), (2, 1), (3, 2)], |a, b| a < b)
                .expect("non-empty");
            counts[got] += 1;
        }
        assert_eq!(counts[1] + counts[3], 0);
        assert!((1300..1700).contains(&counts[0]), "{counts:?}");
        assert_eq!(counts[0] + counts[2], 3000);
        assert_eq!(
            pick_best(&mut r, std::iter::empty::<(usize, u32)>(), |a, b| a < b),
            None
        );
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut r = SplitMix64::new(5);
        let mut v: Vec<u32> = (0..20).collect();
        r.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_ne!(v, sorted, "20 items left in order has odds 1/20!");
    }
}
