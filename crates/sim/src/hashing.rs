//! The block hashes a simulated engine computes: vLLM's chained hashes
//! (`sha256_cbor` or `sha256_cbor_64bit`, seed and block size as
//! configured), through `kvroute_core::keys` — the code the ingester and the
//! scorer key blocks with, checked against vLLM's own vectors there.

use kvroute_core::events::BlockHash;
use kvroute_core::keys::{ChainState, ExtraKeys, KeyScheme};

/// vLLM's hash of a block as it publishes it in events.
pub fn block_hash(state: &ChainState) -> BlockHash {
    match state {
        ChainState::Digest(d) => BlockHash::Bytes32(*d),
        ChainState::U64(v) => BlockHash::U64(*v),
    }
}

/// A request's chained block hashes, extended as its tokens grow (prompt,
/// then decode) without rehashing what is already hashed.
#[derive(Debug, Clone)]
pub struct RequestHashes {
    parent: ChainState,
    pub hashes: Vec<BlockHash>,
}

impl RequestHashes {
    pub fn new(scheme: &KeyScheme) -> RequestHashes {
        RequestHashes {
            parent: scheme.root(),
            hashes: Vec::new(),
        }
    }

    /// Hashes every full block of `tokens` (the request's tokens so far)
    /// that is not hashed yet.
    pub fn extend(&mut self, scheme: &KeyScheme, tokens: &[u32]) {
        let bs = scheme.block_size();
        let done = self.hashes.len();
        let full = tokens.len() / bs;
        if full <= done {
            return;
        }
        let hashes = &mut self.hashes;
        self.parent = scheme.chain(
            self.parent,
            done,
            &tokens[done * bs..full * bs],
            ExtraKeys::NONE,
            |s| hashes.push(block_hash(s)),
        );
    }
}
