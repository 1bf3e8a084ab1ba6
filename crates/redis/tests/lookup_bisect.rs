//! The bisecting lookup (`index/bisect.rs`) against the linear walk.
//!
//! (a) On data with the prefix property — every (pod, tier) holds a random
//! prefix of a stored chain; several pods and tiers; candidate filters;
//! prompts shorter than, equal to and longer than the chain — bisection on
//! the memory index, a single Redis (`lua/lookup.lua`) and a 3-master Redis
//! Cluster (one script per master; or, with those off, one wave read whole
//! or rounds) returns exactly what the linear walk returns.
//!
//! (b) On data with holes, the memory index, the single Redis and the
//! cluster read in rounds return the same answer (they probe the same
//! blocks); the per-master scripts probe each master's blocks instead, so
//! their answer may differ, but like every bisection it is never
//! shallower than the walk's, pod by pod and tier by tier. The documented
//! cases (a hole hidden between equal counts, a hole the probes see)
//! behave as documented, and fallbacks are counted.
//!
//! Each test function starts its Redis fixtures once.

use kvroute_core::ids::{BlockKey, ModelName, PodId, Tier};
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::index::{BlockRef, Index, IndexOp, Lookup, LookupMode, StoredBlock};
use kvroute_redis::{ROUND_BUDGET, RedisIndex};
use kvroute_testkit::redis_server::{RedisCluster, RedisServer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const PODS: usize = 6;
const TIERS: [&str; 3] = ["gpu", "cpu", "disk"];

fn model() -> ModelName {
    ModelName::new("m")
}

fn pod(i: usize) -> PodId {
    if i == 5 {
        PodId::with_rank("127.0.0.15:8000", Some(1))
    } else {
        PodId::new(format!("127.0.0.{}:8000", 11 + i))
    }
}

/// Block `i` of the chain of `seed` (SplitMix64: distinct, spread over slots).
fn key(seed: u64, i: u64) -> BlockKey {
    let mut z = seed
        .wrapping_mul(0x1000_0000_01b3)
        .wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    BlockKey(z ^ (z >> 31))
}

#[derive(Debug, Clone)]
struct Query {
    /// Blocks of the stored chain the prompt starts with.
    shared: usize,
    /// Blocks nobody stored after those.
    fresh: usize,
    /// Candidates: `None`, or the pods whose bit is set.
    mask: Option<u8>,
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    chain: usize,
    /// (pod, tier, depth): the (pod, tier) holds blocks `0..depth`.
    holdings: Vec<(usize, usize, usize)>,
    /// (pod, tier, block): toggle membership (holes and strays); empty in (a).
    toggles: Vec<(usize, usize, usize)>,
    queries: Vec<Query>,
}

impl Case {
    fn ops(&self) -> Vec<IndexOp> {
        let chain = |range: std::ops::Range<usize>| -> Vec<StoredBlock> {
            range
                .map(|i| StoredBlock {
                    key: key(self.seed, i as u64),
                    engine: None,
                })
                .collect()
        };
        let mut ops: Vec<IndexOp> = self
            .holdings
            .iter()
            .filter(|h| h.2 > 0)
            .map(|&(p, t, depth)| IndexOp::Store {
                model: model(),
                pod: pod(p),
                tier: Tier::new(TIERS[t]),
                blocks: chain(0..depth),
            })
            .collect();
        for &(p, t, block) in &self.toggles {
            let held = self
                .holdings
                .iter()
                .any(|&(hp, ht, d)| hp == p && ht == t && block < d);
            let (model, pod, tier) = (model(), pod(p), Tier::new(TIERS[t]));
            ops.push(if held {
                IndexOp::Remove {
                    model,
                    pod,
                    tier,
                    blocks: vec![BlockRef::Key(key(self.seed, block as u64))],
                }
            } else {
                IndexOp::Store {
                    model,
                    pod,
                    tier,
                    blocks: chain(block..block + 1),
                }
            });
        }
        ops
    }

    fn prompt(&self, q: &Query) -> (Vec<BlockKey>, Option<Vec<PodId>>) {
        let mut keys: Vec<BlockKey> = (0..q.shared.min(self.chain))
            .map(|i| key(self.seed, i as u64))
            .collect();
        keys.extend((0..q.fresh).map(|i| key(!self.seed, i as u64)));
        let candidates = q
            .mask
            .map(|m| (0..PODS).filter(|p| m & (1 << p) != 0).map(pod).collect());
        (keys, candidates)
    }
}

fn query(chain: usize) -> impl Strategy<Value = Query> {
    (
        0..=chain + 8,
        prop_oneof![3 => Just(0usize), 1 => 1..40usize],
        prop::option::weighted(0.3, any::<u8>()),
    )
        .prop_map(|(shared, fresh, mask)| Query {
            shared,
            fresh,
            mask,
        })
}

/// Chains up to 300 blocks, so that prompts fall on both sides of the
/// cluster's read-whole threshold (64 blocks).
fn case(toggles: usize) -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        prop_oneof![1 => 1..12usize, 3 => 12..300usize],
    )
        .prop_flat_map(move |(seed, chain)| {
            // Depths cluster on a few values, as pods sharing a prompt do.
            let depth = prop_oneof![
                1 => Just(0usize),
                1 => Just(chain),
                4 => 0..=chain,
            ];
            (
                Just(seed),
                Just(chain),
                prop::collection::vec((0..PODS, 0..TIERS.len(), depth), 1..10),
                prop::collection::vec((0..PODS, 0..TIERS.len(), 0..chain), 0..=toggles),
                prop::collection::vec(query(chain), 1..5),
            )
                .prop_map(|(seed, chain, holdings, toggles, queries)| Case {
                    seed,
                    chain,
                    holdings,
                    toggles,
                    queries,
                })
        })
}

