//! Token ids from a vLLM pod of the pool (`POST /tokenize`) for models the
//! scorer has no local tokenizer for: exact parity with the engine at the
//! cost of a round trip, so results are cached.
//!
//! vLLM's request bodies (`vllm/entrypoints/serve/tokenize/protocol.py`,
//! `TokenizeCompletionRequest` / `TokenizeChatRequest`):
//! - completion: `{"model", "prompt", "add_special_tokens": true}`, what
//!   `/v1/completions` tokenizes;
//! - chat: `{"model", "messages", "add_generation_prompt": true,
//!   "add_special_tokens": false, "chat_template_kwargs"?}`, what
//!   `/v1/chat/completions` renders and tokenizes by default;
//!
//! and the answer is `{"count", "max_model_len", "tokens": [ids],
//! "token_strs"?}`. A prompt longer than the pod's `max_model_len` gets a
//! 400, as the real request would.
//!
//! Cache: exact request bodies (which name the model) -> ids, in a moka
//! cache bounded in bytes. Only exact repeats hit: without the tokenizer
//! nothing proves where a text may be cut, so no prefix segments are shared.
//!
//! Which pod: candidates in rotating order (spreading the extra work), the
//! next one after a failure while time is left. The request runs in its own
//! task, bounded by `fetch_limit`: a decision waits at most `timeout` and
//! then routes by load, but a late answer is still cached for the next
//! identical prompt. Concurrent identical misses share one request: a
//! burst of a new long prompt (a new system prompt going live) asks a pod
//! once, not once per request; the others wait for that answer (counted in
//! `kvroute_scorer_remote_tokenize_joined_total`).

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kvroute_tokens::{TextCache, text_cache};
use parking_lot::Mutex;
use serde_json::{Value as Json, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::metrics as m;

/// A `/tokenize` answer is ~7 bytes per token; 8 MiB is ~1M tokens.
const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// Settings of [`RemoteTokenizer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// How long a decision waits for the pods' answer.
    pub timeout: Duration,
    /// How long a request may run in the background to fill the cache.
    pub fetch_limit: Duration,
    /// Pods tried per decision (the next after a failure).
    pub attempts: usize,
    /// Cache bound in weighted bytes (request body + 4 per id).
    pub cache_bytes: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            // vLLM tokenizes ~1 MB/s of text in Python: 2048 blocks (~150 KB)
            // take tens of ms on the pod, plus its event loop's queueing.
            timeout: Duration::from_millis(100),
            fetch_limit: Duration::from_secs(2),
            attempts: 2,
            cache_bytes: 64 << 20,
        }
    }
}

/// What to tokenize, as vLLM's `/tokenize` takes it.
#[derive(Debug, Clone, Copy)]
pub enum RemotePrompt<'a> {
    Completion(&'a str),
    Chat {
        messages: &'a [Json],
        template_kwargs: Option<&'a Json>,
    },
}

/// Why no ids came back (each is a metric label).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("no candidate pod to ask")]
    NoEndpoint,
    #[error("no answer within the timeout")]
    Timeout,
    #[error("{0}")]
    Connect(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("bad /tokenize response: {0}")]
    BadResponse(String),
}

impl RemoteError {
    pub fn label(&self) -> &'static str {
        match self {
            RemoteError::NoEndpoint => "no_endpoint",
            RemoteError::Timeout => "timeout",
            RemoteError::Connect(_) => "connect_error",
            RemoteError::Status(_) => "http_error",
            RemoteError::BadResponse(_) => "bad_response",
        }
    }
}

/// See the module doc.
pub struct RemoteTokenizer {
    client: Client<HttpConnector, Full<Bytes>>,
    cache: TextCache,
    /// Requests running now, by body: identical misses wait for these.
    flights: Flights,
    config: RemoteConfig,
    /// Rotation over the candidates, so the extra work spreads over pods.
    next: AtomicUsize,
}

