//! Counters of the socket stage. Plain atomics, so the receive loops pay one
//! relaxed add per message and the metrics module (or a test) reads them
//! whenever it likes through [`SocketStats::snapshot`].

use kvroute_core::events::FrameError;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a message was skipped before decoding; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// Not exactly three frames.
    FrameCount,
    /// The topic frame is not UTF-8.
    TopicNotUtf8,
    /// The sequence frame is not 8 bytes.
    SeqLength,
}

impl Malformed {
    pub const ALL: [Malformed; 3] = [
        Malformed::FrameCount,
        Malformed::TopicNotUtf8,
        Malformed::SeqLength,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            Malformed::FrameCount => "frame_count",
            Malformed::TopicNotUtf8 => "topic_not_utf8",
            Malformed::SeqLength => "seq_length",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<&FrameError> for Malformed {
    fn from(e: &FrameError) -> Self {
        match e {
            FrameError::FrameCount { .. } => Malformed::FrameCount,
            FrameError::TopicNotUtf8 => Malformed::TopicNotUtf8,
            FrameError::SeqLength { .. } => Malformed::SeqLength,
        }
    }
}

/// Why a peer's connection was refused or dropped by the transport bounds;
/// a metric label (`kvroute_ingester_zmq_rejected_total{mode, reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejected {
    /// A frame header declared more than `--zmq-max-message-size`.
    TooLarge,
    /// Bind mode: no complete handshake within `--zmq-handshake-timeout`.
    HandshakeTimeout,
    /// Bind mode: `--zmq-max-connections` were already open.
    TooManyConnections,
    /// Anything else that broke the ZMTP protocol (bad greeting, wrong
    /// socket type, a malformed command).
    Protocol,
}

impl Rejected {
    pub const ALL: [Rejected; 4] = [
        Rejected::TooLarge,
        Rejected::HandshakeTimeout,
        Rejected::TooManyConnections,
        Rejected::Protocol,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            Rejected::TooLarge => "too_large",
            Rejected::HandshakeTimeout => "handshake_timeout",
            Rejected::TooManyConnections => "too_many_connections",
            Rejected::Protocol => "protocol",
        }
    }

