//! One ordering worker: every batch of a pod lands on the same worker (sharded
//! by FNV-1a of the topic), which applies them in publication order:
//!
//! decode -> sequence verdict (replay a gap, clear on restart, drop a
//! duplicate) -> keys -> pending operations -> one index write per drained
//! burst of batches.
//!
//! Redis outages: a failed write keeps its operations and is retried on an
//! exponential backoff while batches keep arriving. Pending operations are
//! bounded; past the bound the oldest pod's operations are dropped and the pod
//! is marked for a clear-and-rebuild: the next successful write clears it
//! (before its next operations, or on its own if the pod has gone quiet), and
//! its blocks come back as the engine stores them again (dropped batches are
//! not replayed): a missing entry only costs a cache miss, a stale one
//! misroutes.

use crate::keys::Keyer;
use crate::metrics as m;
use crate::order::{SeqTracker, SeqVerdict};
use shared::events::{DecodedBatch, KvEvent, Topic, decode_batch, parse_topic_with_prefix};
use shared::ids::PodId;
use shared::index::{Index, IndexOp};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A message as the sockets deliver it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub seq: u64,
    pub payload: bytes::Bytes,
}

/// Fetches missed batches `from..to` of a topic; implemented over vLLM's
/// replay ROUTER by the replay module, absent when no replay endpoint is set.
pub trait Replayer: Send + Sync {
    fn fetch(
        &self,
        topic: &Topic,
        from: u64,
    ) -> impl Future<Output = Result<Vec<(u64, Vec<u8>)>, String>> + Send;

    /// [`Replayer::fetch`] for one data-parallel rank's stream. vLLM runs a
    /// publisher per rank, each with its own replay socket (at the configured
    /// port + rank), so a replayer that knows where ranks live overrides this;
    /// the default asks [`Replayer::fetch`].
    fn fetch_rank(
        &self,
        topic: &Topic,
        rank: Option<u32>,
        from: u64,
    ) -> impl Future<Output = Result<Vec<(u64, Vec<u8>)>, String>> + Send {
        let _ = rank;
        self.fetch(topic, from)
    }
}

/// The no-replay configuration: gaps are counted and logged.
pub struct NoReplay;

impl Replayer for NoReplay {
    async fn fetch(&self, _: &Topic, _: u64) -> Result<Vec<(u64, Vec<u8>)>, String> {
        Err("no replay endpoint configured".into())
    }
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Topic prefix before the first `@` (`kv`).
    pub topic_prefix: String,
    /// Bound on operations held while the index is unreachable.
    pub max_pending_ops: usize,
    /// First and maximum retry delay of a failed write.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            topic_prefix: "kv".into(),
            max_pending_ops: 100_000,
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
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

pub struct Worker<I, R = NoReplay> {
    index: Arc<I>,
    keyer: Keyer,
    replayer: R,
    config: WorkerConfig,
    seqs: SeqTracker,
    pods: HashMap<PodId, PodHealth>,
    /// Operations not yet written, in order, with the pod each belongs to.
    pending: Vec<(PodId, IndexOp)>,
    /// Publisher timestamps of the batches in `pending`: their lag to
    /// "applied" is recorded when the write succeeds. Capped at
    /// `max_pending_ops` (oldest dropped) like the ops themselves, so a long
    /// outage cannot grow it; a dropped sample only thins the lag histogram.
    pending_ts: VecDeque<f64>,
    /// Pods whose operations were dropped: cleared before their next write.
    dirty: HashSet<PodId>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

impl<I: Index, R: Replayer> Worker<I, R> {
    pub fn new(index: Arc<I>, keyer: Keyer, replayer: R, config: WorkerConfig) -> Self {
        let retry_delay = config.retry_min;
        Worker {
            index,
            keyer,
            replayer,
            config,
            seqs: SeqTracker::default(),
            pods: HashMap::new(),
            pending: Vec::new(),
            pending_ts: VecDeque::new(),
            dirty: HashSet::new(),
            retry_at: None,
            retry_delay,
        }
    }

    /// Operations waiting for the index, the clears of shed pods included.
    pub fn pending_ops(&self) -> usize {
        self.pending.len() + self.dirty.len()
    }

