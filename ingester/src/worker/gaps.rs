//! Gap replays beside the worker: a sequence gap (or the missed start of a
//! restarted stream) is refilled from the pod's replay socket by a future
//! the worker's loop polls next to its queue and its writes, never inline.
//! Before, the worker awaited each replay for up to `--replay-timeout`, so a
//! pod whose replay host did not answer stalled every pod sharded to the
//! same worker, then (queue full) the dispatcher and every other worker.
//!
//! While a stream's replay runs, the batch that showed the gap and the
//! stream's next live batches are held, in order, and applied after the
//! replayed ones: a replayed store can never resurrect a block a later live
//! event removed. Other streams, of the same pod too, go on.
//!
//! Bounds ([`ReplayLimits`]):
//! - concurrency: replays running at once over all workers (a semaphore);
//! - time: a replay, waiting for a slot included, is abandoned after the
//!   budget (it is also bounded by `--replay-timeout` on the socket);
//! - memory: a stream holds at most `max_held` live batches; more are dropped
//!   and counted (`kvroute_ingester_replay_overflow_total`); the first batch
//!   after the hole then shows a gap of its own (replayed, or counted);
//! - cooldown: after a failed replay a pod's next gaps are counted, not
//!   replayed, for `cooldown`, so an unreachable replay host costs one
//!   timeout per cooldown, not one per gap.

use super::{Replayer, Seen, Worker};
use crate::metrics as m;
use crate::replay::ReplayError;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use kvroute_core::events::{DecodedBatch, Topic, decode_batch};
use kvroute_core::ids::PodId;
use kvroute_core::index::Index;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Replays at once over all workers by default: each holds a socket and up
/// to vLLM's buffer (10,000 batches) in memory.
pub const DEFAULT_REPLAY_CONCURRENCY: usize = 8;
/// Live batches a stream holds while its replay runs, by default: vLLM
/// publishes a batch per engine step, so this is seconds of a busy pod.
pub const DEFAULT_MAX_HELD: usize = 1024;

/// Bounds on gap replays, shared by every worker (cloning shares the slots).
#[derive(Debug, Clone)]
pub struct ReplayLimits {
    /// Replays running at once over all workers.
    pub slots: Arc<Semaphore>,
    /// Longest a replay may take, waiting for a slot included.
    pub budget: Duration,
    /// After a failed replay, the pod's gaps are counted, not replayed, this long.
    pub cooldown: Duration,
    /// Live batches a stream holds while its replay runs.
    pub max_held: usize,
}

impl ReplayLimits {
    pub fn new(concurrency: usize, budget: Duration, cooldown: Duration, max_held: usize) -> Self {
        ReplayLimits {
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            budget,
            cooldown,
            max_held,
        }
    }
}

impl Default for ReplayLimits {
    fn default() -> Self {
        ReplayLimits::new(
            DEFAULT_REPLAY_CONCURRENCY,
            Duration::from_secs(5),
            Duration::from_secs(30),
            DEFAULT_MAX_HELD,
        )
    }
}

/// A decoded batch on its way to the sequence verdict.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub topic: Topic,
    pub pod: PodId,
    /// The sequence tracker's key: topic, plus `#rank` for a DP rank.
    pub stream: String,
    pub seq: u64,
    pub batch: DecodedBatch,
    /// Where the topic's batches dropped before reaching the worker began
    /// (startup buffer full; `Command::Missed`), when this is the topic's
    /// first batch since.
    pub missed_from: Option<u64>,
}

/// A stream whose gap is being replayed.
struct Awaiting {
    generation: u64,
    missed: Range<u64>,
    /// The batch that showed the gap, applied right after the replay.
    trigger: Incoming,
    /// Live batches that arrived meanwhile, in order.
    held: VecDeque<Incoming>,
}

/// What a replay future hands back to the worker.
pub(crate) struct ReplayDone {
    stream: String,
    generation: u64,
    result: Result<super::ReplayedBatches, ReplayError>,
}

#[derive(Default)]
pub(crate) struct Gaps {
    running: FuturesUnordered<BoxFuture<'static, ReplayDone>>,
    awaiting: HashMap<String, Awaiting>,
    /// Pods whose last replay failed, until when their gaps are not replayed.
    cooldown: HashMap<PodId, Instant>,
    next_generation: u64,
}

impl Gaps {
    /// Whether a replay is running (the worker's loop then polls them).
    pub fn any_running(&self) -> bool {
        !self.running.is_empty()
    }

    /// Forgets a pod's cooldown (the pod itself was forgotten).
    pub fn forget_cooldown(&mut self, pod: &PodId) {
        self.cooldown.remove(pod);
    }

    /// Whether `stream` waits for a replay.
    pub fn is_awaiting(&self, stream: &str) -> bool {
        self.awaiting.contains_key(stream)
    }

    /// The next replay to finish.
    pub async fn next_done(&mut self) -> Option<ReplayDone> {
        self.running.next().await
    }
}

impl<I: Index + 'static, R: Replayer + 'static> Worker<I, R> {
    /// Holds `b` when its stream waits for a replay (bounded: an overflow is
    /// dropped and counted); returns it when it can go on.
    pub(super) fn hold_if_replaying(&mut self, b: Incoming) -> Option<Incoming> {
        let max_held = self.config.replay.max_held;
        let Some(a) = self.gaps.awaiting.get_mut(&b.stream) else {
            return Some(b);
        };
        if a.held.len() >= max_held {
            metrics::counter!(m::REPLAY_OVERFLOW).increment(1);
            tracing::debug!(pod = %b.pod, seq = b.seq, "live batch dropped: its stream already holds the maximum while a replay runs");
        } else {
            a.held.push_back(b);
        }
        None
    }

