//! The ingester's first stage: ZeroMQ SUB sockets that receive vLLM's
//! `[topic, seq, payload]` messages and hand them on as [`RawBatch`]es.
//!
//! | file | purpose |
//! |---|---|
//! | `mod.rs` | [`RawBatch`], [`SubOptions`], [`SocketError`], [`run`] (both modes), [`run_with`] |
//! | `bind.rs` | [`BoundSub`]: one SUB bound to every `--zmq-bind` address; pods connect |
//! | `connect.rs` | [`run_connect`]: one supervised SUB per publisher endpoint |
//! | `intake.rs` | frames -> [`RawBatch`], the topic check, backpressure |
//! | `stats.rs` | [`SocketStats`]: counters the metrics module exports; [`Rejected`] peers |
//!
//! Hostile or broken peers: every socket (and the replay client) runs with
//! the bounds of the patched `zeromq` crate (`vendor/zeromq`): a frame
//! header declaring more than `--zmq-max-message-size` is refused before
//! any allocation, and in bind mode a handshake must end within
//! `--zmq-handshake-timeout` and at most `--zmq-max-connections` are open
//! per address. The peer is disconnected, counted ([`Rejected`]) and logged;
//! the other peers are not affected.
//!
//! Why two modes: vLLM's publisher binds (`tcp://*:5557`) or connects,
//! depending on its endpoint. When the ingester binds, pods reconnect on
//! their own (libzmq retries every 100 ms) and nothing is lost across
//! restarts. When the ingester connects, the `zeromq` crate's built-in
//! reconnect backs off exponentially up to 30 s and loses whatever the
//! publisher sends meanwhile, so [`run_connect`] supervises every endpoint
//! itself: it watches for the peer going away and re-dials on a short fixed
//! delay with a fresh socket (see `connect.rs`).
//!
//! Backpressure: the output channel is bounded and a socket waits for room
//! before it reads the next message, so a slow pipeline stops the reads, TCP
//! fills, and ZeroMQ's high-water mark at the publisher applies. Nothing here
//! queues without bound; losses show up downstream as sequence gaps.

mod bind;
mod connect;
mod intake;
mod stats;

pub use bind::{BoundSub, bind_endpoint};
pub use connect::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_REDIAL_DELAY, run_connect};
pub use stats::{Malformed, Rejected, SocketStats, SocketStatsSnapshot};

