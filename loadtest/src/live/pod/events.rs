//! A pod's KV-event publisher: vLLM's ZMQ PUB (`[topic, seq, payload]`,
//! seq from 0) and its replay ROUTER over a ring of the last
//! `buffer_steps` batches.
//!
//! vLLM's `ZmqEventPublisher` (vllm/distributed/kv_events.py) numbers
//! every batch it sends, keeps `(seq, payload)` in a bounded deque, and
//! answers a replay request `[identity, "", start_seq]` with one message per
//! kept batch whose seq is at least `start_seq`, then an end marker of seq
//! -1 and an empty payload. vLLM 0.10 (array encoding) replies
//! `[identity, "", seq, payload]`; newer vLLM (map encoding) adds the topic,
//! `[identity, "", topic, seq, payload]`, with an empty topic on the end
//! marker. The pod speaks the shape that goes with its encoding.

use bytes::Bytes;
use kvroute_core::events::topic::REPLAY_END_SEQ;
use kvroute_core::events::{BatchRef, Encoding, KvEvent, encode_batch};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// The batches a replay can return, oldest first.
#[derive(Debug)]
pub struct Ring {
    batches: Mutex<VecDeque<(u64, Bytes)>>,
    capacity: usize,
}

impl Ring {
    pub fn new(capacity: usize) -> Ring {
        Ring {
            batches: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
        }
    }

    fn push(&self, seq: u64, payload: Bytes) {
        if self.capacity == 0 {
            return;
        }
        let mut b = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        if b.len() == self.capacity {
            b.pop_front();
        }
        b.push_back((seq, payload));
    }

    /// Kept batches with `seq >= start` (payloads are shared, not copied).
    pub fn since(&self, start: u64) -> Vec<(u64, Bytes)> {
        let b = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        b.iter().filter(|(s, _)| *s >= start).cloned().collect()
    }
}

/// The PUB side, owned by the pod's engine task.
pub struct Publisher {
    socket: PubSocket,
    topic: Bytes,
    encoding: Encoding,
    next_seq: u64,
    ring: Arc<Ring>,
}

/// Wall-clock seconds since the epoch, as vLLM stamps a batch
/// (`time.time()`).
fn wall_clock_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Publisher {
    pub fn new(socket: PubSocket, topic: &str, encoding: Encoding, ring: Arc<Ring>) -> Publisher {
        Publisher {
            socket,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            encoding,
            next_seq: 0,
            ring,
        }
    }

    /// Batches sent so far (the next seq).
    pub fn sent(&self) -> u64 {
        self.next_seq
    }

    /// Sends one step's events as one batch (nothing for an empty step, as
    /// vLLM publishes only when the step produced events) and keeps it for
    /// replay. A send error is logged, not fatal: the batch is still kept,
    /// so a subscriber can replay it.
    pub async fn publish(&mut self, events: &[KvEvent]) {
        if events.is_empty() {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let batch = BatchRef {
            ts: wall_clock_ts(),
            events,
            data_parallel_rank: None,
        };
        let payload = Bytes::from(encode_batch(batch, self.encoding));
        let mut msg = ZmqMessage::from(self.topic.clone());
        msg.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
        msg.push_back(payload.clone());
        if let Err(e) = self.socket.send(msg).await {
            tracing::warn!(error = %e, seq, "KV event publish failed");
        }
        self.ring.push(seq, payload);
    }

    pub async fn close(self) {
        let _ = self.socket.close().await;
    }
}

/// Serves replay requests on `socket` until `stop`.
pub async fn serve_replay(
    mut socket: RouterSocket,
    ring: Arc<Ring>,
    topic: String,
    encoding: Encoding,
    stop: CancellationToken,
) {
    let topic = Bytes::from(topic);
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            m = socket.recv() => m,
        };
        let frames = match msg {
            Ok(m) => m.into_vec(),
            Err(e) => {
                // The socket has no peer to read from (or broke): do not
                // spin on it.
                tracing::debug!(error = %e, "replay socket recv");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        // [identity, "", start_seq]; a peer that leaves out the delimiter
        // still sends the seq last.
        let (Some(identity), Some(start)) = (frames.first(), frames.last()) else {
            continue;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else {
            tracing::debug!(frames = frames.len(), "malformed replay request ignored");
            continue;
        };
        let start = u64::from_be_bytes(start);
        let with_topic = encoding == Encoding::Map;
        let reply = |topic: &Bytes, seq: u64, payload: Bytes| {
            let mut m = ZmqMessage::from(identity.clone());
            m.push_back(Bytes::new());
            if with_topic {
                m.push_back(topic.clone());
            }
            m.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
            m.push_back(payload);
            m
        };
        let mut ok = true;
        for (seq, payload) in ring.since(start) {
            if socket.send(reply(&topic, seq, payload)).await.is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            let _ = socket
                .send(reply(&Bytes::new(), REPLAY_END_SEQ, Bytes::new()))
                .await;
        }
    }
    let _ = socket.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_batches() {
        let ring = Ring::new(3);
        for seq in 0..5u64 {
            ring.push(seq, Bytes::from(vec![seq as u8]));
        }
        let kept: Vec<u64> = ring.since(0).into_iter().map(|(s, _)| s).collect();
        assert_eq!(kept, vec![2, 3, 4]);
        let from4: Vec<_> = ring.since(4);
        assert_eq!(from4, vec![(4, Bytes::from(vec![4u8]))]);
        assert!(ring.since(5).is_empty());
        let none = Ring::new(0);
        none.push(0, Bytes::new());
        assert!(none.since(0).is_empty());
    }
}
