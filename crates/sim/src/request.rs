//! One request as the simulator sees it: what arrives (time, prompt tokens,
//! output length, session) plus the engine's block hashes of its prompt,
//! computed once per workload and shared by every policy's run.

use crate::hashing::RequestHashes;
use kvroute_core::events::BlockHash;
use kvroute_core::keys::KeyScheme;
use std::sync::Arc;

/// A request of a workload, in arrival order (`id` is its position).
#[derive(Debug, Clone)]
pub struct SimRequest {
    /// Position in the workload (0-based); unique within a run.
    pub id: u64,
    /// Arrival in seconds of virtual time from the run's start.
    pub arrival: f64,
    /// Prompt token ids.
    pub tokens: Arc<[u32]>,
    /// Tokens the engine generates (at least 1: the first token).
    pub output_len: u32,
    /// A session or tenant key, what a client would send in a session
    /// header (`x-session-id`); `None` when the workload has none.
    pub session: Option<u64>,
    /// The engine's chained hashes of the prompt's full blocks, and the
    /// chain state after them (the engine extends it while decoding).
    pub hashes: Arc<RequestHashes>,
}

impl SimRequest {
    /// A request whose prompt hashes are computed with the engines' `scheme`.
    pub fn new(
        id: u64,
        arrival: f64,
        tokens: Vec<u32>,
        output_len: u32,
        session: Option<u64>,
        scheme: &KeyScheme,
    ) -> SimRequest {
        let mut hashes = RequestHashes::new(scheme);
        hashes.extend(scheme, &tokens);
        SimRequest {
            id,
            arrival,
            tokens: tokens.into(),
            output_len: output_len.max(1),
            session,
            hashes: Arc::new(hashes),
        }
    }

    /// Prompt length in tokens.
    pub fn prompt_len(&self) -> usize {
        self.tokens.len()
    }

    /// The prompt's full-block hashes.
    pub fn block_hashes(&self) -> &[BlockHash] {
        &self.hashes.hashes
    }
}
