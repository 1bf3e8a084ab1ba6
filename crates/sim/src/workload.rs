//! Workloads: seeded request streams that drive both the simulator (`sim`
//! mode: virtual time, token ids) and the live load test (`live` mode: HTTP
//! requests through Envoy to simulated pods). Each request therefore
//! carries the body it would send and the token ids that body tokenizes to
//! with [`SimTokenizer`] (which the live scorer loads from the directory
//! [`SimTokenizer::write_dir`] writes).
//!
//! | kind | file | shape (defaults; `docs/workloads.md` has the rest) |
//! |---|---|---|
//! | `repeated` | `repeated.rs` | one 1,000-token chat prompt, 4,776 times |
//! | `tenants` | `tenants.rs` | 8 tenants' 2,000-token system prompts, Zipf popularity |
//! | `multi-turn` | `multi_turn.rs` | chat sessions re-sending their growing history |
//! | `rag` | `rag.rs` | questions after one of 200 shared documents |
//! | `llmd-precise` | `llmd.rs` | llm-d's 150 groups x 5 questions, 6,000 + 1,200 tokens, ramped rate |
//! | `unique` | `unique.rs` | prompts sharing no block |
//! | `trace:<path>` | `replay.rs` | a Mooncake-format trace (token ids, no text) |
//!
//! Determinism: a generator draws prompts from one seeded stream and
//! arrivals from another, so the same spec gives the same workload and a
//! different `rate` replays the same prompts at other times.

mod llmd;
mod multi_turn;
mod rag;
mod repeated;
mod replay;
mod tenants;
mod text;
pub mod tokenizer;
mod unique;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use kvroute_core::keys::KeyScheme;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::request::SimRequest;
pub use tokenizer::{SIM_MODEL, SimTokenizer};

/// One chat message (`/v1/chat/completions` `messages[i]`, text content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// What a request sends. Serializes (untagged) to the OpenAI field it
/// fills: `{"prompt": "..."}`, `{"messages": [...]}` or `{"prompt": [ids]}`
/// (vLLM's completions endpoint takes token ids as a prompt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Body {
    Completion { prompt: String },
    Chat { messages: Vec<Message> },
    TokenIds { prompt: Vec<u32> },
}

impl Body {
    /// The OpenAI-compatible endpoint this body is posted to.
    pub fn endpoint(&self) -> &'static str {
        match self {
            Body::Chat { .. } => "/v1/chat/completions",
            Body::Completion { .. } | Body::TokenIds { .. } => "/v1/completions",
        }
    }
}

/// One request of a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadRequest {
    /// Seconds from the run's start; requests are sorted by it.
    pub arrival: f64,
    pub body: Body,
    /// The prompt's ids as vLLM computes them for `body` with the
    /// simulator's tokenizer (the trace's ids for a trace).
    pub tokens: Vec<u32>,
    /// Tokens to generate (at least 1).
    pub output_len: u32,
    /// Tenant, session, document or group id (see each generator).
    pub session: Option<u64>,
}

impl WorkloadRequest {
    /// The JSON body for `model`: the prompt or messages, `max_tokens` =
    /// `output_len` and vLLM's `ignore_eos` so a pod generates exactly that
    /// many tokens (what the simulated engine assumes).
    pub fn openai_body(&self, model: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.body).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("model".into(), model.into());
            o.insert("max_tokens".into(), self.output_len.into());
            o.insert("ignore_eos".into(), true.into());
        }
        v
    }
}

/// A generated workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// The kind's spec name (`tenants`, `trace:<path>`, ...).
    pub name: String,
    /// In arrival order.
    pub requests: Vec<WorkloadRequest>,
    /// The model name requests carry (the scorer's `--tokenizer` key).
    pub model: String,
}

impl Workload {
    /// The simulator's requests: ids `0..` in arrival order, block hashes
    /// computed with the engines' `scheme`.
    pub fn into_sim(self, scheme: &KeyScheme) -> Vec<SimRequest> {
        self.requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                SimRequest::new(
                    i as u64,
                    r.arrival,
                    r.tokens,
                    r.output_len,
                    r.session,
                    scheme,
                )
            })
            .collect()
    }

    /// Prompt tokens over all requests.
    pub fn prompt_tokens(&self) -> usize {
        self.requests.iter().map(|r| r.tokens.len()).sum()
    }
}

/// Which workload (issue 14, section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadKind {
    Repeated,
    Tenants,
    MultiTurn,
    Rag,
    LlmdPrecise,
    Unique,
    Trace(PathBuf),
}

const KIND_NAMES: &str = "repeated, tenants, multi-turn, rag, llmd-precise, unique, trace:<path>";

impl FromStr for WorkloadKind {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "repeated" => WorkloadKind::Repeated,
            "tenants" => WorkloadKind::Tenants,
            "multi-turn" => WorkloadKind::MultiTurn,
            "rag" => WorkloadKind::Rag,
            "llmd-precise" => WorkloadKind::LlmdPrecise,
            "unique" => WorkloadKind::Unique,
            _ => match s.strip_prefix("trace:") {
                Some(p) if !p.is_empty() => WorkloadKind::Trace(PathBuf::from(p)),
                _ => return Err(WorkloadError::Kind(s.to_string())),
            },
        })
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadKind::Repeated => f.write_str("repeated"),
            WorkloadKind::Tenants => f.write_str("tenants"),
            WorkloadKind::MultiTurn => f.write_str("multi-turn"),
            WorkloadKind::Rag => f.write_str("rag"),
            WorkloadKind::LlmdPrecise => f.write_str("llmd-precise"),
            WorkloadKind::Unique => f.write_str("unique"),
            WorkloadKind::Trace(p) => write!(f, "trace:{}", p.display()),
        }
    }
}

