//! Chaining: the root from the seed, then one SHA-256 per full block.

use super::cbor::{self, Parent};
use super::extra::ExtraKeys;
use crate::ids::BlockKey;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// How vLLM chains block hashes. Both must be supported because fleets run
/// both generations of vLLM (and of llm-d's indexer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashScheme {
    /// vLLM >= 0.11 `sha256_cbor`: the parent is the previous full 32-byte digest.
    Sha256Cbor,
    /// vLLM 0.10 `sha256_cbor_64bit`: every hash, the root included, is the
    /// 64-bit `lower64(digest)`, and the parent is that integer.
    Sha256Cbor64,
}

impl HashScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            HashScheme::Sha256Cbor => "sha256_cbor",
            HashScheme::Sha256Cbor64 => "sha256_cbor_64bit",
        }
    }
}

impl fmt::Display for HashScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HashScheme {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "sha256_cbor" => Ok(HashScheme::Sha256Cbor),
            "sha256_cbor_64bit" => Ok(HashScheme::Sha256Cbor64),
            other => Err(KeyError::UnknownScheme(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unknown hash scheme {0:?}: expected sha256_cbor or sha256_cbor_64bit")]
    UnknownScheme(String),
    #[error("block size must be at least 1")]
    ZeroBlockSize,
}

/// Where a chain continues from: the parent hash in the form the scheme feeds
/// into the next block. For `sha256_cbor` this is the full digest, which is
/// why the ingester must remember digests (not just keys) to continue a chain
/// from an event's `parent_block_hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainState {
    Digest([u8; 32]),
    U64(u64),
}

impl ChainState {
    /// The key of the block this state was produced by.
    pub fn key(&self) -> BlockKey {
        match self {
            ChainState::Digest(d) => BlockKey(lower64(d)),
            ChainState::U64(v) => BlockKey(*v),
        }
    }

    fn as_parent(&self) -> Parent<'_> {
        match self {
            ChainState::Digest(d) => Parent::Digest(d),
            ChainState::U64(v) => Parent::U64(*v),
        }
    }
}

/// The last 8 bytes of a digest, big-endian: how a digest becomes a key.
pub fn lower64(d: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[24..]);
    u64::from_be_bytes(b)
}

/// A configured key scheme: hash scheme, seed and block size. Cheap to copy
/// around; the root is computed once.
#[derive(Debug, Clone)]
pub struct KeyScheme {
    scheme: HashScheme,
    seed: std::sync::Arc<str>,
    block_size: usize,
    root: ChainState,
}

impl KeyScheme {
    /// `seed` is the string vLLM reads from `PYTHONHASHSEED` (vLLM >= 0.11 uses
    /// `"vllm-none-hash"` when it is unset).
    pub fn new(scheme: HashScheme, seed: &str, block_size: usize) -> Result<Self, KeyError> {
        if block_size == 0 {
            return Err(KeyError::ZeroBlockSize);
        }
        let mut buf = Vec::with_capacity(seed.len() + 9);
        cbor::write_text(&mut buf, seed);
        let digest: [u8; 32] = Sha256::digest(&buf).into();
        let root = match scheme {
            HashScheme::Sha256Cbor => ChainState::Digest(digest),
            HashScheme::Sha256Cbor64 => ChainState::U64(lower64(&digest)),
        };
        Ok(KeyScheme {
            scheme,
            seed: seed.into(),
            block_size,
            root,
        })
    }

    pub fn scheme(&self) -> HashScheme {
        self.scheme
    }

    pub fn seed(&self) -> &str {
        &self.seed
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The parent of block 0.
    pub fn root(&self) -> ChainState {
        self.root
    }

    /// Keys of every full block of `tokens`, chained from the root. A partial
    /// tail block is never keyed (vLLM does not cache it either).
    pub fn block_keys(&self, tokens: &[u32], extra: ExtraKeys<'_>) -> Vec<BlockKey> {
        let mut keys = Vec::with_capacity(tokens.len() / self.block_size);
        self.chain(self.root, 0, tokens, extra, |s| keys.push(s.key()));
        keys
    }

    /// Chains the full blocks of `tokens` from `parent`, calling `each` with
    /// every block's state (its key is `state.key()`), and returns the last
    /// state (the parent for a continuation). `first_index` is the position
    /// of the first block in its request (only block 0 carries the cache salt).
    pub fn chain(
        &self,
        parent: ChainState,
        first_index: usize,
        tokens: &[u32],
        extra: ExtraKeys<'_>,
        mut each: impl FnMut(&ChainState),
    ) -> ChainState {
        let mut state = parent;
        let mut buf = Vec::with_capacity(16 + self.block_size * 5);
        let mut extra_buf = [""; 2];
        for (i, block) in tokens.chunks_exact(self.block_size).enumerate() {
            buf.clear();
            let ex = extra.for_block(first_index + i, &mut extra_buf);
            cbor::write_block(&mut buf, state.as_parent(), block, ex);
            let digest: [u8; 32] = Sha256::digest(&buf).into();
            state = match self.scheme {
                HashScheme::Sha256Cbor => ChainState::Digest(digest),
                HashScheme::Sha256Cbor64 => ChainState::U64(lower64(&digest)),
            };
            each(&state);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_names_round_trip() {
        for s in [HashScheme::Sha256Cbor, HashScheme::Sha256Cbor64] {
            assert_eq!(s.as_str().parse::<HashScheme>().ok(), Some(s));
        }
        assert!("sha256".parse::<HashScheme>().is_err());
        assert!(KeyScheme::new(HashScheme::Sha256Cbor, "0", 0).is_err());
    }

    #[test]
    fn root_is_sha256_of_cbor_seed() {
        // sha256(cbor2.dumps("42")) computed with Python.
        let k = KeyScheme::new(HashScheme::Sha256Cbor, "42", 16).expect("scheme");
        let ChainState::Digest(d) = k.root() else {
            panic!("sha256_cbor root must be a digest")
        };
        assert_eq!(
            hex::encode(d),
            "9fa6eb003f14425eb9c8e6baacfbcaab26257357b829c7bfa74ffcc4f31c1780"
        );
    }

    #[test]
    fn partial_tail_block_is_not_keyed() {
        let k = KeyScheme::new(HashScheme::Sha256Cbor, "0", 4).expect("scheme");
        let tokens: Vec<u32> = (0..11).collect();
        assert_eq!(k.block_keys(&tokens, ExtraKeys::NONE).len(), 2);
        assert!(k.block_keys(&tokens[..3], ExtraKeys::NONE).is_empty());
    }

    #[test]
    fn continuing_a_chain_equals_hashing_it_whole() {
        for scheme in [HashScheme::Sha256Cbor, HashScheme::Sha256Cbor64] {
            let k = KeyScheme::new(scheme, "vllm-none-hash", 16).expect("scheme");
            let tokens: Vec<u32> = (1000..1000 + 16 * 5).collect();
            let extra = ExtraKeys {
                lora: Some("a"),
                cache_salt: Some("s"),
            };
            let whole = k.block_keys(&tokens, extra);
            let mut parts = Vec::new();
            let mid = k.chain(k.root(), 0, &tokens[..32], extra, |s| parts.push(s.key()));
            k.chain(mid, 2, &tokens[32..], extra, |s| parts.push(s.key()));
            assert_eq!(whole, parts);
        }
    }
}
