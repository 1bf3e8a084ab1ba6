//! Spoofed or corrupt sequence numbers and timestamps from a real ZeroMQ
//! publisher: skipped and counted, with no effect on the pod's stream.

use super::harness::{BLOCK_SIZE, Ingester, Peer, connecting, gpu, keys, tokens, topic};
use super::{BATCHES, index, redis};
use kvroute_core::events::{BlockHash, BlockStored, Encoding, EventBatch, KvEvent, encode_batch};
use kvroute_core::keys::HashScheme;
use serde_json::json;
use std::time::{SystemTime, UNIX_EPOCH};

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;
const MALFORMED: &str = "kvroute_ingester_malformed_total";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// A store of `tokens` (hashes as vLLM 0.10 publishes them) stamped `ts`.
fn stored(tokens: &[u32], ts: f64) -> String {
    let batch = EventBatch {
        ts,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: keys(SCHEME, tokens)
                .iter()
                .map(|k| BlockHash::U64(k.0))
                .collect(),
            token_ids: tokens.to_vec(),
            block_size: BLOCK_SIZE as u32,
            ..Default::default()
        })],
        data_parallel_rank: None,
    };
    hex::encode(encode_batch(&batch, Encoding::Map))
}

fn seq(n: u64) -> String {
    hex::encode(n.to_be_bytes())
}

/// Before: one batch at seq + 2^63 added 9.2e18 to the gap counter and made
/// the pod's real next batch a "restart" (its entries cleared); one stamped
/// `ts=1.0` added 1.8e9 s to the lag histogram. Now both are skipped and
/// counted and the pod's stream goes on untouched. A publisher that really
/// jumped (two consecutive batches far ahead) is taken as a new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_sequence_jumps_and_timestamps_are_skipped() {
    let redis = redis();
    let ing = Ingester::start(&redis.url(), &["--hash-scheme", SCHEME.as_str()]).await;
    let (model, pod) = ("m", "127.0.0.88:8000");
    let idx = index(&redis, model);
    let t = topic(pod, model);
    let th = hex::encode(&t);
    let [a, b, x, c, d, e, f] = [880, 881, 882, 883, 884, 885, 886].map(|i| tokens(i, 1));
    let jump = 1u64 << 40;
    let mut peer = Peer::spawn(connecting(
        &ing,
        &t,
        "v0.10",
        json!([
            {"frames": [th, seq(0), stored(&a, now())]},
            // Spoofed: far ahead, then stamped at 1970.
            {"frames": [th, seq(1 + (1 << 63)), stored(&x, now())]},
            {"frames": [th, seq(1), stored(&c, 1.0)]},
            {"frames": [th, seq(1), stored(&b, now())]},
            {"frames": [th, seq(2), stored(&d, now())]},
            {"wait": "jump"},
            // The publisher's numbering really jumps: two batches in a row.
            {"frames": [th, seq(jump), stored(&e, now())]},
            {"frames": [th, seq(jump + 1), stored(&f, now())]},
        ]),
    ))
    .await;
    let holder = gpu(pod);
    idx.expect("the sentinel", &keys(SCHEME, &d), &[&holder])
        .await;
    idx.assert(
        "the real stream, never cleared",
        &[keys(SCHEME, &a), keys(SCHEME, &b)].concat(),
        &[&holder],
    )
    .await;
    idx.assert(
        "nothing of the absurd batches",
        &[keys(SCHEME, &x), keys(SCHEME, &c)].concat(),
        &[],
    )
    .await;
    assert_eq!(ing.metric(MALFORMED, &[("reason", "seq_jump")]).await, 1.0);
    assert_eq!(
        ing.metric(MALFORMED, &[("reason", "bad_timestamp")]).await,
        1.0
    );
    assert_eq!(
        ing.metric("kvroute_ingester_restarts_total", &[]).await,
        0.0
    );
    assert_eq!(
        ing.metric("kvroute_ingester_gap_batches_total", &[]).await,
        0.0
    );
    assert_eq!(ing.metric(BATCHES, &[("verdict", "gap")]).await, 0.0);
    assert!(ing.metric("kvroute_ingester_lag_seconds_count", &[]).await >= 1.0);
    let lag = ing.metric("kvroute_ingester_lag_seconds_sum", &[]).await;
    assert!(lag < 3600.0, "lag histogram sum {lag} s");

    peer.resume("jump").await;
    idx.expect(
        "the jumped stream's second batch",
        &keys(SCHEME, &f),
        &[&holder],
    )
    .await;
    idx.assert(
        "cleared as a new stream",
        &[keys(SCHEME, &a), keys(SCHEME, &d), keys(SCHEME, &e)].concat(),
        &[],
    )
    .await;
    assert_eq!(ing.metric(MALFORMED, &[("reason", "seq_jump")]).await, 2.0);
    assert_eq!(ing.metric(BATCHES, &[("verdict", "resync")]).await, 1.0);
    peer.kill().await;
}
