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
use kvroute_core::events::{DecodedBatch, KvEvent, Topic, decode_batch};
use kvroute_core::ids::PodId;
use kvroute_core::index::{Index, IndexOp};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

mod gaps;
mod limits;
mod rebuild;
mod run;

pub use gaps::ReplayLimits;
pub use limits::{MAX_MEDIUM_LEN, MAX_MODEL_LEN, MAX_TOPIC_LEN};

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
    /// Bounds on gap replays, which run beside the worker (`worker/gaps.rs`).
    pub replay: ReplayLimits,
    /// A gap of more batches than this is implausible (`order.rs`): the
    /// batch is skipped as malformed.
    pub max_seq_gap: u64,
    /// A batch stamped further than this from the ingester's clock is
    /// skipped as malformed (`None`: not checked). A stamp of 0 means none.
    pub max_clock_skew: Option<Duration>,
    /// Streams (topic and rank) this worker tracks; past it the one idle
    /// longest is forgotten (its next batch is a first one again).
    pub max_topics: usize,
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
            replay: ReplayLimits::default(),
            max_seq_gap: u64::MAX,
            max_clock_skew: None,
            max_topics: 100_000,
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
    /// Shared with the replay futures, which run beside the worker's loop.
    replayer: Arc<R>,
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
    /// Gap replays running and the live batches their streams hold meanwhile.
    gaps: gaps::Gaps,
    /// The pipeline's shared counters (queue depth, progress), when run by
    /// [`crate::pipeline::Workers`].
    pub(crate) pulse: Option<(Arc<crate::pipeline::PipelineStats>, usize)>,
    /// When each tracked stream last published (a counter, not a clock), and
    /// its pod: bounds the per-topic state to `max_topics` (`limits.rs`).
    seen: HashMap<String, (u64, PodId)>,
    tick: u64,
    /// Topics already warned about (bounded), so a misconfigured publisher
    /// is loud once, not once per batch.
    warned_topics: HashSet<String>,
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

impl<I: Index + 'static, R: Replayer + 'static> Worker<I, R> {
    pub fn new(index: Arc<I>, keyer: Keyer, replayer: R, config: WorkerConfig) -> Self {
        Worker {
            keyer,
            replayer: Arc::new(replayer),
            gaps: gaps::Gaps::default(),
            pulse: None,
            seen: HashMap::new(),
            tick: 0,
            warned_topics: HashSet::new(),
            seqs: SeqTracker::with_max_gap(config.max_seq_gap),
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
        let Some(topic) = self.check_topic(&msg.topic) else {
            return;
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
        if let Some(skew) = self.config.max_clock_skew
            && let Some(off) = implausible_ts(batch.ts, skew)
        {
            metrics::counter!(m::MALFORMED, "reason" => "bad_timestamp").increment(1);
            tracing::warn!(topic = %msg.topic, seq = msg.seq, ts = batch.ts, off_by_s = off, "skipping a batch stamped implausibly far from now");
            return;
        }
        // Each data-parallel rank publishes its own sequence on the same topic.
        let stream = match batch.data_parallel_rank {
            Some(r) => format!("{}#{r}", msg.topic),
            None => msg.topic.clone(),
        };
        if let Some(models) = &self.config.models {
            models.note(topic.model.as_str());
        }
        let pod = topic.pod_id(batch.data_parallel_rank);
        self.track(&stream, &pod);
        self.note_stream(&pod, &topic, batch.data_parallel_rank, &stream);
        let missed_from = self.missed.remove(&msg.topic);
        self.ingest(gaps::Incoming {
            topic,
            pod,
            stream,
            seq: msg.seq,
            batch,
            missed_from,
        });
    }

    /// Sequence verdict and application of one decoded batch (live, or held
    /// while its stream's gap was being replayed). A gap (or the missed start
    /// of a restarted stream) starts a replay beside the worker when one can
    /// be asked; the batch and the stream's next ones then wait for it
    /// (`worker/gaps.rs`), so a replayed store can never resurrect a block a
    /// later event removed, and other pods never wait.
    fn ingest(&mut self, b: gaps::Incoming) {
        let Some(b) = self.hold_if_replaying(b) else {
            return;
        };
        let mut verdict = self.seqs.observe(&b.stream, b.seq);
        // A stream first seen after its earlier batches were dropped on the
        // way in (startup buffer full): they are a gap (a stream seen before
        // has its own).
        if let Some(from) = b.missed_from
            && verdict == SeqVerdict::First
            && from < b.seq
        {
            verdict = SeqVerdict::Gap {
                missed: from..b.seq,
            };
        }
        metrics::counter!(m::BATCHES, "verdict" => verdict.as_label()).increment(1);
        let b = match verdict {
            SeqVerdict::Duplicate => return,
            SeqVerdict::Restart { missed } => {
                metrics::counter!(m::RESTARTS).increment(1);
                tracing::info!(pod = %b.pod, seq = b.seq, "sequence went backwards: engine restarted, clearing its entries");
                self.writes
                    .push(&b.pod, IndexOp::ClearPod { pod: b.pod.clone() });
                if missed.is_empty() {
                    b
                } else {
                    match self.start_replay(b, missed) {
                        Some(b) => b,
                        None => return,
                    }
                }
            }
            SeqVerdict::Implausible => {
                metrics::counter!(m::MALFORMED, "reason" => "seq_jump").increment(1);
                tracing::warn!(pod = %b.pod, seq = b.seq, last = ?self.seqs.last(&b.stream), max_gap = self.config.max_seq_gap, "skipping a batch whose sequence jumps implausibly far ahead");
                return;
            }
            SeqVerdict::Resync => {
                metrics::counter!(m::RESTARTS).increment(1);
                tracing::warn!(pod = %b.pod, seq = b.seq, "the stream continues from an implausible jump: taken as a new stream, clearing the pod's entries");
                self.writes
                    .push(&b.pod, IndexOp::ClearPod { pod: b.pod.clone() });
                b
            }
            SeqVerdict::Gap { missed } => match self.start_replay(b, missed) {
                Some(b) => b,
                None => return,
            },
            SeqVerdict::First | SeqVerdict::Next => b,
        };
        self.apply_batch(&b.topic, &b.pod, b.batch, Seen::First);
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
            if !limits::medium_fits(event) {
                if !again {
                    metrics::counter!(m::MALFORMED, "reason" => "medium_too_long").increment(1);
                    tracing::debug!(%pod, "skipping an event whose medium is longer than {MAX_MEDIUM_LEN} bytes");
                }
                continue;
            }
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
            self.forget_replays(&t);
            self.rebuild.remove(&t);
            self.streams.remove(&t);
            self.pods.remove(&t);
            self.writes.purge(&t);
        }
    }
}

/// How far (in seconds) a publisher stamp `ts` lies from now, when more
/// than `skew` (or not a number); `None` for a plausible stamp or none (0).
fn implausible_ts(ts: f64, skew: Duration) -> Option<f64> {
    if ts == 0.0 {
        return None;
    }
    if !ts.is_finite() {
        return Some(f64::INFINITY);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    let off = ts - now;
    (off.abs() > skew.as_secs_f64()).then_some(off)
}

#[cfg(test)]
mod tests;
