//! Identities that cross module boundaries, as newtypes so that an engine hash
//! can never be passed where a router block key is expected (a bug that would
//! compile and silently misroute).

use std::fmt;
use std::sync::Arc;

/// A router block key: `lower64(SHA-256(canonical_CBOR([parent, tokens, extra])))`.
///
/// This is the number written into Redis as `<model>@<key as decimal u64>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub u64);

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The block hash a vLLM engine published for a block.
///
/// vLLM publishes unsigned 64-bit ints, negative ints (older vLLM with Python's
/// builtin `hash`, reinterpreted here as two's complement) or byte strings
/// (32-byte SHA-256, 16-byte xxh3; reduced to their last 8 bytes read
/// big-endian, which for `sha256_cbor` is exactly the router key). It equals a
/// [`BlockKey`] only when the engine uses the router's scheme, seed and block
/// size; the ingester never assumes so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineHash(pub u64);

impl EngineHash {
    /// Reduce an engine hash published as a byte string to 64 bits: the last
    /// (up to) 8 bytes, big-endian. Shorter strings are left-padded with zeros.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let tail = &bytes[bytes.len().saturating_sub(8)..];
        let mut buf = [0u8; 8];
        buf[8 - tail.len()..].copy_from_slice(tail);
        EngineHash(u64::from_be_bytes(buf))
    }

    /// The router key this hash would be if the engine used the router's scheme.
    pub fn as_key(self) -> BlockKey {
        BlockKey(self.0)
    }
}

impl fmt::Display for EngineHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The model name a block belongs to, as it appears in the event topic
/// (`kv@<pod>@<model>`) and in the request's `model` field (base model name).
///
/// Cheap to clone: one model name is attached to every operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelName(Arc<str>);

impl ModelName {
    pub fn new(name: impl AsRef<str>) -> Self {
        ModelName(Arc::from(name.as_ref()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One KV cache: the endpoint the gateway routes to (`<ip>:<port>`, or a bare
/// IP in older deployments) plus the data-parallel rank when the engine runs
/// several ranks, each with its own cache, behind that endpoint.
///
/// Rendered as `endpoint` or `endpoint#dp<rank>`; the rank is kept in the
/// identity from the start so rank-aware routing needs no migration. `#` is
/// used because `@` separates the tier in Redis fields and `:` the port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodId(Arc<str>);

/// Separator between endpoint and data-parallel rank in a rendered [`PodId`].
const DP_SEPARATOR: &str = "#dp";

impl PodId {
    /// A pod without a data-parallel rank.
    pub fn new(endpoint: impl AsRef<str>) -> Self {
        PodId(Arc::from(endpoint.as_ref()))
    }

    /// A pod of `endpoint` serving data-parallel `rank` (none: not data-parallel).
    pub fn with_rank(endpoint: &str, rank: Option<u32>) -> Self {
        match rank {
            None => PodId::new(endpoint),
            Some(r) => PodId(Arc::from(format!("{endpoint}{DP_SEPARATOR}{r}"))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The routable endpoint, without the data-parallel rank.
    pub fn endpoint(&self) -> &str {
        match self.0.rfind(DP_SEPARATOR) {
            Some(i) => &self.0[..i],
            None => &self.0,
        }
    }

    /// The data-parallel rank, when the pod id carries one.
    pub fn dp_rank(&self) -> Option<u32> {
        let i = self.0.rfind(DP_SEPARATOR)?;
        self.0[i + DP_SEPARATOR.len()..].parse().ok()
    }
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a cached block lives: vLLM's `medium` (`GPU` by default, `CPU`,
/// disk/storage tiers from offloading connectors), stored lower-case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tier(Arc<str>);

impl Tier {
    /// Normalises to lower case, as the Redis layout stores it.
    pub fn new(medium: &str) -> Self {
        if medium.bytes().any(|b| b.is_ascii_uppercase()) {
            Tier(Arc::from(medium.to_ascii_lowercase()))
        } else {
            Tier(Arc::from(medium))
        }
    }
    pub fn gpu() -> Self {
        Tier::new("gpu")
    }
    pub fn cpu() -> Self {
        Tier::new("cpu")
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Tier {
    /// vLLM's default medium.
    fn default() -> Self {
        Tier::gpu()
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_hash_from_bytes_takes_last_eight_big_endian() {
        let mut digest = [0u8; 32];
        digest[24..].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        assert_eq!(EngineHash::from_bytes(&digest).0, 0x0102_0304_0506_0708);
        assert_eq!(EngineHash::from_bytes(&[1, 2]).0, 0x0102);
        assert_eq!(EngineHash::from_bytes(&[]).0, 0);
    }

    #[test]
    fn pod_id_carries_rank() {
        let p = PodId::with_rank("127.0.0.11:8000", Some(3));
        assert_eq!(p.as_str(), "127.0.0.11:8000#dp3");
        assert_eq!(p.endpoint(), "127.0.0.11:8000");
        assert_eq!(p.dp_rank(), Some(3));
        let q = PodId::with_rank("127.0.0.11:8000", None);
        assert_eq!(q.endpoint(), "127.0.0.11:8000");
        assert_eq!(q.dp_rank(), None);
    }

    #[test]
    fn tier_is_lower_case() {
        assert_eq!(Tier::new("GPU"), Tier::gpu());
        assert_eq!(Tier::new("CPU").as_str(), "cpu");
        assert_eq!(Tier::default().as_str(), "gpu");
    }
}
