//! One model's tokenizer: `tokenizer.json` through the `tokenizers` crate,
//! `tokenizer_config.json` for the chat template and special-token policy,
//! and the tokenized-prefix cache in front of both encode paths.
//!
//! Special tokens follow what vLLM's tokenizer (transformers) does:
//! - the `tokenizer.json` post-processor decides what `add_special_tokens=True`
//!   adds (Llama 3's adds `<|begin_of_text|>`);
//! - when `tokenizer_config.json` sets `add_bos_token` or `add_eos_token`
//!   explicitly, transformers (v5 `TokenizersBackend.update_post_processor`;
//!   v4 for the Llama-family fast tokenizers) replaces that post-processor
//!   with `[bos] $A [eos]` per those flags, and so do we;
//! - truncation and padding stored in `tokenizer.json` are dropped, as
//!   transformers does for a call without `truncation`/`padding`;
//! - `split_special_tokens: true` makes special-token strings plain text.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{Encoding, PostProcessor, Token};

use super::TokensError;
use super::chat::{ChatOptions, ChatTemplate};
use super::prefix_cache::PrefixCache;

/// Names of the special-token entries transformers puts in a template's
/// context (`special_tokens_map`).
const SPECIAL_TOKEN_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Loading options.
#[derive(Debug, Clone)]
pub struct TokenizerOptions {
    /// Bound of the tokenized-prefix cache, in weighted bytes (text + ids).
    /// 64 MiB holds e.g. ~4k distinct 4 KiB system prompts with their ids.
    pub cache_bytes: u64,
    /// Bounds on rendering the model's chat template.
    pub chat_limits: crate::ChatLimits,
}

impl Default for TokenizerOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 64 << 20,
            chat_limits: crate::ChatLimits::default(),
        }
    }
}

/// A model's tokenizer as vLLM uses it. `Send + Sync`; share it in an `Arc`.
pub struct Tokenizer {
    name: String,
    source: PathBuf,
    inner: tokenizers::Tokenizer,
    /// What the post-processor puts before and after a single sequence
    /// (empty when it adds nothing), when probing proved it independent of
    /// the content (true of every built-in processor): the cached path then
    /// copies these instead of rebuilding an `Encoding` for the whole prompt.
    affixes: Option<(Vec<u32>, Vec<u32>)>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat: Option<ChatTemplate>,
    cache: PrefixCache,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("affixes", &self.affixes)
            .field("chat", &self.chat.is_some())
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// What `tokenizer_config.json` (and `chat_template.jinja`) contribute.
#[derive(Debug, Default)]
struct Config {
    chat_template: Option<String>,
    special_tokens: Vec<(String, Json)>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    split_special_tokens: bool,
}

impl Tokenizer {
    /// Loads from a `tokenizer.json` file or a directory holding one. A
    /// `tokenizer_config.json` (and `chat_template.jinja`, which wins over the
    /// config's `chat_template` as in transformers) beside it is read too.
    pub fn from_path(
        name: impl Into<String>,
        path: &Path,
        opts: &TokenizerOptions,
    ) -> Result<Self, TokensError> {
        let (json, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_path_buf())
        } else {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (path.to_path_buf(), dir)
        };
        if !json.is_file() {
            return Err(TokensError::NotFound(json));
        }
        let config = Some(dir.join("tokenizer_config.json")).filter(|p| p.is_file());
        let jinja = Some(dir.join("chat_template.jinja")).filter(|p| p.is_file());
        Self::from_files(name, &json, config.as_deref(), jinja.as_deref(), opts)
    }

