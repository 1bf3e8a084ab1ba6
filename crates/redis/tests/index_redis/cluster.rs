//! A local 3-master Redis Cluster.

use crate::common::*;
use kvroute_core::ids::{BlockKey, EngineHash, Tier};
use kvroute_core::index::{BlockRef, Index, IndexOp};
use kvroute_redis::{RedisIndex, key_slot};
use kvroute_testkit::redis_server::RedisCluster;
use redis::AsyncCommands;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[tokio::test]
async fn cluster_scripts_touch_one_slot_and_keys_spread_over_masters() {
    let cluster = RedisCluster::start(3).unwrap();
    let index = RedisIndex::connect_cluster(&cluster.urls()).await.unwrap();
    assert!(index.is_cluster());
    assert_eq!(index.masters().len(), 3);
    let keys: Vec<u64> = (0..300).collect();
    let pairs: Vec<(u64, u64)> = keys.iter().map(|&k| (k, k + 7_000_000)).collect();
    // Every call would fail with CROSSSLOT if a script touched two slots.
    let stats = index
        .apply_with_stats(&[
            store_engine(pod_a(), &pairs),
            store(pod_b(), Tier::cpu(), &keys[..100]),
            remove(
                pod_a(),
                Tier::gpu(),
                vec![BlockRef::Engine(EngineHash(7_000_000 + 299))],
            ),
        ])
        .await
        .unwrap();
    assert_eq!(
        stats.round_trips, 2,
        "one wave, then the engine DEL: {stats:?}"
    );

    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let fields: Vec<String> = conn.hkeys(name(5)).await.unwrap();
    assert_eq!(
        fields.into_iter().collect::<BTreeSet<_>>(),
        set(&["127.0.0.11:8000@gpu", "127.0.0.12:8000#dp1@cpu"])
    );
    assert_eq!(
        conn.get::<_, String>(engine_name(7_000_005)).await.unwrap(),
        name(5)
    );
    assert!(!conn.exists::<_, bool>(name(299)).await.unwrap());
    // The client computes slots exactly as the servers do.
    for k in [0u64, 5, 299] {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(name(k))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(slot, key_slot(name(k).as_bytes()));
    }
    // Keys landed on every master.
    for url in cluster.urls() {
        let mut node = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let size: u64 = redis::cmd("DBSIZE").query_async(&mut node).await.unwrap();
        assert!(size > 50, "{url} holds {size} keys");
    }

    let prompt: Vec<BlockKey> = keys.iter().map(|&k| BlockKey(k)).collect();
    let l = index.lookup(&model(), &prompt, None).await.unwrap();
    assert_eq!(
        l.pods.iter().map(|p| p.depth).collect::<Vec<_>>(),
        vec![299, 100]
    );

    let start = Instant::now();
    index
        .apply(&[IndexOp::ClearPod { pod: pod_a() }])
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    let l = index.lookup(&model(), &prompt, None).await.unwrap();
    assert_eq!(l.pods.len(), 1);
    assert_eq!((l.pods[0].pod.clone(), l.pods[0].depth), (pod_b(), 100));
    assert!(!conn.exists::<_, bool>(name(200)).await.unwrap());
    assert!(
        !conn
            .exists::<_, bool>(engine_name(7_000_200))
            .await
            .unwrap()
    );
    assert!(
        conn.exists::<_, bool>(engine_name(7_000_050))
            .await
            .unwrap(),
        "b still holds block 50"
    );
}

/// Every key the index wrote on these masters with its full contents, as
/// `(key, sorted members or value)`.
async fn dump(urls: &[String]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for url in urls {
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = conn.keys("*").await.unwrap();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let mut items: Vec<String> = match kind.as_str() {
                "hash" => {
                    let h: Vec<(String, String)> = conn.hgetall(&key).await.unwrap();
                    h.into_iter().map(|(f, v)| format!("{f}={v}")).collect()
                }
                "set" => conn.smembers(&key).await.unwrap(),
                "string" => vec![conn.get(&key).await.unwrap()],
                other => panic!("unexpected type {other} of {key}"),
            };
            items.sort();
            out.push((key, items));
        }
    }
    out.sort();
    out
}

/// The single-node path packs many slots into one script call, the cluster
/// path sends one call per slot: what they write must be identical, key for
/// key, bookkeeping included.
#[tokio::test]
async fn packed_single_node_writes_exactly_what_the_cluster_writes() {
    let server = kvroute_testkit::redis_server::RedisServer::start().unwrap();
    let cluster = RedisCluster::start(3).unwrap();
    let single = RedisIndex::connect(&server.url()).await.unwrap();
    let clustered = RedisIndex::connect_cluster(&cluster.urls()).await.unwrap();
    let keys: Vec<u64> = (0..600).collect();
    let pairs: Vec<(u64, u64)> = keys.iter().map(|&k| (k, k + 9_000_000)).collect();
    let batches: Vec<Vec<IndexOp>> = vec![
        vec![
            // 600 blocks: more than one packed call.
            store_engine(pod_a(), &pairs),
            store(pod_b(), Tier::cpu(), &keys[..200]),
            store(pod_b(), Tier::gpu(), &keys[100..300]),
        ],
        vec![
            remove(pod_a(), Tier::gpu(), by_key(&keys[..50])),
            remove(
                pod_a(),
                Tier::gpu(),
                (50..80)
                    .map(|k| BlockRef::Engine(EngineHash(k + 9_000_000)))
                    .collect(),
            ),
            remove(pod_b(), Tier::cpu(), by_key(&keys[..20])),
            // Re-map some blocks to other engine hashes.
            store_engine(pod_b(), &[(500, 8_000_500), (501, 8_000_501)]),
        ],
        vec![IndexOp::ClearPod { pod: pod_b() }],
        vec![store(pod_b(), Tier::gpu(), &keys[290..310])],
    ];
    let mut single_calls = 0;
    let mut cluster_calls = 0;
    for batch in &batches {
        let one = single.apply_with_stats(batch).await.unwrap().script_calls;
        let many = clustered
            .apply_with_stats(batch)
            .await
            .unwrap()
            .script_calls;
        // Clears run clear_pod.lua per slot on both (not packed).
        if !matches!(batch[0], IndexOp::ClearPod { .. }) {
            single_calls += one;
            cluster_calls += many;
        }
    }
    assert!(
        single_calls * 10 < cluster_calls,
        "packing: {single_calls} calls on one node vs {cluster_calls} on the cluster"
    );
    let one = dump(&[server.url()]).await;
    let many = dump(&cluster.urls()).await;
    assert!(one.len() > 600, "{} keys", one.len());
    assert_eq!(one, many);
}

