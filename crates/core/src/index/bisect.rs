//! The lookup strategy: each candidate's consecutive prefix found by
//! bisection instead of reading every block of the prompt.
//!
//! # Why bisection is exact
//!
//! vLLM chains block hashes: block `i`'s hash covers every token before it,
//! so a pod can only use block `i` of a chain while it holds blocks `0..i`
//! of that chain; and a finished request frees its blocks tail first into
//! the LRU free queue, so a chain is evicted from its end. What one pod (and
//! one tier of it) holds of a prompt is therefore a prefix, and the holder
//! set `H(i)` of block `i` (fields `<pod>@<tier>`) only shrinks as `i`
//! grows: `H(0) ⊇ H(1) ⊇ ... ⊇ H(n-1)`. Every depth the walk of
//! [`PrefixWalk`] computes is a point where some holder leaves `H`.
//!
//! Nested sets are equal exactly when their sizes are. So between two
//! blocks `a < b` with `|H(a)| == |H(b)|`, every `H(i)` is the same set and
//! no block in between needs reading. With `|H(a)| > |H(b)|` something left
//! in `(a, b]`: read the count of the middle block and recurse into both
//! halves, down to adjacent blocks `b-1, b` whose counts differ — a
//! *transition*. The holder sets themselves are read only at block 0 and at
//! transitions; each stands for every block up to the next one, and the walk
//! runs over the changes between them (`bisect/walk.rs`: what [`PrefixWalk`]
//! computes over those runs, in time linear in the changes). With
//! `P` distinct depths in an `n`-block prompt that is `O(P log n)` counts
//! and `P + 1` sets instead of `n` sets. (Counts rather than sets decide the
//! split because a count is one integer: `HLEN` instead of `HKEYS`, which
//! matters once 64 pods hold a block.)
//!
//! # When the property does not hold
//!
//! Lost events, a block written to one Redis Cluster master before its
//! predecessor reached another, or a hash collision can leave a hole: a
//! block that a pod lacks while it holds later ones. Three checks catch the
//! holes the probes can see, and each falls back to reading every block of
//! the interval concerned (counted as a fallback, [`LOOKUP_FALLBACKS`]):
//! - a count that grows from an interval's start to its end (holders
//!   appeared): the interval is read block by block;
//! - the holder set at a transition that is not a subset of the set at the
//!   previous read point: every block between the two is read;
//! - nothing is read past the first block with no holder at all (the walk
//!   stops there).
//!
//! What remains undetectable is a hole strictly inside an interval whose
//! two probed ends have equal counts (or equal-sized sets that differ, one
//! holder leaving where another appears). Precisely: for every pod and every
//! (pod, tier), [`LookupMode::Bisect`] returns the first *read* block that
//! lacks it, where [`LookupMode::Linear`] returns the first block that lacks
//! it; so Bisect is never shallower than the walk, equal whenever the
//! prefix property holds or its violation is visible to the checks above,
//! and deeper for a pod whose hole it did not see. `Linear` (the walk over
//! every block, as before) stays selectable for an index that cannot be
//! trusted to hold prefixes.
//!
//! # One answer for every backend
//!
//! Whether an interval is split depends only on the counts at its two ends,
//! so the set of blocks read — and hence the answer, even on data with
//! holes — is a function of the data alone, not of the order in which a
//! backend visits intervals: the memory index recurses in process, a single
//! Redis runs the same recursion in `lua/lookup.lua` (one round trip), a
//! Redis Cluster runs it in rounds of pipelined reads (one pipeline per
//! master per round) or, for a prompt of moderate length, reads it whole in
//! one wave and bisects in hand. `tests/lookup_bisect.rs` checks they agree,
//! holes included. The exception, by design: on Redis 7 a cluster lookup
//! first runs the recursion on each master over that master's own blocks
//! (one round trip, `redis/node_lookup.rs`); that probes other blocks, so on
//! holes its replies cannot see it may report another depth, never a
//! shallower one, and any hole they do show sends it to the rounds. Prompts of at most [`DEFAULT_LINEAR_MAX_BLOCKS`] blocks
//! are walked linearly in every mode and backend (exact, and no slower).

use super::Lookup;
use super::ops::PrefixWalk;
use crate::ids::{PodId, Tier};
use fnv::{FnvHashMap, FnvHashSet};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize};
pub use walk::DiffWalk;

/// Counter of intervals read block by block because the probes contradicted
/// the prefix property (label `backend`: `memory`, `redis`).
pub const LOOKUP_FALLBACKS: &str = "kvroute_index_lookup_fallbacks_total";

