//! The routing logic behind [`Decide`]: the prompt's prefix scores
//! ([`crate::prefix`]: tokens -> block keys -> index lookup -> tier-weighted
//! scores) -> best rank per endpoint -> blend with load -> endpoint.
//!
//! Any failure before the blend (unknown model, no tokenizer, a template
//! error, Redis down or slower than the lookup deadline) degrades to picking
//! by load with every prefix score at 0, and is counted by reason
//! ([`Fallback`]): Envoy cannot fail open in FULL_DUPLEX_STREAMED mode, so the
//! scorer must always answer with an endpoint.

use crate::candidates::{Candidates, endpoint_for};
use crate::decide::{Charge, Decide, DecideError, Decision, Prompt, RouteRequest};
use crate::load::Load;
use crate::metrics as m;
use crate::pending::PendingPrefixes;
use crate::prefix::{PrefixError, PrefixLookup, PromptPrefix, ScoredPod};
use crate::reason::{Fallback, Reason};
use crate::tokenize::{Tokenize, TokenizeConfig};
use kvroute_core::ids::{BlockKey, Tier};
use kvroute_core::index::Index;
use kvroute_core::keys::{KeyCache, KeyScheme};
use kvroute_core::scoring::pick::{self, Breakdown, Candidate, LoadLimits, PickWeights};
use kvroute_core::scoring::{TierWeights, best_tier, fold_best};
use kvroute_tokens::TokenizerRegistry;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Tunables of the routing stage.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub weights: PickWeights,
    pub limits: LoadLimits,
    pub tiers: TierWeights,
    /// A lookup slower than this is abandoned (route by load).
    pub lookup_timeout: Duration,
    /// Scraped engine metrics older than this are ignored.
    pub metrics_max_age: Duration,
    /// LoRA adapter name -> base model (the index is keyed by the base
    /// model's topic name; adapter blocks carry the adapter as extra key).
    pub adapters: HashMap<String, String>,
    /// Where tokenization runs (blocking pool, remote vLLM).
    pub tokenize: TokenizeConfig,
    /// Blocks of a prompt looked up at most (its first ones).
    pub max_lookup_blocks: usize,
    /// Merge the prefixes this replica's routed requests are still
    /// computing into lookups ([`crate::pending`]).
    pub pending_prefixes: bool,
    /// Block keys the pending records may hold in all.
    pub pending_max_blocks: usize,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            weights: PickWeights::default(),
            limits: LoadLimits::default(),
            tiers: TierWeights::default(),
            lookup_timeout: Duration::from_millis(50),
            metrics_max_age: Duration::from_secs(2),
            adapters: HashMap::new(),
            tokenize: TokenizeConfig::default(),
            max_lookup_blocks: DEFAULT_MAX_LOOKUP_BLOCKS,
            pending_prefixes: true,
            pending_max_blocks: crate::pending::DEFAULT_MAX_BLOCKS,
        }
    }
}

/// Default of `--max-lookup-blocks`: 8192 blocks of 16 tokens is a 128k-token
/// context, the largest common one (Llama 3.1); a longer prompt's lookup
/// covers its first 128k tokens. Past that a 2M-token prompt held Redis
/// ~42 ms in one lookup script, blocking every other client.
pub const DEFAULT_MAX_LOOKUP_BLOCKS: usize = 8192;

/// One endpoint's view in a scoring report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EndpointScore {
    pub endpoint: String,
    /// Consecutive cached blocks from block 0: the longer of what the
    /// index holds and `pending_blocks`.
    pub blocks: u32,
    /// Leading blocks of the prompt that requests this replica routed to
    /// the endpoint are computing (not yet in the index).
    pub pending_blocks: u32,
    /// The best tier holding the prefix's first block (None: no blocks).
    pub tier: Option<String>,
    /// The blended total the pick compared.
    pub score: f64,
    pub prefix: f64,
    pub in_flight: u32,
    /// Pending prefill tokens the scorers sent here (router-counted).
    pub in_flight_tokens: u64,
    /// This request's prompt tokens not cached here.
    pub uncached_tokens: u64,
    pub waiting: Option<u32>,
    pub kv_usage: Option<f64>,
    pub saturated: bool,
}

