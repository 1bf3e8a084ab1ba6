//! Write path: a batch of [`IndexOp`]s -> per-slot script calls, pipelined.
//!
//! A batch is cut at each ClearPod into segments that run one after the
//! other (ops before, the clear, ops after), so ops apply in order. A
//! Store/Remove segment costs one wave (one round trip on a single node; one
//! pipeline per master, concurrently, on a cluster), plus:
//! - one wave before it when a Remove names blocks by engine hash that no
//!   earlier Store of the segment mapped (GET `engine:` keys);
//! - one wave after it when `engine:` keys must be deleted (a block lost its
//!   last holder) or a slot must be registered again (the pod's per-slot entry
//!   was created although this process believed the slot registered).
//!
//! Each op becomes one script call per slot its blocks fall in on Redis
//! Cluster (a script may only touch one slot there), in op order, so per-key
//! order is kept. On a single node the same per-slot groups are packed into
//! one call per op (at most [`PACKED_BLOCKS`] blocks each): the scripts take
//! any number of groups, so what is written is identical, and one EVALSHA
//! per op instead of one per block roughly halves Redis's work per block. The `engine:` mapping lives in another slot than
//! its block: Stores SET it in the first wave; the scripts report which
//! mappings they released, and the follow-up wave brings every touched
//! mapping to its final state (the last word in op order wins).
//!
//! Known limit: the `engine:` key is not atomic with its block. A block that
//! loses its last holder in one process while another process stores it again
//! can end up without its mapping; a later remove by that engine hash then
//! misses, and the entry lives until its pod is cleared or purged.

use super::cluster::{Call, Wave};
use super::scripts::ScriptKind;
use super::{RedisIndex, clear, layout, resolve, slots};
use crate::Error;
use fnv::{FnvHashMap, FnvHashSet};
use kvroute_core::ids::{BlockKey, EngineHash, ModelName, PodId, Tier};
use kvroute_core::index::{IndexOp, StoredBlock};
use redis::Value;

/// Blocks per packed script call on a single node: bounds how long one call
/// blocks Redis (as `clear.rs` bounds its calls), while a typical event's
/// blocks (16 for a 256-token prefix) still go in one call.
pub(super) const PACKED_BLOCKS: usize = 256;

/// What one [`RedisIndex::apply_with_stats`] call cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// EVALSHA calls (one per op and slot).
    pub script_calls: u32,
    /// Every command sent, scripts included, resends excluded.
    pub commands: u32,
    /// Waves sent (a wave is one round trip, concurrent across masters).
    pub round_trips: u32,
}

impl ApplyStats {
    pub(super) fn add_wave(&mut self, commands: usize, scripts: usize, wave: &Wave) {
        self.commands += commands as u32;
        self.script_calls += scripts as u32;
        self.round_trips += wave.round_trips;
    }
}

pub(super) async fn apply(index: &RedisIndex, ops: &[IndexOp]) -> Result<ApplyStats, Error> {
    validate(ops)?;
    let mut stats = ApplyStats::default();
    let mut rest = ops;
    while let Some(first) = rest.first() {
        if let IndexOp::ClearPod { pod } = first {
            clear::clear_pod(index, pod, &mut stats).await?;
            rest = &rest[1..];
            continue;
        }
        let end = rest
            .iter()
            .position(|op| matches!(op, IndexOp::ClearPod { .. }))
            .unwrap_or(rest.len());
        write_segment(index, &rest[..end], &mut stats).await?;
        rest = &rest[end..];
    }
    Ok(stats)
}

/// Rejects the whole batch before anything is sent, so a bad op cannot
/// leave half a batch applied.
fn validate(ops: &[IndexOp]) -> Result<(), Error> {
    let invalid = |e: layout::LayoutError| Error::Config(e.to_string());
    for op in ops {
        match op {
            IndexOp::Store {
                model, pod, tier, ..
            }
            | IndexOp::Remove {
                model, pod, tier, ..
            } => {
                layout::check_model(model).map_err(invalid)?;
                layout::check_pod(pod).map_err(invalid)?;
                layout::check_tier(tier).map_err(invalid)?;
            }
            IndexOp::ClearPod { pod } => layout::check_pod(pod).map_err(invalid)?,
        }
    }
    Ok(())
}

