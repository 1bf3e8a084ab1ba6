//! The simulated pods of `bench ingest`: each publishes vLLM-format batches
//! on its own ZeroMQ PUB (the `zeromq` crate), connected to the ingester's
//! bound SUB, with `kvroute_core::events::encode_batch` (vLLM's bytes).
//!
//! A pod's stream is a cache at steady state: every batch alternates
//! stores and removals; each store is a fresh `blocks_per_event`-block
//! prefix from the root (hashes exactly as vLLM computes them, so the
//! ingester's hash-agreement holds), and each removal evicts the store made
//! `held` steps earlier, so a pod holds about `held x blocks_per_event`
//! blocks and every store writes a block the index does not hold. The
//! events are built once (seeded) and cycled; only the batch `ts` is fresh,
//! so the publishers spend their time encoding and sending, not hashing.

use super::probe::Sample;
use bytes::Bytes;
use kvroute_core::events::{BatchRef, BlockHash, BlockRemoved, BlockStored, Encoding, KvEvent};
use kvroute_core::keys::{ChainState, ExtraKeys, KeyScheme};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use zeromq::{Socket, SocketSend, ZmqMessage};

/// The model every simulated pod serves.
pub const MODEL: &str = "bench";

/// The shape of every pod's stream.
#[derive(Debug, Clone)]
pub struct Shape {
    pub scheme: KeyScheme,
    pub encoding: Encoding,
    /// Even: half stores, half removals.
    pub events_per_batch: usize,
    pub blocks_per_event: usize,
    /// Stores a pod keeps before evicting the oldest.
    pub held: usize,
}

/// One pod's precomputed batches, cycled.
pub struct PodStream {
    pub pod: String,
    topic: Bytes,
    cycle: Vec<Vec<KvEvent>>,
    /// Per cycle batch: the block key name of its first store (sampled).
    first_store: Vec<String>,
    encoding: Encoding,
}

impl PodStream {
    /// Pod `index`'s stream, seeded by `seed`.
    pub fn build(index: usize, shape: &Shape, seed: u64) -> PodStream {
        let pod = format!("127.0.1.{}:8000", index + 1);
        let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9));
        let half = shape.events_per_batch / 2;
        // A pool larger than `held` so an entry is evicted before it is
        // stored again; a multiple of `half` so the cycle is whole batches.
        let pool_len = shape.held * half.max(1) * 2;
        let tokens_per = shape.blocks_per_event * shape.scheme.block_size();
        let pool: Vec<(Vec<u32>, Vec<ChainState>)> = (0..pool_len)
            .map(|_| {
                let tokens: Vec<u32> = (0..tokens_per)
                    .map(|_| rng.random_range(0..128_000))
                    .collect();
                let mut states = Vec::with_capacity(shape.blocks_per_event);
                let root = shape.scheme.root();
                shape
                    .scheme
                    .chain(root, 0, &tokens, ExtraKeys::NONE, |s| states.push(*s));
                (tokens, states)
            })
            .collect();
        let hash = |s: &ChainState| match s {
            ChainState::Digest(d) => BlockHash::Bytes32(*d),
            ChainState::U64(v) => BlockHash::U64(*v),
        };
        let batches = pool_len * 2 / shape.events_per_batch.max(2);
        let mut cycle = Vec::with_capacity(batches);
        let mut first_store = Vec::with_capacity(batches);
        for b in 0..batches {
            let mut events = Vec::with_capacity(shape.events_per_batch);
            for e in 0..shape.events_per_batch {
                let step = (b * shape.events_per_batch + e) / 2;
                if e % 2 == 0 {
                    let (tokens, states) = &pool[step % pool_len];
                    if e == 0 {
                        first_store.push(format!("{MODEL}@{}", states[0].key().0));
                    }
                    events.push(KvEvent::BlockStored(BlockStored {
                        block_hashes: states.iter().map(hash).collect(),
                        token_ids: tokens.clone(),
                        block_size: shape.scheme.block_size() as u32,
                        ..Default::default()
                    }));
                } else {
                    let evicted = &pool[(step + pool_len - shape.held) % pool_len].1;
                    events.push(KvEvent::BlockRemoved(BlockRemoved {
                        block_hashes: evicted.iter().map(hash).collect(),
                        medium: None,
                    }));
                }
            }
            cycle.push(events);
        }
        PodStream {
            topic: Bytes::from(format!("kv@{pod}@{MODEL}")),
            pod,
            cycle,
            first_store,
            encoding: shape.encoding,
        }
    }
}