    /// Loads from explicit files.
    pub fn from_files(
        name: impl Into<String>,
        tokenizer_json: &Path,
        config: Option<&Path>,
        chat_template_file: Option<&Path>,
        opts: &TokenizerOptions,
    ) -> Result<Self, TokensError> {
        let name = name.into();
        let mut inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|source| {
            TokensError::Load {
                path: tokenizer_json.to_path_buf(),
                source,
            }
        })?;
        let mut cfg = match config {
            Some(p) => parse_config(p, &read(p)?)?,
            None => Config::default(),
        };
        if let Some(p) = chat_template_file {
            cfg.chat_template = Some(read(p)?);
        }
        let cfg_path = config.unwrap_or(tokenizer_json);

        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|source| TokensError::Load {
                path: tokenizer_json.to_path_buf(),
                source,
            })?;
        if cfg.split_special_tokens {
            inner.set_encode_special_tokens(true);
        }
        let token_str = |key: &str| {
            cfg.special_tokens
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.as_str().map(str::to_string))
        };
        let (bos_token, eos_token) = (token_str("bos_token"), token_str("eos_token"));
        if cfg.add_bos_token.is_some() || cfg.add_eos_token.is_some() {
            let bos = bos_token
                .as_deref()
                .filter(|_| cfg.add_bos_token == Some(true));
            let eos = eos_token
                .as_deref()
                .filter(|_| cfg.add_eos_token == Some(true));
            let processor =
                bos_eos_processor(&inner, bos, eos).map_err(|reason| TokensError::Config {
                    path: cfg_path.to_path_buf(),
                    reason,
                })?;
            inner.with_post_processor(Some(processor));
        }
        let adds_special_tokens = inner
            .get_post_processor()
            .is_some_and(|p| p.added_tokens(false) > 0);
        let affixes = probe_affixes(&inner, adds_special_tokens);
        let chat = cfg
            .chat_template
            .as_deref()
            .map(|src| ChatTemplate::with_limits(src, &cfg.special_tokens, opts.chat_limits))
            .transpose()?;
        let cache = PrefixCache::new(&inner, opts.cache_bytes);
        tracing::info!(
            model = %name,
            path = %tokenizer_json.display(),
            chat_template = chat.is_some(),
            special_tokens = ?affixes,
            segmentation = ?cache.mode(),
            "tokenizer loaded"
        );
        Ok(Self {
            name,
            source: tokenizer_json.to_path_buf(),
            inner,
            affixes,
            bos_token,
            eos_token,
            chat,
            cache,
        })
    }

    /// The model name this tokenizer was registered under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `tokenizer.json` it was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// `bos_token` from `tokenizer_config.json`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// `eos_token` from `tokenizer_config.json`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The compiled chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// The tokenized-prefix cache (mode and counters).
    pub fn prefix_cache(&self) -> &PrefixCache {
        &self.cache
    }

    /// The underlying `tokenizers` tokenizer (after the special-token policy
    /// was applied).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A `/v1/completions` prompt's ids: `add_special_tokens=True`, cached.
    pub fn encode_completion(&self, prompt: &str) -> Result<Vec<u32>, TokensError> {
        self.encode(prompt, true)
    }

    /// Renders a `/v1/chat/completions` conversation to the prompt text.
    pub fn render_chat(
        &self,
        messages: &[Json],
        opts: &ChatOptions,
    ) -> Result<String, TokensError> {
        self.chat
            .as_ref()
            .ok_or_else(|| TokensError::NoChatTemplate(self.name.clone()))?
            .render(messages, opts)
    }

    /// A chat conversation's ids: rendered, then tokenized without adding
    /// special tokens (the template wrote them), cached.
    pub fn encode_chat(
        &self,
        messages: &[Json],
        opts: &ChatOptions,
    ) -> Result<Vec<u32>, TokensError> {
        let text = self.render_chat(messages, opts)?;
        self.encode(&text, false)
    }

    /// Ids of `text` through the prefix cache; identical to
    /// [`Self::encode_uncached`] (see `prefix_cache.rs` for why).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokensError> {
        let piece = |p: &str| self.encode_uncached(p, false);
        if !add_special_tokens {
            return self.cache.encode(text, piece);
        }
        match &self.affixes {
            Some((prefix, suffix)) => {
                let mut out = Vec::with_capacity(text.len() / 3 + prefix.len() + suffix.len());
                out.extend_from_slice(prefix);
                self.cache.encode_into(text, &mut out, piece)?;
                out.extend_from_slice(suffix);
                Ok(out)
            }
            None => post_process(&self.inner, self.cache.encode(text, piece)?),
        }
    }

    /// [`Self::encode`] if every piece of `text` is in the prefix cache,
    /// else `None` without tokenizing anything: a cheap test for "warm" that
    /// lets the scorer keep cached prompts on the async thread and send
    /// only real tokenization work to its blocking pool.
    pub fn encode_cached(&self, text: &str, add_special_tokens: bool) -> Option<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 8);
        if !add_special_tokens {
            return self.cache.encode_cached_into(text, &mut out).then_some(out);
        }
        match &self.affixes {
            Some((prefix, suffix)) => {
                out.extend_from_slice(prefix);
                if !self.cache.encode_cached_into(text, &mut out) {
                    return None;
                }
                out.extend_from_slice(suffix);
                Some(out)
            }
            None => {
                if !self.cache.encode_cached_into(text, &mut out) {
                    return None;
                }
                post_process(&self.inner, out).ok()
            }
        }
    }

    /// Ids of `text` straight from `tokenizers` (no cache).
    pub fn encode_uncached(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokensError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(TokensError::Encode)
    }
}