/// A segment without ClearPod.
async fn write_segment(
    index: &RedisIndex,
    ops: &[IndexOp],
    stats: &mut ApplyStats,
) -> Result<(), Error> {
    let removes = resolve::resolve_removes(index, ops, stats).await?;
    let mut plan = Plan {
        packed: !index.is_cluster(),
        ..Plan::default()
    };
    for (op, keys) in ops.iter().zip(&removes) {
        match op {
            IndexOp::Store {
                model,
                pod,
                tier,
                blocks,
            } => plan.store(index, model, pod, tier, blocks),
            IndexOp::Remove {
                model, pod, tier, ..
            } => plan.remove(model, pod, tier, keys),
            IndexOp::ClearPod { .. } => {
                return Err(Error::Config("ClearPod inside a write segment".into()));
            }
        }
    }
    plan.queue_registrations();
    let calls = std::mem::take(&mut plan.calls);
    let (commands, scripts) = (calls.len(), plan.scripts);
    let wave = index.conns.run(calls).await?;
    stats.add_wave(commands, scripts, &wave);

    let (follow, fresh) = plan.follow_up(&wave.replies)?;
    if !follow.is_empty() {
        let n = follow.len();
        let wave = index.conns.run(follow).await?;
        stats.add_wave(n, 0, &wave);
    }
    index.registry.mark(
        plan.queued
            .iter()
            .chain(&fresh)
            .map(|(pod, slot)| (pod, *slot)),
    );
    Ok(())
}

/// A pod and a slot it has entries in.
type PodSlot = (PodId, u16);

/// How to read a call's reply.
enum Expect {
    Plain,
    /// A store: `{fresh per slot..., released...}`; `sets` are the mappings
    /// this call's blocks establish.
    Store {
        pod: PodId,
        slots: Vec<u16>,
        sets: Vec<(String, String)>,
    },
    /// A remove or clear: `{released...}`.
    Release,
}

#[derive(Default)]
struct Plan {
    /// Several slots per script call (single node), else one (cluster).
    packed: bool,
    calls: Vec<Call>,
    expects: Vec<Expect>,
    scripts: usize,
    /// (pod, slot) the cache did not know, registered in this wave.
    queued: FnvHashSet<PodSlot>,
    /// Pods the cache did not know, added to `kvroute:pods` in this wave.
    new_pods: FnvHashSet<PodId>,
    /// The last value the first wave SETs for each `engine:` key.
    sets: FnvHashMap<String, String>,
}

impl Plan {
    fn push(&mut self, call: Call, expect: Expect) {
        if !matches!(expect, Expect::Plain) {
            self.scripts += 1;
        }
        self.calls.push(call);
        self.expects.push(expect);
    }