/// The Redis backends and ways of reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// A single Redis: `lua/lookup.lua`.
    Single,
    /// The cluster, one script per master.
    PerMaster,
    /// The cluster with per-master scripts off: read whole, or rounds.
    Rounds,
}

const WAYS: [Way; 3] = [Way::Single, Way::PerMaster, Way::Rounds];

struct Backends {
    single: RedisIndex,
    cluster: RedisIndex,
    /// A second connection to the cluster, per-master scripts off.
    rounds: RedisIndex,
}

impl Backends {
    fn start(rt: &tokio::runtime::Runtime) -> (Self, RedisServer, RedisCluster) {
        let server = RedisServer::start().expect("redis-server");
        let cluster = RedisCluster::start(3).expect("redis cluster");
        let backends = rt.block_on(async {
            Backends {
                single: RedisIndex::connect(&server.url()).await.expect("single"),
                cluster: RedisIndex::connect_cluster(&cluster.urls())
                    .await
                    .expect("cluster"),
                rounds: RedisIndex::connect_cluster(&cluster.urls())
                    .await
                    .expect("cluster"),
            }
        });
        backends
            .rounds
            .lookup_settings()
            .set_per_master_scripts(false);
        (backends, server, cluster)
    }

    /// Fresh data: a new memory index, both Redis flushed, `ops` applied.
    async fn load(&self, ops: &[IndexOp]) -> Result<MemoryIndex, TestCaseError> {
        let memory = MemoryIndex::new(1 << 20);
        memory.apply_sync(ops);
        for r in [&self.single, &self.cluster] {
            r.flush_all().await.map_err(fail)?;
            r.apply(ops).await.map_err(fail)?;
        }
        Ok(memory)
    }

    fn index(&self, way: Way) -> &RedisIndex {
        match way {
            Way::Single => &self.single,
            Way::PerMaster => &self.cluster,
            Way::Rounds => &self.rounds,
        }
    }

