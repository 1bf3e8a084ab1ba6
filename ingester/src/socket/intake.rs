//! From a received multipart message to a [`RawBatch`] in the output channel:
//! frame checks (through `kvroute_core::events::parse_frames`), the topic filter,
//! counting, and the backpressure wait. Shared by both modes so a message is
//! judged the same way whichever socket read it.

use super::RawBatch;
use super::stats::{Malformed, SocketStats};
use bytes::Bytes;
use kvroute_core::events::parse_frames;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::ZmqMessage;

/// Why a receive loop must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Shutdown,
    OutputClosed,
}

/// The per-socket state of the intake.
pub(super) struct Intake {
    /// Topic prefix; ZeroMQ's PUB filters already, this catches publishers
    /// that do not.
    filter: String,
    source: String,
    out: mpsc::Sender<RawBatch>,
    stats: Arc<SocketStats>,
    /// Malformed messages are logged at warn once per socket, then at debug:
    /// a broken publisher must not flood the log (the counters keep counting).
    warned: bool,
}

impl Intake {
    pub(super) fn new(
        filter: &str,
        source: String,
        out: mpsc::Sender<RawBatch>,
        stats: Arc<SocketStats>,
    ) -> Self {
        Intake {
            filter: filter.to_owned(),
            source,
            out,
            stats,
            warned: false,
        }
    }

    /// Checks one message and, when it is well-formed and wanted, waits for
    /// room in the output channel (or for shutdown).
    pub(super) async fn handle(
        &mut self,
        msg: ZmqMessage,
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        let Some(batch) = self.check(msg.into_vec()) else {
            return Ok(());
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => Err(Stop::Shutdown),
            sent = self.out.send(batch) => sent.map_err(|_| Stop::OutputClosed),
        }
    }

    fn check(&mut self, frames: Vec<Bytes>) -> Option<RawBatch> {
        let received_at = Instant::now();
        let (topic, seq) = match parse_frames(&frames) {
            Ok(m) => (m.topic.to_owned(), m.seq),
            Err(e) => {
                let reason = Malformed::from(&e);
                self.stats.malformed(reason);
                if self.warned {
                    tracing::debug!(source = %self.source, reason = reason.as_label(), error = %e, "skipping malformed message");
                } else {
                    self.warned = true;
                    tracing::warn!(source = %self.source, reason = reason.as_label(), error = %e, "skipping malformed message (further ones logged at debug)");
                }
                return None;
            }
        };
        if !topic.starts_with(&self.filter) {
            self.stats.filtered();
            tracing::trace!(source = %self.source, %topic, "topic outside the filter");
            return None;
        }
        // parse_frames accepted exactly three frames: the payload is the last.
        let payload = frames.into_iter().nth(2)?;
        self.stats.received();
        Some(RawBatch {
            topic,
            seq,
            payload,
            received_at,
            source: self.source.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intake(filter: &str) -> (Intake, mpsc::Receiver<RawBatch>, Arc<SocketStats>) {
        let (tx, rx) = mpsc::channel(4);
        let stats = Arc::new(SocketStats::default());
        (
            Intake::new(filter, "test".into(), tx, stats.clone()),
            rx,
            stats,
        )
    }

    fn msg(frames: &[&[u8]]) -> ZmqMessage {
        let mut m = ZmqMessage::from(Bytes::copy_from_slice(frames[0]));
        for f in &frames[1..] {
            m.push_back(Bytes::copy_from_slice(f));
        }
        m
    }

    #[tokio::test]
    async fn good_bad_and_filtered() {
        let (mut i, mut rx, stats) = intake("kv@");
        let stop = CancellationToken::new();
        let seq = 7u64.to_be_bytes();
        i.handle(msg(&[b"kv@1.2.3.4:8000@m", &seq, b"\x93"]), &stop)
            .await
            .expect("sent");
        let b = rx.recv().await.expect("batch");
        assert_eq!(
            (b.topic.as_str(), b.seq, &b.payload[..]),
            ("kv@1.2.3.4:8000@m", 7, &b"\x93"[..])
        );

        i.handle(msg(&[b"kv@x@m", &seq]), &stop)
            .await
            .expect("skipped");
        i.handle(msg(&[b"kv@x@m", &seq[..7], b"p"]), &stop)
            .await
            .expect("skipped");
        i.handle(msg(&[b"\xff", &seq, b"p"]), &stop)
            .await
            .expect("skipped");
        i.handle(msg(&[b"other@x@m", &seq, b"p"]), &stop)
            .await
            .expect("skipped");
        let s = stats.snapshot();
        assert_eq!(s.received, 1);
        assert_eq!(s.filtered, 1);
        assert_eq!(s.malformed(Malformed::FrameCount), 1);
        assert_eq!(s.malformed(Malformed::SeqLength), 1);
        assert_eq!(s.malformed(Malformed::TopicNotUtf8), 1);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn full_channel_waits_until_shutdown_or_close() {
        let (mut i, rx, _) = intake("");
        let stop = CancellationToken::new();
        let seq = 0u64.to_be_bytes();
        for _ in 0..4 {
            i.handle(msg(&[b"t", &seq, b"p"]), &stop)
                .await
                .expect("room");
        }
        stop.cancel();
        assert_eq!(
            i.handle(msg(&[b"t", &seq, b"p"]), &stop).await,
            Err(Stop::Shutdown)
        );
        drop(rx);
        let live = CancellationToken::new();
        assert_eq!(
            i.handle(msg(&[b"t", &seq, b"p"]), &live).await,
            Err(Stop::OutputClosed)
        );
    }
}
