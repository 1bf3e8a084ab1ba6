//! Test helpers shared by the ingester's unit tests: the key scheme the
//! tests hash with, a vLLM-style store event, and the memory index behind a
//! switch that makes writes fail (a Redis that is down or refuses writes).

use kvroute_core::events::{BlockHash, BlockStored, KvEvent};
use kvroute_core::ids::{BlockKey, ModelName, PodId};
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::index::{Index, IndexError, IndexOp, Lookup};
use kvroute_core::keys::{ExtraKeys, HashScheme, KeyScheme};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// 64-bit SHA-256 CBOR keys, seed 42, blocks of 4 tokens.
pub fn scheme() -> KeyScheme {
    KeyScheme::new(HashScheme::Sha256Cbor64, "42", 4).expect("scheme")
}

/// A store of `tokens` (full blocks) from the root, hashed as vLLM would.
pub fn stored(tokens: &[u32]) -> KvEvent {
    let keys = scheme().block_keys(tokens, ExtraKeys::NONE);
    KvEvent::BlockStored(BlockStored {
        block_hashes: keys.iter().map(|k| BlockHash::U64(k.0)).collect(),
        token_ids: tokens.to_vec(),
        block_size: 4,
        ..Default::default()
    })
}

/// The memory index behind a switch: while `down`, writes fail.
pub struct Flaky {
    pub inner: MemoryIndex,
    pub down: AtomicBool,
}

impl Flaky {
    pub fn new(capacity: usize, down: bool) -> Self {
        Flaky {
            inner: MemoryIndex::new(capacity),
            down: AtomicBool::new(down),
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Relaxed);
    }
}

impl Index for Flaky {
    async fn apply(&self, ops: &[IndexOp]) -> Result<(), IndexError> {
        if self.down.load(Relaxed) {
            return Err(IndexError::Topology("down".into()));
        }
        self.inner.apply(ops).await
    }

    async fn lookup(
        &self,
        model: &ModelName,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
    ) -> Result<Lookup, IndexError> {
        self.inner.lookup(model, keys, candidates).await
    }
}