    /// Pods marked for clear-and-rebuild.
    pub fn dirty_pods(&self) -> impl Iterator<Item = &PodId> {
        self.dirty.iter()
    }

    /// When the next write retry is due (None: nothing failed).
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Turns one message into pending operations.
    pub async fn handle(&mut self, msg: Incoming) {
        let topic = match parse_topic_with_prefix(&msg.topic, &self.config.topic_prefix) {
            Ok(t) => t,
            Err(e) => {
                metrics::counter!(m::MALFORMED, "reason" => "bad_topic").increment(1);
                tracing::debug!(error = %e, "skipping message with a bad topic");
                return;
            }
        };
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
        let pod = topic.pod_id(batch.data_parallel_rank);
        let verdict = self.seqs.observe(&stream, msg.seq);
        metrics::counter!(m::BATCHES, "verdict" => verdict.as_label()).increment(1);
        match &verdict {
            SeqVerdict::Duplicate => return,
            SeqVerdict::Restart { missed } => {
                metrics::counter!(m::RESTARTS).increment(1);
                tracing::info!(%pod, seq = msg.seq, "sequence went backwards: engine restarted, clearing its entries");
                self.push(&pod, IndexOp::ClearPod { pod: pod.clone() });
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
        self.apply_batch(&topic, &pod, batch);
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
                            self.apply_batch(topic, pod, b);
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

    fn apply_batch(&mut self, topic: &Topic, pod: &PodId, batch: DecodedBatch) {
        for skip in &batch.skipped {
            metrics::counter!(m::SKIPPED, "reason" => skip.as_label()).increment(1);
        }
        if batch.ts > 0.0 {
            if self.pending_ts.len() >= self.config.max_pending_ops.max(1) {
                self.pending_ts.pop_front();
            }
            self.pending_ts.push_back(batch.ts);
        }
        for event in &batch.events {
            let health = self.pods.entry(pod.clone()).or_default();
            let trust = health.agree > 0 && health.disagree == 0;
            let (op, outcome) = self.keyer.key_event(pod, &topic.model, event, trust);
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
            if outcome.disagree > 0 && !health.warned {
                health.warned = true;
                self.warn_disagreement(pod, event);
            }
            if let Some((why, n)) = outcome.unkeyed {
                metrics::counter!(m::BLOCKS, "type" => event.kind(), "outcome" => why.as_label())
                    .increment(n);
                metrics::counter!(m::EVENTS, "type" => event.kind(), "outcome" => "unkeyed")
                    .increment(1);
            }
            if let Some(op) = op {
                metrics::counter!(m::EVENTS, "type" => event.kind(), "outcome" => "applied")
                    .increment(1);
                self.push(pod, op);
            }
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

    fn push(&mut self, pod: &PodId, op: IndexOp) {
        if self.dirty.remove(pod) {
            // First write after a loss: clear before anything else applies.
            self.pending
                .push((pod.clone(), IndexOp::ClearPod { pod: pod.clone() }));
        }
        self.pending.push((pod.clone(), op));
        if self.pending.len() > self.config.max_pending_ops {
            self.shed();
        }
        metrics::gauge!(m::PENDING_OPS).set(self.pending.len() as f64);
    }

    /// Drops every pending operation of the pod with the oldest one and marks
    /// it for clear-and-rebuild.
    fn shed(&mut self) {
        let Some((victim, _)) = self.pending.first().cloned() else {
            return;
        };
        let before = self.pending.len();
        self.pending.retain(|(p, _)| *p != victim);
        metrics::counter!(m::DROPPED_OPS).increment((before - self.pending.len()) as u64);
        tracing::warn!(pod = %victim, dropped = before - self.pending.len(), "index unreachable too long: pod marked for clear-and-rebuild");
        self.dirty.insert(victim);
    }

    /// Writes pending operations in one call. On failure they stay pending
    /// and the next attempt waits for the backoff (see [`Worker::retry_at`]).
    pub async fn flush(&mut self) -> bool {
        if self.pending.is_empty() && self.dirty.is_empty() {
            self.pending_ts.clear();
            return true;
        }
        if let Some(at) = self.retry_at
            && Instant::now() < at
        {
            return false;
        }
        let mut ops: Vec<IndexOp> = self.pending.iter().map(|(_, op)| op.clone()).collect();
        // Shed pods still marked have had no operation since (the next one
        // would have taken the mark): clear them now, or what they removed
        // in the dropped operations would outlive their cache for as long as
        // they stay quiet. No pending op of theirs, so the order is free.
        ops.extend(
            self.dirty
                .iter()
                .map(|p| IndexOp::ClearPod { pod: p.clone() }),
        );
        let start = Instant::now();
        let result = self.index.apply(&ops).await;
        metrics::histogram!(m::WRITE_SECONDS).record(start.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                metrics::counter!(m::WRITES, "outcome" => "ok").increment(1);
                self.pending.clear();
                self.dirty.clear();
                if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
                    let now = now.as_secs_f64();
                    for ts in self.pending_ts.drain(..) {
                        metrics::histogram!(m::LAG_SECONDS).record((now - ts).max(0.0));
                    }
                }
                self.retry_at = None;
                self.retry_delay = self.config.retry_min;
                metrics::gauge!(m::PENDING_OPS).set(0.0);
                true
            }
            Err(e) => {
                metrics::counter!(m::WRITES, "outcome" => "error").increment(1);
                tracing::warn!(error = %e, pending = self.pending.len(), retry_in = ?self.retry_delay, "index write failed");
                self.retry_at = Some(Instant::now() + self.retry_delay);
                self.retry_delay = (self.retry_delay * 2).min(self.config.retry_max);
                false
            }
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
            self.pending.retain(|(p, _)| *p != t);
            self.dirty.remove(&t);
            self.pods.remove(&t);
            self.pending.push((t.clone(), IndexOp::ClearPod { pod: t }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::events::{
        AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, Encoding, EventBatch, encode_batch,
    };
    use shared::ids::{BlockKey, ModelName};
    use shared::index::memory::MemoryIndex;
    use shared::keys::{ExtraKeys, HashScheme, KeyScheme};

    const TOPIC: &str = "kv@127.0.0.11:8000@m";

    fn scheme() -> KeyScheme {
        KeyScheme::new(HashScheme::Sha256Cbor64, "42", 4).expect("scheme")
    }

    fn worker() -> Worker<MemoryIndex> {
        let index = Arc::new(MemoryIndex::new(10_000));
        Worker::new(
            index,
            Keyer::new(scheme(), 10_000),
            NoReplay,
            WorkerConfig::default(),
        )
    }

    /// A store of `tokens` (full blocks) from the root, hashed as vLLM would.
    fn stored(tokens: &[u32]) -> KvEvent {
        let keys = scheme().block_keys(tokens, ExtraKeys::NONE);
        KvEvent::BlockStored(BlockStored {
            block_hashes: keys.iter().map(|k| BlockHash::U64(k.0)).collect(),
            token_ids: tokens.to_vec(),
            block_size: 4,
            ..Default::default()
        })
    }

    fn msg(seq: u64, events: Vec<KvEvent>, encoding: Encoding) -> Incoming {
        let batch = EventBatch {
            ts: 1.0,
            events,
            data_parallel_rank: None,
        };
        Incoming {
            topic: TOPIC.into(),
            seq,
            payload: encode_batch(&batch, encoding).into(),
        }
    }

    fn depth(w: &Worker<MemoryIndex>, tokens: &[u32]) -> u32 {
        let keys: Vec<BlockKey> = scheme().block_keys(tokens, ExtraKeys::NONE);
        w.index
            .lookup_sync(&ModelName::new("m"), &keys, None)
            .max_depth()
    }

    #[tokio::test]
    async fn applies_stores_removals_and_clears_in_order() {
        let mut w = worker();
        let tokens: Vec<u32> = (0..16).collect();
        w.handle(msg(0, vec![stored(&tokens)], Encoding::Map)).await;
        assert!(w.flush().await);
        assert_eq!(depth(&w, &tokens), 4);
        let last = scheme().block_keys(&tokens, ExtraKeys::NONE)[2];
        let removed = KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![BlockHash::U64(last.0)],
            medium: None,
        });
        w.handle(msg(1, vec![removed], Encoding::Array)).await;
        assert!(w.flush().await);
        assert_eq!(depth(&w, &tokens), 2);
        w.handle(msg(
            2,
            vec![KvEvent::AllBlocksCleared(AllBlocksCleared::default())],
            Encoding::Map,
        ))
        .await;
        assert!(w.flush().await);
        assert_eq!(depth(&w, &tokens), 0);
    }

    #[tokio::test]
    async fn restart_clears_before_new_events_and_duplicates_are_dropped() {
        let mut w = worker();
        let a: Vec<u32> = (0..8).collect();
        let b: Vec<u32> = (100..108).collect();
        w.handle(msg(5, vec![stored(&a)], Encoding::Map)).await;
        w.handle(msg(6, vec![], Encoding::Map)).await;
        // A duplicate of seq 6 carrying a clear must not apply.
        let dup = KvEvent::AllBlocksCleared(AllBlocksCleared::default());
        w.handle(msg(6, vec![dup], Encoding::Map)).await;
        assert!(w.flush().await);
        assert_eq!(depth(&w, &a), 2);
        // Back to 0: the engine restarted, its old blocks are gone.
        w.handle(msg(0, vec![stored(&b)], Encoding::Map)).await;
        assert!(w.flush().await);
        assert_eq!(depth(&w, &a), 0);
        assert_eq!(depth(&w, &b), 2);
    }

    #[tokio::test]
    async fn purge_clears_every_data_parallel_rank_of_the_endpoint() {
        let mut w = worker();
        let tokens: Vec<u32> = (0..8).collect();
        for rank in [0u32, 1] {
            let batch = EventBatch {
                ts: 1.0,
                events: vec![stored(&tokens)],
                data_parallel_rank: Some(rank),
            };
            w.handle(Incoming {
                topic: TOPIC.into(),
                seq: 0,
                payload: encode_batch(&batch, Encoding::Map).into(),
            })
            .await;
        }
        assert!(w.flush().await);
        let keys = scheme().block_keys(&tokens, ExtraKeys::NONE);
        let found = w.index.lookup_sync(&ModelName::new("m"), &keys, None);
        assert_eq!(found.pods.len(), 2, "{found:?}");
        w.purge(&PodId::new("127.0.0.11:8000"));
        assert!(w.flush().await);
        assert!(
            w.index
                .lookup_sync(&ModelName::new("m"), &keys, None)
                .pods
                .is_empty()
        );
    }

    #[tokio::test]
    async fn malformed_payloads_and_topics_are_skipped() {
        let mut w = worker();
        w.handle(Incoming {
            topic: TOPIC.into(),
            seq: 0,
            payload: vec![0x93, 0xc1].into(),
        })
        .await;
        w.handle(Incoming {
            topic: "other@x".into(),
            seq: 0,
            payload: Default::default(),
        })
        .await;
        assert_eq!(w.pending_ops(), 0);
        let tokens: Vec<u32> = (0..4).collect();
        w.handle(msg(1, vec![stored(&tokens)], Encoding::Map)).await;
        assert!(w.flush().await);
        assert_eq!(depth(&w, &tokens), 1);
    }

    /// An index that is down: every write fails (Redis unreachable).
    struct DownIndex;

    impl Index for DownIndex {
        async fn apply(&self, _: &[IndexOp]) -> Result<(), shared::index::IndexError> {
            Err(shared::index::IndexError::Topology("down".into()))
        }
        async fn lookup(
            &self,
            _: &ModelName,
            _: &[BlockKey],
            _: Option<&[PodId]>,
        ) -> Result<shared::index::Lookup, shared::index::IndexError> {
            Err(shared::index::IndexError::Topology("down".into()))
        }
    }

    #[tokio::test]
    async fn a_long_outage_holds_bounded_state() {
        let config = WorkerConfig {
            max_pending_ops: 8,
            ..WorkerConfig::default()
        };
        let mut w = Worker::new(
            Arc::new(DownIndex),
            Keyer::new(scheme(), 10_000),
            NoReplay,
            config,
        );
        // Two pods interleaved: shedding one never empties the pending ops.
        for i in 0..1000u32 {
            let t: Vec<u32> = (i * 4..i * 4 + 4).collect();
            let mut m = msg(u64::from(i / 2), vec![stored(&t)], Encoding::Map);
            if i % 2 == 1 {
                m.topic = "kv@127.0.0.12:8000@m".into();
            }
            w.handle(m).await;
            w.flush().await;
        }
        // 8 ops plus at most the clears of the two shed pods.
        assert!(w.pending_ops() <= 10);
        // One publisher timestamp per batch must not pile up either.
        assert!(
            w.pending_ts.len() <= 8,
            "{} timestamps held",
            w.pending_ts.len()
        );
    }

    /// The memory index behind a switch: while `down`, writes fail.
    struct Flaky {
        inner: MemoryIndex,
        down: std::sync::atomic::AtomicBool,
    }

    impl Index for Flaky {
        async fn apply(&self, ops: &[IndexOp]) -> Result<(), shared::index::IndexError> {
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(shared::index::IndexError::Topology("down".into()));
            }
            self.inner.apply(ops).await
        }
        async fn lookup(
            &self,
            model: &ModelName,
            keys: &[BlockKey],
            candidates: Option<&[PodId]>,
        ) -> Result<shared::index::Lookup, shared::index::IndexError> {
            self.inner.lookup(model, keys, candidates).await
        }
    }

    #[tokio::test]
    async fn a_shed_pod_that_goes_quiet_is_still_cleared() {
        let index = Arc::new(Flaky {
            inner: MemoryIndex::new(10_000),
            down: false.into(),
        });
        let config = WorkerConfig {
            max_pending_ops: 3,
            retry_min: Duration::ZERO,
            ..WorkerConfig::default()
        };
        let mut w = Worker::new(
            index.clone(),
            Keyer::new(scheme(), 10_000),
            NoReplay,
            config,
        );
        let held: Vec<u32> = (0..4).collect();
        w.handle(msg(0, vec![stored(&held)], Encoding::Map)).await;
        assert!(w.flush().await);
        // Outage: the pod evicts the block, the removal is shed by another
        // pod's burst, and the pod then publishes nothing more.
        index.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let key = scheme().block_keys(&held, ExtraKeys::NONE)[0];
        let removed = KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![BlockHash::U64(key.0)],
            medium: None,
        });
        w.handle(msg(1, vec![removed], Encoding::Map)).await;
        for i in 0..4u32 {
            let t: Vec<u32> = (100 + i * 4..104 + i * 4).collect();
            let mut m = msg(u64::from(i), vec![stored(&t)], Encoding::Map);
            m.topic = "kv@127.0.0.12:8000@m".into();
            w.handle(m).await;
        }
        index
            .down
            .store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(w.flush().await);
        let found = index.inner.lookup_sync(&ModelName::new("m"), &[key], None);
        assert!(
            found
                .pods
                .iter()
                .all(|p| p.pod.as_str() != "127.0.0.11:8000"),
            "a block the pod evicted outlives the outage: {found:?}"
        );
    }

    #[tokio::test]
    async fn overflow_sheds_oldest_pod_and_clears_it_on_next_write() {
        let index = Arc::new(MemoryIndex::new(10_000));
        let config = WorkerConfig {
            max_pending_ops: 3,
            ..WorkerConfig::default()
        };
        let mut w = Worker::new(index, Keyer::new(scheme(), 10_000), NoReplay, config);
        let pod = PodId::new("127.0.0.11:8000");
        // Seed the index with a block of the pod, as before an outage.
        let old: Vec<u32> = (500..504).collect();
        w.handle(msg(0, vec![stored(&old)], Encoding::Map)).await;
        assert!(w.flush().await);
        // Five pending ops (no flush: as if the index were down) exceed the bound.
        for i in 1..=5u32 {
            let t: Vec<u32> = (i * 10..i * 10 + 4).collect();
            w.handle(msg(u64::from(i), vec![stored(&t)], Encoding::Map))
                .await;
        }
        // Either still marked, or its next operations already start with the clear.
        let clears_first = matches!(w.pending.first(), Some((_, IndexOp::ClearPod { .. })));
        assert!(w.dirty_pods().any(|p| *p == pod) || clears_first);
        assert!(w.pending_ops() <= 3);
        let t: Vec<u32> = (90..94).collect();
        w.handle(msg(6, vec![stored(&t)], Encoding::Map)).await;
        assert!(w.flush().await);
        // The clear-and-rebuild removed what the index held before the loss.
        assert_eq!(depth(&w, &old), 0);
        assert_eq!(depth(&w, &t), 1);
    }
}
