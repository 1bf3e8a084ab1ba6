//! Tokenized-segment cache: a long shared system prompt or RAG context costs a
//! hash and a copy on repeat instead of a BPE pass, and the result stays
//! **identical** to tokenizing the whole text.
//!
//! # Why naive prefix caching is wrong
//!
//! BPE merges and regex pre-tokenizers look across any position you might
//! choose: `tokenize("Hello wor") ++ tokenize("ld")` is not
//! `tokenize("Hello world")`, and a Llama 3 pre-tokenizer regex with
//! `\s+(?!\S)` changes the split of trailing spaces depending on what follows.
//! So text is only cut where the tokenizer itself is proven to cut.
//!
//! # Where it is exact to cut
//!
//! `tokenizers` encodes in this order: (1) find added tokens that are not
//! `normalized` in the raw text with a leftmost-longest automaton and carve
//! them out; (2) normalize, pre-tokenize and run the model on *each remaining
//! piece independently*; (3) concatenate, then post-process (BOS...). So the
//! text between two added-token matches is tokenized as if it were alone,
//! provided the match is the same in the whole text as where we cut. A token
//! `S` is accepted as a boundary ([`SegmentationMode::SpecialTokens`]) only if:
//! - it is not `normalized`, `lstrip`, `rstrip` or `single_word` (those move
//!   or drop the match depending on neighbours);
//! - its first and last characters are ASCII punctuation other than `_`
//!   (`<|eot_id|>`), so another token's `lstrip`/`rstrip` cannot eat into it
//!   and `single_word` neighbours see the same (non-)word boundary;
//! - no other non-normalized added token contains it or can start before it
//!   and end inside it (a suffix of the other is a prefix of `S`). Then any
//!   occurrence of `S` in the full text is exactly what the leftmost-longest
//!   scan matches: no match starting before `S` can cover its start, and at
//!   its start `S` is the longest candidate. Nothing before the cut is
//!   matched differently once the text after it is removed, and the scan
//!   restarts right after `S` either way.
//!
//! Pieces are also only tokenized independently when every pre-tokenizer
//! works per piece: Metaspace with `prepend_scheme: first` looks at the
//! piece's offset in the original text, and unknown pre-tokenizers are not
//! trusted, so either disables cutting. `split_special_tokens` does too. At
//! load, probe strings are encoded both ways as a last check; any difference
//! also disables cutting. Disabled cutting is still exact: the whole text is
//! then one piece (a whole-prompt cache).
//!
//! A chat prompt rendered by a template is cut at every header and
//! end-of-turn token, so the system prompt and each earlier turn become their
//! own cached pieces. A RAG context and a question inside the *same* message
//! are one piece: cached only as a whole.
//!
//! # Bounds
//!
//! Pieces are cached in a moka (TinyLFU admission, LRU eviction) cache
//! weighted by bytes (text + 4 bytes per id + overhead), keyed by the piece
//! text itself (so lookups compare text, and a hash collision can never
//! return another text's ids). One cache per [`super::Tokenizer`], i.e. per
//! model.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value as Json;

use super::TokensError;

/// Fixed per-entry cost counted by the weigher (key/value headers, moka node).
const ENTRY_OVERHEAD: usize = 96;

/// Whether, and where, prompts are cut before caching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentationMode {
    /// Cut after/before these many proven-safe added tokens.
    SpecialTokens { boundaries: usize },
    /// Whole texts only, and why.
    WholeText { reason: String },
}

/// Counters for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Pieces served from the cache.
    pub hits: u64,
    /// Pieces tokenized (and then offered to the cache).
    pub misses: u64,
    /// Entries currently held (approximate: moka applies evictions lazily).
    pub entries: u64,
    /// Weighted size currently held, in bytes (approximate).
    pub weighted_bytes: u64,
}

/// Token ids by text, bounded in bytes. Keyed by the whole text, so every
/// hit hashes it: with std's SipHash that was ~8 µs per 39 KiB prompt
/// (~30 µs at 2048 blocks); foldhash's seeded hasher takes ~1.4 µs
/// (docs/dependencies.md), and stays seeded per process so a client
/// cannot aim texts at one bucket.
pub type TextCache = moka::sync::Cache<Arc<str>, Arc<[u32]>, foldhash::fast::RandomState>;

/// A [`TextCache`] of at most `max_bytes` (text + 4 bytes per id + a fixed
/// per-entry overhead).
pub fn text_cache(max_bytes: u64) -> TextCache {
    moka::sync::Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|k: &Arc<str>, v: &Arc<[u32]>| {
            u32::try_from(k.len() + 4 * v.len() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
        })
        .build_with_hasher(foldhash::fast::RandomState::default())
}

