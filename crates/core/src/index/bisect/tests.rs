use super::*;
use crate::index::lookup_in_order;

/// Blocks in hand; counts every read.
struct Data {
    blocks: Vec<Holders>,
    reads: Vec<u32>,
}

impl Data {
    fn new(blocks: Vec<Holders>) -> Self {
        Data {
            blocks,
            reads: Vec::new(),
        }
    }
}

impl BlockReader for Data {
    fn count(&mut self, block: u32) -> u32 {
        self.reads.push(block);
        self.blocks[block as usize].len() as u32
    }
    fn holders(&mut self, block: u32) -> Holders {
        self.reads.push(block);
        self.blocks[block as usize].clone()
    }
}

fn pod(i: usize) -> PodId {
    PodId::new(format!("127.0.0.{}:8000", 11 + i))
}

/// Pod `p` holds blocks `0..depths[p]` in gpu (and `0..cpu[p]` in cpu).
fn prefixes(n: usize, gpu: &[usize], cpu: &[usize]) -> Vec<Holders> {
    (0..n)
        .map(|i| {
            let mut h = Vec::new();
            for (p, &d) in gpu.iter().enumerate() {
                if i < d {
                    h.push((pod(p), Tier::gpu()));
                }
            }
            for (p, &d) in cpu.iter().enumerate() {
                if i < d {
                    h.push((pod(p), Tier::cpu()));
                }
            }
            h
        })
        .collect()
}

fn linear(blocks: &[Holders], candidates: Option<&[PodId]>) -> Lookup {
    lookup_in_order(
        blocks.iter().map(|h| h.iter().map(|(p, t)| (p, t))),
        candidates,
    )
}

#[test]
fn bisection_matches_the_walk_on_prefix_data_and_reads_few_blocks() {
    let n = 2048;
    let gpu: Vec<usize> = (0..8).map(|k| n * (k + 1) / 8).collect();
    let cpu = [0, 100, 0, 0, 0, 1999, 0, 0];
    let blocks = prefixes(n, &gpu, &cpu);
    let mut data = Data::new(blocks.clone());
    let (got, stats) = bisect_sync(n as u32, &mut data, None);
    assert_eq!(got, linear(&blocks, None));
    assert_eq!(stats.fallbacks, 0);
    // 9 distinct depths below 2048: about 9 * 11 counts plus 10 sets.
    assert!(stats.reads < 160, "{stats:?}");
    assert_eq!(stats.reads as usize, data.reads.len());
    let only = [pod(5), pod(2)];
    let mut data = Data::new(blocks.clone());
    assert_eq!(
        bisect_sync(n as u32, &mut data, Some(&only)).0,
        linear(&blocks, Some(&only))
    );
}

#[test]
fn small_and_empty_prompts() {
    for n in 0..6usize {
        for d0 in 0..=n {
            for d1 in 0..=n {
                let blocks = prefixes(n, &[d0, d1], &[d1 / 2, 0]);
                let (got, _) = bisect_sync(n as u32, &mut Data::new(blocks.clone()), None);
                assert_eq!(got, linear(&blocks, None), "n {n} depths {d0} {d1}");
            }
        }
    }
}

#[test]
fn a_hole_between_equal_counts_is_not_seen() {
    // Pod 0 lacks block 5 but holds 0..5 and 6..64; nobody else changes
    // near it: the counts at the probed blocks never differ around 5.
    let n = 64;
    let mut blocks = prefixes(n, &[64, 40], &[]);
    blocks[5].retain(|(p, _)| *p != pod(0));
    let (got, stats) = bisect_sync(n as u32, &mut Data::new(blocks.clone()), None);
    let walk = linear(&blocks, None);
    assert_eq!(walk.pods[0].depth, 5);
    assert_eq!(got.pods[0].depth, 64, "the hole is invisible to bisection");
    assert_eq!(got.pods[1], walk.pods[1]);
    assert_eq!(stats.fallbacks, 0);
}

