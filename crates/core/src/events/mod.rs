//! vLLM KV events: the first stage of the write path.
//!
//! vLLM publishes its prefix-cache changes over ZeroMQ as three frames: a
//! topic (`kv@<pod>@<model>`), an 8-byte big-endian sequence number and a
//! msgpack `EventBatch` `[ts, events, data_parallel_rank?]`. This module turns
//! those bytes into owned, typed values and back:
//!
//! | file | purpose |
//! |---|---|
//! | `mod.rs` | the event types shared by both directions |
//! | [`topic`] | topic -> (pod, model); the 3 ZMQ frames -> [`RawMessage`] |
//! | `decode.rs` | [`decode_batch`]: payload -> [`DecodedBatch`], both encodings |
//! | `fields.rs` | each event type's fields and their value readers, for decode.rs |
//! | `encode.rs` | [`encode_batch`]: the inverse, byte-identical to vLLM (simulator, tests) |
//! | `wire.rs` | the bounded msgpack cursor the decoder reads with |
//!
//! `README.md` beside this file lays out the positional and named fields.
//!
//! Two event encodings exist: array-like (vLLM <= 0.10, positional fields after
//! the tag) and map (vLLM >= 0.11, named fields). Decoding accepts both, event
//! by event. Unknown event types and unknown fields are expected when vLLM
//! grows: they become [`Skip`] values for a metric, never errors. Malformed
//! bytes are a [`DecodeError`] naming the event and field.
//!
//! Hashes keep the form vLLM sent ([`BlockHash`]: int or digest bytes) so that
//! re-encoding reproduces vLLM's bytes exactly; [`BlockHash::engine`] reduces
//! any form to the [`EngineHash`] the ingester works with.

mod decode;
mod encode;
mod fields;
pub mod topic;
mod wire;

#[cfg(test)]
mod tests;

pub use decode::{DecodeError, decode_batch};
pub use encode::{
    BatchRef, EncodeOptions, Encoding, HashEncoding, encode_batch, encode_batch_into,
};
pub use topic::{
    FrameError, PodAddr, RawMessage, Topic, TopicError, parse_frames, parse_replay_frames,
    parse_topic, parse_topic_with_prefix,
};
pub use wire::WireError;

use crate::ids::{EngineHash, Tier};

/// Deepest nesting of msgpack containers the decoder follows (the batch array
/// is level 1). Bounds recursion on hostile input; vLLM's deepest value
/// (`extra_keys` -> block tuple -> value) is level 6.
pub const MAX_DEPTH: usize = 32;

/// A batch to encode, built by the load-test simulator or taken from a
/// decoded batch ([`DecodedBatch::into_batch`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventBatch {
    /// Publisher wall-clock time, seconds since the epoch.
    pub ts: f64,
    pub events: Vec<KvEvent>,
    /// The data-parallel rank whose cache these events describe (`None`: the
    /// engine is not data-parallel).
    pub data_parallel_rank: Option<u32>,
}

/// The result of [`decode_batch`]: the batch plus what was skipped in it.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedBatch {
    /// Publisher wall-clock time, seconds since the epoch (an int `ts` is
    /// converted).
    pub ts: f64,
    /// `None` when the element is missing or nil.
    pub data_parallel_rank: Option<u32>,
    /// The known events, in order; skipped events leave no gap.
    pub events: Vec<KvEvent>,
    /// Unknown event types and fields, in the order met: count them, do not
    /// fail on them.
    pub skipped: Vec<Skip>,
}

impl DecodedBatch {
    /// The batch without the skip list (e.g. to re-encode it).
    pub fn into_batch(self) -> EventBatch {
        EventBatch {
            ts: self.ts,
            events: self.events,
            data_parallel_rank: self.data_parallel_rank,
        }
    }
}

/// One vLLM KV-cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    AllBlocksCleared(AllBlocksCleared),
}

impl KvEvent {
    /// vLLM's tag for this event (`"BlockStored"`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            KvEvent::BlockStored(_) => BlockStored::TAG,
            KvEvent::BlockRemoved(_) => BlockRemoved::TAG,
            KvEvent::AllBlocksCleared(_) => AllBlocksCleared::TAG,
        }
    }
}

/// Consecutive full blocks entered the engine's cache.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    /// One hash per block, in chain order.
    pub block_hashes: Vec<BlockHash>,
    /// The hash of the block before the first one (`None`: the chain starts
    /// at the root).
    pub parent_block_hash: Option<BlockHash>,
    /// `block_hashes.len() * block_size` token ids (not checked here: the
    /// ingester keys only full blocks and counts mismatches).
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    /// vLLM's integer LoRA id (`None`: base model).
    pub lora_id: Option<i64>,
    /// Where the blocks live. `None` means the field was absent or nil, which
    /// vLLM means as the default tier ([`Tier::default`], gpu); kept as an
    /// `Option` so callers can tell.
    pub medium: Option<Tier>,
    /// The LoRA adapter name (vLLM >= 0.11); the ingester keys LoRA blocks
    /// with it.
    pub lora_name: Option<String>,
    /// vLLM's per-block extra keys (one entry per block, `None` where a block
    /// has none), when the engine publishes them (0.33).
    pub extra_keys: Option<Vec<Option<Vec<ExtraValue>>>>,
}

