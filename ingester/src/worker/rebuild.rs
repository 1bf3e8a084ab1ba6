//! Clear-and-rebuild from replay: a pod whose operations were shed during a
//! Redis outage is cleared at the next successful write (see the worker's
//! module doc); that leaves the index without the blocks the pod still holds
//! until it stores them again. vLLM keeps its last batches (`buffer_steps`)
//! for its replay socket, so once writes succeed again and the pod's clear
//! has gone into a write, the worker asks for all of them (from sequence 0:
//! vLLM answers from its oldest buffered batch) and queues, in order, those
//! up to the last batch it has seen live, behind the clear and behind any
//! live operations of the pod still pending (those are batches up to the
//! same one, and the replay ends on the same batch, so the last operation on
//! every block it covers is the live one). Later batches arrive live, in
//! order; applying them here too could apply a store after the removal that
//! follows it.
//!
//! Correctness does not depend on how far back the buffer reaches: every
//! replayed batch is applied in publication order after the clear, so a
//! removal in the buffer always follows the stores before it; a block stored
//! before the buffer's start stays missing (a miss, never a stale entry).
//!
//! The rebuild is all or nothing per pod: if a write fails midway, the pod's
//! replayed operations are dropped and it is marked again for a clear and a
//! later rebuild, because a prefix of the buffer alone could hold a store
//! whose removal is in the part not written.

use super::{Replayer, Worker};
use crate::metrics as m;
use kvroute_core::events::{Topic, decode_batch};
use kvroute_core::ids::PodId;
use kvroute_core::index::Index;

/// One publisher stream of a pod: its topic, data-parallel rank and the key
/// the sequence tracker knows it by.
#[derive(Debug, Clone)]
pub(super) struct Stream {
    topic: Topic,
    rank: Option<u32>,
    key: String,
}

impl Stream {
    /// The sequence tracker's key of this stream.
    pub(super) fn key(&self) -> &str {
        &self.key
    }
}

impl<I: Index + 'static, R: Replayer + 'static> Worker<I, R> {
    /// Remembers a stream of `pod` (a pod publishes one per topic and rank).
    pub(super) fn note_stream(&mut self, pod: &PodId, topic: &Topic, rank: Option<u32>, key: &str) {
        let streams = self.streams.entry(pod.clone()).or_default();
        if !streams.iter().any(|s| s.key == key) {
            streams.push(Stream {
                topic: topic.clone(),
                rank,
                key: key.to_owned(),
            });
        }
    }

    /// Whether a shed pod can be rebuilt now: writes succeed again (no
    /// backoff running) and its clear has gone into a write. From then on
    /// anything pushed for the pod is ordered after its clear (one write per
    /// pod at a time, and a failed write goes back in front of the pod's
    /// pending operations), so the replayed batches land on the cleared pod
    /// whatever else the worker has pending or in flight. Waiting for every
    /// write to drain instead could wait forever under steady traffic.
    pub fn rebuild_due(&mut self) -> bool {
        self.rebuild.extend(self.writes.take_shed());
        self.writes.retry_at().is_none() && self.rebuild.iter().any(|p| !self.writes.is_dirty(p))
    }

    /// Rebuilds every shed pod whose clear has been issued from its replay
    /// buffer; returns the batches queued (written by the next writes).
    pub async fn rebuild_from_replay(&mut self) -> u64 {
        if !self.rebuild_due() {
            return 0;
        }
        let pods: Vec<PodId> = self
            .rebuild
            .iter()
            .filter(|p| !self.writes.is_dirty(p))
            .cloned()
            .collect();
        for pod in &pods {
            self.rebuild.remove(pod);
        }
        if !self.replayer.can_replay() {
            return 0;
        }
        let mut total = 0;
        for pod in pods {
            total += self.rebuild_pod(&pod).await;
        }
        total
    }

