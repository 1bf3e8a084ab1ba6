//! Resolving removes by engine hash to block keys, before a segment's
//! scripts run (the `engine:` mapping lives in another slot than its block,
//! so a script cannot follow it).
//!
//! Order of precedence: mappings set by earlier Stores of the same segment,
//! then `engine:` keys as they are at segment start (one GET wave, only when
//! something is left to resolve), then the engine hash itself as the key.
//! The memory backend resolves op by op instead; the two differ only when a
//! block loses its mapping inside the segment and its engine hash is another
//! block's key, which 64-bit hashes make a non-event.

use super::apply::ApplyStats;
use super::cluster::Call;
use super::{RedisIndex, layout, slots};
use crate::Error;
use fnv::FnvHashMap;
use kvroute_core::ids::{BlockKey, EngineHash, ModelName};
use kvroute_core::index::{BlockRef, IndexOp};
use redis::Value;

/// Block keys of each Remove op (empty for other ops): by key as given; by
/// engine hash through the mappings of earlier Stores in this segment, then
/// through `engine:` keys read in one wave; no mapping: the hash is the key.
pub(super) async fn resolve_removes(
    index: &RedisIndex,
    ops: &[IndexOp],
    stats: &mut ApplyStats,
) -> Result<Vec<Vec<BlockKey>>, Error> {
    let mut local: FnvHashMap<(&ModelName, EngineHash), BlockKey> = FnvHashMap::default();
    let mut resolved: Vec<Vec<Option<BlockKey>>> = Vec::with_capacity(ops.len());
    let mut unknown: FnvHashMap<String, Option<BlockKey>> = FnvHashMap::default();
    for op in ops {
        match op {
            IndexOp::Store { model, blocks, .. } => {
                for b in blocks {
                    if let Some(e) = b.engine.filter(|e| e.0 != b.key.0) {
                        local.insert((model, e), b.key);
                    }
                }
                resolved.push(Vec::new());
            }
            IndexOp::Remove { model, blocks, .. } => {
                let keys = blocks
                    .iter()
                    .map(|b| match *b {
                        BlockRef::Key(k) => Some(k),
                        BlockRef::Engine(e) => {
                            let known = local.get(&(model, e)).copied();
                            if known.is_none() {
                                unknown.entry(layout::engine_key(model, e)).or_insert(None);
                            }
                            known
                        }
                    })
                    .collect();
                resolved.push(keys);
            }
            IndexOp::ClearPod { .. } => resolved.push(Vec::new()),
        }
    }
    if !unknown.is_empty() {
        let names: Vec<String> = unknown.keys().cloned().collect();
        let calls = names
            .iter()
            .map(|name| Call {
                slot: slots::key_slot(name.as_bytes()),
                cmd: redis::cmd("GET").arg(name).clone(),
            })
            .collect::<Vec<_>>();
        let n = calls.len();
        let wave = index.conns.run(calls).await?;
        stats.add_wave(n, 0, &wave);
        for (name, reply) in names.into_iter().zip(wave.replies) {
            let key = parse_mapping(&name, &reply);
            unknown.insert(name, key);
        }
    }
    let mut out = Vec::with_capacity(ops.len());
    for (op, keys) in ops.iter().zip(resolved) {
        let IndexOp::Remove { model, blocks, .. } = op else {
            out.push(Vec::new());
            continue;
        };
        let keys = blocks
            .iter()
            .zip(keys)
            .map(|(b, k)| match (b, k) {
                (_, Some(k)) => k,
                (BlockRef::Key(k), None) => *k,
                (BlockRef::Engine(e), None) => unknown
                    .get(&layout::engine_key(model, *e))
                    .copied()
                    .flatten()
                    .unwrap_or(e.as_key()),
            })
            .collect();
        out.push(keys);
    }
    Ok(out)
}

/// The block key an `engine:` key maps to; `None` when absent or unreadable.
fn parse_mapping(name: &str, reply: &Value) -> Option<BlockKey> {
    let Value::BulkString(bytes) = reply else {
        return None;
    };
    let parsed = std::str::from_utf8(bytes)
        .ok()
        .and_then(layout::parse_block_key);
    let expected_model = name
        .strip_prefix("engine:")
        .and_then(|s| s.rsplit_once('@'))
        .map(|(m, _)| m);
    match parsed {
        Some((model, key)) if Some(model) == expected_model => Some(key),
        _ => {
            tracing::warn!(engine_key = name, value = %String::from_utf8_lossy(bytes), "malformed engine mapping ignored");
            None
        }
    }
}
