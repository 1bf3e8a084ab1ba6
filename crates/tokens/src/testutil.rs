//! Helpers for the unit tests of `tokens`: the small fixture tokenizer and
//! throwaway directories.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// `testdata/tokens/tiny`: a 393-token byte-level BPE with the
/// Llama 3 pre-tokenizer regex and special tokens, a BOS post-processor, a
/// `tokenizer_config.json` and the fixture `chat_template.jinja`.
pub(crate) fn tiny_dir() -> PathBuf {
    kvroute_testkit::test_env::testdata("tokens/tiny")
}

/// The fixture's `tokenizer.json` as JSON, for tests that alter it.
pub(crate) fn tiny_json() -> serde_json::Value {
    let text = std::fs::read_to_string(tiny_dir().join("tokenizer.json")).expect("fixture");
    serde_json::from_str(&text).expect("fixture json")
}

/// A directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kvroute-tokens-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `rel` (creating parents) and returns its path.
    pub(crate) fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let p = self.0.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("parent dir");
        }
        std::fs::write(&p, contents).expect("write");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
