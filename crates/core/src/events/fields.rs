//! The fields of each event type and the readers of their values, shared by
//! both encodings: an array-like event feeds its positions to [`Fields::set`]
//! under the names in [`Fields::POSITIONS`], a map event feeds its keys.

use super::decode::{Cx, DecodeError, FIELD_DEPTH};
use super::wire::{Family, Int, Reader, WireError};
use super::{
    AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, ExtraValue, KvEvent, MAX_DEPTH,
};
use crate::ids::Tier;

/// The fields of one event type, filled by name from either encoding.
pub(super) trait Fields: Default {
    const TAG: &'static str;
    /// Field names by position after the tag, in the array-like encoding.
    const POSITIONS: &'static [&'static str];
    /// Sets `key` from the next value; `Ok(false)` if the key is unknown
    /// (nothing consumed).
    fn set(&mut self, key: &str, r: &mut Reader<'_>, cx: Cx) -> Result<bool, DecodeError>;
    fn finish(self, cx: Cx) -> Result<KvEvent, DecodeError>;
}

/// Stores a field read by `read`, refusing a second occurrence.
fn put<T>(
    slot: &mut Option<T>,
    field: &'static str,
    cx: Cx,
    read: impl FnOnce() -> Result<T, WireError>,
) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateField {
            index: cx.index,
            event: cx.event,
            field,
        });
    }
    *slot = Some(read().map_err(cx.field(field))?);
    Ok(())
}

/// `Option<Option<T>>` below: outer = field seen, inner = value or nil.
#[derive(Default)]
pub(super) struct StoredFields {
    block_hashes: Option<Vec<BlockHash>>,
    parent_block_hash: Option<Option<BlockHash>>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u32>,
    lora_id: Option<Option<i64>>,
    medium: Option<Option<Tier>>,
    lora_name: Option<Option<String>>,
    extra_keys: Option<Option<Vec<Option<Vec<ExtraValue>>>>>,
}

impl Fields for StoredFields {
    const TAG: &'static str = BlockStored::TAG;
    const POSITIONS: &'static [&'static str] = &[
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
    ];

    fn set(&mut self, key: &str, r: &mut Reader<'_>, cx: Cx) -> Result<bool, DecodeError> {
        match key {
            "block_hashes" => put(&mut self.block_hashes, "block_hashes", cx, || hashes(r))?,
            "parent_block_hash" => {
                put(&mut self.parent_block_hash, "parent_block_hash", cx, || {
                    nullable(r, hash)
                })?
            }
            "token_ids" => put(&mut self.token_ids, "token_ids", cx, || tokens(r))?,
            "block_size" => put(&mut self.block_size, "block_size", cx, || r.u32())?,
            "lora_id" => put(&mut self.lora_id, "lora_id", cx, || {
                nullable(r, Reader::i64)
            })?,
            "medium" => put(&mut self.medium, "medium", cx, || nullable(r, tier))?,
            "lora_name" => put(&mut self.lora_name, "lora_name", cx, || {
                nullable(r, |r| r.str().map(str::to_owned))
            })?,
            "extra_keys" => put(&mut self.extra_keys, "extra_keys", cx, || {
                nullable(r, extra_keys)
            })?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finish(self, cx: Cx) -> Result<KvEvent, DecodeError> {
        Ok(KvEvent::BlockStored(BlockStored {
            block_hashes: self
                .block_hashes
                .ok_or_else(|| cx.missing("block_hashes"))?,
            parent_block_hash: self.parent_block_hash.flatten(),
            token_ids: self.token_ids.ok_or_else(|| cx.missing("token_ids"))?,
            block_size: self.block_size.ok_or_else(|| cx.missing("block_size"))?,
            lora_id: self.lora_id.flatten(),
            medium: self.medium.flatten(),
            lora_name: self.lora_name.flatten(),
            extra_keys: self.extra_keys.flatten(),
        }))
    }
}

#[derive(Default)]
pub(super) struct RemovedFields {
    block_hashes: Option<Vec<BlockHash>>,
    medium: Option<Option<Tier>>,
}

impl Fields for RemovedFields {
    const TAG: &'static str = BlockRemoved::TAG;
    const POSITIONS: &'static [&'static str] = &["block_hashes", "medium"];

    fn set(&mut self, key: &str, r: &mut Reader<'_>, cx: Cx) -> Result<bool, DecodeError> {
        match key {
            "block_hashes" => put(&mut self.block_hashes, "block_hashes", cx, || hashes(r))?,
            "medium" => put(&mut self.medium, "medium", cx, || nullable(r, tier))?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finish(self, cx: Cx) -> Result<KvEvent, DecodeError> {
        Ok(KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: self
                .block_hashes
                .ok_or_else(|| cx.missing("block_hashes"))?,
            medium: self.medium.flatten(),
        }))
    }
}