/// Everything a decision considered (the HTTP API returns it).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub model: String,
    /// Full blocks of the prompt.
    pub blocks: usize,
    pub scores: Vec<EndpointScore>,
    pub picked: Option<String>,
    /// Why the pick was made (serialized as its label: `prefix`, `load`, or
    /// a fallback reason).
    pub reason: Reason,
}

/// The scorer's endpoint picker: Envoy's question "which pod serves this
/// request" answered from the index and the pods' load.
pub struct EndpointPicker<I> {
    /// Model -> tokens -> keys -> lookup -> scores, shared with the indexer
    /// API and `why` (the key cache inside means a repeated or extended
    /// prompt is not hashed again).
    prefixes: PrefixLookup<I>,
    candidates: Arc<Candidates>,
    load: Load,
    config: RouteConfig,
    /// SplitMix64 state for tie-breaks (seedable for tests and benches).
    rng: Mutex<u64>,
    /// The ingesters' view (`kvroute:models`), when a check runs.
    index_info: Option<Arc<crate::keying::IndexInfo>>,
    /// Tokens per block of the key scheme (cached blocks -> cached tokens).
    block_size: u64,
    /// Prefixes routed requests are computing, keyed by charge ticket.
    pending: PendingPrefixes,
}

/// A report and what a decision records of it.
struct Scored {
    report: Report,
    /// The base model and the looked-up keys of the prompt.
    base: String,
    keys: Vec<BlockKey>,
}