    async fn rebuild_pod(&mut self, pod: &PodId) -> u64 {
        self.rebuilt_at
            .insert(pod.clone(), std::time::Instant::now());
        let streams = self.streams.get(pod).cloned().unwrap_or_default();
        let mut applied = 0u64;
        for s in streams {
            let Some(last) = self.seqs.last(&s.key) else {
                continue;
            };
            let batches = match self.replayer.fetch_rank(&s.topic, s.rank, 0).await {
                Ok(b) => b,
                Err(e) => {
                    metrics::counter!(m::REBUILDS, "outcome" => "error").increment(1);
                    tracing::warn!(%pod, error = %e, "pod cleared but not rebuilt: replay failed");
                    continue;
                }
            };
            for (seq, payload) in batches {
                if seq > last {
                    continue;
                }
                match decode_batch(&payload) {
                    Ok(b) if b.data_parallel_rank == s.rank => {
                        // Keep the bound: write what is pending before it
                        // fills, rather than shed the rebuild itself.
                        if self.writes.unwritten() >= self.config.max_pending_ops / 2
                            && !self.writes.flush().await
                        {
                            self.abandon_rebuild(pod);
                            return 0;
                        }
                        self.apply_batch(&s.topic, pod, b, super::Seen::Again);
                        applied += 1;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        metrics::counter!(m::MALFORMED, "reason" => "bad_replay_payload")
                            .increment(1);
                    }
                }
            }
            metrics::counter!(m::REBUILDS, "outcome" => "ok").increment(1);
            tracing::info!(%pod, up_to = last, "pod rebuilt from its replay buffer");
        }
        metrics::counter!(m::REBUILT_BATCHES).increment(applied);
        applied
    }

    /// Redis lost or rewound data (`crate::bookkeeping`): what it holds of
    /// this worker's pods may be missing blocks or hold removed ones. Every
    /// pod heard is cleared; with a replay endpoint its pending operations
    /// are dropped and it is rebuilt from its replay buffer once the clear
    /// is written (the outage machinery above); without one, the clear goes
    /// in front of its pending operations and live events re-index it.
    ///
    /// Coordinated with the outage path: a pod rebuilt since `r.since` (the
    /// last check that still found the data intact; every check after it
    /// failed, so Redis was not taking writes, and a rebuild's writes since
    /// then went to the Redis as it is now) is not rebuilt twice, and a pod
    /// already waiting for its rebuild is rebuilt once, behind a new clear.
    /// Without a replay endpoint, a Redis that only came back empty is not
    /// cleared (it holds nothing older than the restart: clearing would only
    /// drop what live events wrote since).
    pub fn resync(&mut self, r: super::Resync) {
        let replay = self.replayer.can_replay();
        let pods: Vec<PodId> = self
            .streams
            .keys()
            .filter(|p| self.rebuilt_at.get(*p).is_none_or(|at| *at < r.since))
            .cloned()
            .collect();
        for pod in &pods {
            if replay {
                self.writes.drop_pod(pod);
                self.rebuild.insert(pod.clone());
            } else if r.stale_possible {
                self.writes.clear_first(pod);
            }
        }
        let cleared = replay || r.stale_possible;
        tracing::info!(
            pods = pods.len(),
            cleared,
            rebuild = replay,
            "pods resynced after a Redis data loss"
        );
    }

    /// A write failed midway through a rebuild: drop the pod's replayed
    /// operations and mark it for another clear and rebuild.
    fn abandon_rebuild(&mut self, pod: &PodId) {
        self.writes.drop_pod(pod);
        self.rebuild.insert(pod.clone());
        metrics::counter!(m::REBUILDS, "outcome" => "error").increment(1);
        tracing::warn!(%pod, "rebuild interrupted by a failed write; the pod will be cleared and rebuilt again");
    }
}

#[cfg(test)]
mod tests {
    use super::super::{RawBatch, Worker, WorkerConfig};
    use super::*;
    use crate::keys::Keyer;
    use crate::testing::{Flaky, scheme, stored};
    use kvroute_core::events::{
        BlockHash, BlockRemoved, Encoding, EventBatch, KvEvent, Topic, encode_batch,
    };
    use kvroute_core::ids::ModelName;
    use kvroute_core::index::IndexOp;
    use kvroute_core::index::memory::MemoryIndex;
    use kvroute_core::keys::ExtraKeys;
    use std::sync::Arc;
    use std::time::Duration;

    const TOPIC: &str = "kv@127.0.0.11:8000@m";

    /// A replay buffer: every batch published, as vLLM's ring holds them.
    #[derive(Default)]
    struct Buffer(parking_lot::Mutex<Vec<(u64, bytes::Bytes)>>);

    impl Replayer for Arc<Buffer> {
        async fn fetch(
            &self,
            _: &Topic,
            from: u64,
        ) -> Result<crate::worker::ReplayedBatches, crate::replay::ReplayError> {
            Ok(self
                .0
                .lock()
                .iter()
                .filter(|(s, _)| *s >= from)
                .cloned()
                .collect())
        }
    }

