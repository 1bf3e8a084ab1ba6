//! A bisecting lookup on a Redis Cluster in one round trip: one script call
//! per master, all masters at once.
//!
//! A prompt's keys hash to every slot, so no single script sees them all;
//! but each master can bisect the blocks *it* holds. Under the prefix
//! property (`index/bisect.rs`) the holder sets of any subsequence of the
//! prompt's blocks are nested too, so `lua/lookup.lua`, run over ARGV on
//! each master ([`ScriptKind::LookupNode`]), finds every point of that
//! master's subsequence where a holder leaves, and the holder sets there.
//!
//! Why the merged answer is the walk's: a field (`<pod>@<tier>`) held at
//! block 0 and first missing at block `d` leaves, on the master owning
//! block `d`, exactly at `d` (that master held it at its previous block, by
//! the prefix property, and lacks it at `d`): so the smallest block at
//! which any master saw the field missing is `d`. A master that saw it
//! missing only later, or never, does not lower that minimum.
//!
//! With holes (lost events, a block written to one master before its
//! predecessor reached another), the answer must still never be shallower
//! than the walk's. Whenever a master's reply shows data that is not nested
//! — its script fell back somewhere, a field appeared after its first
//! block, or its first block has a field block 0 lacks — the lookup is
//! redone in rounds, which probe exactly what the other backends probe.
//! Otherwise every field's depth is the first *read* block lacking it, and
//! a pod's run cannot be cut short by a field that joined later: that field
//! would be in the set read where the pod's earlier field was first seen
//! missing, and show as added there. A pod leaves where its last field
//! does; if another field of the pod is back at that block (a hole in one
//! tier that another tier covers, which the per-field minima cannot see),
//! the lookup is redone in rounds too. What stays invisible is a hole between
//! two probed blocks of equal counts, as for every bisecting lookup; there
//! this lookup may report another (never shallower) depth than the others,
//! because each master probes its own subsequence.
//!
//! Needs Redis 7.0 (script flags); otherwise, and if a master answers with
//! an error (a slot moved since the slot map was read: the script may only
//! read keys its node serves), the caller falls back to lookups in rounds.

use super::bisect::BlockNames;
use super::cluster::Call;
use super::lookup::Fields;
use super::scripts::ScriptKind;
use super::{RedisIndex, slots};
use crate::Error;
use fnv::{FnvHashMap, FnvHashSet};
use kvroute_core::ids::{BlockKey, ModelName, PodId, Tier};
use kvroute_core::index::Lookup;
use kvroute_core::index::bisect::{BisectStats, DiffWalk};
use redis::{Cmd, Value};

/// One master's part of the lookup: the blocks it holds, in prompt order,
/// and the script call reading them.
struct Part {
    blocks: Vec<u32>,
    slot: u16,
    cmd: Cmd,
}

/// What one master's script saw, in its own block numbering.
#[derive(Debug, Default)]
struct Seen {
    reads: u32,
    fallbacks: u32,
    /// The holder fields of the master's first block.
    first: Vec<Vec<u8>>,
    /// Field -> the first local read point (> 0) where it was missing.
    missing_from: FnvHashMap<Vec<u8>, u32>,
    /// A field appeared after the first point: not nested.
    added_later: bool,
}

/// Why a per-master lookup was redone another way (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Redo {
    /// A block's slot has no master in the slot map.
    Unserved,
    /// A reply showed data that is not nested (see the module doc).
    Holes,
}

impl Redo {
    pub fn as_str(self) -> &'static str {
        match self {
            Redo::Unserved => "unserved_slot",
            Redo::Holes => "holes",
        }
    }
}

/// Runs the lookup; `Ok(Err(why))` when it must be done another way.
pub(super) async fn lookup(
    index: &RedisIndex,
    model: &ModelName,
    keys: &[BlockKey],
    candidates: Option<&[PodId]>,
    fields: &mut Fields,
) -> Result<Result<(Lookup, BisectStats), Redo>, Error> {
    let Some(parts) = partition(index, model, keys) else {
        return Ok(Err(Redo::Unserved));
    };
    let calls = parts
        .iter()
        .map(|p| Call {
            slot: p.slot,
            cmd: p.cmd.clone(),
        })
        .collect();
    let wave = index.conns.run(calls).await?;
    let mut stats = BisectStats {
        round_trips: wave.round_trips,
        ..BisectStats::default()
    };
    let mut seen = Vec::with_capacity(parts.len());
    for reply in wave.replies {
        let s = parse(reply)?;
        stats.reads += s.reads;
        stats.fallbacks += s.fallbacks;
        seen.push(s);
    }
    if seen.iter().any(|s| s.fallbacks > 0 || s.added_later) {
        return Ok(Err(Redo::Holes));
    }
    let n = keys.len() as u32;
    Ok(merge(n, &parts, &seen, candidates, fields)
        .map(|lookup| (lookup, stats))
        .ok_or(Redo::Holes))
}

/// Groups the prompt's blocks by master and builds each master's call:
/// `EVALSHA_RO <lookup-node> 0 <name>...` (names in ARGV, see the module
/// doc), routed by the slot of the master's first block.
fn partition(index: &RedisIndex, model: &ModelName, keys: &[BlockKey]) -> Option<Vec<Part>> {
    let topo = index.conns.topology();
    let mut parts: Vec<Option<Part>> = (0..topo.nodes.len()).map(|_| None).collect();
    let mut names = BlockNames::new(model);
    for (block, &key) in keys.iter().enumerate() {
        let name = names.name(key);
        let slot = slots::key_slot(name);
        let node = topo.node_of(slot)?;
        let part = parts[node].get_or_insert_with(|| {
            let mut cmd = redis::cmd("EVALSHA_RO");
            cmd.arg(ScriptKind::LookupNode.sha()).arg(0);
            Part {
                blocks: Vec::new(),
                slot,
                cmd,
            }
        });
        part.blocks.push(block as u32);
        part.cmd.arg(name);
    }
    Some(parts.into_iter().flatten().collect())
}

