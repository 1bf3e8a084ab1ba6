//! Single node: ClearPod without SCAN, batch order, and recovery from
//! SCRIPT FLUSH and an external FLUSHALL.

use crate::common::*;
use kvroute_core::ids::{BlockKey, ModelName, Tier};
use kvroute_core::index::{Index, IndexOp};
use kvroute_redis::RedisIndex;
use kvroute_testkit::redis_server::RedisServer;
use redis::AsyncCommands;
use std::collections::BTreeSet;

#[tokio::test]
async fn clear_pod_empties_every_model_and_tier_without_scan() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    let other = ModelName::new("other-model");
    let keys: Vec<u64> = (1000..1300).collect();
    let mut ops = vec![
        store_engine(
            pod_a(),
            &keys.iter().map(|&k| (k, k + 1_000_000)).collect::<Vec<_>>(),
        ),
        store(pod_a(), Tier::cpu(), &keys[..50]),
        store(pod_b(), Tier::gpu(), &keys[..10]),
    ];
    ops.push(IndexOp::Store {
        model: other.clone(),
        pod: pod_a(),
        tier: Tier::gpu(),
        blocks: blocks(&keys[..20]),
    });
    index.apply(&ops).await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();

    let stats = index
        .apply_with_stats(&[IndexOp::ClearPod { pod: pod_a() }])
        .await
        .unwrap();
    assert_eq!(
        stats.round_trips, 4,
        "registry, entries, scripts, engine DELs: {stats:?}"
    );
    assert_eq!(calls_of(&mut conn, "scan").await, 0);
    assert_eq!(calls_of(&mut conn, "keys").await, 0);
    assert!(calls_of(&mut conn, "evalsha").await > 0);

    for &k in &keys[..10] {
        assert_eq!(
            hkeys(&mut conn, &name(k)).await,
            set(&["127.0.0.12:8000#dp1@gpu"])
        );
        // b still holds it, so a's engine mapping stays with the block.
        assert!(
            conn.exists::<_, bool>(engine_name(k + 1_000_000))
                .await
                .unwrap()
        );
    }
    for &k in &keys[10..] {
        assert!(
            !conn.exists::<_, bool>(name(k)).await.unwrap(),
            "block {k} left behind"
        );
        assert!(
            !conn
                .exists::<_, bool>(engine_name(k + 1_000_000))
                .await
                .unwrap()
        );
    }
    let other_keys: Vec<String> = conn.keys(format!("{other}@*")).await.unwrap();
    assert!(other_keys.is_empty(), "{other_keys:?}");
    let l = index
        .lookup(
            &model(),
            &keys[..10].iter().map(|&k| BlockKey(k)).collect::<Vec<_>>(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(l.pods.len(), 1);
    assert_eq!((l.pods[0].pod.clone(), l.pods[0].depth), (pod_b(), 10));
}

#[tokio::test]
async fn batches_split_at_clear_pod_and_apply_in_order() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    index
        .apply(&[
            store(pod_a(), Tier::gpu(), &[1, 2]),
            IndexOp::ClearPod { pod: pod_a() },
            store(pod_a(), Tier::gpu(), &[3]),
            remove(pod_a(), Tier::gpu(), by_key(&[3])),
            store(pod_a(), Tier::gpu(), &[4]),
        ])
        .await
        .unwrap();
    let keys: BTreeSet<String> = conn
        .keys::<_, Vec<String>>(format!("{}@*", model()))
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(keys, set(&[&name(4)]));
}

#[tokio::test]
async fn scripts_are_reloaded_after_script_flush() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    index
        .apply(&[store(pod_a(), Tier::gpu(), &[1, 2, 3])])
        .await
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stats = index
        .apply_with_stats(&[
            store(pod_b(), Tier::gpu(), &[1, 2]),
            remove(pod_a(), Tier::gpu(), by_key(&[3])),
        ])
        .await
        .unwrap();
    assert_eq!(stats.round_trips, 2, "NOSCRIPT, reload, resend: {stats:?}");
    assert_eq!(index.stats().noscript_reloads, 1);
    assert_eq!(
        hkeys(&mut conn, &name(1)).await,
        set(&["127.0.0.11:8000@gpu", "127.0.0.12:8000#dp1@gpu"])
    );
    assert!(!conn.exists::<_, bool>(name(3)).await.unwrap());
    // And after a flush between calls of ClearPod's script too.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    index
        .apply(&[IndexOp::ClearPod { pod: pod_a() }])
        .await
        .unwrap();
    assert_eq!(
        hkeys(&mut conn, &name(1)).await,
        set(&["127.0.0.12:8000#dp1@gpu"])
    );
    assert_eq!(index.stats().noscript_reloads, 2);
}

#[tokio::test]
async fn slot_registrations_survive_an_external_flushall() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    let keys: Vec<u64> = (1..40).collect();
    index
        .apply(&[store(pod_a(), Tier::gpu(), &keys)])
        .await
        .unwrap();
    // Behind the index's back: its cache still believes the slots registered.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let stats = index
        .apply_with_stats(&[store(pod_a(), Tier::gpu(), &keys)])
        .await
        .unwrap();
    assert_eq!(
        stats.round_trips, 2,
        "the scripts report fresh entries, the slots are registered again"
    );
    index
        .apply(&[IndexOp::ClearPod { pod: pod_a() }])
        .await
        .unwrap();
    let left: Vec<String> = conn.keys(format!("{}@*", model())).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}
