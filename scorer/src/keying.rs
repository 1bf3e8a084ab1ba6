//! The scorer half of the keying contract with the ingesters (Redis keys
//! `kvroute:keying`, `kvroute:models`, `kvroute:pods`), so a fleet whose
//! halves disagree says so instead of silently routing every request by
//! load:
//!
//! - `kvroute:keying` (HASH `hash_scheme`, `hash_seed`, `block_size`,
//!   `updated_ms`, `writer`), written by the ingesters: read at start and
//!   every `--keying-check-interval`. Different from the scorer's own key
//!   flags, every lookup misses. At start the scorer refuses to run
//!   ([`KeyingMismatch`]) unless `--allow-keying-mismatch`; later (or when
//!   allowed) it logs an ERROR naming both values, sets
//!   `kvroute_scorer_keying_mismatch` 1 and prints `keying: mismatch: ...`
//!   in `/readyz`. Readiness stays 200: routing by load is still correct,
//!   and an unready scorer would take traffic down (Envoy cannot fail open
//!   in FULL_DUPLEX_STREAMED mode). Missing: one WARN.
//! - `kvroute:models` (HASH model -> last seen ms): requests for a model no
//!   ingester indexed are counted (`kvroute_scorer_requests_unindexed_model_total`)
//!   with a rate-limited WARN naming it; indexed models without a tokenizer
//!   here get one WARN each.
//! - `kvroute:pods` (SET of pod ids): when none of them maps onto a
//!   candidate (a wrong port in the ingester's topics, another fleet's
//!   Redis), prefixes can never win: a rate-limited WARN and the gauge
//!   `kvroute_scorer_indexed_pods_unmatched` (indexed pods matching no candidate).

use crate::candidates::{Candidates, endpoint_for};
use kvroute_core::ids::PodId;
use kvroute_service::config::KeyArgs;
use kvroute_service::health::Check;
use kvroute_tokens::TokenizerRegistry;
use parking_lot::{Mutex, RwLock};
use redis::AsyncCommands;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const KEYING_KEY: &str = "kvroute:keying";
pub const MODELS_KEY: &str = "kvroute:models";
pub const PODS_KEY: &str = "kvroute:pods";

/// Gauge: 1 while `kvroute:keying` disagrees with this scorer's key flags.
pub const KEYING_MISMATCH: &str = "kvroute_scorer_keying_mismatch";
/// Requests whose model is not in `kvroute:models`.
pub const UNINDEXED_MODEL: &str = "kvroute_scorer_requests_unindexed_model_total";
/// Gauge: pods in `kvroute:pods` that match no candidate endpoint.
pub const PODS_UNMATCHED: &str = "kvroute_scorer_indexed_pods_unmatched";

/// How often a repeated WARN (unindexed model, unmatched pods) may repeat.
const WARN_EVERY: Duration = Duration::from_secs(300);

/// The scorer's keying and `kvroute:keying` disagree (the start-up refusal).
#[derive(Debug, thiserror::Error)]
#[error(
    "kvroute:keying in Redis (written by the ingesters) says {theirs}, but this scorer is \
     configured with {ours}: every prefix lookup would miss. Fix --hash-scheme/--hash-seed/\
     --block-size here or on the ingesters, or start with --allow-keying-mismatch"
)]
pub struct KeyingMismatch {
    pub theirs: String,
    pub ours: String,
}

/// What a scorer's key flags say, as `kvroute:keying` spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keying {
    pub hash_scheme: String,
    pub hash_seed: String,
    pub block_size: String,
}

impl Keying {
    pub fn of(keys: &KeyArgs) -> Self {
        Keying {
            hash_scheme: keys.hash_scheme.to_string(),
            hash_seed: keys.hash_seed.clone(),
            block_size: keys.block_size.to_string(),
        }
    }

    /// The stored hash's fields (missing ones read as empty).
    pub fn from_hash(h: &HashMap<String, String>) -> Self {
        let f = |k: &str| h.get(k).cloned().unwrap_or_default();
        Keying {
            hash_scheme: f("hash_scheme"),
            hash_seed: f("hash_seed"),
            block_size: f("block_size"),
        }
    }

    fn describe(&self) -> String {
        format!(
            "hash_scheme={} hash_seed={:?} block_size={}",
            self.hash_scheme, self.hash_seed, self.block_size
        )
    }
}

