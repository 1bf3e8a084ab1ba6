//! Chained block hashes for the history-based peers (GIE/llm-d approximate,
//! AIBrix), computed from token ids.
//!
//! The real peers hash prompt *text* (xxhash64 over characters or bytes);
//! the simulator has token ids only, so a block of `B` characters is a block
//! of `B / 4` tokens and its hash is taken over those token ids instead. The
//! function differs from xxhash but keeps what matters to the policy: a
//! block's hash depends on the seed and every token before and in it, so two
//! prompts share block `i`'s hash exactly when they share the first `i + 1`
//! blocks.

use super::rng::mix64;

/// What to do with a trailing partial block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Hash it as one more (shorter) block (llm-d-router's approximate
    /// producer).
    Keep,
    /// Ignore it (AIBrix, old GIE, vLLM).
    Drop,
}

/// Hashes `tokens` in blocks of `block` tokens, chained from `seed`, up to
/// `max_blocks` blocks. A prompt shorter than one block gives no hashes
/// whichever the tail rule (both peers return none for it).
pub fn chained_block_hashes(
    seed: u64,
    tokens: &[u32],
    block: usize,
    tail: Tail,
    max_blocks: usize,
) -> Vec<u64> {
    if block == 0 || tokens.len() < block {
        return Vec::new();
    }
    let full = tokens.len() / block;
    let count = match tail {
        Tail::Keep => tokens.len().div_ceil(block),
        Tail::Drop => full,
    }
    .min(max_blocks);
    let mut out = Vec::with_capacity(count);
    let mut h = mix64(seed);
    for chunk in tokens.chunks(block).take(count) {
        for &t in chunk {
            h = mix64(h.rotate_left(23) ^ u64::from(t));
        }
        // The length keeps a short tail apart from a full block that starts
        // with the same tokens.
        h = mix64(h ^ ((chunk.len() as u64) << 40));
        out.push(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_counts_follow_the_tail_rule_and_cap() {
        let t: Vec<u32> = (0..40).collect();
        assert_eq!(chained_block_hashes(1, &t, 16, Tail::Keep, 256).len(), 3);
        assert_eq!(chained_block_hashes(1, &t, 16, Tail::Drop, 256).len(), 2);
        assert_eq!(chained_block_hashes(1, &t, 16, Tail::Keep, 2).len(), 2);
        assert!(chained_block_hashes(1, &t[..15], 16, Tail::Keep, 256).is_empty());
        assert_eq!(
            chained_block_hashes(1, &t[..16], 16, Tail::Keep, 256).len(),
            1
        );
    }

    #[test]
    fn hashes_are_chained() {
        let a: Vec<u32> = (0..48).collect();
        let mut b = a.clone();
        b[20] = 999; // block 1 differs
        let ha = chained_block_hashes(1, &a, 16, Tail::Drop, 256);
        let hb = chained_block_hashes(1, &b, 16, Tail::Drop, 256);
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        assert_ne!(ha[2], hb[2], "block 2 is equal but its prefix is not");
        let other_seed = chained_block_hashes(2, &a, 16, Tail::Drop, 256);
        assert_ne!(ha[0], other_seed[0]);
    }

    #[test]
    fn a_partial_tail_differs_from_a_full_block_with_its_tokens() {
        let full: Vec<u32> = (0..32).collect();
        let short = &full[..24];
        let hf = chained_block_hashes(1, &full, 16, Tail::Keep, 256);
        let hs = chained_block_hashes(1, short, 16, Tail::Keep, 256);
        assert_eq!(hf[0], hs[0]);
        assert_ne!(hf[1], hs[1]);
    }
}
