//! End to end: vLLM-format publishers (`crates/testkit/peers/vllm_publisher.py`:
//! pyzmq + msgspec, vLLM's bytes) -> the real `kvroute-ingester` binary ->
//! a real `redis-server` -> the index read back with HKEYS/GET, keys
//! computed independently with `kvroute_core::keys` from the tokens sent.
//!
//! Each test starts its own Redis and ingester once. A test knows the
//! ingester has caught up with a pod when that pod's last ("sentinel") store
//! is visible: one pod's batches are applied in order, so everything before
//! it has been written by then; only the `engine:` mappings, written in a
//! follow-up wave, are polled separately.
//!
//! Semantics verified here beyond the happy path:
//! - Redis outage: writes fail and stay pending (bounded per worker by
//!   `--max-pending-ops`; past it the oldest pod's ops are dropped and that
//!   pod is cleared before its next write); `/readyz` is 503 meanwhile; the
//!   pending ops are written once Redis answers again. A restarted Redis is
//!   EMPTY: whatever was written before the outage is gone (the ingester
//!   cannot tell a restart from a reconnect), so without replay the index
//!   then holds only what was published during and after the outage until
//!   the pods store those blocks again. With a replay endpoint, a pod that
//!   was shed is cleared and then rebuilt from its replay buffer
//!   (`rebuild.rs`).
//! - SIGTERM: the queues are drained, and failed writes retried, until
//!   `--drain-timeout`; the process exits 0.
//! - `/readyz` fails with a reason while writes fail although PING answers
//!   (Redis out of memory) and while Redis is gone; it recovers with the
//!   first successful write (`readiness.rs`).
//! - Purges without an event: a pod silent for `--purge-silent-after`; the
//!   operator's purge of an endpoint clears ranks only Redis knows
//!   (`purge.rs`); a pod whose endpoint left the connect set, after
//!   `--purge-after` (`gone.rs`).

#[path = "e2e/admin.rs"]
mod admin;
#[path = "e2e/dataloss.rs"]
mod dataloss;
#[path = "e2e/gone.rs"]
mod gone;
#[path = "e2e/harness.rs"]
mod harness;
#[path = "e2e/hostile.rs"]
mod hostile;
#[path = "e2e/keying.rs"]
mod keying;
#[path = "e2e/malformed.rs"]
mod malformed;
#[path = "e2e/outage.rs"]
mod outage;
#[path = "e2e/purge.rs"]
mod purge;
#[path = "e2e/readiness.rs"]
mod readiness;
#[path = "e2e/rebuild.rs"]
mod rebuild;
#[path = "e2e/spoof.rs"]
mod spoof;
#[path = "e2e/stall.rs"]
mod stall;
#[path = "e2e/startup.rs"]
mod startup;

use harness::{
    Engine, Index, Ingester, Peer, SEED, batch, bind_endpoint, cleared, connecting, gpu, keys,
    removed, tokens, topic, until,
};
use kvroute_core::ids::BlockKey;
use kvroute_core::keys::HashScheme;
use kvroute_testkit::redis_server::RedisServer;
use serde_json::{Value, json};

const BATCHES: &str = "kvroute_ingester_batches_total";
const AGREEMENT: &str = "kvroute_ingester_hash_agreement_total";

fn redis() -> RedisServer {
    RedisServer::start().expect("redis-server (apt-get install redis-server)")
}

fn index(redis: &RedisServer, model: &str) -> Index {
    Index {
        url: redis.url(),
        model: model.into(),
    }
}

