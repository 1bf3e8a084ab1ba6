//! Helpers shared by the Redis backend tests.

use kvroute_core::ids::{BlockKey, EngineHash, ModelName, PodId, Tier};
use kvroute_core::index::{BlockRef, IndexOp, StoredBlock};
use kvroute_testkit::redis_server::RedisServer;
use redis::AsyncCommands;
use std::collections::BTreeSet;

pub fn model() -> ModelName {
    ModelName::new("meta-llama/Llama-3.1-8B")
}
pub fn pod_a() -> PodId {
    PodId::new("127.0.0.11:8000")
}
pub fn pod_b() -> PodId {
    PodId::with_rank("127.0.0.12:8000", Some(1))
}
pub fn blocks(keys: &[u64]) -> Vec<StoredBlock> {
    keys.iter()
        .map(|&k| StoredBlock {
            key: BlockKey(k),
            engine: None,
        })
        .collect()
}
pub fn store(pod: PodId, tier: Tier, keys: &[u64]) -> IndexOp {
    IndexOp::Store {
        model: model(),
        pod,
        tier,
        blocks: blocks(keys),
    }
}
pub fn remove(pod: PodId, tier: Tier, refs: Vec<BlockRef>) -> IndexOp {
    IndexOp::Remove {
        model: model(),
        pod,
        tier,
        blocks: refs,
    }
}
pub fn by_key(keys: &[u64]) -> Vec<BlockRef> {
    keys.iter().map(|&k| BlockRef::Key(BlockKey(k))).collect()
}
pub fn name(key: u64) -> String {
    format!("{}@{key}", model())
}
pub fn engine_name(e: u64) -> String {
    format!("engine:{}@{e}", model())
}

/// A plain connection, to read what kvroute wrote the way llm-d or
/// redis-cli would.
pub async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

pub async fn hkeys(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> BTreeSet<String> {
    conn.hkeys::<_, Vec<String>>(key)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Calls of one command name in `INFO commandstats` (0 when never called).
pub async fn calls_of(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

pub fn store_engine(pod: PodId, pairs: &[(u64, u64)]) -> IndexOp {
    IndexOp::Store {
        model: model(),
        pod,
        tier: Tier::gpu(),
        blocks: pairs
            .iter()
            .map(|&(k, e)| StoredBlock {
                key: BlockKey(k),
                engine: Some(EngineHash(e)),
            })
            .collect(),
    }
}
