//! Stage wiring after the sockets: a dispatcher ([`run_dispatcher`]) shards
//! messages by FNV-1a of their topic onto ordering workers (so one pod's
//! batches stay in order without cross-worker locks), each worker
//! ([`Worker::run`]) drains what has queued up into index writes (several in flight, never two for one pod: `writes.rs`) and
//! keeps keying the next batches meanwhile, and shutdown drains the queues
//! within a grace period.
//!
//! Every queue is bounded: when Redis is slow the workers fall behind (their
//! writes in flight and the operations waiting behind them reach their
//! bounds, and a worker stops taking batches), their queues fill, the
//! dispatcher waits, the socket stops reading and ZeroMQ's high-water mark
//! applies; the sequence numbers then show any loss as a gap, which replay
//! refills.

use crate::metrics as m;
use crate::socket::RawBatch;
pub use crate::worker::Command;
use crate::worker::{Replayer, Worker};
use kvroute_core::ids::PodId;
use kvroute_core::index::Index;
use kvroute_service::health::Check;
use std::hash::Hasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The worker index for a topic: FNV-1a, stable across restarts and replicas.
pub fn shard(topic: &str, workers: usize) -> usize {
    let mut h = fnv::FnvHasher::default();
    h.write(topic.as_bytes());
    (h.finish() % workers.max(1) as u64) as usize
}

/// What the pipeline shares between the dispatcher, the workers and the
/// monitor: per-worker queue depth and progress, and whether the dispatcher
/// is waiting on a full queue. Atomics only, updated once per command.
///
/// Why: the queue-depth gauge used to be set by the dispatcher alone, so it
/// kept its last value (1,039 on an idle ingester) once the workers drained;
/// and a stalled worker (a replay awaited inline, before `worker/gaps.rs`)
/// blocked the dispatcher with `/readyz` still 200.
#[derive(Debug)]
pub struct PipelineStats {
    epoch: Instant,
    /// Commands queued per worker: +1 before the dispatcher sends, -1 when the
    /// worker takes one (or the send failed).
    queued: Vec<AtomicI64>,
    /// When each worker last took a command (ms since `epoch`).
    taken_at: Vec<AtomicU64>,
    /// Since when the dispatcher waits on a full queue (ms since `epoch`,
    /// plus one; 0: not waiting), and on which worker.
    blocked_since: AtomicU64,
    blocked_on: AtomicU64,
}

