//! Pending prefixes: the blocks a routed request is computing on its pod
//! right now, which the index cannot know yet.
//!
//! The index learns a block only from the engine's `BlockStored`, sent when
//! the block's prefill step finished and seen by the scorer an ingest lag
//! later. A long shared prefix (a 6,000-token document, a tenant's system
//! prompt) takes a pod hundreds of milliseconds to prefill; every request
//! for the same prefix that arrives in that window would find no pod
//! holding it and be spread by load, each paying the whole prefill again on
//! another pod. Routers that learn from their own routing history (SGLang,
//! GIE's approximate scorer) do not have that hole; event-driven ones
//! (llm-d's precise scorer, Dynamo) do.
//!
//! So each decision records its prompt's block keys against the chosen
//! endpoint, and lookups merge them with the index: an endpoint's prefix is
//! the longer of what the index says and what requests routed there are
//! computing. The record lives until the request ends: by then the engine
//! has stored the prompt's blocks and (with decode time behind it) the
//! index has heard of them; while the request runs vLLM cannot evict its
//! blocks, so the record never claims what the pod does not hold. A record
//! is this replica's own routing only; other replicas learn the blocks from
//! the index.
//!
//! Memory is bounded: past `max_blocks` recorded block keys (summed over
//! the running requests' records) a decision records nothing and is
//! counted (`kvroute_scorer_pending_prefix_skipped_total`); routing is then
//! by the index alone, as without the feature.

use kvroute_core::ids::BlockKey;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// See the module doc. Keyed by the decision's charge ticket, so a
/// decision's record is released exactly once.
#[derive(Debug)]
pub struct PendingPrefixes {
    inner: Mutex<Inner>,
    max_blocks: usize,
}

/// Default `--pending-prefix-max-blocks`: 1M block keys, ~16M prompt tokens
/// in flight (e.g. 2,000 running 8k-token prompts), tens of MiB at most.
pub const DEFAULT_MAX_BLOCKS: usize = 1_000_000;

impl Default for PendingPrefixes {
    fn default() -> Self {
        PendingPrefixes::new(DEFAULT_MAX_BLOCKS)
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Model -> block key -> endpoints computing it, with how many of this
    /// replica's requests there are.
    blocks: HashMap<Arc<str>, HashMap<BlockKey, Vec<Holder>>>,
    records: HashMap<u64, Record>,
    /// Keys held by `records`, summed.
    recorded_blocks: usize,
}

#[derive(Debug)]
struct Holder {
    endpoint: Arc<str>,
    requests: u32,
}

#[derive(Debug)]
struct Record {
    model: Arc<str>,
    endpoint: Arc<str>,
    keys: Vec<BlockKey>,
}

impl PendingPrefixes {
    /// Holds at most `max_blocks` block keys across records.
    pub fn new(max_blocks: usize) -> Self {
        PendingPrefixes {
            inner: Mutex::default(),
            max_blocks,
        }
    }

    /// Records that the request of `ticket` computes `keys` (its prompt's
    /// leading blocks, in order) on `endpoint` for `model`. A ticket
    /// recorded before is replaced. Returns false when the record would
    /// exceed the bound (nothing is recorded then).
    pub fn record(&self, ticket: u64, model: &str, endpoint: &str, keys: Vec<BlockKey>) -> bool {
        if keys.is_empty() {
            return true;
        }
        let mut inner = self.inner.lock();
        inner.remove(ticket);
        if inner.recorded_blocks + keys.len() > self.max_blocks {
            return false;
        }
        inner.recorded_blocks += keys.len();
        let model: Arc<str> = match inner.blocks.get_key_value(model) {
            Some((m, _)) => m.clone(),
            None => Arc::from(model),
        };
        let endpoint: Arc<str> = Arc::from(endpoint);
        let blocks = inner.blocks.entry(model.clone()).or_default();
        for key in &keys {
            let holders = blocks.entry(*key).or_default();
            match holders.iter_mut().find(|h| h.endpoint == endpoint) {
                Some(h) => h.requests += 1,
                None => holders.push(Holder {
                    endpoint: endpoint.clone(),
                    requests: 1,
                }),
            }
        }
        inner.records.insert(
            ticket,
            Record {
                model,
                endpoint,
                keys,
            },
        );
        true
    }

    /// Forgets the record of `ticket`; an unknown or released ticket
    /// releases nothing. Returns whether a record was released.
    pub fn release(&self, ticket: u64) -> bool {
        self.inner.lock().remove(ticket)
    }

