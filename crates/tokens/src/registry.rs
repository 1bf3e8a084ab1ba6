//! Model name -> tokenizer, loaded lazily and once.
//!
//! Sources, in order: explicit `--tokenizer MODEL=PATH` pairs (PATH is a
//! `tokenizer.json` or a directory holding it), then each models directory,
//! where `<org>/<name>` is found either as a plain `<dir>/<org>/<name>/` or in
//! the Hugging Face cache layout
//! `<dir>[/hub]/models--<org>--<name>/snapshots/<rev>/` (the revision
//! `refs/main` names, else the newest snapshot holding a `tokenizer.json`).
//!
//! Loading parses the whole `tokenizer.json` (Llama 3: 9 MB, 128k merges)
//! and takes a noticeable fraction of a second, so it happens once: the first
//! request for a model (or [`TokenizerRegistry::preload`] at startup) pays it
//! and concurrent first requests wait for that same load. A failed load is remembered (the files do not
//! change between requests); a name that matches nothing is not, so request
//! traffic with arbitrary model names cannot grow the map.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::TokensError;
use super::tokenizer::{Tokenizer, TokenizerOptions};

/// Where a located model loads from, and the outcome of its one load.
type Slot = Arc<(PathBuf, OnceLock<Result<Arc<Tokenizer>, Arc<TokensError>>>)>;

/// See the module doc.
#[derive(Debug)]
pub struct TokenizerRegistry {
    explicit: HashMap<String, PathBuf>,
    model_dirs: Vec<PathBuf>,
    opts: TokenizerOptions,
    /// One slot per located model; the lock is held only to find the slot,
    /// never during a load.
    loaded: Mutex<HashMap<String, Slot>>,
}

impl TokenizerRegistry {
    /// `explicit`: `(model, path)` pairs (see [`parse_tokenizer_arg`]);
    /// `model_dirs`: directories searched for other models.
    pub fn new(
        explicit: impl IntoIterator<Item = (String, PathBuf)>,
        model_dirs: Vec<PathBuf>,
        opts: TokenizerOptions,
    ) -> Self {
        Self {
            explicit: explicit.into_iter().collect(),
            model_dirs,
            opts,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// Where `model`'s tokenizer would be loaded from, if anywhere.
    pub fn locate(&self, model: &str) -> Option<PathBuf> {
        if let Some(p) = self.explicit.get(model) {
            return Some(p.clone());
        }
        self.model_dirs
            .iter()
            .find_map(|dir| resolve_model_dir(dir, model))
    }

    /// The tokenizer for `model`, loading it on first use.
    pub fn get(&self, model: &str) -> Result<Arc<Tokenizer>, TokensError> {
        let existing = self.loaded.lock().get(model).cloned();
        let slot = match existing {
            Some(slot) => slot,
            None => {
                // Located outside the lock: a few stat calls.
                let path = self
                    .locate(model)
                    .ok_or_else(|| TokensError::UnknownModel(model.to_string()))?;
                let mut map = self.loaded.lock();
                map.entry(model.to_string())
                    .or_insert_with(|| Arc::new((path, OnceLock::new())))
                    .clone()
            }
        };
        let (path, once) = &*slot;
        // Outside the map lock; racing callers wait for this one load.
        let loaded = once.get_or_init(|| {
            Tokenizer::from_path(model, path, &self.opts)
                .map(Arc::new)
                .map_err(|e| {
                    tracing::warn!(model, path = %path.display(), error = %e, "tokenizer failed to load");
                    Arc::new(e)
                })
        });
        match loaded {
            Ok(t) => Ok(t.clone()),
            Err(e) => Err(TokensError::ModelLoad {
                model: model.to_string(),
                source: e.clone(),
            }),
        }
    }

    /// The tokenizer for `model` if it is already loaded (or its load
    /// already failed), without touching the disk: `None` when the model was
    /// never asked for or is still loading. Lets a caller on an async thread
    /// avoid the seconds a first load can take.
    pub fn get_loaded(&self, model: &str) -> Option<Result<Arc<Tokenizer>, TokensError>> {
        let slot = self.loaded.lock().get(model).cloned()?;
        match slot.1.get()? {
            Ok(t) => Some(Ok(t.clone())),
            Err(e) => Some(Err(TokensError::ModelLoad {
                model: model.to_string(),
                source: e.clone(),
            })),
        }
    }

    /// Loads every explicitly configured model now, so that the first
    /// request does not pay for it and a broken path is reported at startup.
    pub fn preload(&self) -> Vec<(String, Result<Arc<Tokenizer>, TokensError>)> {
        let mut names: Vec<&String> = self.explicit.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|m| (m.clone(), self.get(m)))
            .collect()
    }

    /// Names of the models loaded so far (successfully or not).
    pub fn loaded_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self.loaded.lock().keys().cloned().collect();
        names.sort();
        names
    }
}

/// Parses `MODEL=PATH` (a clap `value_parser`). The model name may itself
/// contain `=`-free `org/name`; the path is everything after the first `=`.
pub fn parse_tokenizer_arg(arg: &str) -> Result<(String, PathBuf), TokensError> {
    match arg.split_once('=') {
        Some((model, path)) if !model.trim().is_empty() && !path.trim().is_empty() => {
            Ok((model.trim().to_string(), PathBuf::from(path.trim())))
        }
        _ => Err(TokensError::BadArg(arg.to_string())),
    }
}

/// Finds `model` (`org/name` or `name`) under `root`: plain `root/org/name/`,
/// or the Hugging Face cache `root[/hub]/models--org--name/snapshots/<rev>/`.
/// Returns the directory holding `tokenizer.json`. Names with `..`, a root or
/// a drive are rejected: they come from requests.
pub fn resolve_model_dir(root: &Path, model: &str) -> Option<PathBuf> {
    let rel = Path::new(model);
    if model.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    let has_tokenizer = |d: &Path| d.join("tokenizer.json").is_file();
    let plain = root.join(rel);
    if has_tokenizer(&plain) {
        return Some(plain);
    }
    let cache_name = format!("models--{}", model.replace('/', "--"));
    [root.join(&cache_name), root.join("hub").join(&cache_name)]
        .into_iter()
        .filter(|d| d.is_dir())
        .find_map(|repo| hf_snapshot(&repo, &has_tokenizer))
}

/// The snapshot `refs/main` points to, else the newest one with a tokenizer.
fn hf_snapshot(repo: &Path, has_tokenizer: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let rev = rev.trim();
        let dir = snapshots.join(rev);
        if !rev.is_empty() && Path::new(rev).components().count() == 1 && has_tokenizer(&dir) {
            return Some(dir);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| has_tokenizer(p))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

#[cfg(test)]
mod tests;