impl PipelineStats {
    pub fn new(workers: usize) -> Self {
        PipelineStats {
            epoch: Instant::now(),
            queued: (0..workers).map(|_| AtomicI64::new(0)).collect(),
            taken_at: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            blocked_since: AtomicU64::new(0),
            blocked_on: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Worker `id` took a command from its queue.
    pub fn took(&self, id: usize) {
        if let (Some(q), Some(t)) = (self.queued.get(id), self.taken_at.get(id)) {
            q.fetch_sub(1, Relaxed);
            t.store(self.now_ms(), Relaxed);
        }
    }

    /// Commands queued over all workers.
    pub fn depth(&self) -> u64 {
        self.queued
            .iter()
            .map(|q| q.load(Relaxed).max(0) as u64)
            .sum()
    }

    /// Sets `kvroute_ingester_queue_depth`.
    pub fn publish_depth(&self) {
        metrics::gauge!(m::QUEUE_DEPTH).set(self.depth() as f64);
    }

    /// Why the pipeline is stalled, if it is: the dispatcher has waited on a
    /// full queue for `after` or longer, or a worker with queued commands
    /// has taken none for that long.
    pub fn stalled(&self, after: Duration) -> Option<String> {
        let now = self.now_ms();
        let after_ms = after.as_millis() as u64;
        let since = self.blocked_since.load(Relaxed);
        if since > 0 && now.saturating_sub(since - 1) >= after_ms {
            let waited = Duration::from_millis(now.saturating_sub(since - 1));
            return Some(format!(
                "the dispatcher has waited {waited:?} on worker {}'s full queue",
                self.blocked_on.load(Relaxed)
            ));
        }
        for (id, (q, t)) in self.queued.iter().zip(&self.taken_at).enumerate() {
            let queued = q.load(Relaxed);
            let idle = now.saturating_sub(t.load(Relaxed));
            if queued > 0 && idle >= after_ms {
                return Some(format!(
                    "worker {id} has taken nothing for {:?} with {queued} commands queued",
                    Duration::from_millis(idle)
                ));
            }
        }
        None
    }
}

/// Keeps `kvroute_ingester_queue_depth` and the `pipeline` readiness check
/// current until `shutdown`: the check fails while [`PipelineStats::stalled`]
/// says so (after `stall_after`), with the reason.
pub fn spawn_monitor(
    stats: Arc<PipelineStats>,
    check: Check,
    stall_after: Duration,
    shutdown: CancellationToken,
) {
    check.pass();
    let tick = (stall_after / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
    tokio::spawn(async move {
        loop {
            stats.publish_depth();
            match stats.stalled(stall_after) {
                Some(why) => {
                    if check.get() {
                        tracing::warn!(reason = %why, "pipeline stalled: /readyz fails until it moves again");
                    }
                    check.fail(why);
                }
                None => {
                    if !check.get() {
                        tracing::info!("pipeline moving again");
                    }
                    check.pass();
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
            }
        }
    });
}

/// Handles to the running workers.
pub struct Workers {
    senders: Vec<mpsc::Sender<Command>>,
    tasks: JoinSet<()>,
    stats: Arc<PipelineStats>,
    /// Payload bytes the queues may hold together ([`Workers::limit_queued_bytes`]).
    budget: Option<(Arc<tokio::sync::Semaphore>, usize)>,
}

impl Workers {
    /// Starts one task per worker, each with a queue of `queue` commands.
    pub fn start<I, R>(workers: Vec<Worker<I, R>>, queue: usize, drain_timeout: Duration) -> Self
    where
        I: Index + 'static,
        R: Replayer + 'static,
    {
        let stats = Arc::new(PipelineStats::new(workers.len()));
        let mut senders = Vec::with_capacity(workers.len());
        let mut tasks = JoinSet::new();
        for (i, mut w) in workers.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(queue);
            senders.push(tx);
            w.pulse = Some((stats.clone(), i));
            tasks.spawn(w.run(i, rx, drain_timeout));
        }
        Workers {
            senders,
            tasks,
            stats,
            budget: None,
        }
    }

    /// Bounds the payload bytes queued over all workers: the queues bound
    /// batches by count (`--queue` each), and a batch may be as large as
    /// `--zmq-max-message-size`, so without this a burst of large batches
    /// could hold queue x workers x max-message bytes. Past the budget the
    /// dispatcher waits (counted as waiting on a full queue, so `/readyz`
    /// sees a stall), which pushes back on the sockets.
    pub fn limit_queued_bytes(mut self, bytes: usize) -> Self {
        let bytes = bytes.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self.budget = Some((Arc::new(tokio::sync::Semaphore::new(bytes)), bytes));
        self
    }

    /// Payload bytes queued now (0 without a budget).
    pub fn queued_bytes(&self) -> usize {
        self.budget
            .as_ref()
            .map_or(0, |(s, total)| total - s.available_permits())
    }

    /// The counters the monitor reads ([`spawn_monitor`]).
    pub fn stats(&self) -> Arc<PipelineStats> {
        self.stats.clone()
    }

    /// Routes a message to its worker, waiting while that queue is full
    /// (recorded, so `/readyz` can tell a stalled pipeline).
    /// Returns false once the workers are gone.
    pub async fn dispatch(&self, msg: RawBatch) -> bool {
        let i = shard(&msg.topic, self.senders.len());
        let permit = match &self.budget {
            None => None,
            Some((budget, total)) => {
                // A batch larger than the whole budget takes all of it.
                let want = msg.payload.len().clamp(1, *total) as u32;
                match budget.clone().try_acquire_many_owned(want) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        self.stats.blocked_on.store(i as u64, Relaxed);
                        self.stats
                            .blocked_since
                            .store(self.stats.now_ms() + 1, Relaxed);
                        let p = budget.clone().acquire_many_owned(want).await;
                        self.stats.blocked_since.store(0, Relaxed);
                        match p {
                            Ok(p) => Some(p),
                            Err(_) => return false,
                        }
                    }
                }
            }
        };
        send(
            &self.senders[i],
            &self.stats,
            i,
            Command::Batch(msg, permit),
            true,
        )
        .await
    }

    /// Tells the topic's worker that its batches from `from` on were dropped
    /// before reaching it (`crate::early`), so the next one is a gap.
    pub async fn missed(&self, topic: String, from: u64) {
        let i = shard(&topic, self.senders.len());
        let _ = self.senders[i].send(Command::Missed { topic, from }).await;
    }

    /// Purges a pod on every worker (each drops what it holds for the pod, in
    /// order with its batches, then clears it in the index).
    pub async fn purge(&self, pod: &PodId) {
        for (i, tx) in self.senders.iter().enumerate() {
            send(tx, &self.stats, i, Command::Purge(pod.clone()), false).await;
        }
    }

    /// A cheap handle for other tasks (admin API) to purge pods.
    pub fn purger(&self) -> Purger {
        Purger {
            senders: self.senders.iter().map(mpsc::Sender::downgrade).collect(),
            stats: self.stats.clone(),
        }
    }

    /// Queued commands over all workers (a gauge).
    pub fn queued(&self) -> usize {
        self.senders
            .iter()
            .map(|s| s.max_capacity() - s.capacity())
            .sum()
    }

    /// Closes the queues and waits for every worker to drain and flush.
    pub async fn shutdown(mut self) {
        self.senders.clear();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Sends purges to every worker; held by the admin API and the purge
/// sweeper. Weak senders: a handle still held somewhere must not keep the
/// queues open, or shutdown would wait forever for the workers to drain.
#[derive(Clone)]
pub struct Purger {
    senders: Vec<mpsc::WeakSender<Command>>,
    stats: Arc<PipelineStats>,
}

impl Purger {
    /// Asks every worker to clear and rebuild the pods it heard (Redis lost
    /// or rewound data: `crate::bookkeeping`); a no-op after shutdown.
    pub async fn resync(&self, resync: crate::worker::Resync) {
        for tx in &self.senders {
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(Command::Resync(resync)).await;
            }
        }
    }

    /// Purges on every worker; a no-op once the workers shut down.
    pub async fn purge(&self, pod: &PodId) {
        for (i, tx) in self.senders.iter().enumerate() {
            if let Some(tx) = tx.upgrade() {
                send(&tx, &self.stats, i, Command::Purge(pod.clone()), false).await;
            }
        }
    }
}

/// Sends one command to worker `i`, counting it queued; the dispatcher's
/// sends (`watch`) record how long they wait on a full queue.
async fn send(
    tx: &mpsc::Sender<Command>,
    stats: &PipelineStats,
    i: usize,
    cmd: Command,
    watch: bool,
) -> bool {
    let Some(q) = stats.queued.get(i) else {
        return false;
    };
    q.fetch_add(1, Relaxed);
    let sent = match tx.try_send(cmd) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(cmd)) => {
            if watch {
                stats.blocked_on.store(i as u64, Relaxed);
                stats.blocked_since.store(stats.now_ms() + 1, Relaxed);
            }
            let sent = tx.send(cmd).await.is_ok();
            if watch {
                stats.blocked_since.store(0, Relaxed);
            }
            sent
        }
    };
    if !sent {
        q.fetch_sub(1, Relaxed);
    }
    sent
}

