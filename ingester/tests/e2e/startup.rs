//! Startup with Redis down: the sockets are up before the index, batches
//! received meanwhile are held (bounded by `--startup-buffer`) and applied
//! once Redis answers; past the bound they are dropped, counted, and handled
//! as a sequence gap (replayed from the pod's replay socket).
//!
//! Before, the ingester bound its SUB only after the index connected: a pod
//! publishing meanwhile found no subscriber and its events were lost.

use super::harness::{
    Engine, Ingester, Peer, SEED, batch, bind_endpoint, gpu, keys, tokens, topic,
};
use super::{index, redis};
use kvroute_core::keys::HashScheme;
use serde_json::{Value, json};

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;
const RECEIVED: &str = "kvroute_ingester_messages_received_total";

/// One single-block store per token set.
fn stores(sets: &[Vec<u32>]) -> Vec<Value> {
    let engine = Engine::new(SCHEME, SEED);
    sets.iter()
        .map(|t| batch(vec![engine.stored(None, t, None).0]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_before_redis_answers_are_indexed_once_it_does() {
    let mut redis = redis();
    // Nothing listens on the port until the restart below.
    redis.kill();
    let (model, pod) = ("m", "127.0.0.71:8000");
    let idx = index(&redis, model);
    let zmq = bind_endpoint();
    let ing = Ingester::spawn(
        &redis.url(),
        &["--zmq-bind", &zmq, "--hash-scheme", SCHEME.as_str()],
        zmq.clone(),
    )
    .await;
    ing.wait_readyz(503, &["index: failing", "sockets: ok"])
        .await;
    let t: Vec<Vec<u32>> = (0..3).map(|i| tokens(710 + i, 1)).collect();
    let mut peer = Peer::spawn(json!({
        "topic": topic(pod, model), "encoding": "v0.33", "pub": zmq, "pub_mode": "connect",
        "await_subscriber_ms": 8000, "steps": stores(&t),
    }))
    .await;
    peer.wait_for("DONE").await;
    ing.expect_metric(RECEIVED, &[], 3.0).await;

    redis.restart().expect("start redis-server");
    ing.wait_ready(true).await;
    let holder = gpu(pod);
    for (i, tokens) in t.iter().enumerate() {
        idx.expect(
            &format!("batch {i} published before Redis"),
            &keys(SCHEME, tokens),
            &[&holder],
        )
        .await;
    }
    assert_eq!(
        ing.metric("kvroute_ingester_startup_dropped_batches_total", &[])
            .await,
        0.0
    );
    assert_eq!(
        ing.metric("kvroute_ingester_batches_total", &[("verdict", "gap")])
            .await,
        0.0
    );
    peer.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_past_the_startup_buffer_are_a_gap_refilled_from_replay() {
    let mut redis = redis();
    redis.kill();
    let model = "m";
    let ip = "127.0.0.72";
    let pod = format!("{ip}:8000");
    let idx = index(&redis, model);
    let zmq = bind_endpoint();
    let t: Vec<Vec<u32>> = (0..4).map(|i| tokens(720 + i, 1)).collect();
    let mut steps = stores(&t[..3]);
    steps.push(json!({"wait": "live"}));
    steps.extend(stores(&t[3..]));
    let mut peer = Peer::spawn(json!({
        "topic": topic(&pod, model), "encoding": "v0.33", "pub": zmq, "pub_mode": "connect",
        "replay": format!("tcp://{ip}:0"), "await_subscriber_ms": 8000, "steps": steps,
    }))
    .await;
    let port = peer
        .replay_ep
        .as_deref()
        .and_then(|ep| ep.rsplit(':').next())
        .expect("replay port")
        .to_owned();
    let template = format!("tcp://{{host}}:{port}");
    // A buffer no batch fits in: all three are dropped.
    let ing = Ingester::spawn(
        &redis.url(),
        &[
            "--zmq-bind",
            &zmq,
            "--hash-scheme",
            SCHEME.as_str(),
            "--startup-buffer",
            "1B",
            "--replay-endpoint",
            &template,
        ],
        zmq.clone(),
    )
    .await;
    peer.wait_for("WAITING live").await;
    ing.expect_metric_eq("kvroute_ingester_startup_dropped_batches_total", &[], 3.0)
        .await;

    redis.restart().expect("start redis-server");
    ing.wait_ready(true).await;
    peer.resume("live").await;
    let holder = gpu(&pod);
    idx.expect("the live batch", &keys(SCHEME, &t[3]), &[&holder])
        .await;
    for (i, tokens) in t[..3].iter().enumerate() {
        idx.assert(
            &format!("dropped batch {i}, replayed"),
            &keys(SCHEME, tokens),
            &[&holder],
        )
        .await;
    }
    assert_eq!(
        ing.metric("kvroute_ingester_batches_total", &[("verdict", "gap")])
            .await,
        1.0
    );
    assert_eq!(
        ing.metric("kvroute_ingester_replays_total", &[("outcome", "ok")])
            .await,
        1.0
    );
    assert_eq!(
        ing.metric("kvroute_ingester_gap_batches_total", &[]).await,
        0.0
    );
    peer.kill().await;
}
