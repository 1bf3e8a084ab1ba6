//! The embedded index: the default when no Redis is configured (one process,
//! no external dependency), the load-test simulator's oracle, and the reference
//! the Redis backend is property-tested against.
//!
//! Concurrency: blocks are spread over [`SHARDS`] shards by key, each behind
//! its own `RwLock`, so lookups (the scorer's hot path) run in parallel with
//! each other and contend with writes only on the shard they touch. Per-pod
//! membership lives in the shard of the block it refers to, which lets a pod be
//! cleared shard by shard without a global scan of the blocks, mirroring the
//! per-slot bookkeeping of the Redis layout. Engine mappings are sharded by
//! engine hash (a removal by engine hash must find them without knowing the
//! key); they are changed only while the block's shard is write-locked (lock
//! order: block shard, then engine shard), so a mapping and its block never
//! disagree.
//!
//! Lookups bisect like the Redis backend (`bisect.rs`, one shard read lock
//! per block read), so both give the same answer on any content.
//!
//! Memory bound: at most `capacity` blocks (distinct `(model, key)` pairs) are
//! kept. A shard over its share evicts its least recently stored blocks, an
//! eighth of the shard at a time so eviction costs O(1) amortised per insert.
//! Evicting is safe in this domain: a missing entry costs a cache miss in
//! routing, never a wrong answer about a block that is not cached.

use super::bisect::{self, BisectStats, BlockReader, Holders, LookupMode, LookupSettings};
use super::ops::PrefixWalk;
use super::{BlockRef, Index, IndexError, IndexOp, Lookup};
use crate::ids::{BlockKey, EngineHash, ModelName, PodId, Tier};
use fnv::{FnvHashMap, FnvHashSet};
use parking_lot::RwLock;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Number of shards; a power of two well above the core counts we run on.
const SHARDS: usize = 64;

type BlockId = (ModelName, BlockKey);

#[derive(Debug, Default)]
struct Block {
    /// Holders as (pod, tier); a handful per block, so a Vec beats a set.
    holders: Vec<(PodId, Tier)>,
    /// The engine hash mapped to this block, when it differs from the key.
    engine: Option<EngineHash>,
    /// Logical time of the last store, for eviction.
    touched: u64,
}

type EngineId = (ModelName, EngineHash);
type EngineMap = FnvHashMap<EngineId, BlockKey>;

/// The engine-mapping shards; see the module doc for the lock order.
#[derive(Debug)]
struct EngineMaps(Vec<RwLock<EngineMap>>);

impl EngineMaps {
    fn shard(&self, id: &EngineId) -> &RwLock<EngineMap> {
        &self.0[shard_index(id)]
    }
    fn set(&self, id: EngineId, key: BlockKey) {
        self.shard(&id).write().insert(id, key);
    }
    fn unset(&self, id: &EngineId) {
        self.shard(id).write().remove(id);
    }
    fn get(&self, id: &EngineId) -> Option<BlockKey> {
        self.shard(id).read().get(id).copied()
    }
}

fn shard_index(h: &impl Hash) -> usize {
    let mut hasher = fnv::FnvHasher::default();
    h.hash(&mut hasher);
    (hasher.finish() as usize) % SHARDS
}

#[derive(Debug, Default)]
struct Shard {
    blocks: FnvHashMap<BlockId, Block>,
    /// What each pod holds in this shard: lets ClearPod visit only its blocks.
    pods: FnvHashMap<PodId, FnvHashSet<BlockId>>,
}

impl Shard {
    fn store(
        &mut self,
        engines: &EngineMaps,
        id: BlockId,
        pod: &PodId,
        tier: &Tier,
        engine: Option<EngineHash>,
        now: u64,
    ) {
        let block = self.blocks.entry(id.clone()).or_default();
        block.touched = now;
        if !block.holders.iter().any(|(p, t)| p == pod && t == tier) {
            block.holders.push((pod.clone(), tier.clone()));
        }
        if let Some(e) = engine.filter(|e| e.0 != id.1.0) {
            if let Some(old) = block.engine.replace(e)
                && old != e
            {
                engines.unset(&(id.0.clone(), old));
            }
            engines.set((id.0.clone(), e), id.1);
        }
        self.pods.entry(pod.clone()).or_default().insert(id);
    }

    fn remove(&mut self, engines: &EngineMaps, id: &BlockId, pod: &PodId, tier: &Tier) {
        let Some(block) = self.blocks.get_mut(id) else {
            return;
        };
        block.holders.retain(|(p, t)| !(p == pod && t == tier));
        let still_holds = block.holders.iter().any(|(p, _)| p == pod);
        if block.holders.is_empty() {
            self.drop_block(engines, id);
        }
        if !still_holds {
            self.forget_membership(pod, id);
        }
    }

