//! The shared index in Redis (single node or Redis Cluster), in the layout
//! llm-d reads.
//!
//! | file | what it owns |
//! |---|---|
//! | `layout.rs` | key and field names (layout version 1) and their parsers |
//! | `slots.rs` | CRC16 key slots and the per-slot `{tag}` of bookkeeping keys |
//! | `scripts.rs` | `lua/*.lua`, compiled in; EVALSHA and SCRIPT LOAD |
//! | `topology.rs` | connections per master, `CLUSTER SLOTS` discovery |
//! | `cluster.rs` | one wave = one pipeline per master; NOSCRIPT/MOVED recovery |
//! | `registry.rs` | in-process cache of registered (pod, slot) pairs |
//! | `apply.rs` | write path: ops -> per-slot script calls (packed on a single node) |
//! | `resolve.rs` | removes by engine hash -> block keys |
//! | `clear.rs` | ClearPod without SCAN |
//! | `commands.rs` | plain commands on one key's master (bookkeeping) |
//! | `lookup.rs` | read path: which way a prompt is read, pipelined HKEYS -> walk |
//! | `bisect.rs` | bisecting reads: `lua/lookup.lua` (single node), rounds (cluster) |
//!
//! Every key a script call touches is declared in KEYS. On a cluster each
//! call touches the keys of one slot; on a single node the write scripts take
//! many slots' groups per call (same keys written, fewer EVALSHAs: see
//! `apply.rs`).

mod any;
mod apply;
mod bisect;
mod clear;
mod cluster;
mod commands;
mod layout;
mod lookup;
mod node_lookup;
mod registry;
mod resolve;
mod scripts;
mod slots;
mod topology;

pub use any::AnyIndex;
pub use apply::ApplyStats;
pub use bisect::ROUND_BUDGET;
pub use layout::{LAYOUT_KEY, LAYOUT_VERSION};
pub use lookup::CLUSTER_READ_WHOLE_MAX_BLOCKS;
pub use slots::{key_slot, tag_for_slot};

use cluster::{Call, Conns};
use kvroute_core::ids::{BlockKey, ModelName, PodId};
use kvroute_core::index::bisect::{LookupMode, LookupSettings};
use kvroute_core::index::{Index, IndexError, IndexOp, Lookup};

/// What this backend's calls fail with; every one converts into the
/// backend-neutral [`IndexError`] at the [`Index`] boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis reply had an unexpected shape: {0}")]
    Reply(String),
    #[error("redis cluster topology: {0}")]
    Topology(String),
    #[error("index configuration: {0}")]
    Config(String),
}

impl From<Error> for IndexError {
    fn from(e: Error) -> Self {
        match e {
            Error::Redis(e) => IndexError::Redis(Box::new(e)),
            Error::Reply(s) => IndexError::Reply(s),
            Error::Topology(s) => IndexError::Topology(s),
            Error::Config(s) => IndexError::Config(s),
        }
    }
}
use redis::Value;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Counters since connect, shared with the connection layer.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    script_calls: AtomicU64,
    round_trips: AtomicU64,
    lookups: AtomicU64,
    lookup_reads: AtomicU64,
    lookup_round_trips: AtomicU64,
    lookup_fallbacks: AtomicU64,
    node_lookups_redone: AtomicU64,
    noscript_reloads: AtomicU64,
    topology_refreshes: AtomicU64,
    malformed_fields: AtomicU64,
    malformed_entries: AtomicU64,
}

/// A snapshot of [`RedisIndex`]'s counters since connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisIndexStats {
    /// `apply` calls that succeeded.
    pub batches: u64,
    /// EVALSHA calls sent by those batches.
    pub script_calls: u64,
    /// Waves (round trips) sent by those batches.
    pub round_trips: u64,
    pub lookups: u64,
    /// Blocks those lookups read (an HLEN or an HKEYS each).
    pub lookup_reads: u64,
    /// Round trips those lookups took (one wave is one round trip).
    pub lookup_round_trips: u64,
    /// Intervals bisecting lookups read block by block because their probes
    /// saw a hole (see `index/bisect.rs`).
    pub lookup_fallbacks: u64,
    /// Cluster lookups whose one-script-per-master wave was redone in
    /// rounds: it failed (a slot moved), or its replies showed holes.
    pub node_lookups_redone: u64,
    /// Times a node answered NOSCRIPT and the scripts were loaded again.
    pub noscript_reloads: u64,
    /// Times the cluster slot map was read again after a redirect or error.
    pub topology_refreshes: u64,
    /// Holder fields a lookup skipped because they were not `<pod>@<tier>`.
    pub malformed_fields: u64,
    /// Per-slot pod entries a clear skipped because they were not `<tier>|<block>`.
    pub malformed_entries: u64,
}

/// The shared index in Redis. Cheap to share behind an `Arc`; every method
/// takes `&self` and concurrent calls are multiplexed over one connection
/// per node.
pub struct RedisIndex {
    conns: Conns,
    registry: registry::Registry,
    counters: Arc<Counters>,
    /// How lookups find prefixes (see `index/bisect.rs`).
    lookup: LookupSettings,
}

impl fmt::Debug for RedisIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisIndex")
            .field("masters", &self.masters())
            .field("cluster", &self.is_cluster())
            .finish_non_exhaustive()
    }
}

impl RedisIndex {
    /// Connects to a single Redis: `redis://[user:password@]host:port[/db]`
    /// (or `rediss://`). Loads the scripts and checks the layout version.
    pub async fn connect(url: &str) -> Result<RedisIndex, Error> {
        slots::warm_up();
        let info = topology::parse_url(url)?;
        let node = topology::connect_node(info).await?;
        let counters = Arc::new(Counters::default());
        let conns = Conns::new(
            topology::Topology::single(node),
            Vec::new(),
            counters.clone(),
        );
        Self::finish_connect(conns, counters).await
    }