/// Finds `prefix ++ ids ++ suffix` by post-processing sentinel ids of
/// several lengths; `None` (use the full post-processor) unless every probe
/// fits that shape.
fn probe_affixes(inner: &tokenizers::Tokenizer, adds: bool) -> Option<(Vec<u32>, Vec<u32>)> {
    if !adds {
        return Some((Vec::new(), Vec::new()));
    }
    let sentinels = |n: u32| (0..n).map(|i| u32::MAX - i).collect::<Vec<u32>>();
    let one = post_process(inner, sentinels(1)).ok()?;
    let pos = one.iter().position(|&id| id == u32::MAX)?;
    let (prefix, suffix) = (one[..pos].to_vec(), one[pos + 1..].to_vec());
    let fits = [0, 2, 7].into_iter().all(|n| {
        let ids = sentinels(n);
        let want: Vec<u32> = prefix.iter().chain(&ids).chain(&suffix).copied().collect();
        post_process(inner, ids).ok() == Some(want)
    });
    fits.then_some((prefix, suffix))
}

/// Runs the post-processor over already-tokenized ids, exactly as
/// `encode(text, true)` does after tokenizing.
fn post_process(inner: &tokenizers::Tokenizer, ids: Vec<u32>) -> Result<Vec<u32>, TokensError> {
    let tokens = ids
        .into_iter()
        .map(|id| Token::new(id, String::new(), (0, 0)))
        .collect();
    inner
        .post_process(Encoding::from_tokens(tokens, 0), None, true)
        .map(|e| e.get_ids().to_vec())
        .map_err(TokensError::Encode)
}

fn read(path: &Path) -> Result<String, TokensError> {
    std::fs::read_to_string(path).map_err(|source| TokensError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the fields of `tokenizer_config.json` that change prompts.
fn parse_config(path: &Path, text: &str) -> Result<Config, TokensError> {
    let bad = |reason: String| TokensError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let v: Json = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let chat_template = match obj.get("chat_template") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s.clone()),
        // A list of named templates: transformers uses "default" unless the
        // caller names another; vLLM names none.
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Json::as_str))
            .map(str::to_string),
        Some(_) => return Err(bad("chat_template must be a string or a list".into())),
    };
    let mut special_tokens = Vec::new();
    for key in SPECIAL_TOKEN_KEYS {
        if let Some(s) = obj.get(*key).and_then(token_content) {
            special_tokens.push(((*key).to_string(), Json::String(s)));
        }
    }
    if let Some(Json::Array(list)) = obj.get("additional_special_tokens") {
        let list: Vec<Json> = list
            .iter()
            .filter_map(token_content)
            .map(Json::String)
            .collect();
        if !list.is_empty() {
            special_tokens.push(("additional_special_tokens".into(), Json::Array(list)));
        }
    }
    let flag = |key: &str| obj.get(key).and_then(Json::as_bool);
    Ok(Config {
        chat_template,
        special_tokens,
        add_bos_token: flag("add_bos_token"),
        add_eos_token: flag("add_eos_token"),
        split_special_tokens: flag("split_special_tokens").unwrap_or(false),
    })
}

/// A special token in a config: a string, or an `AddedToken` object.
fn token_content(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// transformers' `update_post_processor`: `[bos:0] $A:0 [eos:0]`, pair
/// `... [bos:1] $B:1 [eos:1]`.
fn bos_eos_processor(
    inner: &tokenizers::Tokenizer,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<TemplateProcessing, String> {
    let id = |t: &str| {
        inner
            .token_to_id(t)
            .ok_or_else(|| format!("special token {t:?} is not in the vocabulary"))
    };
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special = Vec::new();
    if let Some(b) = bos {
        special.push((b.to_string(), id(b)?));
        single.push(format!("{b}:0"));
    }
    single.push("$A:0".to_string());
    if let Some(e) = eos {
        special.push((e.to_string(), id(e)?));
        single.push(format!("{e}:0"));
    }
    pair.extend(single.iter().cloned());
    if let Some(b) = bos {
        pair.push(format!("{b}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some(e) = eos {
        pair.push(format!("{e}:1"));
    }
    special.dedup();
    TemplateProcessing::builder()
        .try_single(single.join(" "))?
        .try_pair(pair.join(" "))?
        .special_tokens(special)
        .build()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
