//! llm-d's remote-indexer gRPC API, `indexer.v1.IndexerService/GetPodScores`,
//! served on the scorer's gRPC port next to ext_proc.
//!
//! An llm-d endpoint picker configured with a remote indexer asks this API
//! for every pod's prefix-cache score of a prompt instead of keeping an index
//! of its own. kvroute answers from the index and with the block keys it
//! routes by, so an llm-d scheduler can use kvroute's index (or run beside
//! kvroute during a migration) without changing its own scoring plugins.
//!
//! Semantics follow llm-d-kv-cache's `Indexer.GetPodScores` with its
//! `LongestPrefix` scorer: the prompt is tokenized as a completion, cut into
//! block keys, and a pod's score is its run of consecutive cached blocks from
//! block 0, each block counting the weight of the best tier holding it (gpu
//! 1, cpu 0.8 by default, `--tier-weights`). Scores are not normalised (a
//! score reads as weighted blocks) and no load is blended in: the caller
//! blends. Only pods holding block 0 appear; a non-empty `pod_identifiers`
//! restricts the answer to those pods. Tokenization goes through the
//! router's stage (`crate::tokenize`): a busy pool or a failed vLLM
//! `/tokenize` is `UNAVAILABLE`, a model without a tokenizer
//! `FAILED_PRECONDITION`.
//!
//! There is no `protoc` at build time, so the messages and the server
//! plumbing are written by hand in the shape `tonic-build` generates from
//! llm-d-kv-cache's `api/indexerpb/indexer.proto`; a unit test pins the wire
//! bytes.

use crate::candidates::{Candidates, endpoint_for};
use crate::decide::{Prompt, RouteRequest};
use crate::prefix::{PrefixError, PrefixLookup};
use crate::reason::Fallback;
use crate::route::RouteConfig;
use crate::tokenize::Tokenize;
use kvroute_core::index::{Index, IndexError};
use kvroute_core::keys::{KeyCache, KeyScheme};
use kvroute_core::scoring::fold_best;
use kvroute_tokens::TokenizerRegistry;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::NamedService;

/// `GetPodScoresRequest` (indexer.proto field numbers).
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct GetPodScoresRequest {
    #[prost(string, tag = "1")]
    pub prompt: String,
    #[prost(string, tag = "2")]
    pub model_name: String,
    /// Pods to score (their addresses); empty: every pod found.
    #[prost(string, repeated, tag = "3")]
    pub pod_identifiers: Vec<String>,
}

/// `GetPodScoresResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetPodScoresResponse {
    #[prost(message, repeated, tag = "1")]
    pub scores: Vec<PodScore>,
}

/// `PodScore`. Field 3 is the newer upstream proto's data-parallel rank: a
/// client built from the older proto skips it, and a pod without ranks
/// leaves it absent (upstream: "-1 (or absent) means non-DP").
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodScore {
    #[prost(string, tag = "1")]
    pub pod: String,
    #[prost(double, tag = "2")]
    pub score: f64,
    #[prost(int32, optional, tag = "3")]
    pub data_parallel_rank: Option<i32>,
}

/// The fully qualified gRPC service name.
pub const SERVICE_NAME: &str = "indexer.v1.IndexerService";
/// The one method's HTTP/2 path.
pub const GET_POD_SCORES_PATH: &str = "/indexer.v1.IndexerService/GetPodScores";

/// The service as `tonic-build` would declare it.
#[tonic::async_trait]
pub trait IndexerService: Send + Sync + 'static {
    async fn get_pod_scores(
        &self,
        request: tonic::Request<GetPodScoresRequest>,
    ) -> Result<tonic::Response<GetPodScoresResponse>, tonic::Status>;
}

/// The tower service tonic's router mounts under [`SERVICE_NAME`]. Holds the
/// implementation as a trait object so the gRPC server's signature stays
/// free of the index type.
#[derive(Clone)]
pub struct IndexerServiceServer {
    inner: Arc<dyn IndexerService>,
}

