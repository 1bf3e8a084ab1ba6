//! Backend equivalence: random op sequences, applied in random-size batches
//! to the memory index, a single-node Redis index and a 3-master Redis
//! Cluster index, must produce identical lookups; and clearing every pod must
//! leave no block, engine mapping or per-slot bookkeeping behind.
//!
//! Domain: 2 models, 4 pods (one with a data-parallel rank), tiers gpu/cpu,
//! 24 keys. Each key has one engine hash for the whole case (as a real
//! engine would): the key itself (published as `None` or as `Some(key)`) or
//! a value outside the key range. Engine hashes never collide with other
//! keys: the Redis backend resolves removes by engine hash at segment start
//! (plus the segment's own stores), which only differs from the memory
//! backend's op-by-op resolution when an engine hash equals another block's
//! key (see `index/redis/apply.rs`).

use kvroute_core::ids::{BlockKey, EngineHash, ModelName, PodId, Tier};
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::index::{BlockRef, Index, IndexOp, Lookup, StoredBlock};
use kvroute_redis::RedisIndex;
use kvroute_testkit::redis_server::{RedisCluster, RedisServer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use redis::AsyncCommands;

const KEYS: u64 = 24;
/// Engine hashes that differ from their key live above this offset.
const ENGINE_OFFSET: u64 = 1_000_000;

fn models() -> [ModelName; 2] {
    [ModelName::new("m-alpha"), ModelName::new("org/m-beta")]
}
fn pods() -> [PodId; 4] {
    [
        PodId::new("127.0.0.11:8000"),
        PodId::new("127.0.0.12:8000"),
        PodId::with_rank("127.0.0.13:8000", Some(1)),
        PodId::new("127.0.0.14:8000"),
    ]
}
fn tiers() -> [Tier; 2] {
    [Tier::gpu(), Tier::cpu()]
}

#[derive(Debug, Clone)]
enum GenOp {
    Store {
        model: usize,
        pod: usize,
        tier: usize,
        keys: Vec<u64>,
    },
    /// `(key, by engine hash?)`
    Remove {
        model: usize,
        pod: usize,
        tier: usize,
        keys: Vec<(u64, bool)>,
    },
    Clear {
        pod: usize,
    },
}

#[derive(Debug, Clone)]
enum Query {
    /// A prefix of the chain of the `n`-th Store (mod their count).
    StoredPrefix {
        n: usize,
        len: usize,
    },
    Random {
        model: usize,
        keys: Vec<u64>,
    },
}

#[derive(Debug, Clone)]
struct Case {
    /// Per key (index k-1): does its engine hash differ from it?
    differs: Vec<bool>,
    /// Per key whose engine hash equals it: published as `None` (else `Some(key)`).
    silent: Vec<bool>,
    ops: Vec<GenOp>,
    batch_sizes: Vec<usize>,
    /// Each query with its candidate filter: `None` = all pods, else a bitmask
    /// over the 4 pods plus a pod unknown to the index.
    queries: Vec<(Query, Option<u8>)>,
}

fn chain() -> impl Strategy<Value = Vec<u64>> {
    proptest::sample::subsequence((1..=KEYS).collect::<Vec<_>>(), 1..8).prop_shuffle()
}

fn op() -> impl Strategy<Value = GenOp> {
    prop_oneof![
        6 => (0..2usize, 0..4usize, 0..2usize, chain())
            .prop_map(|(model, pod, tier, keys)| GenOp::Store { model, pod, tier, keys }),
        3 => (0..2usize, 0..4usize, 0..2usize, chain(), proptest::collection::vec(any::<bool>(), 8))
            .prop_map(|(model, pod, tier, keys, by_engine)| GenOp::Remove {
                model,
                pod,
                tier,
                keys: keys.into_iter().zip(by_engine).collect(),
            }),
        1 => (0..4usize).prop_map(|pod| GenOp::Clear { pod }),
    ]
}

fn query() -> impl Strategy<Value = (Query, Option<u8>)> {
    let q = prop_oneof![
        3 => (any::<usize>(), 1..9usize).prop_map(|(n, len)| Query::StoredPrefix { n, len }),
        1 => (0..2usize, chain()).prop_map(|(model, keys)| Query::Random { model, keys }),
    ];
    (q, proptest::option::of(0u8..32))
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(any::<bool>(), KEYS as usize),
        proptest::collection::vec(any::<bool>(), KEYS as usize),
        proptest::collection::vec(op(), 1..30),
        proptest::collection::vec(1..6usize, 1..8),
        proptest::collection::vec(query(), 10),
    )
        .prop_map(|(differs, silent, ops, batch_sizes, queries)| Case {
            differs,
            silent,
            ops,
            batch_sizes,
            queries,
        })
}

