//! The simulator's own tokenizer: a word-level vocabulary built in code, so
//! text workloads need no downloaded model and the live scorer can load the
//! very same tokenizer from a directory this module writes.
//!
//! Shape (Llama 3 in miniature):
//! - 8,000 regular tokens: `<unk>`, six punctuation marks, the three chat
//!   roles, ~100 English function words and pseudo-words made of syllables
//!   (a fixed enumeration, no randomness), so one word is one token;
//! - 11 special tokens after them with Llama 3.1's names in Llama 3.1's
//!   order (`<|begin_of_text|>` = 8000 like 128000, `<|eot_id|>` = 8009
//!   like 128009);
//! - a `tokenizers` `WordLevel` model behind a `Whitespace` pre-tokenizer
//!   (`\w+|[^\w\s]+`), a post-processor adding `<|begin_of_text|>` (what
//!   `/v1/completions` gets) and a Llama-3-style chat template (what
//!   `/v1/chat/completions` gets; BOS written by the template).
//!
//! Encoding goes through the same `tokenizers` model built from the same
//! `tokenizer.json` text that [`SimTokenizer::write_dir`] writes, and
//! through `kvroute_tokens`' own [`ChatTemplate`], so the ids equal what
//! `kvroute_tokens::Tokenizer::from_path` (the scorer) computes for that
//! directory by construction; the tests check it.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use fnv::FnvBuildHasher;
use kvroute_tokens::{ChatOptions, ChatTemplate, TokensError};
use serde_json::{Value as Json, json};

use super::{Message, WorkloadError};

/// The model name workloads put in requests and the scorer's
/// `--tokenizer MODEL=DIR` flag must name for the written directory.
pub const SIM_MODEL: &str = "kvroute-sim-words";

/// Regular (non-special) tokens, ids `0..REGULAR_TOKENS`.
pub const REGULAR_TOKENS: u32 = 8_000;

/// Llama 3.1's first special tokens, in its order (`128000 + i` there,
/// `REGULAR_TOKENS + i` here).
const SPECIAL_TOKENS: [&str; 11] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
];

/// Id of `<|begin_of_text|>`.
pub const BOS_ID: u32 = REGULAR_TOKENS;
/// Id of `<|eot_id|>`.
pub const EOT_ID: u32 = REGULAR_TOKENS + 9;
/// Id of `<|start_header_id|>`.
pub const START_HEADER_ID: u32 = REGULAR_TOKENS + 6;
/// Id of `<|end_header_id|>`.
pub const END_HEADER_ID: u32 = REGULAR_TOKENS + 7;

const UNK: &str = "<unk>";

/// Punctuation the text generator uses: each is its own token because the
/// Whitespace pre-tokenizer splits non-word runs from words (two marks in
/// a row would form one unknown run, so the generator never writes that).
pub(crate) const PUNCTUATION: [&str; 6] = [".", ",", "?", "!", ":", ";"];

/// The roles the chat template writes into headers; they must be tokens.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Common English function words, so generated text reads a little like
/// prose around the pseudo-words (written for this crate).
const ENGLISH: &[&str] = &[
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
    "with",
    "was",
    "on",
    "be",
    "by",
    "at",
    "this",
    "are",
    "from",
    "or",
    "an",
    "which",
    "not",
    "have",
    "has",
    "but",
    "they",
    "their",
    "can",
    "will",
    "more",
    "one",
    "all",
    "also",
    "its",
    "into",
    "other",
    "than",
    "these",
    "such",
    "some",
    "may",
    "when",
    "what",
    "where",
    "how",
    "there",
    "each",
    "many",
    "most",
    "only",
    "over",
    "after",
    "before",
    "between",
    "under",
    "about",
    "through",
    "while",
    "during",
    "both",
    "new",
    "first",
    "last",
    "long",
    "short",
    "same",
    "different",
    "every",
    "any",
    "no",
    "yes",
    "we",
    "you",
    "he",
    "she",
    "them",
    "our",
    "your",
    "his",
    "her",
    "who",
    "why",
    "then",
    "now",
    "here",
    "very",
    "well",
    "just",
    "so",
    "if",
    "because",
    "until",
    "again",
    "further",
    "once",
    "please",
    "answer",
    "question",
    "document",
    "context",
    "explain",
    "describe",
    "list",
    "using",
    "given",
    "based",
    "following",
    "above",
    "below",
];

