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
}

impl SocketStatsSnapshot {
    pub fn malformed(&self, reason: Malformed) -> u64 {
        self.malformed[reason.index()]
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
        }
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
