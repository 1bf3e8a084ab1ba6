//! Read path: a prompt's block keys -> each candidate's consecutive prefix.
//!
//! How a lookup reads Redis, by the mode a prompt of `n` blocks gets
//! ([`LookupSettings::mode_for`]: `Linear` when configured or when `n` is at
//! most the linear threshold). The answer depends on the mode only, never
//! on the way it is read (`index/bisect.rs`):
//!
//! | mode | topology | reads | round trips |
//! |---|---|---|---|
//! | `Linear` | any | HKEYS of every block, one pipeline per master | 1 |
//! | `Bisect` | single node | `lua/lookup.lua` ([`super::bisect::script`]) | 1 |
//! | `Bisect` | cluster, Redis >= 7 | `lua/lookup.lua` on each master over its blocks ([`super::node_lookup`]) | 1 |
//! | `Bisect` | cluster, Redis < 7 or a slot moved, `n` <= [`CLUSTER_READ_WHOLE_MAX_BLOCKS`] | HKEYS of every block, bisected in hand | 1 |
//! | `Bisect` | same, longer | rounds of HLEN, then HKEYS ([`super::bisect::rounds`]) | 3 for a few distinct depths, ~7 for 64 |
//!
//! [`LookupSettings::mode_for`]: kvroute_core::index::bisect::LookupSettings::mode_for

use super::cluster::Call;
use super::{RedisIndex, bisect as remote, layout, node_lookup, slots};
use crate::Error;
use fnv::FnvHashMap;
use kvroute_core::ids::{BlockKey, ModelName, PodId, Tier};
use kvroute_core::index::bisect::{self, BisectStats, BlockReader, Holders, LookupMode};
use kvroute_core::index::{Lookup, ops::PrefixWalk};
use redis::Value;
use std::sync::atomic::Ordering::Relaxed;

/// Counter of cluster lookups whose per-master script wave was redone
/// another way (label `reason`: `error`, `holes`, `unserved_slot`).
pub const NODE_LOOKUPS_REDONE: &str = "kvroute_index_node_lookups_redone_total";

/// Without per-master scripts, bisecting a cluster costs a round trip per
/// round (3 to 7 of them); up to about this many blocks one wave reading
/// every block is as cheap (measured: `bench decision`, part (0'),
/// docs/benchmarks-history.md).
pub const CLUSTER_READ_WHOLE_MAX_BLOCKS: usize = 192;

pub(super) async fn lookup(
    index: &RedisIndex,
    model: &ModelName,
    keys: &[BlockKey],
    candidates: Option<&[PodId]>,
) -> Result<Lookup, Error> {
    let mut fields = Fields::default();
    let n = keys.len();
    let mode = index.lookup.mode_for(n);
    let result = if n == 0 {
        Ok((PrefixWalk::new(candidates).finish(), BisectStats::default()))
    } else if mode == LookupMode::Linear {
        let (blocks, trips) = read_all(index, model, keys, &mut fields).await?;
        let stats = BisectStats {
            reads: n as u32,
            round_trips: trips,
            ..BisectStats::default()
        };
        Ok((walk_in_hand(&blocks, candidates), stats))
    } else if !index.is_cluster() {
        remote::script(index, model, keys, candidates, &mut fields).await
    } else if let Some(done) = per_node(index, model, keys, candidates, &mut fields).await {
        Ok(done)
    } else if n <= CLUSTER_READ_WHOLE_MAX_BLOCKS {
        let (blocks, trips) = read_all(index, model, keys, &mut fields).await?;
        let (lookup, mut stats) = bisect::bisect_sync(n as u32, &mut InHand(blocks), candidates);
        (stats.reads, stats.round_trips) = (n as u32, trips);
        Ok((lookup, stats))
    } else {
        remote::rounds(index, model, keys, candidates, &mut fields).await
    };
    fields.report(index, model);
    let (lookup, stats) = result?;
    let c = &index.counters;
    c.lookups.fetch_add(1, Relaxed);
    c.lookup_reads.fetch_add(u64::from(stats.reads), Relaxed);
    c.lookup_round_trips
        .fetch_add(u64::from(stats.round_trips), Relaxed);
    if stats.fallbacks > 0 {
        c.lookup_fallbacks
            .fetch_add(u64::from(stats.fallbacks), Relaxed);
        metrics::counter!(bisect::LOOKUP_FALLBACKS, "backend" => "redis")
            .increment(u64::from(stats.fallbacks));
    }
    Ok(lookup)
}

