//! Memory backend (placeholder; being written).
use super::{Index, IndexError, IndexOp, Lookup};
use crate::ids::{BlockKey, ModelName, PodId};

pub struct MemoryIndex;

impl Index for MemoryIndex {
    async fn apply(&self, _ops: &[IndexOp]) -> Result<(), IndexError> {
        Ok(())
    }
    async fn lookup(&self, _m: &ModelName, _k: &[BlockKey], _c: Option<&[PodId]>) -> Result<Lookup, IndexError> {
        Ok(Lookup::default())
    }
}
