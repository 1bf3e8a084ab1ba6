//! Connect mode: the ingester dials each publisher, one SUB per endpoint,
//! each under its own supervisor task.
//!
//! Why not one SUB connected to every endpoint and the crate's reconnect:
//! `zeromq` 0.7 redials a lost peer with exponential backoff up to 30 s, so a
//! restarted pod would go unheard (and its batches lost) for up to that long.
//! What the crate does offer is enough to do better: a peer whose TCP stream
//! ends is reported as `SocketEvent::Disconnected` on the socket monitor (or
//! as a `recv` error). On either, the task drops the socket (which stops the
//! crate's own reconnect task) and dials again with a fresh one after a short
//! fixed delay. A dial itself is bounded by `connect_timeout`, within which
//! the crate retries a refused TCP connect at 50, 100, 200 ms, so while a
//! publisher is down the gaps between attempts stay around 250 ms and it is
//! heard again well within a second of coming back. One socket per endpoint
//! also means adding or removing an endpoint never touches the others.
//!
//! Not covered: a publisher whose host vanishes without closing TCP (no FIN,
//! no RST) looks connected until the kernel gives up; ZMTP heartbeats are not
//! implemented by the crate. In Kubernetes such a pod also leaves DNS, and
//! the endpoint set (see `crate::targets`) then removes it.

use super::intake::{Intake, Stop};
use super::stats::{ConnectedGuard, Gauge, GaugeGuard, SocketStats};
use super::{RawBatch, SocketError, SubOptions};
use futures::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::{self, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use zeromq::{Socket, SocketEvent, SocketRecv, SubSocket};

/// Default bound on one dial (TCP connect retries + ZMTP handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default pause before re-dialing a lost or unreachable publisher.
pub const DEFAULT_REDIAL_DELAY: Duration = Duration::from_millis(100);

/// Failed dials in a row logged at warn: the first, then every this many
/// (about once a minute at the default timings); the rest at debug.
const WARN_EVERY_FAILURES: u64 = 100;

/// Keeps one supervised SUB per endpoint of the current `targets` set until
/// `shutdown`. Endpoints added to the set are dialed at once; removed ones
/// are closed; the others are left alone.
pub async fn run_connect(
    mut targets: watch::Receiver<BTreeSet<String>>,
    options: SubOptions,
    out: mpsc::Sender<RawBatch>,
    stats: Arc<SocketStats>,
    shutdown: CancellationToken,
) -> Result<(), SocketError> {
    // Endpoint -> its task's token and id (the id tells a finished old task
    // from the new one of an endpoint that was removed and re-added).
    let mut running: HashMap<String, (CancellationToken, task::Id)> = HashMap::new();
    let mut endpoints_of: HashMap<task::Id, String> = HashMap::new();
    let mut tasks: JoinSet<Result<(), Stop>> = JoinSet::new();
    let mut watching = true;
    let mut wanted = targets.borrow_and_update().clone();
    tracing::info!(endpoints = wanted.len(), filter = %options.topic_filter, "connect-mode supervisor started");
    let result = loop {
        // Reconcile the running tasks with the wanted set.
        running.retain(|endpoint, (cancel, _)| {
            let keep = wanted.contains(endpoint);
            if !keep {
                tracing::info!(%endpoint, "publisher left the endpoint set; closing its socket");
                cancel.cancel();
            }
            keep
        });
        for endpoint in &wanted {
            if running.contains_key(endpoint) {
                continue;
            }
            let cancel = shutdown.child_token();
            let span = tracing::info_span!("zmq_sub", mode = "connect", %endpoint);
            let task = Endpoint {
                endpoint: endpoint.clone(),
                options: options.clone(),
                out: out.clone(),
                stats: stats.clone(),
                cancel: cancel.clone(),
            };
            let id = tasks.spawn(task.supervise().instrument(span)).id();
            running.insert(endpoint.clone(), (cancel, id));
            endpoints_of.insert(id, endpoint.clone());
        }

        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            changed = targets.changed(), if watching => match changed {
                Ok(()) => wanted = targets.borrow_and_update().clone(),
                Err(_) => {
                    tracing::warn!(endpoints = wanted.len(), "endpoint discovery stopped; keeping the last endpoint set");
                    watching = false;
                }
            },
            Some(joined) = tasks.join_next_with_id() => {
                let (id, outcome) = match joined {
                    Ok((id, r)) => (id, Ok(r)),
                    Err(e) => (e.id(), Err(e)),
                };
                let endpoint = endpoints_of.remove(&id).unwrap_or_default();
                match outcome {
                    Ok(Err(Stop::OutputClosed)) => break Err(SocketError::OutputClosed),
                    Ok(_) => {}
                    // Restarted by the reconcile pass at the top of the loop.
                    Err(e) => tracing::error!(%endpoint, error = %e, "endpoint task failed; restarting it"),
                }
                // A task that ended while its endpoint is still wanted (a
                // panic) is forgotten, so the next pass starts a new one.
                if running.get(&endpoint).is_some_and(|(_, running_id)| *running_id == id) {
                    running.remove(&endpoint);
                }
            },
        }
    };
    for (cancel, _) in running.values() {
        cancel.cancel();
    }
    while tasks.join_next().await.is_some() {}
    match &result {
        Ok(()) => tracing::info!("connect-mode supervisor stopped: shutdown"),
        Err(e) => tracing::warn!(error = %e, "connect-mode supervisor stopped"),
    }
    result
}

