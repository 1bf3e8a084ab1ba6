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
}

impl SeqVerdict {
    /// Whether the batch should be applied.
    pub fn applies(&self) -> bool {
        !matches!(self, SeqVerdict::Duplicate)
    }

    pub fn as_label(&self) -> &'static str {
        match self {
            SeqVerdict::First => "first",
            SeqVerdict::Next => "next",
            SeqVerdict::Gap { .. } => "gap",
            SeqVerdict::Restart { .. } => "restart",
            SeqVerdict::Duplicate => "duplicate",
        }
    }
}

/// Last sequence number per topic. One tracker per ordering worker: a topic
/// always lands on the same worker, so no locking is needed.
#[derive(Debug, Default)]
pub struct SeqTracker {
    last: HashMap<String, u64>,
}

impl SeqTracker {
    /// Classifies `seq` for `topic` and records it when it applies.
    pub fn observe(&mut self, topic: &str, seq: u64) -> SeqVerdict {
        let verdict = match self.last.get(topic) {
            None => SeqVerdict::First,
            Some(&last) if seq == last.wrapping_add(1) => SeqVerdict::Next,
            Some(&last) if seq > last => SeqVerdict::Gap {
                missed: last + 1..seq,
            },
            Some(&last) if seq < last => SeqVerdict::Restart { missed: 0..seq },
            Some(_) => SeqVerdict::Duplicate,
        };
        if verdict.applies() {
            self.last.insert(topic.to_string(), seq);
        }
        verdict
    }

    /// The last applied sequence of `topic`.
    pub fn last(&self, topic: &str) -> Option<u64> {
        self.last.get(topic).copied()
    }

    /// Forget a topic (its pod was purged).
    pub fn forget(&mut self, topic: &str) {
        self.last.remove(topic);
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
}
