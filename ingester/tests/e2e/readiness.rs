//! `/readyz` beyond PING: a Redis that answers PING but refuses writes
//! (out of memory) makes the ingester unready with the reason in the body,
//! and so does a Redis that is gone; both recover once writes succeed.

use super::harness::{
    Engine, Ingester, Peer, SEED, batch, bind_endpoint, connecting, gpu, keys, tokens, topic,
};
use super::{index, redis};
use kvroute_core::keys::HashScheme;
use serde_json::json;

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_failing_writes_and_a_lost_redis_then_recovers() {
    let mut redis = redis();
    let ing = Ingester::start(
        &redis.url(),
        &["--hash-scheme", SCHEME.as_str(), "--workers", "1"],
    )
    .await;
    let (model, pod) = ("m", "127.0.0.91:8000");
    let idx = index(&redis, model);
    let engine = Engine::new(SCHEME, SEED);
    let store = |t: &[u32]| batch(vec![engine.stored(None, t, None).0]);
    let sets = [tokens(910, 1), tokens(911, 1), tokens(912, 1)];
    let mut peer = Peer::spawn(connecting(
        &ing,
        &topic(pod, model),
        "v0.10",
        json!([store(&sets[0]), {"wait": "oom"}, store(&sets[1]), {"wait": "down"}, store(&sets[2])]),
    ))
    .await;
    let holder = gpu(pod);
    idx.expect("S0", &keys(SCHEME, &sets[0]), &[&holder]).await;
    let body = ing.wait_readyz(200, &[]).await;
    assert_eq!(body, "index: ok\nwrites: ok\nsockets: ok\npipeline: ok\n");

    // Redis still answers PING but refuses every write.
    idx.command(&["CONFIG", "SET", "maxmemory", "1"])
        .await
        .expect("CONFIG SET maxmemory");
    peer.resume("oom").await;
    let body = ing
        .wait_readyz(
            503,
            &[
                "index: ok\n",
                "writes: failing: the last ",
                "OOM",
                "sockets: ok\n",
            ],
        )
        .await;
    assert!(body.contains("index writes failed"), "{body}");
    idx.assert(
        "S1 not written while Redis refuses writes",
        &keys(SCHEME, &sets[1]),
        &[],
    )
    .await;
    idx.command(&["CONFIG", "SET", "maxmemory", "0"])
        .await
        .expect("CONFIG SET maxmemory 0");
    // The worker's retry writes the held batch; readiness follows.
    idx.expect(
        "S1 written once Redis takes writes",
        &keys(SCHEME, &sets[1]),
        &[&holder],
    )
    .await;
    ing.wait_readyz(200, &["writes: ok\n"]).await;

    // Redis gone: PING fails, and so do the writes of what arrives meanwhile.
    redis.kill();
    peer.resume("down").await;
    ing.wait_readyz(
        503,
        &["index: failing: PING failed", "writes: failing: the last "],
    )
    .await;
    redis.restart().expect("restart redis-server");
    idx.expect(
        "S2 written after the restart",
        &keys(SCHEME, &sets[2]),
        &[&holder],
    )
    .await;
    let body = ing.wait_readyz(200, &[]).await;
    assert_eq!(body, "index: ok\nwrites: ok\nsockets: ok\npipeline: ok\n");
    peer.kill().await;
}

/// Started while Redis is down: unready, saying that the index is not
/// connected; the sockets are bound already (they bind before the index, so
/// what pods publish meanwhile is held: `startup.rs`); ready once Redis
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_explains_a_startup_waiting_for_redis() {
    let mut redis = redis();
    redis.kill();
    let ing = Ingester::spawn(
        &redis.url(),
        &[
            "--zmq-bind",
            &bind_endpoint(),
            "--hash-scheme",
            SCHEME.as_str(),
        ],
        String::new(),
    )
    .await;
    let body = ing
        .wait_readyz(
            503,
            &["index: failing: not connected yet\n", "sockets: ok\n"],
        )
        .await;
    assert!(body.contains("writes: "), "{body}");
    redis.restart().expect("restart redis-server");
    let body = ing.wait_readyz(200, &[]).await;
    assert_eq!(body, "index: ok\nwrites: ok\nsockets: ok\npipeline: ok\n");
}