impl BlockStored {
    pub const TAG: &'static str = "BlockStored";

    /// The block hashes reduced to engine hashes.
    pub fn engine_hashes(&self) -> impl ExactSizeIterator<Item = EngineHash> + '_ {
        self.block_hashes.iter().map(BlockHash::engine)
    }

    /// The tier, with vLLM's default applied.
    pub fn tier(&self) -> Tier {
        self.medium.clone().unwrap_or_default()
    }
}

/// Blocks left the engine's cache (evicted or freed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    pub block_hashes: Vec<BlockHash>,
    /// See [`BlockStored::medium`].
    pub medium: Option<Tier>,
}

impl BlockRemoved {
    pub const TAG: &'static str = "BlockRemoved";

    /// The block hashes reduced to engine hashes.
    pub fn engine_hashes(&self) -> impl ExactSizeIterator<Item = EngineHash> + '_ {
        self.block_hashes.iter().map(BlockHash::engine)
    }
}

/// The engine dropped its whole prefix cache (e.g. a reset); `medium` is set
/// only by engines that clear one tier.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AllBlocksCleared {
    pub medium: Option<Tier>,
}

impl AllBlocksCleared {
    pub const TAG: &'static str = "AllBlocksCleared";
}

/// A block hash in the form vLLM sent it.
///
/// Kept exactly (not only as an [`EngineHash`]) so the encoder can reproduce
/// vLLM's bytes: a 32-byte digest cannot be rebuilt from its last 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockHash {
    /// A non-negative integer (`*_64bit` schemes, `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`);
    /// may exceed `i64::MAX`.
    U64(u64),
    /// A negative integer (older vLLM hashing with Python's `hash`). The
    /// decoder produces it only for values below zero; non-negative ones are
    /// [`BlockHash::U64`].
    I64(i64),
    /// A 32-byte digest (`sha256`, `sha256_cbor`).
    Bytes32([u8; 32]),
    /// A 16-byte digest (xxh3-128).
    Bytes16([u8; 16]),
}

impl BlockHash {
    /// The engine hash: integers as their (two's complement) `u64`, digests
    /// by their last 8 bytes big-endian ([`EngineHash::from_bytes`]).
    pub fn engine(&self) -> EngineHash {
        match self {
            BlockHash::U64(v) => EngineHash(*v),
            BlockHash::I64(v) => EngineHash(*v as u64),
            BlockHash::Bytes32(b) => EngineHash::from_bytes(b),
            BlockHash::Bytes16(b) => EngineHash::from_bytes(b),
        }
    }
}

impl From<EngineHash> for BlockHash {
    fn from(h: EngineHash) -> Self {
        BlockHash::U64(h.0)
    }
}

/// One value of a block's `extra_keys` tuple (a LoRA name, a multimodal hash,
/// a cache salt, ...): the msgpack values vLLM can put there.
#[derive(Debug, Clone, PartialEq)]
pub enum ExtraValue {
    Nil,
    Bool(bool),
    /// A non-negative integer.
    UInt(u64),
    /// A negative integer (non-negative ones decode as [`ExtraValue::UInt`]).
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    /// A nested tuple/list (bounded by [`MAX_DEPTH`]).
    Array(Vec<ExtraValue>),
}

impl ExtraValue {
    /// The string, when this value is one (e.g. the LoRA name).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            ExtraValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Something the decoder met, did not understand, and skipped: newer vLLM
/// versions add event types and fields. Count these by [`Skip::as_label`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// An event whose type tag is not one of the three known ones.
    UnknownEventType { index: usize, name: String },
    /// A map-encoded event carried a key this decoder does not know.
    UnknownField {
        index: usize,
        event: &'static str,
        field: String,
    },
    /// An array-encoded event had `count` elements beyond the known positions.
    ExtraArrayFields {
        index: usize,
        event: &'static str,
        count: usize,
    },
    /// The batch array had `count` elements after `data_parallel_rank`.
    ExtraBatchFields { count: usize },
}

impl Skip {
    /// A fixed, low-cardinality label for metrics.
    pub fn as_label(&self) -> &'static str {
        match self {
            Skip::UnknownEventType { .. } => "unknown_event_type",
            Skip::UnknownField { .. } => "unknown_field",
            Skip::ExtraArrayFields { .. } => "extra_array_fields",
            Skip::ExtraBatchFields { .. } => "extra_batch_fields",
        }
    }
}
