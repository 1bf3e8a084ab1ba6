//! Payload bytes -> [`DecodedBatch`]: the ingester's hot path.
//!
//! One pass over the borrowed payload with the bounded cursor of `wire.rs`;
//! the only allocations are the output vectors (capacities capped by the bytes
//! left) and the strings the output owns. This file walks the batch and the
//! events; both event encodings then fill the same per-type field sets
//! (`fields.rs`): an array-like event maps its positions to field names, a
//! map event supplies the names itself.

use super::fields::{ClearedFields, Fields, RemovedFields, StoredFields};
use super::wire::{Family, Reader, WireError};
use super::{AllBlocksCleared, BlockRemoved, BlockStored, DecodedBatch, KvEvent, Skip};

/// Why a payload could not be decoded. Every variant says where: the batch
/// element, or the event index, its type and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("batch {field}: {source}")]
    Batch {
        field: &'static str,
        #[source]
        source: WireError,
    },
    #[error("batch array has {len} elements; expected at least 2 (ts, events)")]
    BatchTooShort { len: usize },
    #[error("event {index}: {source}")]
    Event {
        index: usize,
        #[source]
        source: WireError,
    },
    #[error("event {index} is an empty array (no event type)")]
    EmptyEvent { index: usize },
    #[error("event {index} ({event}) field `{field}`: {source}")]
    Field {
        index: usize,
        event: &'static str,
        field: &'static str,
        #[source]
        source: WireError,
    },
    #[error("event {index} ({event}) lacks required field `{field}`")]
    MissingField {
        index: usize,
        event: &'static str,
        field: &'static str,
    },
    #[error("event {index} ({event}) has field `{field}` more than once")]
    DuplicateField {
        index: usize,
        event: &'static str,
        field: &'static str,
    },
    #[error("{len} trailing bytes after the batch, at byte {offset}")]
    TrailingBytes { offset: usize, len: usize },
}

/// Decodes one `EventBatch` payload (the third ZMQ frame).
///
/// Unknown event types and fields are skipped and listed in
/// [`DecodedBatch::skipped`]; anything malformed (truncated, wrong types,
/// trailing bytes, nesting beyond [`MAX_DEPTH`](super::MAX_DEPTH)) is an error for the whole
/// batch, since a half-applied batch would corrupt the pod's index.
pub fn decode_batch(payload: &[u8]) -> Result<DecodedBatch, DecodeError> {
    let mut r = Reader::new(payload);
    let batch = |field| move |source| DecodeError::Batch { field, source };
    let len = r.array_len().map_err(batch("array"))?;
    if len < 2 {
        return Err(DecodeError::BatchTooShort { len });
    }
    let ts = r.number().map_err(batch("ts"))?;
    let n_events = r.array_len().map_err(batch("events"))?;
    let mut events = Vec::with_capacity(r.capacity(n_events));
    let mut skipped = Vec::new();
    for index in 0..n_events {
        if let Some(event) = decode_event(&mut r, index, &mut skipped)? {
            events.push(event);
        }
    }
    let mut data_parallel_rank = None;
    if len >= 3 && !r.nil().map_err(batch("data_parallel_rank"))? {
        data_parallel_rank = Some(r.u32().map_err(batch("data_parallel_rank"))?);
    }
    if len > 3 {
        for _ in 3..len {
            r.skip(2).map_err(batch("extra element"))?;
        }
        skipped.push(Skip::ExtraBatchFields { count: len - 3 });
    }
    if !r.is_at_end() {
        return Err(DecodeError::TrailingBytes {
            offset: r.pos(),
            len: r.remaining(),
        });
    }
    Ok(DecodedBatch {
        ts,
        data_parallel_rank,
        events,
        skipped,
    })
}

/// Nesting level of an event (batch array 1, events array 2).
const EVENT_DEPTH: usize = 3;
/// Nesting level of an event's field values.
pub(super) const FIELD_DEPTH: usize = EVENT_DEPTH + 1;
/// Name used in errors before the event type is known.
const UNTYPED: &str = "event";

/// Error context: which event, of which type.
#[derive(Clone, Copy)]
pub(super) struct Cx {
    pub(super) index: usize,
    pub(super) event: &'static str,
}

impl Cx {
    pub(super) fn field(self, field: &'static str) -> impl FnOnce(WireError) -> DecodeError {
        move |source| DecodeError::Field {
            index: self.index,
            event: self.event,
            field,
            source,
        }
    }
    pub(super) fn missing(self, field: &'static str) -> DecodeError {
        DecodeError::MissingField {
            index: self.index,
            event: self.event,
            field,
        }
    }
}

