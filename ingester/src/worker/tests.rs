//! The worker against the memory index: ordering, restarts, purges,
//! outages, and several writes in flight (behind a gate the test opens).

use super::*;
use crate::testing::{Flaky, scheme, stored};
use kvroute_core::events::{
    AllBlocksCleared, BlockHash, BlockRemoved, Encoding, EventBatch, encode_batch,
};
use kvroute_core::ids::{BlockKey, ModelName};
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::keys::ExtraKeys;

const TOPIC: &str = "kv@127.0.0.11:8000@m";

fn worker() -> Worker<MemoryIndex> {
    let index = Arc::new(MemoryIndex::new(10_000));
    Worker::new(
        index,
        Keyer::new(scheme(), 10_000),
        NoReplay,
        WorkerConfig::default(),
    )
}

fn msg(seq: u64, events: Vec<KvEvent>, encoding: Encoding) -> RawBatch {
    let batch = EventBatch {
        ts: 1.0,
        events,
        data_parallel_rank: None,
    };
    RawBatch::new(TOPIC, seq, encode_batch(&batch, encoding), "test")
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
    assert!(w.writes.flush().await);
    assert_eq!(depth(&w, &tokens), 4);
    let last = scheme().block_keys(&tokens, ExtraKeys::NONE)[2];
    let removed = KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: vec![BlockHash::U64(last.0)],
        medium: None,
    });
    w.handle(msg(1, vec![removed], Encoding::Array)).await;
    assert!(w.writes.flush().await);
    assert_eq!(depth(&w, &tokens), 2);
    w.handle(msg(
        2,
        vec![KvEvent::AllBlocksCleared(AllBlocksCleared::default())],
        Encoding::Map,
    ))
    .await;
    assert!(w.writes.flush().await);
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
    assert!(w.writes.flush().await);
    assert_eq!(depth(&w, &a), 2);
    // Back to 0: the engine restarted, its old blocks are gone.
    w.handle(msg(0, vec![stored(&b)], Encoding::Map)).await;
    assert!(w.writes.flush().await);
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
        let payload = encode_batch(&batch, Encoding::Map);
        w.handle(RawBatch::new(TOPIC, 0, payload, "test")).await;
    }
    assert!(w.writes.flush().await);
    let keys = scheme().block_keys(&tokens, ExtraKeys::NONE);
    let found = w
        .writes
        .index()
        .lookup_sync(&ModelName::new("m"), &keys, None);
    assert_eq!(found.pods.len(), 2, "{found:?}");
    w.purge(&PodId::new("127.0.0.11:8000"));
    assert!(w.writes.flush().await);
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
    w.handle(RawBatch::new(TOPIC, 0, vec![0x93, 0xc1], "test"))
        .await;
    w.handle(RawBatch::new("other@x", 0, Vec::new(), "test"))
        .await;
    assert_eq!(w.writes.unwritten(), 0);
    let tokens: Vec<u32> = (0..4).collect();
    w.handle(msg(1, vec![stored(&tokens)], Encoding::Map)).await;
    assert!(w.writes.flush().await);
    assert_eq!(depth(&w, &tokens), 1);
}

/// An index that is down: every write fails (Redis unreachable).
struct DownIndex;

impl Index for DownIndex {
    async fn apply(&self, _: &[IndexOp]) -> Result<(), kvroute_core::index::IndexError> {
        Err(kvroute_core::index::IndexError::Topology("down".into()))
    }
    async fn lookup(
        &self,
        _: &ModelName,
        _: &[BlockKey],
        _: Option<&[PodId]>,
    ) -> Result<kvroute_core::index::Lookup, kvroute_core::index::IndexError> {
        Err(kvroute_core::index::IndexError::Topology("down".into()))
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
        w.writes.flush().await;
    }
    // 8 ops plus at most the clears of the two shed pods.
    assert!(w.writes.unwritten() <= 10);
    // One publisher timestamp per batch must not pile up either.
    assert!(
        w.writes.pending_ts.len() <= 8,
        "{} timestamps held",
        w.writes.pending_ts.len()
    );
}

#[tokio::test]
async fn a_shed_pod_that_goes_quiet_is_still_cleared() {
    let index = Arc::new(Flaky::new(10_000, false));
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
    assert!(w.writes.flush().await);
    // Outage: the pod evicts the block, the removal is shed by another
    // pod's burst, and the pod then publishes nothing more.
    index.set_down(true);
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
    index.set_down(false);
    assert!(w.writes.flush().await);
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
    assert!(w.writes.flush().await);
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
    assert!(w.writes.dirty_pods().any(|p| *p == pod) || clears_first);
    assert!(w.writes.unwritten() <= 3);
    let t: Vec<u32> = (90..94).collect();
    w.handle(msg(6, vec![stored(&t)], Encoding::Map)).await;
    assert!(w.writes.flush().await);
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
    async fn apply(&self, ops: &[IndexOp]) -> Result<(), kvroute_core::index::IndexError> {
        self.started.lock().push(ops.to_vec());
        self.gate.acquire().await.expect("gate open").forget();
        if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(kvroute_core::index::IndexError::Topology("down".into()));
        }
        self.inner.apply(ops).await
    }
    async fn lookup(
        &self,
        model: &ModelName,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
    ) -> Result<kvroute_core::index::Lookup, kvroute_core::index::IndexError> {
        self.inner.lookup(model, keys, candidates).await
    }
}