/// How a backend finds each candidate's prefix. See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LookupMode {
    /// Bisection on holder counts: `O(P log n)` reads; exact when pods hold
    /// prefixes (what vLLM's hash chaining and tail-first eviction give).
    #[default]
    Bisect,
    /// Read every block up to the first one no live candidate holds: exact
    /// on any data, cost linear in the matched prefix.
    Linear,
}

impl LookupMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LookupMode::Bisect => "bisect",
            LookupMode::Linear => "linear",
        }
    }
}

/// Parses `bisect` or `linear` (the `--lookup-mode` values).
impl std::str::FromStr for LookupMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bisect" => Ok(LookupMode::Bisect),
            "linear" => Ok(LookupMode::Linear),
            other => Err(format!("unknown lookup mode {other:?} (bisect or linear)")),
        }
    }
}

impl std::fmt::Display for LookupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Prompts of at most this many blocks are walked linearly in
/// [`LookupMode::Bisect`] too, on every backend: reading a short prompt whole
/// costs about what bisecting it does (one pipeline vs one script call on
/// Redis), and the walk is exact on any data. Measured with
/// `kvroute-loadtest bench decision` (docs/benchmarks-history.md, "Decision latency").
pub const DEFAULT_LINEAR_MAX_BLOCKS: usize = 32;

/// A backend's lookup configuration, settable through `&self` while lookups
/// run (the scorer sets it once the index is connected).
#[derive(Debug)]
pub struct LookupSettings {
    mode: AtomicU8,
    linear_max: AtomicUsize,
    per_master: AtomicBool,
}

impl Default for LookupSettings {
    fn default() -> Self {
        LookupSettings {
            mode: AtomicU8::new(LookupMode::default() as u8),
            linear_max: AtomicUsize::new(DEFAULT_LINEAR_MAX_BLOCKS),
            per_master: AtomicBool::new(true),
        }
    }
}

impl LookupSettings {
    pub fn mode(&self) -> LookupMode {
        if self.mode.load(Relaxed) == LookupMode::Linear as u8 {
            LookupMode::Linear
        } else {
            LookupMode::Bisect
        }
    }

    pub fn set_mode(&self, mode: LookupMode) {
        self.mode.store(mode as u8, Relaxed);
    }

    /// See [`DEFAULT_LINEAR_MAX_BLOCKS`].
    pub fn linear_max_blocks(&self) -> usize {
        self.linear_max.load(Relaxed)
    }

    /// Tests set 0 to bisect every prompt.
    pub fn set_linear_max_blocks(&self, blocks: usize) {
        self.linear_max.store(blocks, Relaxed);
    }

    /// On a Redis Cluster of Redis 7 masters, bisect with one script per
    /// master in one round trip (`index/redis/node_lookup.rs`; the
    /// default); off, in rounds of pipelined reads. Benchmarks and tests
    /// turn it off to measure and check the rounds.
    pub fn per_master_scripts(&self) -> bool {
        self.per_master.load(Relaxed)
    }

    pub fn set_per_master_scripts(&self, on: bool) {
        self.per_master.store(on, Relaxed);
    }

    /// How a prompt of `blocks` blocks is looked up.
    pub fn mode_for(&self, blocks: usize) -> LookupMode {
        match self.mode() {
            LookupMode::Bisect if blocks > self.linear_max_blocks() => LookupMode::Bisect,
            _ => LookupMode::Linear,
        }
    }
}

/// What one bisecting lookup cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BisectStats {
    /// Block reads: an HLEN or an HKEYS each (a prompt read whole in one
    /// wave counts each block once; in memory, a count or a holder set).
    pub reads: u32,
    /// Intervals read block by block because a check saw a hole.
    pub fallbacks: u32,
    /// Round trips to Redis (0 in memory).
    pub round_trips: u32,
}

/// Holders as the walk wants them.
pub type Holders = Vec<(PodId, Tier)>;

/// Marks a block whose count is not known yet.
const UNKNOWN: u32 = u32::MAX;

/// The counting phase as a state machine with no I/O: the caller reads the
/// counts [`Bisection::advance`] asks for (plus any it likes, see
/// [`Bisection::speculative`]), then reads the holder sets of
/// [`Bisection::set_points`] into [`Sets`].
#[derive(Debug)]
pub struct Bisection {
    n: u32,
    /// Holder count per block; index `n` is a sentinel 0 (no block after
    /// the prompt is held), so every holder of the last block "leaves" there.
    counts: Vec<u32>,
    /// Intervals whose end counts are known and not yet judged.
    work: Vec<(u32, u32)>,
    /// Intervals to split whose middle count is not known yet.
    waiting: Vec<(u32, u32)>,
    transitions: Vec<u32>,
    linear: Vec<(u32, u32)>,
    /// The first block known to have no holder: nothing after it matters.
    first_empty: u32,
    started: bool,
    reads: u32,
}