impl Case {
    fn engine_of(&self, key: u64) -> u64 {
        if self.differs[(key - 1) as usize] {
            key + ENGINE_OFFSET
        } else {
            key
        }
    }

    fn to_op(&self, op: &GenOp) -> IndexOp {
        match op {
            GenOp::Store {
                model,
                pod,
                tier,
                keys,
            } => IndexOp::Store {
                model: models()[*model].clone(),
                pod: pods()[*pod].clone(),
                tier: tiers()[*tier].clone(),
                blocks: keys
                    .iter()
                    .map(|&k| {
                        let e = self.engine_of(k);
                        let silent = e == k && self.silent[(k - 1) as usize];
                        StoredBlock {
                            key: BlockKey(k),
                            engine: (!silent).then_some(EngineHash(e)),
                        }
                    })
                    .collect(),
            },
            GenOp::Remove {
                model,
                pod,
                tier,
                keys,
            } => IndexOp::Remove {
                model: models()[*model].clone(),
                pod: pods()[*pod].clone(),
                tier: tiers()[*tier].clone(),
                blocks: keys
                    .iter()
                    .map(|&(k, by_engine)| {
                        if by_engine {
                            BlockRef::Engine(EngineHash(self.engine_of(k)))
                        } else {
                            BlockRef::Key(BlockKey(k))
                        }
                    })
                    .collect(),
            },
            GenOp::Clear { pod } => IndexOp::ClearPod {
                pod: pods()[*pod].clone(),
            },
        }
    }

    fn batches(&self) -> Vec<Vec<IndexOp>> {
        let ops: Vec<IndexOp> = self.ops.iter().map(|o| self.to_op(o)).collect();
        let mut out = Vec::new();
        let mut rest = ops.as_slice();
        for size in self.batch_sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = (*size).min(rest.len());
            out.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        out
    }

    fn resolve(&self, q: &Query) -> (ModelName, Vec<BlockKey>) {
        let stores: Vec<(usize, &Vec<u64>)> = self
            .ops
            .iter()
            .filter_map(|o| match o {
                GenOp::Store { model, keys, .. } => Some((*model, keys)),
                _ => None,
            })
            .collect();
        match q {
            Query::StoredPrefix { n, len } if !stores.is_empty() => {
                let (model, keys) = stores[n % stores.len()];
                let keys = keys.iter().take(*len).map(|&k| BlockKey(k)).collect();
                (models()[model].clone(), keys)
            }
            Query::StoredPrefix { len, .. } => (
                models()[0].clone(),
                (1..=*len as u64).map(BlockKey).collect(),
            ),
            Query::Random { model, keys } => (
                models()[*model].clone(),
                keys.iter().map(|&k| BlockKey(k)).collect(),
            ),
        }
    }
}

fn candidates(mask: Option<u8>) -> Option<Vec<PodId>> {
    let mask = mask?;
    let mut out: Vec<PodId> = pods()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, p)| p)
        .collect();
    if mask & 16 != 0 {
        out.push(PodId::new("127.0.0.99:8000"));
    }
    Some(out)
}

/// Plain connections to every master, for FLUSHALL and SCAN.
struct Masters(Vec<redis::aio::MultiplexedConnection>);