impl IndexerServiceServer {
    pub fn new(inner: impl IndexerService) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl NamedService for IndexerServiceServer {
    const NAME: &'static str = SERVICE_NAME;
}

/// `GetPodScores` as a unary gRPC method.
struct GetPodScoresSvc(Arc<dyn IndexerService>);

impl tonic::server::UnaryService<GetPodScoresRequest> for GetPodScoresSvc {
    type Response = GetPodScoresResponse;
    type Future = BoxFuture<tonic::Response<GetPodScoresResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<GetPodScoresRequest>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.get_pod_scores(request).await })
    }
}

impl<B> Service<http::Request<B>> for IndexerServiceServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == GET_POD_SCORES_PATH {
            let method = GetPodScoresSvc(Arc::clone(&self.inner));
            return Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(method, req).await)
            });
        }
        Box::pin(async move {
            let mut response = http::Response::new(tonic::body::Body::default());
            let headers = response.headers_mut();
            headers.insert(
                tonic::Status::GRPC_STATUS,
                (tonic::Code::Unimplemented as i32).into(),
            );
            headers.insert(
                http::header::CONTENT_TYPE,
                tonic::metadata::GRPC_CONTENT_TYPE,
            );
            Ok(response)
        })
    }
}

/// Why a prompt could not be scored; each maps to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ScoresError {
    #[error("model_name is empty")]
    NoModel,
    #[error("no tokenizer for model {model}")]
    NoTokenizer { model: String },
    /// The tokenization stage's fallback other than `no_tokenizer`.
    #[error("tokenizing the prompt: {0}")]
    Tokenize(Fallback),
    #[error("index lookup: {0}")]
    Index(#[from] IndexError),
    #[error("index lookup exceeded {0:?}")]
    Timeout(Duration),
}

impl ScoresError {
    pub fn label(&self) -> &'static str {
        match self {
            ScoresError::NoModel => "no_model",
            ScoresError::NoTokenizer { .. } => "no_tokenizer",
            ScoresError::Tokenize(reason) => reason.as_label(),
            ScoresError::Index(_) => "index_unavailable",
            ScoresError::Timeout(_) => "index_timeout",
        }
    }

    fn status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self {
            ScoresError::NoModel => tonic::Status::invalid_argument(msg),
            ScoresError::NoTokenizer { .. } => tonic::Status::failed_precondition(msg),
            ScoresError::Tokenize(f) if f.is_transient() => tonic::Status::unavailable(msg),
            ScoresError::Tokenize(_) => tonic::Status::invalid_argument(msg),
            ScoresError::Index(_) => tonic::Status::unavailable(msg),
            ScoresError::Timeout(_) => tonic::Status::deadline_exceeded(msg),
        }
    }
}

impl ScoresError {
    /// A prompt-prefix failure as llm-d's indexer reports it (the tokenizer
    /// named is the base model's).
    fn from_prefix(e: PrefixError, base: &str) -> Self {
        match e {
            PrefixError::Tokenize(Fallback::NoTokenizer) => ScoresError::NoTokenizer {
                model: base.to_string(),
            },
            PrefixError::Tokenize(f) => ScoresError::Tokenize(f),
            PrefixError::Index(e) => ScoresError::Index(e),
            PrefixError::Timeout(t) => ScoresError::Timeout(t),
        }
    }
}

/// Scores prompts against the index the way llm-d's indexer does, through
/// the router's prefix stage ([`PrefixLookup`]: key scheme, tokenizers,
/// tier weights, LoRA adapters, lookup deadline).
pub struct PodScorer<I> {
    prefixes: PrefixLookup<I>,
    /// The only pods remote tokenization may dial (`pod_identifiers` come
    /// from the caller; see [`crate::route::dialable`]). Empty by default.
    candidates: Arc<Candidates>,
}