    /// Bisect every prompt, however short, on a Redis backend.
    async fn lookup(
        &self,
        way: Way,
        mode: LookupMode,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
    ) -> Result<Lookup, TestCaseError> {
        let index = self.index(way);
        index.set_lookup_mode(mode);
        index.lookup_settings().set_linear_max_blocks(0);
        index.lookup(&model(), keys, candidates).await.map_err(fail)
    }
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn run(
    cases: u32,
    strategy: impl Strategy<Value = Case>,
    test: impl Fn(&Case) -> Result<(), TestCaseError>,
) {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    if let Err(e) = TestRunner::new(config).run(&strategy, |case| test(&case)) {
        panic!("{e}");
    }
}

/// (a) Prefix data: bisection == walk, on every backend.
#[test]
fn bisection_equals_the_walk_when_pods_hold_prefixes() {
    let rt = runtime();
    let (b, _server, _cluster) = Backends::start(&rt);
    run(40, case(0), |case| {
        rt.block_on(async {
            let memory = b.load(&case.ops()).await?;
            for q in &case.queries {
                let (keys, cands) = case.prompt(q);
                let c = cands.as_deref();
                let m = model();
                let (walk, _) = memory.lookup_in_mode(&m, &keys, c, LookupMode::Linear);
                let (bisect, stats) = memory.lookup_in_mode(&m, &keys, c, LookupMode::Bisect);
                prop_assert_eq!(&bisect, &walk, "memory, {} blocks {:?}", keys.len(), q);
                prop_assert_eq!(stats.fallbacks, 0);
                for way in WAYS {
                    for mode in [LookupMode::Bisect, LookupMode::Linear] {
                        let got = b.lookup(way, mode, &keys, c).await?;
                        prop_assert_eq!(
                            &got,
                            &walk,
                            "{:?} {:?}, {} blocks {:?}",
                            way,
                            mode,
                            keys.len(),
                            q
                        );
                    }
                }
            }
            Ok(())
        })
    });
    // The prefix property held throughout: no interval fell back.
    assert_eq!(b.single.stats().lookup_fallbacks, 0);
    assert_eq!(b.cluster.stats().lookup_fallbacks, 0);
    assert_eq!(b.rounds.stats().lookup_fallbacks, 0);
    // Every cluster lookup took the per-master wave: at most one round trip
    // each (none for an empty prompt).
    let stats = b.cluster.stats();
    assert_eq!(stats.node_lookups_redone, 0);
    assert!(stats.lookups > 0);
    assert!(stats.lookup_round_trips <= stats.lookups, "{stats:?}");
}

/// Bisect's depth for every pod and (pod, tier) the walk finds is at least
/// the walk's.
fn never_shallower(bisect: &Lookup, walk: &Lookup) -> Result<(), TestCaseError> {
    for w in &walk.pods {
        let b = bisect.pods.iter().find(|b| b.pod == w.pod);
        let b = b.ok_or_else(|| fail(format!("{} missing from {bisect:?}", w.pod)))?;
        prop_assert!(b.depth >= w.depth, "{:?} vs walk {:?}", b, w);
        for (tier, d) in &w.tiers {
            let bd = b.tiers.iter().find(|t| &t.0 == tier).map_or(0, |t| t.1);
            prop_assert!(bd >= *d, "{:?} vs walk {:?}", b, w);
        }
    }
    Ok(())
}

/// (b) Holes and strays: one answer where the same blocks are probed,
/// never shallower anywhere.
#[test]
fn with_holes_every_backend_agrees_and_never_undercounts() {
    let rt = runtime();
    let (b, _server, _cluster) = Backends::start(&rt);
    run(40, case(6), |case| {
        rt.block_on(async {
            let memory = b.load(&case.ops()).await?;
            for q in &case.queries {
                let (keys, cands) = case.prompt(q);
                let c = cands.as_deref();
                let m = model();
                let (walk, _) = memory.lookup_in_mode(&m, &keys, c, LookupMode::Linear);
                let (bisect, _) = memory.lookup_in_mode(&m, &keys, c, LookupMode::Bisect);
                never_shallower(&bisect, &walk)?;
                for way in WAYS {
                    let got = b.lookup(way, LookupMode::Bisect, &keys, c).await?;
                    if way == Way::PerMaster {
                        never_shallower(&got, &walk)?;
                    } else {
                        prop_assert_eq!(&got, &bisect, "{:?}, {} blocks", way, keys.len());
                    }
                    let linear = b.lookup(way, LookupMode::Linear, &keys, c).await?;
                    prop_assert_eq!(&linear, &walk, "{:?} linear", way);
                }
            }
            Ok(())
        })
    });
}

/// The cases `index/bisect.rs` documents, on every backend.
#[test]
fn documented_hole_cases_on_every_backend() {
    let rt = runtime();
    let (b, _server, _cluster) = Backends::start(&rt);
    let seed = 7;
    let n = 2048;
    let keys: Vec<BlockKey> = (0..n).map(|i| key(seed, i)).collect();
    // Pod 0 holds all 2048 blocks but lacks block 5; pod 1 holds 1000.
    let hidden = Case {
        seed,
        chain: n as usize,
        holdings: vec![(0, 0, n as usize), (1, 0, 1000)],
        toggles: vec![(0, 0, 5)],
        queries: vec![],
    };
    // Pod 0 lacks block 1024 (the first probed block), pods 1 and 2 hold
    // everything and block 0..512: the count grows again after 1024.
    let visible = Case {
        toggles: vec![(0, 0, 1024)],
        holdings: vec![(0, 0, n as usize), (1, 0, n as usize), (2, 0, 512)],
        ..hidden.clone()
    };
    let result: Result<(), TestCaseError> = rt.block_on(async {
        let memory = b.load(&hidden.ops()).await?;
        let m = model();
        let (walk, _) = memory.lookup_in_mode(&m, &keys, None, LookupMode::Linear);
        assert_eq!(walk.pods[0].depth, 5);
        let (bisect, _) = memory.lookup_in_mode(&m, &keys, None, LookupMode::Bisect);
        assert_eq!(bisect.pods[0].depth, 2048, "hidden between equal counts");
        assert_eq!(bisect.pods[1], walk.pods[1]);
        for way in WAYS {
            let got = b.lookup(way, LookupMode::Bisect, &keys, None).await?;
            if way == Way::PerMaster {
                never_shallower(&got, &walk)?;
                assert_eq!(got.pods[1], walk.pods[1]);
            } else {
                assert_eq!(got, bisect, "{way:?}");
            }
            assert_eq!(b.lookup(way, LookupMode::Linear, &keys, None).await?, walk);
        }

        let memory = b.load(&visible.ops()).await?;
        let (walk, _) = memory.lookup_in_mode(&m, &keys, None, LookupMode::Linear);
        let (bisect, stats) = memory.lookup_in_mode(&m, &keys, None, LookupMode::Bisect);
        assert_eq!(walk.pods[0].depth, 1024);
        assert_eq!(bisect, walk, "a hole the probes see is read through");
        assert_eq!(stats.fallbacks, 1);
        assert_eq!(memory.lookup_fallbacks(), 1);
        for way in WAYS {
            let index = b.index(way);
            let before = index.stats();
            let got = b.lookup(way, LookupMode::Bisect, &keys, None).await?;
            let after = index.stats();
            if way == Way::PerMaster {
                // The master holding block 1024 sees the hole its own way.
                never_shallower(&got, &walk)?;
            } else {
                assert_eq!(got, walk, "{way:?}");
                assert_eq!(after.lookup_fallbacks - before.lookup_fallbacks, 1);
            }
        }
        Ok(())
    });
    result.expect("documented cases");
}

/// A hole in one tier that another tier of the same pod covers: the pod
/// holds every block, though neither tier's run reaches the end. Each
/// master of the cluster saw only its own blocks, so the per-master merge
/// must notice that the block where the pod's last field leaves still
/// holds another field of it, and redo the lookup (found by the proptest
/// above; both inputs are its minimal cases).
#[test]
fn a_tier_hole_covered_by_another_tier_is_never_undercounted() {
    let rt = runtime();
    let (b, _server, _cluster) = Backends::start(&rt);
    let cases = [
        // disk holds 0..5; cpu holds 0..11 but lacks block 4.
        (
            681840963047991229u64,
            11,
            vec![(2, 2, 5), (2, 1, 11)],
            (2, 1, 4),
            6,
        ),
        // gpu holds 0..236 but lacks block 69; cpu holds 0..75.
        (
            15416584911699842828,
            236,
            vec![(3, 0, 236), (3, 1, 75)],
            (3, 0, 69),
            133,
        ),
    ];
    for (seed, chain, holdings, hole, shared) in cases {
        let case = Case {
            seed,
            chain,
            holdings,
            toggles: vec![hole],
            queries: vec![Query {
                shared,
                fresh: 0,
                mask: None,
            }],
        };
        let result: Result<(), TestCaseError> = rt.block_on(async {
            let memory = b.load(&case.ops()).await?;
            let (keys, _) = case.prompt(&case.queries[0]);
            let m = model();
            let (walk, _) = memory.lookup_in_mode(&m, &keys, None, LookupMode::Linear);
            let (bisect, _) = memory.lookup_in_mode(&m, &keys, None, LookupMode::Bisect);
            never_shallower(&bisect, &walk)?;
            for way in WAYS {
                let got = b.lookup(way, LookupMode::Bisect, &keys, None).await?;
                never_shallower(&got, &walk)?;
            }
            let pod_depth = walk.pods.iter().map(|p| p.depth).max();
            prop_assert_eq!(pod_depth, Some(shared as u32));
            Ok(())
        });
        result.expect("tier hole");
    }
}

/// The point of it all: reads grow with the number of distinct depths and
/// the log of the prompt, not with the prompt.
#[test]
fn a_long_prompt_costs_few_reads() {
    let rt = runtime();
    let (b, _server, _cluster) = Backends::start(&rt);
    let seed = 11;
    for n in [512u64, 2048] {
        let keys: Vec<BlockKey> = (0..n).map(|i| key(seed, i)).collect();
        // Pod k holds the first (k + 1) / 4 of the prompt.
        let case = Case {
            seed,
            chain: n as usize,
            holdings: (0..4).map(|k| (k, 0, n as usize * (k + 1) / 4)).collect(),
            toggles: vec![],
            queries: vec![],
        };
        let result: Result<(), TestCaseError> = rt.block_on(async {
            let memory = b.load(&case.ops()).await?;
            let (walk, _) = memory.lookup_in_mode(&model(), &keys, None, LookupMode::Linear);
            assert_eq!(walk.max_depth() as u64, n);
            // Per master: about the single node's reads on each of 3 masters.
            // (index, read limit, round trips at most)
            let limits = [
                (&b.single, 80, 1),
                (&b.cluster, 3 * 80, 1),
                (&b.rounds, 2 * ROUND_BUDGET as u64 + 40, 8),
            ];
            for (index, limit, trips) in limits {
                index.set_lookup_mode(LookupMode::Bisect);
                index.lookup_settings().set_linear_max_blocks(32);
                let before = index.stats();
                assert_eq!(
                    index.lookup(&model(), &keys, None).await.map_err(fail)?,
                    walk
                );
                let after = index.stats();
                let reads = after.lookup_reads - before.lookup_reads;
                let round_trips = after.lookup_round_trips - before.lookup_round_trips;
                // 4 depths: ~4 * log2(n) counts and 5 sets; per master on
                // the cluster, or plus read-ahead bounded by the round budget.
                eprintln!(
                    "{n} blocks, cluster {}: {reads} reads, {round_trips} round trips",
                    index.is_cluster()
                );
                assert!(reads < limit, "{n} blocks: {reads} reads");
                assert!(
                    round_trips <= trips,
                    "{n} blocks: {round_trips} round trips"
                );
            }
            Ok(())
        });
        result.expect("long prompt");
    }
}
