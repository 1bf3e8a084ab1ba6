//! The scorer's background tasks, each ending on the shutdown token:
//! connecting the index (the scorer starts and routes by load while Redis is
//! unreachable), scraping vLLM's `/metrics`, sharing in-flight counts with the
//! other replicas through Redis, and re-resolving candidate DNS names.

use crate::candidates::Candidates;
use crate::load::{Counts, Load, parse_vllm_metrics};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kvroute_core::ids::{BlockKey, ModelName, PodId};
use kvroute_core::index::{Index, IndexError, IndexOp, Lookup, LookupMode};
use kvroute_redis::AnyIndex;
use kvroute_service::config::RedisArgs;
use parking_lot::RwLock;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// An index that may not be connected yet: lookups fail (and the router
/// routes by load) until the background connect succeeds.
#[derive(Default)]
pub struct LateIndex {
    inner: RwLock<Option<Arc<AnyIndex>>>,
    /// Applied to the index when it arrives (`--lookup-mode`).
    lookup_mode: LookupMode,
}

impl LateIndex {
    pub fn ready(index: AnyIndex) -> Self {
        LateIndex {
            inner: RwLock::new(Some(Arc::new(index))),
            lookup_mode: LookupMode::default(),
        }
    }

    /// Not connected yet; the index set later looks up in `mode`.
    pub fn with_lookup_mode(mode: LookupMode) -> Self {
        LateIndex {
            inner: RwLock::new(None),
            lookup_mode: mode,
        }
    }

    pub fn set(&self, index: AnyIndex) {
        index.set_lookup_mode(self.lookup_mode);
        *self.inner.write() = Some(Arc::new(index));
    }

    pub fn get(&self) -> Option<Arc<AnyIndex>> {
        self.inner.read().clone()
    }
}

impl Index for LateIndex {
    async fn apply(&self, ops: &[IndexOp]) -> Result<(), IndexError> {
        match self.get() {
            Some(i) => i.apply(ops).await,
            None => Err(IndexError::Config("index not connected yet".into())),
        }
    }

    async fn lookup(
        &self,
        model: &ModelName,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
    ) -> Result<Lookup, IndexError> {
        match self.get() {
            Some(i) => i.lookup(model, keys, candidates).await,
            None => Err(IndexError::Config("index not connected yet".into())),
        }
    }
}