fn decode_event(
    r: &mut Reader<'_>,
    index: usize,
    skipped: &mut Vec<Skip>,
) -> Result<Option<KvEvent>, DecodeError> {
    let ev = |source| DecodeError::Event { index, source };
    let start = r.pos();
    match r.peek_family().map_err(ev)? {
        Family::Array => {
            let len = r.array_len().map_err(ev)?;
            if len == 0 {
                return Err(DecodeError::EmptyEvent { index });
            }
            let cx = Cx {
                index,
                event: UNTYPED,
            };
            let tag = r.str().map_err(cx.field("type"))?;
            match tag {
                BlockStored::TAG => array_event::<StoredFields>(r, index, len - 1, skipped),
                BlockRemoved::TAG => array_event::<RemovedFields>(r, index, len - 1, skipped),
                AllBlocksCleared::TAG => array_event::<ClearedFields>(r, index, len - 1, skipped),
                other => {
                    let name = other.to_owned();
                    for _ in 1..len {
                        r.skip(FIELD_DEPTH).map_err(ev)?;
                    }
                    skipped.push(Skip::UnknownEventType { index, name });
                    Ok(None)
                }
            }
        }
        Family::Map => {
            let len = r.map_len().map_err(ev)?;
            let fields_start = r.pos();
            let tag = find_type(r, index, len)?;
            r.set_pos(fields_start);
            match tag {
                BlockStored::TAG => map_event::<StoredFields>(r, index, len, skipped),
                BlockRemoved::TAG => map_event::<RemovedFields>(r, index, len, skipped),
                AllBlocksCleared::TAG => map_event::<ClearedFields>(r, index, len, skipped),
                other => {
                    let name = other.to_owned();
                    r.set_pos(start);
                    r.skip(EVENT_DEPTH).map_err(ev)?;
                    skipped.push(Skip::UnknownEventType { index, name });
                    Ok(None)
                }
            }
        }
        _ => {
            let m = r.peek().map_err(ev)?;
            Err(ev(r.unexpected("array or map event", m, start)))
        }
    }
}

/// Finds a map event's `"type"` value. msgspec writes it first, so this
/// normally reads one entry; the caller rewinds afterwards.
fn find_type<'a>(r: &mut Reader<'a>, index: usize, len: usize) -> Result<&'a str, DecodeError> {
    let cx = Cx {
        index,
        event: UNTYPED,
    };
    for _ in 0..len {
        let key = r.str().map_err(cx.field("key"))?;
        if key == "type" {
            return r.str().map_err(cx.field("type"));
        }
        r.skip(FIELD_DEPTH)
            .map_err(|source| DecodeError::Event { index, source })?;
    }
    Err(cx.missing("type"))
}

fn array_event<F: Fields>(
    r: &mut Reader<'_>,
    index: usize,
    n_fields: usize,
    skipped: &mut Vec<Skip>,
) -> Result<Option<KvEvent>, DecodeError> {
    let cx = Cx {
        index,
        event: F::TAG,
    };
    let mut fields = F::default();
    for &name in F::POSITIONS.iter().take(n_fields) {
        fields.set(name, r, cx)?;
    }
    let extra = n_fields.saturating_sub(F::POSITIONS.len());
    if extra > 0 {
        for _ in 0..extra {
            r.skip(FIELD_DEPTH)
                .map_err(|source| DecodeError::Event { index, source })?;
        }
        skipped.push(Skip::ExtraArrayFields {
            index,
            event: F::TAG,
            count: extra,
        });
    }
    fields.finish(cx).map(Some)
}

fn map_event<F: Fields>(
    r: &mut Reader<'_>,
    index: usize,
    len: usize,
    skipped: &mut Vec<Skip>,
) -> Result<Option<KvEvent>, DecodeError> {
    let cx = Cx {
        index,
        event: F::TAG,
    };
    let mut fields = F::default();
    let mut seen_type = false;
    for _ in 0..len {
        let key = r.str().map_err(cx.field("key"))?;
        if key == "type" {
            if seen_type {
                return Err(DecodeError::DuplicateField {
                    index,
                    event: F::TAG,
                    field: "type",
                });
            }
            seen_type = true;
            r.skip(FIELD_DEPTH).map_err(cx.field("type"))?;
        } else if !fields.set(key, r, cx)? {
            r.skip(FIELD_DEPTH)
                .map_err(|source| DecodeError::Event { index, source })?;
            skipped.push(Skip::UnknownField {
                index,
                event: F::TAG,
                field: key.to_owned(),
            });
        }
    }
    fields.finish(cx).map(Some)
}