/// The cluster lookup in one round trip ([`node_lookup`]) when every master
/// runs Redis 7; `None` (the caller reads in rounds or whole) when one does
/// not, when the replies show holes, or when it failed: a slot moved since
/// the slot map was read, which the rounds' redirects then repair. Redone
/// lookups are counted by reason.
async fn per_node(
    index: &RedisIndex,
    model: &ModelName,
    keys: &[BlockKey],
    candidates: Option<&[PodId]>,
    fields: &mut Fields,
) -> Option<(Lookup, BisectStats)> {
    if !index.lookup.per_master_scripts() || !index.conns.topology().read_only_scripts() {
        return None;
    }
    let reason = match node_lookup::lookup(index, model, keys, candidates, fields).await {
        Ok(Ok(done)) => return Some(done),
        Ok(Err(redo)) => redo.as_str(),
        Err(e) => {
            tracing::debug!(error = %e, "per-master lookup failed; reading in rounds");
            "error"
        }
    };
    index.counters.node_lookups_redone.fetch_add(1, Relaxed);
    metrics::counter!(NODE_LOOKUPS_REDONE, "reason" => reason).increment(1);
    None
}

/// One wave of HKEYS, one per block: (field count, holders) per block, and
/// the round trips the wave took.
async fn read_all(
    index: &RedisIndex,
    model: &ModelName,
    keys: &[BlockKey],
    fields: &mut Fields,
) -> Result<(Vec<(u32, Holders)>, u32), Error> {
    let calls: Vec<Call> = keys
        .iter()
        .map(|&key| hkeys(&layout::block_key(model, key)))
        .collect();
    let wave = index.conns.run(calls).await?;
    let blocks = wave
        .replies
        .into_iter()
        .map(|reply| fields.holders(reply))
        .collect::<Result<_, _>>()?;
    Ok((blocks, wave.round_trips))
}

/// `HKEYS <name>` in its slot.
pub(super) fn hkeys(name: &str) -> Call {
    Call {
        slot: slots::key_slot(name.as_bytes()),
        cmd: redis::cmd("HKEYS").arg(name).clone(),
    }
}

/// The linear walk over blocks in hand, stopping early.
fn walk_in_hand(blocks: &[(u32, Holders)], candidates: Option<&[PodId]>) -> Lookup {
    let mut walk = PrefixWalk::new(candidates);
    for (_, holders) in blocks {
        if !walk.push(holders.iter().map(|(p, t)| (p, t))) {
            break;
        }
    }
    walk.finish()
}

/// A prompt read whole, bisected in hand.
struct InHand(Vec<(u32, Holders)>);

impl BlockReader for InHand {
    fn count(&mut self, block: u32) -> u32 {
        self.0.get(block as usize).map_or(0, |b| b.0)
    }

    fn holders(&mut self, block: u32) -> Holders {
        self.0
            .get(block as usize)
            .map(|b| b.1.clone())
            .unwrap_or_default()
    }
}

/// Holder fields parsed once per lookup: the same pods hold block after
/// block, so each distinct field is parsed and allocated once.
#[derive(Default)]
pub(super) struct Fields {
    seen: FnvHashMap<Vec<u8>, Option<(PodId, Tier)>>,
    malformed: u64,
}

impl Fields {
    /// `<pod>@<tier>` -> (pod, tier); `None` (and counted) when malformed.
    pub fn parse(&mut self, bytes: Vec<u8>) -> Option<(PodId, Tier)> {
        let parsed = match self.seen.get(bytes.as_slice()) {
            Some(parsed) => parsed.clone(),
            None => {
                let parsed = layout::parse_field(&bytes)
                    .map(|(pod, tier)| (PodId::new(pod), Tier::new(tier)));
                self.seen.insert(bytes, parsed.clone());
                parsed
            }
        };
        if parsed.is_none() {
            self.malformed += 1;
        }
        parsed
    }

    /// An HKEYS reply -> (field count, holders).
    pub fn holders(&mut self, reply: Value) -> Result<(u32, Holders), Error> {
        let fields = match reply {
            Value::Array(fields) => fields,
            Value::Nil => Vec::new(),
            other => return Err(Error::Reply(format!("HKEYS returned {other:?}"))),
        };
        let count = fields.len() as u32;
        let mut holders = Vec::with_capacity(fields.len());
        for field in fields {
            match field {
                Value::BulkString(bytes) => holders.extend(self.parse(bytes)),
                _ => self.malformed += 1,
            }
        }
        Ok((count, holders))
    }

    fn report(self, index: &RedisIndex, model: &ModelName) {
        if self.malformed > 0 {
            index
                .counters
                .malformed_fields
                .fetch_add(self.malformed, Relaxed);
            tracing::debug!(model = %model, malformed = self.malformed, "malformed holder fields skipped");
        }
    }
}
