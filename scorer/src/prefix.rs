//! The one path from a request to its prompt's prefix scores:
//!
//! model (a LoRA adapter resolves to its base model) -> tokens -> block keys
//! ([`crate::tokenize`]) -> index lookup within `--lookup-timeout` ->
//! tier-weighted scores per index pod.
//!
//! The router ([`crate::route`]), llm-d's indexer API
//! ([`crate::indexer_api`]) and `kvroute-scorer why` ([`crate::why`]) all go
//! through [`PrefixLookup::lookup`], so each answers from exactly the keys,
//! lookup and scores a routing decision uses; what they do with the answer
//! (blend with load, fold into llm-d's pod scores, print) is theirs.

use crate::decide::RouteRequest;
use crate::reason::Fallback;
use crate::route::RouteConfig;
use crate::tokenize::Tokenize;
use kvroute_core::ids::{BlockKey, ModelName};
use kvroute_core::index::{Index, IndexError, PodPrefix};
use kvroute_core::scoring::{PrefixScore, TierWeights, score_prefixes};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a prompt's prefix is unknown.
#[derive(Debug, thiserror::Error)]
pub enum PrefixError {
    /// The tokenization stage's fallback (no tokenizer, busy pool, ...).
    #[error("tokenizing the prompt: {0}")]
    Tokenize(Fallback),
    #[error("index lookup: {0}")]
    Index(#[from] IndexError),
    #[error("index lookup exceeded {0:?}")]
    Timeout(Duration),
}

impl PrefixError {
    /// The router's fallback reason for this failure.
    pub fn fallback(&self) -> Fallback {
        match self {
            PrefixError::Tokenize(f) => *f,
            PrefixError::Index(_) => Fallback::IndexUnavailable,
            PrefixError::Timeout(_) => Fallback::IndexTimeout,
        }
    }
}

/// One index pod's cached prefix of the prompt and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPod {
    /// Depths per tier, as the index answered.
    pub prefix: PodPrefix,
    pub score: PrefixScore,
}

/// How long each stage took (the router records them; other callers do not,
/// so the routing histograms describe routing alone).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timings {
    /// Prompt -> block keys, tokenization failures included.
    pub tokenize: Duration,
    /// The index lookup, when tokenization succeeded (timeouts included).
    pub lookup: Option<Duration>,
}

/// What the index holds of one request's prompt.
#[derive(Debug)]
pub struct PromptPrefix {
    /// The model whose tokenizer and index apply.
    pub base: String,
    /// The LoRA adapter the request named, if any (an extra key of its blocks).
    pub lora: Option<String>,
    /// Keys of the prompt's full blocks (empty when tokenization failed).
    pub keys: Vec<BlockKey>,
    /// How many of `keys` (the first ones) were looked up: all of them up
    /// to `--max-lookup-blocks`. Scores are normalised by this count.
    pub looked: usize,
    /// Every index pod holding the prompt's first block, in the index's
    /// order (by pod id), or why they are unknown.
    pub pods: Result<Vec<ScoredPod>, PrefixError>,
    pub timings: Timings,
}

/// See the module doc.
pub struct PrefixLookup<I> {
    index: Arc<I>,
    /// Prompt -> block keys, off the async workers when it is costly; one
    /// stage (pool, caches) shared by every caller of the process.
    tokenize: Arc<Tokenize>,
    tiers: TierWeights,
    /// LoRA adapter name -> base model.
    adapters: HashMap<String, String>,
    lookup_timeout: Duration,
    /// Keys looked up at most per request (`--max-lookup-blocks`).
    max_lookup_blocks: usize,
}

impl<I: Index + 'static> PrefixLookup<I> {
    pub fn new(index: Arc<I>, tokenize: Arc<Tokenize>, config: &RouteConfig) -> Self {
        PrefixLookup {
            index,
            tokenize,
            tiers: config.tiers.clone(),
            adapters: config.adapters.clone(),
            lookup_timeout: config.lookup_timeout,
            max_lookup_blocks: config.max_lookup_blocks.max(1),
        }
    }

    /// The tokenization stage (path counters, pool).
    pub fn tokenize(&self) -> &Arc<Tokenize> {
        &self.tokenize
    }

    /// The base model and LoRA adapter a request's `model` names.
    pub fn resolve_model<'a>(&'a self, model: &'a str) -> (&'a str, Option<&'a str>) {
        match self.adapters.get(model) {
            Some(base) => (base.as_str(), Some(model)),
            None => (model, None),
        }
    }

    /// The prefix of `req`'s prompt each index pod holds. `endpoints` are
    /// the request's candidates (remote tokenization asks one of them).
    /// A prompt of no full block is still looked up (with no keys), so a
    /// missing index shows the same way for every prompt.
    pub async fn lookup(&self, req: &RouteRequest, endpoints: &[String]) -> PromptPrefix {
        let (base, lora) = self.resolve_model(&req.model);
        let started = Instant::now();
        let keys = self.tokenize.block_keys(req, base, lora, endpoints).await;
        let mut timings = Timings {
            tokenize: started.elapsed(),
            lookup: None,
        };
        let (keys, pods) = match keys {
            Err(why) => (Vec::new(), Err(PrefixError::Tokenize(why))),
            Ok(keys) => {
                let started = Instant::now();
                // A prefix deeper than the cap scores as a full match of
                // the capped part: one request cannot hold Redis for long.
                let looked = &keys[..keys.len().min(self.max_lookup_blocks)];
                if looked.len() < keys.len() {
                    metrics::counter!(crate::metrics::LOOKUPS_CAPPED).increment(1);
                }
                let found = tokio::time::timeout(
                    self.lookup_timeout,
                    self.index.lookup(&ModelName::new(base), looked, None),
                )
                .await;
                timings.lookup = Some(started.elapsed());
                let pods = match found {
                    Err(_) => Err(PrefixError::Timeout(self.lookup_timeout)),
                    Ok(Err(e)) => Err(PrefixError::Index(e)),
                    Ok(Ok(found)) => {
                        let scores = score_prefixes(&found.pods, looked.len(), &self.tiers);
                        Ok(found
                            .pods
                            .into_iter()
                            .zip(scores)
                            .map(|(prefix, score)| ScoredPod { prefix, score })
                            .collect())
                    }
                };
                (keys, pods)
            }
        };
        PromptPrefix {
            base: base.to_string(),
            lora: lora.map(str::to_string),
            looked: keys.len().min(self.max_lookup_blocks),
            keys,
            pods,
            timings,
        }
    }

    /// The tier weights scores are computed with.
    pub fn tiers(&self) -> &TierWeights {
        &self.tiers
    }
}
