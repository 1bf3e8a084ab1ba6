//! Envoy ext_proc front end: the endpoint-picker protocol of the Gateway API
//! Inference Extension, as llm-d's EPP speaks it, so kvroute drops in where
//! an EPP runs.
//!
//! Envoy opens one `ExternalProcessor/Process` stream per HTTP request, with
//! request and response bodies in FULL_DUPLEX_STREAMED mode. The picker
//! buffers the request body, asks [`Decide`] for an endpoint, answers with
//! the `x-gateway-destination-endpoint` header (and the same value in `envoy.lb`
//! dynamic metadata), streams the body back, and then echoes the response.
//! Envoy cannot fail open in this mode, so the only errors are 400 (not a
//! request), 413 (body over the cap) and 503 (no candidate endpoint).
//!
//! | file | role |
//! |---|---|
//! | `stream.rs` | per-stream state machine, `Decide::finished` guard |
//! | `body.rs` | request body buffer with its size cap |
//! | `response.rs` | `ProcessingResponse` constructors, body chunking |
//! | `metadata.rs` | headers in, subset hint in, `envoy.lb` metadata out |
//! | `metrics.rs` | counters and the decision-time histogram |

mod body;
mod metadata;
mod metrics;
mod response;
mod stream;

pub use body::{DEFAULT_MAX_BODY_BYTES, TooLarge};
pub use metadata::{DESTINATION_HEADER, LB_NAMESPACE, SUBSET_KEY, SUBSET_NAMESPACE};
pub use metrics::Outcome;
pub use response::MAX_CHUNK_BYTES;

use crate::decide::Decide;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Front-end settings (flattened into the scorer's command line).
#[derive(Debug, Clone, clap::Args)]
pub struct ExtProcConfig {
    /// Largest request body the picker buffers; larger requests get 413.
    /// The same cap applies to `POST /v1/score` bodies.
    #[arg(long, env = "KVROUTE_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Request bytes all ext_proc streams may hold buffered together. A body
    /// that would pass it is not buffered: the request routes by load at
    /// once and its body streams through (`kvroute_scorer_unbuffered_requests_total`), so a
    /// burst of large or slow uploads costs prefix hits, never memory or
    /// failed requests. Default 512 MiB: 32 bodies at the 16 MiB cap.
    #[arg(long, env = "KVROUTE_MAX_BUFFERED_BYTES", default_value_t = DEFAULT_MAX_BUFFERED_BYTES)]
    pub max_buffered_bytes: usize,
    /// A request body that sends nothing for this long while being buffered
    /// gets 408 and its buffer is freed (a stalled client holds no memory).
    #[arg(long, env = "KVROUTE_BODY_IDLE_TIMEOUT", default_value = "30s", value_parser = kvroute_service::duration::parse_duration)]
    pub body_idle_timeout: std::time::Duration,
}

/// Default of `--max-buffered-bytes`.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 512 << 20;

impl Default for ExtProcConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            body_idle_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Responses queued per stream before the stream task waits for Envoy to
/// read: enough for a few body chunks in flight, small enough that a slow
/// reader pushes back instead of the scorer holding a copy of the body.
const STREAM_QUEUE: usize = 8;

/// gRPC messages from Envoy above this size are refused. Envoy forwards body
/// chunks as they arrive (tens of KiB), but a gateway with large buffers may
/// send one chunk holding the whole body.
fn max_message_bytes(config: &ExtProcConfig) -> usize {
    config.max_body_bytes.max(4 << 20) + (64 << 10)
}

/// The `envoy.service.ext_proc.v3.ExternalProcessor` implementation.
pub struct ExtProc<D> {
    decide: Arc<D>,
    config: ExtProcConfig,
    /// Buffered request bytes of all streams.
    budget: body::Budget,
}

impl<D> std::fmt::Debug for ExtProc<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtProc")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The tonic service to mount on a gRPC server.
pub fn ext_proc_service<D: Decide>(
    decide: Arc<D>,
    config: ExtProcConfig,
) -> ExternalProcessorServer<ExtProc<D>> {
    let max = max_message_bytes(&config);
    let budget = body::Budget::new(config.max_buffered_bytes);
    ExternalProcessorServer::new(ExtProc {
        decide,
        config,
        budget,
    })
    .max_decoding_message_size(max)
}

#[tonic::async_trait]
impl<D: Decide> ExternalProcessor for ExtProc<D> {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let state = stream::StreamState::new(
            Arc::clone(&self.decide),
            self.config.clone(),
            self.budget.clone(),
            tx,
        );
        let span = tracing::info_span!(
            "ext_proc",
            request_id = tracing::field::Empty,
            model = tracing::field::Empty,
            endpoint = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        // A task per stream: it owns the state (and the `finished` guard), so
        // the guard drops when Envoy's stream ends however it ends.
        tokio::spawn(state.run(request.into_inner()).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
