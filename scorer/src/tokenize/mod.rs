//! The router's first stage: a request's prompt -> token ids -> block keys,
//! without holding up the async workers that serve every other stream.
//!
//! | file | role |
//! |---|---|
//! | `mod.rs` | [`Tokenize`]: picks the path for each request and maps failures to fallback reasons |
//! | `pool.rs` | [`BlockingPool`]: bounded blocking threads with a queue bound and a deadline |
//! | `loader.rs` | [`Loader`]: every tokenizer load on one long-lived thread (keeps the load's fragmented malloc arena away from the tokenizing threads) |
//! | `remote.rs` | [`RemoteTokenizer`]: vLLM `/tokenize` on a pod of the pool, cached |
//!
//! Paths, cheapest first (counted in `kvroute_scorer_tokenize_path_total`):
//! - `ids`: the body gave token ids; keys are computed inline (the key
//!   cache makes a repeated prefix ~65 µs at 2048 blocks, and an uncached
//!   one costs ~0.3 ms, a hundredth of tokenizing it).
//! - `cached`: the model's tokenizer is loaded and every piece of the prompt
//!   is in its prefix cache ([`kvroute_tokens::Tokenizer::encode_cached`]:
//!   a boundary scan and a lookup per piece, ~50 µs at 2048 blocks). No
//!   thread hop. Completions only: a chat template is code from the model
//!   directory, and a slow or looping one on an async worker would stall
//!   every stream that worker serves (`/healthz` included), so chats never
//!   render here.
//! - `pool`: anything else local (a cold prompt, every chat, a first load
//!   of the model's tokenizer, done by the [`Loader`] thread while the pool
//!   job waits) runs on the [`BlockingPool`], keys included; past its queue
//!   bound or deadline the request routes by load (`tokenize_overloaded`,
//!   `tokenize_timeout`). A render stops at its
//!   [`kvroute_tokens::ChatLimits`] (fuel, output size, messages, text),
//!   so an abandoned job also frees its thread (`template_limit`).
//! - `remote`: no local tokenizer for the model and `--remote-tokenize` on:
//!   a vLLM pod tokenizes ([`RemoteTokenizer`]); otherwise `no_tokenizer`.

pub mod loader;
pub mod pool;
pub mod remote;

pub use loader::Loader;
pub use pool::{BlockingPool, PoolConfig, PoolError};
pub use remote::{RemoteConfig, RemoteError, RemotePrompt, RemoteTokenizer};

use crate::decide::{Prompt, RouteRequest};
use crate::reason::Fallback;
use kvroute_core::ids::BlockKey;
use kvroute_core::keys::{ExtraKeys, KeyCache};
use kvroute_tokens::{ChatOptions, Tokenizer, TokenizerRegistry, TokensError};
use serde_json::Value as Json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Settings of the tokenization stage.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizeConfig {
    pub pool: PoolConfig,
    /// Ask a vLLM pod when no local tokenizer exists (`None`: off).
    pub remote: Option<RemoteConfig>,
}

/// How many requests took each path (tests and logs; metrics count too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathStats {
    pub ids: u64,
    pub cached: u64,
    pub pool: u64,
    pub remote: u64,
}

#[derive(Debug, Clone, Copy)]
enum Path {
    Ids,
    Cached,
    Pool,
    Remote,
}

/// See the module doc.
pub struct Tokenize {
    registry: Arc<TokenizerRegistry>,
    loader: Arc<Loader>,
    keys: Arc<KeyCache>,
    pool: BlockingPool,
    remote: Option<RemoteTokenizer>,
    counts: [AtomicU64; 4],
}

/// Prompt work for the pool.
enum Input {
    Text(String),
    Chat(Vec<Json>, ChatOptions),
    /// Never sent: token ids are keyed before any tokenizer is consulted.
    Ids(Vec<u32>),
}

/// Local work that did not finish.
enum JobError {
    /// No tokenizer for the model (unknown, or its files failed to load).
    NoLocal,
    Reason(Fallback),
}

impl Tokenize {
    pub fn new(registry: Arc<TokenizerRegistry>, keys: KeyCache, config: TokenizeConfig) -> Self {
        Tokenize {
            loader: Arc::new(Loader::new(registry.clone())),
            registry,
            keys: Arc::new(keys),
            pool: BlockingPool::new(config.pool),
            remote: config.remote.map(RemoteTokenizer::new),
            counts: Default::default(),
        }
    }

    /// Loads the explicitly configured tokenizers now (on the loader
    /// thread), so a first request does not pay for it.
    pub async fn preload(&self) -> Vec<(String, Result<Arc<Tokenizer>, TokensError>)> {
        self.loader.preload().await
    }

    /// The key cache (shared with the pool's threads).
    pub fn keys(&self) -> &KeyCache {
        &self.keys
    }

    pub fn pool(&self) -> &BlockingPool {
        &self.pool
    }

    pub fn stats(&self) -> PathStats {
        let c = |p: Path| self.counts[p as usize].load(Relaxed);
        PathStats {
            ids: c(Path::Ids),
            cached: c(Path::Cached),
            pool: c(Path::Pool),
            remote: c(Path::Remote),
        }
    }

    fn took(&self, path: Path) {
        self.counts[path as usize].fetch_add(1, Relaxed);
        let label = match path {
            Path::Ids => "ids",
            Path::Cached => "cached",
            Path::Pool => "pool",
            Path::Remote => "remote",
        };
        metrics::counter!(crate::metrics::TOKENIZE_PATHS, "path" => label).increment(1);
    }

