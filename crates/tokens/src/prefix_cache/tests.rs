use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::testutil::{TempDir, tiny_dir, tiny_json};
use crate::{Tokenizer, TokenizerOptions};

fn load(json: &serde_json::Value, cache_bytes: u64) -> (TempDir, Tokenizer) {
    let dir = TempDir::new("cache");
    dir.write("tokenizer.json", &json.to_string());
    let tok = Tokenizer::from_path(
        "t",
        dir.path(),
        &TokenizerOptions {
            cache_bytes,
            ..TokenizerOptions::default()
        },
    )
    .expect("load");
    (dir, tok)
}

fn tiny() -> Tokenizer {
    Tokenizer::from_path("tiny", &tiny_dir(), &TokenizerOptions::default()).expect("load")
}

const FRAGMENTS: &[&str] = &[
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "<|eot_id",
    "<|",
    "|>",
    "Hello",
    " world",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "'s",
    "'ll",
    "123",
    "4567",
    "é",
    "日本",
    "🚀",
    " the",
    "assistant",
    "system",
    "_",
    "-",
    "!",
    "?",
];

fn prompt() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => prop::sample::select(FRAGMENTS).prop_map(str::to_string),
            1 => "\\PC{0,6}",
            1 => "[ \\n\\t]{1,4}",
        ],
        0..30,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn cached_equals_uncached(p in prompt(), special in any::<bool>()) {
        let tok = tiny_shared();
        let want = tok.encode_uncached(&p, special).unwrap();
        prop_assert_eq!(&tok.encode(&p, special).unwrap(), &want);
        prop_assert_eq!(&tok.encode(&p, special).unwrap(), &want);
        // Once encoded, every piece is cached: the cache-only path agrees.
        prop_assert_eq!(tok.encode_cached(&p, special), Some(want));
    }
}

fn tiny_shared() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(tiny)
}

#[test]
fn fixture_cuts_at_every_special_token() {
    let tok = tiny();
    assert_eq!(
        tok.prefix_cache().mode(),
        &SegmentationMode::SpecialTokens { boundaries: 5 }
    );
}

#[test]
fn repeated_system_prompt_is_a_cache_hit() {
    let tok = tiny();
    let system = "You are a helpful assistant. ".repeat(200);
    let chat = |q: &str| {
        format!(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
        )
    };
    tok.encode(&chat("first?"), false).unwrap();
    let before = tok.prefix_cache().stats();
    let ids = tok.encode(&chat("second?"), false).unwrap();
    let after = tok.prefix_cache().stats();
    assert_eq!(ids, tok.encode_uncached(&chat("second?"), false).unwrap());
    // Pieces: "system", "\n\n{system}", "user", "\n\n{q}": only the question is new.
    assert_eq!(after.misses - before.misses, 1);
    assert_eq!(after.hits - before.hits, 3);
}

#[test]
fn cache_only_encoding_answers_warm_texts_and_declines_cold_ones() {
    let tok = tiny();
    let system = "You are a helpful assistant. ".repeat(50);
    let chat = |q: &str| {
        format!(
            "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
        )
    };
    assert_eq!(tok.encode_cached(&chat("first?"), true), None);
    let want = tok.encode(&chat("first?"), true).unwrap();
    let before = tok.prefix_cache().stats();
    assert_eq!(tok.encode_cached(&chat("first?"), true), Some(want));
    // A new question: the system prompt is cached, the question is not, so
    // nothing is returned and nothing is tokenized or counted as a miss.
    assert_eq!(tok.encode_cached(&chat("second?"), false), None);
    let after = tok.prefix_cache().stats();
    assert_eq!(after.misses, before.misses);
    assert_eq!(after.hits - before.hits, 4);
    let (_d, uncached) = load(&tiny_json(), 0);
    assert_eq!(uncached.encode_cached("hello", true), None);
}

