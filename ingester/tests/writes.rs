//! The ordering workers with several index writes in flight, against real
//! Redis (a single node and a local 3-master cluster) and the memory index:
//! every pod stores blocks and removes them again in the very next batch,
//! keeps some, and shares a prefix with the other pods, all dispatched as fast
//! as the queues take them so that writes overlap. Each pod's operations must
//! still apply in publication order: a block stored then removed ends absent,
//! a kept block ends present, and all three backends end identical.

use ingester::keys::Keyer;
use ingester::pipeline::Workers;
use ingester::socket::RawBatch;
use ingester::worker::{NoReplay, Worker, WorkerConfig};
use kvroute_core::events::{BlockHash, BlockRemoved, BlockStored, Encoding, EventBatch, KvEvent};
use kvroute_core::ids::{BlockKey, ModelName};
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::index::{Index, Lookup};
use kvroute_core::keys::{ExtraKeys, HashScheme, KeyScheme};
use kvroute_redis::RedisIndex;
use kvroute_testkit::redis_server::{RedisCluster, RedisServer};
use std::sync::Arc;
use std::time::Duration;

const PODS: u32 = 8;
const ROUNDS: u32 = 40;

fn scheme() -> KeyScheme {
    KeyScheme::new(HashScheme::Sha256Cbor64, "42", 4).expect("scheme")
}

fn pod(p: u32) -> String {
    format!("127.0.0.{}:8000", 20 + p)
}

/// Round `r` of pod `p`: a shared 2-block prefix plus 2 blocks of its own.
fn tokens(p: u32, r: u32) -> Vec<u32> {
    let mut t: Vec<u32> = (r * 8..r * 8 + 8).collect();
    t.extend((0..8).map(|i| 100_000 + p * 10_000 + r * 8 + i));
    t
}

/// Rounds whose blocks the pod keeps; the others are removed right away.
fn kept(r: u32) -> bool {
    r.is_multiple_of(3)
}

fn stored(tokens: &[u32]) -> KvEvent {
    let keys = scheme().block_keys(tokens, ExtraKeys::NONE);
    KvEvent::BlockStored(BlockStored {
        block_hashes: keys.iter().map(|k| BlockHash::U64(k.0)).collect(),
        token_ids: tokens.to_vec(),
        block_size: 4,
        ..Default::default()
    })
}

fn removed(tokens: &[u32]) -> KvEvent {
    let keys = scheme().block_keys(tokens, ExtraKeys::NONE);
    KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: keys.iter().map(|k| BlockHash::U64(k.0)).collect(),
        medium: None,
    })
}

/// Every pod's batches, interleaved across pods: per round a store, then
/// (unless kept) the removal of the same blocks in the next batch.
fn messages() -> Vec<RawBatch> {
    let mut seqs = vec![0u64; PODS as usize];
    let mut out = Vec::new();
    for r in 0..ROUNDS {
        for p in 0..PODS {
            let t = tokens(p, r);
            let mut batches = vec![vec![stored(&t)]];
            if !kept(r) {
                batches.push(vec![removed(&t)]);
            }
            for events in batches {
                let batch = EventBatch {
                    ts: 1.0,
                    events,
                    data_parallel_rank: None,
                };
                out.push(RawBatch {
                    topic: format!("kv@{}@m", pod(p)),
                    seq: seqs[p as usize],
                    payload: kvroute_core::events::encode_batch(&batch, Encoding::Map).into(),
                    received_at: std::time::Instant::now(),
                    source: "test".into(),
                });
                seqs[p as usize] += 1;
            }
        }
    }
    out
}

/// Runs two workers with 4 writes in flight each over `index`, then drains.
async fn ingest<I: Index + 'static>(index: Arc<I>) {
    let workers = (0..2)
        .map(|_| {
            Worker::new(
                index.clone(),
                Keyer::new(scheme(), 100_000),
                NoReplay,
                WorkerConfig {
                    max_inflight_writes: 4,
                    ..WorkerConfig::default()
                },
            )
        })
        .collect();
    let workers = Workers::start(workers, 16, Duration::from_secs(20));
    for m in messages() {
        assert!(workers.dispatch(m).await);
    }
    workers.shutdown().await;
}

async fn lookups<I: Index>(index: &I) -> Vec<Lookup> {
    let model = ModelName::new("m");
    let mut out = Vec::new();
    for r in 0..ROUNDS {
        for p in 0..PODS {
            let keys: Vec<BlockKey> = scheme().block_keys(&tokens(p, r), ExtraKeys::NONE);
            let found = index.lookup(&model, &keys, None).await.expect("lookup");
            let depth = found
                .pods
                .iter()
                .find(|x| x.pod.as_str() == pod(p))
                .map_or(0, |x| x.depth);
            // The pod's own chain: whole when kept, gone when removed (the
            // shared prefix may still be held by another pod's kept round).
            let expect = if kept(r) { 4 } else { 0 };
            assert_eq!(depth, expect, "pod {p} round {r}: {found:?}");
            out.push(found);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_then_remove_under_overlapping_writes_on_every_backend() {
    let memory = Arc::new(MemoryIndex::new(1 << 20));
    ingest(memory.clone()).await;
    let expected = lookups(memory.as_ref()).await;

    let server = RedisServer::start().expect("redis-server");
    let single = Arc::new(RedisIndex::connect(&server.url()).await.expect("connect"));
    ingest(single.clone()).await;
    assert_eq!(lookups(single.as_ref()).await, expected, "single node");

    let cluster = RedisCluster::start(3).expect("cluster");
    let clustered = Arc::new(
        RedisIndex::connect_cluster(&cluster.urls())
            .await
            .expect("connect cluster"),
    );
    ingest(clustered.clone()).await;
    assert_eq!(lookups(clustered.as_ref()).await, expected, "cluster");
}