    /// What a `zeromq` error says of the peer: `None` when it is no
    /// rejection (the peer went away, a network error).
    pub fn of(error: &zeromq::ZmqError) -> Option<Rejected> {
        use zeromq::{CodecError, ZmqError};
        match error {
            ZmqError::Codec(CodecError::MessageTooLarge { .. }) => Some(Rejected::TooLarge),
            ZmqError::Codec(CodecError::Io(_)) => None,
            ZmqError::Codec(_) => Some(Rejected::Protocol),
            ZmqError::HandshakeTimeout(_) => Some(Rejected::HandshakeTimeout),
            ZmqError::TooManyPeers(_) => Some(Rejected::TooManyConnections),
            ZmqError::UnsupportedVersion(_) | ZmqError::PeerIdentity | ZmqError::Other(_) => {
                Some(Rejected::Protocol)
            }
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Rejections logged at warn: the first of each mode and reason, then every
/// this many (a peer that reconnects and misbehaves in a loop must not
/// flood the log); the rest at debug. The counter counts all.
const WARN_EVERY_REJECTION: u64 = 100;

/// Counters and gauges of all SUB sockets of one ingester.
#[derive(Debug, Default)]
pub struct SocketStats {
    received: AtomicU64,
    filtered: AtomicU64,
    malformed: [AtomicU64; 3],
    connects: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    bind_peers: AtomicU64,
    connect_peers: AtomicU64,
    connect_endpoints: AtomicU64,
    /// Connect-mode endpoints with a live connection right now. Read by the
    /// purge sweeper: a connection is the only sign of life an idle vLLM
    /// gives (it publishes nothing while its cache does not change). A
    /// mutex: changed per connect and disconnect, read per sweep. Counted,
    /// because an endpoint that leaves and re-enters the set may briefly
    /// have an old and a new connection.
    connected: Mutex<HashMap<String, usize>>,
    /// Peers rejected, by mode (0 bind, 1 connect) and [`Rejected`] reason.
    rejected: [[AtomicU64; 4]; 2],
}

/// A point-in-time copy of [`SocketStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketStatsSnapshot {
    /// Well-formed messages of a subscribed topic, counted when read (before
    /// the wait for room in the output channel).
    pub received: u64,
    /// Messages whose topic did not match the filter (a publisher that does
    /// not filter for us; libzmq's PUB normally drops them itself).
    pub filtered: u64,
    /// Skipped messages, by reason, in [`Malformed::ALL`] order.
    pub malformed: [u64; 3],
    /// Successful dials in connect mode (first connections and re-dials).
    pub connects: u64,
    /// Re-dials that succeeded after a connection to the same endpoint was lost.
    pub reconnects: u64,
    /// Dials that failed (publisher down, timeout).
    pub connect_failures: u64,
    /// Publishers currently connected to the bound SUB.
    pub bind_peers: u64,
    /// Connect-mode endpoints currently connected.
    pub connect_peers: u64,
    /// Connect-mode endpoints currently supervised (connected or not).
    pub connect_endpoints: u64,
    /// Peers rejected in bind mode, by reason in [`Rejected::ALL`] order.
    pub rejected_bind: [u64; 4],
    /// Publishers rejected in connect mode, by reason.
    pub rejected_connect: [u64; 4],
}

impl SocketStatsSnapshot {
    pub fn malformed(&self, reason: Malformed) -> u64 {
        self.malformed[reason.index()]
    }

    /// Rejections of `reason` in `mode` (`"bind"` or `"connect"`).
    pub fn rejected(&self, mode: &str, reason: Rejected) -> u64 {
        match mode {
            "bind" => self.rejected_bind[reason.index()],
            _ => self.rejected_connect[reason.index()],
        }
    }

    pub fn malformed_total(&self) -> u64 {
        self.malformed.iter().sum()
    }
}

impl SocketStats {
    pub fn snapshot(&self) -> SocketStatsSnapshot {
        SocketStatsSnapshot {
            received: self.received.load(Relaxed),
            filtered: self.filtered.load(Relaxed),
            malformed: [0, 1, 2].map(|i| self.malformed[i].load(Relaxed)),
            connects: self.connects.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            bind_peers: self.bind_peers.load(Relaxed),
            connect_peers: self.connect_peers.load(Relaxed),
            connect_endpoints: self.connect_endpoints.load(Relaxed),
            rejected_bind: [0, 1, 2, 3].map(|i| self.rejected[0][i].load(Relaxed)),
            rejected_connect: [0, 1, 2, 3].map(|i| self.rejected[1][i].load(Relaxed)),
        }
    }

    /// Counts and logs a peer that `error` shows was rejected by the
    /// transport bounds (or broke the protocol); returns whether it was
    /// one. `mode` is `"bind"` or `"connect"`, `peer` names it in the log.
    pub(super) fn rejected(
        &self,
        mode: &'static str,
        peer: &str,
        error: &zeromq::ZmqError,
    ) -> bool {
        let Some(reason) = Rejected::of(error) else {
            return false;
        };
        let m = usize::from(mode != "bind");
        let n = self.rejected[m][reason.index()].fetch_add(1, Relaxed) + 1;
        if n == 1 || n.is_multiple_of(WARN_EVERY_REJECTION) {
            tracing::warn!(mode, reason = reason.as_label(), peer, %error, rejected = n, "ZeroMQ peer rejected and disconnected");
        } else {
            tracing::debug!(mode, reason = reason.as_label(), peer, %error, rejected = n, "ZeroMQ peer rejected and disconnected");
        }
        true
    }

    pub(super) fn received(&self) {
        self.received.fetch_add(1, Relaxed);
    }

    pub(super) fn filtered(&self) {
        self.filtered.fetch_add(1, Relaxed);
    }

    pub(super) fn malformed(&self, reason: Malformed) {
        self.malformed[reason.index()].fetch_add(1, Relaxed);
    }

    pub(super) fn connected(&self, reconnect: bool) {
        self.connects.fetch_add(1, Relaxed);
        if reconnect {
            self.reconnects.fetch_add(1, Relaxed);
        }
    }

    /// Whether the connect-mode socket to `endpoint` is connected now.
    pub fn is_connected(&self, endpoint: &str) -> bool {
        self.connected.lock().get(endpoint).is_some_and(|n| *n > 0)
    }

    pub(super) fn connect_failed(&self) {
        self.connect_failures.fetch_add(1, Relaxed);
    }

    pub(super) fn gauge(&self, gauge: Gauge) -> &AtomicU64 {
        match gauge {
            Gauge::BindPeers => &self.bind_peers,
            Gauge::ConnectPeers => &self.connect_peers,
            Gauge::ConnectEndpoints => &self.connect_endpoints,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Gauge {
    BindPeers,
    ConnectPeers,
    ConnectEndpoints,
}

/// Holds one unit of a gauge and gives it back when dropped, so every exit
/// path of a task (error, cancel, panic) leaves the gauge right.
pub(super) struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub(super) fn new(stats: &'a SocketStats, gauge: Gauge) -> Self {
        let g = stats.gauge(gauge);
        g.fetch_add(1, Relaxed);
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        decrement(self.0);
    }
}

/// Marks a connect-mode endpoint connected while held (every exit path).
pub(super) struct ConnectedGuard<'a> {
    stats: &'a SocketStats,
    endpoint: &'a str,
}

impl<'a> ConnectedGuard<'a> {
    pub(super) fn new(stats: &'a SocketStats, endpoint: &'a str) -> Self {
        *stats
            .connected
            .lock()
            .entry(endpoint.to_owned())
            .or_default() += 1;
        ConnectedGuard { stats, endpoint }
    }
}

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        let mut connected = self.stats.connected.lock();
        if let Some(n) = connected.get_mut(self.endpoint) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                connected.remove(self.endpoint);
            }
        }
    }
}

/// Decrements without wrapping below zero (a disconnect event for a peer
/// whose connect was never counted must not make the gauge huge).
pub(super) fn decrement(g: &AtomicU64) {
    let _ = g.fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
}