impl<I: Index + 'static> EndpointPicker<I> {
    pub fn new(
        index: Arc<I>,
        keys: KeyScheme,
        tokenizers: Arc<TokenizerRegistry>,
        candidates: Arc<Candidates>,
        load: Load,
        config: RouteConfig,
        seed: u64,
    ) -> Self {
        let block_size = keys.block_size() as u64;
        let key_cache = KeyCache::new(keys, kvroute_core::keys::cache::DEFAULT_MAX_BYTES);
        let tokenize = Tokenize::new(tokenizers, key_cache, config.tokenize.clone());
        let pending = PendingPrefixes::new(config.pending_max_blocks);
        EndpointPicker {
            prefixes: PrefixLookup::new(index, Arc::new(tokenize), &config),
            candidates,
            load,
            config,
            rng: Mutex::new(seed),
            index_info: None,
            block_size,
            pending,
        }
    }

    /// Counts decisions for models no ingester indexed (`kvroute:models`).
    pub fn with_index_info(mut self, info: Arc<crate::keying::IndexInfo>) -> Self {
        self.index_info = Some(info);
        self
    }

    pub fn load(&self) -> &Load {
        &self.load
    }

    /// The tokenization stage (path counters, pool).
    pub fn tokenize(&self) -> &Arc<Tokenize> {
        self.prefixes.tokenize()
    }

    fn random(&self) -> u64 {
        let mut s = self.rng.lock();
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Scores every candidate for `req` and picks one, without recording the
    /// pick as in flight (the HTTP API's dry run; [`Decide::decide`] records).
    pub async fn score(&self, req: &RouteRequest, subset: Option<&[String]>) -> Report {
        self.score_inner(req, subset, false).await.report
    }

    /// [`Self::score`] for a list of endpoints an API caller named (`/v1/score`'s
    /// `endpoints`): they are scored, but remote tokenization dials only those
    /// among the configured or discovered candidates, so a caller cannot make
    /// the scorer POST prompts to a host of its choosing (the others are
    /// counted in `kvroute_scorer_dial_rejected_total{api="score"}`). Envoy's
    /// subset hint ([`Self::score`]) comes from the gateway and is trusted.
    pub async fn score_for_caller(
        &self,
        req: &RouteRequest,
        endpoints: Option<&[String]>,
    ) -> Report {
        self.score_inner(req, endpoints, true).await.report
    }

    /// Requests whose pending prefix this replica holds.
    pub fn pending_requests(&self) -> usize {
        self.pending.requests()
    }

    async fn score_inner(
        &self,
        req: &RouteRequest,
        subset: Option<&[String]>,
        caller_named: bool,
    ) -> Scored {
        let endpoints = self.reachable(self.candidates.for_request(subset));
        let dial = match subset {
            Some(named) if caller_named && !named.is_empty() => {
                Arc::new(dialable(&endpoints, &self.candidates, "score"))
            }
            _ => endpoints.clone(),
        };
        let found = self.prefixes.lookup(req, &dial).await;
        record_stages(&found);
        let (mut reason, prefix) = match &found.pods {
            Err(e) => (Reason::Fallback(fallback(e)), BTreeMap::new()),
            Ok(pods) => (Reason::Prefix, self.best_per_endpoint(pods, &endpoints)),
        };
        let looked = &found.keys[..found.looked];
        let pending: HashMap<Arc<str>, u32> = if self.config.pending_prefixes {
            self.pending
                .depths(&found.base, looked)
                .into_iter()
                .collect()
        } else {
            HashMap::new()
        };
        let pending_of = |ep: &String| pending.get(ep.as_str()).copied().unwrap_or(0);
        // A pending block will be computed on the GPU.
        let pending_weight = self.config.tiers.weight(&Tier::gpu()) / looked.len().max(1) as f64;
        let prompt = prompt_tokens(req, found.keys.len(), self.block_size);
        let cands: Vec<Candidate> = endpoints
            .iter()
            .map(|ep| {
                let engine = self.load.engines.fresh(ep, self.config.metrics_max_age);
                let indexed = prefix.get(ep).map_or(0, |p| p.score.blocks);
                let cached = u64::from(indexed.max(pending_of(ep)));
                let from_index = prefix.get(ep).map_or(0.0, |p| p.score.normalized);
                Candidate {
                    prefix: from_index.max(f64::from(pending_of(ep)) * pending_weight),
                    in_flight: self.load.in_flight.get(ep),
                    waiting: engine.map(|e| e.waiting.round() as u32),
                    kv_usage: engine.and_then(|e| e.kv_usage),
                    in_flight_tokens: self.load.in_flight.tokens(ep),
                    uncached_tokens: prompt.saturating_sub(cached * self.block_size),
                }
            })
            .collect();
        let breakdowns = pick::blend(&cands, &self.config.weights, &self.config.limits);
        let chosen = pick::choose(&breakdowns, || self.random());
        if reason == Reason::Prefix && chosen.is_some_and(|i| cands[i].prefix == 0.0) {
            reason = Reason::Load;
        }
        if let Some(i) = chosen {
            let max = prefix.values().map(|p| p.score.blocks).max().unwrap_or(0);
            metrics::histogram!(m::MATCHED_BLOCKS).record(f64::from(max));
            let indexed = prefix.get(&endpoints[i]).map_or(0, |p| p.score.blocks);
            if pending_of(&endpoints[i]) > indexed {
                metrics::counter!(m::PENDING_PREFIX_PICKS).increment(1);
            }
            log_breakdown(&endpoints, &breakdowns, i);
        }
        let report = Report {
            model: req.model.clone(),
            blocks: found.keys.len(),
            scores: endpoints
                .iter()
                .zip(cands.iter().zip(&breakdowns))
                .map(|(ep, (c, b))| {
                    let p = prefix.get(ep);
                    EndpointScore {
                        endpoint: ep.clone(),
                        blocks: p.map_or(0, |p| p.score.blocks).max(pending_of(ep)),
                        pending_blocks: pending_of(ep),
                        tier: p
                            .and_then(|p| best_tier(&p.prefix, &self.config.tiers))
                            .map(|t| t.to_string()),
                        score: b.total,
                        prefix: b.prefix,
                        in_flight: c.in_flight,
                        in_flight_tokens: c.in_flight_tokens,
                        uncached_tokens: c.uncached_tokens,
                        waiting: c.waiting,
                        kv_usage: c.kv_usage,
                        saturated: b.saturated,
                    }
                })
                .collect(),
            picked: chosen.map(|i| endpoints[i].clone()),
            reason,
        };
        // The looked-up keys move to the decision's pending record (none
        // when the feature is off): no copy on the request's path.
        let mut keys = found.keys;
        keys.truncate(if self.config.pending_prefixes {
            found.looked
        } else {
            0
        });
        Scored {
            report,
            keys,
            base: found.base,
        }
    }

    /// The candidates without those the scraper found down; all of them
    /// when every one is down (route by load among them rather than answer
    /// "no endpoint": the scrape itself may be what fails).
    fn reachable(&self, endpoints: Arc<Vec<String>>) -> Arc<Vec<String>> {
        let engines = &self.load.engines;
        if !endpoints.iter().any(|e| engines.is_down(e)) {
            return endpoints;
        }
        let up: Vec<String> = endpoints
            .iter()
            .filter(|e| !engines.is_down(e))
            .cloned()
            .collect();
        if up.is_empty() {
            metrics::counter!(m::ALL_CANDIDATES_DOWN).increment(1);
            endpoints
        } else {
            Arc::new(up)
        }
    }

    /// Each candidate endpoint's best index pod (several data-parallel ranks
    /// of one endpoint: the best one counts); pods of no candidate drop out.
    fn best_per_endpoint<'a>(
        &self,
        pods: &'a [ScoredPod],
        endpoints: &'a [String],
    ) -> BTreeMap<&'a String, &'a ScoredPod> {
        let answering = pods
            .iter()
            .filter_map(|p| Some((endpoint_for(p.score.pod.endpoint(), endpoints)?, p)));
        fold_best(answering, |p| p.score.normalized)
    }
}

