//! Single node: stores, removes and engine mappings, as llm-d and redis-cli see them.

use crate::common::*;
use kvroute_core::ids::{BlockKey, EngineHash, Tier};
use kvroute_core::index::{BlockRef, Index};
use kvroute_redis::{RedisIndex, key_slot};
use kvroute_testkit::redis_server::RedisServer;
use redis::AsyncCommands;
use std::collections::BTreeSet;

#[tokio::test]
async fn store_writes_the_llm_d_layout() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    index
        .apply(&[
            store(pod_a(), Tier::gpu(), &[1, 2, 3]),
            store(pod_b(), Tier::cpu(), &[1, 2]),
        ])
        .await
        .unwrap();

    assert_eq!(
        hkeys(&mut conn, &name(1)).await,
        set(&["127.0.0.11:8000@gpu", "127.0.0.12:8000#dp1@cpu"])
    );
    assert_eq!(
        hkeys(&mut conn, &name(3)).await,
        set(&["127.0.0.11:8000@gpu"])
    );
    let value: String = conn.hget(name(1), "127.0.0.11:8000@gpu").await.unwrap();
    assert_eq!(value, "", "field values are empty");
    let layout: String = conn.get("kvroute:layout").await.unwrap();
    assert_eq!(layout, "1");
    let pods: BTreeSet<String> = conn.smembers("kvroute:pods").await.unwrap();
    assert_eq!(pods, set(&["127.0.0.11:8000", "127.0.0.12:8000#dp1"]));
    // The pod's per-slot entry sits under the tag of the block's slot.
    let tag = kvroute_redis::tag_for_slot(key_slot(name(3).as_bytes()));
    let entries = hkeys(&mut conn, &format!("kvroute:{{{tag}}}:pod:127.0.0.11:8000")).await;
    assert!(entries.contains(&format!("gpu|{}", name(3))), "{entries:?}");
    let tags: BTreeSet<String> = conn
        .smembers("kvroute:pod:127.0.0.11:8000:slots")
        .await
        .unwrap();
    assert!(tags.contains(tag));
    // No engine mappings: every engine hash equalled the key.
    let engine_keys: Vec<String> = conn.keys("engine:*").await.unwrap();
    assert!(engine_keys.is_empty());

    let l = index
        .lookup(&model(), &[BlockKey(1), BlockKey(2), BlockKey(3)], None)
        .await
        .unwrap();
    assert_eq!(l.pods.len(), 2);
    assert_eq!((l.pods[0].pod.clone(), l.pods[0].depth), (pod_a(), 3));
    assert_eq!((l.pods[1].pod.clone(), l.pods[1].depth), (pod_b(), 2));
    assert_eq!(l.pods[1].tiers, vec![(Tier::cpu(), 2)]);
}

#[tokio::test]
async fn store_is_idempotent_and_one_round_trip_per_batch() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    let keys: Vec<u64> = (100..164).collect();
    let first = index
        .apply_with_stats(&[store(pod_a(), Tier::gpu(), &keys)])
        .await
        .unwrap();
    assert_eq!(first.round_trips, 1);
    // 64 blocks fall in ~64 slots; a single node takes them in one packed
    // call (a cluster would need one call per slot).
    assert_eq!(first.script_calls, 1, "{first:?}");
    let again = index
        .apply_with_stats(&[
            store(pod_a(), Tier::gpu(), &keys),
            store(pod_b(), Tier::gpu(), &keys),
        ])
        .await
        .unwrap();
    assert_eq!(again.round_trips, 1, "{again:?}");
    assert!(
        again.commands > again.script_calls,
        "pod b's first batch registers its slots"
    );
    let third = index
        .apply_with_stats(&[store(pod_b(), Tier::gpu(), &keys)])
        .await
        .unwrap();
    assert_eq!(
        third.commands, third.script_calls,
        "registrations are cached: {third:?}"
    );
    for &k in &keys {
        assert_eq!(conn.hlen::<_, usize>(name(k)).await.unwrap(), 2);
    }
}

