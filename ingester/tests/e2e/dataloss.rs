//! Redis restarted empty, or from an older dump, under the running
//! ingester: `kvroute:epoch` (an id set once, a counter every ingester
//! bumps) shows it, and the ingester clears its pods and rebuilds them from
//! their replay buffers, so blocks lost come back and removed blocks that
//! came back with the old dump go again. Keying and models are written again.
//!
//! Before, nothing noticed: the blocks stored before the restart stayed
//! missing (empty restart) and removed blocks stayed in the index (old dump).

use super::harness::{
    Engine, Index, Ingester, Peer, SEED, batch, bind_endpoint, gpu, keys, removed, tokens, topic,
    until,
};
use super::{index, redis};
use kvroute_core::keys::HashScheme;
use kvroute_testkit::redis_server::RedisServer;
use serde_json::{Value, json};

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;
const DATA_LOSS: &str = "kvroute_ingester_redis_data_loss_total";

/// `HGET key field` as text, when present.
async fn hget(idx: &Index, key: &str, field: &str) -> Result<Option<String>, String> {
    match idx.command(&["HGET", key, field]).await? {
        redis::Value::BulkString(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        redis::Value::Nil => Ok(None),
        other => Err(format!("{other:?}")),
    }
}

/// The epoch counter in Redis, once the ingester has set it.
async fn counter(idx: &Index) -> Result<i64, String> {
    hget(idx, "kvroute:epoch", "counter")
        .await?
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "no counter yet".to_string())
}

/// Waits until the ingester has bumped the counter past `above`.
async fn counted_past(idx: &Index, above: i64) {
    until(&format!("the epoch counter above {above}"), || async move {
        match counter(idx).await? {
            n if n > above => Ok(()),
            n => Err(format!("{n}")),
        }
    })
    .await
}

/// A publisher with a replay socket on `ip`, connecting to the ingester's
/// `zmq`, and the ingester replaying from it; checks every 200 ms.
async fn with_replay(redis: &RedisServer, ip: &str, steps: Vec<Value>) -> (Peer, Ingester) {
    let zmq = bind_endpoint();
    let peer = Peer::spawn(json!({
        "topic": topic(&format!("{ip}:8000"), "m"), "encoding": "v0.33",
        "pub": zmq, "pub_mode": "connect", "replay": format!("tcp://{ip}:0"),
        "await_subscriber_ms": 8000, "steps": steps,
    }))
    .await;
    let port = peer
        .replay_ep
        .as_deref()
        .and_then(|ep| ep.rsplit(':').next())
        .expect("replay port")
        .to_owned();
    let template = format!("tcp://{{host}}:{port}");
    let ing = Ingester::start_bound(
        &redis.url(),
        &zmq,
        &[
            "--hash-scheme",
            SCHEME.as_str(),
            "--replay-endpoint",
            &template,
            "--redis-epoch-interval",
            "200ms",
        ],
    )
    .await;
    (peer, ing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_is_detected_and_the_pods_rebuilt_from_replay() {
    let mut redis = redis();
    let idx = index(&redis, "m");
    let engine = Engine::new(SCHEME, SEED);
    let t: Vec<Vec<u32>> = (0..3).map(|i| tokens(810 + i, 1)).collect();
    let store = |t: &[u32]| batch(vec![engine.stored(None, t, None).0]);
    let steps = vec![
        store(&t[0]),
        store(&t[1]),
        json!({"wait": "after"}),
        store(&t[2]),
    ];
    let (mut peer, ing) = with_replay(&redis, "127.0.0.81", steps).await;
    let holder = gpu("127.0.0.81:8000");
    idx.expect("t0", &keys(SCHEME, &t[0]), &[&holder]).await;
    idx.expect("t1", &keys(SCHEME, &t[1]), &[&holder]).await;
    counted_past(&idx, 1).await;

    redis.restart().expect("restart redis-server empty");
    ing.expect_metric(DATA_LOSS, &[("kind", "epoch_missing")], 1.0)
        .await;
    idx.expect("t0 rebuilt", &keys(SCHEME, &t[0]), &[&holder])
        .await;
    idx.expect("t1 rebuilt", &keys(SCHEME, &t[1]), &[&holder])
        .await;
    ing.expect_metric("kvroute_ingester_rebuilds_total", &[("outcome", "ok")], 1.0)
        .await;
    // The bookkeeping the scorers read is back too.
    until("kvroute:keying rewritten", || async {
        match hget(&idx, "kvroute:keying", "hash_scheme").await? {
            Some(s) if s == SCHEME.as_str() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    until("kvroute:models rewritten", || async {
        hget(&idx, "kvroute:models", "m")
            .await?
            .ok_or_else(|| "absent".to_string())
    })
    .await;
    peer.resume("after").await;
    idx.expect("t2 live after", &keys(SCHEME, &t[2]), &[&holder])
        .await;
    assert_eq!(ing.metric(DATA_LOSS, &[]).await, 1.0, "detected once");
    peer.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restored_from_an_older_dump_is_detected_and_the_pods_rebuilt() {
    let mut redis = redis();
    let idx = index(&redis, "m");
    let engine = Engine::new(SCHEME, SEED);
    let t: Vec<Vec<u32>> = (0..3).map(|i| tokens(820 + i, 1)).collect();
    let (store0, states0) = engine.stored(None, &t[0], None);
    let store = |t: &[u32]| batch(vec![engine.stored(None, t, None).0]);
    let steps = vec![
        batch(vec![store0]),
        json!({"wait": "change"}),
        batch(vec![removed(&states0)]),
        store(&t[1]),
        json!({"wait": "after"}),
        store(&t[2]),
    ];
    let (mut peer, ing) = with_replay(&redis, "127.0.0.82", steps).await;
    let holder = gpu("127.0.0.82:8000");
    idx.expect("t0", &keys(SCHEME, &t[0]), &[&holder]).await;
    counted_past(&idx, 1).await;
    // The dump: t0 held. Then the ingester counts past it...
    idx.command(&["SAVE"]).await.expect("SAVE");
    let saved = counter(&idx).await.expect("counter");
    counted_past(&idx, saved).await;
    // ...and the data changes: t0 removed, t1 stored.
    peer.resume("change").await;
    idx.expect("t1", &keys(SCHEME, &t[1]), &[&holder]).await;
    idx.assert("t0 removed", &keys(SCHEME, &t[0]), &[]).await;

    // Restarted from the old dump: t0 back, t1 missing, the counter behind.
    redis.restart().expect("restart redis-server from its dump");
    ing.expect_metric(DATA_LOSS, &[("kind", "counter_rewound")], 1.0)
        .await;
    // Cleared and rebuilt in order: t1's store follows t0's removal.
    idx.expect("t1 rebuilt", &keys(SCHEME, &t[1]), &[&holder])
        .await;
    idx.assert("t0 removed again", &keys(SCHEME, &t[0]), &[])
        .await;
    peer.resume("after").await;
    idx.expect("t2 live after", &keys(SCHEME, &t[2]), &[&holder])
        .await;
    assert_eq!(ing.metric(DATA_LOSS, &[]).await, 1.0, "detected once");
    peer.kill().await;
}