#[test]
fn a_visible_hole_falls_back_to_reading_the_interval() {
    // Pod 0 lacks block 32, the first block probed; the count then grows
    // from 32 to 48, so [32, 48] is read block by block.
    let n = 64;
    let mut blocks = prefixes(n, &[64, 64, 16], &[]);
    blocks[32].retain(|(p, _)| *p != pod(0));
    let (got, stats) = bisect_sync(n as u32, &mut Data::new(blocks.clone()), None);
    assert_eq!(got, linear(&blocks, None));
    assert_eq!(got.pods[0].depth, 32);
    assert_eq!(stats.fallbacks, 1);
}

#[test]
fn a_swap_between_equal_counts_is_not_seen() {
    // Pod 0 lacks block 32 only; pod 1 leaves at 40. Blocks 32 and 48 both
    // have one holder (pod 1, then pod 0): equal counts, different sets.
    let n = 64;
    let mut blocks = prefixes(n, &[64, 40], &[]);
    blocks[32].retain(|(p, _)| *p != pod(0));
    let (got, _) = bisect_sync(n as u32, &mut Data::new(blocks.clone()), None);
    let walk = linear(&blocks, None);
    assert_eq!(got.pods[0], walk.pods[0], "pod 0's hole is at a probe");
    assert_eq!(walk.pods[1].depth, 40);
    assert_eq!(
        got.pods[1].depth, 64,
        "pod 1 leaving is masked by pod 0 returning"
    );
}

#[test]
fn a_swap_at_a_transition_fails_the_nesting_check() {
    // Pod 1 leaves at 40 while pod 2 (absent from block 0) appears there:
    // counts stay equal, but the set read at the next transition (pod 0
    // leaving at 50) is not a subset of block 0's.
    let n = 64;
    let mut blocks = prefixes(n, &[50, 40], &[]);
    for b in blocks.iter_mut().skip(40) {
        b.push((pod(2), Tier::gpu()));
    }
    let (got, stats) = bisect_sync(n as u32, &mut Data::new(blocks.clone()), None);
    assert_eq!(got, linear(&blocks, None));
    assert_eq!(stats.fallbacks, 1);
}

#[test]
fn nothing_is_read_past_the_first_empty_block() {
    let n = 1024;
    let mut blocks = prefixes(n, &[3], &[]);
    // Holders again far after the prefix ended: irrelevant to the walk.
    for b in blocks.iter_mut().skip(600) {
        b.push((pod(0), Tier::gpu()));
    }
    let mut data = Data::new(blocks.clone());
    let (got, stats) = bisect_sync(n as u32, &mut data, None);
    assert_eq!(got, linear(&blocks, None));
    assert!(stats.reads < 40, "{stats:?}");
}

#[test]
fn speculation_covers_the_next_levels() {
    let mut plan = Bisection::new(16);
    assert_eq!(plan.advance(), vec![0]);
    assert_eq!(plan.speculative(2), vec![4, 8, 12]);
    plan.set_count(0, 2);
    assert_eq!(plan.advance(), vec![8]);
    assert_eq!(plan.speculative(1), vec![4, 12]);
}

mod diff_walk {
    use super::*;
    use proptest::prelude::*;

    /// Arbitrary holder sets (holes, strays, repeated fields), each standing
    /// for a run of 1 to 4 blocks.
    fn runs() -> impl Strategy<Value = Vec<(Holders, u32)>> {
        let holder = (0..4usize, 0..2usize)
            .prop_map(|(p, t)| (pod(p), if t == 0 { Tier::gpu() } else { Tier::cpu() }));
        prop::collection::vec((prop::collection::vec(holder, 0..6), 1..5u32), 1..12)
    }

    proptest! {
        #[test]
        fn equals_the_prefix_walk_over_the_expanded_blocks(
            runs in runs(),
            mask in prop::option::of(0u8..16),
        ) {
            let candidates: Option<Vec<PodId>> =
                mask.map(|m| (0..4).filter(|p| m & (1 << p) != 0).map(pod).collect());
            let c = candidates.as_deref();
            let blocks: Vec<Holders> = runs
                .iter()
                .flat_map(|(h, len)| std::iter::repeat_n(h.clone(), *len as usize))
                .collect();
            let n = blocks.len() as u32;
            let mut sets = Sets::default();
            let mut at = 0;
            for (h, len) in &runs {
                sets.insert(at, h.clone());
                at += len;
            }
            prop_assert_eq!(sets.walk(n, c), linear(&blocks, c));
        }
    }
}
