//! One ext_proc stream = one HTTP request through Envoy. The state machine:
//!
//! ```text
//! Headers --request_headers(eos)--------------------------> decide -> Routed
//! Headers --request_headers--> Body --request_body(eos)--> decide -> Routed
//!                                     (or request_trailers)
//! Routed: echo response_headers / response_body / response_trailers; the
//!         first response body byte ends the prefill (Decide::prefill_done),
//!         the response's end releases the endpoint (Decide::finished)
//! ```
//!
//! The request-headers response is held until the body is complete (routing
//! needs the prompt), then sent first, followed by the body streamed back.
//! Every decided request owns a [`Finished`] guard, so `Decide::finished`
//! runs exactly once whether the response completes or the stream dies.

use super::body::{BodyBuffer, Budget, PushError};
use super::metadata::{self, subset_hint};
use super::metrics::{self, Outcome};
use super::{ExtProcConfig, response};
use crate::decide::{Decide, DecideError, Decision, RouteRequest};
use crate::request;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use tracing::{Span, debug, warn};

pub(super) type Tx = mpsc::Sender<Result<ProcessingResponse, Status>>;

/// Envoy stopped listening (the response stream was dropped).
struct Gone;

/// After a message: keep reading, or end the stream (an immediate response
/// ends the request, so nothing more needs answering).
enum Step {
    Continue,
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for request headers.
    Headers,
    /// Buffering the request body.
    Body,
    /// Decided; passing the response through.
    Routed,
}

/// Calls `Decide::finished` when dropped: on the response's end, or when the
/// stream task ends any other way (Envoy reset, client gone, error). Calls
/// `Decide::prefill_done` once, at the first response body byte (in
/// FULL_DUPLEX_STREAMED mode the body passes through here as the engine
/// streams it, so its first byte is the first token: the prefill is done).
struct Finished<D: Decide> {
    decide: Arc<D>,
    decision: Decision,
    prefill_done: bool,
}

impl<D: Decide> Finished<D> {
    fn first_byte(&mut self) {
        if !self.prefill_done {
            self.prefill_done = true;
            self.decide.prefill_done(&self.decision);
        }
    }
}

impl<D: Decide> Drop for Finished<D> {
    fn drop(&mut self) {
        self.decide.finished(&self.decision);
    }
}

pub(super) struct StreamState<D: Decide> {
    decide: Arc<D>,
    config: ExtProcConfig,
    tx: Tx,
    phase: Phase,
    path: Option<String>,
    request_id: Option<String>,
    /// The gateway's candidate subset, from the first message carrying one.
    subset: Option<Vec<String>>,
    body: BodyBuffer,
    budget: Budget,
    /// Routed before the body ended (over the buffer budget): the rest of
    /// the body is echoed as it arrives.
    passthrough: bool,
    /// Present from the decision until the response ends.
    finished: Option<Finished<D>>,
    decided: bool,
}

impl<D: Decide> StreamState<D> {
    pub(super) fn new(decide: Arc<D>, config: ExtProcConfig, budget: Budget, tx: Tx) -> Self {
        let body = BodyBuffer::new(config.max_body_bytes, None);
        Self {
            budget,
            passthrough: false,
            decide,
            config,
            tx,
            phase: Phase::Headers,
            path: None,
            request_id: None,
            subset: None,
            body,
            finished: None,
            decided: false,
        }
    }