fn mid(a: u32, b: u32) -> u32 {
    a + (b - a) / 2
}

impl Bisection {
    /// A prompt of `n` blocks (n >= 1).
    pub fn new(n: u32) -> Self {
        let mut counts = vec![UNKNOWN; n as usize + 1];
        counts[n as usize] = 0;
        Bisection {
            n,
            counts,
            work: Vec::new(),
            waiting: Vec::new(),
            transitions: Vec::new(),
            linear: Vec::new(),
            first_empty: n,
            started: false,
            reads: 0,
        }
    }

    /// Records block `block`'s holder count (ignored when known or out of range).
    pub fn set_count(&mut self, block: u32, count: u32) {
        if block < self.n && self.counts[block as usize] == UNKNOWN {
            self.counts[block as usize] = count.min(UNKNOWN - 1);
        }
    }

    fn known(&self, block: u32) -> Option<u32> {
        let c = self.counts[block as usize];
        (c != UNKNOWN).then_some(c)
    }

    /// A count the recursion uses: counted as a read, and the first empty
    /// block moves forward.
    fn consume(&mut self, block: u32, count: u32) {
        self.reads += 1;
        if count == 0 && block < self.first_empty {
            self.first_empty = block;
        }
    }

    /// Judges every interval the known counts allow; returns the blocks
    /// whose counts are needed to go on (sorted), empty once counting is done.
    pub fn advance(&mut self) -> Vec<u32> {
        let Some(c0) = self.known(0) else {
            return vec![0];
        };
        if !self.started {
            self.started = true;
            self.consume(0, c0);
            self.work.push((0, self.n));
        }
        let mut need = Vec::new();
        for (a, b) in std::mem::take(&mut self.waiting) {
            let m = mid(a, b);
            match self.known(m) {
                Some(cm) => {
                    self.consume(m, cm);
                    self.work.push((m, b));
                    self.work.push((a, m));
                }
                None => {
                    self.waiting.push((a, b));
                    need.push(m);
                }
            }
        }
        while let Some((a, b)) = self.work.pop() {
            let (ca, cb) = (self.counts[a as usize], self.counts[b as usize]);
            if a >= self.first_empty || ca == cb {
                continue;
            }
            if cb > ca {
                self.linear.push((a, b));
            } else if b - a == 1 {
                if b < self.n {
                    self.transitions.push(b);
                }
            } else {
                let m = mid(a, b);
                match self.known(m) {
                    Some(cm) => {
                        self.consume(m, cm);
                        self.work.push((m, b));
                        self.work.push((a, m));
                    }
                    None => {
                        self.waiting.push((a, b));
                        need.push(m);
                    }
                }
            }
        }
        need.sort_unstable();
        need
    }