/// Prompt tokens of `req` for the prefill term and charge: exact for token
/// ids; otherwise the tokens of the prompt's full blocks (the trailing
/// partial block, under one block, is not kept past keying); 0 when
/// tokenization failed, as nothing is known of the prompt then (the
/// request-count terms still spread such requests).
fn prompt_tokens(req: &RouteRequest, full_blocks: usize, block_size: u64) -> u64 {
    let from_blocks = full_blocks as u64 * block_size;
    match &req.prompt {
        Prompt::TokenIds(ids) => (ids.len() as u64).max(from_blocks),
        Prompt::Text(_) | Prompt::Chat(_) => from_blocks,
    }
}

/// The endpoints among `named` (a caller's list) that are configured or
/// discovered candidates: the only ones the scorer may dial on a caller's
/// behalf. The rest are counted as rejected (`api` labels who named them).
pub fn dialable(named: &[String], candidates: &Candidates, api: &'static str) -> Vec<String> {
    let known = candidates.current();
    let (ok, rejected): (Vec<String>, Vec<String>) =
        named.iter().cloned().partition(|e| known.contains(e));
    if !rejected.is_empty() {
        metrics::counter!(m::DIAL_REJECTED, "api" => api).increment(rejected.len() as u64);
        tracing::debug!(
            ?rejected,
            api,
            "caller-named endpoints are not candidates: not dialed"
        );
    }
    ok
}

/// The prefix stage's fallback reason, with a log line for a failed lookup.
fn fallback(e: &PrefixError) -> Fallback {
    if let PrefixError::Index(e) = e {
        tracing::debug!(error = %e, "index lookup failed: routing by load");
    }
    e.fallback()
}

/// The routing stages' histograms (tokenization, prompt size, lookup).
fn record_stages(found: &PromptPrefix) {
    metrics::histogram!(m::TOKENIZE_SECONDS).record(found.timings.tokenize.as_secs_f64());
    if let Some(lookup) = found.timings.lookup {
        // Looked up: tokenization succeeded, the keys are the prompt's.
        metrics::histogram!(m::PROMPT_BLOCKS).record(found.keys.len() as f64);
        metrics::histogram!(m::LOOKUP_SECONDS).record(lookup.as_secs_f64());
    }
}

fn log_breakdown(endpoints: &[String], breakdowns: &[Breakdown], chosen: usize) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        for (ep, b) in endpoints.iter().zip(breakdowns) {
            tracing::debug!(
                endpoint = %ep,
                prefix = b.prefix,
                queue = b.queue,
                kv_usage = b.kv_usage,
                in_flight = b.in_flight,
                tokens = b.tokens,
                saturated = b.saturated,
                total = b.total,
                "candidate"
            );
        }
        tracing::debug!(picked = %endpoints[chosen], "picked");
    }
}