    fn drop_block(&mut self, engines: &EngineMaps, id: &BlockId) {
        if let Some(block) = self.blocks.remove(id)
            && let Some(e) = block.engine
        {
            engines.unset(&(id.0.clone(), e));
        }
    }

    fn forget_membership(&mut self, pod: &PodId, id: &BlockId) {
        if let Some(set) = self.pods.get_mut(pod) {
            set.remove(id);
            if set.is_empty() {
                self.pods.remove(pod);
            }
        }
    }

    fn clear_pod(&mut self, engines: &EngineMaps, pod: &PodId) {
        let Some(ids) = self.pods.remove(pod) else {
            return;
        };
        for id in ids {
            if let Some(block) = self.blocks.get_mut(&id) {
                block.holders.retain(|(p, _)| p != pod);
                if block.holders.is_empty() {
                    self.drop_block(engines, &id);
                }
            }
        }
    }

    /// Drops the least recently stored eighth of the shard.
    fn evict(&mut self, engines: &EngineMaps) {
        let mut stamps: Vec<u64> = self.blocks.values().map(|b| b.touched).collect();
        let n = (stamps.len() / 8).max(1);
        let (_, cutoff, _) = stamps.select_nth_unstable(n - 1);
        let cutoff = *cutoff;
        let victims: Vec<BlockId> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.touched <= cutoff)
            .map(|(id, _)| id.clone())
            .collect();
        for id in victims {
            if let Some(block) = self.blocks.get(&id) {
                let pods: Vec<PodId> = block.holders.iter().map(|(p, _)| p.clone()).collect();
                for pod in pods {
                    self.forget_membership(&pod, &id);
                }
            }
            self.drop_block(engines, &id);
        }
    }
}

/// The in-memory index. See the module doc.
#[derive(Debug)]
pub struct MemoryIndex {
    shards: Vec<RwLock<Shard>>,
    engines: EngineMaps,
    per_shard_capacity: usize,
    clock: AtomicU64,
    /// How lookups find prefixes (see `bisect.rs`).
    lookup: LookupSettings,
    /// Intervals read block by block by bisecting lookups (see `bisect.rs`).
    fallbacks: AtomicU64,
}

impl MemoryIndex {
    /// An index keeping at most about `capacity_blocks` distinct blocks.
    pub fn new(capacity_blocks: usize) -> Self {
        MemoryIndex {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            engines: EngineMaps(
                (0..SHARDS)
                    .map(|_| RwLock::new(EngineMap::default()))
                    .collect(),
            ),
            per_shard_capacity: capacity_blocks.div_ceil(SHARDS).max(1),
            clock: AtomicU64::new(0),
            lookup: LookupSettings::default(),
            fallbacks: AtomicU64::new(0),
        }
    }

    /// Every pod holding at least one block, sorted (the memory twin of the
    /// Redis registry, [`crate::index::redis::RedisIndex::known_pods`]).
    pub fn known_pods(&self) -> Vec<PodId> {
        let mut pods: Vec<PodId> = self
            .shards
            .iter()
            .flat_map(|s| s.read().pods.keys().cloned().collect::<Vec<_>>())
            .collect();
        pods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        pods.dedup();
        pods
    }

    /// The blocks `pod` holds (every model and tier): what a ClearPod of
    /// it removes now.
    pub fn pod_entries(&self, pod: &PodId) -> u64 {
        self.shards
            .iter()
            .map(|s| s.read().pods.get(pod).map_or(0, |b| b.len() as u64))
            .sum()
    }

    /// How lookups find prefixes from now on.
    pub fn set_lookup_mode(&self, mode: LookupMode) {
        self.lookup.set_mode(mode);
    }

    /// The lookup configuration (mode, and up to which prompt length the
    /// walk is used in any mode).
    pub fn lookup_settings(&self) -> &LookupSettings {
        &self.lookup
    }

    /// Intervals bisecting lookups had to read block by block since creation.
    pub fn lookup_fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    fn shard_of(&self, model: &ModelName, key: BlockKey) -> &RwLock<Shard> {
        &self.shards[shard_index(&(model, key))]
    }