/// Compares `kvroute:keying` (None: missing) with ours.
pub fn compare(ours: &Keying, stored: Option<&HashMap<String, String>>) -> Option<KeyingMismatch> {
    let stored = stored?;
    let theirs = Keying::from_hash(stored);
    (theirs != *ours).then(|| KeyingMismatch {
        theirs: match stored.get("writer") {
            Some(w) => format!("{} (writer {w})", theirs.describe()),
            None => theirs.describe(),
        },
        ours: ours.describe(),
    })
}

/// Reads `kvroute:keying` (None when absent).
pub async fn read_keying<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
) -> redis::RedisResult<Option<HashMap<String, String>>> {
    let h: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(KEYING_KEY)
        .query_async(conn)
        .await?;
    Ok((!h.is_empty()).then_some(h))
}

/// What the periodic check learned, shared with the router.
pub struct IndexInfo {
    ours: Keying,
    /// `/readyz`'s advisory `keying` line.
    check: Check,
    /// Models in `kvroute:models` (None: unknown or the hash is absent).
    models: RwLock<Option<HashSet<String>>>,
    /// Last WARN per unindexed model.
    warned_models: Mutex<HashMap<String, Instant>>,
    warned_missing: Mutex<bool>,
    warned_tokenizers: Mutex<HashSet<String>>,
    pods_warned: Mutex<Option<Instant>>,
    mismatch: Mutex<Option<String>>,
}

impl IndexInfo {
    pub fn new(keys: &KeyArgs, check: Check) -> Self {
        check.pass();
        IndexInfo {
            ours: Keying::of(keys),
            check,
            models: RwLock::new(None),
            warned_models: Mutex::default(),
            warned_missing: Mutex::new(false),
            warned_tokenizers: Mutex::default(),
            pods_warned: Mutex::new(None),
            mismatch: Mutex::new(None),
        }
    }

    pub fn ours(&self) -> &Keying {
        &self.ours
    }

    /// Records the `kvroute:keying` read.
    pub fn keying(&self, stored: Option<&HashMap<String, String>>) {
        match (stored, compare(&self.ours, stored)) {
            (None, _) => {
                let mut warned = self.warned_missing.lock();
                if !*warned {
                    tracing::warn!(
                        "no ingester has published its keying yet ({KEYING_KEY} is absent): \
                         cannot check that the ingesters key blocks as this scorer does"
                    );
                    *warned = true;
                }
            }
            (Some(_), None) => {
                if self.mismatch.lock().take().is_some() {
                    tracing::info!("{KEYING_KEY} agrees with this scorer's keying again");
                }
                metrics::gauge!(KEYING_MISMATCH).set(0.0);
                self.check.pass();
            }
            (Some(_), Some(m)) => {
                let text = m.to_string();
                let mut last = self.mismatch.lock();
                if last.as_deref() != Some(text.as_str()) {
                    tracing::error!(theirs = %m.theirs, ours = %m.ours, "{text}");
                    *last = Some(text);
                }
                metrics::gauge!(KEYING_MISMATCH).set(1.0);
                self.check.fail(format!(
                    "mismatch: redis {} vs scorer {} (readiness unaffected: routing by load)",
                    m.theirs, m.ours
                ));
            }
        }
    }

    /// Records `kvroute:models`; warns once per indexed model with no tokenizer here.
    pub fn models(&self, models: HashSet<String>, tokenizers: &TokenizerRegistry, remote: bool) {
        if !remote {
            let mut warned = self.warned_tokenizers.lock();
            for m in &models {
                if tokenizers.locate(m).is_none() && warned.insert(m.clone()) {
                    tracing::warn!(model = %m, "indexed model has no tokenizer here (--tokenizer, --models-dir): its requests route by load");
                }
            }
        }
        *self.models.write() = (!models.is_empty()).then_some(models);
    }

    /// Counts a request for `model` when no ingester indexed it.
    pub fn request_for(&self, model: &str) {
        // Body-less or unbuffered requests name no model.
        if model.is_empty() {
            return;
        }
        let known = match &*self.models.read() {
            Some(m) => m.contains(model),
            None => return,
        };
        if known {
            return;
        }
        metrics::counter!(UNINDEXED_MODEL).increment(1);
        let mut warned = self.warned_models.lock();
        let due = warned.get(model).is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due && warned.len() < 1024 {
            warned.insert(model.to_string(), Instant::now());
            tracing::warn!(
                model,
                "request for a model no ingester indexed ({MODELS_KEY}): routed by load"
            );
        }
    }

