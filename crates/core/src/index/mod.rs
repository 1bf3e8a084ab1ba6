//! The block index: which pods hold which block keys, in which tier.
//!
//! Write path: the ingester turns decoded events into [`IndexOp`]s and calls
//! [`Index::apply`] once per batch. Read path: the scorer calls
//! [`Index::lookup`] with a prompt's keys in order and gets each candidate's
//! consecutive prefix depth.
//!
//! Two backends share the [`Index`] trait and the semantics pinned by the
//! backend-equivalence property test (`tests/index_equivalence.rs`):
//! - [`memory::MemoryIndex`]: embedded, concurrent, memory-bounded; the default
//!   when no Redis is configured, and the reference the Redis backend is
//!   compared against;
//! - `kvroute_redis::RedisIndex` (crate `kvroute-redis`): the shared index
//!   on a single Redis or a Redis Cluster, in the layout llm-d reads.
//!
//! Both find prefixes by bisection ([`LookupMode::Bisect`], `bisect.rs`:
//! why it is exact, and what it returns when pods do not hold prefixes) or
//! by the linear walk ([`LookupMode::Linear`]).

pub mod bisect;
pub mod memory;
pub mod ops;

pub use bisect::{BisectStats, LookupMode};
pub use ops::{BlockRef, IndexOp, Lookup, PodPrefix, StoredBlock, lookup_in_order};

use crate::ids::{ModelName, PodId};
use std::future::Future;

/// Errors of an index backend. The memory backend never fails; the Redis
/// backend fails when Redis does, and callers degrade (the ingester retries
/// and buffers, the scorer routes by load).
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The Redis client's own error, kept as the source (this crate links
    /// no Redis client; `kvroute-redis` converts its errors).
    #[error("redis: {0}")]
    Redis(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("redis reply had an unexpected shape: {0}")]
    Reply(String),
    #[error("redis cluster topology: {0}")]
    Topology(String),
    #[error("index configuration: {0}")]
    Config(String),
}

/// One index interface over every backend.
///
/// `apply` is atomic per block key, not per batch: a lookup running
/// concurrently may see part of a batch, exactly as a reader of vLLM's own
/// cache would see blocks appear one by one. Operations of one call are
/// applied in order.
pub trait Index: Send + Sync {
    /// Apply operations in order.
    fn apply(&self, ops: &[IndexOp]) -> impl Future<Output = Result<(), IndexError>> + Send;

    /// For `keys` (a prompt's block keys, in order), each candidate pod's
    /// consecutive depth from block 0, in any tier and per tier. `None`
    /// candidates means every pod. Work stops at the first block that no
    /// candidate whose run is still unbroken holds.
    fn lookup(
        &self,
        model: &ModelName,
        keys: &[crate::ids::BlockKey],
        candidates: Option<&[PodId]>,
    ) -> impl Future<Output = Result<Lookup, IndexError>> + Send;
}
