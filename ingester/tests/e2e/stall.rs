//! A pod whose replay host never answers must not hold back anyone else:
//! gap replays run beside the workers, bounded (held batches, cooldown).

use super::harness::{
    Engine, Ingester, Peer, SEED, batch, bind_endpoint, connecting, gpu, http, keys, tokens, topic,
};
use super::{BATCHES, index, redis};
use ingester::pipeline::shard;
use kvroute_core::keys::HashScheme;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;
const REPLAYS: &str = "kvroute_ingester_replays_total";
const WORKERS: usize = 2;

/// A loopback pod id whose topic lands on worker `want` (or not on it).
fn pod_on(model: &str, want: usize, same: bool, from: u8) -> String {
    (from..=250)
        .map(|i| format!("127.0.0.{i}:8000"))
        .find(|p| (shard(&topic(p, model), WORKERS) == want) == same)
        .expect("a pod id on that worker")
}

/// Before the fix the worker awaited each gap's replay for up to
/// `--replay-timeout`: a flood of gapped batches from one pod whose replay
/// host accepts TCP and never answers filled that worker's queue, blocked
/// the dispatcher, and no other pod was indexed for minutes while `/readyz`
/// said 200. Now the other pods are indexed while that replay still hangs
/// (no replay has failed yet when they show up), the flooding pod's live
/// batches are held (bounded, the overflow counted), and after the failed
/// replay its gaps are counted without a replay (cooldown) and its later
/// batches land. `/readyz` stays 200 throughout: nothing is stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_replay_host_does_not_stall_other_pods() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let engine = Engine::new(SCHEME, SEED);
    let store = |t: &[u32]| batch(vec![engine.stored(None, t, None).0]);

    // The replay port on 127.0.0.99 accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.99:0")
        .await
        .expect("bind the silent replay listener");
    let port = hang.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let flooder = "127.0.0.99:8000";
    let a_worker = shard(&topic(flooder, model), WORKERS);
    let other = pod_on(model, a_worker, false, 100);
    let neighbour = pod_on(model, a_worker, true, 100);

    let zmq = bind_endpoint();
    let template = format!("tcp://{{host}}:{port}");
    let ing = Ingester::start_bound(
        &redis.url(),
        &zmq,
        &[
            "--hash-scheme",
            SCHEME.as_str(),
            "--workers",
            &WORKERS.to_string(),
            "--queue",
            "16",
            "--replay-endpoint",
            &template,
            "--replay-timeout",
            "3s",
            "--replay-budget",
            "4s",
            "--replay-max-held",
            "64",
            "--stall-after",
            "1s",
        ],
    )
    .await;

    // /readyz sampled all along: it must never fail.
    let unready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (unready, stop, addr) = (unready.clone(), stop.clone(), ing.http);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok((code, body)) = http(addr, "GET", "/readyz").await
                    && code != 200
                {
                    eprintln!("/readyz {code}: {body}");
                    unready.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    };

    // Pod A: 1,100 batches, each after a gap.
    let (a_late, b_tokens, c_tokens) = (tokens(990, 1), tokens(991, 1), tokens(992, 1));
    let mut steps: Vec<Value> = vec![json!({"publish": 1})];
    for _ in 0..1100 {
        steps.push(json!({"skip": 1}));
        steps.push(json!({"publish": 1}));
    }
    steps.push(json!({"wait": "late"}));
    steps.push(store(&a_late));
    let mut pa = Peer::spawn(connecting(
        &ing,
        &topic(flooder, model),
        "v0.33",
        json!(steps),
    ))
    .await;
    let mut pb = Peer::spawn(connecting(
        &ing,
        &topic(&other, model),
        "v0.33",
        json!([{"wait": "go"}, store(&b_tokens)]),
    ))
    .await;
    let mut pc = Peer::spawn(connecting(
        &ing,
        &topic(&neighbour, model),
        "v0.33",
        json!([{"wait": "go"}, store(&c_tokens)]),
    ))
    .await;
    pa.wait_for("WAITING late").await;
    pb.wait_for("WAITING go").await;
    pc.wait_for("WAITING go").await;
    pb.resume("go").await;
    pc.resume("go").await;
    idx.expect(
        "B (other worker) indexed",
        &keys(SCHEME, &b_tokens),
        &[&gpu(&other)],
    )
    .await;
    idx.expect(
        "C (A's worker) indexed",
        &keys(SCHEME, &c_tokens),
        &[&gpu(&neighbour)],
    )
    .await;
    assert_eq!(
        ing.metric(REPLAYS, &[("outcome", "error")]).await,
        0.0,
        "B and C must not wait for A's replay to time out"
    );

    // A's replay fails; its held batches apply with their gaps counted, the
    // ones past the hold bound were dropped and counted.
    ing.expect_metric(REPLAYS, &[("outcome", "error")], 1.0)
        .await;
    ing.expect_metric("kvroute_ingester_replay_overflow_total", &[], 500.0)
        .await;
    ing.expect_metric(REPLAYS, &[("outcome", "cooldown")], 60.0)
        .await;
    assert_eq!(ing.metric(REPLAYS, &[("outcome", "error")]).await, 1.0);
    // The hole left by the dropped batches is a gap of A's next batch.
    pa.resume("late").await;
    idx.expect(
        "A's later batch indexed",
        &keys(SCHEME, &a_late),
        &[&gpu(flooder)],
    )
    .await;
    assert!(ing.metric(BATCHES, &[("verdict", "gap")]).await >= 66.0);
    // Everything applied: the queue-depth gauge follows the workers' drain
    // (it used to keep the dispatcher's last value).
    ing.expect_metric_eq("kvroute_ingester_queue_depth", &[], 0.0)
        .await;

    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    assert!(
        !unready.load(Ordering::Relaxed),
        "/readyz failed while nothing was stalled"
    );
    for p in [pa, pb, pc] {
        p.kill().await;
    }
}