/// The chat template: Llama 3's format (BOS, a header per message, content
/// trimmed, `<|eot_id|>`, the assistant header as generation prompt)
/// without Llama's tool and date handling, which no workload uses and
/// which would put the render date into prompts.
const CHAT_TEMPLATE: &str = r#"{#- kvroute-sim: the Llama 3 chat format over the simulator's word vocabulary. -#}
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception("Unknown role '" ~ message['role'] ~ "': expected system, user or assistant") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

/// See the module doc. Cheap to share by reference; building it takes a
/// few milliseconds, so build it once per run.
pub struct SimTokenizer {
    inner: tokenizers::Tokenizer,
    chat: ChatTemplate,
    /// Regular tokens by id.
    vocab: Vec<String>,
    /// Regular tokens by text.
    ids: HashMap<String, u32, FnvBuildHasher>,
    /// Ids of the words generated text draws from (English + pseudo-words;
    /// not `<unk>`, punctuation or roles).
    content: Vec<u32>,
    tokenizer_json: String,
    config_json: String,
}

impl std::fmt::Debug for SimTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("content_words", &self.content.len())
            .finish_non_exhaustive()
    }
}

impl SimTokenizer {
    /// Builds the vocabulary, the `tokenizer.json` text and the chat
    /// template. Everything is fixed in code, so this cannot fail for any
    /// input; the `expect`s guard the crate's own constants (a test builds
    /// it).
    pub fn build() -> SimTokenizer {
        let vocab = regular_vocab();
        let content: Vec<u32> = vocab
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                w.as_str() != UNK
                    && !PUNCTUATION.contains(&w.as_str())
                    && !ROLES.contains(&w.as_str())
            })
            .map(|(i, _)| i as u32)
            .collect();
        let tokenizer_json = tokenizer_json(&vocab);
        let config_json = config_json();
        let inner = tokenizers::Tokenizer::from_str(&tokenizer_json)
            .expect("the simulator's tokenizer.json is built in code and valid");
        let chat = ChatTemplate::new(CHAT_TEMPLATE, &template_special_tokens())
            .expect("the simulator's chat template is fixed and compiles");
        let ids = vocab
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        SimTokenizer {
            inner,
            chat,
            ids,
            vocab,
            content,
            tokenizer_json,
            config_json,
        }
    }

    /// Regular plus special tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len() + SPECIAL_TOKENS.len()
    }

    /// The text of token `id` (special tokens included).
    pub fn token(&self, id: u32) -> Option<&str> {
        let i = id as usize;
        match self.vocab.get(i) {
            Some(w) => Some(w),
            None => SPECIAL_TOKENS.get(i - self.vocab.len()).copied(),
        }
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` and
    /// `chat_template.jinja` into `dir` (created if missing): the layout a
    /// Hugging Face model directory has and `kvroute_tokens` loads, so the
    /// scorer runs with `--tokenizer kvroute-sim-words=DIR`.
    pub fn write_dir(&self, dir: &Path) -> Result<(), WorkloadError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WorkloadError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for (name, text) in [
            ("tokenizer.json", self.tokenizer_json.as_str()),
            ("tokenizer_config.json", self.config_json.as_str()),
            ("chat_template.jinja", CHAT_TEMPLATE),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        Ok(())
    }

    /// A `/v1/completions` prompt's ids (`add_special_tokens=True`: BOS
    /// first, as vLLM tokenizes it).
    pub fn encode_completion(&self, prompt: &str) -> Result<Vec<u32>, WorkloadError> {
        self.encode(prompt, true)
    }

    /// The chat template's text for `messages` with the generation prompt
    /// (vLLM's default `add_generation_prompt=True`).
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, WorkloadError> {
        let json: Vec<Json> = messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect();
        self.chat
            .render(&json, &ChatOptions::default())
            .map_err(WorkloadError::Tokenize)
    }

    /// A `/v1/chat/completions` conversation's ids: rendered, then
    /// tokenized without adding special tokens (the template wrote BOS).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, WorkloadError> {
        let text = self.render_chat(messages)?;
        self.encode(&text, false)
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, WorkloadError> {
        if text.is_ascii() {
            let mut out = Vec::with_capacity(text.len() / 5 + 1);
            if add_special_tokens {
                out.push(BOS_ID);
            }
            self.encode_ascii(text, &mut out);
            return Ok(out);
        }
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| WorkloadError::Tokenize(TokensError::Encode(e)))
    }

    /// What the `tokenizers` model computes for ASCII text, without its
    /// per-character alignment bookkeeping (10x faster, which matters for
    /// workloads of millions of tokens): special-token strings are split
    /// out first (leftmost match; none is a prefix of another), then the
    /// rest is split as the Whitespace pre-tokenizer's `\w+|[^\w\s]+`
    /// does (ASCII `\w` is `[0-9A-Za-z_]`, `\s` is `[\t\n\v\f\r ]`) and
    /// each piece is looked up, `<unk>` when absent. Non-ASCII text goes
    /// through `tokenizers` itself; the tests compare both paths with
    /// `kvroute_tokens` on the written directory.
    fn encode_ascii(&self, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let mut piece_start = 0;
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'<'
                && let Some((k, t)) = SPECIAL_TOKENS
                    .iter()
                    .enumerate()
                    .find(|(_, t)| bytes[i..].starts_with(t.as_bytes()))
            {
                self.encode_words(&text[piece_start..i], out);
                out.push(REGULAR_TOKENS + k as u32);
                i += t.len();
                piece_start = i;
                continue;
            }
            i += 1;
        }
        self.encode_words(&text[piece_start..], out);
    }

    fn encode_words(&self, text: &str, out: &mut Vec<u32>) {
        #[derive(PartialEq, Clone, Copy)]
        enum Class {
            Word,
            Space,
            Other,
        }
        let class = |b: u8| match b {
            b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'z' | b'_' => Class::Word,
            b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ' => Class::Space,
            _ => Class::Other,
        };
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let c = class(bytes[i]);
            let start = i;
            while i < bytes.len() && class(bytes[i]) == c {
                i += 1;
            }
            if c != Class::Space {
                out.push(self.ids.get(&text[start..i]).copied().unwrap_or(0));
            }
        }
    }

    /// Ids of the words generated text is made of.
    pub(crate) fn content_words(&self) -> &[u32] {
        &self.content
    }

    /// Text of a regular token (empty for an id out of range, which the
    /// generators never pass: they draw from [`Self::content_words`] and
    /// [`PUNCTUATION`]).
    pub(crate) fn word(&self, id: u32) -> &str {
        self.vocab.get(id as usize).map_or("", String::as_str)
    }

    /// Id of a punctuation mark.
    pub(crate) fn punctuation_id(&self, mark: usize) -> u32 {
        // `<unk>` is id 0, the marks follow in PUNCTUATION's order.
        1 + mark.min(PUNCTUATION.len() - 1) as u32
    }
}

/// `<unk>`, punctuation, roles, English words, then pseudo-words up to
/// [`REGULAR_TOKENS`]. Pseudo-words are two or three syllables
/// (onset + vowel) visited in a fixed scrambled order, skipping any that
/// collide with an earlier word.
fn regular_vocab() -> Vec<String> {
    const ONSETS: [&str; 24] = [
        "b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "dr",
        "gl", "kr", "pl", "sk", "st", "tr",
    ];
    const VOWELS: [&str; 8] = ["a", "e", "i", "o", "u", "ai", "ou", "ea"];
    let syllables: Vec<String> = ONSETS
        .iter()
        .flat_map(|o| VOWELS.iter().map(move |v| format!("{o}{v}")))
        .collect();
    let s = syllables.len(); // 192
    let mut vocab: Vec<String> = std::iter::once(UNK)
        .chain(PUNCTUATION)
        .chain(ROLES)
        .chain(ENGLISH.iter().copied())
        .map(str::to_string)
        .collect();
    let mut seen: std::collections::HashSet<String> = vocab.iter().cloned().collect();
    // Two syllables give 36,864 words, far more than needed; a stride
    // coprime with that count (2^12 * 3^2) visits them in a scrambled
    // order, so the vocabulary does not start with "baba", "babe", ...
    let two = s * s;
    let stride = 7_919; // prime, coprime with 36,864
    let mut k = 0usize;
    while vocab.len() < REGULAR_TOKENS as usize && k < two {
        let n = (k * stride) % two;
        let word = format!("{}{}", syllables[n / s], syllables[n % s]);
        if seen.insert(word.clone()) {
            vocab.push(word);
        }
        k += 1;
    }
    vocab
}

/// `tokenizer.json` in the `tokenizers` 0.2x serialization.
fn tokenizer_json(vocab: &[String]) -> String {
    let mut model_vocab = serde_json::Map::new();
    for (i, w) in vocab.iter().enumerate() {
        model_vocab.insert(w.clone(), json!(i));
    }
    let mut added = Vec::new();
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        let id = vocab.len() + i;
        model_vocab.insert((*t).to_string(), json!(id));
        added.push(json!({
            "id": id, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    let bos = SPECIAL_TOKENS[0];
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {
                bos: {"id": bos, "ids": [vocab.len()], "tokens": [bos]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": model_vocab, "unk_token": UNK}
    });
    doc.to_string()
}

/// `tokenizer_config.json`: BOS and EOS as Llama 3 Instruct names them, the
/// template inline too (for readers that ignore `chat_template.jinja`).
fn config_json() -> String {
    let doc = json!({
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[9],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131_072,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    // Pretty, as Hugging Face writes it; serializing a Value cannot fail.
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string())
}

/// The template context's special-token strings, as `kvroute_tokens` reads
/// them from [`config_json`] (`bos_token`, then `eos_token`).
fn template_special_tokens() -> Vec<(String, Json)> {
    vec![
        ("bos_token".into(), json!(SPECIAL_TOKENS[0])),
        ("eos_token".into(), json!(SPECIAL_TOKENS[9])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_tokens::{Tokenizer, TokenizerOptions};
    use std::path::PathBuf;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            TempDir(
                std::env::temp_dir()
                    .join(format!("kvroute-sim-tok-{tag}-{}-{n}", std::process::id())),
            )
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn vocabulary_is_llama_shaped_and_words_are_distinct() {
        let t = SimTokenizer::build();
        assert_eq!(t.vocab.len(), 8_000);
        assert_eq!(t.vocab_size(), 8_011);
        let distinct: std::collections::HashSet<&String> = t.vocab.iter().collect();
        assert_eq!(distinct.len(), 8_000, "no duplicate words");
        assert_eq!(t.token(BOS_ID), Some("<|begin_of_text|>"));
        assert_eq!(t.token(EOT_ID), Some("<|eot_id|>"));
        assert_eq!(t.token(START_HEADER_ID), Some("<|start_header_id|>"));
        assert_eq!(t.token(END_HEADER_ID), Some("<|end_header_id|>"));
        assert_eq!(t.token(8_011), None);
        for (i, p) in PUNCTUATION.iter().enumerate() {
            assert_eq!(t.word(t.punctuation_id(i)), *p);
        }
        // 8,000 minus <unk>, 6 marks and 3 roles.
        assert_eq!(t.content_words().len(), 7_990);
        assert!(
            t.content_words()
                .iter()
                .all(|&id| t.word(id).chars().all(|c| c.is_ascii_lowercase()))
        );
    }

    #[test]
    fn one_word_one_token_and_known_ids() {
        let t = SimTokenizer::build();
        let ids = t
            .encode_completion("the question, of this document?")
            .expect("encode");
        let want: Vec<u32> = ["the", "question", ",", "of", "this", "document", "?"]
            .iter()
            .map(|w| t.vocab.iter().position(|v| v == w).expect("in vocab") as u32)
            .collect();
        assert_eq!(ids[0], BOS_ID);
        assert_eq!(ids[1..], want[..]);
        // Unknown words become <unk> (id 0), never an error.
        assert_eq!(
            t.encode_completion("Zebra").expect("encode"),
            vec![BOS_ID, 0]
        );
    }

    #[test]
    fn chat_is_llama3_format() {
        let t = SimTokenizer::build();
        let text = t
            .render_chat(&[msg("system", " be brief "), msg("user", "why")])
            .expect("render");
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nwhy<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let id = |w: &str| t.vocab.iter().position(|v| v == w).expect("in vocab") as u32;
        let ids = t.encode_chat(&[msg("user", "why")]).expect("encode");
        assert_eq!(
            ids,
            vec![
                BOS_ID,
                START_HEADER_ID,
                id("user"),
                END_HEADER_ID,
                id("why"),
                EOT_ID,
                START_HEADER_ID,
                id("assistant"),
                END_HEADER_ID
            ]
        );
        assert!(matches!(
            t.encode_chat(&[msg("tool", "x")]),
            Err(WorkloadError::Tokenize(_))
        ));
    }

    #[test]
    fn written_directory_loads_in_kvroute_tokens_with_identical_ids() {
        let t = SimTokenizer::build();
        let dir = TempDir::new("dir");
        t.write_dir(&dir.0).expect("write");
        let loaded = Tokenizer::from_path(SIM_MODEL, &dir.0, &TokenizerOptions::default())
            .expect("kvroute_tokens loads the written directory");
        assert_eq!(loaded.bos_token(), Some("<|begin_of_text|>"));
        assert_eq!(loaded.eos_token(), Some("<|eot_id|>"));

        let words = t.content_words();
        let text: String = (0..400)
            .map(|i| t.word(words[(i * 37) % words.len()]))
            .collect::<Vec<_>>()
            .join(" ");
        let prompts = [
            text.clone(),
            format!("{text}. and, then? <|eot_id|> Unknown words: 42!"),
            String::new(),
            // Every ASCII class boundary and special-token adjacency the
            // fast path splits on.
            "tabs\tand\x0bvertical\x0c feeds\r\n_under_score 12ab the.,;x \
             <|eot_id|><|eot_id|>!<|start_header_id|>the<|unknown|> <|eot_id <unk> |> \x01\x7f"
                .to_string(),
            // Not ASCII: tokenized by `tokenizers` itself.
            "caf\u{e9} the na\u{ef}ve \u{2014} \u{fc}ber\u{a0}the".to_string(),
        ];
        for p in &prompts {
            assert_eq!(
                t.encode_completion(p).expect("sim"),
                t.inner
                    .encode_fast(p.as_str(), true)
                    .expect("tokenizers")
                    .get_ids(),
                "fast path {p:?}"
            );
        }
        for p in &prompts {
            assert_eq!(
                t.encode_completion(p).expect("sim"),
                loaded.encode_completion(p).expect("kvroute_tokens"),
                "completion {p:?}"
            );
        }
        let chats = [
            vec![msg("user", &text)],
            vec![
                msg("system", "you answer well."),
                msg("user", &text),
                msg("assistant", "the answer is here"),
                msg("user", "and more?"),
            ],
        ];
        for c in &chats {
            let json: Vec<Json> = c
                .iter()
                .map(|m| json!({"role": m.role, "content": m.content}))
                .collect();
            assert_eq!(
                t.encode_chat(c).expect("sim"),
                loaded
                    .encode_chat(&json, &ChatOptions::default())
                    .expect("kvroute_tokens"),
            );
        }
    }
}