    fn publish(buffer: &Buffer, seq: u64, events: Vec<KvEvent>) -> RawBatch {
        let payload = encode_batch(
            &EventBatch {
                ts: 1.0,
                events,
                data_parallel_rank: None,
            },
            Encoding::Map,
        );
        let payload = bytes::Bytes::from(payload);
        buffer.0.lock().push((seq, payload.clone()));
        RawBatch {
            topic: TOPIC.into(),
            seq,
            payload,
            received_at: std::time::Instant::now(),
            source: "test".into(),
        }
    }

    fn held(index: &Flaky, tokens: &[u32]) -> bool {
        let keys = scheme().block_keys(tokens, ExtraKeys::NONE);
        index
            .inner
            .lookup_sync(&ModelName::new("m"), &keys, None)
            .max_depth()
            > 0
    }

    /// A worker over a switchable memory index and a replay buffer, holding
    /// at most `max_pending_ops` before it sheds, retrying at once.
    fn shedding_worker(
        max_pending_ops: usize,
    ) -> (Arc<Flaky>, Arc<Buffer>, Worker<Flaky, Arc<Buffer>>) {
        let index = Arc::new(Flaky::new(10_000, false));
        let buffer = Arc::new(Buffer::default());
        let config = WorkerConfig {
            max_pending_ops,
            retry_min: Duration::ZERO,
            ..WorkerConfig::default()
        };
        let w = Worker::new(
            index.clone(),
            Keyer::new(scheme(), 10_000),
            buffer.clone(),
            config,
        );
        (index, buffer, w)
    }

    /// `n` one-block prompts of the pod: the first written live, the rest
    /// published while the index is down (left down), so the pod is shed.
    async fn shed(
        index: &Flaky,
        buffer: &Buffer,
        w: &mut Worker<Flaky, Arc<Buffer>>,
        n: u32,
    ) -> Vec<Vec<u32>> {
        let t: Vec<Vec<u32>> = (0..n).map(|i| (i * 4..i * 4 + 4).collect()).collect();
        w.handle(publish(buffer, 0, vec![stored(&t[0])])).await;
        assert!(w.writes.flush().await);
        index.set_down(true);
        for (i, tokens) in t.iter().enumerate().skip(1) {
            w.handle(publish(buffer, i as u64, vec![stored(tokens)]))
                .await;
            assert!(!w.writes.flush().await);
        }
        t
    }