    /// Reads Envoy's messages until the stream ends; the guard (if any) is
    /// released when `self` drops at the end.
    pub(super) async fn run(mut self, mut inbound: Streaming<ProcessingRequest>) {
        let why = loop {
            // While the body is being buffered, a stall frees the buffer.
            let next = if self.phase == Phase::Body {
                match tokio::time::timeout(self.config.body_idle_timeout, inbound.message()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let message =
                            format!("request body idle for {:?}", self.config.body_idle_timeout);
                        let _ = self.reject(Outcome::Idle, "timeout", &message).await;
                        break "request body idle";
                    }
                }
            } else {
                inbound.message().await
            };
            let message = match next {
                Ok(Some(message)) => message,
                Ok(None) => break "envoy closed the stream",
                Err(status) => {
                    debug!(code = ?status.code(), message = status.message(), "ext_proc stream error");
                    // One gRPC message over the decoding limit (a gateway
                    // sending a whole large body as one chunk): the client
                    // gets the 413 it would get for the body, not a stream
                    // that ends with no answer.
                    let too_big = matches!(
                        status.code(),
                        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                    );
                    if too_big && !self.decided {
                        let message = format!(
                            "request body exceeds {} bytes (one message: {})",
                            self.config.max_body_bytes,
                            status.message()
                        );
                        let _ = self
                            .reject(Outcome::TooLarge, "invalid_request_error", &message)
                            .await;
                        break "message over the size limit";
                    }
                    break "stream error";
                }
            };
            match self.handle(message).await {
                Ok(Step::Continue) => {}
                Ok(Step::Close) => break "immediate response sent",
                Err(Gone) => break "envoy stopped listening",
            }
        };
        if !self.decided {
            metrics::record(Outcome::Abandoned);
        }
        debug!(
            reason = why,
            response_complete = self.finished.is_none(),
            "ext_proc stream ended"
        );
    }

    async fn handle(&mut self, message: ProcessingRequest) -> Result<Step, Gone> {
        if self.subset.is_none() && !self.decided {
            self.subset = subset_hint(message.metadata_context.as_ref());
        }
        let Some(request) = message.request else {
            return Ok(Step::Continue);
        };
        match request {
            Msg::RequestHeaders(headers) => self.request_headers(headers).await,
            Msg::RequestBody(body) => self.request_body(body).await,
            Msg::RequestTrailers(_) => {
                if self.phase == Phase::Body {
                    // Trailers end the body: route, stream it back without
                    // end_of_stream, then let the trailers through.
                    let step = self.body_complete(false).await?;
                    if matches!(step, Step::Close) {
                        return Ok(step);
                    }
                }
                self.send(response::request_trailers()).await?;
                Ok(Step::Continue)
            }
            Msg::ResponseHeaders(headers) => {
                self.send(response::response_headers()).await?;
                if headers.end_of_stream {
                    self.response_done();
                }
                Ok(Step::Continue)
            }
            Msg::ResponseBody(HttpBody {
                body,
                end_of_stream,
                ..
            }) => {
                if !body.is_empty()
                    && let Some(f) = &mut self.finished
                {
                    f.first_byte();
                }
                for (chunk, end) in response::chunks(body, end_of_stream) {
                    self.send(response::response_body(chunk, end)).await?;
                }
                if end_of_stream {
                    self.response_done();
                }
                Ok(Step::Continue)
            }
            Msg::ResponseTrailers(_) => {
                self.send(response::response_trailers()).await?;
                self.response_done();
                Ok(Step::Continue)
            }
        }
    }

    async fn request_headers(&mut self, headers: HttpHeaders) -> Result<Step, Gone> {
        if self.phase != Phase::Headers {
            warn!(phase = ?self.phase, "request headers out of order; ignored");
            return Ok(Step::Continue);
        }
        let map = headers.headers.as_ref();
        self.path = metadata::header(map, ":path");
        self.request_id = metadata::header(map, "x-request-id");
        Span::current().record("request_id", self.request_id.as_deref().unwrap_or(""));
        if headers.end_of_stream {
            let started = Instant::now();
            let request = request::unknown_prompt(self.request_id.clone());
            return self.route(request, started, None).await;
        }
        let expected = metadata::header(map, "content-length").and_then(|v| v.parse().ok());
        self.body = BodyBuffer::new(
            self.config.max_body_bytes,
            expected.map(|e: usize| {
                // Presize only what the budget could hold anyway.
                e.min(
                    self.config
                        .max_buffered_bytes
                        .saturating_sub(self.budget.used()),
                )
            }),
        )
        .with_budget(self.budget.clone());
        self.phase = Phase::Body;
        Ok(Step::Continue)
    }

    async fn request_body(&mut self, body: HttpBody) -> Result<Step, Gone> {
        if self.phase == Phase::Routed && self.passthrough {
            for (chunk, last) in response::chunks(body.body, body.end_of_stream) {
                self.send(response::request_body(chunk, last)).await?;
            }
            return Ok(Step::Continue);
        }
        if self.phase != Phase::Body {
            warn!(phase = ?self.phase, "request body out of order; ignored");
            return Ok(Step::Continue);
        }
        match self.body.push_within_budget(body.body) {
            Ok(()) => {}
            Err((PushError::TooLarge(too_large), _)) => {
                return self
                    .reject(
                        Outcome::TooLarge,
                        "invalid_request_error",
                        &too_large.to_string(),
                    )
                    .await;
            }
            Err((PushError::OverBudget, chunk)) => {
                return self.unbuffered(chunk, body.end_of_stream).await;
            }
        }
        if body.end_of_stream {
            return self.body_complete(true).await;
        }
        Ok(Step::Continue)
    }

    /// The body is complete: parse, decide, answer with the routing headers
    /// and then the body itself.
    async fn body_complete(&mut self, end_of_stream: bool) -> Result<Step, Gone> {
        let started = Instant::now();
        let request = if self.body.is_empty() {
            // A POST with an empty chunked body carries no prompt either.
            request::unknown_prompt(self.request_id.clone())
        } else {
            match request::parse(self.body.as_slice(), self.path.as_deref()) {
                Ok(request) => RouteRequest {
                    request_id: self.request_id.clone(),
                    ..request
                },
                Err(e) => {
                    debug!(error = %e, bytes = self.body.len(), "unparseable request body");
                    return self
                        .reject(Outcome::BadRequest, "invalid_request_error", &e.to_string())
                        .await;
                }
            }
        };
        let body = self.body.take();
        self.route(request, started, Some((body, end_of_stream)))
            .await
    }

    async fn route(
        &mut self,
        request: RouteRequest,
        started: Instant,
        body: Option<(Vec<u8>, bool)>,
    ) -> Result<Step, Gone> {
        Span::current().record("model", request.model.as_str());
        let decision = match self.decide.decide(request, self.subset.clone()).await {
            Ok(decision) => decision,
            Err(DecideError::NoCandidates) => {
                return self
                    .reject(
                        Outcome::NoCandidates,
                        "service_unavailable",
                        "no candidate endpoint",
                    )
                    .await;
            }
        };
        Span::current().record("endpoint", decision.endpoint.as_str());
        Span::current().record("reason", decision.reason);
        self.decided = true;
        self.phase = Phase::Routed;
        let endpoint = decision.endpoint.clone();
        self.finished = Some(Finished {
            decide: Arc::clone(&self.decide),
            decision,
            prefill_done: false,
        });
        metrics::record(Outcome::Routed);
        self.send(response::route(&endpoint)).await?;
        metrics::decision_time(started.elapsed());
        if let Some((body, end)) = body {
            for (chunk, last) in response::chunks(body, end) {
                self.send(response::request_body(chunk, last)).await?;
            }
        }
        Ok(Step::Continue)
    }

    /// Over the buffer budget: route by load now, echo what was buffered
    /// plus `chunk`, and let the rest of the body through as it comes.
    async fn unbuffered(&mut self, chunk: Vec<u8>, end_of_stream: bool) -> Result<Step, Gone> {
        let started = Instant::now();
        let mut body = self.body.take();
        body.extend_from_slice(&chunk);
        debug!(
            bytes = body.len(),
            "buffer budget exhausted: routing by load, body unbuffered"
        );
        metrics::unbuffered();
        self.passthrough = true;
        let request = request::unknown_prompt(self.request_id.clone());
        self.route(request, started, Some((body, end_of_stream)))
            .await
    }

    async fn reject(&mut self, outcome: Outcome, kind: &str, message: &str) -> Result<Step, Gone> {
        self.decided = true;
        metrics::record(outcome);
        let code = outcome.immediate_code().unwrap_or(500);
        debug!(code, message, "immediate response");
        self.send(response::immediate(code, kind, message)).await?;
        Ok(Step::Close)
    }

    /// The response reached its end: release the endpoint now rather than
    /// when Envoy closes the stream.
    fn response_done(&mut self) {
        self.finished.take();
    }

    async fn send(&self, message: ProcessingResponse) -> Result<(), Gone> {
        self.tx.send(Ok(message)).await.map_err(|_| Gone)
    }
}