    /// Blocks worth reading ahead: the middles the next `levels` rounds
    /// would need if every waiting interval kept splitting. A backend paying
    /// a round trip per round reads them along with [`Bisection::advance`]'s.
    /// Before block 0's count is known, the first `levels` levels of middles
    /// of the whole prompt.
    pub fn speculative(&self, levels: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut frontier: Vec<(u32, u32)> = if self.started {
            self.waiting.clone()
        } else {
            if self.n >= 2 && levels > 0 {
                out.push(mid(0, self.n));
            }
            vec![(0, self.n)]
        };
        let levels = if self.started {
            levels
        } else {
            levels.saturating_sub(1)
        };
        for _ in 0..levels {
            let mut next = Vec::new();
            for (a, b) in frontier {
                let m = mid(a, b);
                for (x, y) in [(a, m), (m, b)] {
                    if y - x >= 2 {
                        let mm = mid(x, y);
                        if self.known(mm).is_none() {
                            out.push(mm);
                        }
                        next.push((x, y));
                    }
                }
            }
            frontier = next;
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// After counting: the blocks whose holder sets the answer needs,
    /// sorted: block 0, every transition, every block of an interval whose
    /// count grew; none past the first empty block.
    pub fn set_points(&self) -> Vec<u32> {
        let last = self.first_empty.min(self.n - 1);
        let mut points = vec![0];
        points.extend(self.transitions.iter().copied().filter(|&t| t <= last));
        for &(a, b) in &self.linear {
            points.extend(a..=b.min(last));
        }
        points.sort_unstable();
        points.dedup();
        points
    }

    pub fn stats(&self) -> BisectStats {
        BisectStats {
            reads: self.reads,
            // Intervals past the first empty block were never read.
            fallbacks: self
                .linear
                .iter()
                .filter(|(a, _)| *a < self.first_empty)
                .count() as u32,
            round_trips: 0,
        }
    }
}

/// Holder sets read at some blocks; each stands for the blocks up to the
/// next one read.
#[derive(Debug, Default)]
pub struct Sets {
    sets: BTreeMap<u32, Holders>,
}

impl Sets {
    pub fn insert(&mut self, block: u32, holders: Holders) {
        self.sets.insert(block, holders);
    }

    /// Blocks read so far.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    /// Whether no block was read yet.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// The nesting check: for each pair of consecutive read blocks `p < q`
    /// more than one apart where `H(q)` is not a subset of `H(p)`, the blocks
    /// strictly between them (to be read, then inserted, before
    /// [`Sets::walk`]); and how many such pairs there were.
    pub fn gaps(&self) -> (Vec<u32>, u32) {
        let (mut blocks, mut pairs) = (Vec::new(), 0);
        let entries: Vec<(&u32, &Holders)> = self.sets.iter().collect();
        for pair in entries.windows(2) {
            let ((&p, hp), (&q, hq)) = (pair[0], pair[1]);
            if q - p >= 2 && !is_subset(hq, hp) {
                pairs += 1;
                blocks.extend(p + 1..q);
            }
        }
        (blocks, pairs)
    }

    /// The walk over the runs the read blocks stand for (each up to the
    /// next read block), fed the changes between consecutive read blocks.
    pub fn walk(&self, n: u32, candidates: Option<&[PodId]>) -> Lookup {
        let mut entries = self.sets.iter();
        let Some((_, first)) = entries.next() else {
            return PrefixWalk::new(candidates).finish();
        };
        let mut walk = DiffWalk::new(n, first, candidates);
        let mut prev = first;
        for (&block, holders) in entries {
            let (removed, added) = diff(prev, holders);
            walk.apply(block, removed, added);
            prev = holders;
        }
        walk.finish()
    }
}

/// Holders by reference.
type HolderRefs<'h> = Vec<&'h (PodId, Tier)>;

/// (in `prev` and not in `cur`, in `cur` and not in `prev`), as multisets.
fn diff<'h>(prev: &'h Holders, cur: &'h Holders) -> (HolderRefs<'h>, HolderRefs<'h>) {
    let mut count: FnvHashMap<&(PodId, Tier), i32> = FnvHashMap::default();
    for h in prev {
        *count.entry(h).or_default() += 1;
    }
    for h in cur {
        *count.entry(h).or_default() -= 1;
    }
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    for (h, c) in count {
        for _ in 0..c.max(0) {
            removed.push(h);
        }
        for _ in 0..(-c).max(0) {
            added.push(h);
        }
    }
    (removed, added)
}

/// `small ⊆ big`, for holder lists of a few to a few hundred entries.
fn is_subset(small: &Holders, big: &Holders) -> bool {
    if small.len() > big.len() {
        return false;
    }
    if big.len() <= 16 {
        return small.iter().all(|h| big.contains(h));
    }
    let big: FnvHashSet<&(PodId, Tier)> = big.iter().collect();
    small.iter().all(|h| big.contains(h))
}

/// Blocks whose counts and holder sets a synchronous backend can read at
/// once (the memory index; a prompt read whole in one pipeline).
pub trait BlockReader {
    /// Holder entries of block `i` (for Redis: fields, malformed ones too).
    fn count(&mut self, block: u32) -> u32;
    /// Block `i`'s holders (malformed fields skipped).
    fn holders(&mut self, block: u32) -> Holders;
}

/// The whole bisecting lookup over a [`BlockReader`].
pub fn bisect_sync(
    n: u32,
    reader: &mut impl BlockReader,
    candidates: Option<&[PodId]>,
) -> (Lookup, BisectStats) {
    if n == 0 {
        return (PrefixWalk::new(candidates).finish(), BisectStats::default());
    }
    let mut plan = Bisection::new(n);
    loop {
        let need = plan.advance();
        if need.is_empty() {
            break;
        }
        for block in need {
            let c = reader.count(block);
            plan.set_count(block, c);
        }
    }
    let mut stats = plan.stats();
    let mut sets = Sets::default();
    for block in plan.set_points() {
        sets.insert(block, reader.holders(block));
        stats.reads += 1;
    }
    let (gaps, pairs) = sets.gaps();
    stats.fallbacks += pairs;
    for block in gaps {
        sets.insert(block, reader.holders(block));
        stats.reads += 1;
    }
    (sets.walk(n, candidates), stats)
}

mod walk;

#[cfg(test)]
mod tests;