impl<I: Index + 'static> Decide for EndpointPicker<I> {
    async fn decide(
        &self,
        request: RouteRequest,
        subset: Option<Vec<String>>,
    ) -> Result<Decision, DecideError> {
        if let Some(info) = &self.index_info {
            info.request_for(self.prefixes.resolve_model(&request.model).0);
        }
        let Scored { report, base, keys } =
            self.score_inner(&request, subset.as_deref(), false).await;
        let reason = report.reason.as_label();
        metrics::counter!(m::DECISIONS, "reason" => reason).increment(1);
        if report.reason.fallback().is_some() {
            metrics::counter!(m::FALLBACKS, "reason" => reason).increment(1);
        }
        let endpoint = report.picked.ok_or(DecideError::NoCandidates)?;
        let tokens = report
            .scores
            .iter()
            .find(|s| s.endpoint == endpoint)
            .map_or(0, |s| s.uncached_tokens);
        self.load.in_flight.start(&endpoint);
        let ticket = self.load.in_flight.charge(&endpoint, tokens);
        if !self.pending.record(ticket, &base, &endpoint, keys) {
            metrics::counter!(m::PENDING_PREFIX_SKIPPED).increment(1);
        }
        Ok(Decision {
            endpoint,
            reason,
            charge: Some(Charge { ticket, tokens }),
        })
    }

    fn prefill_done(&self, decision: &Decision) {
        if let Some(c) = decision.charge {
            self.load.in_flight.release(c.ticket);
        }
    }

    fn finished(&self, decision: &Decision) {
        self.prefill_done(decision);
        if let Some(c) = decision.charge {
            self.pending.release(c.ticket);
        }
        self.load.in_flight.finish(&decision.endpoint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Prompt;
    use kvroute_core::ids::BlockKey;
    use kvroute_core::ids::ModelName;
    use kvroute_core::ids::{PodId, Tier};
    use kvroute_core::index::memory::MemoryIndex;
    use kvroute_core::index::{IndexOp, StoredBlock};
    use kvroute_core::keys::{ExtraKeys, HashScheme};
    use kvroute_tokens::TokenizerOptions;
    use std::path::PathBuf;

    const A: &str = "127.0.0.11:8000";
    const B: &str = "127.0.0.12:8000";

    fn scheme() -> KeyScheme {
        KeyScheme::new(HashScheme::Sha256Cbor, "vllm-none-hash", 4).expect("scheme")
    }

    fn tiny() -> PathBuf {
        kvroute_testkit::test_env::testdata("tokens/tiny")
    }

    fn router(limits: LoadLimits) -> (EndpointPicker<MemoryIndex>, Arc<MemoryIndex>) {
        let index = Arc::new(MemoryIndex::new(10_000));
        let tokenizers = Arc::new(TokenizerRegistry::new(
            [("tiny".to_string(), tiny())],
            vec![],
            TokenizerOptions::default(),
        ));
        let candidates =
            Arc::new(Candidates::new(&[A.to_string(), B.to_string()]).expect("endpoints"));
        let config = RouteConfig {
            limits,
            adapters: HashMap::from([("tiny-lora".to_string(), "tiny".to_string())]),
            ..RouteConfig::default()
        };
        let r = EndpointPicker::new(
            index.clone(),
            scheme(),
            tokenizers,
            candidates,
            Load::default(),
            config,
            7,
        );
        (r, index)
    }

    fn store(index: &MemoryIndex, pod: &str, model: &str, keys: &[BlockKey]) {
        index.apply_sync(&[IndexOp::Store {
            model: ModelName::new(model),
            pod: PodId::new(pod),
            tier: Tier::gpu(),
            blocks: keys
                .iter()
                .map(|&key| StoredBlock { key, engine: None })
                .collect(),
        }]);
    }

    fn ids_request(model: &str, ids: Vec<u32>) -> RouteRequest {
        RouteRequest {
            model: model.into(),
            prompt: Prompt::TokenIds(ids),
            cache_salt: None,
            chat_template_kwargs: None,
            request_id: None,
        }
    }

    #[tokio::test]
    async fn longest_prefix_wins_then_load_spreads() {
        let limits = LoadLimits {
            max_in_flight: Some(2),
            ..LoadLimits::default()
        };
        let (r, index) = router(limits);
        let ids: Vec<u32> = (0..32).collect();
        let keys = scheme().block_keys(&ids, ExtraKeys::NONE);
        store(&index, B, "tiny", &keys);
        store(&index, A, "tiny", &keys[..2]);
        let report = r.score(&ids_request("tiny", ids.clone()), None).await;
        assert_eq!(report.blocks, 8);
        assert_eq!(report.picked.as_deref(), Some(B));
        assert_eq!(report.reason.as_label(), "prefix");
        let b = report
            .scores
            .iter()
            .find(|s| s.endpoint == B)
            .expect("B scored");
        assert_eq!((b.blocks, b.tier.as_deref()), (8, Some("gpu")));
        // Two in flight saturate B: the third request goes to A.
        let mut decisions = Vec::new();
        for _ in 0..3 {
            let d = r
                .decide(ids_request("tiny", ids.clone()), None)
                .await
                .expect("decision");
            decisions.push(d);
        }
        let picks: Vec<&str> = decisions.iter().map(|d| d.endpoint.as_str()).collect();
        assert_eq!(picks, vec![B, B, A]);
        r.finished(&decisions[0]);
        let d = r
            .decide(ids_request("tiny", ids.clone()), None)
            .await
            .expect("decision");
        assert_eq!(d.endpoint, B);
    }

    /// A decision charges the chosen pod with the prompt's uncached tokens
    /// (34 ids, block size 4: 8 full blocks; B holds 8, A holds 2); the
    /// first byte releases them and the end releases nothing more; an end
    /// without a first byte releases them too.
    /// A request sharing the prompt of one still running follows it to its
    /// endpoint although the index knows nothing yet (its BlockStored has
    /// not arrived); the record goes with the request's end, not its first
    /// byte (the index may still lag then), and is off with the setting.
    #[tokio::test]
    async fn running_requests_prefixes_count_before_the_index_has_them() {
        let (r, _index) = router(LoadLimits::default());
        let ids: Vec<u32> = (0..32).collect();
        let first = r
            .decide(ids_request("tiny", ids.clone()), None)
            .await
            .expect("decision");
        assert_eq!(r.pending_requests(), 1);
        let mut longer = ids.clone();
        longer.extend(100..108);
        let report = r.score(&ids_request("tiny", longer.clone()), None).await;
        assert_eq!(report.picked.as_deref(), Some(first.endpoint.as_str()));
        assert_eq!(report.reason.as_label(), "prefix");
        let s = report
            .scores
            .iter()
            .find(|s| s.endpoint == first.endpoint)
            .expect("scored");
        assert_eq!((s.blocks, s.pending_blocks), (8, 8));
        assert_eq!(s.uncached_tokens, 8, "only the new block is uncached");
        let second = r
            .decide(ids_request("tiny", longer.clone()), None)
            .await
            .expect("decision");
        assert_eq!(second.endpoint, first.endpoint);
        r.prefill_done(&first);
        assert_eq!(r.pending_requests(), 2, "the first byte keeps the record");
        r.finished(&first);
        r.finished(&second);
        assert_eq!(r.pending_requests(), 0);
        let report = r.score(&ids_request("tiny", longer.clone()), None).await;
        assert!(report.scores.iter().all(|s| s.pending_blocks == 0));
        assert_eq!(report.reason.as_label(), "load");

        let (off, _index) = router(LoadLimits::default());
        let off = EndpointPicker {
            config: RouteConfig {
                pending_prefixes: false,
                ..off.config.clone()
            },
            ..off
        };
        let d = off
            .decide(ids_request("tiny", ids), None)
            .await
            .expect("decision");
        assert_eq!(off.pending_requests(), 0);
        let report = off.score(&ids_request("tiny", longer), None).await;
        assert!(report.scores.iter().all(|s| s.pending_blocks == 0));
        off.finished(&d);
    }

    #[tokio::test]
    async fn decisions_charge_uncached_tokens_until_the_first_byte() {
        let (r, index) = router(LoadLimits::default());
        let ids: Vec<u32> = (0..34).collect();
        let keys = scheme().block_keys(&ids, ExtraKeys::NONE);
        store(&index, B, "tiny", &keys);
        store(&index, A, "tiny", &keys[..2]);
        let report = r.score(&ids_request("tiny", ids.clone()), None).await;
        let uncached = |ep: &str| {
            report
                .scores
                .iter()
                .find(|s| s.endpoint == ep)
                .map(|s| s.uncached_tokens)
        };
        // 34 - 8 x 4 on B, 34 - 2 x 4 on A.
        assert_eq!((uncached(B), uncached(A)), (Some(2), Some(26)));
        let inflight = &r.load().in_flight;
        let d = r
            .decide(ids_request("tiny", ids.clone()), None)
            .await
            .expect("decision");
        assert_eq!(d.endpoint, B);
        assert_eq!(d.charge.map(|c| c.tokens), Some(2));
        assert_eq!((inflight.tokens(B), inflight.get(B)), (2, 1));
        r.prefill_done(&d);
        assert_eq!((inflight.tokens(B), inflight.get(B)), (0, 1));
        // A second charge on B, released by the end alone; the first
        // decision's end releases only its slot.
        let d2 = r
            .decide(ids_request("tiny", ids.clone()), None)
            .await
            .expect("decision");
        assert_eq!((d2.endpoint.as_str(), inflight.tokens(B)), (B, 2));
        r.finished(&d);
        assert_eq!((inflight.tokens(B), inflight.get(B)), (2, 1));
        r.finished(&d2);
        assert_eq!((inflight.tokens(B), inflight.get(B)), (0, 0));
        // The charge is what the next decision sees: 2 pending on B.
        let _held = r
            .decide(ids_request("tiny", ids.clone()), None)
            .await
            .expect("decision");
        let report = r.score(&ids_request("tiny", ids), None).await;
        let b = report
            .scores
            .iter()
            .find(|s| s.endpoint == B)
            .expect("B scored");
        assert_eq!(b.in_flight_tokens, 2);
    }

    #[tokio::test]
    async fn text_prompts_and_lora_adapters_key_like_the_ingester() {
        let (r, index) = router(LoadLimits::default());
        let tok = TokenizerRegistry::new(
            [("tiny".to_string(), tiny())],
            vec![],
            TokenizerOptions::default(),
        )
        .get("tiny")
        .expect("tiny tokenizer");
        let text = "the quick brown fox jumps over the lazy dog and keeps running far away";
        let ids = tok.encode_completion(text).expect("ids");
        let lora_keys = scheme().block_keys(&ids, ExtraKeys::lora("tiny-lora"));
        assert!(!lora_keys.is_empty());
        store(&index, A, "tiny", &lora_keys);
        let mut req = ids_request("tiny-lora", vec![]);
        req.prompt = Prompt::Text(text.into());
        let report = r.score(&req, None).await;
        assert_eq!(report.picked.as_deref(), Some(A));
        assert_eq!(report.reason.as_label(), "prefix");
        // The base model's blocks are different keys: no match.
        req.model = "tiny".into();
        let report = r.score(&req, None).await;
        assert_eq!(report.reason.as_label(), "load");
    }

    #[tokio::test]
    async fn failures_route_by_load_and_subset_narrows() {
        let (r, _) = router(LoadLimits::default());
        let mut req = ids_request("unknown", vec![]);
        req.prompt = Prompt::Text("hello".into());
        let report = r.score(&req, None).await;
        assert_eq!(report.reason.as_label(), "no_tokenizer");
        assert!(report.picked.is_some());
        let subset = vec![B.to_string()];
        let d = r.decide(req.clone(), Some(subset)).await.expect("decision");
        assert_eq!(d.endpoint, B);
        let none = vec!["not-an-endpoint".to_string()];
        assert_eq!(
            r.decide(req, Some(none)).await,
            Err(DecideError::NoCandidates)
        );
    }
}
