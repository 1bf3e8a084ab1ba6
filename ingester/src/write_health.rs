//! Readiness from the write path: the index wrapped so that every write's
//! outcome reaches `/readyz`.
//!
//! A PING answering is not the same as the index taking writes: a Redis out
//! of memory (`maxmemory` with `noeviction`), a read-only replica after a
//! failover, or a script error all answer PING and refuse every write. While
//! writes fail the workers hold operations (bounded) and then shed whole
//! pods, so the index drifts from the fleet: an orchestrator and an operator
//! should see that as "not ready". The check fails after
//! [`FAILED_WRITES_UNREADY`] failed writes in a row and passes again at the
//! first write that succeeds (the workers retry on a backoff, so recovery is
//! seen within the retry delay once Redis takes writes again).
//!
//! Wrapping the index rather than hooking the worker keeps the worker's
//! write path untouched: every write, however many are in flight, goes
//! through [`Index::apply`].

use kvroute_core::ids::{BlockKey, ModelName, PodId};
use kvroute_core::index::{Index, IndexError, IndexOp, Lookup};
use kvroute_service::health::Check;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Failed writes in a row that make the ingester unready. More than one, so
/// a single timeout or a failover blip does not flap readiness; few, because
/// the workers back off (50 ms doubling), so three failures take well under
/// a second.
pub const FAILED_WRITES_UNREADY: u64 = 3;

/// The index, with each write's outcome reported to a readiness check.
pub struct WatchedIndex<I> {
    inner: Arc<I>,
    check: Check,
    /// Failed writes since the last success, over every worker.
    failed_in_a_row: AtomicU64,
}

impl<I> WatchedIndex<I> {
    /// Wraps `inner`; `check` starts passing (no write has failed yet).
    pub fn new(inner: Arc<I>, check: Check) -> Self {
        check.pass();
        WatchedIndex {
            inner,
            check,
            failed_in_a_row: AtomicU64::new(0),
        }
    }

    /// Failed writes since the last success.
    pub fn failed_in_a_row(&self) -> u64 {
        self.failed_in_a_row.load(Relaxed)
    }

    fn record(&self, result: &Result<(), IndexError>) {
        match result {
            Ok(()) => {
                if self.failed_in_a_row.swap(0, Relaxed) > 0 || !self.check.get() {
                    self.check.pass();
                }
            }
            Err(e) => {
                let n = self.failed_in_a_row.fetch_add(1, Relaxed) + 1;
                if n >= FAILED_WRITES_UNREADY {
                    self.check
                        .fail(format!("the last {n} index writes failed ({e})"));
                }
            }
        }
    }
}

impl<I: Index> Index for WatchedIndex<I> {
    async fn apply(&self, ops: &[IndexOp]) -> Result<(), IndexError> {
        let result = self.inner.apply(ops).await;
        self.record(&result);
        result
    }

    async fn lookup(
        &self,
        model: &ModelName,
        keys: &[BlockKey],
        candidates: Option<&[PodId]>,
    ) -> Result<Lookup, IndexError> {
        self.inner.lookup(model, keys, candidates).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Flaky;
    use kvroute_service::health::Readiness;

    #[tokio::test]
    async fn unready_after_failed_writes_in_a_row_ready_at_the_first_success() {
        let readiness = Readiness::default();
        let inner = Arc::new(Flaky::new(100, true));
        let w = WatchedIndex::new(inner.clone(), readiness.check("writes"));
        assert!(readiness.report().0);
        for _ in 0..FAILED_WRITES_UNREADY - 1 {
            assert!(w.apply(&[]).await.is_err());
        }
        assert!(readiness.report().0, "one blip is not unready");
        assert!(w.apply(&[]).await.is_err());
        let (ok, text) = readiness.report();
        assert!(!ok);
        assert!(
            text.starts_with("writes: failing: the last 3 index writes failed"),
            "{text}"
        );
        inner.set_down(false);
        assert!(w.apply(&[]).await.is_ok());
        assert_eq!(readiness.report(), (true, "writes: ok\n".into()));
        assert_eq!(w.failed_in_a_row(), 0);
    }
}
