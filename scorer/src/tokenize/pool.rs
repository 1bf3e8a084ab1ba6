//! A bounded pool for CPU-heavy work (tokenizing a cold prompt: ~30-45 ms
//! for 2048 blocks) that must not run on the async workers, where it would
//! stall every other ext_proc stream the worker serves.
//!
//! Jobs run on tokio's blocking threads (`spawn_blocking`), at most
//! `threads` at a time (a semaphore: tokio's own blocking pool allows 512
//! threads, far more than the cores tokenizing can use). At most `queue`
//! jobs wait for a thread; one more is refused at once. A job that waits
//! or runs past the deadline is abandoned by its caller, who routes by
//! load: an overloaded scorer answers late requests quickly instead of
//! queueing them behind each other. An abandoned job that already runs
//! keeps its thread until it finishes (threads cannot be cancelled); its
//! result still lands in the tokenizer and key caches, so a retry is warm.

use crate::reason::Fallback;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Why a job's result was not had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// `queue` jobs were already waiting for a thread.
    #[error("tokenization pool queue is full")]
    QueueFull,
    /// No thread became free before the deadline.
    #[error("no tokenization thread free before the deadline")]
    QueueTimeout,
    /// The job started but did not finish before the deadline.
    #[error("tokenization did not finish before the deadline")]
    Timeout,
    /// The job panicked (a bug; logged by tokio).
    #[error("tokenization job panicked")]
    Panicked,
}

impl PoolError {
    /// The routing fallback reason.
    pub fn reason(self) -> Fallback {
        match self {
            PoolError::QueueFull | PoolError::QueueTimeout => Fallback::TokenizeOverloaded,
            PoolError::Timeout => Fallback::TokenizeTimeout,
            PoolError::Panicked => Fallback::TokenizeError,
        }
    }
}

/// Sizes and deadline of a [`BlockingPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Jobs running at once (0: one per available core).
    pub threads: usize,
    /// Jobs waiting for a thread before more are refused.
    pub queue: usize,
    /// Wait plus run time after which the caller gives up.
    pub deadline: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            threads: 0,
            queue: 64,
            // A cold 2048-block prompt takes 30-45 ms: room for a few in the
            // queue ahead of it, and still a fraction of the prefill time a
            // prefix hit saves on such a prompt.
            deadline: Duration::from_millis(250),
        }
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct BlockingPool {
    /// One permit per thread allowed to run a job.
    permits: Arc<Semaphore>,
    threads: usize,
    /// Jobs waiting for a permit (not counting running ones).
    waiting: AtomicUsize,
    queue: usize,
    deadline: Duration,
}

impl BlockingPool {
    pub fn new(config: PoolConfig) -> Self {
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        BlockingPool {
            permits: Arc::new(Semaphore::new(threads)),
            threads,
            waiting: AtomicUsize::new(0),
            queue: config.queue,
            deadline: config.deadline,
        }
    }

    /// Jobs allowed to run at once.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Jobs running now (abandoned ones included, until they end).
    pub fn running(&self) -> usize {
        self.threads - self.permits.available_permits()
    }

    /// Runs `job` on a blocking thread and waits for it, within the deadline.
    pub async fn run<T, F>(&self, job: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let started = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let _waiting = Waiting::enter(&self.waiting, self.queue)?;
                tokio::time::timeout(self.deadline, self.permits.clone().acquire_owned())
                    .await
                    .map_err(|_| PoolError::QueueTimeout)?
                    // The semaphore is never closed.
                    .map_err(|_| PoolError::QueueTimeout)?
            }
        };
        let handle = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        });
        let left = self.deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, handle).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(_)) => Err(PoolError::Panicked),
            Err(_) => Err(PoolError::Timeout),
        }
    }
}

/// Counts a job waiting for a permit while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(waiting: &'a AtomicUsize, bound: usize) -> Result<Self, PoolError> {
        if waiting.fetch_add(1, Ordering::AcqRel) >= bound {
            waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(PoolError::QueueFull);
        }
        Ok(Waiting(waiting))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn pool(threads: usize, queue: usize, deadline_ms: u64) -> Arc<BlockingPool> {
        Arc::new(BlockingPool::new(PoolConfig {
            threads,
            queue,
            deadline: Duration::from_millis(deadline_ms),
        }))
    }

    /// A job that blocks its thread until released (a stand-in for a slow
    /// tokenization whose length the test controls).
    fn gate() -> (mpsc::Sender<()>, impl FnOnce() -> u32 + Send + 'static) {
        let (tx, rx) = mpsc::channel::<()>();
        (tx, move || {
            let _ = rx.recv();
            7
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_job_leaves_the_runtime_free() {
        let p = pool(1, 4, 10_000);
        let (release, job) = gate();
        let slow = tokio::spawn({
            let p = p.clone();
            async move { p.run(job).await }
        });
        // The only runtime thread keeps serving other tasks meanwhile.
        for i in 0..20u32 {
            let quick = tokio::spawn(async move { i * 2 }).await.expect("task");
            assert_eq!(quick, i * 2);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(!slow.is_finished());
        release.send(()).expect("release");
        assert_eq!(slow.await.expect("task"), Ok(7));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn full_queue_and_deadlines_refuse_instead_of_waiting() {
        let p = pool(1, 1, 100);
        let (release, job) = gate();
        let first = tokio::spawn({
            let p = p.clone();
            async move { p.run(job).await }
        });
        tokio::task::yield_now().await;
        // One waits for the thread (the queue holds one) ...
        let second = tokio::spawn({
            let p = p.clone();
            async move { p.run(|| 1).await }
        });
        tokio::task::yield_now().await;
        // ... so a third is refused at once.
        let started = Instant::now();
        assert_eq!(p.run(|| 2).await, Err(PoolError::QueueFull));
        assert!(started.elapsed() < Duration::from_millis(50));
        // The waiting one gives up at the deadline, the running one too.
        assert_eq!(second.await.expect("task"), Err(PoolError::QueueTimeout));
        assert_eq!(first.await.expect("task"), Err(PoolError::Timeout));
        assert_eq!(
            PoolError::QueueFull.reason().as_label(),
            "tokenize_overloaded"
        );
        assert_eq!(PoolError::Timeout.reason().as_label(), "tokenize_timeout");
        // The abandoned job still holds its thread until it ends.
        assert_eq!(p.run(|| 3).await, Err(PoolError::QueueTimeout));
        assert_eq!(p.running(), 1);
        release.send(()).expect("release");
        while p.running() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(p.run(|| 4).await, Ok(4));
    }
}