use bytes::Bytes;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The topic prefix subscribed to by default (llm-d's `kv@<pod>@<model>`).
pub const DEFAULT_TOPIC_FILTER: &str = "kv@";

/// One message as published, before decoding: the one type that flows from
/// the socket through the dispatcher to the worker, which parses its topic
/// and decodes its payload.
#[derive(Debug, Clone)]
pub struct RawBatch {
    /// The topic, checked to be UTF-8 (`kv@<pod>@<model>`).
    pub topic: String,
    /// vLLM's sequence number (int64 on the wire; `-1` reads as `u64::MAX`).
    pub seq: u64,
    /// The msgpack `EventBatch`, shared with the receive buffer (no copy).
    pub payload: Bytes,
    /// When the socket read it: lag and latency measurements start here.
    pub received_at: Instant,
    /// The endpoint it came from (`connect:tcp://127.0.0.5:5557`,
    /// `bind:tcp://0.0.0.0:5557`), for logs only.
    pub source: String,
}

impl RawBatch {
    /// A message received now from `source`.
    pub fn new(
        topic: impl Into<String>,
        seq: u64,
        payload: impl Into<Bytes>,
        source: impl Into<String>,
    ) -> Self {
        RawBatch {
            topic: topic.into(),
            seq,
            payload: payload.into(),
            received_at: Instant::now(),
            source: source.into(),
        }
    }
}

/// Settings shared by both modes.
#[derive(Debug, Clone)]
pub struct SubOptions {
    /// Topic prefix to subscribe to; empty subscribes to everything (vLLM's
    /// default topic is the empty string).
    pub topic_filter: String,
    /// Connect mode: how long one dial may take (TCP connect retries plus the
    /// ZMTP handshake). Short, because while a publisher is down each dial
    /// ends by this timeout and the next starts after `redial_delay`; the
    /// crate retries inside a dial at 50, 100, 200 ms.
    pub connect_timeout: Duration,
    /// Connect mode: pause between a lost or failed connection and the next
    /// dial. Fixed, not exponential: a restarted pod must be heard again
    /// within a second, and a dial to a closed loopback or LAN port is cheap.
    pub redial_delay: Duration,
    /// Largest message a peer may send (`--zmq-max-message-size`): checked
    /// against each frame header before anything is reserved for it.
    pub max_message_size: usize,
    /// Bind mode: the ZMTP handshake of an accepted connection must end
    /// within this (`--zmq-handshake-timeout`).
    pub handshake_timeout: Duration,
    /// Bind mode: connections kept at once per bound address
    /// (`--zmq-max-connections`).
    pub max_connections: usize,
}

/// Default `--zmq-max-message-size` (`config.rs` says why this much).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;
/// Default `--zmq-handshake-timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `--zmq-max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

impl Default for SubOptions {
    fn default() -> Self {
        SubOptions {
            topic_filter: DEFAULT_TOPIC_FILTER.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            redial_delay: DEFAULT_REDIAL_DELAY,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl SubOptions {
    /// The `zeromq` socket options every socket of the ingester gets: the
    /// bounds of the patched crate (`vendor/zeromq`, docs/dependencies.md).
    pub fn zmq_options(&self) -> zeromq::SocketOptions {
        let mut o = zeromq::SocketOptions::default();
        o.connect_timeout(self.connect_timeout)
            .max_message_size(self.max_message_size)
            .handshake_timeout(self.handshake_timeout)
            .max_accepted_peers(self.max_connections);
        o
    }
}

/// What [`run`] receives from.
#[derive(Debug)]
pub struct SocketConfig {
    pub options: SubOptions,
    /// Addresses to bind one SUB to (`tcp://*:5557` is accepted).
    pub bind: Vec<String>,
    /// The current set of publisher endpoints to dial (see
    /// [`crate::targets`]); `None`: no connect mode.
    pub connect: Option<watch::Receiver<BTreeSet<String>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("invalid ZeroMQ endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error("cannot subscribe to {filter:?}: {source}")]
    Subscribe {
        filter: String,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error("nothing to receive from: no bind address and no connect targets")]
    NothingToDo,
    /// The receiver of `out` was dropped while sockets were still running.
    #[error("the batch channel closed before shutdown")]
    OutputClosed,
}

/// Runs every configured socket until `shutdown`: binds first (a bind error
/// is returned at once), then receives in both modes concurrently.
pub async fn run(
    config: SocketConfig,
    out: mpsc::Sender<RawBatch>,
    stats: Arc<SocketStats>,
    shutdown: CancellationToken,
) -> Result<(), SocketError> {
    run_with(config, out, stats, shutdown, || {}).await
}

/// [`run`], calling `up` once every bind succeeded and receiving starts: the
/// service's readiness says "sockets up" from then on, not before.
pub async fn run_with(
    config: SocketConfig,
    out: mpsc::Sender<RawBatch>,
    stats: Arc<SocketStats>,
    shutdown: CancellationToken,
    up: impl FnOnce(),
) -> Result<(), SocketError> {
    if config.bind.is_empty() && config.connect.is_none() {
        return Err(SocketError::NothingToDo);
    }
    let bound = if config.bind.is_empty() {
        None
    } else {
        let b = BoundSub::bind(&config.bind, &config.options).await?;
        tracing::info!(endpoints = ?b.endpoints(), filter = %config.options.topic_filter, "SUB bound; publishers connect here");
        Some(b)
    };
    up();
    let bind_task = async {
        match bound {
            Some(b) => b.run(out.clone(), stats.clone(), shutdown.clone()).await,
            None => Ok(()),
        }
    };
    let connect_task = async {
        match config.connect {
            Some(targets) => {
                run_connect(
                    targets,
                    config.options.clone(),
                    out.clone(),
                    stats.clone(),
                    shutdown.clone(),
                )
                .await
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(bind_task, connect_task).map(|_| ())
}
