//! Redis backend (placeholder until it lands).
use super::{Index, IndexError, IndexOp, Lookup};
use crate::ids::{BlockKey, ModelName, PodId};

/// The shared index in Redis.
pub struct RedisIndex;

impl Index for RedisIndex {
    async fn apply(&self, _ops: &[IndexOp]) -> Result<(), IndexError> {
        Err(IndexError::Config("redis backend not built yet".into()))
    }
    async fn lookup(&self, _m: &ModelName, _k: &[BlockKey], _c: Option<&[PodId]>) -> Result<Lookup, IndexError> {
        Err(IndexError::Config("redis backend not built yet".into()))
    }
}
