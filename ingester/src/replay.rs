//! Refilling sequence gaps from vLLM's replay socket.
//!
//! vLLM's publisher can bind a ROUTER (`replay_endpoint`) that keeps its last
//! `buffer_steps` batches. The protocol, from `vllm/distributed/kv_events.py`:
//! the client sends `["", start_seq as 8-byte big-endian]` and receives one
//! message per buffered batch with `seq >= start_seq`, then an end marker
//! with seq `-1` and an empty payload. vLLM 0.10 replies `["", seq, payload]`
//! (end: `["", -1, ""]`); newer vLLM (0.33 here) adds the topic,
//! `["", topic, seq, payload]` (end: `["", "", -1, ""]`). Both are accepted.
//!
//! Why a DEALER: a REQ socket expects exactly one reply per request and
//! stops after the first of the stream (with both ZeroMQ libraries); a
//! DEALER takes them all, with the empty delimiter frame added by hand.
//!
//! A replay is bounded in time (one deadline for dial, request and every
//! reply) and in count ([`ReplayOptions::max_batches`]), and it opens a fresh
//! socket each time: gaps are rare, and a socket left connected to a pod
//! that restarted would be one more thing to supervise.

use crate::worker::{ReplayedBatches, Replayer};
use bytes::Bytes;
use kvroute_core::events::{FrameError, PodAddr, Topic, parse_replay_frames};
use std::time::Duration;
use tokio::time::{Instant, timeout_at};
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

/// vLLM's default replay buffer (`buffer_steps`): a full replay fits.
pub const DEFAULT_MAX_BATCHES: usize = 10_000;
/// Payload bytes one replay may hold: vLLM's 10,000 buffered batches at
/// 25 KB each (a busy step; the default 8,192-token step is at most 70 KB,
/// most steps store a few blocks), and four workers replaying at once stay
/// within 1 GiB. A replay over it fails like one over `max_batches`.
pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

/// One batch from the replay socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The topic, when the publisher sends it (newer vLLM); `None` for 0.10's
    /// two-frame replies.
    pub topic: Option<String>,
    pub seq: u64,
    pub payload: Bytes,
}

/// Bounds of one replay.
#[derive(Debug, Clone, Copy)]
pub struct ReplayOptions {
    /// For the whole exchange: dial, request, every reply, end marker.
    pub timeout: Duration,
    /// More batches than this is an error (a bound on memory).
    pub max_batches: usize,
    /// More payload bytes than this is an error (a bound on memory).
    pub max_bytes: usize,
    /// Largest message the replay socket may send (`--zmq-max-message-size`):
    /// a bigger frame header ends the replay before anything is allocated.
    pub max_message_size: usize,
}

impl ReplayOptions {
    pub fn new(timeout: Duration) -> Self {
        ReplayOptions {
            timeout,
            max_batches: DEFAULT_MAX_BATCHES,
            max_bytes: DEFAULT_MAX_BYTES,
            max_message_size: crate::socket::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No `--replay-endpoint`: gaps are counted, not refilled.
    #[error("no replay endpoint configured")]
    NotConfigured,
    #[error("replay {endpoint}: cannot connect: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error("replay {endpoint}: cannot send the request: {source}")]
    Send {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error("replay {endpoint}: receive failed after {received} batches: {source}")]
    Recv {
        endpoint: String,
        received: usize,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error("replay {endpoint}: no end marker within {timeout:?} ({received} batches received)")]
    Timeout {
        endpoint: String,
        timeout: Duration,
        received: usize,
    },
    /// The replay, waiting for one of the limited replay slots included,
    /// took longer than `--replay-budget`.
    #[error(
        "replay not finished within its {budget:?} budget (waiting for a replay slot included)"
    )]
    Budget { budget: Duration },
    /// The ingester shut down before the replay finished.
    #[error("replay abandoned at shutdown")]
    Abandoned,
    #[error("replay {endpoint}: more than {max} batches")]
    TooMany { endpoint: String, max: usize },
    #[error("replay {endpoint}: more than {max} payload bytes")]
    TooLarge { endpoint: String, max: usize },
    #[error("replay {endpoint}: reply {index} does not start with the empty delimiter frame")]
    NoDelimiter { endpoint: String, index: usize },
    #[error("replay {endpoint}: reply {index} is malformed: {source}")]
    Malformed {
        endpoint: String,
        index: usize,
        #[source]
        source: FrameError,
    },
}