/// See the module doc.
pub struct PrefixCache {
    segmenter: Option<Segmenter>,
    mode: SegmentationMode,
    /// `None` when the configured size is 0 (cutting still happens, which is
    /// harmless and keeps one code path).
    cache: Option<TextCache>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for PrefixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCache")
            .field("mode", &self.mode)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Segmenter {
    automaton: AhoCorasick,
    /// Token id of each automaton pattern.
    ids: Vec<u32>,
}

impl PrefixCache {
    /// Builds the cache for `tok`, proving which added tokens are safe
    /// boundaries. `max_bytes` bounds the weighted size (0 disables storage).
    pub(crate) fn new(tok: &tokenizers::Tokenizer, max_bytes: u64) -> Self {
        let (segmenter, mode) = match Segmenter::build(tok) {
            Ok(s) => {
                let boundaries = s.ids.len();
                (Some(s), SegmentationMode::SpecialTokens { boundaries })
            }
            Err(reason) => (None, SegmentationMode::WholeText { reason }),
        };
        let cache = (max_bytes > 0).then(|| text_cache(max_bytes));
        Self {
            segmenter,
            mode,
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Whether prompts are cut, and at how many distinct tokens.
    pub fn mode(&self) -> &SegmentationMode {
        &self.mode
    }

    /// Hit/miss counters and the current size.
    pub fn stats(&self) -> CacheStats {
        let (entries, weighted_bytes) = self
            .cache
            .as_ref()
            .map_or((0, 0), |c| (c.entry_count(), c.weighted_size()));
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries,
            weighted_bytes,
        }
    }

    /// Applies moka's pending evictions (tests and stats that must be exact).
    pub fn run_pending_tasks(&self) {
        if let Some(c) = &self.cache {
            c.run_pending_tasks();
        }
    }

    /// Ids of `text` without post-processing, through the cache. `encode`
    /// tokenizes one piece exactly as the whole text would be (no special
    /// tokens added).
    pub(crate) fn encode<F>(&self, text: &str, encode: F) -> Result<Vec<u32>, TokensError>
    where
        F: Fn(&str) -> Result<Vec<u32>, TokensError>,
    {
        let mut out = Vec::with_capacity(text.len() / 3 + 8);
        self.encode_into(text, &mut out, encode)?;
        Ok(out)
    }

    /// [`Self::encode`], appending to `out`.
    pub(crate) fn encode_into<F>(
        &self,
        text: &str,
        out: &mut Vec<u32>,
        encode: F,
    ) -> Result<(), TokensError>
    where
        F: Fn(&str) -> Result<Vec<u32>, TokensError>,
    {
        let mut last = 0;
        if let Some(seg) = &self.segmenter {
            for m in seg.automaton.find_iter(text) {
                self.piece(&text[last..m.start()], out, &encode)?;
                out.push(seg.ids[m.pattern().as_usize()]);
                last = m.end();
            }
        }
        self.piece(&text[last..], out, &encode)
    }

    /// Appends the ids of `text` only if every piece of it is already
    /// cached, and returns whether it did (`out` is left as it was when not).
    /// Costs the boundary scan and one lookup per piece, never a BPE pass:
    /// the scorer calls it on the async thread to tell a warm prompt (served
    /// here in microseconds) from a cold one (sent to its blocking pool).
    /// Misses are not counted: the caller tokenizes through [`Self::encode`]
    /// next, which counts them.
    pub(crate) fn encode_cached_into(&self, text: &str, out: &mut Vec<u32>) -> bool {
        let Some(cache) = &self.cache else {
            return text.is_empty();
        };
        let start = out.len();
        let mut hits = 0;
        let mut piece = |piece: &str, out: &mut Vec<u32>| {
            if piece.is_empty() {
                return true;
            }
            match cache.get(piece) {
                Some(ids) => {
                    hits += 1;
                    out.extend_from_slice(&ids);
                    true
                }
                None => false,
            }
        };
        let mut last = 0;
        let mut complete = true;
        if let Some(seg) = &self.segmenter {
            for m in seg.automaton.find_iter(text) {
                if !piece(&text[last..m.start()], out) {
                    complete = false;
                    break;
                }
                out.push(seg.ids[m.pattern().as_usize()]);
                last = m.end();
            }
        }
        complete = complete && piece(&text[last..], out);
        if complete {
            self.hits.fetch_add(hits, Ordering::Relaxed);
        } else {
            out.truncate(start);
        }
        complete
    }

    fn piece<F>(&self, piece: &str, out: &mut Vec<u32>, encode: &F) -> Result<(), TokensError>
    where
        F: Fn(&str) -> Result<Vec<u32>, TokensError>,
    {
        if piece.is_empty() {
            return Ok(());
        }
        if let Some(ids) = self.cache.as_ref().and_then(|c| c.get(piece)) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            out.extend_from_slice(&ids);
            return Ok(());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let ids = encode(piece)?;
        out.extend_from_slice(&ids);
        if let Some(c) = &self.cache {
            c.insert(Arc::from(piece), Arc::from(ids));
        }
        Ok(())
    }
}

impl Segmenter {
    fn build(tok: &tokenizers::Tokenizer) -> Result<Self, String> {
        if tok.get_added_vocabulary().get_encode_special_tokens() {
            return Err("split_special_tokens is on: special-token strings are plain text".into());
        }
        if let Some(pre) = tok.get_pre_tokenizer() {
            let json = serde_json::to_value(pre).map_err(|e| e.to_string())?;
            check_pre_tokenizer(&json)?;
        }
        let added = tok.get_added_tokens_decoder();
        let raw: Vec<&str> = added
            .values()
            .filter(|t| !t.normalized)
            .map(|t| t.content.as_str())
            .collect();
        let mut safe: Vec<(u32, &str)> = added
            .iter()
            .filter(|(_, t)| {
                !t.normalized && !t.lstrip && !t.rstrip && !t.single_word && edges_ok(&t.content)
            })
            .map(|(id, t)| (*id, t.content.as_str()))
            .filter(|(_, s)| raw.iter().all(|other| other == s || isolated(s, other)))
            .collect();
        if safe.is_empty() {
            return Err("no added token is a proven-safe boundary".into());
        }
        safe.sort_unstable();
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(safe.iter().map(|(_, s)| s))
            .map_err(|e| e.to_string())?;
        let seg = Segmenter {
            automaton,
            ids: safe.iter().map(|(id, _)| *id).collect(),
        };
        seg.self_check(tok, &safe)?;
        Ok(seg)
    }

