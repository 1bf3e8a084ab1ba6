//! The write stage of one ordering worker: operations wait here until the
//! index has them, with up to `max_inflight_writes` index writes in flight.
//!
//! # Ordering
//!
//! The index must see each pod's operations in publication order; the
//! operations of different pods commute (they touch different `<pod>@<tier>`
//! fields; the shared `engine:` mappings already see different pods'
//! writes in any order, from different workers and ingester replicas). So
//! the rule kept here is: **a pod has at most one write in flight**. A write
//! takes every pending operation of the pods it carries, in order; operations
//! of a pod whose write is in flight wait until that write has finished, then
//! go in the next one. Nothing else is assumed of the backend: a write may
//! take several round trips (engine-hash resolution, a ClearPod's four waves),
//! be resent after a reconnect or a MOVED (`index/redis/cluster.rs`), or run
//! on a cluster where its pipelines go to several masters, and still no later
//! operation of the same pod can overtake it. (Pipelining writes of the same
//! pod on one connection would keep order on a single node only as long as
//! nothing is resent: a resend, or a write that timed out on the client but
//! ran on the server, could then land after a later write.)
//!
//! Several writes in flight therefore overlap different pods' writes, and
//! overlap keying the next batches with the writes of earlier ones: the worker
//! keeps taking batches from its queue while writes are in flight, up to
//! [`BACKLOG_OPS`] operations waiting.
//!
//! Writes are futures that the worker's own task polls (between batches and
//! while it waits for its queue), not tasks of their own: the connection's
//! driver task carries the round trips, and a write's next wave is sent when
//! the worker next polls it. Spawning them would let building commands and
//! reading replies use the other core; not done yet.
//!
//! # Failures
//!
//! A failed write puts its operations back in front of the pending ones (they
//! are older than any pending operation of the same pods, which could not
//! have been in flight) and the next write waits for an exponential backoff.
//! Other writes in flight are unaffected: they carry other pods. Pending
//! operations are bounded by `max_pending_ops`; past it the oldest pod's
//! pending operations are dropped and the pod is marked dirty: its next write
//! starts with a ClearPod (or is one, if the pod has gone quiet), so whatever
//! the dropped operations would have removed cannot outlive the pod's cache.
//! An operation of a dirty pod still in flight is older than the dropped ones,
//! so it lands before that clear.

use crate::metrics as m;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use kvroute_core::ids::PodId;
use kvroute_core::index::{Index, IndexError, IndexOp};
use plan::PlannedWrite;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod plan;

/// Operations waiting (behind pods with a write in flight, or for a free
/// write slot) before the worker stops taking batches from its queue. The
/// queue, not this, absorbs bursts: a full queue pushes back on the socket.
pub const BACKLOG_OPS: usize = 2048;

/// What the write stage is allowed to hold and how it retries.
#[derive(Debug, Clone)]
pub struct WriteConfig {
    /// Bound on operations held while the index is unreachable.
    pub max_pending_ops: usize,
    /// Index writes in flight at once (each carries different pods).
    pub max_inflight_writes: usize,
    /// First and maximum retry delay of a failed write.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// A finished write, handed back to [`Writes::complete`].
pub struct Done {
    /// The pod of each operation, in order.
    pods: Vec<PodId>,
    ops: Vec<IndexOp>,
    /// Publisher timestamps of the batches this write completes.
    ts: Vec<(PodId, f64)>,
    /// The pods this write holds (no other write may carry them meanwhile).
    holds: Vec<PodId>,
    result: Result<(), IndexError>,
    elapsed: Duration,
}

pub struct Writes<I> {
    index: Arc<I>,
    config: WriteConfig,
    /// Operations not yet written, in order, with the pod each belongs to.
    pub(crate) pending: Vec<(PodId, IndexOp)>,
    /// Publisher timestamps of the batches whose operations are pending: their
    /// lag to "applied" is recorded when the write carrying their pod
    /// succeeds. Capped at `max_pending_ops` (oldest dropped) like the ops
    /// themselves, so a long outage cannot grow it; a dropped sample only
    /// thins the lag histogram.
    pub(crate) pending_ts: VecDeque<(PodId, f64)>,
    /// Pods whose operations were dropped: cleared before their next write.
    dirty: HashSet<PodId>,
    /// Pods shed since the worker last asked ([`Writes::take_shed`]): it
    /// rebuilds them from replay once their clear is written.
    shed_log: Vec<PodId>,
    /// Pods with a write in flight.
    busy: HashSet<PodId>,
    in_flight: FuturesUnordered<BoxFuture<'static, Done>>,
    in_flight_ops: usize,
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

impl<I: Index + 'static> Writes<I> {
    pub fn new(index: Arc<I>, config: WriteConfig) -> Self {
        Writes {
            index,
            retry_delay: config.retry_min,
            config,
            pending: Vec::new(),
            pending_ts: VecDeque::new(),
            dirty: HashSet::new(),
            shed_log: Vec::new(),
            busy: HashSet::new(),
            in_flight: FuturesUnordered::new(),
            in_flight_ops: 0,
            retry_at: None,
        }
    }