/// Fetches every buffered batch with `seq >= from_seq` from the replay
/// ROUTER at `endpoint`, in the publisher's order, within `timeout`, at most
/// [`DEFAULT_MAX_BATCHES`].
pub async fn replay(
    endpoint: &str,
    from_seq: u64,
    timeout: Duration,
) -> Result<Vec<Replayed>, ReplayError> {
    replay_with(endpoint, from_seq, ReplayOptions::new(timeout)).await
}

/// [`replay`] with explicit bounds.
pub async fn replay_with(
    endpoint: &str,
    from_seq: u64,
    options: ReplayOptions,
) -> Result<Vec<Replayed>, ReplayError> {
    let deadline = Instant::now() + options.timeout;
    let mut got: Vec<Replayed> = Vec::new();
    let timed_out = |received| ReplayError::Timeout {
        endpoint: endpoint.to_owned(),
        timeout: options.timeout,
        received,
    };

    let mut opts = SocketOptions::default();
    opts.connect_timeout(options.timeout)
        .max_message_size(options.max_message_size);
    let mut socket = DealerSocket::with_options(opts);
    timeout_at(deadline, socket.connect(endpoint))
        .await
        .map_err(|_| timed_out(0))?
        .map_err(|source| {
            count_rejection(endpoint, &source);
            ReplayError::Connect {
                endpoint: endpoint.to_owned(),
                source,
            }
        })?;
    let mut bytes = 0usize;

    let mut request = ZmqMessage::from(Bytes::new());
    request.push_back(Bytes::copy_from_slice(&from_seq.to_be_bytes()));
    timeout_at(deadline, socket.send(request))
        .await
        .map_err(|_| timed_out(0))?
        .map_err(|source| ReplayError::Send {
            endpoint: endpoint.to_owned(),
            source,
        })?;

    loop {
        let index = got.len();
        let reply = timeout_at(deadline, socket.recv())
            .await
            .map_err(|_| timed_out(index))?
            .map_err(|source| {
                count_rejection(endpoint, &source);
                ReplayError::Recv {
                    endpoint: endpoint.to_owned(),
                    received: index,
                    source,
                }
            })?;
        let mut frames = reply.into_vec();
        if frames.first().is_none_or(|f| !f.is_empty()) {
            return Err(ReplayError::NoDelimiter {
                endpoint: endpoint.to_owned(),
                index,
            });
        }
        frames.remove(0);
        let with_topic = frames.len() == 3;
        let (topic, seq) = match parse_replay_frames(&frames) {
            Ok(m) if m.is_replay_end() => break,
            Ok(m) => (with_topic.then(|| m.topic.to_owned()), m.seq),
            Err(source) => {
                return Err(ReplayError::Malformed {
                    endpoint: endpoint.to_owned(),
                    index,
                    source,
                });
            }
        };
        if got.len() >= options.max_batches {
            return Err(ReplayError::TooMany {
                endpoint: endpoint.to_owned(),
                max: options.max_batches,
            });
        }
        // parse_replay_frames accepted 2 or 3 frames: the payload is the last.
        let payload = frames.pop().unwrap_or_default();
        bytes = bytes.saturating_add(payload.len());
        if bytes > options.max_bytes {
            return Err(ReplayError::TooLarge {
                endpoint: endpoint.to_owned(),
                max: options.max_bytes,
            });
        }
        got.push(Replayed {
            topic,
            seq,
            payload,
        });
    }
    tracing::debug!(%endpoint, from_seq, batches = got.len(), "replay complete");
    Ok(got)
}

/// Counts (`kvroute_ingester_zmq_rejected_total{mode="replay"}`) and logs a
/// replay socket that broke the transport bounds (an oversized frame).
fn count_rejection(endpoint: &str, error: &zeromq::ZmqError) {
    if let Some(reason) = crate::socket::Rejected::of(error) {
        metrics::counter!(crate::metrics::ZMQ_REJECTED, "mode" => "replay", "reason" => reason.as_label())
            .increment(1);
        tracing::warn!(%endpoint, reason = reason.as_label(), %error, "replay socket rejected and disconnected");
    }
}