    /// Each endpoint's pending prefix of `keys` for `model`: how many
    /// leading blocks requests routed there are computing (endpoints with
    /// none are left out).
    pub fn depths(&self, model: &str, keys: &[BlockKey]) -> Vec<(Arc<str>, u32)> {
        let inner = self.inner.lock();
        let Some(blocks) = inner.blocks.get(model) else {
            return Vec::new();
        };
        let Some(first) = keys.first().and_then(|k| blocks.get(k)) else {
            return Vec::new();
        };
        let mut done: Vec<(Arc<str>, u32)> = Vec::new();
        let mut alive: Vec<Arc<str>> = first.iter().map(|h| h.endpoint.clone()).collect();
        for (i, key) in keys.iter().enumerate().skip(1) {
            let holders = blocks.get(key).map_or(&[][..], Vec::as_slice);
            alive.retain(|e| {
                let held = holders.iter().any(|h| h.endpoint == *e);
                if !held {
                    done.push((e.clone(), i as u32));
                }
                held
            });
            if alive.is_empty() {
                return done;
            }
        }
        let n = keys.len() as u32;
        done.extend(alive.into_iter().map(|e| (e, n)));
        done
    }

    /// Requests with a record (a gauge for operators).
    pub fn requests(&self) -> usize {
        self.inner.lock().records.len()
    }
}

impl Inner {
    fn remove(&mut self, ticket: u64) -> bool {
        let Some(record) = self.records.remove(&ticket) else {
            return false;
        };
        self.recorded_blocks -= record.keys.len();
        let Some(blocks) = self.blocks.get_mut(&record.model) else {
            return true;
        };
        for key in &record.keys {
            let Some(holders) = blocks.get_mut(key) else {
                continue;
            };
            if let Some(i) = holders.iter().position(|h| h.endpoint == record.endpoint) {
                holders[i].requests -= 1;
                if holders[i].requests == 0 {
                    holders.swap_remove(i);
                }
            }
            if holders.is_empty() {
                blocks.remove(key);
            }
        }
        if blocks.is_empty() {
            self.blocks.remove(&record.model);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "127.0.0.11:8000";
    const B: &str = "127.0.0.12:8000";
    const M: &str = "m";

    fn keys(r: std::ops::Range<u64>) -> Vec<BlockKey> {
        r.map(BlockKey).collect()
    }

    fn sorted(mut d: Vec<(Arc<str>, u32)>) -> Vec<(String, u32)> {
        d.sort();
        d.into_iter().map(|(e, n)| (e.to_string(), n)).collect()
    }

    #[test]
    fn depth_is_the_leading_run_per_endpoint() {
        let p = PendingPrefixes::default();
        // A computes blocks 0..10, B a prompt sharing 0..4 then diverging.
        p.record(1, M, A, keys(0..10));
        let mut b = keys(0..4);
        b.extend(keys(100..110));
        p.record(2, M, B, b);
        assert_eq!(
            sorted(p.depths(M, &keys(0..20))),
            vec![(A.to_string(), 10), (B.to_string(), 4)]
        );
        // A prompt shorter than the records matches all of itself.
        assert_eq!(
            sorted(p.depths(M, &keys(0..3))),
            vec![(A.to_string(), 3), (B.to_string(), 3)]
        );
        // Another first block, or another model: nothing pending.
        assert!(p.depths(M, &keys(50..55)).is_empty());
        assert!(p.depths("other", &keys(0..5)).is_empty());
        assert!(p.depths(M, &[]).is_empty());
    }

    #[test]
    fn release_forgets_exactly_one_request() {
        let p = PendingPrefixes::default();
        p.record(1, M, A, keys(0..8));
        p.record(2, M, A, keys(0..4));
        assert_eq!(p.requests(), 2);
        assert!(p.release(1));
        assert!(!p.release(1), "a second release is a no-op");
        assert_eq!(sorted(p.depths(M, &keys(0..8))), vec![(A.to_string(), 4)]);
        assert!(p.release(2));
        assert!(p.depths(M, &keys(0..8)).is_empty());
        assert_eq!(p.requests(), 0);
        // Nothing is left behind once every record is gone.
        assert!(p.inner.lock().blocks.is_empty());
    }

    #[test]
    fn records_past_the_bound_are_refused_until_others_end() {
        let p = PendingPrefixes::new(10);
        assert!(p.record(1, M, A, keys(0..8)));
        assert!(!p.record(2, M, B, keys(0..3)), "8 + 3 > 10");
        assert_eq!(sorted(p.depths(M, &keys(0..8))), vec![(A.to_string(), 8)]);
        assert!(p.record(3, M, B, keys(0..2)), "8 + 2 fits");
        assert!(p.release(1));
        assert!(p.record(2, M, B, keys(0..3)));
        assert_eq!(p.inner.lock().recorded_blocks, 5);
    }

    #[test]
    fn re_recording_a_ticket_replaces_it() {
        let p = PendingPrefixes::default();
        p.record(1, M, A, keys(0..8));
        p.record(1, M, B, keys(0..2));
        assert_eq!(sorted(p.depths(M, &keys(0..8))), vec![(B.to_string(), 2)]);
        assert!(p.release(1));
        assert!(p.inner.lock().blocks.is_empty());
    }
}
