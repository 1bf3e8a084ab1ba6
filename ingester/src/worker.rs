//! One ordering worker: every batch of a pod lands on the same worker (sharded
//! by FNV-1a of the topic), which applies them in publication order:
//!
//! decode -> sequence verdict (replay a gap, clear on restart, drop a
//! duplicate) -> keys -> pending operations -> index writes, several in
//! flight but at most one per pod (`writes.rs`: why that keeps each pod's
//! order on every backend, and what an outage does).
//!
//! Redis outages: a failed write keeps its operations and is retried on an
//! exponential backoff while batches keep arriving. Pending operations are
//! bounded; past the bound the oldest pod's operations are dropped and the pod
//! is marked for a clear-and-rebuild: the next successful write clears it
//! (before its next operations, or on its own if the pod has gone quiet), and
//! its blocks come back as the engine stores them again: a missing entry only
//! costs a cache miss, a stale one misroutes. With a replay endpoint, once
//! the clear is written the pod is also rebuilt from what its replay buffer
//! still holds ([`rebuild`]).

use crate::keys::{KeyOutcome, Keyer};
use crate::metrics as m;
use crate::order::{SeqTracker, SeqVerdict};
use crate::purge::LastHeard;
use crate::replay::ReplayError;
use crate::socket::RawBatch;
use crate::writes::{WriteConfig, Writes};
use bytes::Bytes;
use kvroute_core::events::{DecodedBatch, KvEvent, Topic, decode_batch, parse_topic_with_prefix};
use kvroute_core::ids::PodId;
use kvroute_core::index::{Index, IndexOp};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

mod rebuild;
mod run;

pub use run::Command;

/// Replayed batches: `(seq, payload)`, the payload shared with the receive
/// buffer it arrived in (not copied).
pub type ReplayedBatches = Vec<(u64, Bytes)>;

/// Fetches missed batches `from..to` of a topic; implemented over vLLM's
/// replay ROUTER by the replay module, absent when no replay endpoint is set.
pub trait Replayer: Send + Sync {
    fn fetch(
        &self,
        topic: &Topic,
        from: u64,
    ) -> impl Future<Output = Result<ReplayedBatches, ReplayError>> + Send;

    /// [`Replayer::fetch`] for one data-parallel rank's stream. vLLM runs a
    /// publisher per rank, each with its own replay socket (at the configured
    /// port + rank), so a replayer that knows where ranks live overrides this;
    /// the default asks [`Replayer::fetch`].
    fn fetch_rank(
        &self,
        topic: &Topic,
        rank: Option<u32>,
        from: u64,
    ) -> impl Future<Output = Result<ReplayedBatches, ReplayError>> + Send {
        let _ = rank;
        self.fetch(topic, from)
    }

    /// Whether a replay can be asked at all (false: no replay endpoint, so a
    /// cleared pod is not rebuilt and refills as it stores blocks again).
    fn can_replay(&self) -> bool {
        true
    }
}

/// The no-replay configuration: gaps are counted and logged.
pub struct NoReplay;

impl Replayer for NoReplay {
    async fn fetch(&self, _: &Topic, _: u64) -> Result<ReplayedBatches, ReplayError> {
        Err(ReplayError::NotConfigured)
    }

    fn can_replay(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Topic prefix before the first `@` (`kv`).
    pub topic_prefix: String,
    /// Bound on operations held while the index is unreachable.
    pub max_pending_ops: usize,
    /// Index writes in flight at once per worker, each carrying other pods
    /// than the rest (one pod never has two: `writes.rs`).
    pub max_inflight_writes: usize,
    /// First and maximum retry delay of a failed write.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Where the purge sweeper learns which pods spoke and over which socket
    /// (`None`: no purge policy). Recorded here, where the topic is parsed.
    pub heard: Option<LastHeard>,
    /// Where models indexed are noted for `kvroute:models` (`None`: no Redis).
    pub models: Option<crate::bookkeeping::ModelsSeen>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            topic_prefix: "kv".into(),
            max_pending_ops: 100_000,
            max_inflight_writes: 4,
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            heard: None,
            models: None,
        }
    }
}

impl WorkerConfig {
    fn writes(&self) -> WriteConfig {
        WriteConfig {
            max_pending_ops: self.max_pending_ops,
            max_inflight_writes: self.max_inflight_writes,
            retry_min: self.retry_min,
            retry_max: self.retry_max,
        }
    }
}

/// What the worker knows of a pod beyond its sequence.
#[derive(Debug, Default)]
struct PodHealth {
    agree: u64,
    disagree: u64,
    warned: bool,
}

/// Whether a batch is applied for the first time or re-applied by a
/// rebuild (counted once either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    First,
    Again,
}

