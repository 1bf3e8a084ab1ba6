//! Bounds on what one publisher can make a worker hold or write, and loud
//! warnings for topics that make a pod silently unindexed.
//!
//! - Streams tracked: per-topic state (sequence, stream list, hash health,
//!   and the index client's per-pod registry cache) grew with every topic
//!   ever seen (30,000 topics: +64 MB). Past `max_topics` the stream idle
//!   longest is forgotten (counted): its next batch is a first one again,
//!   which costs nothing but a missed gap check. Streams waiting for a
//!   replay, and pods waiting for a rebuild, are kept.
//! - String lengths: a topic over [`MAX_TOPIC_LEN`], a model name over
//!   [`MAX_MODEL_LEN`] (every block key and field carries it) or a medium over
//!   [`MAX_MEDIUM_LEN`] (every holder field carries it) is refused and
//!   counted, not written into Redis.
//! - Misconfiguration: vLLM's default topic is empty; a topic whose pod id
//!   has no port indexes entries no scorer candidate (`ip:port`) matches; a
//!   topic of another shape is skipped. Each is warned about once per topic
//!   (at most [`WARNED_TOPICS`] remembered, then at debug) and counted in
//!   `kvroute_ingester_topic_warnings_total{reason}` on every batch.

use super::{Replayer, Worker};
use crate::metrics as m;
use kvroute_core::events::{KvEvent, PodAddr, Topic, parse_topic_with_prefix};
use kvroute_core::ids::PodId;
use kvroute_core::index::Index;

/// Longest topic accepted (`kv@<pod>@<model>`): the pod is an address, so
/// the model makes up nearly all of it.
pub const MAX_TOPIC_LEN: usize = 512;
/// Longest model name accepted; Hugging Face ids are at most 96 characters
/// and served names are short, while every Redis key of a block repeats it.
pub const MAX_MODEL_LEN: usize = 256;
/// Longest medium (tier) accepted; vLLM's are `GPU`, `CPU` and the like,
/// and every holder field repeats it.
pub const MAX_MEDIUM_LEN: usize = 32;
/// Topics remembered as already warned about, per worker.
const WARNED_TOPICS: usize = 1024;

/// Whether every medium an event names fits [`MAX_MEDIUM_LEN`].
pub(super) fn medium_fits(event: &KvEvent) -> bool {
    let medium = match event {
        KvEvent::BlockStored(e) => e.medium.as_ref(),
        KvEvent::BlockRemoved(e) => e.medium.as_ref(),
        KvEvent::AllBlocksCleared(e) => e.medium.as_ref(),
    };
    medium.is_none_or(|t| t.as_str().len() <= MAX_MEDIUM_LEN)
}

/// At most `max` bytes of `s`, cut at a character boundary, for logs.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl<I: Index + 'static, R: Replayer + 'static> Worker<I, R> {
    /// Parses and checks a message's topic: `None` when it is skipped
    /// (counted, warned about once per topic).
    pub(super) fn check_topic(&mut self, raw: &str) -> Option<Topic> {
        if raw.len() > MAX_TOPIC_LEN {
            metrics::counter!(m::MALFORMED, "reason" => "topic_too_long").increment(1);
            self.warn_topic(
                raw,
                "too_long",
                &format!("topic longer than {MAX_TOPIC_LEN} bytes: skipped"),
            );
            return None;
        }
        let topic = match parse_topic_with_prefix(raw, &self.config.topic_prefix) {
            Ok(t) => t,
            Err(e) => {
                metrics::counter!(m::MALFORMED, "reason" => "bad_topic").increment(1);
                let (reason, hint) = if raw.is_empty() {
                    (
                        "empty",
                        "empty topic (vLLM's default): nothing from this publisher is indexed; \
                         set its kv-events topic to kv@<pod-ip>:<port>@<model>"
                            .to_owned(),
                    )
                } else {
                    (
                        "unparseable",
                        format!(
                            "topic is not {}@<pod-ip>:<port>@<model> ({e}): nothing under it is indexed",
                            self.config.topic_prefix
                        ),
                    )
                };
                self.warn_topic(raw, reason, &hint);
                return None;
            }
        };
        if topic.model.as_str().len() > MAX_MODEL_LEN {
            metrics::counter!(m::MALFORMED, "reason" => "model_too_long").increment(1);
            self.warn_topic(
                raw,
                "model_too_long",
                &format!("model name longer than {MAX_MODEL_LEN} bytes: skipped"),
            );
            return None;
        }
        if matches!(topic.addr, PodAddr::BareIp(_)) {
            self.warn_topic(
                raw,
                "no_port",
                "the topic's pod id has no port: its entries are indexed under the bare IP, \
                 which no scorer candidate (ip:port) matches; publish kv@<pod-ip>:<port>@<model>",
            );
        }
        Some(topic)
    }

    /// Counts a topic problem and warns once per topic.
    fn warn_topic(&mut self, raw: &str, reason: &'static str, hint: &str) {
        metrics::counter!(m::TOPIC_WARNINGS, "reason" => reason).increment(1);
        let shown = clip(raw, 200);
        if self.warned_topics.len() < WARNED_TOPICS && self.warned_topics.insert(shown.to_owned()) {
            tracing::warn!(topic = %shown, reason, "{hint} (warned once per topic)");
        } else {
            tracing::debug!(topic = %shown, reason, "{hint}");
        }
    }

    /// Records that `stream` (of `pod`) published; past `max_topics`
    /// forgets the stream idle longest.
    pub(super) fn track(&mut self, stream: &str, pod: &PodId) {
        self.tick += 1;
        match self.seen.get_mut(stream) {
            Some(e) => e.0 = self.tick,
            None => {
                self.seen
                    .insert(stream.to_owned(), (self.tick, pod.clone()));
                if self.seen.len() > self.config.max_topics.max(1) {
                    self.evict_idlest(stream);
                }
            }
        }
    }

    fn evict_idlest(&mut self, keep: &str) {
        let victim = self
            .seen
            .iter()
            .filter(|(s, (_, p))| {
                s.as_str() != keep && !self.gaps.is_awaiting(s) && !self.rebuild.contains(p)
            })
            .min_by_key(|(_, (t, _))| *t)
            .map(|(s, (_, p))| (s.clone(), p.clone()));
        let Some((stream, pod)) = victim else {
            return;
        };
        self.seen.remove(&stream);
        self.seqs.forget(&stream);
        if let Some(streams) = self.streams.get_mut(&pod) {
            streams.retain(|s| s.key() != stream);
            if streams.is_empty() {
                self.streams.remove(&pod);
                self.pods.remove(&pod);
                self.gaps.forget_cooldown(&pod);
            }
        }
        metrics::counter!(m::TOPICS_EVICTED).increment(1);
        tracing::debug!(%stream, "forgot the stream idle longest: more than --max-topics tracked");
    }

    /// Streams tracked (for tests and the bound).
    pub fn tracked_streams(&self) -> usize {
        self.seen.len()
    }
}