/// Connects the configured index, retrying with backoff while Redis is
/// unreachable (routing by load meanwhile). A configuration error (bad URL,
/// credentials, ACL, TLS) is returned instead: retrying cannot fix it, and
/// the service exits on it rather than route by load forever.
pub async fn connect_index(
    late: Arc<LateIndex>,
    redis: RedisArgs,
    env: impl Fn(&str) -> Option<String>,
    shutdown: CancellationToken,
) -> Result<(), IndexError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match redis.open(&env).await {
            Ok(index) => {
                tracing::info!(index = %redis.describe(&env), "index connected");
                late.set(index);
                return Ok(());
            }
            Err(e @ IndexError::Config(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "index not reachable: routing by load meanwhile")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Scrapes every candidate's `/metrics` each `interval` (concurrently, each
/// bounded by `timeout`) into `load.engines`.
pub async fn scrape_metrics(
    candidates: Arc<Candidates>,
    load: Load,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    loop {
        let endpoints = candidates.current();
        let scrapes = endpoints.iter().map(|ep| {
            let client = client.clone();
            let load = load.clone();
            async move {
                let Ok(uri) = format!("http://{ep}/metrics").parse::<hyper::Uri>() else {
                    return;
                };
                // Err(true): the pod did not answer at all (connect error,
                // reset, timeout), which counts towards taking it down;
                // Err(false): it answered, but not with metrics (a non-vLLM
                // backend or an error page): alive, just no load signal.
                let fetch = async {
                    let resp = client.get(uri).await.map_err(|e| (true, e.to_string()))?;
                    if !resp.status().is_success() {
                        return Err((false, format!("HTTP {}", resp.status())));
                    }
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| (true, e.to_string()))?
                        .to_bytes();
                    Ok(parse_vllm_metrics(&String::from_utf8_lossy(&body)))
                };
                let outcome = tokio::time::timeout(timeout, fetch)
                    .await
                    .unwrap_or_else(|_| Err((true, format!("timed out after {timeout:?}"))));
                match outcome {
                    Ok(l) => load.engines.record(ep, l),
                    Err((unreachable, error)) => {
                        metrics::counter!(crate::metrics::SCRAPE_FAILURES).increment(1);
                        if unreachable {
                            load.engines.record_unreachable(ep, &error);
                        } else {
                            // It answered: a pod that was down is up again.
                            load.engines.record_answered(ep);
                        }
                    }
                }
            }
        });
        futures::future::join_all(scrapes).await;
        load.engines.forget_except(&endpoints);
        metrics::gauge!(crate::metrics::ENDPOINTS_DOWN).set(load.engines.down_count() as f64);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    tracing::debug!("metrics scraper stopped: shutdown");
}

/// Registry of scorer replicas publishing in-flight counts.
const SCORERS_KEY: &str = "kvroute:scorers";

/// Field-name prefix of an endpoint's pending prefill tokens in a replica's
/// in-flight hash (endpoint names never start with it).
const TOKENS_PREFIX: &str = "tokens:";

fn inflight_key(replica: &str) -> String {
    format!("kvroute:inflight:{replica}")
}

/// Publishes this replica's in-flight counts every `interval` and reads the
/// other replicas' (their hashes expire after a few intervals, so a replica
/// that died stops counting). Single Redis node; on a cluster each key is
/// routed by the cluster client.
pub async fn share_in_flight(
    urls: Vec<String>,
    cluster: bool,
    tls: Option<redis::TlsCertificates>,
    replica: String,
    load: Load,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let ttl_ms = (interval.as_millis() as u64 * 5).max(1000);
    loop {
        let result = if cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new(urls.clone());
            if let Some(certs) = tls.clone() {
                builder = builder.certs(certs);
            }
            match builder.build() {
                Ok(c) => match c.get_async_connection().await {
                    Ok(conn) => sync_loop(conn, &replica, &load, interval, ttl_ms, &shutdown).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        } else {
            let client = match tls.clone() {
                Some(certs) => redis::Client::build_with_tls(urls[0].as_str(), certs),
                None => redis::Client::open(urls[0].as_str()),
            };
            match client {
                Ok(c) => match c.get_connection_manager().await {
                    Ok(conn) => sync_loop(conn, &replica, &load, interval, ttl_ms, &shutdown).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "in-flight sharing: Redis unavailable, retrying");
            load.in_flight.set_remote(Counts::default());
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval * 10) => {}
        }
    }
}

async fn sync_loop<C: redis::aio::ConnectionLike + Send + Sync + Clone>(
    mut conn: C,
    replica: &str,
    load: &Load,
    interval: Duration,
    ttl_ms: u64,
    shutdown: &CancellationToken,
) -> Result<(), redis::RedisError> {
    let mine = inflight_key(replica);
    loop {
        let local = load.in_flight.local_snapshot();
        // MULTI/EXEC: another replica must never read the hash between the
        // DEL and the HSET (one key, so one slot on a cluster too).
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.del(&mine).ignore();
        if !local.requests.is_empty() || !local.tokens.is_empty() {
            // Requests under the endpoint's name (what older replicas read),
            // pending prefill tokens under `TOKENS_PREFIX` + name.
            let fields: Vec<(String, u64)> = local
                .requests
                .into_iter()
                .map(|(ep, n)| (ep, u64::from(n)))
                .chain(
                    local
                        .tokens
                        .into_iter()
                        .map(|(ep, n)| (format!("{TOKENS_PREFIX}{ep}"), n)),
                )
                .collect();
            pipe.hset_multiple(&mine, &fields).ignore();
            pipe.pexpire(&mine, ttl_ms as i64).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        let _: () = conn.sadd(SCORERS_KEY, replica).await?;
        let replicas: Vec<String> = conn.smembers(SCORERS_KEY).await?;
        let mut remote = Counts::default();
        for r in replicas.iter().filter(|r| r.as_str() != replica) {
            let counts: HashMap<String, u64> = conn.hgetall(inflight_key(r)).await?;
            if counts.is_empty() {
                // Expired (replica gone or idle): keep the registry small.
                let _: () = conn.srem(SCORERS_KEY, r).await?;
                continue;
            }
            for (field, n) in counts {
                match field.strip_prefix(TOKENS_PREFIX) {
                    Some(ep) => *remote.tokens.entry(ep.to_string()).or_insert(0) += n,
                    None => {
                        let n = u32::try_from(n).unwrap_or(u32::MAX);
                        let e = remote.requests.entry(field).or_insert(0);
                        *e = e.saturating_add(n);
                    }
                }
            }
        }
        load.in_flight.set_remote(remote);
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _: Result<(), _> = conn.del(&mine).await;
                return Ok(());
            }
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