#[derive(Default)]
pub(super) struct ClearedFields {
    medium: Option<Option<Tier>>,
}

impl Fields for ClearedFields {
    const TAG: &'static str = AllBlocksCleared::TAG;
    const POSITIONS: &'static [&'static str] = &["medium"];

    fn set(&mut self, key: &str, r: &mut Reader<'_>, cx: Cx) -> Result<bool, DecodeError> {
        match key {
            "medium" => put(&mut self.medium, "medium", cx, || nullable(r, tier))?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn finish(self, _cx: Cx) -> Result<KvEvent, DecodeError> {
        Ok(KvEvent::AllBlocksCleared(AllBlocksCleared {
            medium: self.medium.flatten(),
        }))
    }
}

/// `None` for nil, else `read`.
fn nullable<'a, T>(
    r: &mut Reader<'a>,
    read: impl FnOnce(&mut Reader<'a>) -> Result<T, WireError>,
) -> Result<Option<T>, WireError> {
    if r.nil()? {
        Ok(None)
    } else {
        read(r).map(Some)
    }
}

fn hash(r: &mut Reader<'_>) -> Result<BlockHash, WireError> {
    let start = r.pos();
    let m = r.peek()?;
    match Family::of(m) {
        Family::Int => Ok(match r.int()? {
            Int::U(v) => BlockHash::U64(v),
            Int::I(v) => BlockHash::I64(v),
        }),
        Family::Bin => {
            let b = r.bin()?;
            if let Ok(d) = <[u8; 32]>::try_from(b) {
                Ok(BlockHash::Bytes32(d))
            } else if let Ok(d) = <[u8; 16]>::try_from(b) {
                Ok(BlockHash::Bytes16(d))
            } else {
                Err(WireError::HashLength {
                    len: b.len(),
                    offset: start,
                })
            }
        }
        _ => Err(r.unexpected("int or bytes hash", m, start)),
    }
}

fn hashes(r: &mut Reader<'_>) -> Result<Vec<BlockHash>, WireError> {
    let n = r.array_len()?;
    let mut out = Vec::with_capacity(r.capacity(n));
    for _ in 0..n {
        out.push(hash(r)?);
    }
    Ok(out)
}

fn tokens(r: &mut Reader<'_>) -> Result<Vec<u32>, WireError> {
    let n = r.array_len()?;
    let mut out = Vec::with_capacity(r.capacity(n));
    for _ in 0..n {
        out.push(r.u32()?);
    }
    Ok(out)
}

fn tier(r: &mut Reader<'_>) -> Result<Tier, WireError> {
    r.str().map(Tier::new)
}

/// `extra_keys`: one entry per block, each nil or a tuple of values.
fn extra_keys(r: &mut Reader<'_>) -> Result<Vec<Option<Vec<ExtraValue>>>, WireError> {
    let n = r.array_len()?;
    let mut out = Vec::with_capacity(r.capacity(n));
    for _ in 0..n {
        out.push(nullable(r, |r| extra_array(r, FIELD_DEPTH + 1))?);
    }
    Ok(out)
}

/// An array of extra values; the array itself sits at nesting level `depth`.
fn extra_array(r: &mut Reader<'_>, depth: usize) -> Result<Vec<ExtraValue>, WireError> {
    let start = r.pos();
    let n = r.array_len()?;
    if n > 0 && depth >= MAX_DEPTH {
        return Err(WireError::TooDeep { offset: start });
    }
    let mut out = Vec::with_capacity(r.capacity(n));
    for _ in 0..n {
        out.push(extra_value(r, depth + 1)?);
    }
    Ok(out)
}

fn extra_value(r: &mut Reader<'_>, depth: usize) -> Result<ExtraValue, WireError> {
    let start = r.pos();
    let m = r.peek()?;
    Ok(match Family::of(m) {
        Family::Nil => {
            r.nil()?;
            ExtraValue::Nil
        }
        Family::Bool => {
            r.skip(depth)?;
            ExtraValue::Bool(m == 0xc3)
        }
        Family::Int => match r.int()? {
            Int::U(v) => ExtraValue::UInt(v),
            Int::I(v) => ExtraValue::Int(v),
        },
        Family::Float => ExtraValue::Float(r.number()?),
        Family::Str => ExtraValue::Str(r.str()?.to_owned()),
        Family::Bin => ExtraValue::Bytes(r.bin()?.to_vec()),
        Family::Array => ExtraValue::Array(extra_array(r, depth)?),
        Family::Map | Family::Ext | Family::Reserved => {
            return Err(r.unexpected(
                "extra key value (nil, bool, int, float, str, bytes, array)",
                m,
                start,
            ));
        }
    })
}