    /// The block keys of `req`'s prompt for `base` (the model whose
    /// tokenizer and index apply) and `lora`, or the fallback reason.
    /// `endpoints` are the request's candidates (remote tokenization asks
    /// one of them).
    pub async fn block_keys(
        &self,
        req: &RouteRequest,
        base: &str,
        lora: Option<&str>,
        endpoints: &[String],
    ) -> Result<Vec<BlockKey>, Fallback> {
        let extra = ExtraKeys {
            lora,
            cache_salt: req.cache_salt.as_deref(),
        };
        match &req.prompt {
            Prompt::TokenIds(ids) => {
                self.took(Path::Ids);
                return Ok(self.keys.block_keys(ids, extra));
            }
            Prompt::Text(t) if t.is_empty() => return Err(Fallback::EmptyPrompt),
            Prompt::Text(_) | Prompt::Chat(_) => {}
        }
        let options = || ChatOptions {
            template_kwargs: match &req.chat_template_kwargs {
                Some(Json::Object(map)) => map.clone(),
                _ => serde_json::Map::new(),
            },
            ..ChatOptions::default()
        };
        let (tokenizer, input) = match self.registry.get_loaded(base) {
            Some(Ok(tok)) => match self.warm(&tok, &req.prompt, options)? {
                Ok(ids) => {
                    self.took(Path::Cached);
                    return Ok(self.keys.block_keys(&ids, extra));
                }
                Err(cold) => (Some(tok), cold),
            },
            Some(Err(_)) => return self.remote(req, extra, endpoints).await,
            None => (None, owned_input(&req.prompt, options)),
        };
        self.took(Path::Pool);
        let (loader, keys, model) = (self.loader.clone(), self.keys.clone(), base.to_string());
        let (lora, salt) = (lora.map(str::to_string), req.cache_salt.clone());
        let job = move || {
            let tok = match tokenizer {
                Some(t) => t,
                None => loader.get(&model).map_err(|_| JobError::NoLocal)?,
            };
            let ids = encode(&tok, input).map_err(JobError::Reason)?;
            let extra = ExtraKeys {
                lora: lora.as_deref(),
                cache_salt: salt.as_deref(),
            };
            Ok(keys.block_keys(&ids, extra))
        };
        match self.pool.run(job).await {
            Ok(Ok(keys)) => Ok(keys),
            Ok(Err(JobError::Reason(why))) => Err(why),
            Ok(Err(JobError::NoLocal)) => self.remote(req, extra, endpoints).await,
            Err(e) => {
                tracing::debug!(error = %e, model = base, "tokenization abandoned: routing by load");
                Err(e.reason())
            }
        }
    }

    /// Ids from the prefix cache when every piece is there (`Ok(Ok)`), else
    /// the work the pool must do (`Ok(Err)`). Chats always go to the pool
    /// (see the module doc: no template runs on an async worker).
    fn warm(
        &self,
        tok: &Tokenizer,
        prompt: &Prompt,
        options: impl FnOnce() -> ChatOptions,
    ) -> Result<Result<Vec<u32>, Input>, Fallback> {
        match prompt {
            Prompt::Text(text) => Ok(tok
                .encode_cached(text, true)
                .ok_or_else(|| Input::Text(text.clone()))),
            other => Ok(Err(owned_input(other, options))),
        }
    }

    /// Ids from a vLLM pod when remote tokenization is on.
    async fn remote(
        &self,
        req: &RouteRequest,
        extra: ExtraKeys<'_>,
        endpoints: &[String],
    ) -> Result<Vec<BlockKey>, Fallback> {
        let Some(remote) = &self.remote else {
            return Err(Fallback::NoTokenizer);
        };
        let prompt = match &req.prompt {
            Prompt::Text(text) => RemotePrompt::Completion(text),
            Prompt::Chat(messages) => RemotePrompt::Chat {
                messages,
                template_kwargs: req.chat_template_kwargs.as_ref(),
            },
            Prompt::TokenIds(ids) => return Ok(self.keys.block_keys(ids, extra)),
        };
        self.took(Path::Remote);
        // vLLM resolves the request's own model name (an adapter included).
        match remote.tokenize(&req.model, prompt, endpoints).await {
            Ok(ids) => Ok(self.keys.block_keys(&ids, extra)),
            Err(RemoteError::Timeout) => Err(Fallback::RemoteTokenizeTimeout),
            Err(e) => {
                tracing::debug!(error = %e, model = %req.model, "remote tokenization failed: routing by load");
                Err(Fallback::RemoteTokenizeFailed)
            }
        }
    }
}

fn owned_input(prompt: &Prompt, options: impl FnOnce() -> ChatOptions) -> Input {
    match prompt {
        Prompt::Text(t) => Input::Text(t.clone()),
        Prompt::Chat(m) => Input::Chat(m.clone(), options()),
        Prompt::TokenIds(ids) => Input::Ids(ids.clone()),
    }
}

/// Tokenizes pool work; the error is the fallback reason.
fn encode(tok: &Tokenizer, input: Input) -> Result<Vec<u32>, Fallback> {
    match input {
        Input::Text(t) => tok
            .encode_completion(&t)
            .map_err(|_| Fallback::TokenizeError),
        Input::Chat(m, o) => tok.encode_chat(&m, &o).map_err(|e| {
            if e.is_limit() {
                tracing::warn!(model = tok.name(), error = %e, "chat template stopped at its limit: routing by load");
                Fallback::TemplateLimit
            } else {
                tracing::debug!(model = tok.name(), error = %e, "chat template failed: routing by load");
                Fallback::TemplateError
            }
        }),
        Input::Ids(ids) => Ok(ids),
    }
}
