//! Single node: lookups, and ops rejected before anything is sent.

use crate::common::*;
use kvroute_core::ids::{BlockKey, ModelName, Tier};
use kvroute_core::index::Index;
use kvroute_redis::RedisIndex;
use kvroute_testkit::redis_server::RedisServer;
use redis::AsyncCommands;
use std::time::Duration;

#[tokio::test]
async fn lookup_walks_the_prefix_and_skips_malformed_fields() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    index
        .apply(&[
            store(pod_a(), Tier::gpu(), &[1, 2, 3, 4]),
            store(pod_b(), Tier::gpu(), &[1, 2, 5]),
        ])
        .await
        .unwrap();
    let _: () = conn
        .hset(name(2), "garbage-without-tier", "")
        .await
        .unwrap();
    let prompt: Vec<BlockKey> = [1, 2, 3, 5, 6].map(BlockKey).to_vec();
    let l = index.lookup(&model(), &prompt, None).await.unwrap();
    assert_eq!(
        l.pods.iter().map(|p| p.depth).collect::<Vec<_>>(),
        vec![3, 2]
    );
    assert_eq!(
        l.blocks_examined, 4,
        "stops at block 5, which no live run holds"
    );
    assert_eq!(index.stats().malformed_fields, 1);
    let only_b = [pod_b()];
    let l = index
        .lookup(&model(), &prompt, Some(&only_b))
        .await
        .unwrap();
    assert_eq!(l.pods.len(), 1);
    assert_eq!(l.pods[0].depth, 2);
    assert_eq!(l.blocks_examined, 3);
    let l = index
        .lookup(&ModelName::new("unknown"), &prompt, None)
        .await
        .unwrap();
    assert!(l.pods.is_empty());
    assert_eq!(l.blocks_examined, 1);
    assert!(
        index
            .lookup(&model(), &[], None)
            .await
            .unwrap()
            .pods
            .is_empty()
    );
    assert!(index.ping().await.unwrap() < Duration::from_secs(1));
}

#[tokio::test]
async fn invalid_ops_are_rejected_before_anything_is_sent() {
    let server = RedisServer::start().unwrap();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    let mut conn = raw(&server).await;
    let err = index
        .apply(&[
            store(pod_a(), Tier::gpu(), &[1]),
            store(pod_a(), Tier::new("disk|x"), &[2]),
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("disk|x"), "{err}");
    assert!(!conn.exists::<_, bool>(name(1)).await.unwrap());
}