/// Shared between the benchmark driver and every publisher.
#[derive(Default)]
pub struct Control {
    pub stop: AtomicBool,
    /// Publishers send nothing while set (to measure the initial loss).
    pub pause: AtomicBool,
    /// Per-pod batches per second as f64 bits; 0: as fast as the window allows.
    pub rate_bits: AtomicU64,
    /// Send a [`Sample`] every this many batches per pod; 0: none.
    pub sample_every: AtomicU64,
    /// Most batches sent but not yet applied, over all pods.
    pub window: AtomicU64,
    pub sent: AtomicU64,
    /// Batches a PUB dropped before the ingester's subscription reached it
    /// (measured once, at rest): never applied, never in flight.
    pub dropped: AtomicU64,
    /// Updated from `/metrics` by the driver's monitor.
    pub applied: AtomicU64,
    /// Nanoseconds publishers spent encoding and sending / waiting for the window.
    pub busy_ns: AtomicU64,
    pub wait_ns: AtomicU64,
}

impl Control {
    pub fn set_rate(&self, per_pod: f64) {
        self.rate_bits.store(per_pod.to_bits(), Relaxed);
    }

    /// Batches sent and delivered but not applied yet.
    pub fn in_flight(&self) -> u64 {
        let delivered = self
            .sent
            .load(Relaxed)
            .saturating_sub(self.dropped.load(Relaxed));
        delivered.saturating_sub(self.applied.load(Relaxed))
    }
}

/// Publishes `stream` until `ctl.stop`; returns batches sent.
pub async fn publish(
    stream: Arc<PodStream>,
    endpoint: String,
    ctl: Arc<Control>,
    samples: mpsc::UnboundedSender<Sample>,
) -> anyhow::Result<u64> {
    let mut socket = zeromq::PubSocket::new();
    socket.connect(&endpoint).await?;
    let field = format!("{}@gpu", stream.pod);
    let (mut seq, mut k) = (0u64, 0usize);
    // (start, seq at start, rate) of the current paced run.
    let mut pace: Option<(Instant, u64, f64)> = None;
    let mut payload = Vec::with_capacity(64 * 1024);
    while !ctl.stop.load(Relaxed) {
        if ctl.pause.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let rate = f64::from_bits(ctl.rate_bits.load(Relaxed));
        if rate > 0.0 {
            let (start, seq0, _) = match pace {
                Some(p) if p.2 == rate => p,
                _ => *pace.insert((Instant::now(), seq, rate)),
            };
            let due = seq0 + (start.elapsed().as_secs_f64() * rate) as u64;
            if seq >= due {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        } else {
            pace = None;
        }
        if ctl.in_flight() > ctl.window.load(Relaxed) {
            let t = Instant::now();
            tokio::time::sleep(Duration::from_millis(1)).await;
            ctl.wait_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
            continue;
        }
        let t = Instant::now();
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        payload.clear();
        let batch = BatchRef {
            ts,
            events: &stream.cycle[k],
            data_parallel_rank: None,
        };
        kvroute_core::events::encode_batch_into(batch, stream.encoding, &mut payload);
        let mut msg = ZmqMessage::from(stream.topic.clone());
        msg.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
        msg.push_back(Bytes::copy_from_slice(&payload));
        socket.send(msg).await?;
        let every = ctl.sample_every.load(Relaxed);
        if every > 0 && seq % every == 0 {
            let _ = samples.send(Sample {
                key: stream.first_store[k].clone(),
                field: field.clone(),
                at: Instant::now(),
            });
        }
        ctl.busy_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        ctl.sent.fetch_add(1, Relaxed);
        seq += 1;
        k = (k + 1) % stream.cycle.len();
        // A PUB send only queues: yield so the writer task gets the core.
        tokio::task::yield_now().await;
    }
    let _ = socket.close().await;
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_core::keys::HashScheme;

    #[test]
    fn a_stream_alternates_stores_and_evictions_of_held_stores() {
        let shape = Shape {
            scheme: KeyScheme::new(HashScheme::Sha256Cbor, "s", 16).expect("scheme"),
            encoding: Encoding::Map,
            events_per_batch: 4,
            blocks_per_event: 2,
            held: 3,
        };
        let s = PodStream::build(0, &shape, 1);
        assert_eq!(s.cycle.len(), 2 * 3 * 2 * 2 / 4);
        let stored: Vec<&BlockStored> = s
            .cycle
            .iter()
            .flatten()
            .filter_map(|e| match e {
                KvEvent::BlockStored(b) => Some(b),
                _ => None,
            })
            .collect();
        let removed: Vec<&BlockRemoved> = s
            .cycle
            .iter()
            .flatten()
            .filter_map(|e| match e {
                KvEvent::BlockRemoved(b) => Some(b),
                _ => None,
            })
            .collect();
        assert_eq!(stored.len(), removed.len());
        // Step i evicts what step i - held stored.
        for i in shape.held..stored.len() {
            assert_eq!(removed[i].block_hashes, stored[i - shape.held].block_hashes);
        }
        assert_eq!(stored[0].token_ids.len(), 32);
    }
}
