//! ClearPod without SCAN: the pod's registry of slots, then its entries in
//! each slot, then one clear_pod.lua call per slot.
//!
//! Four waves: SMEMBERS `kvroute:pod:<pod>:slots`; HKEYS
//! `kvroute:{tag}:pod:<pod>` per tag; the scripts (every block declared in
//! KEYS); DEL of the `engine:` keys of blocks that lost their last holder.
//! The registry is left in place (it only grows): deleting it could race with
//! a concurrent store registering a slot, and a stale tag costs one empty
//! HKEYS at the next clear.

use super::apply::{ApplyStats, parse_names};
use super::cluster::Call;
use super::scripts::ScriptKind;
use super::{RedisIndex, layout, slots};
use crate::Error;
use kvroute_core::ids::PodId;
use redis::Value;
use std::sync::atomic::Ordering::Relaxed;

/// Entries per clear_pod.lua call: bounds the time one script blocks Redis
/// when a pod held thousands of blocks in one slot.
const ENTRIES_PER_CALL: usize = 256;

pub(super) async fn clear_pod(
    index: &RedisIndex,
    pod: &PodId,
    stats: &mut ApplyStats,
) -> Result<(), Error> {
    let tags = registered_tags(index, pod, Some(stats)).await?;
    if tags.is_empty() {
        return Ok(());
    }

    let reads: Vec<Call> = tags
        .iter()
        .map(|tag| Call {
            slot: slots::key_slot(tag.as_bytes()),
            cmd: redis::cmd("HKEYS")
                .arg(layout::pod_slot_key(tag, pod))
                .clone(),
        })
        .collect();
    let n = reads.len();
    let wave = index.conns.run(reads).await?;
    stats.add_wave(n, 0, &wave);

    let mut calls = Vec::new();
    for (tag, reply) in tags.iter().zip(wave.replies) {
        let Value::Array(items) = reply else {
            return Err(Error::Reply(format!(
                "HKEYS of tag {tag} returned {reply:?}"
            )));
        };
        let members: Vec<String> = items
            .into_iter()
            .filter_map(|v| match v {
                Value::BulkString(b) => String::from_utf8(b).ok(),
                _ => None,
            })
            .collect();
        let mut entries: Vec<(&str, &str)> = Vec::with_capacity(members.len());
        for m in &members {
            match layout::parse_member(m) {
                Some(entry) => entries.push(entry),
                None => {
                    index.counters.malformed_entries.fetch_add(1, Relaxed);
                    tracing::warn!(pod = %pod, tag = %tag, entry = %m, "malformed pod entry skipped");
                }
            }
        }
        let slot = slots::key_slot(tag.as_bytes());
        for chunk in entries.chunks(ENTRIES_PER_CALL) {
            let mut keys = Vec::with_capacity(chunk.len() + 2);
            keys.push(layout::pod_slot_key(tag, pod));
            keys.push(layout::engine_rev_key(tag));
            let mut args = Vec::with_capacity(chunk.len() + 1);
            args.push(pod.as_str());
            for (tier, block) in chunk {
                keys.push((*block).to_owned());
                args.push(*tier);
            }
            calls.push(Call {
                slot,
                cmd: ScriptKind::ClearPod.evalsha(&keys, &args),
            });
        }
    }
    if calls.is_empty() {
        return Ok(());
    }
    let n = calls.len();
    let wave = index.conns.run(calls).await?;
    stats.add_wave(n, n, &wave);

    let mut deletes = Vec::new();
    for reply in &wave.replies {
        for name in parse_names(reply)? {
            deletes.push(Call {
                slot: slots::key_slot(name.as_bytes()),
                cmd: redis::cmd("DEL").arg(&name).clone(),
            });
        }
    }
    if !deletes.is_empty() {
        let n = deletes.len();
        let wave = index.conns.run(deletes).await?;
        stats.add_wave(n, 0, &wave);
    }
    Ok(())
}

/// The slot tags `pod`'s registry (`kvroute:pod:<pod>:slots`) names: one
/// SMEMBERS, counted in `stats` when given.
async fn registered_tags(
    index: &RedisIndex,
    pod: &PodId,
    stats: Option<&mut ApplyStats>,
) -> Result<Vec<String>, Error> {
    let registry = layout::pod_slots_key(pod);
    let wave = index
        .conns
        .run(vec![Call {
            slot: slots::key_slot(registry.as_bytes()),
            cmd: redis::cmd("SMEMBERS").arg(&registry).clone(),
        }])
        .await?;
    if let Some(stats) = stats {
        stats.add_wave(1, 0, &wave);
    }
    match wave.replies.into_iter().next() {
        Some(Value::Array(items) | Value::Set(items)) => Ok(items
            .into_iter()
            .filter_map(|v| match v {
                Value::BulkString(b) => String::from_utf8(b).ok(),
                _ => None,
            })
            .collect()),
        other => Err(Error::Reply(format!(
            "SMEMBERS {registry} returned {other:?}"
        ))),
    }
}

impl RedisIndex {
    /// The entries (`<tier>|<model>@<key>`) `pod` holds, over every slot its
    /// registry names: what a ClearPod of it would remove now. Two waves
    /// (SMEMBERS, then one HLEN per slot). The operator's purge reports it,
    /// and tells a typo (no entries, not registered) from a pod.
    pub async fn pod_entries(&self, pod: &PodId) -> Result<u64, Error> {
        let tags = registered_tags(self, pod, None).await?;
        if tags.is_empty() {
            return Ok(0);
        }
        let calls: Vec<Call> = tags
            .iter()
            .map(|tag| Call {
                slot: slots::key_slot(tag.as_bytes()),
                cmd: redis::cmd("HLEN")
                    .arg(layout::pod_slot_key(tag, pod))
                    .clone(),
            })
            .collect();
        let wave = self.conns.run(calls).await?;
        let mut total = 0u64;
        for reply in wave.replies {
            match reply {
                Value::Int(n) => total += n.max(0) as u64,
                other => return Err(Error::Reply(format!("HLEN returned {other:?}"))),
            }
        }
        Ok(total)
    }

    /// Every pod id in the registry `kvroute:pods` (every pod that ever
    /// stored a block, by any ingester, in any process lifetime), sorted.
    /// An operator's purge of an endpoint reads it to find data-parallel
    /// ranks (`ip:port#dpN`) that the purging process never heard.
    pub async fn known_pods(&self) -> Result<Vec<PodId>, Error> {
        let wave = self
            .conns
            .run(vec![Call {
                slot: slots::key_slot(layout::PODS_KEY.as_bytes()),
                cmd: redis::cmd("SMEMBERS").arg(layout::PODS_KEY).clone(),
            }])
            .await?;
        let mut pods: Vec<PodId> = match wave.replies.into_iter().next() {
            Some(Value::Array(items)) => items
                .into_iter()
                .filter_map(|v| match v {
                    Value::BulkString(b) => String::from_utf8(b).ok().map(PodId::new),
                    _ => None,
                })
                .collect(),
            // RESP3 servers answer SMEMBERS with a set.
            Some(Value::Set(items)) => items
                .into_iter()
                .filter_map(|v| match v {
                    Value::BulkString(b) => String::from_utf8(b).ok().map(PodId::new),
                    _ => None,
                })
                .collect(),
            other => {
                return Err(Error::Reply(format!(
                    "SMEMBERS {} returned {other:?}",
                    layout::PODS_KEY
                )));
            }
        };
        pods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(pods)
    }
}