impl WorkloadKind {
    /// Mean arrival rate (requests/s) when the user gives none: 10/s for
    /// the synthetic workloads, llm-d's 15/s warm-up rate for
    /// `llmd-precise` (its ramp scales with it); a trace keeps its own
    /// timestamps and ignores the rate.
    pub fn default_rate(&self) -> f64 {
        match self {
            WorkloadKind::LlmdPrecise => llmd::BASE_RATE,
            _ => 10.0,
        }
    }

    /// Requests when the spec's `requests` is `None` (`None`: the whole
    /// trace).
    pub fn default_requests(&self) -> Option<usize> {
        Some(match self {
            WorkloadKind::Repeated => repeated::REQUESTS,
            WorkloadKind::Tenants => tenants::REQUESTS,
            WorkloadKind::MultiTurn => multi_turn::REQUESTS,
            WorkloadKind::Rag => rag::REQUESTS,
            WorkloadKind::LlmdPrecise => llmd::REQUESTS,
            WorkloadKind::Unique => unique::REQUESTS,
            WorkloadKind::Trace(_) => return None,
        })
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    pub kind: WorkloadKind,
    /// Seeds every random choice (texts, lengths, popularity, arrivals).
    pub seed: u64,
    /// Number of requests (`None`: the kind's default, or the whole trace);
    /// a trace keeps its first `requests` lines.
    pub requests: Option<usize>,
    /// Mean arrival rate, requests/s (the ramp's base for `llmd-precise`;
    /// unused by traces).
    pub rate: f64,
    /// Trace timestamps are multiplied by it (0.5 replays twice as fast).
    pub time_scale: f64,
    /// The model name requests carry.
    pub model: String,
}

impl WorkloadSpec {
    /// `kind` with seed 0, its default size and rate, time scale 1 and the
    /// simulator's model name.
    pub fn new(kind: WorkloadKind) -> WorkloadSpec {
        WorkloadSpec {
            rate: kind.default_rate(),
            kind,
            seed: 0,
            requests: None,
            time_scale: 1.0,
            model: SIM_MODEL.to_string(),
        }
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        let rate_ok = self.rate.is_finite() && self.rate > 0.0;
        if !rate_ok && !matches!(self.kind, WorkloadKind::Trace(_)) {
            return Err(WorkloadError::Rate(self.rate));
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(WorkloadError::TimeScale(self.time_scale));
        }
        if self.requests == Some(0) {
            return Err(WorkloadError::Requests(0));
        }
        Ok(())
    }

    /// Requests to generate for a synthetic kind.
    fn size(&self, default: usize) -> usize {
        self.requests.unwrap_or(default)
    }

    /// The stream texts and lengths are drawn from.
    fn content_rng(&self) -> StdRng {
        StdRng::seed_from_u64(mix(self.seed, 1))
    }

    /// The stream arrivals are drawn from (separate, so the rate does not
    /// change the prompts).
    fn arrival_rng(&self) -> StdRng {
        StdRng::seed_from_u64(mix(self.seed, 2))
    }
}

/// What can go wrong making a workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("unknown workload {0:?}: expected one of {KIND_NAMES}")]
    Kind(String),
    #[error("arrival rate {0} is not a positive number of requests/s")]
    Rate(f64),
    #[error("time scale {0} is not a positive number")]
    TimeScale(f64),
    #[error("request count {0} is not positive")]
    Requests(usize),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trace {path}: {source}")]
    Trace {
        path: PathBuf,
        #[source]
        source: crate::trace::TraceError,
    },
    #[error("tokenizing a prompt: {0}")]
    Tokenize(#[source] kvroute_tokens::TokensError),
}

/// Generates `spec`'s workload (text workloads tokenized with `tok`).
pub fn generate(spec: &WorkloadSpec, tok: &SimTokenizer) -> Result<Workload, WorkloadError> {
    spec.validate()?;
    let requests = match &spec.kind {
        WorkloadKind::Repeated => repeated::generate(spec, tok)?,
        WorkloadKind::Tenants => tenants::generate(spec, tok)?,
        WorkloadKind::MultiTurn => multi_turn::generate(spec, tok)?,
        WorkloadKind::Rag => rag::generate(spec, tok)?,
        WorkloadKind::LlmdPrecise => llmd::generate(spec, tok)?,
        WorkloadKind::Unique => unique::generate(spec, tok)?,
        WorkloadKind::Trace(path) => replay::generate(spec, path)?,
    };
    Ok(Workload {
        name: spec.kind.to_string(),
        requests,
        model: spec.model.clone(),
    })
}

/// splitmix64 of `seed` and a stream number: independent seeds per stream.
fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A Poisson process's next gap at `rate`/s: exponential, mean 1/rate.
fn exp_gap(rng: &mut impl Rng, rate: f64) -> f64 {
    // 1 - U is in (0, 1], so the log is finite.
    -(1.0 - rng.random::<f64>()).ln() / rate
}

/// `n` Poisson arrivals at `rate`/s from time 0.
fn poisson_arrivals(rng: &mut impl Rng, n: usize, rate: f64) -> Vec<f64> {
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            t += exp_gap(rng, rate);
            t
        })
        .collect()
}

/// Zipf popularity over `n` items (item k drawn with weight 1/(k+1)^s):
/// a few tenants or documents take most requests, as in real traffic.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (0..n.max(1))
            .map(|k| {
                acc += 1.0 / ((k + 1) as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u = rng.random::<f64>();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

#[cfg(test)]
mod tests;
