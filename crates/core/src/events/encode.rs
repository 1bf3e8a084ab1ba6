//! [`EventBatch`] -> payload bytes, exactly as vLLM's publisher writes them.
//!
//! Used by the load-test simulator (to speak both vLLM encodings) and by the
//! round-trip tests. The output is byte-identical to msgspec's for the
//! payloads in `testdata/vllm`: float64 `ts`, minimal integer,
//! string and container headers, every `BlockStored` map written with a
//! 16-bit map header (msgspec sizes the header for all the fields the class
//! could have), nil fields present as vLLM 0.33 writes them and `extra_keys`
//! only when set. Encoding into a `Vec` cannot fail, so nothing here returns
//! a `Result`.

use super::{
    AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, DecodedBatch, EventBatch, ExtraValue,
    KvEvent,
};
use crate::ids::Tier;

/// Which of vLLM's two event encodings to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Array-like events, `["BlockStored", hashes, parent, ...]` (vLLM <= 0.10).
    Array,
    /// Map events, `{"type": "BlockStored", "block_hashes": ...}` (vLLM >= 0.11).
    #[default]
    Map,
}

/// How to write block hashes (the events keep the form they were built with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashEncoding {
    /// Each hash as stored in the event (what round-trip tests need).
    #[default]
    AsIs,
    /// Integers: digests are reduced to their engine hash (last 8 bytes),
    /// as vLLM does with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`.
    Int,
    /// 32-byte strings: integers and 16-byte digests are left-padded with
    /// zeros, which keeps the engine hash (the last 8 bytes) unchanged.
    Bytes32,
}

/// Encoder settings; `Encoding` converts into these with [`HashEncoding::AsIs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncodeOptions {
    pub encoding: Encoding,
    pub hashes: HashEncoding,
}

impl From<Encoding> for EncodeOptions {
    fn from(encoding: Encoding) -> Self {
        EncodeOptions {
            encoding,
            hashes: HashEncoding::AsIs,
        }
    }
}

/// A borrowed view of a batch, so both an [`EventBatch`] and a
/// [`DecodedBatch`] (or a simulator's slice of events) can be encoded
/// without copying.
#[derive(Debug, Clone, Copy)]
pub struct BatchRef<'a> {
    pub ts: f64,
    pub events: &'a [KvEvent],
    pub data_parallel_rank: Option<u32>,
}

impl<'a> From<&'a EventBatch> for BatchRef<'a> {
    fn from(b: &'a EventBatch) -> Self {
        BatchRef {
            ts: b.ts,
            events: &b.events,
            data_parallel_rank: b.data_parallel_rank,
        }
    }
}

impl<'a> From<&'a DecodedBatch> for BatchRef<'a> {
    fn from(b: &'a DecodedBatch) -> Self {
        BatchRef {
            ts: b.ts,
            events: &b.events,
            data_parallel_rank: b.data_parallel_rank,
        }
    }
}

/// Encodes a batch as vLLM's `EventBatch` payload.
pub fn encode_batch<'a>(
    batch: impl Into<BatchRef<'a>>,
    options: impl Into<EncodeOptions>,
) -> Vec<u8> {
    let mut out = Vec::new();
    encode_batch_into(batch, options, &mut out);
    out
}

/// Like [`encode_batch`], appending to `out` (lets a publisher reuse a buffer).
pub fn encode_batch_into<'a>(
    batch: impl Into<BatchRef<'a>>,
    options: impl Into<EncodeOptions>,
    out: &mut Vec<u8>,
) {
    let batch = batch.into();
    let w = Writer {
        out,
        opts: options.into(),
    };
    w.batch(&batch);
}

struct Writer<'o> {
    out: &'o mut Vec<u8>,
    opts: EncodeOptions,
}