    pub fn index(&self) -> &Arc<I> {
        &self.index
    }

    /// Operations not yet acknowledged by the index: pending, in flight, and
    /// the clears of shed pods.
    pub fn unwritten(&self) -> usize {
        self.pending.len() + self.in_flight_ops + self.dirty.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn dirty_pods(&self) -> impl Iterator<Item = &PodId> {
        self.dirty.iter()
    }

    /// When the next write may be tried after a failure (None: nothing failed).
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether the worker should take more batches now: yes while little
    /// waits, while nothing is in flight (then everything can go), and
    /// during an outage (batches keep arriving; the bound sheds).
    pub fn can_accept(&self) -> bool {
        self.pending.len() < BACKLOG_OPS || self.in_flight.is_empty() || self.retry_at.is_some()
    }

    /// Records the publisher timestamp of a batch of `pod`.
    pub fn push_ts(&mut self, pod: &PodId, ts: f64) {
        if self.pending_ts.len() >= self.config.max_pending_ops.max(1) {
            self.pending_ts.pop_front();
        }
        self.pending_ts.push_back((pod.clone(), ts));
    }

    pub fn push(&mut self, pod: &PodId, op: IndexOp) {
        if self.dirty.remove(pod) {
            // First operation after a loss: clear before anything else applies.
            self.pending
                .push((pod.clone(), IndexOp::ClearPod { pod: pod.clone() }));
        }
        self.pending.push((pod.clone(), op));
        self.shed_over_bound();
        metrics::gauge!(m::PENDING_OPS).set(self.unwritten() as f64);
    }

    /// Forgets what is pending for `pod` and queues its clear (behind its
    /// write in flight, if any).
    pub fn purge(&mut self, pod: &PodId) {
        self.pending.retain(|(p, _)| p != pod);
        self.dirty.remove(pod);
        // A purged pod is not rebuilt: its replay would bring it back.
        self.shed_log.retain(|p| p != pod);
        self.pending
            .push((pod.clone(), IndexOp::ClearPod { pod: pod.clone() }));
    }

    fn shed_over_bound(&mut self) {
        while self.pending.len() > self.config.max_pending_ops {
            self.shed();
        }
    }

    /// Drops every pending operation of the pod with the oldest one and marks
    /// it for clear-and-rebuild.
    fn shed(&mut self) {
        let Some((victim, _)) = self.pending.first().cloned() else {
            return;
        };
        let before = self.pending.len();
        self.pending.retain(|(p, _)| *p != victim);
        let dropped = before - self.pending.len();
        metrics::counter!(m::DROPPED_OPS).increment(dropped as u64);
        tracing::warn!(pod = %victim, dropped, "index unreachable too long: pod marked for clear-and-rebuild");
        self.shed_log.push(victim.clone());
        self.dirty.insert(victim);
    }

    /// Whether the pod's clear is still to be issued (it was shed and no
    /// write has carried its clear yet).
    pub fn is_dirty(&self, pod: &PodId) -> bool {
        self.dirty.contains(pod)
    }

    /// The pods shed since the last call.
    pub fn take_shed(&mut self) -> Vec<PodId> {
        std::mem::take(&mut self.shed_log)
    }

    /// Drops the pod's pending operations and marks it for a clear before
    /// its next write (a rebuild interrupted by a failed write: a prefix of
    /// its replay alone could hold a store whose removal was not written).
    pub fn drop_pod(&mut self, pod: &PodId) {
        self.pending.retain(|(p, _)| p != pod);
        self.dirty.insert(pod.clone());
    }

    /// Queues a clear of the pod in front of its pending operations (behind
    /// its write in flight, if any), keeping them.
    pub fn clear_first(&mut self, pod: &PodId) {
        let at = self
            .pending
            .iter()
            .position(|(p, _)| p == pod)
            .unwrap_or(self.pending.len());
        self.pending
            .insert(at, (pod.clone(), IndexOp::ClearPod { pod: pod.clone() }));
        self.dirty.remove(pod);
    }

    /// Starts writes for every pod without one in flight, spread over the
    /// free write slots: `plan::plan` (`writes/plan.rs`) decides, and
    /// `Writes::spawn` starts each planned write. Does nothing while a failed
    /// write's backoff runs.
    pub fn launch(&mut self) {
        if let Some(at) = self.retry_at
            && Instant::now() < at
        {
            return;
        }
        let slots = self
            .config
            .max_inflight_writes
            .max(1)
            .saturating_sub(self.in_flight.len());
        let plan = plan::plan(
            &mut self.pending,
            &mut self.pending_ts,
            &mut self.dirty,
            &self.busy,
            slots,
        );
        record_lag(plan.applied_now);
        for write in plan.writes {
            self.spawn(write);
        }
    }

    /// Starts one planned write: its pods are held (no other write may carry
    /// them) until [`Writes::complete`] takes its outcome.
    fn spawn(&mut self, write: PlannedWrite) {
        let PlannedWrite {
            pods,
            ops,
            ts,
            holds,
        } = write;
        self.busy.extend(holds.iter().cloned());
        self.in_flight_ops += ops.len();
        metrics::gauge!(m::WRITES_IN_FLIGHT).increment(1.0);
        let index = self.index.clone();
        self.in_flight.push(Box::pin(async move {
            let start = Instant::now();
            let result = index.apply(&ops).await;
            Done {
                pods,
                ops,
                ts,
                holds,
                result,
                elapsed: start.elapsed(),
            }
        }));
    }

    /// The next write to finish; `None` at once when none is in flight.
    pub async fn next_done(&mut self) -> Option<Done> {
        self.in_flight.next().await
    }

    /// Takes a finished write's outcome. Returns whether it succeeded.
    pub fn complete(&mut self, done: Done) -> bool {
        metrics::histogram!(m::WRITE_SECONDS).record(done.elapsed.as_secs_f64());
        metrics::gauge!(m::WRITES_IN_FLIGHT).decrement(1.0);
        self.in_flight_ops -= done.ops.len();
        for pod in &done.holds {
            self.busy.remove(pod);
        }
        let ok = match done.result {
            Ok(()) => {
                metrics::counter!(m::WRITES, "outcome" => "ok").increment(1);
                record_lag(done.ts.into_iter().map(|(_, ts)| ts));
                self.retry_at = None;
                self.retry_delay = self.config.retry_min;
                true
            }
            Err(e) => {
                metrics::counter!(m::WRITES, "outcome" => "error").increment(1);
                tracing::warn!(error = %e, ops = done.ops.len(), pending = self.pending.len(), retry_in = ?self.retry_delay, "index write failed");
                // Older than anything pending of the same pods: back in front.
                let mut back: Vec<(PodId, IndexOp)> = done.pods.into_iter().zip(done.ops).collect();
                back.append(&mut self.pending);
                self.pending = back;
                for entry in done.ts.into_iter().rev() {
                    self.pending_ts.push_front(entry);
                }
                while self.pending_ts.len() > self.config.max_pending_ops.max(1) {
                    self.pending_ts.pop_front();
                }
                self.shed_over_bound();
                self.retry_at = Some(Instant::now() + self.retry_delay);
                self.retry_delay = (self.retry_delay * 2).min(self.config.retry_max);
                false
            }
        };
        metrics::gauge!(m::PENDING_OPS).set(self.unwritten() as f64);
        ok
    }

    /// Writes everything that can be written now and waits for it: returns
    /// true when nothing is left unwritten. Stops at the first failed round
    /// (the backoff then applies). For tests and the shutdown drain.
    pub async fn flush(&mut self) -> bool {
        loop {
            self.launch();
            if self.in_flight.is_empty() {
                break;
            }
            let mut ok = true;
            while let Some(done) = self.next_done().await {
                ok &= self.complete(done);
            }
            if !ok {
                break;
            }
        }
        self.unwritten() == 0
    }
}

/// One lag sample per applied batch: publisher timestamp -> now.
fn record_lag(ts: impl IntoIterator<Item = f64>) {
    let mut ts = ts.into_iter().peekable();
    if ts.peek().is_none() {
        return;
    }
    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
        let now = now.as_secs_f64();
        for t in ts {
            metrics::histogram!(m::LAG_SECONDS).record((now - t).max(0.0));
        }
    }
}
