//! `kvroute:keying` and `kvroute:models` (the Redis contract the scorers
//! read): published by the ingester once the index answers; a second
//! ingester with another seed does not overwrite the keying and reports the
//! conflict (`kvroute_ingester_keying_conflict` = 1).

use super::harness::{
    Engine, Index, Ingester, Peer, SEED, batch, connecting, tokens, topic, until,
};
use super::{index, redis};
use kvroute_core::keys::HashScheme;
use serde_json::json;
use std::collections::HashMap;

const CONFLICT: &str = "kvroute_ingester_keying_conflict";

async fn hgetall(idx: &Index, key: &str) -> Result<HashMap<String, String>, String> {
    let v = idx.command(&["HGETALL", key]).await?;
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    };
    match v {
        redis::Value::Map(pairs) => Ok(pairs.iter().map(|(k, v)| (text(k), text(v))).collect()),
        redis::Value::Array(flat) => Ok(flat
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (text(&c[0]), text(&c[1])))
            .collect()),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keying_and_models_are_published_and_another_seed_does_not_overwrite() {
    let redis = redis();
    let model = "org/model-k";
    let idx = index(&redis, model);
    let scheme = HashScheme::Sha256Cbor64;
    let a = Ingester::start(
        &redis.url(),
        &[
            "--hash-scheme",
            scheme.as_str(),
            "--redis-epoch-interval",
            "200ms",
        ],
    )
    .await;
    let keying = until("kvroute:keying", || async {
        let h = hgetall(&idx, "kvroute:keying").await?;
        if h.contains_key("hash_scheme") {
            Ok(h)
        } else {
            Err(format!("{h:?}"))
        }
    })
    .await;
    assert_eq!(keying["hash_scheme"], scheme.as_str());
    assert_eq!(keying["hash_seed"], SEED);
    assert_eq!(keying["block_size"], "16");
    assert!(!keying["writer"].is_empty(), "{keying:?}");
    assert!(keying["updated_ms"].parse::<u64>().is_ok(), "{keying:?}");
    a.expect_metric_eq(CONFLICT, &[], 0.0).await;

    // A model is registered once the ingester indexes it.
    let engine = Engine::new(scheme, SEED);
    let peer = Peer::spawn(connecting(
        &a,
        &topic("127.0.0.91:8000", model),
        "v0.33",
        json!([batch(vec![engine.stored(None, &tokens(910, 1), None).0])]),
    ))
    .await;
    let models = until("kvroute:models", || async {
        let h = hgetall(&idx, "kvroute:models").await?;
        if h.contains_key(model) {
            Ok(h)
        } else {
            Err(format!("{h:?}"))
        }
    })
    .await;
    assert!(models[model].parse::<u64>().is_ok(), "{models:?}");

    // Another seed: not written over, and said.
    let b = Ingester::start(
        &redis.url(),
        &[
            "--hash-scheme",
            scheme.as_str(),
            "--hash-seed",
            "7",
            "--redis-epoch-interval",
            "200ms",
        ],
    )
    .await;
    b.expect_metric_eq(CONFLICT, &[], 1.0).await;
    assert_eq!(
        hgetall(&idx, "kvroute:keying").await.expect("keying"),
        keying
    );
    assert_eq!(a.metric(CONFLICT, &[]).await, 0.0);
    peer.kill().await;
}
