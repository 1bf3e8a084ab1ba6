//! Redis going away under the running binary, the purge paths, SIGTERM,
//! and a socket that cannot bind.

use super::harness::{
    Engine, Index, Ingester, Peer, SEED, batch, connecting, gpu, keys, purge_cli, tokens, topic,
};
use super::{BATCHES, index, redis};

const WRITES: &str = "kvroute_ingester_index_writes_total";
use kvroute_core::ids::BlockKey;
use kvroute_core::keys::HashScheme;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;

/// One single-block store batch per token set; and their keys.
fn stores(sets: &[Vec<u32>]) -> (Vec<Value>, Vec<BlockKey>) {
    let engine = Engine::new(SCHEME, SEED);
    let steps = sets
        .iter()
        .map(|t| batch(vec![engine.stored(None, t, None).0]))
        .collect();
    let keys = sets.iter().flat_map(|t| keys(SCHEME, t)).collect();
    (steps, keys)
}

/// `n` single-block token sets tagged from `tag`.
fn blocks(tag: u32, n: u32) -> Vec<Vec<u32>> {
    (tag..tag + n).map(|t| tokens(t, 1)).collect()
}

/// Steps `phases[0]`, then `{"wait": names[0]}`, `phases[1]`, ...
fn phased(phases: Vec<Vec<Value>>, names: &[&str]) -> Value {
    let mut steps = Vec::new();
    for (i, phase) in phases.into_iter().enumerate() {
        if i > 0 {
            steps.push(json!({"wait": names[i - 1]}));
        }
        steps.extend(phase);
    }
    Value::Array(steps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_stream_then_admin_and_cli_purge() {
    let mut redis = redis();
    // One worker and a bound of 8 pending ops make the overflow exact.
    let ing = Ingester::start(
        &redis.url(),
        &[
            "--hash-scheme",
            SCHEME.as_str(),
            "--workers",
            "1",
            "--max-pending-ops",
            "8",
        ],
    )
    .await;
    let model = "m";
    let idx: Index = index(&redis, model);
    let (a, b) = ("127.0.0.41:8000", "127.0.0.42:8000");
    let (a_steps, a_keys) = stores(&blocks(100, 4)); // A0 | A1 A2 | A3
    let (b_steps, b_keys) = stores(&blocks(200, 14)); // B0 | B1 | B2..B12 | B13
    let mut a_steps = a_steps.into_iter();
    let a_phases = vec![
        a_steps.by_ref().take(1).collect(),
        a_steps.by_ref().take(2).collect(),
        a_steps.collect(),
    ];
    let b_phases = vec![
        b_steps[..1].to_vec(),
        b_steps[1..2].to_vec(),
        b_steps[2..13].to_vec(),
        b_steps[13..].to_vec(),
    ];
    let script = |pod, steps| connecting(&ing, &topic(pod, model), "v0.10", steps);
    let mut pa = Peer::spawn(script(a, phased(a_phases, &["outage", "after"]))).await;
    let mut pb = Peer::spawn(script(b, phased(b_phases, &["outage", "burst", "after"]))).await;
    let (ha, hb) = (gpu(a), gpu(b));
    idx.expect("A0 before the outage", &a_keys[..1], &[&ha])
        .await;
    idx.expect("B0 before the outage", &b_keys[..1], &[&hb])
        .await;

    redis.kill();
    ing.wait_ready(false).await;
    // B1 alone, until its write has failed seven times: the next retry is
    // then 3.2 s away (50 ms doubling), so everything sent next is pending
    // at once, whatever the machine's load (a write in flight would take
    // an unknown number of batches with it).
    pb.resume("outage").await;
    pb.wait_for("WAITING burst").await;
    ing.expect_metric(WRITES, &[("outcome", "error")], 7.0)
        .await;
    // B2..B12, then A1 A2: at the 9th pending op (bound 8) the oldest pod's
    // pending ops, B1..B9, are dropped and B is marked for clear-and-rebuild;
    // B10..B12 follow behind a clear of B.
    pb.resume("burst").await;
    pb.wait_for("WAITING after").await;
    ing.expect_metric(BATCHES, &[], 14.0).await;
    pa.resume("outage").await;
    pa.wait_for("WAITING after").await;
    ing.expect_metric(BATCHES, &[], 16.0).await;
    // Counting a batch comes before the worker sheds for it: wait for the
    // state, not for the batch count.
    ing.expect_metric_eq("kvroute_ingester_dropped_ops_total", &[], 9.0)
        .await;
    // Unwritten: ClearPod(B), B10, B11, B12, A1, A2.
    ing.expect_metric_eq("kvroute_ingester_pending_ops", &[], 6.0)
        .await;
    assert_eq!(
        ing.metric("kvroute_ingester_dropped_ops_total", &[]).await,
        9.0,
        "nine of B1..B10 shed"
    );

    redis.restart().expect("restart redis-server");
    ing.wait_ready(true).await;
    idx.expect("A1 A2 written after the outage", &a_keys[1..3], &[&ha])
        .await;
    idx.expect("B10..B12 written after the outage", &b_keys[10..13], &[&hb])
        .await;
    // The restarted Redis is empty: entries written before are gone.
    idx.assert("A0 lost with Redis", &a_keys[..1], &[]).await;
    idx.assert("B0 lost with Redis, B1..B9 shed", &b_keys[..10], &[])
        .await;

    pa.resume("after").await;
    pb.resume("after").await;
    idx.expect("A3 after the outage", &a_keys[3..], &[&ha])
        .await;
    idx.expect("B13 after the outage", &b_keys[13..], &[&hb])
        .await;
    // The purge finds entries written after the restart: the per-slot
    // bookkeeping was registered again on the empty Redis.
    let (code, _) = ing.post(&format!("/admin/purge?pod={a}")).await;
    assert_eq!(code, 202);
    idx.expect("A purged over HTTP", &a_keys, &[]).await;
    idx.assert("B kept", &b_keys[10..], &[&hb]).await;
    assert_eq!(ing.post("/admin/purge?pod=").await.0, 400);

    let (ok, out) = purge_cli(&redis.url(), &[b]).await;
    assert!(ok, "purge CLI failed: {out}");
    assert_eq!(
        out.lines().next(),
        Some(format!("purged {b}").as_str()),
        "{out}"
    );
    assert_eq!(
        out.lines().nth(1),
        Some("purged 1 pods, 4 entries"),
        "{out}"
    );
    idx.assert("B purged by the CLI", &b_keys, &[]).await;
    pa.kill().await;
    pb.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_queued_events_within_the_timeout() {
    let mut redis = redis();
    let ing = Ingester::start(
        &redis.url(),
        &["--hash-scheme", SCHEME.as_str(), "--drain-timeout", "5s"],
    )
    .await;
    let (model, pod) = ("m", "127.0.0.51:8000");
    let idx = index(&redis, model);
    let (steps, k) = stores(&blocks(300, 4));
    let phases = vec![steps[..1].to_vec(), steps[1..].to_vec()];
    let mut peer = Peer::spawn(connecting(
        &ing,
        &topic(pod, model),
        "v0.10",
        phased(phases, &["queue"]),
    ))
    .await;
    let holder = gpu(pod);
    idx.expect("S0", &k[..1], &[&holder]).await;

    // Queue three batches the ingester cannot write (Redis down)...
    redis.kill();
    peer.resume("queue").await;
    peer.wait_for("DONE").await;
    ing.expect_metric(BATCHES, &[], 4.0).await;
    // ...ask it to stop, and bring Redis back while it drains.
    let stop = Instant::now();
    ing.sigterm();
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.restart().expect("restart redis-server");
    let status = ing.exit(Duration::from_secs(7)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        stop.elapsed() < Duration::from_secs(6),
        "drained in {:?}",
        stop.elapsed()
    );
    idx.assert(
        "queued batches written during the drain",
        &k[1..],
        &[&holder],
    )
    .await;
    idx.assert("S0 lost with Redis", &k[..1], &[]).await;
    peer.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zmq_bind_failure_exits_non_zero() {
    // The port is taken: the SUB cannot bind, and the process must say so
    // in its exit code (an orchestrator restarts and alerts on it).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvroute-ingester"))
        .args(["--zmq-bind", &format!("tcp://127.0.0.1:{port}")])
        .args(["--http-addr", "127.0.0.1:0"])
        // The embedded memory index: this test needs no Redis.
        .env_remove("KVROUTE_REDIS_URL")
        .env_remove("KVCACHE_INDEXER_REDIS_ADDR")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("exits by itself")
        .expect("run kvroute-ingester");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(stderr.contains("cannot bind"), "{stderr}");
}
