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
}

impl Default for ExtProcConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
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
    ExternalProcessorServer::new(ExtProc { decide, config }).max_decoding_message_size(max)
}

#[tonic::async_trait]
impl<D: Decide> ExternalProcessor for ExtProc<D> {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let state = stream::StreamState::new(Arc::clone(&self.decide), self.config.clone(), tx);
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