impl std::fmt::Debug for RemoteTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTokenizer")
            .field("config", &self.config)
            .field("cached", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl RemoteTokenizer {
    pub fn new(config: RemoteConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        RemoteTokenizer {
            client,
            cache: text_cache(config.cache_bytes),
            flights: Flights::default(),
            config,
            next: AtomicUsize::new(0),
        }
    }

    /// The `/tokenize` body for `prompt` (also the cache key).
    pub fn body(model: &str, prompt: RemotePrompt<'_>) -> String {
        match prompt {
            RemotePrompt::Completion(text) => {
                json!({"model": model, "prompt": text, "add_special_tokens": true})
            }
            RemotePrompt::Chat {
                messages,
                template_kwargs,
            } => {
                let mut body = json!({
                    "model": model,
                    "messages": messages,
                    "add_generation_prompt": true,
                    "add_special_tokens": false,
                });
                if let Some(kwargs @ Json::Object(_)) = template_kwargs {
                    body["chat_template_kwargs"] = kwargs.clone();
                }
                body
            }
        }
        .to_string()
    }

    /// The ids vLLM computes for `prompt`, asking one of `endpoints`
    /// (`ip:port`) unless cached.
    pub async fn tokenize(
        &self,
        model: &str,
        prompt: RemotePrompt<'_>,
        endpoints: &[String],
    ) -> Result<Arc<[u32]>, RemoteError> {
        let body: Arc<str> = Self::body(model, prompt).into();
        if let Some(ids) = self.cache.get(&body) {
            metrics::counter!(m::REMOTE_TOKENIZE, "outcome" => "cache_hit").increment(1);
            return Ok(ids);
        }
        let result = self.fetch(body, endpoints).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        metrics::counter!(m::REMOTE_TOKENIZE, "outcome" => outcome).increment(1);
        result
    }

    async fn fetch(&self, body: Arc<str>, endpoints: &[String]) -> Result<Arc<[u32]>, RemoteError> {
        if endpoints.is_empty() {
            return Err(RemoteError::NoEndpoint);
        }
        let started = Instant::now();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = RemoteError::Timeout;
        for i in 0..self.config.attempts.clamp(1, endpoints.len()) {
            let left = self.config.timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(RemoteError::Timeout);
            }
            let endpoint = &endpoints[(first + i) % endpoints.len()];
            let mut flight = self.flights.join_or_start(&body, || {
                // Its own task: it outlives this decision to fill the cache.
                fetch_one(
                    self.client.clone(),
                    self.cache.clone(),
                    endpoint.clone(),
                    body.clone(),
                    self.config.fetch_limit,
                )
            });
            match tokio::time::timeout(left, flight.wait_for(Option::is_some)).await {
                Err(_) => return Err(RemoteError::Timeout),
                Ok(Err(_)) => last = RemoteError::Connect("the request task ended".into()),
                Ok(Ok(answer)) => match answer.clone() {
                    Some(Ok(ids)) => return Ok(ids),
                    Some(Err(e)) => {
                        tracing::debug!(%endpoint, error = %e, "vLLM /tokenize failed");
                        last = e;
                    }
                    None => {}
                },
            }
        }
        Err(last)
    }
}

type Answer = Option<Result<Arc<[u32]>, RemoteError>>;

type Running = HashMap<Arc<str>, watch::Receiver<Answer>, foldhash::fast::RandomState>;

/// The `/tokenize` requests in flight, by body.
#[derive(Default, Clone)]
struct Flights(Arc<Mutex<Running>>);

impl Flights {
    /// A receiver of the answer for `body`: the running request's if there
    /// is one, else a new request started from `fetch` in its own task,
    /// which is forgotten when it ends (however it ends).
    fn join_or_start<F>(
        &self,
        body: &Arc<str>,
        fetch: impl FnOnce() -> F,
    ) -> watch::Receiver<Answer>
    where
        F: Future<Output = Result<Arc<[u32]>, RemoteError>> + Send + 'static,
    {
        let mut map = self.0.lock();
        if let Some(running) = map.get(body) {
            metrics::counter!(m::REMOTE_TOKENIZE_JOINED).increment(1);
            return running.clone();
        }
        let (tx, rx) = watch::channel(None);
        map.insert(body.clone(), rx.clone());
        drop(map);
        let landing = Landing {
            flights: self.clone(),
            body: body.clone(),
        };
        let request = fetch();
        tokio::spawn(async move {
            let answer = request.await;
            drop(landing);
            let _ = tx.send(Some(answer));
        });
        rx
    }
}

/// Removes a request from [`Flights`] when its task ends, panics included.
struct Landing {
    flights: Flights,
    body: Arc<str>,
}

impl Drop for Landing {
    fn drop(&mut self) {
        self.flights.0.lock().remove(&self.body);
    }
}

/// One `/tokenize` request to `endpoint`; caches the ids it gets.
async fn fetch_one(
    client: Client<HttpConnector, Full<Bytes>>,
    cache: TextCache,
    endpoint: String,
    body: Arc<str>,
    limit: Duration,
) -> Result<Arc<[u32]>, RemoteError> {
    let started = Instant::now();
    let request = hyper::Request::post(format!("http://{endpoint}/tokenize"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .map_err(|e| RemoteError::Connect(e.to_string()))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| RemoteError::Connect(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(RemoteError::Status(status.as_u16()));
        }
        Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| RemoteError::BadResponse(e.to_string()))
    };
    let bytes = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| RemoteError::Timeout)??;
    let ids: Arc<[u32]> = parse_response(&bytes)?.into();
    metrics::histogram!(m::REMOTE_TOKENIZE_SECONDS).record(started.elapsed().as_secs_f64());
    cache.insert(body, ids.clone());
    Ok(ids)
}

