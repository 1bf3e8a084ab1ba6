//! Malformed input from a publisher: counted on `/metrics` by reason and
//! skipped, while the good batches around it still land in the index.

use super::harness::{
    BLOCK_SIZE, Engine, Ingester, Peer, SEED, batch, connecting, gpu, keys, tokens, topic,
};
use super::{BATCHES, index, redis};
use kvroute_core::events::{BlockHash, BlockStored, Encoding, EventBatch, KvEvent, encode_batch};
use kvroute_core::keys::HashScheme;
use serde_json::json;

const MALFORMED: &str = "kvroute_ingester_malformed_total";

/// A valid payload storing `tokens` (hashes as vLLM 0.10 publishes them).
fn payload_hex(tokens: &[u32]) -> String {
    let batch = EventBatch {
        ts: 1.0,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: keys(HashScheme::Sha256Cbor64, tokens)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_counted_and_skipped_while_good_batches_land() {
    let redis = redis();
    let ing = Ingester::start(&redis.url(), &["--hash-scheme", "sha256_cbor_64bit"]).await;
    let (model, pod) = ("m", "127.0.0.16:8000");
    let idx = index(&redis, model);
    let scheme = HashScheme::Sha256Cbor64;
    let engine = Engine::new(scheme, SEED);
    let (g0, g1, g2, bad) = (tokens(90, 1), tokens(91, 1), tokens(92, 1), tokens(93, 1));
    let t = topic(pod, model);
    let (th, seq1, good) = (hex::encode(&t), "0000000000000001", payload_hex(&bad));
    let unknown = json!({"type": "BlockStoredV2", "fields": {"block_hashes": [1]}});
    let mut peer = Peer::spawn(connecting(
        &ing,
        &t,
        "v0.33",
        json!([
            batch(vec![engine.stored(None, &g0, None).0]),
            {"frames": [th, seq1]},
            {"frames": [th, "00000000000001", good]},
            {"frames": ["6b7640ff", seq1, good]},
            {"frames": [th, seq1, "c1"]},
            {"frames": [hex::encode("kv@not-a-pod@m"), seq1, good]},
            // An event type this ingester does not know, next to a known one.
            batch(vec![unknown, engine.stored(None, &g1, None).0]),
            batch(vec![engine.stored(None, &g2, None).0]),
        ]),
    ))
    .await;
    let holder = gpu(pod);
    idx.expect("sentinel", &keys(scheme, &g2), &[&holder]).await;
    idx.assert(
        "good batches",
        &[keys(scheme, &g0), keys(scheme, &g1)].concat(),
        &[&holder],
    )
    .await;
    idx.assert("nothing from malformed messages", &keys(scheme, &bad), &[])
        .await;
    // Socket-level counters reach /metrics once a second.
    for reason in ["frame_count", "seq_length", "topic_not_utf8"] {
        ing.expect_metric(MALFORMED, &[("reason", reason)], 1.0)
            .await;
    }
    for reason in [
        "frame_count",
        "seq_length",
        "topic_not_utf8",
        "bad_payload",
        "bad_topic",
    ] {
        assert_eq!(
            ing.metric(MALFORMED, &[("reason", reason)]).await,
            1.0,
            "{reason}"
        );
    }
    let skipped = [("reason", "unknown_event_type")];
    assert_eq!(
        ing.metric("kvroute_ingester_decode_skipped_total", &skipped)
            .await,
        1.0
    );
    // Malformed messages never advance the sequence: no phantom gap.
    assert_eq!(ing.metric(BATCHES, &[("verdict", "gap")]).await, 0.0);
    assert_eq!(ing.metric(BATCHES, &[("verdict", "next")]).await, 2.0);
    peer.wait_for("DONE").await;
    peer.kill().await;
}

/// Topics and strings that made a pod silently unindexed or bloated Redis:
/// a pod id without a port is indexed but warned about and counted (no
/// scorer candidate matches it); a 300-byte model name, a 10 KB topic and a
/// 10 KB medium are refused and counted, nothing of them in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_topics_and_oversized_strings_are_counted_and_refused() {
    let redis = redis();
    let ing = Ingester::start(&redis.url(), &["--hash-scheme", "sha256_cbor_64bit"]).await;
    let scheme = HashScheme::Sha256Cbor64;
    let engine = Engine::new(scheme, SEED);
    let (bare, pod) = ("127.0.0.89", "127.0.0.89:8000");
    let long_model = "m".repeat(300);
    let huge_model = "m".repeat(10_000);
    let [t1, t2, t3, t4, t5] = [891, 892, 893, 894, 895].map(|i| tokens(i, 1));
    let store = |t: &[u32], medium: Option<&str>| batch(vec![engine.stored(None, t, medium).0]);
    let huge_medium = "x".repeat(10_000);
    let peer = Peer::spawn(connecting(
        &ing,
        &topic(bare, "m"),
        "v0.33",
        json!([
            store(&t1, None),
            store(&t1, None),
            {"topic": topic(pod, &long_model)},
            store(&t2, None),
            {"topic": topic(pod, &huge_model)},
            store(&t3, None),
            {"topic": topic(pod, "m")},
            store(&t4, Some(&huge_medium)),
            store(&t5, None),
        ]),
    ))
    .await;
    let idx = index(&redis, "m");
    idx.expect("the sentinel", &keys(scheme, &t5), &[&gpu(pod)])
        .await;
    idx.assert(
        "indexed under the bare IP",
        &keys(scheme, &t1),
        &[&gpu(bare)],
    )
    .await;
    idx.assert("a 10 KB medium refused", &keys(scheme, &t4), &[])
        .await;
    let long = index(&redis, &long_model);
    long.assert("a 300-byte model refused", &keys(scheme, &t2), &[])
        .await;
    const WARNINGS: &str = "kvroute_ingester_topic_warnings_total";
    assert_eq!(ing.metric(WARNINGS, &[("reason", "no_port")]).await, 2.0);
    assert_eq!(
        ing.metric(WARNINGS, &[("reason", "model_too_long")]).await,
        1.0
    );
    assert_eq!(ing.metric(WARNINGS, &[("reason", "too_long")]).await, 1.0);
    for reason in ["model_too_long", "topic_too_long", "medium_too_long"] {
        assert_eq!(
            ing.metric(MALFORMED, &[("reason", reason)]).await,
            1.0,
            "{reason}"
        );
    }
    peer.kill().await;
}

/// vLLM's default topic is empty; with the default `--topic-filter kv@` the
/// publisher drops every message itself, so nothing reaches the ingester
/// and before, nothing said why. A publisher connected while nothing
/// arrives is now warned about and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_publisher_with_vllms_empty_topic_is_reported() {
    let redis = redis();
    let ing = Ingester::start(
        &redis.url(),
        &[
            "--hash-scheme",
            "sha256_cbor_64bit",
            "--warn-silent-publishers-after",
            "300ms",
        ],
    )
    .await;
    let mut script = connecting(&ing, "", "v0.33", json!([{"publish": 5}]));
    script["forever_interval_ms"] = json!(100);
    let mut peer = Peer::spawn(script).await;
    peer.wait_for("DONE").await;
    ing.expect_metric(
        "kvroute_ingester_topic_warnings_total",
        &[("reason", "nothing_received")],
        1.0,
    )
    .await;
    assert_eq!(
        ing.metric("kvroute_ingester_messages_received_total", &[])
            .await,
        0.0
    );
    peer.kill().await;
}