impl Writer<'_> {
    fn batch(mut self, b: &BatchRef<'_>) {
        // msgspec writes every field of the array-like EventBatch, nil included.
        array_len(self.out, 3);
        f64(self.out, b.ts);
        array_len(self.out, b.events.len());
        for e in b.events {
            match e {
                KvEvent::BlockStored(s) => self.stored(s),
                KvEvent::BlockRemoved(rm) => self.removed(rm),
                KvEvent::AllBlocksCleared(c) => self.cleared(c),
            }
        }
        match b.data_parallel_rank {
            Some(rank) => uint(self.out, rank as u64),
            None => nil(self.out),
        }
    }

    fn map(&self) -> bool {
        self.opts.encoding == Encoding::Map
    }

    /// Writes a field name in the map encoding (nothing in the array one).
    fn key(&mut self, name: &str) {
        if self.map() {
            str(self.out, name);
        }
    }

    fn stored(&mut self, s: &BlockStored) {
        if self.map() {
            // msgspec reserves a map16 header for BlockStored (it has more
            // optional fields than a fixmap can count); see the module doc.
            let n = if s.extra_keys.is_some() { 9 } else { 8 };
            self.out.push(0xde);
            self.out.extend_from_slice(&(n as u16).to_be_bytes());
            str(self.out, "type");
        } else {
            array_len(self.out, 6 + array_tail_len(s));
        }
        str(self.out, BlockStored::TAG);
        self.key("block_hashes");
        self.hashes(&s.block_hashes);
        self.key("parent_block_hash");
        match &s.parent_block_hash {
            Some(h) => self.hash(h),
            None => nil(self.out),
        }
        self.key("token_ids");
        array_len(self.out, s.token_ids.len());
        for &t in &s.token_ids {
            uint(self.out, t as u64);
        }
        self.key("block_size");
        uint(self.out, s.block_size as u64);
        self.key("lora_id");
        match s.lora_id {
            Some(id) => sint(self.out, id),
            None => nil(self.out),
        }
        let array_tail = if self.map() { 3 } else { array_tail_len(s) };
        if array_tail >= 1 {
            self.key("medium");
            medium(self.out, s.medium.as_ref());
        }
        if array_tail >= 2 {
            self.key("lora_name");
            match &s.lora_name {
                Some(name) => str(self.out, name),
                None => nil(self.out),
            }
        }
        if let Some(extra) = &s.extra_keys {
            self.key("extra_keys");
            array_len(self.out, extra.len());
            for block in extra {
                match block {
                    Some(values) => extra_array(self.out, values),
                    None => nil(self.out),
                }
            }
        }
    }

    fn removed(&mut self, rm: &BlockRemoved) {
        if self.map() {
            // vLLM 0.33 writes `medium` even when nil.
            map_len(self.out, 3);
            str(self.out, "type");
        } else {
            array_len(self.out, 2 + usize::from(rm.medium.is_some()));
        }
        str(self.out, BlockRemoved::TAG);
        self.key("block_hashes");
        self.hashes(&rm.block_hashes);
        if self.map() || rm.medium.is_some() {
            self.key("medium");
            medium(self.out, rm.medium.as_ref());
        }
    }

    fn cleared(&mut self, c: &AllBlocksCleared) {
        let n = 1 + usize::from(c.medium.is_some());
        if self.map() {
            map_len(self.out, n);
            str(self.out, "type");
        } else {
            array_len(self.out, n);
        }
        str(self.out, AllBlocksCleared::TAG);
        if c.medium.is_some() {
            self.key("medium");
            medium(self.out, c.medium.as_ref());
        }
    }

    fn hashes(&mut self, hashes: &[BlockHash]) {
        array_len(self.out, hashes.len());
        for h in hashes {
            self.hash(h);
        }
    }

    fn hash(&mut self, h: &BlockHash) {
        match (self.opts.hashes, h) {
            (HashEncoding::AsIs, BlockHash::U64(v)) | (HashEncoding::Int, BlockHash::U64(v)) => {
                uint(self.out, *v)
            }
            (HashEncoding::AsIs, BlockHash::I64(v)) | (HashEncoding::Int, BlockHash::I64(v)) => {
                sint(self.out, *v)
            }
            (HashEncoding::AsIs, BlockHash::Bytes32(d))
            | (HashEncoding::Bytes32, BlockHash::Bytes32(d)) => bin(self.out, d),
            (HashEncoding::AsIs, BlockHash::Bytes16(d)) => bin(self.out, d),
            (HashEncoding::Int, digest) => uint(self.out, digest.engine().0),
            (HashEncoding::Bytes32, BlockHash::Bytes16(d)) => {
                let mut padded = [0u8; 32];
                padded[16..].copy_from_slice(d);
                bin(self.out, &padded);
            }
            (HashEncoding::Bytes32, int) => {
                let mut padded = [0u8; 32];
                padded[24..].copy_from_slice(&int.engine().0.to_be_bytes());
                bin(self.out, &padded);
            }
        }
    }
}