    /// Records `kvroute:pods` against the candidates.
    pub fn pods(&self, pods: &[String], candidates: &Candidates) {
        let endpoints = candidates.current();
        let unmatched = pods
            .iter()
            .filter(|p| endpoint_for(PodId::new(p.as_str()).endpoint(), &endpoints).is_none())
            .count();
        metrics::gauge!(PODS_UNMATCHED).set(unmatched as f64);
        if pods.is_empty() || endpoints.is_empty() || unmatched < pods.len() {
            *self.pods_warned.lock() = None;
            return;
        }
        let mut warned = self.pods_warned.lock();
        if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *warned = Some(Instant::now());
            let sample: Vec<&String> = pods.iter().take(5).collect();
            tracing::warn!(
                indexed = pods.len(),
                ?sample,
                candidates = ?&endpoints[..endpoints.len().min(5)],
                "no pod in {PODS_KEY} is a candidate endpoint (a wrong port in the pods' topics?): prefixes cannot win"
            );
        }
    }
}

/// One round: keying, models, pods.
pub async fn check_once<C: redis::aio::ConnectionLike + Send + Sync + Clone>(
    conn: &mut C,
    info: &IndexInfo,
    candidates: &Candidates,
    tokenizers: &TokenizerRegistry,
    remote: bool,
) -> redis::RedisResult<()> {
    let keying = read_keying(conn).await?;
    info.keying(keying.as_ref());
    let models: Vec<String> = conn.hkeys(MODELS_KEY).await?;
    info.models(models.into_iter().collect(), tokenizers, remote);
    let pods: Vec<String> = conn.smembers(PODS_KEY).await?;
    info.pods(&pods, candidates);
    Ok(())
}

/// Repeats [`check_once`] every `interval` on its own connection.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    urls: Vec<String>,
    cluster: bool,
    info: Arc<IndexInfo>,
    candidates: Arc<Candidates>,
    tokenizers: Arc<TokenizerRegistry>,
    remote: bool,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let round = async {
            if cluster {
                let c = redis::cluster::ClusterClient::new(urls.clone())?;
                let mut conn = c.get_async_connection().await?;
                check_once(&mut conn, &info, &candidates, &tokenizers, remote).await
            } else {
                let c = redis::Client::open(urls[0].as_str())?;
                let mut conn = c.get_multiplexed_async_connection().await?;
                check_once(&mut conn, &info, &candidates, &tokenizers, remote).await
            }
        };
        if let Err(e) = round.await {
            tracing::debug!(error = %e, "keying check: Redis unavailable, retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The start-up check: `Err` when `kvroute:keying` disagrees (unless
/// `allow`). Redis unreachable within `within`: Ok (checked later).
pub async fn check_at_start(
    urls: &[String],
    cluster: bool,
    info: &IndexInfo,
    allow: bool,
    within: Duration,
) -> Result<(), KeyingMismatch> {
    let read = async {
        if cluster {
            let c = redis::cluster::ClusterClient::new(urls.to_vec())?;
            let mut conn = c.get_async_connection().await?;
            read_keying(&mut conn).await
        } else {
            let c = redis::Client::open(urls[0].as_str())?;
            let mut conn = c.get_multiplexed_async_connection().await?;
            read_keying(&mut conn).await
        }
    };
    let stored = match tokio::time::timeout(within, read).await {
        Ok(Ok(stored)) => stored,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "keying check at start: Redis unavailable (checked again later)");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!(
                "keying check at start: Redis did not answer in {within:?} (checked again later)"
            );
            return Ok(());
        }
    };
    if let Some(m) = compare(info.ours(), stored.as_ref())
        && !allow
    {
        return Err(m);
    }
    info.keying(stored.as_ref());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_every_field() {
        let ours = Keying {
            hash_scheme: "sha256_cbor".into(),
            hash_seed: "s".into(),
            block_size: "16".into(),
        };
        let mut h: HashMap<String, String> = [
            ("hash_scheme", "sha256_cbor"),
            ("hash_seed", "s"),
            ("block_size", "16"),
            ("updated_ms", "1"),
            ("writer", "ing-0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert!(compare(&ours, None).is_none());
        assert!(compare(&ours, Some(&h)).is_none());
        h.insert("hash_seed".into(), "other".into());
        let m = compare(&ours, Some(&h)).expect("mismatch");
        assert!(
            m.theirs.contains("\"other\"") && m.theirs.contains("ing-0"),
            "{m}"
        );
        assert!(m.ours.contains("\"s\""), "{m}");
        h.insert("hash_seed".into(), "s".into());
        h.insert("block_size".into(), "32".into());
        assert!(compare(&ours, Some(&h)).is_some());
    }
}
