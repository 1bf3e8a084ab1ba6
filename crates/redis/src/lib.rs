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
mod tls;
mod topology;

pub use any::AnyIndex;
pub use apply::ApplyStats;
pub use bisect::ROUND_BUDGET;
pub use layout::{LAYOUT_KEY, LAYOUT_VERSION};
pub use lookup::CLUSTER_READ_WHOLE_MAX_BLOCKS;
pub use slots::{key_slot, tag_for_slot};
pub use tls::{TlsFiles, install_crypto_provider};

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

impl Error {
    /// Whether retrying cannot help: a bad URL, credentials, ACL or TLS
    /// setup, or a Redis holding another layout. The binaries exit on these
    /// at startup (a crash loop with a clear message) instead of retrying
    /// forever while routing degrades.
    pub fn is_config(&self) -> bool {
        match self {
            Error::Config(_) => true,
            Error::Redis(e) => Self::redis_is_config(e),
            Error::Reply(_) | Error::Topology(_) => false,
        }
    }

    pub(crate) fn redis_is_config(e: &redis::RedisError) -> bool {
        use redis::{ErrorKind, ServerErrorKind};
        match e.kind() {
            ErrorKind::InvalidClientConfig | ErrorKind::AuthenticationFailed => true,
            ErrorKind::Server(ServerErrorKind::NoPerm) => true,
            // WRONGPASS / NOAUTH arrive as plain server errors.
            _ => {
                matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
                    || is_certificate_error(e)
            }
        }
    }
}

/// A TLS handshake the server's certificate failed (unknown issuer, wrong
/// name, expired): redis-rs reports it as an I/O error whose source is
/// rustls's.
fn is_certificate_error(e: &redis::RedisError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<rustls::Error>() {
            return matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        source = s.source();
    }
    e.to_string().contains("invalid peer certificate")
}

impl From<Error> for IndexError {
    fn from(e: Error) -> Self {
        if e.is_config() {
            // Callers tell "fix the configuration" from "retry" by this variant.
            return IndexError::Config(e.to_string());
        }
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
    /// (or `rediss://`, verified by the system trust store). Loads the
    /// scripts and checks the layout version.
    pub async fn connect(url: &str) -> Result<RedisIndex, Error> {
        Self::connect_with(url, &TlsFiles::default()).await
    }

    /// [`RedisIndex::connect`] with TLS files for a `rediss://` URL.
    pub async fn connect_with(url: &str, tls: &TlsFiles) -> Result<RedisIndex, Error> {
        slots::warm_up();
        let info = topology::parse_url(url, tls)?;
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
        Self::connect_cluster_with(seed_urls, &TlsFiles::default()).await
    }

    /// [`RedisIndex::connect_cluster`] with TLS files for `rediss://` seeds.
    pub async fn connect_cluster_with(
        seed_urls: &[String],
        tls: &TlsFiles,
    ) -> Result<RedisIndex, Error> {
        slots::warm_up();
        if seed_urls.is_empty() {
            return Err(Error::Config(
                "a cluster needs at least one seed URL".into(),
            ));
        }
        let seeds = seed_urls
            .iter()
            .map(|u| topology::parse_url(u, tls))
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

    /// Refuses a Redis that holds another layout version, and writes the
    /// marker when absent. Reads first, so that a read-only ACL user (a
    /// scorer) connects; such a user cannot write the marker into an empty
    /// Redis and leaves it to the first ingester.
    async fn check_layout(&self) -> Result<(), Error> {
        match self.read_layout().await? {
            Some(v) if v == LAYOUT_VERSION.as_bytes() => return Ok(()),
            Some(v) => return Err(layout_mismatch(&v)),
            None => {}
        }
        let set = Call {
            slot: slots::key_slot(LAYOUT_KEY.as_bytes()),
            cmd: redis::cmd("SET")
                .arg(LAYOUT_KEY)
                .arg(LAYOUT_VERSION)
                .arg("NX")
                .clone(),
        };
        let read_only_user = || {
            tracing::info!(
                "{LAYOUT_KEY} is absent and this Redis user may not write it (a read-only user): an ingester writes it"
            );
        };
        match self.conns.run(vec![set]).await {
            Ok(wave) => match wave.replies.first() {
                Some(Value::ServerError(e)) if e.code() == "NOPERM" => {
                    read_only_user();
                    return Ok(());
                }
                Some(Value::ServerError(e)) => {
                    return Err(Error::Reply(format!("SET {LAYOUT_KEY} NX answered {e:?}")));
                }
                _ => {}
            },
            Err(Error::Redis(e))
                if e.code() == Some("NOPERM")
                    || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) =>
            {
                read_only_user();
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        match self.read_layout().await? {
            Some(v) if v == LAYOUT_VERSION.as_bytes() => Ok(()),
            Some(v) => Err(layout_mismatch(&v)),
            None => Err(Error::Reply(format!("{LAYOUT_KEY} absent after SET NX"))),
        }
    }

    async fn read_layout(&self) -> Result<Option<Vec<u8>>, Error> {
        let get = Call {
            slot: slots::key_slot(LAYOUT_KEY.as_bytes()),
            cmd: redis::cmd("GET").arg(LAYOUT_KEY).clone(),
        };
        let wave = self.conns.run(vec![get]).await?;
        match wave.replies.into_iter().next() {
            Some(Value::BulkString(v)) => Ok(Some(v)),
            Some(Value::Nil) => Ok(None),
            Some(Value::ServerError(e)) if e.code() == "NOPERM" => Err(Error::Config(format!(
                "this Redis user may not read {LAYOUT_KEY}: {e:?} (see docs/redis-acl.md)"
            ))),
            other => Err(Error::Reply(format!("GET {LAYOUT_KEY} answered {other:?}"))),
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

fn layout_mismatch(found: &[u8]) -> Error {
    Error::Config(format!(
        "{LAYOUT_KEY} is {:?}; this build reads and writes layout version {LAYOUT_VERSION}",
        String::from_utf8_lossy(found)
    ))
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