    #[tokio::test]
    async fn a_shed_pod_is_rebuilt_from_its_replay_buffer_in_order() {
        let (index, buffer, mut w) = shedding_worker(3);
        let t: Vec<Vec<u32>> = (0..8u32).map(|i| (i * 4..i * 4 + 4).collect()).collect();
        w.handle(publish(&buffer, 0, vec![stored(&t[0])])).await;
        w.handle(publish(&buffer, 1, vec![stored(&t[1])])).await;
        assert!(w.writes.flush().await);
        // Outage: the removal of t1 and the stores of t2.. overflow the bound.
        index.set_down(true);
        let key1 = scheme().block_keys(&t[1], ExtraKeys::NONE)[0];
        let removed = KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![BlockHash::U64(key1.0)],
            medium: None,
        });
        w.handle(publish(&buffer, 2, vec![removed])).await;
        for (i, tokens) in t.iter().enumerate().skip(2) {
            w.handle(publish(&buffer, i as u64 + 1, vec![stored(tokens)]))
                .await;
            assert!(!w.writes.flush().await);
        }
        // Shed and waiting: not due while its clear is unwritten.
        assert!(!w.rebuild_due());
        assert!(w.rebuild.contains(&PodId::new("127.0.0.11:8000")));
        // A batch the pod published that has not arrived live yet.
        let late: Vec<u32> = (900..904).collect();
        let _ = publish(&buffer, 9, vec![stored(&late)]);
        // Redis back (empty, as after a restart without persistence).
        index.set_down(false);
        index.inner.apply_sync(&[IndexOp::ClearPod {
            pod: PodId::new("127.0.0.11:8000"),
        }]);
        assert!(w.writes.flush().await);
        assert!(w.rebuild_due());
        assert_eq!(w.rebuild_from_replay().await, 9);
        assert!(w.writes.flush().await);
        assert!(held(&index, &t[0]), "t0 rebuilt");
        assert!(
            !held(&index, &t[1]),
            "t1's removal replayed after its store"
        );
        for tokens in &t[2..] {
            assert!(held(&index, tokens), "{tokens:?} rebuilt");
        }
        assert!(
            !held(&index, &late),
            "a batch not seen live is left to arrive live"
        );
        assert!(!w.rebuild_due());
    }

    /// A rebuild re-applies batches that were counted when they arrived
    /// live: the per-event metrics count them once, plus `rebuilt`.
    #[test]
    fn rebuilt_events_are_not_counted_twice() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let rebuilt = metrics::with_local_recorder(&recorder, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (index, buffer, mut w) = shedding_worker(2);
                let t = shed(&index, &buffer, &mut w, 5).await;
                index.set_down(false);
                assert!(w.writes.flush().await);
                assert!(w.rebuild_due());
                let rebuilt = w.rebuild_from_replay().await;
                assert!(w.writes.flush().await);
                for tokens in &t {
                    assert!(held(&index, tokens), "{tokens:?} rebuilt");
                }
                rebuilt
            })
        });
        assert_eq!(rebuilt, 5, "every batch seen live came back");
        let text = handle.render();
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        // One block per event, each agreeing with the scheme: five, not ten.
        assert_eq!(
            value(r#"kvroute_ingester_hash_agreement_total{agree="true"}"#),
            5.0,
            "{text}"
        );
        assert_eq!(
            value(r#"kvroute_ingester_events_total{type="BlockStored",outcome="applied"}"#),
            5.0,
            "{text}"
        );
        assert_eq!(
            value(r#"kvroute_ingester_events_total{type="BlockStored",outcome="rebuilt"}"#),
            5.0,
            "{text}"
        );
    }

    /// Another pod's traffic on the same worker (pending operations, so the
    /// worker never has nothing unwritten) does not hold the rebuild back.
    #[tokio::test]
    async fn a_rebuild_does_not_wait_for_other_pods_to_go_quiet() {
        let (index, buffer, mut w) = shedding_worker(2);
        let t = shed(&index, &buffer, &mut w, 4).await;
        assert!(!w.rebuild_due(), "not while writes fail");
        index.set_down(false);
        index.inner.apply_sync(&[IndexOp::ClearPod {
            pod: PodId::new("127.0.0.11:8000"),
        }]);
        assert!(w.writes.flush().await);
        // Another pod publishes; its operations stay pending.
        let other: Vec<u32> = (500..504).collect();
        let payload = encode_batch(
            &EventBatch {
                ts: 1.0,
                events: vec![stored(&other)],
                data_parallel_rank: None,
            },
            Encoding::Map,
        );
        w.handle(RawBatch {
            topic: "kv@127.0.0.12:8000@m".into(),
            seq: 0,
            payload: payload.into(),
            received_at: std::time::Instant::now(),
            source: "test".into(),
        })
        .await;
        assert!(w.writes.unwritten() > 0);
        assert!(w.rebuild_due());
        assert_eq!(w.rebuild_from_replay().await, 4);
        assert!(w.writes.flush().await);
        for tokens in &t {
            assert!(held(&index, tokens), "{tokens:?} rebuilt");
        }
        assert!(held(&index, &other));
        assert!(!w.rebuild_due());
    }

    #[tokio::test]
    async fn without_a_replay_endpoint_nothing_is_asked() {
        let index = Arc::new(MemoryIndex::new(100));
        let config = WorkerConfig {
            max_pending_ops: 1,
            ..WorkerConfig::default()
        };
        let mut w = Worker::new(
            index,
            Keyer::new(scheme(), 100),
            super::super::NoReplay,
            config,
        );
        let a: Vec<u32> = (0..4).collect();
        let b: Vec<u32> = (4..8).collect();
        let m = |seq, t: &[u32]| RawBatch {
            topic: TOPIC.into(),
            seq,
            payload: encode_batch(
                &EventBatch {
                    ts: 1.0,
                    events: vec![stored(t)],
                    data_parallel_rank: None,
                },
                Encoding::Map,
            )
            .into(),
            received_at: std::time::Instant::now(),
            source: "test".into(),
        };
        w.handle(m(0, &a)).await;
        w.handle(m(1, &b)).await;
        assert!(w.writes.flush().await);
        assert!(w.rebuild_due());
        assert_eq!(w.rebuild_from_replay().await, 0);
        assert!(!w.rebuild_due());
    }
}