pub struct Worker<I, R = NoReplay> {
    keyer: Keyer,
    replayer: R,
    config: WorkerConfig,
    seqs: SeqTracker,
    pods: HashMap<PodId, PodHealth>,
    /// Pending operations and the writes in flight.
    pub(crate) writes: Writes<I>,
    /// Each pod's streams (one per topic and data-parallel rank), so a shed
    /// pod can be asked for its replay buffer ([`rebuild`]).
    streams: HashMap<PodId, Vec<rebuild::Stream>>,
    /// Shed pods to rebuild from replay once their clear has been written.
    rebuild: HashSet<PodId>,
    /// Topics whose batches from this sequence on were dropped before they
    /// reached the worker (startup buffer full): the topic's first batch
    /// seen is a gap from there, not a first batch.
    missed: HashMap<String, u64>,
    /// When each pod's last rebuild from replay started ([`Worker::resync`]).
    rebuilt_at: HashMap<PodId, std::time::Instant>,
}

/// Redis lost or rewound data ([`Command::Resync`]).
#[derive(Debug, Clone, Copy)]
pub struct Resync {
    /// The last check before the loss that found the data intact.
    pub since: std::time::Instant,
    /// Whether Redis may hold removed blocks (restored from an older dump),
    /// not only miss some (restarted empty).
    pub stale_possible: bool,
}

