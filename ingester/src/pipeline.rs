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
use std::hash::Hasher;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// The worker index for a topic: FNV-1a, stable across restarts and replicas.
pub fn shard(topic: &str, workers: usize) -> usize {
    let mut h = fnv::FnvHasher::default();
    h.write(topic.as_bytes());
    (h.finish() % workers.max(1) as u64) as usize
}

/// Handles to the running workers.
pub struct Workers {
    senders: Vec<mpsc::Sender<Command>>,
    tasks: JoinSet<()>,
}

impl Workers {
    /// Starts one task per worker, each with a queue of `queue` commands.
    pub fn start<I, R>(workers: Vec<Worker<I, R>>, queue: usize, drain_timeout: Duration) -> Self
    where
        I: Index + 'static,
        R: Replayer + 'static,
    {
        let mut senders = Vec::with_capacity(workers.len());
        let mut tasks = JoinSet::new();
        for (i, w) in workers.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(queue);
            senders.push(tx);
            tasks.spawn(w.run(i, rx, drain_timeout));
        }
        Workers { senders, tasks }
    }

    /// Routes a message to its worker, waiting while that queue is full.
    /// Returns false once the workers are gone.
    pub async fn dispatch(&self, msg: RawBatch) -> bool {
        let i = shard(&msg.topic, self.senders.len());
        self.senders[i].send(Command::Batch(msg)).await.is_ok()
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
        for tx in &self.senders {
            let _ = tx.send(Command::Purge(pod.clone())).await;
        }
    }

    /// A cheap handle for other tasks (admin API) to purge pods.
    pub fn purger(&self) -> Purger {
        Purger {
            senders: self.senders.iter().map(mpsc::Sender::downgrade).collect(),
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
        for tx in &self.senders {
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(Command::Purge(pod.clone())).await;
            }
        }
    }
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
        metrics::gauge!(m::QUEUE_DEPTH).set(workers.queued() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