fn on_pod(mut m: RawBatch, pod: &str) -> RawBatch {
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
        let _ = tokio::time::timeout(Duration::from_millis(5), w.writes.next_done()).await;
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
    w.writes.launch();
    settle(&mut w).await;
    assert_eq!(w.writes.in_flight(), 1);
    // Pod a removes what its write in flight stores: that must wait.
    w.handle(on_pod(msg(1, vec![removed(&t)], Encoding::Map), a))
        .await;
    w.handle(on_pod(msg(0, vec![stored(&u)], Encoding::Map), b))
        .await;
    w.writes.launch();
    settle(&mut w).await;
    assert_eq!(w.writes.in_flight(), 2, "pod b's write runs beside pod a's");
    assert_eq!(index.started.lock().len(), 2);
    assert_eq!(index.pods_of_write(1), vec![b.to_string()]);
    assert_eq!(w.writes.pending.len(), 1, "pod a's removal waits");
    // Both finish; only then does pod a's removal go, in a write of its own.
    index.gate.add_permits(2);
    for _ in 0..2 {
        let done = w.writes.next_done().await.expect("a write in flight");
        assert!(w.writes.complete(done));
    }
    assert_eq!(holders(&index.inner, &t), vec![a.to_string()]);
    w.writes.launch();
    index.gate.add_permits(1);
    let done = w.writes.next_done().await.expect("the removal");
    assert!(w.writes.complete(done));
    assert!(
        holders(&index.inner, &t).is_empty(),
        "store then remove ends absent"
    );
    assert_eq!(holders(&index.inner, &u), vec![b.to_string()]);
    assert_eq!(w.writes.unwritten(), 0);
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
    w.writes.launch();
    settle(&mut w).await;
    // The removal arrives while the store is in flight; the store fails.
    w.handle(on_pod(msg(1, vec![removed(&t)], Encoding::Map), pod))
        .await;
    index.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    index.gate.add_permits(1);
    let done = w.writes.next_done().await.expect("in flight");
    assert!(!w.writes.complete(done));
    assert!(w.writes.retry_at().is_some());
    // Retried: store and removal in one write, in publication order.
    index
        .fail
        .store(false, std::sync::atomic::Ordering::Relaxed);
    index.gate.add_permits(1);
    assert!(w.writes.flush().await);
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
    w.writes.launch();
    settle(&mut w).await;
    assert_eq!(w.writes.in_flight(), 2);
    // Six pods over two writes, three each, none in both.
    let (first, second) = (index.pods_of_write(0), index.pods_of_write(1));
    assert_eq!((first.len(), second.len()), (3, 3));
    assert!(first.iter().all(|p| !second.contains(p)));
    index.gate.add_permits(2);
    assert!(w.writes.flush().await);
    for i in 0..6u32 {
        let t: Vec<u32> = (i * 8..i * 8 + 4).collect();
        assert_eq!(holders(&index.inner, &t).len(), 1);
    }
}

#[tokio::test]
async fn shedding_behind_a_write_in_flight_clears_before_what_survives() {
    let index = Gated::new();
    let config = WorkerConfig {
        max_pending_ops: 8,
        ..WorkerConfig::default()
    };
    let mut w = Worker::new(
        index.clone(),
        Keyer::new(scheme(), 10_000),
        NoReplay,
        config,
    );
    let chain = |i: u32| -> Vec<u32> { (i * 8..i * 8 + 4).collect() };
    // B1's write goes in flight (Redis unreachable: it waits), then B2..B12.
    w.handle(msg(1, vec![stored(&chain(1))], Encoding::Map))
        .await;
    w.writes.launch();
    settle(&mut w).await;
    for i in 2..=12u32 {
        w.handle(msg(u64::from(i), vec![stored(&chain(i))], Encoding::Map))
            .await;
        w.writes.launch();
    }
    // B2..B10 shed (nine pending ops over the bound of 8); B is dirty, and its
    // next operations start with its clear.
    assert_eq!(w.writes.unwritten(), 4, "B1 in flight + ClearPod, B11, B12");
    assert!(matches!(
        w.writes.pending.first(),
        Some((_, IndexOp::ClearPod { .. }))
    ));
    index.gate.add_permits(10);
    assert!(w.writes.flush().await);
    for i in 1..=10u32 {
        assert!(holders(&index.inner, &chain(i)).is_empty(), "B{i}");
    }
    for i in 11..=12u32 {
        assert_eq!(holders(&index.inner, &chain(i)).len(), 1, "B{i}");
    }
}

/// 30,000 topics used to grow the worker's per-topic state without bound:
/// past `max_topics` the stream idle longest is forgotten, and a stream
/// that keeps publishing keeps its sequence (its next batch is `Next`).
#[tokio::test]
async fn tracked_topics_are_bounded_and_the_idlest_go_first() {
    let index = Arc::new(MemoryIndex::new(10_000));
    let config = WorkerConfig {
        max_topics: 8,
        ..WorkerConfig::default()
    };
    let mut w = Worker::new(index, Keyer::new(scheme(), 10_000), NoReplay, config);
    let mut seq = 0;
    for i in 0..3000u32 {
        let pod = format!("127.1.{}.{}:8000", i / 200, i % 200 + 1);
        w.handle(on_pod(msg(0, vec![], Encoding::Map), &pod)).await;
        // The busy stream publishes between every new topic.
        w.handle(msg(seq, vec![], Encoding::Map)).await;
        seq += 1;
        assert!(w.tracked_streams() <= 8);
    }
    assert_eq!(w.seqs.len(), 8, "sequence state bounded too");
    assert_eq!(w.seqs.last(TOPIC), Some(seq - 1), "the busy stream kept");
    assert!(w.pods.len() <= 8 && w.streams.len() <= 8);
}
