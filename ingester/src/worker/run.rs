//! The worker's task: take commands from its queue, turn batches into
//! pending operations, keep index writes going, and drain on shutdown.
//!
//! One `select!` waits for whichever comes first: a command (only while the
//! write stage can take more, see [`crate::writes::Writes::can_accept`]), a
//! write finishing, a gap replay finishing (`worker/gaps.rs`), or the end of
//! a failed write's backoff. After each, the
//! writes that can start are started, so keying the next batches overlaps
//! the writes of earlier ones.

use super::{Replayer, Worker};
use crate::socket::RawBatch;
use kvroute_core::ids::PodId;
use kvroute_core::index::Index;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What a worker is asked to do, in order with the batches.
#[derive(Debug)]
pub enum Command {
    /// A batch, with its share of the pipeline's queued-bytes budget
    /// (released once the worker has decoded it).
    Batch(RawBatch, Option<tokio::sync::OwnedSemaphorePermit>),
    /// Forget everything of a pod (admin purge, pod gone).
    Purge(PodId),
    /// Batches of `topic` from sequence `from` on were dropped before they
    /// reached the worker (the startup buffer was full): a gap.
    Missed { topic: String, from: u64 },
    /// Redis lost or rewound data: clear every pod heard and rebuild it
    /// (see `Worker::resync`).
    Resync(super::Resync),
}

/// Commands drained from the queue before the next writes start: whatever
/// queued meanwhile goes into the same index writes.
const DRAIN_BATCHES: usize = 256;

impl<I: Index + 'static, R: Replayer + 'static> Worker<I, R> {
    /// Runs worker `id` until its queue closes, then writes what is left
    /// within `drain_timeout`.
    pub async fn run(
        mut self,
        id: usize,
        mut rx: mpsc::Receiver<Command>,
        drain_timeout: Duration,
    ) {
        loop {
            let retry = self.writes.retry_at().map(Instant::from_std);
            let idle = self.writes.in_flight() == 0;
            tokio::select! {
                cmd = rx.recv(), if self.writes.can_accept() => {
                    let Some(cmd) = cmd else { break };
                    self.took();
                    self.apply(cmd).await;
                    // Opportunistic batching: whatever queued meanwhile goes
                    // into the same index writes.
                    for _ in 0..DRAIN_BATCHES {
                        match rx.try_recv() {
                            Ok(cmd) => {
                                self.took();
                                self.apply(cmd).await;
                            }
                            Err(_) => break,
                        }
                    }
                    self.publish_depth();
                    self.start_writes().await;
                }
                Some(done) = self.gaps.next_done(), if self.gaps.any_running() => {
                    self.replay_done(done);
                    self.start_writes().await;
                }
                Some(done) = self.writes.next_done(), if !idle => {
                    self.writes.complete(done);
                    self.start_writes().await;
                }
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() && idle => {
                    self.start_writes().await;
                }
            }
        }
        self.drain(id, drain_timeout).await;
    }

    /// One command left the queue: the pipeline's depth and progress.
    fn took(&self) {
        if let Some((stats, id)) = &self.pulse {
            stats.took(*id);
        }
    }

    /// Sets the queue-depth gauge after a drain, so it reads true when the
    /// workers catch up (not only when the dispatcher adds).
    fn publish_depth(&self) {
        if let Some((stats, _)) = &self.pulse {
            stats.publish_depth();
        }
    }

    async fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Batch(msg, _budget) => self.handle(msg).await,
            Command::Purge(pod) => self.purge(&pod),
            Command::Missed { topic, from } => self.note_missed(topic, from),
            Command::Resync(r) => self.resync(r),
        }
    }

    /// Starts the writes that can start; once every write is done and that
    /// included the clear of a shed pod, first asks the pod's replay socket
    /// for what it still buffers (see `worker/rebuild.rs`), which queues more.
    async fn start_writes(&mut self) {
        if self.rebuild_due() {
            self.rebuild_from_replay().await;
        }
        self.writes.launch();
    }

    /// Queue closed (shutdown): writes what is left, retrying until the
    /// grace period ends.
    async fn drain(&mut self, id: usize, drain_timeout: Duration) {
        let deadline = Instant::now() + drain_timeout;
        self.finish_replays(deadline).await;
        while self.writes.unwritten() > 0 && Instant::now() < deadline {
            self.writes.launch();
            if self.writes.in_flight() > 0 {
                if let Ok(Some(done)) =
                    tokio::time::timeout_at(deadline, self.writes.next_done()).await
                {
                    self.writes.complete(done);
                }
            } else {
                let next = self
                    .writes
                    .retry_at()
                    .map(Instant::from_std)
                    .unwrap_or_else(Instant::now);
                tokio::time::sleep_until(next.min(deadline)).await;
            }
        }
        if self.writes.unwritten() > 0 {
            tracing::warn!(
                worker = id,
                lost = self.writes.unwritten(),
                "shutdown grace period ended with unwritten operations"
            );
        } else {
            tracing::debug!(worker = id, "worker drained");
        }
    }
}
