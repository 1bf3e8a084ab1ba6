//! Bisecting lookups against Redis (the algorithm and why it is exact:
//! `index/bisect.rs`).
//!
//! - [`script`], single node: `lua/lookup.lua` runs the whole bisection
//!   server-side, every block key declared in KEYS, and returns the holder
//!   sets it read as differences; one round trip whatever the prompt length.
//! - [`rounds`], Redis Cluster: a prompt's keys hash to every master, so no
//!   script can see them all. The client drives the same state machine in
//!   rounds, each one wave (one pipeline per master, concurrently): HLEN of
//!   the middles it needs plus the next levels' middles read ahead
//!   (bounded by [`ROUND_BUDGET`]), then HKEYS of the blocks whose sets the
//!   answer needs, then, only if the nesting check fails, HKEYS of the gap.
//!   3 rounds for a few distinct holder depths, up to ~7 for 64.

use super::cluster::Call;
use super::lookup::{Fields, hkeys};
use super::scripts::ScriptKind;
use super::{RedisIndex, layout, slots};
use crate::Error;
use kvroute_core::ids::{BlockKey, ModelName, PodId};
use kvroute_core::index::Lookup;
use kvroute_core::index::bisect::{BisectStats, Bisection, DiffWalk, Holders, Sets};
use redis::{Cmd, Value};

/// Counts read per round at most (needed middles always go, read-ahead
/// fills the rest): HLEN replies are a few bytes, so a round costs about a
/// round trip plus ~0.3 µs per count on the server.
pub const ROUND_BUDGET: usize = 128;

/// The whole lookup in one `EVALSHA` of `lua/lookup.lua`.
pub(super) async fn script(
    index: &RedisIndex,
    model: &ModelName,
    keys: &[BlockKey],
    candidates: Option<&[PodId]>,
    fields: &mut Fields,
) -> Result<(Lookup, BisectStats), Error> {
    let mut wave = index
        .conns
        .run(vec![Call {
            slot: 0,
            cmd: script_call(model, keys, index.conns.topology().read_only_scripts()),
        }])
        .await?;
    let reply = wave
        .replies
        .pop()
        .ok_or_else(|| Error::Reply("lookup.lua: no reply".into()))?;
    decode(reply, keys.len() as u32, candidates, fields)
}

/// `EVALSHA_RO <lookup.lua> n <model>@<key>...` (plain `EVALSHA` before
/// Redis 7.0), the names written straight into the command: for a
/// 2048-block prompt, `format!` per name cost more than the script's whole
/// bisection (~140 µs vs ~60 µs of Lua). `_RO` makes the server refuse any
/// write the script might attempt, and lets the call go to a replica.
fn script_call(model: &ModelName, keys: &[BlockKey], read_only: bool) -> Cmd {
    let mut cmd = redis::cmd(if read_only { "EVALSHA_RO" } else { "EVALSHA" });
    cmd.arg(ScriptKind::Lookup.sha()).arg(keys.len());
    let mut names = BlockNames::new(model);
    for &key in keys {
        cmd.arg(names.name(key));
    }
    cmd
}

/// Writes `<model>@<key>` names into one reused buffer (what
/// [`layout::block_key`] formats), without a `format!` and an allocation
/// per block: the lookups name every block of a prompt.
pub(super) struct BlockNames {
    buf: Vec<u8>,
    prefix: usize,
}

impl BlockNames {
    pub fn new(model: &ModelName) -> Self {
        let mut buf = Vec::with_capacity(model.as_str().len() + 21);
        buf.extend_from_slice(model.as_str().as_bytes());
        buf.push(b'@');
        let prefix = buf.len();
        BlockNames { buf, prefix }
    }

    /// The name of `key`'s block, valid until the next call.
    pub fn name(&mut self, key: BlockKey) -> &[u8] {
        self.buf.truncate(self.prefix);
        push_decimal(&mut self.buf, key.0);
        &self.buf
    }
}