impl Masters {
    async fn connect(urls: &[String]) -> Masters {
        let mut conns = Vec::new();
        for url in urls {
            let client = redis::Client::open(url.as_str()).unwrap();
            conns.push(client.get_multiplexed_async_connection().await.unwrap());
        }
        Masters(conns)
    }

    /// FLUSHALL behind the index's back: its registration cache goes stale,
    /// which exercises the fresh-entry re-registration of every store.
    async fn flush(&self) {
        for c in &self.0 {
            let _: () = redis::cmd("FLUSHALL")
                .query_async(&mut c.clone())
                .await
                .unwrap();
        }
    }

    async fn scan(&self, pattern: &str) -> Vec<String> {
        let mut found = Vec::new();
        for c in &self.0 {
            let mut c = c.clone();
            let mut iter = c.scan_match::<_, String>(pattern).await.unwrap();
            while let Some(k) = futures::StreamExt::next(&mut iter).await {
                found.push(k.unwrap());
            }
        }
        found
    }
}

struct Backends {
    single: RedisIndex,
    cluster: RedisIndex,
    single_masters: Masters,
    cluster_masters: Masters,
}

async fn run_case(b: &Backends, case: &Case) -> Result<(), TestCaseError> {
    b.single_masters.flush().await;
    b.cluster_masters.flush().await;
    let memory = MemoryIndex::new(1 << 20);
    for batch in case.batches() {
        memory.apply(&batch).await.unwrap();
        b.single
            .apply(&batch)
            .await
            .map_err(|e| TestCaseError::fail(format!("single: {e}")))?;
        b.cluster
            .apply(&batch)
            .await
            .map_err(|e| TestCaseError::fail(format!("cluster: {e}")))?;
    }
    for (q, mask) in &case.queries {
        let (model, keys) = case.resolve(q);
        let cands = candidates(*mask);
        let c = cands.as_deref();
        let expected: Lookup = memory.lookup(&model, &keys, c).await.unwrap();
        let single = b
            .single
            .lookup(&model, &keys, c)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let cluster = b
            .cluster
            .lookup(&model, &keys, c)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            &single,
            &expected,
            "single node, query {:?} candidates {:?}",
            keys,
            c
        );
        prop_assert_eq!(
            &cluster,
            &expected,
            "cluster, query {:?} candidates {:?}",
            keys,
            c
        );
    }
    let clear: Vec<IndexOp> = pods()
        .into_iter()
        .map(|pod| IndexOp::ClearPod { pod })
        .collect();
    b.single
        .apply(&clear)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    b.cluster
        .apply(&clear)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for masters in [&b.single_masters, &b.cluster_masters] {
        for model in models() {
            let left = masters.scan(&format!("{model}@*")).await;
            prop_assert!(
                left.is_empty(),
                "blocks left after clearing every pod: {:?}",
                left
            );
        }
        let engines = masters.scan("engine:*").await;
        prop_assert!(engines.is_empty(), "engine mappings left: {:?}", engines);
        let bookkeeping = masters.scan("kvroute:{*").await;
        prop_assert!(
            bookkeeping.is_empty(),
            "per-slot bookkeeping left: {:?}",
            bookkeeping
        );
    }
    Ok(())
}

#[test]
fn memory_single_node_and_cluster_agree() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = RedisServer::start().unwrap();
    let cluster = RedisCluster::start(3).unwrap();
    let backends = rt.block_on(async {
        Backends {
            single: RedisIndex::connect(&server.url()).await.unwrap(),
            cluster: RedisIndex::connect_cluster(&cluster.urls()).await.unwrap(),
            single_masters: Masters::connect(&[server.url()]).await,
            cluster_masters: Masters::connect(&cluster.urls()).await,
        }
    });
    let config = Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |case| rt.block_on(run_case(&backends, &case)));
    if let Err(e) = result {
        panic!("{e}");
    }
    // The stores of the cases ran against stale registration caches (FLUSHALL
    // between cases) and still cleared completely: re-registration works.
    assert!(backends.single.stats().batches > 64);
}
