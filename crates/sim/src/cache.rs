//! A simulated vLLM prefix cache: a fixed pool of KV blocks with vLLM v1's
//! block-pool semantics, as far as a router can tell them apart.
//!
//! - A block is reusable only together with its whole prefix: a request's
//!   hit is its leading run of full blocks whose chained hashes are cached,
//!   capped one token short of the prompt (vLLM recomputes the last token
//!   to get logits), so a fully cached prompt hits `len - 1` tokens rounded
//!   down to whole blocks.
//! - Blocks of running requests are referenced and never evicted.
//! - A finished request's blocks stay cached and join the free queue tail
//!   first (vLLM frees in reverse), so under pressure a prefix is evicted
//!   from its end and its shared beginning survives longest.
//! - Allocation takes the free queue's head (least recently freed); a cached
//!   block taken that way is evicted and reported (`BlockRemoved`).
//! - A block that becomes full is hashed and cached (`BlockStored`), for
//!   prompt and decode blocks alike. Two requests computing the same block
//!   at once each cache a copy, as vLLM does; each copy's eviction is
//!   reported.
//!
//! Capacity counts usable blocks (vLLM's `num_gpu_blocks` minus its null
//! block). Usage is vLLM's `kv_cache_usage_perc`: referenced blocks over
//! capacity (cached but free blocks count as free).

use fnv::FnvHashMap;
use kvroute_core::events::{AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KvEvent};

/// Index of a block in the pool.
pub type BlockId = u32;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Block {
    /// Set while the block is cached (full and hashed).
    hash: Option<BlockHash>,
    ref_cnt: u32,
    /// Free-queue links (`NIL` at either end, or when not queued).
    prev: u32,
    next: u32,
    queued: bool,
}

/// The blocks one running request holds, in prompt order.
#[derive(Debug, Default, Clone)]
pub struct Holding {
    pub blocks: Vec<BlockId>,
    /// How many of `blocks` (from the start) are cached.
    pub cached: usize,
}

/// Counters a router can read from vLLM's `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// `vllm:prefix_cache_queries_total`: prompt tokens of lookups.
    pub query_tokens: u64,
    /// `vllm:prefix_cache_hits_total`: of those, tokens found cached.
    pub hit_tokens: u64,
    pub stored_blocks: u64,
    pub evicted_blocks: u64,
}

/// The pool does not have the free blocks an allocation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoSpace {
    pub needed: usize,
    pub free: usize,
}

#[derive(Debug)]
pub struct PrefixCache {
    block_size: usize,
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    free: usize,
    cached: FnvHashMap<BlockHash, Vec<BlockId>>,
    events: Vec<KvEvent>,
    stats: CacheStats,
}