    /// Connects to a Redis Cluster through any of `seed_urls` (credentials
    /// and TLS of the first seed are used for every master); masters are
    /// discovered with `CLUSTER SLOTS` and rediscovered after MOVED/ASK or a
    /// connection error.
    pub async fn connect_cluster(seed_urls: &[String]) -> Result<RedisIndex, Error> {
        slots::warm_up();
        if seed_urls.is_empty() {
            return Err(Error::Config(
                "a cluster needs at least one seed URL".into(),
            ));
        }
        let seeds = seed_urls
            .iter()
            .map(|u| topology::parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        if seeds.iter().any(|s| s.redis_settings().db() != 0) {
            return Err(Error::Config("Redis Cluster has only database 0".into()));
        }
        let topo = topology::discover(&seeds, None).await?;
        let counters = Arc::new(Counters::default());
        let conns = Conns::new(topo, seeds, counters.clone());
        Self::finish_connect(conns, counters).await
    }

    async fn finish_connect(conns: Conns, counters: Arc<Counters>) -> Result<RedisIndex, Error> {
        let index = RedisIndex {
            conns,
            registry: registry::Registry::default(),
            counters,
            lookup: LookupSettings::default(),
        };
        index.check_layout().await?;
        tracing::info!(masters = ?index.masters(), cluster = index.is_cluster(), "redis index connected");
        Ok(index)
    }

    /// Writes the layout marker when absent and refuses a Redis that holds
    /// another layout version.
    async fn check_layout(&self) -> Result<(), Error> {
        let slot = slots::key_slot(LAYOUT_KEY.as_bytes());
        let calls = vec![
            Call {
                slot,
                cmd: redis::cmd("SET")
                    .arg(LAYOUT_KEY)
                    .arg(LAYOUT_VERSION)
                    .arg("NX")
                    .clone(),
            },
            Call {
                slot,
                cmd: redis::cmd("GET").arg(LAYOUT_KEY).clone(),
            },
        ];
        let wave = self.conns.run(calls).await?;
        match wave.replies.get(1) {
            Some(Value::BulkString(v)) if v.as_slice() == LAYOUT_VERSION.as_bytes() => Ok(()),
            other => Err(Error::Config(format!(
                "{LAYOUT_KEY} is {other:?}; this build reads and writes layout version {LAYOUT_VERSION}"
            ))),
        }
    }

    /// One PING to every master, concurrently; the slowest round trip. For
    /// readiness checks and as the benchmarks' baseline.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        for (addr, reply) in self.conns.on_every_node(&redis::cmd("PING")).await? {
            if !matches!(&reply, Value::SimpleString(s) if s == "PONG") {
                return Err(Error::Reply(format!("{addr} answered PING with {reply:?}")));
            }
        }
        Ok(start.elapsed())
    }

    /// [`Index::apply`], returning what the batch cost.
    pub async fn apply_with_stats(&self, ops: &[IndexOp]) -> Result<ApplyStats, Error> {
        let stats = apply::apply(self, ops).await?;
        self.counters.batches.fetch_add(1, Relaxed);
        self.counters
            .script_calls
            .fetch_add(u64::from(stats.script_calls), Relaxed);
        self.counters
            .round_trips
            .fetch_add(u64::from(stats.round_trips), Relaxed);
        Ok(stats)
    }

    /// Counters since connect.
    pub fn stats(&self) -> RedisIndexStats {
        let c = &self.counters;
        RedisIndexStats {
            batches: c.batches.load(Relaxed),
            script_calls: c.script_calls.load(Relaxed),
            round_trips: c.round_trips.load(Relaxed),
            lookups: c.lookups.load(Relaxed),
            lookup_reads: c.lookup_reads.load(Relaxed),
            lookup_round_trips: c.lookup_round_trips.load(Relaxed),
            lookup_fallbacks: c.lookup_fallbacks.load(Relaxed),
            node_lookups_redone: c.node_lookups_redone.load(Relaxed),
            noscript_reloads: c.noscript_reloads.load(Relaxed),
            topology_refreshes: c.topology_refreshes.load(Relaxed),
            malformed_fields: c.malformed_fields.load(Relaxed),
            malformed_entries: c.malformed_entries.load(Relaxed),
        }
    }

    /// How lookups find prefixes from now on.
    pub fn set_lookup_mode(&self, mode: LookupMode) {
        self.lookup.set_mode(mode);
    }

    /// The lookup configuration (mode, and up to which prompt length the
    /// walk is used in any mode).
    pub fn lookup_settings(&self) -> &LookupSettings {
        &self.lookup
    }

    /// Whether this index talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conns.topology().is_cluster()
    }

    /// `host:port` of every master currently in use.
    pub fn masters(&self) -> Vec<String> {
        self.conns
            .topology()
            .nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect()
    }

    /// DESTRUCTIVE, for tests and benchmarks only: FLUSHALL on every master
    /// (every key of every database user, not only kvroute's), then writes the
    /// layout marker again and forgets the in-process registration cache.
    pub async fn flush_all(&self) -> Result<(), Error> {
        self.conns.on_every_node(&redis::cmd("FLUSHALL")).await?;
        self.registry.clear();
        self.check_layout().await
    }
}

impl Index for RedisIndex {
    async fn apply(&self, ops: &[IndexOp]) -> Result<(), IndexError> {
        Ok(self.apply_with_stats(ops).await.map(|_| ())?)
    }

    async fn lookup(
        &self,
        model: &ModelName,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
    ) -> Result<Lookup, IndexError> {
        Ok(lookup::lookup(self, model, keys, candidates).await?)
    }
}
