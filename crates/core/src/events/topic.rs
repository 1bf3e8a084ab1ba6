//! The envelope around a payload: ZMQ frames and the topic that names the pod
//! and model.
//!
//! vLLM's publisher sends `[topic, seq (8 bytes, big-endian int64), payload]`.
//! llm-d deployments set the topic to `kv@<pod-id>@<model>`, where the pod id
//! is the endpoint the gateway routes to (`<ip>:<port>`; older deployments
//! use the bare IP, which the scorer maps to an endpoint later). The model is
//! everything after the second `@`, so it may contain `/` (and `@`).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::ids::{ModelName, PodId};

/// The topic prefix llm-d deployments use.
pub const DEFAULT_PREFIX: &str = "kv";

/// The sequence number vLLM's replay socket sends after the last buffered
/// batch: int64 `-1`, read as `u64`.
pub const REPLAY_END_SEQ: u64 = u64::MAX;

/// Longest topic text copied into an error (topics come from the network).
const ERROR_TOPIC_MAX: usize = 200;

/// A parsed `kv@<pod-id>@<model>` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    /// The pod id exactly as published (`127.0.0.5:8000`, `127.0.0.5`, `[::1]:8000`).
    pub pod: String,
    /// The pod id parsed.
    pub addr: PodAddr,
    pub model: ModelName,
}

impl Topic {
    /// The pod identity of one data-parallel rank (see [`PodId::with_rank`]).
    pub fn pod_id(&self, data_parallel_rank: Option<u32>) -> PodId {
        PodId::with_rank(&self.pod, data_parallel_rank)
    }
}

/// A pod id: an endpoint, or (older deployments) a bare IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodAddr {
    Endpoint(SocketAddr),
    BareIp(IpAddr),
}

impl PodAddr {
    pub fn ip(&self) -> IpAddr {
        match self {
            PodAddr::Endpoint(s) => s.ip(),
            PodAddr::BareIp(ip) => *ip,
        }
    }

    /// `None` for a bare IP.
    pub fn port(&self) -> Option<u16> {
        match self {
            PodAddr::Endpoint(s) => Some(s.port()),
            PodAddr::BareIp(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {topic:?} does not start with `{prefix}@`")]
    Prefix { topic: String, prefix: String },
    #[error("topic {topic:?} has no `@<model>` after the pod id")]
    MissingModel { topic: String },
    #[error("topic {topic:?} has an empty pod id")]
    EmptyPod { topic: String },
    #[error("topic {topic:?} has an empty model name")]
    EmptyModel { topic: String },
    #[error("topic {topic:?}: pod id {pod:?} is neither <ip>:<port> nor an IP address")]
    InvalidPod { topic: String, pod: String },
}

/// Parses `kv@<pod-id>@<model>`.
pub fn parse_topic(topic: &str) -> Result<Topic, TopicError> {
    parse_topic_with_prefix(topic, DEFAULT_PREFIX)
}

/// Parses `<prefix>@<pod-id>@<model>`; an empty `prefix` means the topic is
/// `<pod-id>@<model>`.
pub fn parse_topic_with_prefix(topic: &str, prefix: &str) -> Result<Topic, TopicError> {
    let rest = if prefix.is_empty() {
        Some(topic)
    } else {
        topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('@'))
    };
    let rest = rest.ok_or_else(|| TopicError::Prefix {
        topic: clip(topic),
        prefix: clip(prefix),
    })?;
    let (pod, model) = rest
        .split_once('@')
        .ok_or_else(|| TopicError::MissingModel { topic: clip(topic) })?;
    if pod.is_empty() {
        return Err(TopicError::EmptyPod { topic: clip(topic) });
    }
    if model.is_empty() {
        return Err(TopicError::EmptyModel { topic: clip(topic) });
    }
    let addr = parse_pod(pod).ok_or_else(|| TopicError::InvalidPod {
        topic: clip(topic),
        pod: clip(pod),
    })?;
    Ok(Topic {
        pod: pod.to_owned(),
        addr,
        model: ModelName::new(model),
    })
}

fn parse_pod(pod: &str) -> Option<PodAddr> {
    if let Ok(s) = pod.parse::<SocketAddr>() {
        return Some(PodAddr::Endpoint(s));
    }
    if let Ok(ip) = pod.parse::<IpAddr>() {
        return Some(PodAddr::BareIp(ip));
    }
    // `[::1]` without a port.
    let inner = pod.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .parse::<Ipv6Addr>()
        .ok()
        .map(|ip| PodAddr::BareIp(IpAddr::V6(ip)))
}

/// Truncates untrusted text for an error message, on a char boundary.
fn clip(s: &str) -> String {
    if s.len() <= ERROR_TOPIC_MAX {
        return s.to_owned();
    }
    let mut end = ERROR_TOPIC_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// One multipart message from vLLM's publisher, borrowed from its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMessage<'a> {
    /// The topic as sent (vLLM's default is the empty string); parse it with
    /// [`parse_topic`].
    pub topic: &'a str,
    /// The sequence number. vLLM sends a signed int64; `-1` (the replay end
    /// marker) reads as [`REPLAY_END_SEQ`].
    pub seq: u64,
    /// The msgpack `EventBatch`, for [`super::decode_batch`].
    pub payload: &'a [u8],
}

impl RawMessage<'_> {
    /// True for the replay socket's end marker (seq `-1`).
    pub fn is_replay_end(&self) -> bool {
        self.seq == REPLAY_END_SEQ
    }

    /// The sequence number as vLLM wrote it (int64).
    pub fn seq_signed(&self) -> i64 {
        self.seq as i64
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("expected {expected} frames, got {got}")]
    FrameCount { expected: &'static str, got: usize },
    #[error("topic frame is not valid UTF-8")]
    TopicNotUtf8,
    #[error("sequence frame has {len} bytes, expected 8")]
    SeqLength { len: usize },
}

/// Splits a published message: exactly `[topic, seq, payload]`.
pub fn parse_frames<F: AsRef<[u8]>>(frames: &[F]) -> Result<RawMessage<'_>, FrameError> {
    match frames {
        [topic, seq, payload] => message(topic.as_ref(), seq.as_ref(), payload.as_ref()),
        _ => Err(FrameError::FrameCount {
            expected: "3 (topic, seq, payload)",
            got: frames.len(),
        }),
    }
}

/// Splits a reply from vLLM's replay ROUTER socket, after the DEALER's empty
/// delimiter frame: `[seq, payload]` (vLLM 0.10, topic returned as `""`) or
/// `[topic, seq, payload]` (0.33). The end marker has seq `-1` and an empty
/// payload.
pub fn parse_replay_frames<F: AsRef<[u8]>>(frames: &[F]) -> Result<RawMessage<'_>, FrameError> {
    match frames {
        [seq, payload] => message(b"", seq.as_ref(), payload.as_ref()),
        [topic, seq, payload] => message(topic.as_ref(), seq.as_ref(), payload.as_ref()),
        _ => Err(FrameError::FrameCount {
            expected: "2 or 3 ([topic,] seq, payload)",
            got: frames.len(),
        }),
    }
}