impl PrefixCache {
    /// A pool of `capacity` blocks of `block_size` tokens, all free.
    pub fn new(capacity: usize, block_size: usize) -> PrefixCache {
        let capacity = capacity.min(NIL as usize - 1);
        let mut cache = PrefixCache {
            block_size,
            blocks: Vec::with_capacity(capacity),
            head: NIL,
            tail: NIL,
            free: 0,
            cached: FnvHashMap::default(),
            events: Vec::new(),
            stats: CacheStats::default(),
        };
        for id in 0..capacity as u32 {
            cache.blocks.push(Block {
                hash: None,
                ref_cnt: 0,
                prev: NIL,
                next: NIL,
                queued: false,
            });
            cache.push_back(id);
        }
        cache
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn capacity(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks an allocation may take (free, cached or not).
    pub fn free_blocks(&self) -> usize {
        self.free
    }

    /// `vllm:kv_cache_usage_perc` as a fraction.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        (self.blocks.len() - self.free) as f64 / self.blocks.len() as f64
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Whether `hash` is cached (for the oracle policy and fidelity checks).
    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.cached.contains_key(hash)
    }

    /// Distinct cached block hashes.
    pub fn cached_hashes(&self) -> impl Iterator<Item = &BlockHash> {
        self.cached.keys()
    }

    /// Events since the last call, in the order they happened (one vLLM
    /// batch per engine step).
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// Leading blocks of `hashes` (a prompt's full blocks) that are cached,
    /// capped so that at least the prompt's last token is computed. Does not
    /// count towards the hit statistics ([`PrefixCache::record_lookup`] does,
    /// once per request as vLLM counts it).
    pub fn cached_prefix(&self, hashes: &[BlockHash], prompt_tokens: usize) -> usize {
        let cap = prompt_tokens.saturating_sub(1) / self.block_size;
        hashes
            .iter()
            .take(cap)
            .take_while(|h| self.cached.contains_key(h))
            .count()
    }

    /// Counts one request's lookup as vLLM's prefix-cache metrics do.
    pub fn record_lookup(&mut self, prompt_tokens: usize, hit_blocks: usize) {
        self.stats.query_tokens += prompt_tokens as u64;
        self.stats.hit_tokens += (hit_blocks * self.block_size) as u64;
    }

    /// Takes references on the first `hit_blocks` cached blocks of `hashes`
    /// for a request that holds nothing yet (vLLM's `touch`): they leave the
    /// free queue and cannot be evicted while it runs.
    pub fn touch_prefix(&mut self, holding: &mut Holding, hashes: &[BlockHash], hit_blocks: usize) {
        debug_assert!(holding.blocks.is_empty());
        for h in &hashes[..hit_blocks] {
            let Some(&id) = self.cached.get(h).and_then(|ids| ids.first()) else {
                break;
            };
            self.take_ref(id);
            holding.blocks.push(id);
            holding.cached += 1;
        }
    }

    /// Grows `holding` to cover `tokens` tokens, taking free blocks from the
    /// queue's head (evicting what they cached). All or nothing.
    pub fn allocate(&mut self, holding: &mut Holding, tokens: usize) -> Result<(), NoSpace> {
        let needed = tokens
            .div_ceil(self.block_size)
            .saturating_sub(holding.blocks.len());
        if needed > self.free {
            return Err(NoSpace {
                needed,
                free: self.free,
            });
        }
        for _ in 0..needed {
            let id = self.head;
            debug_assert_ne!(id, NIL);
            self.unlink(id);
            self.evict(id);
            self.blocks[id as usize].ref_cnt = 1;
            holding.blocks.push(id);
        }
        Ok(())
    }

    /// Caches the blocks of `holding` that `hashes` (the request's chained
    /// hashes of every full block so far) now covers, reporting them in one
    /// `BlockStored` with their tokens (`tokens`: the request's tokens).
    pub fn cache_full(&mut self, holding: &mut Holding, hashes: &[BlockHash], tokens: &[u32]) {
        let full = hashes.len().min(holding.blocks.len());
        if full <= holding.cached {
            return;
        }
        let first = holding.cached;
        for (i, h) in hashes.iter().enumerate().take(full).skip(first) {
            let id = holding.blocks[i];
            self.blocks[id as usize].hash = Some(*h);
            self.cached.entry(*h).or_default().push(id);
        }
        self.stats.stored_blocks += (full - first) as u64;
        let bs = self.block_size;
        self.events.push(KvEvent::BlockStored(BlockStored {
            block_hashes: hashes[first..full].to_vec(),
            parent_block_hash: first.checked_sub(1).map(|p| hashes[p]),
            token_ids: tokens[first * bs..full * bs].to_vec(),
            block_size: bs as u32,
            ..BlockStored::default()
        }));
        holding.cached = full;
    }

    /// Releases a finished (or preempted) request's blocks, tail first, so
    /// its last blocks are the first evicted.
    pub fn free(&mut self, holding: Holding) {
        for &id in holding.blocks.iter().rev() {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.ref_cnt > 0);
            b.ref_cnt -= 1;
            if b.ref_cnt == 0 {
                // vLLM appends every freed block, cached or not.
                self.push_back(id);
            }
        }
    }

    /// Drops every cached block no request references (vLLM's
    /// `reset_prefix_cache`) and reports `AllBlocksCleared`. Blocks of
    /// running requests stay cached for them.
    pub fn reset(&mut self) {
        for b in &mut self.blocks {
            if b.ref_cnt == 0 {
                b.hash = None;
            }
        }
        self.cached.clear();
        for (id, b) in self.blocks.iter().enumerate() {
            if let Some(h) = b.hash {
                self.cached.entry(h).or_default().push(id as BlockId);
            }
        }
        self.events
            .push(KvEvent::AllBlocksCleared(AllBlocksCleared::default()));
    }