#[tokio::test]
async fn remove_drops_fields_then_the_key_with_its_last_holder() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    index
        .apply(&[
            store(pod_a(), Tier::gpu(), &[1, 2]),
            store(pod_a(), Tier::cpu(), &[1]),
            store(pod_b(), Tier::gpu(), &[1]),
        ])
        .await
        .unwrap();
    index
        .apply(&[remove(pod_a(), Tier::gpu(), by_key(&[1, 2]))])
        .await
        .unwrap();
    assert_eq!(
        hkeys(&mut conn, &name(1)).await,
        set(&["127.0.0.11:8000@cpu", "127.0.0.12:8000#dp1@gpu"])
    );
    assert!(
        !conn.exists::<_, bool>(name(2)).await.unwrap(),
        "last holder gone: key deleted"
    );
    // Removing what a pod does not hold changes nothing.
    index
        .apply(&[remove(pod_a(), Tier::gpu(), by_key(&[1, 999]))])
        .await
        .unwrap();
    assert_eq!(conn.hlen::<_, usize>(name(1)).await.unwrap(), 2);
    index
        .apply(&[
            remove(pod_a(), Tier::cpu(), by_key(&[1])),
            remove(pod_b(), Tier::gpu(), by_key(&[1])),
        ])
        .await
        .unwrap();
    assert!(!conn.exists::<_, bool>(name(1)).await.unwrap());
    let l = index.lookup(&model(), &[BlockKey(1)], None).await.unwrap();
    assert!(l.pods.is_empty());
}

#[tokio::test]
async fn engine_mappings_exist_only_where_the_hash_differs_and_die_with_the_block() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    // Block 10 published with engine hash 10 (same scheme), 11 with 9011.
    index
        .apply(&[store_engine(pod_a(), &[(10, 10), (11, 9011)])])
        .await
        .unwrap();
    assert!(!conn.exists::<_, bool>(engine_name(10)).await.unwrap());
    let mapped: String = conn.get(engine_name(9011)).await.unwrap();
    assert_eq!(mapped, name(11));
    index
        .apply(&[store_engine(pod_b(), &[(11, 9011)])])
        .await
        .unwrap();

    // Remove by engine hash, mapping read from Redis (an extra round trip).
    let stats = index
        .apply_with_stats(&[remove(
            pod_a(),
            Tier::gpu(),
            vec![BlockRef::Engine(EngineHash(9011))],
        )])
        .await
        .unwrap();
    assert_eq!(
        stats.round_trips, 2,
        "GET the mapping, then the script: {stats:?}"
    );
    assert_eq!(
        hkeys(&mut conn, &name(11)).await,
        set(&["127.0.0.12:8000#dp1@gpu"])
    );
    assert!(
        conn.exists::<_, bool>(engine_name(9011)).await.unwrap(),
        "b still holds it"
    );
    // The last holder goes: the key and its mapping go (a follow-up DEL).
    let stats = index
        .apply_with_stats(&[remove(
            pod_b(),
            Tier::gpu(),
            vec![BlockRef::Engine(EngineHash(9011))],
        )])
        .await
        .unwrap();
    assert_eq!(stats.round_trips, 3, "GET, script, DEL: {stats:?}");
    assert!(!conn.exists::<_, bool>(name(11)).await.unwrap());
    assert!(!conn.exists::<_, bool>(engine_name(9011)).await.unwrap());

    // No mapping: the engine hash is the key.
    index
        .apply(&[remove(
            pod_a(),
            Tier::gpu(),
            vec![BlockRef::Engine(EngineHash(10))],
        )])
        .await
        .unwrap();
    assert!(!conn.exists::<_, bool>(name(10)).await.unwrap());

    // Store then remove by engine hash in one batch: resolved in-batch, no GET.
    let stats = index
        .apply_with_stats(&[
            store_engine(pod_a(), &[(12, 9012), (13, 9013)]),
            remove(
                pod_a(),
                Tier::gpu(),
                vec![BlockRef::Engine(EngineHash(9012))],
            ),
        ])
        .await
        .unwrap();
    assert_eq!(
        stats.round_trips, 2,
        "scripts + SETs, then the DEL of 9012: {stats:?}"
    );
    assert!(!conn.exists::<_, bool>(name(12)).await.unwrap());
    assert!(!conn.exists::<_, bool>(engine_name(9012)).await.unwrap());
    assert_eq!(
        conn.get::<_, String>(engine_name(9013)).await.unwrap(),
        name(13)
    );
    let engine_keys: Vec<String> = conn.keys("engine:*").await.unwrap();
    assert_eq!(engine_keys, vec![engine_name(9013)]);
}
