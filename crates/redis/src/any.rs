//! The backend chosen at startup: the binaries hold an [`AnyIndex`] so that
//! configuration, not generics, picks the index.

use crate::RedisIndex;
use kvroute_core::ids::{BlockKey, ModelName, PodId};
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::index::{Index, IndexError, IndexOp, Lookup, LookupMode};

/// The backend chosen at startup: the binaries hold one of these so that
/// configuration, not generics, picks the index.
pub enum AnyIndex {
    Memory(MemoryIndex),
    Redis(RedisIndex),
}

impl AnyIndex {
    /// How lookups find prefixes from now on (see [`LookupMode`]).
    pub fn set_lookup_mode(&self, mode: LookupMode) {
        match self {
            AnyIndex::Memory(m) => m.set_lookup_mode(mode),
            AnyIndex::Redis(r) => r.set_lookup_mode(mode),
        }
    }

    /// Every pod id the index knows of (Redis: the `kvroute:pods` registry,
    /// which keeps pods that no longer hold anything; memory: pods holding
    /// blocks), sorted.
    pub async fn known_pods(&self) -> Result<Vec<PodId>, IndexError> {
        match self {
            AnyIndex::Memory(m) => Ok(m.known_pods()),
            AnyIndex::Redis(r) => Ok(r.known_pods().await?),
        }
    }

    /// The entries `pod` holds now (what clearing it removes): the operator's
    /// purge reports it and rejects a pod id that matches nothing.
    pub async fn pod_entries(&self, pod: &PodId) -> Result<u64, IndexError> {
        match self {
            AnyIndex::Memory(m) => Ok(m.pod_entries(pod)),
            AnyIndex::Redis(r) => Ok(r.pod_entries(pod).await?),
        }
    }
}

impl Index for AnyIndex {
    async fn apply(&self, ops: &[IndexOp]) -> Result<(), IndexError> {
        match self {
            AnyIndex::Memory(m) => m.apply(ops).await,
            AnyIndex::Redis(r) => r.apply(ops).await,
        }
    }

    async fn lookup(
        &self,
        model: &ModelName,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
    ) -> Result<Lookup, IndexError> {
        match self {
            AnyIndex::Memory(m) => m.lookup(model, keys, candidates).await,
            AnyIndex::Redis(r) => r.lookup(model, keys, candidates).await,
        }
    }
}