    /// Starts the replay of `missed` for `b`'s stream; `b` then waits for it.
    /// Returns `b` back when no replay is asked (none configured, or the pod
    /// is cooling down after a failed one): the gap is counted and `b`
    /// applies now.
    pub(super) fn start_replay(&mut self, b: Incoming, missed: Range<u64>) -> Option<Incoming> {
        let count = missed.end - missed.start;
        let now = Instant::now();
        let cooling = self
            .gaps
            .cooldown
            .get(&b.pod)
            .is_some_and(|until| now < *until);
        if !self.replayer.can_replay() || cooling {
            let outcome = if cooling {
                "cooldown"
            } else {
                "not_configured"
            };
            metrics::counter!(m::REPLAYS, "outcome" => outcome).increment(1);
            metrics::counter!(m::GAP_BATCHES).increment(count);
            if cooling {
                tracing::debug!(pod = %b.pod, first = missed.start, missed = count, "sequence gap not replayed: the pod's last replay failed recently");
            } else {
                tracing::warn!(pod = %b.pod, first = missed.start, missed = count, "sequence gap not replayed: no --replay-endpoint");
            }
            return Some(b);
        }
        self.gaps.cooldown.remove(&b.pod);
        let generation = self.gaps.next_generation;
        self.gaps.next_generation += 1;
        let replayer = self.replayer.clone();
        let limits = self.config.replay.clone();
        let (topic, rank, from) = (b.topic.clone(), b.batch.data_parallel_rank, missed.start);
        let stream = b.stream.clone();
        self.gaps.running.push(Box::pin(async move {
            let budget = limits.budget;
            let result = tokio::time::timeout(budget, async move {
                // The semaphore is never closed; a closed one would only mean
                // "no limit".
                let _slot = limits.slots.acquire_owned().await.ok();
                replayer.fetch_rank(&topic, rank, from).await
            })
            .await
            .unwrap_or(Err(ReplayError::Budget { budget }));
            ReplayDone {
                stream,
                generation,
                result,
            }
        }));
        self.gaps.awaiting.insert(
            b.stream.clone(),
            Awaiting {
                generation,
                missed,
                trigger: b,
                held: VecDeque::new(),
            },
        );
        None
    }

    /// A replay finished: its batches in the gap apply, then the batch that
    /// showed the gap, then what the stream held meanwhile (which may show
    /// another gap and start another replay).
    pub(crate) fn replay_done(&mut self, done: ReplayDone) {
        match self.gaps.awaiting.get(&done.stream) {
            Some(a) if a.generation == done.generation => {}
            // The pod was purged meanwhile: nothing of it is applied.
            _ => return,
        }
        let Some(a) = self.gaps.awaiting.remove(&done.stream) else {
            return;
        };
        let Awaiting {
            missed,
            trigger,
            held,
            ..
        } = a;
        let count = missed.end - missed.start;
        let (topic, pod, rank) = (
            trigger.topic.clone(),
            trigger.pod.clone(),
            trigger.batch.data_parallel_rank,
        );
        match done.result {
            Ok(batches) => {
                let mut got = 0u64;
                for (seq, payload) in batches {
                    if !missed.contains(&seq) {
                        continue;
                    }
                    match decode_batch(&payload) {
                        Ok(b) if b.data_parallel_rank == rank => {
                            got += 1;
                            self.apply_batch(&topic, &pod, b, Seen::First);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            metrics::counter!(m::MALFORMED, "reason" => "bad_replay_payload")
                                .increment(1);
                        }
                    }
                }
                metrics::counter!(m::REPLAYS, "outcome" => "ok").increment(1);
                if got < count {
                    metrics::counter!(m::GAP_BATCHES).increment(count - got);
                    tracing::warn!(%pod, missed = count, replayed = got, "replay did not cover the whole gap");
                }
            }
            Err(e) => {
                metrics::counter!(m::REPLAYS, "outcome" => "error").increment(1);
                metrics::counter!(m::GAP_BATCHES).increment(count);
                let cooldown = self.config.replay.cooldown;
                self.gaps
                    .cooldown
                    .insert(pod.clone(), Instant::now() + cooldown);
                tracing::warn!(%pod, first = missed.start, missed = count, error = %e, ?cooldown, "sequence gap not replayed; the pod's gaps are counted, not replayed, for the cooldown");
            }
        }
        self.apply_batch(&trigger.topic, &trigger.pod, trigger.batch, Seen::First);
        for b in held {
            self.ingest(b);
        }
    }

    /// Forgets a purged pod's replays: what its streams hold is dropped with
    /// its other pending operations, and a replay finishing later is ignored.
    pub(super) fn forget_replays(&mut self, pod: &PodId) {
        self.gaps.awaiting.retain(|_, a| a.trigger.pod != *pod);
        self.gaps.cooldown.remove(pod);
    }

    /// Shutdown: waits for running replays until `deadline`, then applies
    /// what streams still hold without their replay (the gap counted).
    pub(super) async fn finish_replays(&mut self, deadline: Instant) {
        while self.gaps.any_running() {
            match tokio::time::timeout_at(deadline, self.gaps.next_done()).await {
                Ok(Some(done)) => self.replay_done(done),
                Ok(None) | Err(_) => break,
            }
        }
        let streams: Vec<String> = self.gaps.awaiting.keys().cloned().collect();
        for stream in streams {
            if let Some(a) = self.gaps.awaiting.get(&stream) {
                let done = ReplayDone {
                    stream,
                    generation: a.generation,
                    result: Err(ReplayError::Abandoned),
                };
                self.replay_done(done);
            }
        }
    }
}