impl<I: Index + 'static> PodScorer<I> {
    /// A scorer with its own tokenization stage (see [`Self::sharing`]).
    pub fn new(
        index: Arc<I>,
        keys: KeyScheme,
        tokenizers: Arc<TokenizerRegistry>,
        config: &RouteConfig,
    ) -> Self {
        let keys = KeyCache::new(keys, kvroute_core::keys::cache::DEFAULT_MAX_BYTES);
        let tokenize = Tokenize::new(tokenizers, keys, config.tokenize.clone());
        Self::sharing(index, Arc::new(tokenize), config)
    }

    /// A scorer using the router's tokenization stage (its pool and caches:
    /// one pool bounds all tokenization of the process).
    pub fn sharing(index: Arc<I>, tokenize: Arc<Tokenize>, config: &RouteConfig) -> Self {
        PodScorer {
            prefixes: PrefixLookup::new(index, tokenize, config),
            candidates: Arc::new(Candidates::default()),
        }
    }

    /// Remote tokenization may dial these pods (the scorer's candidates):
    /// those of `pod_identifiers` among them, or all of them when the
    /// request names none.
    pub fn dialing(mut self, candidates: Arc<Candidates>) -> Self {
        self.candidates = candidates;
        self
    }

    /// Every pod holding the prompt's first block (among `pod_identifiers`
    /// when given), best score first; ties by pod name.
    pub async fn pod_scores(
        &self,
        req: &GetPodScoresRequest,
    ) -> Result<Vec<PodScore>, ScoresError> {
        if req.model_name.is_empty() {
            return Err(ScoresError::NoModel);
        }
        if req.prompt.is_empty() {
            return Ok(Vec::new());
        }
        let route = RouteRequest {
            model: req.model_name.clone(),
            prompt: Prompt::Text(req.prompt.clone()),
            cache_salt: None,
            chat_template_kwargs: None,
            request_id: None,
        };
        // Remote tokenization (when on) may ask the pods named by address,
        // if they are candidates (never a host the caller picks).
        let pods: Vec<String> = if req.pod_identifiers.is_empty() {
            self.candidates.current().to_vec()
        } else {
            let named: Vec<String> = req
                .pod_identifiers
                .iter()
                .filter_map(|p| p.parse::<SocketAddr>().ok())
                .map(|a| a.to_string())
                .collect();
            crate::route::dialable(&named, &self.candidates, "indexer")
        };
        let found = self.prefixes.lookup(&route, &pods).await;
        let fail = |e| ScoresError::from_prefix(e, &found.base);
        let found_pods = match found.pods {
            Err(PrefixError::Tokenize(f)) => return Err(fail(PrefixError::Tokenize(f))),
            // Less than a block: nothing to score, whatever the index said.
            _ if found.keys.is_empty() => return Ok(Vec::new()),
            Err(e) => return Err(fail(e)),
            Ok(pods) => pods,
        };
        // Several index pods can name one answer (data-parallel ranks are
        // kept apart; a bare IP and its ip:port are not): the best counts.
        let answering = found_pods.into_iter().filter_map(|p| {
            let s = p.score;
            let pod = if req.pod_identifiers.is_empty() {
                s.pod.endpoint().to_string()
            } else {
                requested(s.pod.endpoint(), &req.pod_identifiers)?.clone()
            };
            let rank = s
                .pod
                .dp_rank()
                .map(|r| i32::try_from(r).unwrap_or(i32::MAX));
            Some(((pod, rank), s.weighted))
        });
        let mut scores: Vec<PodScore> = fold_best(answering, |w| *w)
            .into_iter()
            .map(|((pod, data_parallel_rank), score)| PodScore {
                pod,
                score,
                data_parallel_rank,
            })
            .collect();
        scores.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(scores)
    }
}