#[test]
fn cache_stays_within_its_byte_bound() {
    let (_d, tok) = load(&tiny_json(), 64 * 1024);
    for i in 0..400 {
        let p = format!("prompt number {i} {}", "padding text ".repeat(20));
        assert_eq!(
            tok.encode(&p, true).unwrap(),
            tok.encode_uncached(&p, true).unwrap()
        );
    }
    tok.prefix_cache().run_pending_tasks();
    let stats = tok.prefix_cache().stats();
    assert!(stats.weighted_bytes <= 64 * 1024, "{stats:?}");
    assert!(stats.entries > 0 && stats.misses >= 400, "{stats:?}");
    let (_d, off) = load(&tiny_json(), 0);
    off.encode("no storage", true).unwrap();
    assert_eq!(off.prefix_cache().stats().entries, 0);
}

#[test]
fn offset_dependent_pre_tokenizer_disables_cutting_but_stays_exact() {
    let mut json = tiny_json();
    json["pre_tokenizer"] =
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true});
    json["decoder"] = serde_json::Value::Null;
    let (_d, tok) = load(&json, 1 << 20);
    assert!(matches!(
        tok.prefix_cache().mode(),
        SegmentationMode::WholeText { .. }
    ));
    for p in [
        "a<|eot_id|>b c",
        "<|eot_id|> x",
        "hello world<|eot_id|>hello world",
    ] {
        assert_eq!(
            tok.encode(p, true).unwrap(),
            tok.encode_uncached(p, true).unwrap()
        );
    }
}

#[test]
fn stripping_or_overlapping_tokens_are_not_boundaries() {
    let mut json = tiny_json();
    let added = json["added_tokens"].as_array_mut().expect("added_tokens");
    for t in added.iter_mut() {
        if t["content"] == "<|eot_id|>" {
            t["lstrip"] = json!(true);
        }
    }
    // "x<|start" overlaps the start of "<|start_header_id|>".
    let next_id = 393;
    added.push(
        json!({"id": next_id, "content": "x<|start", "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true}),
    );
    let (_d, tok) = load(&json, 1 << 20);
    // Left: <|begin_of_text|>, <|end_of_text|>, <|end_header_id|>, x<|start is
    // dropped for its first char, <|start_header_id|> for the overlap.
    assert_eq!(
        tok.prefix_cache().mode(),
        &SegmentationMode::SpecialTokens { boundaries: 3 }
    );
    for p in [
        "a  <|eot_id|>b",
        "x<|start_header_id|>y",
        "ax<|start_header_id|><|end_header_id|> z",
    ] {
        assert_eq!(
            tok.encode(p, true).unwrap(),
            tok.encode_uncached(p, true).unwrap(),
            "{p:?}"
        );
    }
}

#[test]
fn isolation_rules() {
    let s = "<|eot_id|>";
    assert!(isolated(s, "<|start_header_id|>"));
    assert!(!isolated(s, "<|eot_id|>x"), "contains s");
    assert!(
        !isolated(s, "ab<|eot"),
        "starts before s and ends inside it"
    );
    assert!(isolated(s, "|>ab"), "starts inside s: harmless");
    assert!(isolated(s, "eot"), "inside s: harmless");
    assert!(edges_ok(s));
    assert!(!edges_ok("<s"));
    assert!(!edges_ok("_x_"));
    assert!(!edges_ok(" <x>"));
    assert!(!edges_ok(""));
}

#[test]
fn pre_tokenizer_whitelist() {
    assert!(
        check_pre_tokenizer(&json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split"}, {"type": "ByteLevel"}]}))
        .is_ok()
    );
    assert!(check_pre_tokenizer(&json!({"type": "Metaspace", "prepend_scheme": "always"})).is_ok());
    assert!(check_pre_tokenizer(&json!({"type": "Metaspace", "prepend_scheme": "first"})).is_err());
    assert!(
        check_pre_tokenizer(&json!({"type": "Sequence", "pretokenizers": [
        {"type": "ByteLevel"}, {"type": "SomethingNew"}]}))
        .is_err()
    );
}
