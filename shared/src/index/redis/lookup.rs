//! Read path: a prompt's block keys -> each candidate's consecutive prefix.
//!
//! One wave of HKEYS, one per block (one pipeline on a single node, one per
//! master concurrently on a cluster), replies back in prompt order; then the
//! shared [`PrefixWalk`] stops at the first block no live candidate holds, so
//! the result agrees with every other backend by construction. Every key is
//! read even when the walk stops early: one round trip beats stopping
//! server-side for 64-block prompts (a faster lookup is a later issue).

use super::cluster::Call;
use super::{RedisIndex, layout, slots};
use crate::ids::{BlockKey, ModelName, PodId, Tier};
use crate::index::{IndexError, Lookup, ops::PrefixWalk};
use fnv::FnvHashMap;
use redis::Value;
use std::sync::atomic::Ordering::Relaxed;

pub(super) async fn lookup(
    index: &RedisIndex,
    model: &ModelName,
    keys: &[BlockKey],
    candidates: Option<&[PodId]>,
) -> Result<Lookup, IndexError> {
    let mut walk = PrefixWalk::new(candidates);
    if keys.is_empty() {
        return Ok(walk.finish());
    }
    let calls: Vec<Call> = keys
        .iter()
        .map(|&key| {
            let name = layout::block_key(model, key);
            Call {
                slot: slots::key_slot(name.as_bytes()),
                cmd: redis::cmd("HKEYS").arg(name).clone(),
            }
        })
        .collect();
    let wave = index.conns.run(calls).await?;

    // Fields repeat from block to block (the same pods hold a prefix), so
    // each distinct field is parsed and allocated once per lookup.
    let mut seen: FnvHashMap<Vec<u8>, Option<(PodId, Tier)>> = FnvHashMap::default();
    let mut holders: Vec<(PodId, Tier)> = Vec::new();
    let mut malformed = 0u64;
    for reply in wave.replies {
        holders.clear();
        let fields = match reply {
            Value::Array(fields) => fields,
            Value::Nil => Vec::new(),
            other => return Err(IndexError::Reply(format!("HKEYS returned {other:?}"))),
        };
        for field in fields {
            let Value::BulkString(bytes) = field else {
                malformed += 1;
                continue;
            };
            let parsed = match seen.get(bytes.as_slice()) {
                Some(parsed) => parsed.clone(),
                None => {
                    let parsed = layout::parse_field(&bytes)
                        .map(|(pod, tier)| (PodId::new(pod), Tier::new(tier)));
                    seen.insert(bytes, parsed.clone());
                    parsed
                }
            };
            match parsed {
                Some(holder) => holders.push(holder),
                None => malformed += 1,
            }
        }
        if !walk.push(holders.iter().map(|(p, t)| (p, t))) {
            break;
        }
    }
    if malformed > 0 {
        index
            .counters
            .malformed_fields
            .fetch_add(malformed, Relaxed);
        tracing::debug!(model = %model, malformed, "malformed holder fields skipped");
    }
    index.counters.lookups.fetch_add(1, Relaxed);
    Ok(walk.finish())
}
