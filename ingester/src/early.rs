//! Batches received before the index answers.
//!
//! The sockets bind (and dial) before Redis is reachable, so a pod's events
//! are not lost while the ingester waits for its index: whatever arrives is
//! held here, bounded in payload bytes (`--startup-buffer`), and handed to
//! the workers in arrival order once the index is open, before any live
//! batch. Past the bound, new batches are dropped and counted
//! (`kvroute_ingester_startup_dropped_batches_total`); the first dropped
//! sequence of each topic is remembered ([`EarlyBuffer::drain`] returns it),
//! so the worker treats the loss as a sequence gap: refilled from the pod's
//! replay socket where `--replay-endpoint` is set, counted as gap batches
//! otherwise. A topic that kept some batches needs no marker for that (its
//! next live batch jumps over the dropped ones), but gets one anyway: the
//! worker ignores a marker for a stream it has seen.

use crate::metrics as m;
use crate::socket::RawBatch;
use std::collections::{HashMap, VecDeque};

/// Topics whose first dropped sequence is remembered; past this, drops are
/// still counted but those topics' losses are not recognised as gaps (a
/// bound on memory against a flood of made-up topics).
pub const MAX_MARKED_TOPICS: usize = 65_536;

/// The buffer; see the module doc.
#[derive(Debug)]
pub struct EarlyBuffer {
    batches: VecDeque<RawBatch>,
    bytes: usize,
    max_bytes: usize,
    /// Topic -> the first sequence dropped from it.
    dropped_from: HashMap<String, u64>,
    dropped: u64,
}

impl EarlyBuffer {
    pub fn new(max_bytes: usize) -> Self {
        EarlyBuffer {
            batches: VecDeque::new(),
            bytes: 0,
            max_bytes,
            dropped_from: HashMap::new(),
            dropped: 0,
        }
    }

    /// What a batch costs against the bound: its payload and topic.
    fn cost(b: &RawBatch) -> usize {
        b.payload.len() + b.topic.len()
    }

    /// Holds `batch`, or drops and counts it when it would pass the bound.
    pub fn push(&mut self, batch: RawBatch) {
        let cost = Self::cost(&batch);
        if self.bytes + cost <= self.max_bytes {
            self.bytes += cost;
            self.batches.push_back(batch);
            return;
        }
        self.dropped += 1;
        metrics::counter!(m::STARTUP_DROPPED).increment(1);
        if self.dropped == 1 {
            tracing::warn!(
                max_bytes = self.max_bytes,
                held = self.batches.len(),
                "startup buffer full while the index is unreachable: dropping new batches \
                 (each topic's loss is handled as a sequence gap)"
            );
        }
        let marked = self.dropped_from.len();
        match self.dropped_from.get_mut(&batch.topic) {
            Some(from) => *from = (*from).min(batch.seq),
            None if marked < MAX_MARKED_TOPICS => {
                self.dropped_from.insert(batch.topic, batch.seq);
            }
            None => {}
        }
    }

    /// Batches held.
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Batches dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The held batches in arrival order, and per topic the first sequence
    /// that was dropped.
    pub fn drain(self) -> (VecDeque<RawBatch>, HashMap<String, u64>) {
        (self.batches, self.dropped_from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(topic: &str, seq: u64, len: usize) -> RawBatch {
        RawBatch::new(topic, seq, vec![0u8; len], "test")
    }

    #[test]
    fn holds_up_to_the_bound_then_drops_and_marks_the_first_dropped_seq() {
        let mut e = EarlyBuffer::new(2 * (10 + 3));
        e.push(b("t/a", 0, 10));
        e.push(b("t/b", 0, 10));
        e.push(b("t/a", 1, 10));
        e.push(b("t/a", 2, 1));
        e.push(b("t/c", 5, 1));
        assert_eq!(e.len(), 2);
        assert_eq!(e.dropped(), 3);
        let (held, from) = e.drain();
        let held: Vec<_> = held.iter().map(|b| (b.topic.as_str(), b.seq)).collect();
        assert_eq!(held, [("t/a", 0), ("t/b", 0)]);
        assert_eq!(from.get("t/a"), Some(&1));
        assert_eq!(from.get("t/c"), Some(&5));
        assert_eq!(from.get("t/b"), None);
    }
}