/// One publisher endpoint under supervision.
struct Endpoint {
    endpoint: String,
    options: SubOptions,
    out: mpsc::Sender<RawBatch>,
    stats: Arc<SocketStats>,
    /// Cancelled on shutdown or when the endpoint leaves the set.
    cancel: CancellationToken,
}

/// How one connection ended.
enum Lost {
    /// The publisher went away (disconnect event or receive error).
    Peer(String),
    Stop(Stop),
}

impl Endpoint {
    /// Dials, receives, and re-dials until cancelled.
    async fn supervise(self) -> Result<(), Stop> {
        let _supervised = GaugeGuard::new(&self.stats, Gauge::ConnectEndpoints);
        let source = format!("connect:{}", self.endpoint);
        let mut intake = Intake::new(
            &self.options.topic_filter,
            source,
            self.out.clone(),
            self.stats.clone(),
        );
        let mut connected_before = false;
        let mut failures: u64 = 0;
        let result = loop {
            let dialed = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break Ok(()),
                dialed = self.dial() => dialed,
            };
            let (mut socket, mut monitor) = match dialed {
                Ok(s) => s,
                Err(error) => {
                    failures += 1;
                    self.stats.connect_failed();
                    // A publisher that broke the bounds during the handshake.
                    self.stats.rejected("connect", &self.endpoint, &error);
                    if failures == 1 || failures.is_multiple_of(WARN_EVERY_FAILURES) {
                        tracing::warn!(%error, failures, "cannot reach publisher; retrying");
                    } else {
                        tracing::debug!(%error, failures, "cannot reach publisher; retrying");
                    }
                    if self.pause().await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
            };
            self.stats.connected(connected_before);
            tracing::info!(
                reconnect = connected_before,
                failed_dials = failures,
                "connected to publisher"
            );
            connected_before = true;
            failures = 0;
            let lost = {
                let _peer = GaugeGuard::new(&self.stats, Gauge::ConnectPeers);
                let _up = ConnectedGuard::new(&self.stats, &self.endpoint);
                self.receive(&mut socket, &mut monitor, &mut intake).await
            };
            // Dropping the socket also stops the crate's own reconnect task.
            drop(socket);
            match lost {
                Lost::Stop(Stop::Shutdown) => break Ok(()),
                Lost::Stop(Stop::OutputClosed) => break Err(Stop::OutputClosed),
                Lost::Peer(why) => {
                    tracing::warn!(reason = %why, "publisher connection lost; redialing");
                    if self.pause().await.is_err() {
                        break Ok(());
                    }
                }
            }
        };
        match &result {
            Ok(()) => tracing::info!("endpoint task stopped: cancelled (shutdown or left the set)"),
            Err(_) => tracing::warn!("endpoint task stopped: the batch channel closed"),
        }
        result
    }

    /// One dial with a fresh socket, subscribed before connecting so the
    /// subscription reaches the publisher in the handshake's wake.
    async fn dial(
        &self,
    ) -> Result<(SubSocket, futures::channel::mpsc::Receiver<SocketEvent>), zeromq::ZmqError> {
        let mut socket = SubSocket::with_options(self.options.zmq_options());
        let monitor = socket.monitor();
        socket.subscribe(&self.options.topic_filter).await?;
        socket.connect(&self.endpoint).await?;
        Ok((socket, monitor))
    }

    /// Reads until the publisher goes away or the task must stop.
    async fn receive(
        &self,
        socket: &mut SubSocket,
        monitor: &mut futures::channel::mpsc::Receiver<SocketEvent>,
        intake: &mut Intake,
    ) -> Lost {
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Lost::Stop(Stop::Shutdown),
                Some(event) = monitor.next() => {
                    if let SocketEvent::Disconnected(peer) = event {
                        return Lost::Peer(format!("peer {peer:?} disconnected"));
                    }
                }
                msg = socket.recv() => match msg {
                    Ok(msg) => {
                        if let Err(stop) = intake.handle(msg, &self.cancel).await {
                            return Lost::Stop(stop);
                        }
                    }
                    Err(error) => {
                        self.stats.rejected("connect", &self.endpoint, &error);
                        return Lost::Peer(format!("receive failed: {error}"));
                    }
                },
            }
        }
    }

    /// Waits the redial delay; `Err` when cancelled meanwhile.
    async fn pause(&self) -> Result<(), ()> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(()),
            _ = tokio::time::sleep(self.options.redial_delay) => Ok(()),
        }
    }
}