    /// Encodes probe strings cut and whole; any difference disables cutting.
    fn self_check(&self, tok: &tokenizers::Tokenizer, safe: &[(u32, &str)]) -> Result<(), String> {
        let check = PrefixCache {
            segmenter: Some(Segmenter {
                automaton: self.automaton.clone(),
                ids: self.ids.clone(),
            }),
            mode: SegmentationMode::SpecialTokens { boundaries: 0 },
            cache: None,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        };
        let enc = |s: &str| {
            tok.encode_fast(s, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(TokensError::Encode)
        };
        for (i, (_, s)) in safe.iter().take(8).enumerate() {
            let (_, t) = safe[(i + 1) % safe.len()];
            let probes = [
                format!("a{s}b"),
                format!(" {s} \n\n"),
                format!("{s}{t}{s}"),
                format!("Hello  wörld 123{s}\n\n  x{t} y"),
                format!("'s{s}'ll  \t{t}"),
            ];
            for p in &probes {
                let whole = enc(p).map_err(|e| e.to_string())?;
                let cut = check.encode(p, enc).map_err(|e| e.to_string())?;
                if whole != cut {
                    return Err(format!("self-check failed on {p:?}"));
                }
            }
        }
        Ok(())
    }
}

/// First and last characters are ASCII punctuation other than `_`: not
/// whitespace (lstrip/rstrip neighbours) and not `\w` (single_word
/// neighbours).
fn edges_ok(s: &str) -> bool {
    let ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_punctuation() && c != '_');
    ok(s.chars().next()) && ok(s.chars().next_back())
}

/// In any text, an occurrence of `s` is matched as `s` by the tokenizer's
/// leftmost-longest scan despite `other`: `other` does not contain `s`, and
/// no proper prefix of `s` is a suffix of `other` (`other` cannot start
/// before `s` and end inside it). Tokens starting inside `s` are harmless:
/// the scan reaches `s`'s start first and takes `s`, the longest match there.
fn isolated(s: &str, other: &str) -> bool {
    let (a, b) = (s.as_bytes(), other.as_bytes());
    !other.contains(s) && (1..a.len().min(b.len())).all(|k| !b.ends_with(&a[..k]))
}

/// Pre-tokenizers that work on each piece without looking at its position
/// in the original text.
fn check_pre_tokenizer(v: &Json) -> Result<(), String> {
    const PER_PIECE: &[&str] = &[
        "ByteLevel",
        "Split",
        "Whitespace",
        "WhitespaceSplit",
        "Punctuation",
        "Digits",
        "BertPreTokenizer",
        "UnicodeScripts",
        "CharDelimiterSplit",
        "FixedLength",
    ];
    let ty = v.get("type").and_then(Json::as_str).unwrap_or("");
    match ty {
        "Sequence" => v
            .get("pretokenizers")
            .and_then(Json::as_array)
            .ok_or_else(|| "pre-tokenizer Sequence without list".to_string())?
            .iter()
            .try_for_each(check_pre_tokenizer),
        "Metaspace" => match v.get("prepend_scheme").and_then(Json::as_str) {
            Some("first") => Err("Metaspace prepend_scheme=first depends on the offset".into()),
            _ => Ok(()),
        },
        t if PER_PIECE.contains(&t) => Ok(()),
        other => Err(format!(
            "pre-tokenizer {other:?} is not known to work per piece"
        )),
    }
}

#[cfg(test)]
mod tests;