impl<I: Index + 'static, R: Replayer> Worker<I, R> {
    pub fn new(index: Arc<I>, keyer: Keyer, replayer: R, config: WorkerConfig) -> Self {
        Worker {
            keyer,
            replayer,
            seqs: SeqTracker::default(),
            pods: HashMap::new(),
            writes: Writes::new(index, config.writes()),
            config,
            streams: HashMap::new(),
            rebuild: HashSet::new(),
            missed: HashMap::new(),
            rebuilt_at: HashMap::new(),
        }
    }

    /// Batches of `topic` from `from` on never reached the worker.
    pub fn note_missed(&mut self, topic: String, from: u64) {
        self.missed.insert(topic, from);
    }

    /// Turns one message into pending operations. The only place its topic
    /// is parsed.
    pub async fn handle(&mut self, msg: RawBatch) {
        let topic = match parse_topic_with_prefix(&msg.topic, &self.config.topic_prefix) {
            Ok(t) => t,
            Err(e) => {
                metrics::counter!(m::MALFORMED, "reason" => "bad_topic").increment(1);
                tracing::debug!(error = %e, "skipping message with a bad topic");
                return;
            }
        };
        if let Some(heard) = &self.config.heard {
            let at = tokio::time::Instant::from_std(msg.received_at);
            heard.record(&topic.pod, &msg.source, at);
        }
        let batch = match decode_batch(&msg.payload) {
            Ok(b) => b,
            Err(e) => {
                metrics::counter!(m::MALFORMED, "reason" => "bad_payload").increment(1);
                tracing::warn!(topic = %msg.topic, seq = msg.seq, error = %e, "skipping undecodable batch");
                return;
            }
        };
        // Each data-parallel rank publishes its own sequence on the same topic.
        let stream = match batch.data_parallel_rank {
            Some(r) => format!("{}#{r}", msg.topic),
            None => msg.topic.clone(),
        };
        if let Some(models) = &self.config.models {
            models.note(topic.model.as_str());
        }
        let pod = topic.pod_id(batch.data_parallel_rank);
        self.note_stream(&pod, &topic, batch.data_parallel_rank, &stream);
        let mut verdict = self.seqs.observe(&stream, msg.seq);
        // A stream first seen after its earlier batches were dropped on the
        // way in: they are a gap (a stream seen before has its own).
        if let Some(from) = self.missed.remove(&msg.topic)
            && verdict == SeqVerdict::First
            && from < msg.seq
        {
            verdict = SeqVerdict::Gap {
                missed: from..msg.seq,
            };
        }
        metrics::counter!(m::BATCHES, "verdict" => verdict.as_label()).increment(1);
        match &verdict {
            SeqVerdict::Duplicate => return,
            SeqVerdict::Restart { missed } => {
                metrics::counter!(m::RESTARTS).increment(1);
                tracing::info!(%pod, seq = msg.seq, "sequence went backwards: engine restarted, clearing its entries");
                self.writes
                    .push(&pod, IndexOp::ClearPod { pod: pod.clone() });
                if !missed.is_empty() {
                    self.fill_gap(&topic, &pod, batch.data_parallel_rank, missed.clone())
                        .await;
                }
            }
            SeqVerdict::Gap { missed } => {
                self.fill_gap(&topic, &pod, batch.data_parallel_rank, missed.clone())
                    .await;
            }
            SeqVerdict::First | SeqVerdict::Next => {}
        }
        self.apply_batch(&topic, &pod, batch, Seen::First);
    }

    /// Replays missed batches `missed` before the current one is applied, so
    /// a replayed store can never resurrect a block a later event removed.
    async fn fill_gap(
        &mut self,
        topic: &Topic,
        pod: &PodId,
        rank: Option<u32>,
        missed: std::ops::Range<u64>,
    ) {
        let count = missed.end - missed.start;
        match self.replayer.fetch_rank(topic, rank, missed.start).await {
            Ok(batches) => {
                let mut got = 0u64;
                for (seq, payload) in batches {
                    if !missed.contains(&seq) {
                        continue;
                    }
                    match decode_batch(&payload) {
                        Ok(b) if b.data_parallel_rank == rank => {
                            got += 1;
                            self.apply_batch(topic, pod, b, Seen::First);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            metrics::counter!(m::MALFORMED, "reason" => "bad_replay_payload")
                                .increment(1);
                        }
                    }
                }
                metrics::counter!(m::REPLAYS, "outcome" => "ok").increment(1);
                if got < count {
                    metrics::counter!(m::GAP_BATCHES).increment(count - got);
                    tracing::warn!(%pod, missed = count, replayed = got, "replay did not cover the whole gap");
                }
            }
            Err(e) => {
                metrics::counter!(m::REPLAYS, "outcome" => "error").increment(1);
                metrics::counter!(m::GAP_BATCHES).increment(count);
                tracing::warn!(%pod, first = missed.start, missed = count, error = %e, "sequence gap not replayed");
            }
        }
    }

    /// Keys a batch's events and queues their writes. A batch applied
    /// `Seen::Again` (a rebuild re-reading what was applied live) is not
    /// counted again in the per-event metrics, except as `rebuilt`.
    fn apply_batch(&mut self, topic: &Topic, pod: &PodId, batch: DecodedBatch, seen: Seen) {
        let again = seen == Seen::Again;
        for skip in batch.skipped.iter().filter(|_| !again) {
            metrics::counter!(m::SKIPPED, "reason" => skip.as_label()).increment(1);
        }
        if batch.ts > 0.0 {
            self.writes.push_ts(pod, batch.ts);
        }
        for event in &batch.events {
            let health = self.pods.entry(pod.clone()).or_default();
            let trust = health.agree > 0 && health.disagree == 0;
            let (op, outcome) = self.keyer.key_event(pod, &topic.model, event, trust);
            if !again {
                Self::count_keying(health, event, &outcome);
                if outcome.disagree > 0 && !health.warned {
                    health.warned = true;
                    self.warn_disagreement(pod, event);
                }
            }
            if let Some(op) = op {
                let applied = if again { "rebuilt" } else { "applied" };
                metrics::counter!(m::EVENTS, "type" => event.kind(), "outcome" => applied)
                    .increment(1);
                self.writes.push(pod, op);
            }
        }
    }

    /// What keying one event showed, counted the first time it is applied.
    fn count_keying(health: &mut PodHealth, event: &KvEvent, outcome: &KeyOutcome) {
        health.agree += outcome.agree;
        health.disagree += outcome.disagree;
        metrics::counter!(m::HASH_AGREEMENT, "agree" => "true").increment(outcome.agree);
        metrics::counter!(m::HASH_AGREEMENT, "agree" => "false").increment(outcome.disagree);
        if outcome.removals_cached > 0 {
            metrics::counter!(m::REMOVAL_RESOLUTION, "source" => "chain_cache")
                .increment(outcome.removals_cached);
        }
        if outcome.removals_uncached > 0 {
            metrics::counter!(m::REMOVAL_RESOLUTION, "source" => "index")
                .increment(outcome.removals_uncached);
        }
        if let Some((why, n)) = outcome.unkeyed {
            metrics::counter!(m::BLOCKS, "type" => event.kind(), "outcome" => why.as_label())
                .increment(n);
            metrics::counter!(m::EVENTS, "type" => event.kind(), "outcome" => "unkeyed")
                .increment(1);
        }
    }

    fn warn_disagreement(&self, pod: &PodId, event: &KvEvent) {
        let KvEvent::BlockStored(ev) = event else {
            return;
        };
        if ev.lora_name.is_some() {
            // Expected: vLLM's LoRA key includes the adapter path.
            return;
        }
        match self.keyer.diagnose(ev) {
            Some(other) => tracing::warn!(
                %pod,
                configured = %self.keyer.scheme().scheme(),
                engine_uses = %other,
                "vLLM block hashes match the other hash scheme: set --hash-scheme to what vLLM uses"
            ),
            None => tracing::warn!(
                %pod,
                scheme = %self.keyer.scheme().scheme(),
                block_size = self.keyer.scheme().block_size(),
                "vLLM block hashes differ from computed keys: if vLLM uses sha256_cbor*, check that \
                 --hash-seed equals its PYTHONHASHSEED and --block-size its block size"
            ),
        }
    }

    /// Purges a pod: drops its pending operations and clears it in the index
    /// (admin call, CLI, or the pod left the candidate set).
    ///
    /// A pod id without a rank also purges every data-parallel rank of that
    /// endpoint this worker has seen (`ip:port#dpN`): an operator purges the
    /// pod, not one of its caches.
    pub fn purge(&mut self, pod: &PodId) {
        let mut targets: Vec<PodId> = vec![pod.clone()];
        if pod.dp_rank().is_none() {
            targets.extend(
                self.pods
                    .keys()
                    .filter(|p| p.dp_rank().is_some() && p.endpoint() == pod.as_str())
                    .cloned(),
            );
        }
        for t in targets {
            self.rebuild.remove(&t);
            self.streams.remove(&t);
            self.pods.remove(&t);
            self.writes.purge(&t);
        }
    }
}

#[cfg(test)]
mod tests;
