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
//! its blocks come back as the engine stores them again (dropped batches are
//! not replayed): a missing entry only costs a cache miss, a stale one
//! misroutes.

use crate::keys::Keyer;
use crate::metrics as m;
use crate::order::{SeqTracker, SeqVerdict};
use crate::writes::{Done, WriteConfig, Writes};
use shared::events::{DecodedBatch, KvEvent, Topic, decode_batch, parse_topic_with_prefix};
use shared::ids::PodId;
use shared::index::{Index, IndexOp};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Index writes in flight at once per worker, each carrying other pods
    /// than the rest (one pod never has two: `writes.rs`).
    pub max_inflight_writes: usize,
    /// First and maximum retry delay of a failed write.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            topic_prefix: "kv".into(),
            max_pending_ops: 100_000,
            max_inflight_writes: 4,
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
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

pub struct Worker<I, R = NoReplay> {
    keyer: Keyer,
    replayer: R,
    config: WorkerConfig,
    seqs: SeqTracker,
    pods: HashMap<PodId, PodHealth>,
    /// Pending operations and the writes in flight.
    pub(crate) writes: Writes<I>,
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
        }
    }

    /// Operations not yet acknowledged by the index (pending, in flight, and
    /// the clears of shed pods).
    pub fn pending_ops(&self) -> usize {
        self.writes.unwritten()
    }

    /// Pods marked for clear-and-rebuild.
    pub fn dirty_pods(&self) -> impl Iterator<Item = &PodId> {
        self.writes.dirty_pods()
    }

    /// When the next write retry is due (None: nothing failed).
    pub fn retry_at(&self) -> Option<Instant> {
        self.writes.retry_at()
    }

    /// Index writes in flight.
    pub fn in_flight(&self) -> usize {
        self.writes.in_flight()
    }

    /// Whether to take more batches from the queue now (see `writes.rs`).
    pub fn can_accept(&self) -> bool {
        self.writes.can_accept()
    }

    /// Starts writes for the pending operations of every pod without a
    /// write in flight, as far as free write slots allow.
    pub fn launch(&mut self) {
        self.writes.launch();
    }

    /// The next write to finish (`None` at once when none is in flight).
    pub async fn next_done(&mut self) -> Option<Done> {
        self.writes.next_done().await
    }

    /// Takes a finished write's outcome; whether it succeeded.
    pub fn complete(&mut self, done: Done) -> bool {
        self.writes.complete(done)
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
            self.writes.push_ts(pod, batch.ts);
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
                self.writes.push(pod, op);
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

    /// Writes everything that can be written now and waits for it; true
    /// when nothing is left unwritten (see [`Writes::flush`]).
    pub async fn flush(&mut self) -> bool {
        self.writes.flush().await
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
            self.pods.remove(&t);
            self.writes.purge(&t);
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
        w.writes
            .index()
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
        let found = w
            .writes
            .index()
            .lookup_sync(&ModelName::new("m"), &keys, None);
        assert_eq!(found.pods.len(), 2, "{found:?}");
        w.purge(&PodId::new("127.0.0.11:8000"));
        assert!(w.flush().await);
        assert!(
            w.writes
                .index()
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
            w.writes.pending_ts.len() <= 8,
            "{} timestamps held",
            w.writes.pending_ts.len()
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
        let clears_first = matches!(
            w.writes.pending.first(),
            Some((_, IndexOp::ClearPod { .. }))
        );
        assert!(w.dirty_pods().any(|p| *p == pod) || clears_first);
        assert!(w.pending_ops() <= 3);
        let t: Vec<u32> = (90..94).collect();
        w.handle(msg(6, vec![stored(&t)], Encoding::Map)).await;
        assert!(w.flush().await);
        // The clear-and-rebuild removed what the index held before the loss.
        assert_eq!(depth(&w, &old), 0);
        assert_eq!(depth(&w, &t), 1);
    }

    /// The memory index behind a gate: each write waits for a permit, so a
    /// test decides when writes finish; writes are recorded as they start.
    struct Gated {
        inner: MemoryIndex,
        gate: tokio::sync::Semaphore,
        started: parking_lot::Mutex<Vec<Vec<IndexOp>>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Gated {
        fn new() -> Arc<Gated> {
            Arc::new(Gated {
                inner: MemoryIndex::new(10_000),
                gate: tokio::sync::Semaphore::new(0),
                started: Default::default(),
                fail: false.into(),
            })
        }
        fn pods_of_write(&self, i: usize) -> Vec<String> {
            let mut pods: Vec<String> = self.started.lock()[i]
                .iter()
                .map(|op| match op {
                    IndexOp::Store { pod, .. } | IndexOp::Remove { pod, .. } => pod.to_string(),
                    IndexOp::ClearPod { pod } => pod.to_string(),
                })
                .collect();
            pods.dedup();
            pods
        }
    }

    impl Index for Gated {
        async fn apply(&self, ops: &[IndexOp]) -> Result<(), shared::index::IndexError> {
            self.started.lock().push(ops.to_vec());
            self.gate.acquire().await.expect("gate open").forget();
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
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

    fn on_pod(mut m: Incoming, pod: &str) -> Incoming {
        m.topic = format!("kv@{pod}@m");
        m
    }

    fn removed(tokens: &[u32]) -> KvEvent {
        let keys = scheme().block_keys(tokens, ExtraKeys::NONE);
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: keys.iter().map(|k| BlockHash::U64(k.0)).collect(),
            medium: None,
        })
    }

    fn holders(index: &MemoryIndex, tokens: &[u32]) -> Vec<String> {
        let keys = scheme().block_keys(tokens, ExtraKeys::NONE);
        index
            .lookup_sync(&ModelName::new("m"), &keys[..1], None)
            .pods
            .into_iter()
            .map(|p| p.pod.to_string())
            .collect()
    }

    /// Lets the in-flight writes make progress until they wait at the gate.
    async fn settle<I: Index + 'static>(w: &mut Worker<I>) {
        for _ in 0..3 {
            let _ = tokio::time::timeout(Duration::from_millis(5), w.next_done()).await;
        }
    }

    #[tokio::test]
    async fn writes_overlap_across_pods_but_never_within_one() {
        let index = Gated::new();
        let mut w = Worker::new(
            index.clone(),
            Keyer::new(scheme(), 10_000),
            NoReplay,
            WorkerConfig::default(),
        );
        let (a, b) = ("127.0.0.11:8000", "127.0.0.12:8000");
        let t: Vec<u32> = (0..4).collect();
        let u: Vec<u32> = (50..54).collect();
        w.handle(on_pod(msg(0, vec![stored(&t)], Encoding::Map), a))
            .await;
        w.launch();
        settle(&mut w).await;
        assert_eq!(w.in_flight(), 1);
        // Pod a removes what its write in flight stores: that must wait.
        w.handle(on_pod(msg(1, vec![removed(&t)], Encoding::Map), a))
            .await;
        w.handle(on_pod(msg(0, vec![stored(&u)], Encoding::Map), b))
            .await;
        w.launch();
        settle(&mut w).await;
        assert_eq!(w.in_flight(), 2, "pod b's write runs beside pod a's");
        assert_eq!(index.started.lock().len(), 2);
        assert_eq!(index.pods_of_write(1), vec![b.to_string()]);
        assert_eq!(w.writes.pending.len(), 1, "pod a's removal waits");
        // Both finish; only then does pod a's removal go, in a write of its own.
        index.gate.add_permits(2);
        for _ in 0..2 {
            let done = w.next_done().await.expect("a write in flight");
            assert!(w.complete(done));
        }
        assert_eq!(holders(&index.inner, &t), vec![a.to_string()]);
        w.launch();
        index.gate.add_permits(1);
        let done = w.next_done().await.expect("the removal");
        assert!(w.complete(done));
        assert!(
            holders(&index.inner, &t).is_empty(),
            "store then remove ends absent"
        );
        assert_eq!(holders(&index.inner, &u), vec![b.to_string()]);
        assert_eq!(w.pending_ops(), 0);
    }

    #[tokio::test]
    async fn a_failed_write_goes_back_before_the_pods_later_operations() {
        let index = Gated::new();
        let config = WorkerConfig {
            retry_min: Duration::ZERO,
            ..WorkerConfig::default()
        };
        let mut w = Worker::new(
            index.clone(),
            Keyer::new(scheme(), 10_000),
            NoReplay,
            config,
        );
        let pod = "127.0.0.11:8000";
        let t: Vec<u32> = (0..4).collect();
        w.handle(on_pod(msg(0, vec![stored(&t)], Encoding::Map), pod))
            .await;
        w.launch();
        settle(&mut w).await;
        // The removal arrives while the store is in flight; the store fails.
        w.handle(on_pod(msg(1, vec![removed(&t)], Encoding::Map), pod))
            .await;
        index.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        index.gate.add_permits(1);
        let done = w.next_done().await.expect("in flight");
        assert!(!w.complete(done));
        assert!(w.retry_at().is_some());
        // Retried: store and removal in one write, in publication order.
        index
            .fail
            .store(false, std::sync::atomic::Ordering::Relaxed);
        index.gate.add_permits(1);
        assert!(w.flush().await);
        let retried = index.started.lock().last().cloned().expect("a retry");
        assert!(
            matches!(
                retried.as_slice(),
                [IndexOp::Store { .. }, IndexOp::Remove { .. }]
            ),
            "{retried:?}"
        );
        assert!(holders(&index.inner, &t).is_empty());
    }

    #[tokio::test]
    async fn writes_in_flight_are_bounded_and_spread_pods() {
        let index = Gated::new();
        let config = WorkerConfig {
            max_inflight_writes: 2,
            ..WorkerConfig::default()
        };
        let mut w = Worker::new(
            index.clone(),
            Keyer::new(scheme(), 10_000),
            NoReplay,
            config,
        );
        for i in 0..6u32 {
            let t: Vec<u32> = (i * 8..i * 8 + 4).collect();
            let pod = format!("127.0.0.{}:8000", 20 + i);
            w.handle(on_pod(msg(0, vec![stored(&t)], Encoding::Map), &pod))
                .await;
        }
        w.launch();
        settle(&mut w).await;
        assert_eq!(w.in_flight(), 2);
        // Six pods over two writes, three each, none in both.
        let (first, second) = (index.pods_of_write(0), index.pods_of_write(1));
        assert_eq!((first.len(), second.len()), (3, 3));
        assert!(first.iter().all(|p| !second.contains(p)));
        index.gate.add_permits(2);
        assert!(w.flush().await);
        for i in 0..6u32 {
            let t: Vec<u32> = (i * 8..i * 8 + 4).collect();
            assert_eq!(holders(&index.inner, &t).len(), 1);
        }
    }
}
