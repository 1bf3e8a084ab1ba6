//! A cache of block keys for token prefixes seen before, so that the scorer
//! does not SHA-256 a long shared prefix (system prompt, RAG context, earlier
//! turns) on every request: keying 2048 blocks costs ~0.28 ms, a cached
//! prefix ~0.02 ms (docs/benchmarks-history.md).
//!
//! Keys chain: block `i`'s key depends on every token before it, so a prefix
//! can be reused only as a whole. The cache is a trie of segments of
//! [`SEGMENT_BLOCKS`] blocks: a node holds one segment's tokens, their keys
//! and the chain state after them, and is found by (parent node id, fast
//! hash of the segment's tokens). A hit compares the segment's tokens (and
//! for the first segment the extra keys) exactly, and the parent id is a
//! unique counter, not a hash, so a hit is exactly the prefix computed
//! before: a hash collision costs a miss, never a wrong key. After the last
//! cached segment the chain continues from the stored state and the new
//! full segments are added. Bounded in bytes (moka, TinyLFU + LRU); evicting
//! a node only makes its descendants unreachable until they age out.

use super::{ChainState, ExtraKeys, KeyScheme};
use crate::ids::BlockKey;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Blocks per cached segment: 512 tokens at block size 16. Shorter segments
/// reuse more of a prompt that diverges early but cost more lookups; keying
/// the uncached tail of up to `SEGMENT_BLOCKS - 1` blocks costs ~4 µs.
pub const SEGMENT_BLOCKS: usize = 32;
/// Default bound of [`KeyCache::new`]: ~13M tokens of prefixes.
pub const DEFAULT_MAX_BYTES: u64 = 32 << 20;
/// Fixed per-node cost counted by the weigher.
const NODE_OVERHEAD: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct NodeKey {
    /// 0 for a prompt's first segment.
    parent: u64,
    hash: u64,
}

#[derive(Debug)]
struct Node {
    id: u64,
    tokens: Box<[u32]>,
    /// The extra keys, compared for a first segment (children inherit them
    /// through their parent).
    lora: Option<Box<str>>,
    cache_salt: Option<Box<str>>,
    keys: Box<[BlockKey]>,
    /// The chain state after the segment's last block.
    state: ChainState,
}

/// Hits and misses counted in segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyCacheStats {
    pub hit_segments: u64,
    pub keyed_segments: u64,
}

/// See the module doc. One cache per [`KeyScheme`].
pub struct KeyCache {
    scheme: KeyScheme,
    nodes: Option<moka::sync::Cache<NodeKey, Arc<Node>>>,
    next_id: AtomicU64,
    hits: AtomicU64,
    keyed: AtomicU64,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl KeyCache {
    /// A cache of at most about `max_bytes` (0: no caching at all).
    pub fn new(scheme: KeyScheme, max_bytes: u64) -> Self {
        let nodes = (max_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_: &NodeKey, n: &Arc<Node>| {
                    let bytes = n.tokens.len() * 4 + n.keys.len() * 8 + NODE_OVERHEAD;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build()
        });
        KeyCache {
            scheme,
            nodes,
            next_id: AtomicU64::new(1),
            hits: AtomicU64::new(0),
            keyed: AtomicU64::new(0),
        }
    }

    pub fn scheme(&self) -> &KeyScheme {
        &self.scheme
    }

    pub fn stats(&self) -> KeyCacheStats {
        KeyCacheStats {
            hit_segments: self.hits.load(Relaxed),
            keyed_segments: self.keyed.load(Relaxed),
        }
    }

    /// Exactly [`KeyScheme::block_keys`], reusing cached prefixes.
    pub fn block_keys(&self, tokens: &[u32], extra: ExtraKeys<'_>) -> Vec<BlockKey> {
        let Some(nodes) = &self.nodes else {
            return self.scheme.block_keys(tokens, extra);
        };
        let bs = self.scheme.block_size();
        let segment = SEGMENT_BLOCKS * bs;
        let mut keys = Vec::with_capacity(tokens.len() / bs);
        let (mut parent, mut state) = (0u64, self.scheme.root());
        let mut segments = tokens.chunks(segment);
        let mut pending = None;
        for seg in segments.by_ref() {
            if seg.len() < segment {
                pending = Some(seg);
                break;
            }
            let found = nodes
                .get(&node_key(parent, seg, extra))
                .filter(|n| *n.tokens == *seg && (parent != 0 || same_extra(n, extra)));
            match found {
                Some(node) => {
                    self.hits.fetch_add(1, Relaxed);
                    keys.extend_from_slice(&node.keys);
                    (parent, state) = (node.id, node.state);
                }
                None => {
                    pending = Some(seg);
                    break;
                }
            }
        }
        for seg in pending.into_iter().chain(segments) {
            let first = keys.len();
            state = self
                .scheme
                .chain(state, first, seg, extra, |s| keys.push(s.key()));
            if seg.len() < segment {
                break;
            }
            self.keyed.fetch_add(1, Relaxed);
            let id = self.next_id.fetch_add(1, Relaxed);
            let root = parent == 0;
            let node = Node {
                id,
                tokens: seg.into(),
                lora: extra.lora.filter(|_| root).map(Into::into),
                cache_salt: extra.cache_salt.filter(|_| root).map(Into::into),
                keys: keys[first..].into(),
                state,
            };
            nodes.insert(node_key(parent, seg, extra), Arc::new(node));
            parent = id;
        }
        keys
    }
}

fn same_extra(node: &Node, extra: ExtraKeys<'_>) -> bool {
    node.lora.as_deref() == extra.lora && node.cache_salt.as_deref() == extra.cache_salt
}

/// (parent, hash of the segment and, for a first segment, the extra keys).
fn node_key(parent: u64, tokens: &[u32], extra: ExtraKeys<'_>) -> NodeKey {
    let mut h = Hasher(parent ^ 0x243f_6a88_85a3_08d3);
    for pair in tokens.chunks(2) {
        let hi = pair.get(1).copied().unwrap_or(u32::MAX);
        h.word(u64::from(pair[0]) | (u64::from(hi) << 32));
    }
    if parent == 0 {
        for s in [extra.lora, extra.cache_salt] {
            match s {
                None => h.word(u64::MAX),
                Some(s) => {
                    h.word(s.len() as u64);
                    for chunk in s.as_bytes().chunks(8) {
                        let mut b = [0u8; 8];
                        b[..chunk.len()].copy_from_slice(chunk);
                        h.word(u64::from_le_bytes(b));
                    }
                }
            }
        }
    }
    NodeKey {
        parent,
        hash: h.finish(),
    }
}

/// A word-at-a-time multiply-rotate hash (FxHash's step, with a final
/// avalanche): ~0.3 ns per token, where byte-wise FNV would cost 4x that.
/// Collisions only cost a miss (hits compare tokens).
struct Hasher(u64);

impl Hasher {
    fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::HashScheme;