/// `{"count", "max_model_len", "tokens"}`: the ids, checked against `count`.
fn parse_response(bytes: &[u8]) -> Result<Vec<u32>, RemoteError> {
    #[derive(serde::Deserialize)]
    struct TokenizeResponse {
        tokens: Vec<u32>,
        count: Option<usize>,
    }
    let r: TokenizeResponse =
        serde_json::from_slice(bytes).map_err(|e| RemoteError::BadResponse(e.to_string()))?;
    match r.count {
        Some(n) if n != r.tokens.len() => Err(RemoteError::BadResponse(format!(
            "count {n} but {} tokens",
            r.tokens.len()
        ))),
        _ => Ok(r.tokens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_vllm_tokenize_requests() {
        let body = RemoteTokenizer::body("m", RemotePrompt::Completion("hi"));
        let v: Json = serde_json::from_str(&body).expect("json");
        assert_eq!(
            v,
            json!({"model": "m", "prompt": "hi", "add_special_tokens": true})
        );
        let messages = [json!({"role": "user", "content": "hi"})];
        let kwargs = json!({"enable_thinking": false});
        let body = RemoteTokenizer::body(
            "m",
            RemotePrompt::Chat {
                messages: &messages,
                template_kwargs: Some(&kwargs),
            },
        );
        let v: Json = serde_json::from_str(&body).expect("json");
        assert_eq!(
            v,
            json!({"model": "m", "messages": messages, "add_generation_prompt": true,
                   "add_special_tokens": false, "chat_template_kwargs": kwargs})
        );
    }

    #[test]
    fn responses_are_checked() {
        assert_eq!(
            parse_response(br#"{"count": 2, "max_model_len": 8192, "tokens": [1, 2]}"#),
            Ok(vec![1, 2])
        );
        assert!(parse_response(br#"{"count": 3, "tokens": [1, 2]}"#).is_err());
        assert!(parse_response(br#"{"tokens": [-1]}"#).is_err());
        assert!(parse_response(b"<html>").is_err());
    }

    /// A `/tokenize` endpoint that answers slowly and counts what it is
    /// asked (vLLM's answer shape; a real HTTP server on loopback).
    async fn slow_pod(delay: Duration) -> (String, Arc<AtomicUsize>) {
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let app = axum::Router::new().route(
            "/tokenize",
            axum::routing::post(move |body: String| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let n = body.len() as u32;
                    axum::Json(json!({"count": 3, "max_model_len": 8192, "tokens": [1, 2, n]}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, asked)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_misses_share_one_request() {
        let (pod, asked) = slow_pod(Duration::from_millis(150)).await;
        let remote = Arc::new(RemoteTokenizer::new(RemoteConfig {
            timeout: Duration::from_secs(2),
            ..RemoteConfig::default()
        }));
        let text = "a new system prompt going live";
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let (remote, pods) = (remote.clone(), vec![pod.clone()]);
                tokio::spawn(async move {
                    remote
                        .tokenize("m", RemotePrompt::Completion(text), &pods)
                        .await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.expect("task").expect("ids"));
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1, "one request for 8 misses");
        assert!(answers.iter().all(|ids| ids == &answers[0]));
        assert_eq!(answers[0][..2], [1, 2]);
        assert!(remote.flights.0.lock().is_empty(), "the flight landed");
        // A different text is its own request; the same text is now cached.
        remote
            .tokenize(
                "m",
                RemotePrompt::Completion("another"),
                std::slice::from_ref(&pod),
            )
            .await
            .expect("ids");
        remote
            .tokenize("m", RemotePrompt::Completion(text), &[pod])
            .await
            .expect("ids");
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_waiter_that_times_out_leaves_the_request_running_for_the_cache() {
        let (pod, asked) = slow_pod(Duration::from_millis(300)).await;
        let remote = RemoteTokenizer::new(RemoteConfig {
            timeout: Duration::from_millis(50),
            ..RemoteConfig::default()
        });
        let prompt = RemotePrompt::Completion("slow");
        let pods = [pod];
        assert_eq!(
            remote.tokenize("m", prompt, &pods).await,
            Err(RemoteError::Timeout)
        );
        // A second miss while it runs joins it (and times out too).
        assert_eq!(
            remote.tokenize("m", prompt, &pods).await,
            Err(RemoteError::Timeout)
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(remote.tokenize("m", prompt, &pods).await.is_ok());
        assert_eq!(asked.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn no_pod_or_a_closed_port_is_an_error_not_a_hang() {
        let remote = RemoteTokenizer::new(RemoteConfig::default());
        let prompt = RemotePrompt::Completion("hello");
        assert_eq!(
            remote.tokenize("m", prompt, &[]).await,
            Err(RemoteError::NoEndpoint)
        );
        // A port nothing listens on: bind one, then close it.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let started = Instant::now();
        let e = remote
            .tokenize("m", prompt, &[addr])
            .await
            .expect_err("nothing listens");
        assert_eq!(e.label(), "connect_error");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
