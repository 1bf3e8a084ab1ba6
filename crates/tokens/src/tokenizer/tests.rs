use serde_json::json;

use super::*;
use crate::testutil::{TempDir, tiny_dir, tiny_json};

const BOS: u32 = 0; // <|begin_of_text|> in the fixture
const EOT: u32 = 4; // <|eot_id|>

fn tiny() -> Tokenizer {
    Tokenizer::from_path("tiny", &tiny_dir(), &TokenizerOptions::default()).expect("load tiny")
}

/// A copy of the fixture tokenizer.json with `config` beside it.
fn with_config(tag: &str, config: serde_json::Value) -> (TempDir, Tokenizer) {
    let dir = TempDir::new(tag);
    dir.write("tokenizer.json", &tiny_json().to_string());
    dir.write("tokenizer_config.json", &config.to_string());
    let tok = Tokenizer::from_path(tag, dir.path(), &TokenizerOptions::default()).expect("load");
    (dir, tok)
}

#[test]
fn loads_directory_with_config_and_jinja_template() {
    let tok = tiny();
    assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(tok.eos_token(), Some("<|eot_id|>"));
    assert!(tok.chat_template().is_some());
    assert_eq!(tok.name(), "tiny");
}

#[test]
fn completion_adds_bos_like_the_post_processor() {
    let tok = tiny();
    let ids = tok.encode_completion("Hello world").unwrap();
    assert_eq!(ids[0], BOS);
    assert_eq!(ids, tok.encode_uncached("Hello world", true).unwrap());
    assert_eq!(
        &ids[1..],
        tok.encode_uncached("Hello world", false).unwrap()
    );
    assert_eq!(tok.encode_completion("").unwrap(), vec![BOS]);
    // Special-token strings in a prompt are special tokens, as in vLLM.
    let ids = tok.encode_completion("a<|eot_id|>b").unwrap();
    assert!(ids.contains(&EOT), "{ids:?}");
}

#[test]
fn chat_is_rendered_once_with_bos_and_not_post_processed_again() {
    let tok = tiny();
    let msgs = [
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "Hi"}),
    ];
    let text = tok.render_chat(&msgs, &ChatOptions::default()).unwrap();
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let ids = tok.encode_chat(&msgs, &ChatOptions::default()).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == BOS).count(), 1);
    assert_eq!(ids, tok.encode_uncached(&text, false).unwrap());
}

#[test]
fn explicit_add_bos_eos_flags_replace_the_post_processor() {
    let (_d, no_bos) = with_config(
        "nobos",
        json!({"bos_token": "<|begin_of_text|>", "add_bos_token": false}),
    );
    assert_eq!(
        no_bos.encode_completion("Hi").unwrap(),
        no_bos.encode_uncached("Hi", false).unwrap()
    );
    // transformers v5: add_eos_token alone means add_bos_token=false.
    let (_d, eos) = with_config(
        "eos",
        json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_eos_token": true}),
    );
    let ids = eos.encode_completion("Hi").unwrap();
    assert_eq!(
        ids.first(),
        eos.encode_uncached("Hi", false).unwrap().first()
    );
    assert_eq!(ids.last(), Some(&EOT));
    let (_d, both) = with_config(
        "both",
        json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": true, "add_eos_token": true}),
    );
    let ids = both.encode_completion("Hi").unwrap();
    assert_eq!((ids[0], ids[ids.len() - 1]), (BOS, EOT));
    assert_eq!(ids, both.encode_uncached("Hi", true).unwrap());
    let bad = TempDir::new("badbos");
    bad.write("tokenizer.json", &tiny_json().to_string());
    bad.write(
        "tokenizer_config.json",
        r#"{"bos_token": "<nope>", "add_bos_token": true}"#,
    );
    assert!(matches!(
        Tokenizer::from_path("x", bad.path(), &TokenizerOptions::default()),
        Err(TokensError::Config { .. })
    ));
}

#[test]
fn chat_template_list_picks_default_and_file_path_reads_sibling_config() {
    let (dir, tok) = with_config(
        "list",
        json!({"bos_token": "<|begin_of_text|>", "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}]}),
    );
    let msgs = [json!({"role": "user", "content": "x"})];
    assert_eq!(
        tok.render_chat(&msgs, &ChatOptions::default()).unwrap(),
        "<|begin_of_text|>x"
    );
    let by_file = Tokenizer::from_path(
        "f",
        &dir.path().join("tokenizer.json"),
        &TokenizerOptions::default(),
    )
    .unwrap();
    assert!(by_file.chat_template().is_some());
}

#[test]
fn missing_pieces_are_typed_errors() {
    let dir = TempDir::new("missing");
    assert!(matches!(
        Tokenizer::from_path("m", dir.path(), &TokenizerOptions::default()),
        Err(TokensError::NotFound(_))
    ));
    dir.write("tokenizer.json", "{not json");
    assert!(matches!(
        Tokenizer::from_path("m", dir.path(), &TokenizerOptions::default()),
        Err(TokensError::Load { .. })
    ));
    let (_d, no_chat) = with_config("nochat", json!({}));
    let msgs = [json!({"role": "user", "content": "x"})];
    assert!(matches!(
        no_chat.encode_chat(&msgs, &ChatOptions::default()),
        Err(TokensError::NoChatTemplate(_))
    ));
    let bad_cfg = TempDir::new("badcfg");
    bad_cfg.write("tokenizer.json", &tiny_json().to_string());
    bad_cfg.write("tokenizer_config.json", "[1, 2]");
    assert!(matches!(
        Tokenizer::from_path("m", bad_cfg.path(), &TokenizerOptions::default()),
        Err(TokensError::Config { .. })
    ));
}

#[test]
fn truncation_in_tokenizer_json_is_ignored() {
    let mut json = tiny_json();
    json["truncation"] =
        json!({"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0});
    let dir = TempDir::new("trunc");
    dir.write("tokenizer.json", &json.to_string());
    let tok = Tokenizer::from_path("t", dir.path(), &TokenizerOptions::default()).unwrap();
    assert!(
        tok.encode_completion("one two three four five six")
            .unwrap()
            .len()
            > 3
    );
}