    fn tokens(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) % 128_000)
            .collect()
    }

    #[test]
    fn cached_keys_equal_the_scheme_s_for_every_shape() {
        for scheme in [HashScheme::Sha256Cbor, HashScheme::Sha256Cbor64] {
            let s = KeyScheme::new(scheme, "vllm-none-hash", 16).expect("scheme");
            let cache = KeyCache::new(s.clone(), DEFAULT_MAX_BYTES);
            let base = tokens(1, 16 * 100 + 7);
            let extras = [
                ExtraKeys::NONE,
                ExtraKeys::lora("sql-lora"),
                ExtraKeys {
                    lora: None,
                    cache_salt: Some("salt"),
                },
            ];
            for extra in extras {
                for len in [0, 5, 16, 16 * 32, 16 * 32 + 3, 16 * 64, base.len()] {
                    // Twice: the second call hits.
                    for _ in 0..2 {
                        assert_eq!(
                            cache.block_keys(&base[..len], extra),
                            s.block_keys(&base[..len], extra),
                            "{scheme:?} {extra:?} {len}"
                        );
                    }
                }
                // A prompt sharing the first 40 blocks, then diverging.
                let mut other = base.clone();
                other[16 * 40 + 2] ^= 1;
                assert_eq!(cache.block_keys(&other, extra), s.block_keys(&other, extra));
            }
            let stats = cache.stats();
            assert!(
                stats.hit_segments > 0 && stats.keyed_segments > 0,
                "{stats:?}"
            );
        }
    }

    #[test]
    fn extra_keys_separate_first_segments() {
        let s = KeyScheme::new(HashScheme::Sha256Cbor, "0", 16).expect("scheme");
        let cache = KeyCache::new(s.clone(), DEFAULT_MAX_BYTES);
        let t = tokens(3, 16 * 64);
        let salted = ExtraKeys {
            lora: None,
            cache_salt: Some("a"),
        };
        let plain = cache.block_keys(&t, ExtraKeys::NONE);
        assert_eq!(cache.block_keys(&t, salted), s.block_keys(&t, salted));
        assert_ne!(cache.block_keys(&t, salted), plain);
        assert_eq!(cache.block_keys(&t, ExtraKeys::NONE), plain);
    }

    #[test]
    fn a_zero_bound_disables_caching() {
        let s = KeyScheme::new(HashScheme::Sha256Cbor, "0", 16).expect("scheme");
        let cache = KeyCache::new(s.clone(), 0);
        let t = tokens(5, 16 * 40);
        assert_eq!(
            cache.block_keys(&t, ExtraKeys::NONE),
            s.block_keys(&t, ExtraKeys::NONE)
        );
        assert_eq!(cache.stats(), KeyCacheStats::default());
    }
}
