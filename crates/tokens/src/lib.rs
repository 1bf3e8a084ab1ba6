//! Prompt -> token ids, exactly as vLLM computes them (the scorer's first
//! stage; the load-test simulator uses the same code so both agree).
//!
//! | file | role |
//! |---|---|
//! | `tokenizer.rs` | [`Tokenizer`]: `tokenizer.json` (+ `tokenizer_config.json`) loading, special-token policy, completion and chat encoding |
//! | `chat.rs` | [`ChatTemplate`]: the model's Jinja `chat_template` rendered natively with minijinja, messages normalised as vLLM does |
//! | `pyjson.rs` | template helpers that must behave like Python: `tojson` (`json.dumps`), `strftime_now`, `str.strip` |
//! | `prefix_cache.rs` | [`PrefixCache`]: exact tokenized-segment cache cut at special-token boundaries proven safe |
//! | `registry.rs` | [`TokenizerRegistry`]: model name -> `Arc<Tokenizer>`, from `--tokenizer MODEL=PATH` or a models / Hugging Face cache directory, loaded lazily once |
//!
//! What vLLM does, and therefore what this module reproduces:
//! - `/v1/completions`: `tokenizer(prompt, add_special_tokens=True)` — the
//!   `tokenizer.json` post-processor adds the special tokens (BOS for Llama 3);
//!   special-token strings inside the prompt are matched as special tokens.
//! - `/v1/chat/completions`: messages normalised (text parts joined with `\n`
//!   for string-content templates), the `chat_template` rendered the way
//!   transformers' `apply_chat_template` does (`trim_blocks`, `lstrip_blocks`,
//!   `raise_exception`, `tojson`, `bos_token`... in the context,
//!   `add_generation_prompt`), then tokenized with `add_special_tokens=False`
//!   because the template already wrote BOS.
//!
//! Pure Rust: `tokenizers` is built with `fancy-regex` instead of Oniguruma, so
//! nothing here compiles C. `crates/tokens/tests/tokens_parity.rs` compares rendered
//! text and ids with the Python `tokenizers` and `jinja2` packages.

mod chat;
mod prefix_cache;
mod pyjson;
mod registry;
mod tokenizer;

pub use chat::{ChatLimits, ChatOptions, ChatTemplate, ContentFormat};
pub use prefix_cache::{CacheStats, PrefixCache, SegmentationMode, TextCache, text_cache};
pub use registry::{TokenizerRegistry, parse_tokenizer_arg, resolve_model_dir};
pub use tokenizer::{Tokenizer, TokenizerOptions};

use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can go wrong between a prompt and its token ids.
///
/// The scorer treats every variant the same way (route by load, count the
/// reason), so variants exist to make logs and metrics precise, not for
/// control flow.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No `tokenizer.json` where one was expected.
    #[error("no tokenizer.json at {0}")]
    NotFound(PathBuf),
    /// `tokenizer.json` exists but the `tokenizers` crate rejected it.
    #[error("cannot load tokenizer {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    /// `tokenizer_config.json` is not what Hugging Face writes.
    #[error("bad tokenizer config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    /// The tokenizer failed on an input (rare: it accepts any UTF-8 text).
    #[error("tokenization failed: {0}")]
    Encode(#[source] tokenizers::Error),
    /// Chat requested but the model has no `chat_template`.
    #[error("model {0:?} has no chat template")]
    NoChatTemplate(String),
    /// The chat template failed to compile or to render; a template's own
    /// `raise_exception("...")` lands here with its message.
    #[error("chat template: {0:#}")]
    Template(#[from] minijinja::Error),
    /// A chat over a render bound ([`ChatLimits`]: messages, text, output).
    /// Running out of fuel (a looping template) is a [`Self::Template`]
    /// error of kind `OutOfFuel`; [`Self::is_limit`] tells both apart from
    /// other template errors.
    #[error("chat over a limit: {0}")]
    Limit(String),
    /// The messages are not a conversation vLLM would accept.
    #[error("invalid chat messages: {0}")]
    Messages(String),
    /// No tokenizer is configured or found for this model name.
    #[error("no tokenizer for model {0:?}")]
    UnknownModel(String),
    /// A `--tokenizer` argument is not `MODEL=PATH`.
    #[error("bad --tokenizer argument {0:?}: expected MODEL=PATH")]
    BadArg(String),
    /// An earlier attempt to load this model's tokenizer failed; the registry
    /// remembers the failure instead of re-reading the disk per request.
    #[error("tokenizer for model {model:?} failed to load: {source}")]
    ModelLoad {
        model: String,
        #[source]
        source: Arc<TokensError>,
    },
}

impl TokensError {
    /// Whether rendering stopped at a bound ([`ChatLimits`]) rather than
    /// failing on its own: the template (or the chat) is too costly.
    pub fn is_limit(&self) -> bool {
        match self {
            TokensError::Limit(_) => true,
            TokensError::Template(e) => e.kind() == minijinja::ErrorKind::OutOfFuel,
            _ => false,
        }
    }
}

#[cfg(test)]
mod testutil;