    /// Distinct blocks currently held (for metrics and tests).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().blocks.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolve an engine hash to its key: the mapping if there is one, else
    /// the hash itself (the engine uses the router's scheme).
    fn resolve(&self, model: &ModelName, r: BlockRef) -> BlockKey {
        match r {
            BlockRef::Key(k) => k,
            BlockRef::Engine(e) => self.engines.get(&(model.clone(), e)).unwrap_or(e.as_key()),
        }
    }

    /// Apply operations synchronously (the [`Index`] impl is a thin wrapper).
    pub fn apply_sync(&self, ops: &[IndexOp]) {
        for op in ops {
            match op {
                IndexOp::Store {
                    model,
                    pod,
                    tier,
                    blocks,
                } => {
                    for b in blocks {
                        let now = self.clock.fetch_add(1, Ordering::Relaxed);
                        let mut shard = self.shard_of(model, b.key).write();
                        shard.store(
                            &self.engines,
                            (model.clone(), b.key),
                            pod,
                            tier,
                            b.engine,
                            now,
                        );
                        if shard.blocks.len() > self.per_shard_capacity {
                            shard.evict(&self.engines);
                        }
                    }
                }
                IndexOp::Remove {
                    model,
                    pod,
                    tier,
                    blocks,
                } => {
                    for r in blocks {
                        let key = self.resolve(model, *r);
                        let id = (model.clone(), key);
                        self.shard_of(model, key)
                            .write()
                            .remove(&self.engines, &id, pod, tier);
                    }
                }
                IndexOp::ClearPod { pod } => {
                    for shard in &self.shards {
                        shard.write().clear_pod(&self.engines, pod);
                    }
                }
            }
        }
    }

    /// Lookup synchronously in the current mode (the [`Index`] impl is a
    /// thin wrapper).
    pub fn lookup_sync(
        &self,
        model: &ModelName,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
    ) -> Lookup {
        let mode = self.lookup.mode_for(keys.len());
        self.lookup_in_mode(model, keys, candidates, mode).0
    }

    /// Lookup in `mode` whatever the prompt's length, with what a bisecting
    /// lookup cost (zero for `Linear`).
    pub fn lookup_in_mode(
        &self,
        model: &ModelName,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
        mode: LookupMode,
    ) -> (Lookup, BisectStats) {
        match mode {
            LookupMode::Linear => (self.walk(model, keys, candidates), BisectStats::default()),
            LookupMode::Bisect => {
                let mut reader = Reader {
                    index: self,
                    model,
                    keys,
                };
                let (lookup, stats) =
                    bisect::bisect_sync(keys.len() as u32, &mut reader, candidates);
                if stats.fallbacks > 0 {
                    self.fallbacks
                        .fetch_add(u64::from(stats.fallbacks), Ordering::Relaxed);
                    metrics::counter!(bisect::LOOKUP_FALLBACKS, "backend" => "memory")
                        .increment(u64::from(stats.fallbacks));
                }
                (lookup, stats)
            }
        }
    }

    /// The linear walk, block by block.
    fn walk(&self, model: &ModelName, keys: &[BlockKey], candidates: Option<&[PodId]>) -> Lookup {
        let mut walk = PrefixWalk::new(candidates);
        for &key in keys {
            let shard = self.shard_of(model, key).read();
            let id = (model.clone(), key);
            let holders = shard
                .blocks
                .get(&id)
                .map(|b| b.holders.as_slice())
                .unwrap_or(&[]);
            if !walk.push(holders.iter().map(|(p, t)| (p, t))) {
                break;
            }
        }
        walk.finish()
    }
}

/// A prompt's blocks as the bisection reads them: one shard lock per read.
struct Reader<'a> {
    index: &'a MemoryIndex,
    model: &'a ModelName,
    keys: &'a [BlockKey],
}

impl Reader<'_> {
    fn with_block<T>(&self, block: u32, f: impl FnOnce(&[(PodId, Tier)]) -> T) -> T {
        let Some(&key) = self.keys.get(block as usize) else {
            return f(&[]);
        };
        let shard = self.index.shard_of(self.model, key).read();
        let id = (self.model.clone(), key);
        f(shard
            .blocks
            .get(&id)
            .map(|b| b.holders.as_slice())
            .unwrap_or(&[]))
    }
}

impl BlockReader for Reader<'_> {
    fn count(&mut self, block: u32) -> u32 {
        self.with_block(block, |h| h.len() as u32)
    }

    fn holders(&mut self, block: u32) -> Holders {
        self.with_block(block, |h| h.to_vec())
    }
}

impl Index for MemoryIndex {
    async fn apply(&self, ops: &[IndexOp]) -> Result<(), IndexError> {
        self.apply_sync(ops);
        Ok(())
    }