/// Reads one master's reply (the format of `lua/lookup.lua`: reads,
/// fallbacks, then per read point its index, the fields removed since the
/// previous point and the fields added).
fn parse(reply: Value) -> Result<Seen, Error> {
    let bad = |what: &str| Error::Reply(format!("lookup-node script: {what}"));
    let Value::Array(items) = reply else {
        return Err(bad("reply is not an array"));
    };
    let mut items = items.into_iter();
    let mut int = |what: &str| match items.next() {
        Some(Value::Int(v)) => u32::try_from(v).map_err(|_| bad(what)),
        _ => Err(bad(what)),
    };
    let mut seen = Seen {
        reads: int("reads")?,
        fallbacks: int("fallbacks")?,
        ..Seen::default()
    };
    let mut last: Option<u32> = None;
    while let Some(first) = items.next() {
        let Value::Int(point) = first else {
            return Err(bad("point index"));
        };
        let point = u32::try_from(point)
            .ok()
            .filter(|&p| last.map_or(p == 0, |l| p > l))
            .ok_or_else(|| bad("point index out of order"))?;
        last = Some(point);
        for list in 0..2 {
            let count = match items.next() {
                Some(Value::Int(c)) => usize::try_from(c).map_err(|_| bad("field count"))?,
                _ => return Err(bad("field count")),
            };
            for _ in 0..count {
                let Some(Value::BulkString(field)) = items.next() else {
                    return Err(bad("field"));
                };
                match (point, list) {
                    // Block 0 of this master: everything is "added".
                    (0, _) => seen.first.push(field),
                    // Removed at `point`; the first removal is the one that counts.
                    (_, 0) => {
                        seen.missing_from.entry(field).or_insert(point);
                    }
                    // A field appearing after the first block: not nested.
                    _ => seen.added_later = true,
                }
            }
        }
    }
    if last.is_none() {
        return Err(bad("first point missing"));
    }
    Ok(seen)
}

/// Each field of block 0 leaves at the smallest block where any master saw
/// it missing (the module doc says why that is the walk's depth); the walk
/// over those changes gives the lookup. `None` when a master's first block
/// holds a field block 0 lacks (not nested).
fn merge(
    n: u32,
    parts: &[Part],
    seen: &[Seen],
    candidates: Option<&[PodId]>,
    fields: &mut Fields,
) -> Option<Lookup> {
    let home = parts.iter().position(|p| p.blocks.first() == Some(&0))?;
    let firsts: Vec<FnvHashSet<&[u8]>> = seen
        .iter()
        .map(|s| s.first.iter().map(Vec::as_slice).collect())
        .collect();
    let block0 = &firsts[home];
    if firsts
        .iter()
        .any(|f| f.iter().any(|field| !block0.contains(field)))
    {
        return None;
    }
    let mut leaving: Vec<(u32, (PodId, Tier))> = Vec::new();
    let mut holders0 = Vec::with_capacity(seen[home].first.len());
    // Per pod: each field and where it was first seen missing (the block,
    // the master, that master's local index of the block), if anywhere.
    type Left = Option<(u32, usize, u32)>;
    let mut pods: FnvHashMap<PodId, Vec<(&[u8], Left)>> = FnvHashMap::default();
    for field in &seen[home].first {
        let mut depth = n;
        let mut at = None;
        for (m, ((part, s), first)) in parts.iter().zip(seen).zip(&firsts).enumerate() {
            let local = if first.contains(field.as_slice()) {
                s.missing_from.get(field).copied()
            } else {
                Some(0)
            };
            // A point past the master's blocks is a malformed reply;
            // ignoring it can only make the answer deeper.
            let missing = local.and_then(|q| Some((*part.blocks.get(q as usize)?, q)));
            if let Some((block, q)) = missing
                && block < depth
            {
                depth = block;
                at = Some((block, m, q));
            }
        }
        if let Some(holder) = fields.parse(field.clone()) {
            pods.entry(holder.0.clone())
                .or_default()
                .push((field.as_slice(), at));
            if depth < n {
                leaving.push((depth, holder.clone()));
            }
            holders0.push(holder);
        }
    }
    // A pod leaves where its last field does, which is the walk's depth
    // only if no other field of the pod is back at that block (a hole in
    // one tier covered by another: the per-field minima cannot see it).
    // That master read the block, so its set there is known: check it.
    for pod_fields in pods.values() {
        let last = pod_fields.iter().map(|(_, left)| *left).try_fold(
            (0, 0, 0),
            |deepest: (u32, usize, u32), left| {
                left.map(|l| if l.0 > deepest.0 { l } else { deepest })
            },
        );
        let Some((_, m, q)) = last else { continue };
        let present = |(f, _): &(&[u8], Left)| {
            firsts[m].contains(*f) && seen[m].missing_from.get(*f).is_none_or(|&gone| gone > q)
        };
        if pod_fields.iter().any(present) {
            return None;
        }
    }
    leaving.sort_by_key(|(depth, _)| *depth);
    let mut walk = DiffWalk::new(n, &holders0, candidates);
    let mut at = 0;
    while at < leaving.len() {
        let depth = leaving[at].0;
        let end = at + leaving[at..].partition_point(|(d, _)| *d == depth);
        let removed: Vec<(PodId, Tier)> = leaving[at..end].iter().map(|(_, h)| h.clone()).collect();
        walk.apply(depth, &removed, &[]);
        at = end;
    }
    Some(walk.finish())
}