    fn store(
        &mut self,
        index: &RedisIndex,
        model: &ModelName,
        pod: &PodId,
        tier: &Tier,
        blocks: &[StoredBlock],
    ) {
        let field = layout::field(pod, tier);
        // (slot, block key name, engine hash as an ARGV ("" = none), engine hash)
        let mut entries: Vec<(u16, String, String, Option<EngineHash>)> = blocks
            .iter()
            .map(|b| {
                let name = layout::block_key(model, b.key);
                let engine = b.engine.filter(|e| e.0 != b.key.0);
                let arg = engine.map_or(String::new(), |e| e.to_string());
                (slots::key_slot(name.as_bytes()), name, arg, engine)
            })
            .collect();
        entries.sort_by_key(|e| e.0);
        let groups: Vec<_> = entries.chunk_by(|a, b| a.0 == b.0).collect();
        for call in calls_of(self.packed, groups) {
            let n: usize = call.iter().map(|g| g.len()).sum();
            let mut keys = Vec::with_capacity(n + 2 * call.len());
            let mut args: Vec<String> = Vec::with_capacity(n + call.len() + 3);
            args.extend([field.clone(), tier.as_str().to_owned(), model.to_string()]);
            let mut sets = Vec::new();
            let mut call_slots = Vec::with_capacity(call.len());
            for group in &call {
                let slot = group[0].0;
                call_slots.push(slot);
                let tag = slots::tag_for_slot(slot);
                keys.push(layout::pod_slot_key(tag, pod));
                keys.push(layout::engine_rev_key(tag));
                args.push(group.len().to_string());
                for (_, name, arg, engine) in group.iter() {
                    keys.push(name.clone());
                    args.push(arg.clone());
                    if let Some(e) = engine {
                        sets.push((layout::engine_key(model, *e), name.clone()));
                    }
                }
                if !index.registry.has_slot(pod, slot) {
                    self.queued.insert((pod.clone(), slot));
                }
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let cmd = ScriptKind::Store.evalsha(&keys, &args);
            self.push(
                Call {
                    slot: call_slots[0],
                    cmd,
                },
                Expect::Store {
                    pod: pod.clone(),
                    slots: call_slots,
                    sets: sets.clone(),
                },
            );
            for (engine_key, name) in sets {
                let mut cmd = redis::cmd("SET");
                cmd.arg(&engine_key).arg(&name);
                let slot = slots::key_slot(engine_key.as_bytes());
                self.push(Call { slot, cmd }, Expect::Plain);
                self.sets.insert(engine_key, name);
            }
        }
        if !index.registry.has_pod(pod) {
            self.new_pods.insert(pod.clone());
        }
    }

    fn remove(&mut self, model: &ModelName, pod: &PodId, tier: &Tier, keys: &[BlockKey]) {
        let field = layout::field(pod, tier);
        let mut entries: Vec<(u16, String)> = keys
            .iter()
            .map(|&k| {
                let name = layout::block_key(model, k);
                (slots::key_slot(name.as_bytes()), name)
            })
            .collect();
        entries.sort_by_key(|e| e.0);
        let groups: Vec<_> = entries.chunk_by(|a, b| a.0 == b.0).collect();
        for call in calls_of(self.packed, groups) {
            let n: usize = call.iter().map(|g| g.len()).sum();
            let mut keys = Vec::with_capacity(n + 2 * call.len());
            let mut args: Vec<String> = Vec::with_capacity(call.len() + 3);
            args.extend([field.clone(), tier.as_str().to_owned(), model.to_string()]);
            for group in &call {
                let tag = slots::tag_for_slot(group[0].0);
                keys.push(layout::pod_slot_key(tag, pod));
                keys.push(layout::engine_rev_key(tag));
                keys.extend(group.iter().map(|(_, name)| name.clone()));
                args.push(group.len().to_string());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let cmd = ScriptKind::Remove.evalsha(&keys, &args);
            self.push(
                Call {
                    slot: call[0][0].0,
                    cmd,
                },
                Expect::Release,
            );
        }
    }

    /// SADDs for slots and pods the cache did not know, one per key.
    fn queue_registrations(&mut self) {
        let mut per_pod: FnvHashMap<&PodId, Vec<&'static str>> = FnvHashMap::default();
        for (pod, slot) in &self.queued {
            per_pod
                .entry(pod)
                .or_default()
                .push(slots::tag_for_slot(*slot));
        }
        let mut calls = registration_calls(per_pod);
        if !self.new_pods.is_empty() {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(layout::PODS_KEY);
            for pod in &self.new_pods {
                cmd.arg(pod.as_str());
            }
            calls.push(Call {
                slot: slots::key_slot(layout::PODS_KEY.as_bytes()),
                cmd,
            });
        }
        for call in calls {
            self.push(call, Expect::Plain);
        }
    }

    /// Reads the first wave's replies: the commands that bring `engine:`
    /// keys to their final state and re-register slots found fresh, and
    /// those (pod, slot) pairs.
    fn follow_up(&self, replies: &[Value]) -> Result<(Vec<Call>, Vec<PodSlot>), Error> {
        let mut desired: FnvHashMap<&str, Option<&str>> = FnvHashMap::default();
        let mut fresh: Vec<PodSlot> = Vec::new();
        // Dedup in a set: a large batch can find thousands of slots fresh (a
        // slot whose last block the pod removed is fresh again at its next
        // store), and a linear search made this quadratic.
        let mut seen: FnvHashSet<PodSlot> = FnvHashSet::default();
        let mut released: Vec<Vec<String>> = Vec::new();
        // Pods that found a slot of theirs empty although this process had
        // not just registered them in `kvroute:pods`: re-added, because an
        // empty slot can mean Redis was flushed or restarted empty, and the
        // operator's purge of an endpoint finds its ranks in that registry.
        // A fresh slot the cache did not know (queued) still had its pod
        // registered only if the cache did not know the pod either.
        let mut unregistered: FnvHashSet<&PodId> = FnvHashSet::default();
        for (expect, reply) in self.expects.iter().zip(replies) {
            match expect {
                Expect::Plain => {}
                Expect::Store { pod, slots, .. } => {
                    let (flags, names) = parse_store_reply(reply, slots.len())?;
                    for (&slot, is_fresh) in slots.iter().zip(flags) {
                        let key = (pod.clone(), slot);
                        if is_fresh && !self.new_pods.contains(pod) {
                            unregistered.insert(pod);
                        }
                        if is_fresh && !self.queued.contains(&key) && seen.insert(key.clone()) {
                            fresh.push(key);
                        }
                    }
                    released.push(names);
                }
                Expect::Release => released.push(parse_names(reply)?),
            }
        }
        // Fold in call order: released mappings first, then what a store sets.
        let mut released = released.iter();
        for expect in &self.expects {
            match expect {
                Expect::Plain => continue,
                Expect::Store { sets, .. } => {
                    for name in released.next().into_iter().flatten() {
                        desired.insert(name, None);
                    }
                    for (k, v) in sets {
                        desired.insert(k, Some(v));
                    }
                }
                Expect::Release => {
                    for name in released.next().into_iter().flatten() {
                        desired.insert(name, None);
                    }
                }
            }
        }
        let mut calls = Vec::new();
        for (name, value) in desired {
            let slot = slots::key_slot(name.as_bytes());
            match value {
                None => calls.push(Call {
                    slot,
                    cmd: redis::cmd("DEL").arg(name).clone(),
                }),
                Some(v) if self.sets.get(name).map(String::as_str) != Some(v) => calls.push(Call {
                    slot,
                    cmd: redis::cmd("SET").arg(name).arg(v).clone(),
                }),
                Some(_) => {}
            }
        }
        if !fresh.is_empty() {
            // Debug, not info: after a Redis restart every batch re-registers
            // some slots until all are known again.
            tracing::debug!(
                slots = fresh.len(),
                "re-registering slots whose pod entries were recreated (Redis flushed or restarted?)"
            );
            let mut per_pod: FnvHashMap<&PodId, Vec<&'static str>> = FnvHashMap::default();
            for (pod, slot) in &fresh {
                per_pod
                    .entry(pod)
                    .or_default()
                    .push(slots::tag_for_slot(*slot));
            }
            calls.extend(registration_calls(per_pod));
        }
        if !unregistered.is_empty() {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(layout::PODS_KEY);
            for pod in unregistered {
                cmd.arg(pod.as_str());
            }
            calls.push(Call {
                slot: slots::key_slot(layout::PODS_KEY.as_bytes()),
                cmd,
            });
        }
        Ok((calls, fresh))
    }
}

/// Cuts slot groups (sorted by slot) into script calls: one group per
/// call on a cluster; on a single node as many as fit in
/// [`PACKED_BLOCKS`] (a group larger than that is never split).
fn calls_of<T>(packed: bool, groups: Vec<&[T]>) -> Vec<Vec<&[T]>> {
    let mut calls: Vec<Vec<&[T]>> = Vec::new();
    let mut blocks = 0;
    for group in groups {
        match calls.last_mut() {
            Some(call) if packed && blocks + group.len() <= PACKED_BLOCKS => {
                blocks += group.len();
                call.push(group);
            }
            _ => {
                blocks = group.len();
                calls.push(vec![group]);
            }
        }
    }
    calls
}

/// `SADD kvroute:pod:<pod>:slots tag...`, one call per pod.
fn registration_calls(per_pod: FnvHashMap<&PodId, Vec<&'static str>>) -> Vec<Call> {
    per_pod
        .into_iter()
        .map(|(pod, tags)| {
            let key = layout::pod_slots_key(pod);
            let mut cmd = redis::cmd("SADD");
            cmd.arg(&key).arg(tags);
            Call {
                slot: slots::key_slot(key.as_bytes()),
                cmd,
            }
        })
        .collect()
}

/// `{fresh per slot group..., released...}` from store.lua, for a call of
/// `groups` slot groups.
fn parse_store_reply(reply: &Value, groups: usize) -> Result<(Vec<bool>, Vec<String>), Error> {
    let bad = || Error::Reply(format!("store.lua returned {reply:?} for {groups} slot(s)"));
    let Value::Array(items) = reply else {
        return Err(bad());
    };
    if items.len() < groups {
        return Err(bad());
    }
    let flags = items[..groups]
        .iter()
        .map(|v| match v {
            Value::Int(f) => Ok(*f == 1),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<bool>, _>>()?;
    Ok((flags, strings(&items[groups..], "store.lua")?))
}

/// `{released...}` from remove.lua and clear_pod.lua.
pub(super) fn parse_names(reply: &Value) -> Result<Vec<String>, Error> {
    let Value::Array(items) = reply else {
        return Err(Error::Reply(format!(
            "script returned {reply:?}, expected key names"
        )));
    };
    strings(items, "script")
}

fn strings(items: &[Value], what: &str) -> Result<Vec<String>, Error> {
    items
        .iter()
        .map(|v| match v {
            Value::BulkString(b) => String::from_utf8(b.clone())
                .map_err(|_| Error::Reply(format!("{what} returned a key name that is not UTF-8"))),
            other => Err(Error::Reply(format!(
                "{what} returned {other:?}, expected a key name"
            ))),
        })
        .collect()
}
