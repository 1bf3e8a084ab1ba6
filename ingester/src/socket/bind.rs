//! Bind mode: one SUB socket bound to every configured address; vLLM pods
//! point their `--kv-events-config` endpoint at it and connect. Reconnection
//! is the publishers' job here (libzmq redials every 100 ms), so this side
//! only accepts, counts peers, and reads.

use super::intake::{Intake, Stop};
use super::stats::{Gauge, SocketStats, decrement};
use super::{RawBatch, SocketError, SubOptions};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use zeromq::{Socket, SocketEvent, SocketRecv, SubSocket};

/// Normalises a bind address for the `zeromq` crate: it rejects vLLM's
/// wildcard `tcp://*:P`, so that becomes `tcp://0.0.0.0:P`. Only `tcp://` is
/// accepted (the crate is built without IPC).
pub fn bind_endpoint(endpoint: &str) -> Result<String, SocketError> {
    let invalid = |reason| SocketError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let rest = endpoint
        .trim()
        .strip_prefix("tcp://")
        .ok_or_else(|| invalid("only tcp:// endpoints are supported"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected tcp://HOST:PORT"))?;
    port.parse::<u16>()
        .map_err(|_| invalid("the port is not a number in 0..=65535"))?;
    let host = match host {
        "*" => "0.0.0.0",
        "" => {
            return Err(invalid(
                "empty host (use tcp://*:PORT or tcp://0.0.0.0:PORT)",
            ));
        }
        h => h,
    };
    Ok(format!("tcp://{host}:{port}"))
}

/// A SUB socket bound and subscribed, not yet reading.
///
/// Binding is separate from [`BoundSub::run`] so the caller learns the
/// actual addresses (port 0 resolved) before anything is received, and a
/// bind error surfaces before the service reports ready.
pub struct BoundSub {
    socket: SubSocket,
    monitor: futures::channel::mpsc::Receiver<SocketEvent>,
    endpoints: Vec<String>,
    filter: String,
}

impl BoundSub {
    pub async fn bind(endpoints: &[String], options: &SubOptions) -> Result<Self, SocketError> {
        let mut socket = SubSocket::with_options(options.zmq_options());
        let monitor = socket.monitor();
        socket
            .subscribe(&options.topic_filter)
            .await
            .map_err(|source| SocketError::Subscribe {
                filter: options.topic_filter.clone(),
                source,
            })?;
        let mut bound = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let endpoint = bind_endpoint(e)?;
            let resolved = socket
                .bind(&endpoint)
                .await
                .map_err(|source| SocketError::Bind {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            bound.push(resolved.to_string());
        }
        Ok(BoundSub {
            socket,
            monitor,
            endpoints: bound,
            filter: options.topic_filter.clone(),
        })
    }

    /// The bound addresses, with port 0 resolved to the actual port.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Receives until `shutdown` (or until `out` closes, an error).
    pub async fn run(
        self,
        out: mpsc::Sender<RawBatch>,
        stats: Arc<SocketStats>,
        shutdown: CancellationToken,
    ) -> Result<(), SocketError> {
        let span =
            tracing::info_span!("zmq_sub", mode = "bind", endpoints = %self.endpoints.join(","));
        self.receive(out, stats, shutdown).instrument(span).await
    }

    async fn receive(
        mut self,
        out: mpsc::Sender<RawBatch>,
        stats: Arc<SocketStats>,
        shutdown: CancellationToken,
    ) -> Result<(), SocketError> {
        let source = format!("bind:{}", self.endpoints.join(","));
        let mut intake = Intake::new(&self.filter, source, out, stats.clone());
        let peers = stats.gauge(Gauge::BindPeers);
        // Peers this socket added to the gauge, given back when it stops.
        let mut counted: u64 = 0;
        let stop = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Stop::Shutdown,
                Some(event) = self.monitor.next() => match event {
                    SocketEvent::Accepted(endpoint, peer) => {
                        peers.fetch_add(1, Relaxed);
                        counted += 1;
                        tracing::info!(%endpoint, ?peer, "publisher connected");
                    }
                    SocketEvent::Disconnected(peer) => {
                        if counted > 0 {
                            counted -= 1;
                            decrement(peers);
                        }
                        tracing::info!(?peer, "publisher disconnected");
                    }
                    // Counted and logged there when the bounds refused it.
                    SocketEvent::AcceptFailed(error)
                        if !stats.rejected("bind", "an accepted connection", &error) =>
                    {
                        tracing::warn!(%error, "a publisher's connection failed its handshake");
                    }
                    _ => {}
                },
                msg = self.socket.recv() => match msg {
                    Ok(msg) => {
                        if let Err(stop) = intake.handle(msg, &shutdown).await {
                            break stop;
                        }
                    }
                    // One peer's stream failed (an oversized frame among
                    // them); the socket dropped that peer and keeps serving
                    // the others.
                    Err(error) => {
                        if !stats.rejected("bind", "a connected publisher", &error) {
                            tracing::debug!(%error, "a publisher's stream ended with an error");
                        }
                    }
                },
            }
        };
        for _ in 0..counted {
            decrement(peers);
        }
        match stop {
            Stop::Shutdown => {
                tracing::info!("bind-mode SUB stopped: shutdown");
                Ok(())
            }
            Stop::OutputClosed => {
                tracing::warn!("bind-mode SUB stopped: the batch channel closed");
                Err(SocketError::OutputClosed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_and_validation() {
        assert_eq!(
            bind_endpoint("tcp://*:5557").expect("ok"),
            "tcp://0.0.0.0:5557"
        );
        assert_eq!(
            bind_endpoint("tcp://127.0.0.1:0").expect("ok"),
            "tcp://127.0.0.1:0"
        );
        assert_eq!(
            bind_endpoint("tcp://[::1]:5557").expect("ok"),
            "tcp://[::1]:5557"
        );
        for bad in [
            "ipc:///tmp/x",
            "tcp://:5557",
            "tcp://*",
            "tcp://*:http",
            "tcp://*:70000",
            "5557",
        ] {
            assert!(bind_endpoint(bad).is_err(), "{bad}");
        }
    }
}
