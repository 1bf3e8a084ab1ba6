//! Clear-and-rebuild from replay: a pod whose operations were shed during a
//! Redis outage is cleared once Redis is back, then rebuilt from what its
//! vLLM replay socket still buffers, in publication order.

use super::harness::{
    Engine, Ingester, Peer, SEED, batch, bind_endpoint, gpu, keys, removed, tokens, topic,
};
use super::{BATCHES, index, redis};
use kvroute_core::keys::HashScheme;
use serde_json::{Value, json};

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_pod_is_rebuilt_from_its_replay_buffer_after_the_outage() {
    let mut redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let engine = Engine::new(SCHEME, SEED);
    let ip = "127.0.0.97";
    let pod = format!("{ip}:8000");
    let t: Vec<Vec<u32>> = (0..9).map(|i| tokens(970 + i, 1)).collect();
    let (store1, states1) = engine.stored(None, &t[1], None);
    let mut steps: Vec<Value> = vec![
        batch(vec![engine.stored(None, &t[0], None).0]),
        batch(vec![store1]),
        json!({"wait": "outage"}),
        batch(vec![removed(&states1)]),
        json!({"wait": "burst"}),
    ];
    steps.extend((2..8).map(|i| batch(vec![engine.stored(None, &t[i], None).0])));
    steps.push(json!({"wait": "after"}));
    steps.push(batch(vec![engine.stored(None, &t[8], None).0]));

    let zmq = bind_endpoint();
    let mut peer = Peer::spawn(json!({
        "topic": topic(&pod, model), "encoding": "v0.33", "replay_shape": "v0.33",
        "replay": format!("tcp://{ip}:0"), "pub": zmq, "pub_mode": "connect",
        "await_subscriber_ms": 8000, "steps": steps,
    }))
    .await;
    let port: u16 = peer
        .replay_ep
        .as_deref()
        .and_then(|ep| ep.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("replay port");
    let template = format!("tcp://{{host}}:{port}");
    // One worker and a bound of 4 pending ops: the outage's 7 batches shed
    // the pod.
    let ing = Ingester::start_bound(
        &redis.url(),
        &zmq,
        &[
            "--hash-scheme",
            SCHEME.as_str(),
            "--workers",
            "1",
            "--max-pending-ops",
            "4",
            "--replay-endpoint",
            &template,
        ],
    )
    .await;
    let holder = gpu(&pod);
    let k = |i: usize| keys(SCHEME, &t[i]);
    idx.expect("t0", &k(0), &[&holder]).await;
    idx.expect("t1", &k(1), &[&holder]).await;

    redis.kill();
    ing.wait_ready(false).await;
    // The removal alone until its write has failed seven times (the next
    // retry is then 3.2 s away), so the six stores after it are all pending
    // at once and overflow the bound, however many batches a write in
    // flight would otherwise have taken.
    peer.resume("outage").await;
    peer.wait_for("WAITING burst").await;
    ing.expect_metric(
        "kvroute_ingester_index_writes_total",
        &[("outcome", "error")],
        7.0,
    )
    .await;
    peer.resume("burst").await;
    peer.wait_for("WAITING after").await;
    ing.expect_metric(BATCHES, &[], 9.0).await;
    // Counted on arrival, shed when the worker takes it: wait for the shed.
    ing.expect_metric("kvroute_ingester_dropped_ops_total", &[], 1.0)
        .await;

    // Redis comes back empty: the pod is cleared, then rebuilt from its
    // buffer (batches 0..8), so blocks written before the outage and blocks
    // shed during it are back, and t1's removal applies after its store.
    redis.restart().expect("restart redis-server");
    ing.wait_ready(true).await;
    for i in [0, 2, 3, 4, 5, 6, 7] {
        idx.expect(&format!("t{i} rebuilt"), &k(i), &[&holder])
            .await;
    }
    idx.assert("t1 stays removed", &k(1), &[]).await;
    assert_eq!(
        ing.metric("kvroute_ingester_rebuilds_total", &[("outcome", "ok")])
            .await,
        1.0
    );
    assert_eq!(
        ing.metric("kvroute_ingester_rebuilt_batches_total", &[])
            .await,
        9.0
    );
    // Live batches continue after the rebuild.
    peer.resume("after").await;
    idx.expect("t8 live after the rebuild", &k(8), &[&holder])
        .await;
    peer.kill().await;
}