fn message<'a>(
    topic: &'a [u8],
    seq: &[u8],
    payload: &'a [u8],
) -> Result<RawMessage<'a>, FrameError> {
    let topic = std::str::from_utf8(topic).map_err(|_| FrameError::TopicNotUtf8)?;
    let seq = <[u8; 8]>::try_from(seq).map_err(|_| FrameError::SeqLength { len: seq.len() })?;
    Ok(RawMessage {
        topic,
        seq: u64::from_be_bytes(seq),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_bare_ip_and_ipv6() {
        let t = parse_topic("kv@127.0.0.5:8000@meta-llama/Llama-3.1-8B").unwrap();
        assert_eq!(t.pod, "127.0.0.5:8000");
        assert_eq!(t.model.as_str(), "meta-llama/Llama-3.1-8B");
        assert_eq!(t.addr.port(), Some(8000));
        assert_eq!(t.pod_id(Some(2)).as_str(), "127.0.0.5:8000#dp2");

        let t = parse_topic("kv@127.0.0.5@m").unwrap();
        assert_eq!(t.addr, PodAddr::BareIp("127.0.0.5".parse().unwrap()));
        assert_eq!(t.addr.port(), None);

        let t = parse_topic("kv@[::1]:8000@m").unwrap();
        assert_eq!(t.pod, "[::1]:8000");
        assert_eq!(t.addr.port(), Some(8000));
        assert!(t.addr.ip().is_loopback());

        assert_eq!(parse_topic("kv@::1@m").unwrap().addr.port(), None);
        assert_eq!(parse_topic("kv@[::1]@m").unwrap().addr.port(), None);
    }

    #[test]
    fn model_is_everything_after_the_second_at() {
        let t = parse_topic("kv@127.0.0.5:8000@org/model@rev").unwrap();
        assert_eq!(t.model.as_str(), "org/model@rev");
    }

    #[test]
    fn configurable_prefix() {
        let t = parse_topic_with_prefix("events@127.0.0.5:8000@m", "events").unwrap();
        assert_eq!(t.pod, "127.0.0.5:8000");
        let t = parse_topic_with_prefix("127.0.0.5:8000@m", "").unwrap();
        assert_eq!(t.model.as_str(), "m");
        assert!(matches!(
            parse_topic_with_prefix("kv@127.0.0.5:8000@m", "events"),
            Err(TopicError::Prefix { .. })
        ));
    }

    #[test]
    fn topic_errors() {
        let err = |t: &str| parse_topic(t).unwrap_err();
        assert!(matches!(err(""), TopicError::Prefix { .. }));
        assert!(matches!(err("kv"), TopicError::Prefix { .. }));
        assert!(matches!(err("kvx@1.2.3.4@m"), TopicError::Prefix { .. }));
        assert!(matches!(err("KV@1.2.3.4@m"), TopicError::Prefix { .. }));
        assert!(matches!(
            err("kv@1.2.3.4:8000"),
            TopicError::MissingModel { .. }
        ));
        assert!(matches!(err("kv@@m"), TopicError::EmptyPod { .. }));
        assert!(matches!(
            err("kv@1.2.3.4:8000@"),
            TopicError::EmptyModel { .. }
        ));
        assert!(matches!(
            err("kv@pod-a:8000@m"),
            TopicError::InvalidPod { .. }
        ));
        assert!(matches!(
            err("kv@1.2.3.4:99999@m"),
            TopicError::InvalidPod { .. }
        ));
        assert!(matches!(
            err("kv@1.2.3.4:@m"),
            TopicError::InvalidPod { .. }
        ));
        let long = format!("kv@{}@m", "x".repeat(10_000));
        let msg = err(&long).to_string();
        assert!(
            msg.len() < 1_000,
            "error text is clipped: {} bytes",
            msg.len()
        );
        assert!(msg.contains("neither"));
    }

    #[test]
    fn frames() {
        let seq = 42u64.to_be_bytes();
        let frames = [&b"kv@1.2.3.4:8000@m"[..], &seq[..], &b"\x93"[..]];
        let m = parse_frames(&frames).unwrap();
        assert_eq!(
            (m.topic, m.seq, m.payload),
            ("kv@1.2.3.4:8000@m", 42, &b"\x93"[..])
        );
        assert!(!m.is_replay_end());

        let end = (-1i64).to_be_bytes();
        let owned = [b"t".to_vec(), end.to_vec(), Vec::new()];
        let m = parse_frames(&owned).unwrap();
        assert!(m.is_replay_end());
        assert_eq!(m.seq_signed(), -1);
    }

    #[test]
    fn frame_errors() {
        let seq = 1u64.to_be_bytes();
        let two: [&[u8]; 2] = [b"t", &seq];
        assert_eq!(
            parse_frames(&two).unwrap_err(),
            FrameError::FrameCount {
                expected: "3 (topic, seq, payload)",
                got: 2
            }
        );
        let four: [&[u8]; 4] = [b"t", &seq, b"p", b"x"];
        assert!(matches!(
            parse_frames(&four),
            Err(FrameError::FrameCount { got: 4, .. })
        ));
        let none: [&[u8]; 0] = [];
        assert!(matches!(
            parse_frames(&none),
            Err(FrameError::FrameCount { got: 0, .. })
        ));
        let bad_topic: [&[u8]; 3] = [b"\xff\xfe", &seq, b"p"];
        assert_eq!(
            parse_frames(&bad_topic).unwrap_err(),
            FrameError::TopicNotUtf8
        );
        let short_seq: [&[u8]; 3] = [b"t", b"\x00\x01", b"p"];
        assert_eq!(
            parse_frames(&short_seq).unwrap_err(),
            FrameError::SeqLength { len: 2 }
        );
        let long_seq: [&[u8]; 3] = [b"t", &[0u8; 9], b"p"];
        assert_eq!(
            parse_frames(&long_seq).unwrap_err(),
            FrameError::SeqLength { len: 9 }
        );
    }

    #[test]
    fn replay_frames_with_and_without_topic() {
        let end = (-1i64).to_be_bytes();
        let old: [&[u8]; 2] = [&end, b""];
        let m = parse_replay_frames(&old).unwrap();
        assert_eq!(m.topic, "");
        assert!(m.is_replay_end());
        let seq = 7u64.to_be_bytes();
        let new: [&[u8]; 3] = [b"kv@1.2.3.4@m", &seq, b"p"];
        assert_eq!(parse_replay_frames(&new).unwrap().seq, 7);
        let one: [&[u8]; 1] = [b"p"];
        assert!(matches!(
            parse_replay_frames(&one),
            Err(FrameError::FrameCount { got: 1, .. })
        ));
    }
}