/// How many of the optional trailing positions (medium, lora_name,
/// extra_keys) an array-like BlockStored carries: only up to the last one
/// set, so a batch without them has vLLM 0.10.0's six elements.
fn array_tail_len(s: &BlockStored) -> usize {
    if s.extra_keys.is_some() {
        3
    } else if s.lora_name.is_some() {
        2
    } else {
        usize::from(s.medium.is_some())
    }
}

/// vLLM writes media upper-case (`"GPU"`, `"CPU"`); [`Tier`] keeps them
/// lower-case, so the case is restored here without allocating.
fn medium(out: &mut Vec<u8>, tier: Option<&Tier>) {
    match tier {
        Some(t) => {
            let s = t.as_str();
            str_header(out, s.len());
            out.extend(s.bytes().map(|b| b.to_ascii_uppercase()));
        }
        None => nil(out),
    }
}

fn extra_array(out: &mut Vec<u8>, values: &[ExtraValue]) {
    array_len(out, values.len());
    for v in values {
        match v {
            ExtraValue::Nil => nil(out),
            ExtraValue::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
            ExtraValue::UInt(u) => uint(out, *u),
            ExtraValue::Int(i) => sint(out, *i),
            ExtraValue::Float(f) => f64(out, *f),
            ExtraValue::Str(s) => str(out, s),
            ExtraValue::Bytes(b) => bin(out, b),
            ExtraValue::Array(a) => extra_array(out, a),
        }
    }
}

// Minimal msgpack writers, as msgspec chooses markers. Lengths above u32::MAX
// cannot be expressed in msgpack at all; the simulator never comes close.

fn nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

fn f64(out: &mut Vec<u8>, v: f64) {
    out.push(0xcb);
    out.extend_from_slice(&v.to_be_bytes());
}

fn uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= u8::MAX as u64 {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= u16::MAX as u64 {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u32::MAX as u64 {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn sint(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        uint(out, v as u64);
    } else if v >= -32 {
        out.push(v as i8 as u8);
    } else if v >= i8::MIN as i64 {
        out.extend_from_slice(&[0xd0, v as i8 as u8]);
    } else if v >= i16::MIN as i64 {
        out.push(0xd1);
        out.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= i32::MIN as i64 {
        out.push(0xd2);
        out.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Writes a header of the fix/8/16/32 family: `fix` (with its max), then the
/// three sized markers. `None` for `m8` means the family has no 8-bit form.
fn header(out: &mut Vec<u8>, n: usize, fix: Option<(u8, usize)>, m8: Option<u8>, m16: u8, m32: u8) {
    match fix {
        Some((base, max)) if n <= max => out.push(base | n as u8),
        _ => match m8 {
            Some(m) if n <= u8::MAX as usize => out.extend_from_slice(&[m, n as u8]),
            _ if n <= u16::MAX as usize => {
                out.push(m16);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                out.push(m32);
                out.extend_from_slice(&(n as u32).to_be_bytes());
            }
        },
    }
}

fn str_header(out: &mut Vec<u8>, n: usize) {
    header(out, n, Some((0xa0, 31)), Some(0xd9), 0xda, 0xdb);
}

fn str(out: &mut Vec<u8>, s: &str) {
    str_header(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn bin(out: &mut Vec<u8>, b: &[u8]) {
    header(out, b.len(), None, Some(0xc4), 0xc5, 0xc6);
    out.extend_from_slice(b);
}

fn array_len(out: &mut Vec<u8>, n: usize) {
    header(out, n, Some((0x90, 15)), None, 0xdc, 0xdd);
}

fn map_len(out: &mut Vec<u8>, n: usize) {
    header(out, n, Some((0x80, 15)), None, 0xde, 0xdf);
}