/// Appends `v` in decimal, as `u64`'s `Display` writes it.
fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Reads the script's reply (format in `lua/lookup.lua`) straight into the
/// walk over changes: the reply already is the changes between read blocks.
fn decode(
    reply: Value,
    n: u32,
    candidates: Option<&[PodId]>,
    fields: &mut Fields,
) -> Result<(Lookup, BisectStats), Error> {
    let bad = |what: &str| Error::Reply(format!("lookup.lua: {what}"));
    let Value::Array(items) = reply else {
        return Err(bad("reply is not an array"));
    };
    let mut items = items.into_iter();
    let int = |items: &mut std::vec::IntoIter<Value>, what: &str| match items.next() {
        Some(Value::Int(v)) => u32::try_from(v).map_err(|_| bad(what)),
        _ => Err(bad(what)),
    };
    let stats = BisectStats {
        reads: int(&mut items, "reads")?,
        fallbacks: int(&mut items, "fallbacks")?,
        round_trips: 1,
    };
    let mut parse = |items: &mut std::vec::IntoIter<Value>, what: &str| {
        let count = int(items, what)?;
        let mut out: Holders = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let Some(Value::BulkString(field)) = items.next() else {
                return Err(bad(what));
            };
            out.extend(fields.parse(field));
        }
        Ok(out)
    };
    let mut walk: Option<DiffWalk<'_>> = None;
    let mut last: Option<u32> = None;
    while let Some(first) = items.next() {
        let Value::Int(block) = first else {
            return Err(bad("block index"));
        };
        let block = u32::try_from(block)
            .ok()
            .filter(|&b| b < n && last.map_or(b == 0, |l| b > l))
            .ok_or_else(|| bad("block index out of order"))?;
        last = Some(block);
        let removed = parse(&mut items, "removed fields")?;
        let added = parse(&mut items, "added fields")?;
        match &mut walk {
            None => walk = Some(DiffWalk::new(n, &added, candidates)),
            Some(w) => w.apply(block, &removed, &added),
        }
    }
    let walk = walk.ok_or_else(|| bad("block 0 missing"))?;
    Ok((walk.finish(), stats))
}

/// The bisection in rounds (Redis Cluster).
pub(super) async fn rounds(
    index: &RedisIndex,
    model: &ModelName,
    keys: &[BlockKey],
    candidates: Option<&[PodId]>,
    fields: &mut Fields,
) -> Result<(Lookup, BisectStats), Error> {
    let n = keys.len() as u32;
    let name = |block: u32| layout::block_key(model, keys[block as usize]);
    let mut plan = Bisection::new(n);
    // Counts read, read-ahead included (the plan counts only those it used).
    let (mut counted, mut round_trips) = (0, 0);
    loop {
        let need = plan.advance();
        if need.is_empty() {
            break;
        }
        let mut blocks = need.clone();
        // Read ahead as many levels as the budget allows: a waiting interval
        // costs 2^(levels+1) - 1 counts for `levels` levels.
        let per_interval = |levels: u32| (1usize << (levels + 1)) - 1;
        let mut levels = 0;
        while levels < 16 && need.len() * per_interval(levels + 1) <= ROUND_BUDGET {
            levels += 1;
        }
        blocks.extend(plan.speculative(levels));
        blocks.sort_unstable();
        blocks.dedup();
        counted += blocks.len() as u32;
        let calls: Vec<Call> = blocks
            .iter()
            .map(|&b| {
                let key = name(b);
                Call {
                    slot: slots::key_slot(key.as_bytes()),
                    cmd: redis::cmd("HLEN").arg(key).clone(),
                }
            })
            .collect();
        let wave = index.conns.run(calls).await?;
        round_trips += wave.round_trips;
        for (&block, reply) in blocks.iter().zip(wave.replies) {
            let Value::Int(count) = reply else {
                return Err(Error::Reply(format!("HLEN returned {reply:?}")));
            };
            plan.set_count(block, u32::try_from(count).unwrap_or(u32::MAX));
        }
    }
    let mut stats = plan.stats();
    let mut sets = Sets::default();
    round_trips += read_sets(index, &plan.set_points(), &name, &mut sets, fields).await?;
    stats.reads = counted + sets.len() as u32;
    let (gaps, pairs) = sets.gaps();
    if !gaps.is_empty() {
        stats.fallbacks += pairs;
        stats.reads += gaps.len() as u32;
        round_trips += read_sets(index, &gaps, &name, &mut sets, fields).await?;
    }
    stats.round_trips = round_trips;
    Ok((sets.walk(n, candidates), stats))
}

/// One wave of HKEYS for `blocks`, into `sets`; the round trips it took.
async fn read_sets(
    index: &RedisIndex,
    blocks: &[u32],
    name: &impl Fn(u32) -> String,
    sets: &mut Sets,
    fields: &mut Fields,
) -> Result<u32, Error> {
    let calls: Vec<Call> = blocks.iter().map(|&b| hkeys(&name(b))).collect();
    let wave = index.conns.run(calls).await?;
    for (&block, reply) in blocks.iter().zip(wave.replies) {
        let (_, holders) = fields.holders(reply)?;
        sets.insert(block, holders);
    }
    Ok(wave.round_trips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_call_names_blocks_like_the_layout() {
        let model = ModelName::new("org/m@x");
        let keys = [
            BlockKey(0),
            BlockKey(7),
            BlockKey(1 << 40),
            BlockKey(u64::MAX),
        ];
        let names: Vec<String> = keys.iter().map(|&k| layout::block_key(&model, k)).collect();
        for (read_only, verb) in [(true, "EVALSHA_RO"), (false, "EVALSHA")] {
            let mut expected = redis::cmd(verb);
            expected
                .arg(ScriptKind::Lookup.sha())
                .arg(keys.len())
                .arg(&names);
            assert_eq!(
                script_call(&model, &keys, read_only).get_packed_command(),
                expected.get_packed_command()
            );
        }
    }
}