/// Three pods at once publish a shared prefix, their own continuation of it
/// (`parent_block_hash` = the prefix's last hash), then one removes a shared
/// block, one removes a block of its own and one clears everything.
async fn three_pods(encoding: &str, scheme: HashScheme) {
    let redis = redis();
    let ing = Ingester::start(&redis.url(), &["--hash-scheme", scheme.as_str()]).await;
    let model = "org/model-a";
    let idx = index(&redis, model);
    let engine = Engine::new(scheme, SEED);
    let pods = ["127.0.0.11:8000", "127.0.0.12:8000", "127.0.0.13:8000"];
    let shared_tokens = tokens(1, 4);
    let (shared_ev, shared_states) = engine.stored(None, &shared_tokens, None);
    let mut own_keys = Vec::new();
    let mut sentinels = Vec::new();
    let mut spawns = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let own = tokens(10 + i as u32, 2);
        let (own_ev, own_states) = engine.stored(shared_states.last().copied(), &own, None);
        let full: Vec<u32> = shared_tokens.iter().chain(&own).copied().collect();
        own_keys.push(keys(scheme, &full)[4..].to_vec());
        // Map events carry a medium: one sentinel lands in the cpu tier.
        let medium = (encoding == "v0.33" && i == 1).then_some("CPU");
        let sentinel = tokens(20 + i as u32, 1);
        let (sentinel_ev, _) = engine.stored(None, &sentinel, medium);
        let tier = if medium.is_some() { "cpu" } else { "gpu" };
        sentinels.push((keys(scheme, &sentinel), format!("{pod}@{tier}")));
        let last = match i {
            0 => removed(&shared_states[3..]),
            1 => removed(&own_states[..1]),
            _ => cleared(),
        };
        let steps = json!([
            batch(vec![shared_ev.clone()]),
            batch(vec![own_ev]),
            batch(vec![last]),
            batch(vec![sentinel_ev]),
        ]);
        spawns.push(Peer::spawn(connecting(
            &ing,
            &topic(pod, model),
            encoding,
            steps,
        )));
    }
    let peers = futures::future::join_all(spawns).await;
    for (k, field) in &sentinels {
        idx.expect("every pod's sentinel", k, &[field]).await;
    }

    let shared = keys(scheme, &shared_tokens);
    let (p1, p2) = (gpu(pods[0]), gpu(pods[1]));
    idx.assert(
        "shared prefix minus the cleared pod",
        &shared[..3],
        &[&p1, &p2],
    )
    .await;
    idx.assert("shared block removed by pod 1", &shared[3..], &[&p2])
        .await;
    idx.assert("pod 1's chained store", &own_keys[0], &[&p1])
        .await;
    idx.assert("pod 2's removed block", &own_keys[1][..1], &[])
        .await;
    idx.assert("pod 2's other block", &own_keys[1][1..], &[&p2])
        .await;
    idx.assert("pod 3 cleared", &own_keys[2], &[]).await;
    // Engine hashes equal the keys: no engine: mapping is written.
    let mapping = format!("engine:{model}@{}", shared[0].0);
    assert_eq!(idx.get(&mapping).await, Ok(None));

    assert_eq!(ing.get("/healthz").await.0, 200);
    assert_eq!(ing.get("/readyz").await.0, 200);
    // 3 pods x (4 shared + 2 own + 1 sentinel) blocks, all agreeing.
    assert_eq!(ing.metric(AGREEMENT, &[("agree", "true")]).await, 21.0);
    assert_eq!(ing.metric(AGREEMENT, &[("agree", "false")]).await, 0.0);
    assert_eq!(ing.metric(BATCHES, &[("verdict", "first")]).await, 3.0);
    assert_eq!(ing.metric(BATCHES, &[("verdict", "next")]).await, 9.0);
    let applied = |t| [("type", t), ("outcome", "applied")];
    let events = "kvroute_ingester_events_total";
    assert_eq!(ing.metric(events, &applied("BlockStored")).await, 9.0);
    assert_eq!(ing.metric(events, &applied("BlockRemoved")).await, 2.0);
    assert_eq!(ing.metric(events, &applied("AllBlocksCleared")).await, 1.0);
    for p in peers {
        p.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v010_array_events_from_three_pods_build_the_index() {
    three_pods("v0.10", HashScheme::Sha256Cbor64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v011_map_events_from_three_pods_build_the_index() {
    three_pods("v0.33", HashScheme::Sha256Cbor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_hashes_of_another_seed_resolve_through_the_engine_mapping() {
    let redis = redis();
    let ing = Ingester::start(&redis.url(), &["--hash-scheme", "sha256_cbor"]).await;
    let (model, pod) = ("m", "127.0.0.15:8000");
    let idx = index(&redis, model);
    // The engine hashes with another PYTHONHASHSEED: every hash differs
    // from the key the ingester computes from the same tokens.
    let engine = Engine::new(HashScheme::Sha256Cbor, "7");
    let (a, b) = (tokens(30, 3), tokens(31, 2));
    let (a_ev, a_states) = engine.stored(None, &a, None);
    let (b_ev, b_states) = engine.stored(a_states.last().copied(), &b, None);
    let states: Vec<_> = a_states.iter().chain(&b_states).copied().collect();
    let full: Vec<u32> = a.iter().chain(&b).copied().collect();
    let all = keys(HashScheme::Sha256Cbor, &full);
    let sentinel = tokens(32, 1);
    let (sentinel_ev, _) = engine.stored(None, &sentinel, None);
    let mut peer = Peer::spawn(connecting(
        &ing,
        &topic(pod, model),
        "v0.33",
        json!([
            batch(vec![a_ev]),
            batch(vec![b_ev]),
            {"wait": "remove"},
            batch(vec![removed(&[states[1], states[4]])]),
            batch(vec![sentinel_ev]),
        ]),
    ))
    .await;
    peer.wait_for("WAITING remove").await;
    let holder = gpu(pod);
    // The continuation was keyed from the parent's remembered chain state.
    idx.expect("both stores, keyed by the router's seed", &all, &[&holder])
        .await;
    let mapping = |i: usize| format!("engine:{model}@{}", states[i].key().0);
    for (i, key) in all.iter().enumerate() {
        assert_ne!(states[i].key(), *key, "the seeds differ");
        let want = format!("{model}@{}", key.0);
        until("engine: mapping", || async {
            match idx.get(&mapping(i)).await? {
                Some(v) if v == want => Ok(()),
                other => Err(format!("{} = {other:?}", mapping(i))),
            }
        })
        .await;
    }

    peer.resume("remove").await;
    idx.expect(
        "sentinel",
        &keys(HashScheme::Sha256Cbor, &sentinel),
        &[&holder],
    )
    .await;
    idx.assert("removed by engine hash", &[all[1], all[4]], &[])
        .await;
    idx.assert("kept", &[all[0], all[2], all[3]], &[&holder])
        .await;
    until("removed blocks' mappings deleted", || async {
        let gone = (idx.get(&mapping(1)).await?, idx.get(&mapping(4)).await?);
        let kept = idx.get(&mapping(0)).await?;
        match (gone, kept) {
            ((None, None), Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // 5 + 1 stored blocks, none agreeing: what an operator alerts on.
    assert_eq!(ing.metric(AGREEMENT, &[("agree", "false")]).await, 6.0);
    assert_eq!(ing.metric(AGREEMENT, &[("agree", "true")]).await, 0.0);
    peer.kill().await;
}

/// One pod's script around a gap: batch 0 sent; 1 (store P), 2 (remove
/// P[0]) and 3 (store Q) only buffered for replay; 4 sent live (remove Q,
/// store the sentinel). Returns the steps and the keys (X, P, Q, sentinel).
fn gap_script(i: u32) -> (Value, [Vec<BlockKey>; 4]) {
    let scheme = HashScheme::Sha256Cbor64;
    let engine = Engine::new(scheme, SEED);
    let (x, p, q, s) = (
        tokens(40 + i, 1),
        tokens(50 + i, 2),
        tokens(60 + i, 1),
        tokens(70 + i, 1),
    );
    let (x_ev, _) = engine.stored(None, &x, None);
    let (p_ev, p_states) = engine.stored(None, &p, None);
    let (q_ev, q_states) = engine.stored(None, &q, None);
    let (s_ev, _) = engine.stored(None, &s, None);
    let steps = json!([
        batch(vec![x_ev]),
        {"batch": [p_ev], "send": false},
        {"batch": [removed(&p_states[..1])], "send": false},
        {"batch": [q_ev], "send": false},
        batch(vec![removed(&q_states), s_ev]),
    ]);
    let k = |t: &[u32]| keys(scheme, t);
    (steps, [k(&x), k(&p), k(&q), k(&s)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_are_replayed_in_order_from_both_replay_reply_shapes() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let zmq = bind_endpoint();
    // Each pod serves its replay ROUTER on its own loopback IP and one
    // shared port, so `tcp://{host}:PORT` finds it from the topic's pod id;
    // a data-parallel rank r serves it at PORT + r, as vLLM does
    // (`ZmqEventPublisher.offset_endpoint_port`).
    let pods = [
        ("127.0.0.21", "v0.10", None),
        ("127.0.0.22", "v0.33", None),
        ("127.0.0.23", "v0.33", Some(1u16)),
    ];
    let mut peers = Vec::new();
    let mut expected = Vec::new();
    let mut port = 0u16;
    for (i, (ip, shape, rank)) in pods.into_iter().enumerate() {
        let (steps, k) = gap_script(i as u32);
        let replay = format!(
            "tcp://{ip}:{}",
            if i == 0 { 0 } else { port + rank.unwrap_or(0) }
        );
        let pod = format!("{ip}:8000");
        let peer = Peer::spawn(json!({
            "topic": topic(&pod, model), "encoding": shape, "replay_shape": shape,
            "replay": replay, "pub": zmq, "pub_mode": "connect",
            "await_subscriber_ms": 8000, "steps": steps, "data_parallel_rank": rank,
        }))
        .await;
        if i == 0 {
            let ep = peer.replay_ep.clone().expect("replay endpoint");
            port = ep
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port");
        }
        peers.push(peer);
        let id = match rank {
            Some(r) => format!("{pod}#dp{r}"),
            None => pod,
        };
        expected.push((gpu(&id), k));
    }
    let template = format!("tcp://{{host}}:{port}");
    let ing = Ingester::start_bound(
        &redis.url(),
        &zmq,
        &[
            "--hash-scheme",
            "sha256_cbor_64bit",
            "--replay-endpoint",
            &template,
        ],
    )
    .await;
    for (holder, [x, p, q, s]) in &expected {
        idx.expect("the live sentinel", s, &[holder]).await;
        idx.assert("batch 0", x, &[holder]).await;
        // Replayed batches 1 then 2: the removal of P[0] applied after its store.
        idx.assert("P[0] stored then removed", &p[..1], &[]).await;
        idx.assert("P[1]", &p[1..], &[holder]).await;
        // The live removal of Q (batch 4) applies after the replayed store.
        idx.assert("Q not resurrected", q, &[]).await;
    }
    assert_eq!(
        ing.metric("kvroute_ingester_replays_total", &[("outcome", "ok")])
            .await,
        3.0
    );
    assert_eq!(ing.metric(BATCHES, &[("verdict", "gap")]).await, 3.0);
    assert_eq!(
        ing.metric("kvroute_ingester_gap_batches_total", &[]).await,
        0.0
    );
    for p in peers {
        p.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_restarts_clear_the_pods_old_entries_connect_mode() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let engine = Engine::new(HashScheme::Sha256Cbor, SEED);
    let k = |t: &[u32]| keys(HashScheme::Sha256Cbor, t);
    let store = |t: &[u32]| batch(vec![engine.stored(None, t, None).0]);
    let (a, b, c) = ("127.0.0.31:8000", "127.0.0.32:8000", "127.0.0.33:8000");
    let publisher = |pod: &str, ip: &str, steps: Value| {
        json!({
            "topic": topic(pod, model), "pub": format!("tcp://{ip}:0"),
            "await_subscriber_ms": 8000, "steps": steps,
        })
    };
    let (a_old, b_old, c_only) = (tokens(80, 2), tokens(81, 3), tokens(82, 1));
    let (a_new, b_new) = (tokens(83, 1), tokens(84, 1));
    // A: seq 0, 1; then a new process starts again at 0.
    let pa = Peer::spawn(publisher(
        a,
        "127.0.0.31",
        json!([store(&a_old[..16]), store(&a_old)]),
    ))
    .await;
    // B: seq 0..3; then restarts in place, and its first batch seen after
    // the restart is seq 2 (0 and 1 never arrived): backwards, not to 0.
    let pb = Peer::spawn(publisher(
        b,
        "127.0.0.32",
        json!([
            store(&b_old[..16]),
            store(&b_old[..32]),
            store(&b_old),
            store(&b_old),
            {"wait": "restart"},
            {"restart": true},
            {"skip": 2},
            store(&b_new),
        ]),
    ))
    .await;
    let pc = Peer::spawn(publisher(c, "127.0.0.33", json!([store(&c_only)]))).await;
    let targets = [&pa, &pb, &pc].map(|p| p.pub_ep.clone()).join(",");
    let ing = Ingester::start_raw(
        &redis.url(),
        &["--zmq-connect", &targets, "--hash-scheme", "sha256_cbor"],
        String::new(),
    )
    .await;
    idx.expect("A's first process", &k(&a_old), &[&gpu(a)])
        .await;
    idx.expect("B before its restart", &k(&b_old), &[&gpu(b)])
        .await;
    idx.expect("C", &k(&c_only), &[&gpu(c)]).await;

    let a_ep = pa.pub_ep.clone();
    pa.kill().await;
    let pa2 = Peer::spawn(json!({
        "topic": topic(a, model), "pub": a_ep, "await_subscriber_ms": 8000,
        "steps": [store(&a_new)],
    }))
    .await;
    let mut pb = pb;
    pb.resume("restart").await;
    idx.expect("A's new process", &k(&a_new), &[&gpu(a)]).await;
    idx.expect("B after its restart", &k(&b_new), &[&gpu(b)])
        .await;
    idx.assert("A's old entries cleared", &k(&a_old), &[]).await;
    idx.assert("B's old entries cleared", &k(&b_old), &[]).await;
    idx.assert("C untouched", &k(&c_only), &[&gpu(c)]).await;
    assert_eq!(
        ing.metric("kvroute_ingester_restarts_total", &[]).await,
        2.0
    );
    // B's batches 0 and 1 of the new stream: no replay endpoint, counted.
    assert_eq!(
        ing.metric("kvroute_ingester_gap_batches_total", &[]).await,
        2.0
    );
    for p in [pa2, pb, pc] {
        p.kill().await;
    }
}