    async fn lookup(
        &self,
        model: &ModelName,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
    ) -> Result<Lookup, IndexError> {
        Ok(self.lookup_sync(model, keys, candidates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::StoredBlock;

    fn store(model: &ModelName, pod: &PodId, tier: Tier, keys: &[(u64, Option<u64>)]) -> IndexOp {
        IndexOp::Store {
            model: model.clone(),
            pod: pod.clone(),
            tier,
            blocks: keys
                .iter()
                .map(|&(k, e)| StoredBlock {
                    key: BlockKey(k),
                    engine: e.map(EngineHash),
                })
                .collect(),
        }
    }

    fn keys(ks: &[u64]) -> Vec<BlockKey> {
        ks.iter().map(|&k| BlockKey(k)).collect()
    }

    #[test]
    fn store_lookup_remove_clear() {
        let idx = MemoryIndex::new(1000);
        let m = ModelName::new("m");
        let (a, b) = (PodId::new("127.0.0.11:8000"), PodId::new("127.0.0.12:8000"));
        idx.apply_sync(&[
            store(&m, &a, Tier::gpu(), &[(1, None), (2, Some(20)), (3, None)]),
            store(&m, &b, Tier::gpu(), &[(1, None), (2, None)]),
        ]);
        let l = idx.lookup_sync(&m, &keys(&[1, 2, 3, 4]), None);
        assert_eq!(
            l.pods.iter().map(|p| p.depth).collect::<Vec<_>>(),
            vec![3, 2]
        );
        // Remove block 2 of a by its engine hash: a's run now ends at 1.
        idx.apply_sync(&[IndexOp::Remove {
            model: m.clone(),
            pod: a.clone(),
            tier: Tier::gpu(),
            blocks: vec![BlockRef::Engine(EngineHash(20))],
        }]);
        let l = idx.lookup_sync(&m, &keys(&[1, 2, 3]), None);
        assert_eq!(
            l.pods.iter().map(|p| p.depth).collect::<Vec<_>>(),
            vec![1, 2]
        );
        // The mapping survives while b still holds key 2.
        assert_eq!(
            idx.resolve(&m, BlockRef::Engine(EngineHash(20))),
            BlockKey(2)
        );
        idx.apply_sync(&[IndexOp::ClearPod { pod: b.clone() }]);
        let l = idx.lookup_sync(&m, &keys(&[1, 2, 3]), None);
        assert_eq!(l.pods.len(), 1);
        assert_eq!(l.pods[0].pod, a);
        // Key 2 lost its last holder: its engine mapping went with it.
        assert_eq!(
            idx.resolve(&m, BlockRef::Engine(EngineHash(20))),
            BlockKey(20)
        );
        idx.apply_sync(&[IndexOp::ClearPod { pod: a.clone() }]);
        assert!(idx.is_empty());
    }

    #[test]
    fn models_are_separate() {
        let idx = MemoryIndex::new(1000);
        let (m1, m2) = (ModelName::new("m1"), ModelName::new("m2"));
        let a = PodId::new("127.0.0.11:8000");
        idx.apply_sync(&[store(&m1, &a, Tier::gpu(), &[(1, None)])]);
        assert_eq!(idx.lookup_sync(&m2, &keys(&[1]), None).pods.len(), 0);
        assert_eq!(idx.lookup_sync(&m1, &keys(&[1]), None).pods.len(), 1);
    }

    #[test]
    fn eviction_bounds_memory_and_keeps_membership_consistent() {
        let idx = MemoryIndex::new(SHARDS * 8);
        let m = ModelName::new("m");
        let a = PodId::new("127.0.0.11:8000");
        for k in 0..10_000u64 {
            idx.apply_sync(&[store(&m, &a, Tier::gpu(), &[(k, Some(k + 1_000_000))])]);
        }
        assert!(idx.len() <= SHARDS * 8, "len {}", idx.len());
        // The most recent block survives; the oldest is gone.
        assert_eq!(idx.lookup_sync(&m, &keys(&[9_999]), None).max_depth(), 1);
        assert_eq!(idx.lookup_sync(&m, &keys(&[0]), None).max_depth(), 0);
        for s in &idx.shards {
            let s = s.read();
            let members: usize = s.pods.values().map(|v| v.len()).sum();
            assert_eq!(members, s.blocks.len());
        }
        let mappings: usize = idx.engines.0.iter().map(|e| e.read().len()).sum();
        assert_eq!(mappings, idx.len());
        idx.apply_sync(&[IndexOp::ClearPod { pod: a }]);
        assert!(idx.is_empty());
    }
}