/// The requested identifier an index pod's endpoint answers to: itself, the
/// only `ip:port` of a bare-IP pod id, or a bare-IP identifier of an
/// `ip:port` pod (llm-d names pods by address, with or without the port).
fn requested<'a>(pod_endpoint: &str, ids: &'a [String]) -> Option<&'a String> {
    if let Some(id) = endpoint_for(pod_endpoint, ids) {
        return Some(id);
    }
    let ip = pod_endpoint.parse::<SocketAddr>().ok()?.ip();
    ids.iter().find(|id| id.parse::<IpAddr>() == Ok(ip))
}

#[tonic::async_trait]
impl<I: Index + 'static> IndexerService for PodScorer<I> {
    async fn get_pod_scores(
        &self,
        request: tonic::Request<GetPodScoresRequest>,
    ) -> Result<tonic::Response<GetPodScoresResponse>, tonic::Status> {
        let req = request.into_inner();
        match self.pod_scores(&req).await {
            Ok(scores) => {
                metrics::counter!(crate::metrics::INDEXER_API_REQUESTS, "outcome" => "ok")
                    .increment(1);
                Ok(tonic::Response::new(GetPodScoresResponse { scores }))
            }
            Err(e) => {
                metrics::counter!(crate::metrics::INDEXER_API_REQUESTS, "outcome" => e.label())
                    .increment(1);
                tracing::debug!(model = %req.model_name, error = %e, "GetPodScores failed");
                Err(e.status())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_core::ids::BlockKey;
    use kvroute_core::ids::{ModelName, PodId, Tier};
    use kvroute_core::index::memory::MemoryIndex;
    use kvroute_core::index::{IndexOp, StoredBlock};
    use kvroute_core::keys::{ExtraKeys, HashScheme};
    use kvroute_tokens::TokenizerOptions;
    use prost::Message;

    #[test]
    fn wire_format_matches_indexer_proto() {
        let req = GetPodScoresRequest {
            prompt: "hi".into(),
            model_name: "m".into(),
            pod_identifiers: vec!["a".into(), "b".into()],
        };
        // Field 1 (len) "hi", field 2 (len) "m", field 3 (len) twice.
        let want = [
            0x0a, 2, b'h', b'i', 0x12, 1, b'm', 0x1a, 1, b'a', 0x1a, 1, b'b',
        ];
        assert_eq!(req.encode_to_vec(), want);
        let score = PodScore {
            pod: "p".into(),
            score: 1.5,
            data_parallel_rank: None,
        };
        let mut want = vec![0x0a, 1, b'p', 0x11];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        assert_eq!(score.encode_to_vec(), want);
        let resp = GetPodScoresResponse {
            scores: vec![score.clone()],
        };
        let decoded =
            GetPodScoresResponse::decode(resp.encode_to_vec().as_slice()).expect("decode");
        assert_eq!(decoded.scores, vec![score]);
        // A rank is field 3, varint.
        let ranked = PodScore {
            pod: String::new(),
            score: 0.0,
            data_parallel_rank: Some(2),
        };
        assert_eq!(ranked.encode_to_vec(), [0x18, 2]);
    }

    const A: &str = "127.0.0.11:8000";
    const B: &str = "127.0.0.12:8000";
    const C: &str = "127.0.0.13:8000";

    fn scorer() -> (
        PodScorer<MemoryIndex>,
        Arc<MemoryIndex>,
        Vec<BlockKey>,
        String,
    ) {
        let tiny = kvroute_testkit::test_env::testdata("tokens/tiny");
        let tokenizers = Arc::new(TokenizerRegistry::new(
            [("tiny".to_string(), tiny)],
            vec![],
            TokenizerOptions::default(),
        ));
        let keys = KeyScheme::new(HashScheme::Sha256Cbor, "vllm-none-hash", 4).expect("scheme");
        let prompt = "the quick brown fox jumps over the lazy dog ".repeat(4);
        let ids = tokenizers
            .get("tiny")
            .expect("tiny")
            .encode_completion(&prompt)
            .expect("ids");
        let block_keys = keys.block_keys(&ids, ExtraKeys::NONE);
        assert!(block_keys.len() >= 6, "{}", block_keys.len());
        let index = Arc::new(MemoryIndex::new(10_000));
        let s = PodScorer::new(index.clone(), keys, tokenizers, &RouteConfig::default());
        (s, index, block_keys, prompt)
    }

    fn store(index: &MemoryIndex, pod: PodId, tier: Tier, keys: &[BlockKey]) {
        index.apply_sync(&[IndexOp::Store {
            model: ModelName::new("tiny"),
            pod,
            tier,
            blocks: keys
                .iter()
                .map(|&key| StoredBlock { key, engine: None })
                .collect(),
        }]);
    }

    fn request(prompt: &str, pods: &[&str]) -> GetPodScoresRequest {
        GetPodScoresRequest {
            prompt: prompt.into(),
            model_name: "tiny".into(),
            pod_identifiers: pods.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn longest_prefix_weighted_by_tier_like_llm_d() {
        let (s, index, keys, prompt) = scorer();
        store(&index, PodId::new(A), Tier::gpu(), &keys);
        store(&index, PodId::new(B), Tier::cpu(), &keys);
        store(&index, PodId::new(C), Tier::gpu(), &keys[..2]);
        // Holds later blocks only: no block 0, no score.
        store(
            &index,
            PodId::new("127.0.0.14:8000"),
            Tier::gpu(),
            &keys[1..],
        );
        store(
            &index,
            PodId::with_rank(A, Some(1)),
            Tier::gpu(),
            &keys[..3],
        );
        let n = keys.len() as f64;
        let got = s.pod_scores(&request(&prompt, &[])).await.expect("scores");
        let want = vec![
            (A.to_string(), n, None),
            (B.to_string(), 0.8 * n, None),
            (A.to_string(), 3.0, Some(1)),
            (C.to_string(), 2.0, None),
        ];
        let got: Vec<_> = got
            .into_iter()
            .map(|p| {
                (
                    p.pod,
                    (p.score * 1000.0).round() / 1000.0,
                    p.data_parallel_rank,
                )
            })
            .collect();
        let want: Vec<_> = want
            .into_iter()
            .map(|(p, sc, r)| (p, (sc * 1000.0_f64).round() / 1000.0, r))
            .collect();
        assert_eq!(got, want);

        // Restricted to the pods asked for; a bare IP names its ip:port pod.
        let got = s
            .pod_scores(&request(&prompt, &[C, "127.0.0.12"]))
            .await
            .expect("scores");
        let pods: Vec<_> = got.iter().map(|p| p.pod.as_str()).collect();
        assert_eq!(pods, ["127.0.0.12", C]);
    }

    #[tokio::test]
    async fn errors_and_short_prompts() {
        let (s, _, _, _) = scorer();
        let mut req = request("hi", &[]);
        assert!(s.pod_scores(&req).await.expect("short").is_empty());
        req.model_name = String::new();
        let e = s.pod_scores(&req).await.expect_err("no model");
        assert_eq!(e.status().code(), tonic::Code::InvalidArgument);
        req.model_name = "unknown".into();
        let e = s.pod_scores(&req).await.expect_err("no tokenizer");
        assert_eq!(e.status().code(), tonic::Code::FailedPrecondition);
        assert_eq!(e.label(), "no_tokenizer");
        // A busy tokenization pool is the caller's retry, not a bad prompt.
        let busy = ScoresError::Tokenize(Fallback::TokenizeOverloaded);
        assert_eq!(busy.status().code(), tonic::Code::Unavailable);
        assert_eq!(busy.label(), "tokenize_overloaded");
        let bad = ScoresError::Tokenize(Fallback::TokenizeError);
        assert_eq!(bad.status().code(), tonic::Code::InvalidArgument);
    }
}