#[tokio::test]
async fn cluster_recovers_from_script_flush_on_one_master() {
    let cluster = RedisCluster::start(3).unwrap();
    let index = RedisIndex::connect_cluster(&cluster.urls()).await.unwrap();
    let keys: Vec<u64> = (0..64).collect();
    index
        .apply(&[store(pod_a(), Tier::gpu(), &keys)])
        .await
        .unwrap();
    let mut node = redis::Client::open(cluster.urls()[1].as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut node)
        .await
        .unwrap();
    index
        .apply(&[remove(pod_a(), Tier::gpu(), by_key(&keys[..32]))])
        .await
        .unwrap();
    assert_eq!(index.stats().noscript_reloads, 1);
    let l = index
        .lookup(
            &model(),
            &keys[32..].iter().map(|&k| BlockKey(k)).collect::<Vec<_>>(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(l.max_depth(), 32);
}

#[tokio::test]
async fn cluster_follows_a_slot_moved_to_another_master() {
    let cluster = RedisCluster::start(3).unwrap();
    let index = RedisIndex::connect_cluster(&cluster.urls()).await.unwrap();
    // A reader that only looks up, so only its lookups can notice the move.
    let reader = RedisIndex::connect_cluster(&cluster.urls()).await.unwrap();
    let slot = key_slot(name(1).as_bytes());
    let mut nodes = Vec::new();
    for url in cluster.urls() {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut conn)
            .await
            .unwrap();
        // Only the owner of the slot answers a read of one of its keys.
        let owns = redis::cmd("GET")
            .arg(name(1))
            .query_async::<Option<String>>(&mut conn)
            .await
            .is_ok();
        nodes.push((conn, id, owns));
    }
    let from = nodes.iter().position(|n| n.2).unwrap();
    let to = (from + 1) % nodes.len();
    let (from_id, to_id) = (nodes[from].1.clone(), nodes[to].1.clone());
    // The documented manual move of an (empty) slot.
    let setslot = |state: &str, id: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(id)
            .clone()
    };
    let _: () = setslot("IMPORTING", &from_id)
        .query_async(&mut nodes[to].0)
        .await
        .unwrap();
    let _: () = setslot("MIGRATING", &to_id)
        .query_async(&mut nodes[from].0)
        .await
        .unwrap();
    for node in &mut nodes {
        let _: () = setslot("NODE", &to_id)
            .query_async(&mut node.0)
            .await
            .unwrap();
    }

    // The index still believes the old owner: MOVED, refresh, resend.
    index
        .apply(&[store(pod_a(), Tier::gpu(), &[1, 2, 3])])
        .await
        .unwrap();
    assert!(index.stats().topology_refreshes >= 1);
    let fields: Vec<String> = nodes[to].0.hkeys(name(1)).await.unwrap();
    assert_eq!(fields, vec!["127.0.0.11:8000@gpu".to_string()]);
    let prompt = [BlockKey(1), BlockKey(2), BlockKey(3)];
    let l = index.lookup(&model(), &prompt, None).await.unwrap();
    assert_eq!(l.max_depth(), 3);

    // A long prompt through the stale reader: its per-master script on the
    // old owner may not read the moved key, so the lookup is redone in
    // rounds, which follow MOVED.
    let long: Vec<u64> = (1..=64).collect();
    index
        .apply(&[store(pod_a(), Tier::gpu(), &long)])
        .await
        .unwrap();
    let keys: Vec<BlockKey> = long.iter().map(|&k| BlockKey(k)).collect();
    let l = reader.lookup(&model(), &keys, None).await.unwrap();
    assert_eq!(l.max_depth(), 64);
    let stats = reader.stats();
    assert_eq!(stats.node_lookups_redone, 1, "{stats:?}");
    assert!(stats.topology_refreshes >= 1, "{stats:?}");
    // Refreshed: the next lookup is one script per master again.
    let l = reader.lookup(&model(), &keys, None).await.unwrap();
    assert_eq!(l.max_depth(), 64);
    assert_eq!(reader.stats().node_lookups_redone, 1);
    index
        .apply(&[IndexOp::ClearPod { pod: pod_a() }])
        .await
        .unwrap();
    assert!(
        index
            .lookup(&model(), &prompt, None)
            .await
            .unwrap()
            .pods
            .is_empty()
    );
}
