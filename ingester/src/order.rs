//! Sequence numbers: vLLM numbers each batch of a publisher (one topic) from 0.
//! The tracker tells the pipeline whether a batch continues the stream, follows
//! a gap (missed batches: replay them or count the loss), restarts the stream
//! (the engine restarted: its cache is empty, so clear the pod first), or is a
//! duplicate to drop.
//!
//! A live stream never goes backwards unless the publisher restarted: ZeroMQ
//! does not duplicate messages, and replayed batches never pass through here.
//! The first batch seen after a restart is rarely seq 0 (whatever the engine
//! published before the subscription was re-established is lost), so any
//! sequence below the last one is a restart, and batches `0..seq` were missed.
//!
//! A jump forward by more than the tracker's bound (`--max-seq-gap`) is
//! implausible: one spoofed or corrupt batch at `seq + 2^63` would otherwise
//! add 9.2e18 to the gap counter and make the pod's real next batch look
//! like a restart (and clear it). Such a batch is not applied and changes
//! nothing; only when the stream then continues from it (the next batch is
//! exactly one more) is it taken as a new stream ([`SeqVerdict::Resync`]),
//! so a publisher whose numbering really jumped is not ignored forever.

use std::collections::HashMap;
use std::ops::Range;

/// What a batch's sequence number means for its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqVerdict {
    /// The first batch seen on this topic since the ingester started.
    First,
    /// Exactly the next batch.
    Next,
    /// Batches `missed` were never seen.
    Gap { missed: Range<u64> },
    /// The sequence went backwards: the engine restarted; batches `missed`
    /// (from 0) of the new stream were never seen.
    Restart { missed: Range<u64> },
    /// The same sequence again.
    Duplicate,
    /// Further ahead than the bound allows: skipped, nothing recorded.
    Implausible,
    /// The batch right after an implausible jump: the stream really jumped.
    /// Nothing in between can be known (or replayed), so the pod is cleared,
    /// as after a restart.
    Resync,
}

impl SeqVerdict {
    /// Whether the batch should be applied.
    pub fn applies(&self) -> bool {
        !matches!(self, SeqVerdict::Duplicate | SeqVerdict::Implausible)
    }

    pub fn as_label(&self) -> &'static str {
        match self {
            SeqVerdict::First => "first",
            SeqVerdict::Next => "next",
            SeqVerdict::Gap { .. } => "gap",
            SeqVerdict::Restart { .. } => "restart",
            SeqVerdict::Duplicate => "duplicate",
            SeqVerdict::Implausible => "implausible",
            SeqVerdict::Resync => "resync",
        }
    }
}

/// Last sequence number per topic. One tracker per ordering worker: a topic
/// always lands on the same worker, so no locking is needed.
#[derive(Debug)]
pub struct SeqTracker {
    last: HashMap<String, u64>,
    /// Largest gap taken as a gap; beyond it a batch is implausible.
    max_gap: u64,
    /// The last implausible sequence per topic, to recognise a stream that
    /// continues from it.
    jumped: HashMap<String, u64>,
}

impl Default for SeqTracker {
    fn default() -> Self {
        SeqTracker::with_max_gap(u64::MAX)
    }
}

impl SeqTracker {
    /// A tracker that calls a gap of more than `max_gap` batches implausible.
    pub fn with_max_gap(max_gap: u64) -> Self {
        SeqTracker {
            last: HashMap::new(),
            max_gap,
            jumped: HashMap::new(),
        }
    }

    /// Classifies `seq` for `topic` and records it when it applies.
    pub fn observe(&mut self, topic: &str, seq: u64) -> SeqVerdict {
        let verdict = match self.last.get(topic) {
            None => SeqVerdict::First,
            Some(&last) if seq == last.wrapping_add(1) => SeqVerdict::Next,
            Some(&last) if seq > last && seq - last - 1 > self.max_gap => {
                if seq > 0 && self.jumped.get(topic) == Some(&(seq - 1)) {
                    SeqVerdict::Resync
                } else {
                    self.jumped.insert(topic.to_string(), seq);
                    return SeqVerdict::Implausible;
                }
            }
            Some(&last) if seq > last => SeqVerdict::Gap {
                missed: last + 1..seq,
            },
            Some(&last) if seq < last => SeqVerdict::Restart { missed: 0..seq },
            Some(_) => SeqVerdict::Duplicate,
        };
        if verdict.applies() {
            self.last.insert(topic.to_string(), seq);
            self.jumped.remove(topic);
        }
        verdict
    }

    /// The last applied sequence of `topic`.
    pub fn last(&self, topic: &str) -> Option<u64> {
        self.last.get(topic).copied()
    }

    /// Forget a topic (its pod was purged, or it was evicted).
    pub fn forget(&mut self, topic: &str) {
        self.last.remove(topic);
        self.jumped.remove(topic);
    }

    /// Topics tracked.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sequences() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe("a", 5), SeqVerdict::First);
        assert_eq!(t.observe("a", 6), SeqVerdict::Next);
        assert_eq!(t.observe("a", 9), SeqVerdict::Gap { missed: 7..9 });
        assert_eq!(t.observe("a", 9), SeqVerdict::Duplicate);
        assert_eq!(t.last("a"), Some(9));
        assert_eq!(t.observe("a", 0), SeqVerdict::Restart { missed: 0..0 });
        assert_eq!(t.observe("a", 1), SeqVerdict::Next);
        // Restarted, and the first batches of the new stream were missed.
        t.observe("a", 40);
        assert_eq!(t.observe("a", 17), SeqVerdict::Restart { missed: 0..17 });
        assert_eq!(t.observe("b", 0), SeqVerdict::First);
        assert_eq!(t.observe("b", 0), SeqVerdict::Duplicate);
        t.forget("a");
        assert_eq!(t.observe("a", 3), SeqVerdict::First);
    }

    #[test]
    fn implausible_jumps_change_nothing_until_the_stream_continues_from_them() {
        let mut t = SeqTracker::with_max_gap(1000);
        assert_eq!(t.observe("a", 5), SeqVerdict::First);
        assert_eq!(t.observe("a", 5 + (1 << 63)), SeqVerdict::Implausible);
        assert_eq!(t.observe("a", u64::MAX), SeqVerdict::Implausible);
        assert_eq!(t.last("a"), Some(5));
        // The real stream goes on: not a restart.
        assert_eq!(t.observe("a", 6), SeqVerdict::Next);
        assert_eq!(t.observe("a", 1006), SeqVerdict::Gap { missed: 7..1006 });
        // A stream that really jumped continues from the jump.
        assert_eq!(t.observe("a", 1 << 40), SeqVerdict::Implausible);
        assert_eq!(t.observe("a", (1 << 40) + 1), SeqVerdict::Resync);
        assert_eq!(t.observe("a", (1 << 40) + 2), SeqVerdict::Next);
    }
}