/// The dispatcher: routes every batch the sockets deliver to its worker
/// (waiting while that worker's queue is full, which is what pushes back on
/// the sockets) until the sockets stop and the channel has drained, or the
/// workers are gone. The topic is not parsed here: the worker parses it once
/// and shards need only its bytes.
pub async fn run_dispatcher(mut batches: mpsc::Receiver<RawBatch>, workers: &Workers) {
    while let Some(batch) = batches.recv().await {
        if !workers.dispatch(batch).await {
            break;
        }
        workers.stats.publish_depth();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keyer;
    use crate::testing::{scheme, stored};
    use crate::worker::{NoReplay, WorkerConfig};
    use crate::writes::BACKLOG_OPS;
    use kvroute_core::events::{Encoding, EventBatch, encode_batch};
    use kvroute_core::ids::{BlockKey, ModelName};
    use kvroute_core::index::memory::MemoryIndex;
    use kvroute_core::index::{IndexError, IndexOp, Lookup};
    use kvroute_service::health::Readiness;
    use std::sync::atomic::AtomicBool;

    /// The memory index behind a gate: writes wait until it opens (a Redis
    /// that accepted the connection and answers nothing).
    struct Gate {
        open: AtomicBool,
        started: std::sync::atomic::AtomicUsize,
        opened: tokio::sync::Notify,
        inner: MemoryIndex,
    }

    impl Index for Gate {
        async fn apply(&self, ops: &[IndexOp]) -> Result<(), IndexError> {
            self.started.fetch_add(1, Relaxed);
            while !self.open.load(Relaxed) {
                let wait = self.opened.notified();
                if self.open.load(Relaxed) {
                    break;
                }
                wait.await;
            }
            self.inner.apply(ops).await
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

    /// A gate whose writes wait until it is opened.
    fn closed_gate() -> Arc<Gate> {
        Arc::new(Gate {
            open: AtomicBool::new(false),
            started: std::sync::atomic::AtomicUsize::new(0),
            opened: tokio::sync::Notify::new(),
            inner: MemoryIndex::new(100_000),
        })
    }

    /// Batch `seq` of one pod: `n` stores of one 4-token block each.
    fn stored_batch(seq: u64, n: u32) -> RawBatch {
        let base = seq as u32 * 100_000;
        let events = (0..n)
            .map(|i| {
                let t = base + i * 4;
                stored(&[t, t + 1, t + 2, t + 3])
            })
            .collect();
        let payload = encode_batch(
            &EventBatch {
                ts: 0.0,
                events,
                data_parallel_rank: None,
            },
            Encoding::Map,
        );
        RawBatch::new("kv@127.0.0.11:8000@m", seq, payload, "test")
    }

    async fn until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A worker that cannot take more (its write hangs with the backlog
    /// full) fills its queue and blocks the dispatcher: the `pipeline`
    /// check fails with the reason after `stall_after`, the queue depth
    /// reads what is queued, and both recover when the writes complete
    /// (depth 0 once the worker drained, not the last value the dispatcher
    /// set).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_worker_fails_readiness_and_depth_follows_the_drain() {
        let index = closed_gate();
        let w = Worker::new(
            index.clone(),
            Keyer::new(scheme(), 100_000),
            NoReplay,
            WorkerConfig::default(),
        );
        let workers = Workers::start(vec![w], 2, Duration::from_secs(1));
        let stats = workers.stats();
        let readiness = Readiness::default();
        let shutdown = CancellationToken::new();
        spawn_monitor(
            stats.clone(),
            readiness.check("pipeline"),
            Duration::from_millis(200),
            shutdown.clone(),
        );
        let (tx, rx) = mpsc::channel(1);
        let dispatcher = tokio::spawn(async move { run_dispatcher(rx, &workers).await });
        // Each batch carries more operations than the write backlog.
        let n = BACKLOG_OPS as u32 + 10;
        let batch = stored_batch;
        // Batch 0 goes into a write that hangs; batch 1 then waits behind it
        // with more than the backlog, so the worker takes nothing more.
        tx.send(batch(0, n)).await.expect("send");
        until("the first write", || index.started.load(Relaxed) == 1).await;
        tx.send(batch(1, n)).await.expect("send");
        until("batch 1 taken", || stats.depth() == 0).await;
        let feeder = {
            let tx = tx.clone();
            // Small batches, more than the worker drains at once (256) plus
            // its queue: however many it still takes while keying batch 1,
            // it then parks and the dispatcher waits.
            let batches: Vec<RawBatch> = (2..300).map(|seq| batch(seq, 1)).collect();
            tokio::spawn(async move {
                for b in batches {
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
            })
        };
        until("the pipeline check to fail", || !readiness.report().0).await;
        let (_, report) = readiness.report();
        assert!(
            report.contains("pipeline: failing: worker 0 has taken nothing for")
                || report.contains("pipeline: failing: the dispatcher has waited"),
            "{report}"
        );
        // Once the dispatcher has waited that long too, that is the reason.
        until("the dispatcher named", || {
            readiness
                .report()
                .1
                .contains("pipeline: failing: the dispatcher has waited")
        })
        .await;
        assert!(stats.depth() >= 1, "a full queue: {}", stats.depth());
        index.open.store(true, Relaxed);
        index.opened.notify_waiters();
        feeder.await.expect("feeder");
        until("the worker to drain", || stats.depth() == 0).await;
        until("the pipeline check to pass", || readiness.report().0).await;
        assert!(stats.stalled(Duration::ZERO).is_none());
        drop(tx);
        dispatcher.await.expect("dispatcher");
        shutdown.cancel();
    }

    /// The queues bound batches by count; the byte budget bounds what they
    /// hold when batches are large: with a worker that takes nothing (its
    /// write hangs), the dispatcher stops at the budget although the queue
    /// has room for 1,000 batches, and goes on once the worker drains.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_bytes_stay_within_the_budget() {
        let index = closed_gate();
        let w = Worker::new(
            index.clone(),
            Keyer::new(scheme(), 100_000),
            NoReplay,
            WorkerConfig::default(),
        );
        let n = BACKLOG_OPS as u32 + 10;
        let batch = stored_batch;
        let small = batch(2, 50).payload.len();
        let budget = small * 3;
        let workers = Arc::new(
            Workers::start(vec![w], 1_000, Duration::from_secs(1)).limit_queued_bytes(budget),
        );
        // Batch 0 goes into a write that hangs; batch 1 (over the backlog)
        // then parks the worker.
        assert!(workers.dispatch(batch(0, n)).await);
        until("the first write", || index.started.load(Relaxed) == 1).await;
        assert!(workers.dispatch(batch(1, n)).await);
        until("batch 1 taken", || workers.stats.depth() == 0).await;
        let feeder = {
            let workers = workers.clone();
            let batches: Vec<RawBatch> = (2..40).map(|seq| batch(seq, 50)).collect();
            tokio::spawn(async move {
                for b in batches {
                    assert!(workers.dispatch(b).await);
                }
            })
        };
        until("the dispatcher to wait on the budget", || {
            workers.stats.blocked_since.load(Relaxed) > 0
        })
        .await;
        assert!(
            workers.queued_bytes() <= budget,
            "{} > {budget}",
            workers.queued_bytes()
        );
        assert!(
            workers.stats.depth() <= 3,
            "queued {}",
            workers.stats.depth()
        );
        assert!(!feeder.is_finished());
        index.open.store(true, Relaxed);
        index.opened.notify_waiters();
        feeder.await.expect("feeder");
        // The queue empties when the worker takes the last batch; its bytes
        // are released once that batch is handed on, a moment later.
        until("the worker to drain", || workers.stats.depth() == 0).await;
        until("every queued byte released", || workers.queued_bytes() == 0).await;
    }

    #[test]
    fn shard_is_stable_and_in_range() {
        for n in 1..8 {
            let s = shard("kv@127.0.0.11:8000@m", n);
            assert!(s < n);
            assert_eq!(s, shard("kv@127.0.0.11:8000@m", n));
        }
        assert_eq!(shard("x", 0), 0);
    }
}