/// The worker's [`Replayer`] over vLLM's replay socket: the endpoint of a
/// topic's publisher is a template with `{host}` standing for the pod's IP
/// (`tcp://{host}:5558`), since vLLM binds its replay ROUTER beside its PUB.
#[derive(Debug, Clone)]
pub struct RouterReplayer {
    template: String,
    options: ReplayOptions,
}

impl RouterReplayer {
    pub fn new(template: impl Into<String>, options: ReplayOptions) -> Self {
        RouterReplayer {
            template: template.into(),
            options,
        }
    }

    /// The replay endpoint of a topic's pod.
    pub fn endpoint_for(&self, topic: &Topic) -> String {
        let host = match topic.addr {
            PodAddr::Endpoint(a) if a.is_ipv6() => format!("[{}]", a.ip()),
            PodAddr::BareIp(ip) if ip.is_ipv6() => format!("[{ip}]"),
            other => other.ip().to_string(),
        };
        self.template.replace("{host}", &host)
    }

    /// The replay endpoint of a data-parallel rank of a topic's pod: vLLM
    /// gives each rank its own publisher and binds its replay socket at the
    /// configured port + rank (`ZmqEventPublisher.offset_endpoint_port`).
    /// Rank 0, no rank, or a template whose port is not a number: the
    /// endpoint as configured.
    pub fn endpoint_for_rank(&self, topic: &Topic, rank: Option<u32>) -> String {
        let base = self.endpoint_for(topic);
        match rank {
            None | Some(0) => base,
            Some(r) => offset_port(&base, r).unwrap_or(base),
        }
    }
}

/// `tcp://host:P` -> `tcp://host:P+offset`; `None` when there is no numeric
/// port or the sum is not a port.
fn offset_port(endpoint: &str, offset: u32) -> Option<String> {
    let (addr, port) = endpoint.rsplit_once(':')?;
    let port = u32::from(port.parse::<u16>().ok()?).checked_add(offset)?;
    let port = u16::try_from(port).ok()?;
    Some(format!("{addr}:{port}"))
}

impl Replayer for RouterReplayer {
    async fn fetch(&self, topic: &Topic, from: u64) -> Result<ReplayedBatches, ReplayError> {
        self.fetch_rank(topic, None, from).await
    }

    async fn fetch_rank(
        &self,
        topic: &Topic,
        rank: Option<u32>,
        from: u64,
    ) -> Result<ReplayedBatches, ReplayError> {
        let endpoint = self.endpoint_for_rank(topic, rank);
        let batches = replay_with(&endpoint, from, self.options).await?;
        // The payloads move out of the replies: no copy.
        Ok(batches.into_iter().map(|b| (b.seq, b.payload)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_core::events::parse_topic;

    #[test]
    fn endpoint_template() {
        let r = RouterReplayer::new(
            "tcp://{host}:5558",
            ReplayOptions::new(Duration::from_secs(1)),
        );
        let t = parse_topic("kv@127.0.0.5:8000@m").expect("topic");
        assert_eq!(r.endpoint_for(&t), "tcp://127.0.0.5:5558");
        let t = parse_topic("kv@[fd00::5]:8000@m").expect("topic");
        assert_eq!(r.endpoint_for(&t), "tcp://[fd00::5]:5558");
        let t = parse_topic("kv@127.0.0.6@m").expect("topic");
        assert_eq!(r.endpoint_for(&t), "tcp://127.0.0.6:5558");
        // Data-parallel ranks: vLLM's base port + rank.
        assert_eq!(r.endpoint_for_rank(&t, None), "tcp://127.0.0.6:5558");
        assert_eq!(r.endpoint_for_rank(&t, Some(0)), "tcp://127.0.0.6:5558");
        assert_eq!(r.endpoint_for_rank(&t, Some(3)), "tcp://127.0.0.6:5561");
        let t = parse_topic("kv@[fd00::5]:8000@m").expect("topic");
        assert_eq!(r.endpoint_for_rank(&t, Some(1)), "tcp://[fd00::5]:5559");
        assert_eq!(offset_port("tcp://h:65535", 1), None);
        assert_eq!(offset_port("tcp://h:port", 1), None);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error() {
        // A port just freed: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let err = replay(&endpoint, 0, Duration::from_millis(300))
            .await
            .expect_err("nothing listens");
        assert!(
            matches!(
                err,
                ReplayError::Timeout { received: 0, .. } | ReplayError::Connect { .. }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&endpoint), "{err}");
    }
}
