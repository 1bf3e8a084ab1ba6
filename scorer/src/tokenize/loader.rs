//! Every tokenizer load of the process on one long-lived thread that never
//! tokenizes.
//!
//! Why: loading a `tokenizer.json` (Llama 3: 9 MB of JSON, 128k merges)
//! allocates and frees a lot, which leaves glibc's malloc arena of the
//! loading thread fragmented. A thread that later tokenizes with that arena
//! spent ~35% more CPU per cold prompt, mostly in `_int_free` /
//! `unlink_chunk` (measured: a 3,224-block prompt 45 ms -> 61 ms p50 when
//! the pool thread that tokenized had also loaded; docs/benchmarks-history.md). A loading
//! thread that exits does not help either: glibc hands its arena to the next
//! new thread, often a pool thread. So loads go to this thread, which lives
//! as long as its [`Loader`] (dropping the loader closes the channel and
//! the thread ends).

use kvroute_tokens::{Tokenizer, TokenizerRegistry, TokensError};
use std::sync::Arc;
use std::sync::mpsc;

type Loaded = Result<Arc<Tokenizer>, TokensError>;

enum Job {
    One(String, mpsc::SyncSender<Loaded>),
    Preload(tokio::sync::oneshot::Sender<Vec<(String, Loaded)>>),
}

/// See the module doc.
pub struct Loader {
    registry: Arc<TokenizerRegistry>,
    /// `None` when the thread could not be started: loads then run on the
    /// caller's thread (correct, only slower afterwards).
    jobs: Option<mpsc::Sender<Job>>,
}

impl Loader {
    pub fn new(registry: Arc<TokenizerRegistry>) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let reg = registry.clone();
        let started = std::thread::Builder::new()
            .name("tokenizer-load".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::One(model, reply) => {
                            let _ = reply.send(reg.get(&model));
                        }
                        Job::Preload(reply) => {
                            let _ = reply.send(reg.preload());
                        }
                    }
                }
                tracing::debug!("tokenizer loader stopped: its owner was dropped");
            });
        let jobs = match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "no tokenizer loader thread: loading on the pool");
                None
            }
        };
        Loader { registry, jobs }
    }

    /// `model`'s tokenizer, loaded on the loader thread if it is not yet;
    /// blocks the calling (pool) thread until then.
    pub fn get(&self, model: &str) -> Loaded {
        if let Some(Ok(t)) = self.registry.get_loaded(model) {
            return Ok(t);
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job::One(model.to_string(), reply)).is_ok());
        match sent.then(|| answer.recv().ok()).flatten() {
            Some(loaded) => loaded,
            None => self.registry.get(model),
        }
    }

    /// Loads every explicitly configured model ([`TokenizerRegistry::preload`])
    /// on the loader thread.
    pub async fn preload(&self) -> Vec<(String, Loaded)> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job::Preload(reply)).is_ok());
        if sent && let Ok(loaded) = answer.await {
            return loaded;
        }
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.preload())
            .await
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_tokens::TokenizerOptions;

    #[tokio::test]
    async fn loads_on_its_thread_once_and_reports_unknown_models() {
        let tiny = kvroute_testkit::test_env::testdata("tokens/tiny");
        let registry = Arc::new(TokenizerRegistry::new(
            [("tiny".to_string(), tiny)],
            vec![],
            TokenizerOptions::default(),
        ));
        let loader = Loader::new(registry.clone());
        let preloaded = loader.preload().await;
        assert_eq!(preloaded.len(), 1);
        assert!(preloaded[0].1.is_ok());
        let first = loader.get("tiny").expect("tiny");
        let again = registry.get_loaded("tiny").expect("loaded").expect("ok");
        assert!(Arc::ptr_eq(&first, &again));
        assert!(matches!(
            loader.get("unknown"),
            Err(TokensError::UnknownModel(_))
        ));
    }
}
