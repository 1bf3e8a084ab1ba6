//! Block keys: the contract between ingester and scorer (`docs/architecture.md`, "Block keys").
//!
//! `key_i = lower64(SHA-256(canonical_CBOR([parent_i, tokens_i, extra_i])))`,
//! chained from a root derived from the seed, over full blocks only. Both of
//! vLLM's CBOR schemes are supported ([`HashScheme`]); with vLLM's scheme, seed
//! and block size the keys equal the block hashes vLLM publishes, and they are
//! the keys llm-d-kv-cache computes (v0.2-v0.3: 64-bit, v0.4: full digest).

pub mod cache;
pub mod cbor;
mod chain;
mod extra;

pub use cache::{KeyCache, KeyCacheStats};
pub use chain::{ChainState, HashScheme, KeyError, KeyScheme};
pub use extra::ExtraKeys;