    fn evict(&mut self, id: BlockId) {
        let Some(h) = self.blocks[id as usize].hash.take() else {
            return;
        };
        if let Some(ids) = self.cached.get_mut(&h) {
            ids.retain(|&x| x != id);
            if ids.is_empty() {
                self.cached.remove(&h);
            }
        }
        self.stats.evicted_blocks += 1;
        self.events.push(KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![h],
            medium: None,
        }));
    }

    fn take_ref(&mut self, id: BlockId) {
        if self.blocks[id as usize].queued {
            self.unlink(id);
        }
        self.blocks[id as usize].ref_cnt += 1;
    }

    fn push_back(&mut self, id: BlockId) {
        let tail = self.tail;
        let b = &mut self.blocks[id as usize];
        b.prev = tail;
        b.next = NIL;
        b.queued = true;
        if tail == NIL {
            self.head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.tail = id;
        self.free += 1;
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.queued);
            b.queued = false;
            (
                std::mem::replace(&mut b.prev, NIL),
                std::mem::replace(&mut b.next, NIL),
            )
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u64) -> BlockHash {
        BlockHash::U64(i)
    }

    fn hashes(ids: &[u64]) -> Vec<BlockHash> {
        ids.iter().map(|&i| h(i)).collect()
    }

    /// Runs one request to completion on its own: lookup, allocate, cache,
    /// free. Returns the hit blocks.
    fn run(cache: &mut PrefixCache, ids: &[u64]) -> usize {
        let hs = hashes(ids);
        let tokens = vec![7u32; ids.len() * cache.block_size()];
        let hit = cache.cached_prefix(&hs, tokens.len());
        cache.record_lookup(tokens.len(), hit);
        let mut holding = Holding::default();
        cache.touch_prefix(&mut holding, &hs, hit);
        cache.allocate(&mut holding, tokens.len()).expect("space");
        cache.cache_full(&mut holding, &hs, &tokens);
        cache.free(holding);
        hit
    }

    #[test]
    fn a_fully_cached_prompt_recomputes_its_last_block() {
        let mut c = PrefixCache::new(16, 4);
        assert_eq!(run(&mut c, &[1, 2, 3]), 0);
        // 12 tokens, all cached: the cap is (12 - 1) / 4 = 2 blocks.
        assert_eq!(run(&mut c, &[1, 2, 3]), 2);
        assert_eq!(run(&mut c, &[1, 2, 3, 4]), 3);
        assert_eq!(
            run(&mut c, &[9, 2, 3]),
            0,
            "a block counts only with its prefix"
        );
        let s = c.stats();
        assert_eq!(s.query_tokens, 12 + 12 + 16 + 12);
        assert_eq!(s.hit_tokens, (2 + 3) * 4);
    }

    #[test]
    fn eviction_takes_the_least_recently_freed_tail_first() {
        let mut c = PrefixCache::new(4, 1);
        run(&mut c, &[1, 2, 3]);
        c.take_events();
        // One never-used block, then 3, 2, 1 freed tail first: queue order
        // [spare, 3, 2, 1]. Two new blocks take the spare, then evict 3.
        run(&mut c, &[7, 8]);
        let removed: Vec<_> = c
            .take_events()
            .into_iter()
            .filter_map(|e| match e {
                KvEvent::BlockRemoved(r) => Some(r.block_hashes),
                _ => None,
            })
            .collect();
        assert_eq!(removed, vec![vec![h(3)]]);
        assert!(c.contains(&h(1)) && c.contains(&h(2)) && !c.contains(&h(3)));
    }

    #[test]
    fn running_requests_pin_their_blocks() {
        let mut c = PrefixCache::new(3, 1);
        let hs = hashes(&[1, 2]);
        let mut a = Holding::default();
        c.allocate(&mut a, 2).expect("space");
        c.cache_full(&mut a, &hs, &[5, 6]);
        let mut b = Holding::default();
        assert_eq!(c.allocate(&mut b, 2), Err(NoSpace { needed: 2, free: 1 }));
        // A second request sharing the prefix references the same blocks.
        let mut shared = Holding::default();
        c.touch_prefix(&mut shared, &hs, 2);
        assert_eq!(shared.blocks, a.blocks);
        c.free(a);
        assert_eq!(c.free_blocks(), 1, "still referenced by the second request");
        c.free(shared);
        assert_eq!(c.free_blocks(), 3);
        assert!((c.usage() - 0.0).abs() < 1e-12);
    }

    #[test]
    fn stored_events_chain_from_the_cached_prefix() {
        let mut c = PrefixCache::new(8, 2);
        run(&mut c, &[1, 2]);
        c.take_events();
        run(&mut c, &[1, 2, 3]);
        let ev = c.take_events();
        let KvEvent::BlockStored(s) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(s.block_hashes, vec![h(3)]);
        assert_eq!(s.parent_block_hash, Some(h(2)));
        assert_eq!(s.token_ids.len(), 2);
    }

    #[test]
    fn reset_clears_what_no_request_holds() {
        let mut c = PrefixCache::new(8, 1);
        run(&mut c, &[1, 2]);
        let mut held = Holding::default();
        c.allocate(&mut held, 1).expect("space");
        c.cache_full(&mut held, &hashes(&[5]), &[0]);
        c.reset();
        assert!(!c.contains(&h(1)) && c.contains(&h(5)));
        assert!(matches!(
            c.take_events().last(),
            Some(KvEvent::AllBlocksCleared(_))
        ));
    }
}
