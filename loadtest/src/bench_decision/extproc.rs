//! Envoy's side of the ext_proc protocol, as a benchmark client: one
//! `Process` stream per request on a shared HTTP/2 connection, request
//! headers (with the gateway's subset hint as Envoy forwards it), the body
//! in chunks then an empty end-of-stream chunk (what Envoy 1.40 sends in
//! FULL_DUPLEX_STREAMED mode), and the picker's replies read back.

use anyhow::{Context, bail};
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, body_mutation,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Body chunk size Envoy forwards (its default buffer is 64 KiB).
const CHUNK: usize = 64 * 1024;

#[derive(Clone)]
pub struct Client {
    inner: ExternalProcessorClient<Channel>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .connect()
            .await
            .with_context(|| format!("connecting ext_proc at {addr}"))?;
        Ok(Client {
            inner: ExternalProcessorClient::new(channel)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
        })
    }

    /// One request: the time from opening the stream to the routing
    /// headers reply, and the endpoint chosen. The body echo is then read
    /// to its end and the stream closed, as Envoy would.
    pub async fn decide(
        &mut self,
        body: &Bytes,
        subset: Option<&Metadata>,
    ) -> anyhow::Result<(Duration, String)> {
        // Room for the headers, every chunk and the end of stream.
        let (tx, rx) = mpsc::channel(body.len() / CHUNK + 3);
        let started = Instant::now();
        let send = |request: Msg, metadata: Option<Metadata>| ProcessingRequest {
            request: Some(request),
            metadata_context: metadata,
            ..Default::default()
        };
        // Everything Envoy would send is queued before the call: Envoy streams
        // the body as it arrives and never waits for the picker's response
        // headers (`process` resolves only once they are back, so sending
        // after it would add a round trip no real request pays).
        tx.send(send(headers(), subset.cloned())).await?;
        for chunk in body.chunks(CHUNK) {
            tx.send(send(data(chunk, false), None)).await?;
        }
        tx.send(send(data(&[], true), None)).await?;
        let mut stream = self
            .inner
            .process(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = stream.message().await?.context("stream ended early")?;
        let elapsed = started.elapsed();
        let endpoint = match first.response {
            Some(Reply::RequestHeaders(h)) => h
                .response
                .and_then(|c| c.header_mutation)
                .and_then(|m| m.set_headers.into_iter().next())
                .and_then(|o| o.header)
                .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned())
                .context("headers reply without a destination")?,
            other => bail!("expected the routing headers reply, got {other:?}"),
        };
        // The body comes back as streamed_response chunks.
        loop {
            let reply = stream.message().await?.context("body echo ended early")?;
            let Some(Reply::RequestBody(b)) = reply.response else {
                bail!("expected a request body reply");
            };
            let end = match b
                .response
                .and_then(|c| c.body_mutation)
                .and_then(|m| m.mutation)
            {
                Some(body_mutation::Mutation::StreamedResponse(s)) => s.end_of_stream,
                other => bail!("expected a streamed_response, got {other:?}"),
            };
            if end {
                break;
            }
        }
        drop(tx);
        while stream.message().await?.is_some() {}
        Ok((elapsed, endpoint))
    }
}

fn headers() -> Msg {
    let headers = [
        (":method", "POST"),
        (":path", "/v1/completions"),
        ("content-type", "application/json"),
        ("x-request-id", "bench"),
    ]
    .into_iter()
    .map(|(k, v)| HeaderValue {
        key: k.to_owned(),
        raw_value: v.as_bytes().to_vec(),
        ..Default::default()
    })
    .collect();
    Msg::RequestHeaders(HttpHeaders {
        headers: Some(HeaderMap { headers }),
        end_of_stream: false,
        ..Default::default()
    })
}

fn data(bytes: &[u8], end_of_stream: bool) -> Msg {
    Msg::RequestBody(HttpBody {
        body: bytes.to_vec(),
        end_of_stream,
        ..Default::default()
    })
}

/// The gateway's subset hint, as Envoy forwards `envoy.lb.subset_hint`.
pub fn subset(endpoints: &[String]) -> Metadata {
    let list = ListValue {
        values: endpoints
            .iter()
            .map(|e| Value {
                kind: Some(Kind::StringValue(e.clone())),
            })
            .collect(),
    };
    let hint = Struct {
        fields: [(
            "x-gateway-destination-endpoint-subset".to_owned(),
            Value {
                kind: Some(Kind::ListValue(list)),
            },
        )]
        .into(),
    };
    Metadata {
        filter_metadata: [("envoy.lb.subset_hint".to_owned(), hint)].into(),
        ..Default::default()
    }
}

/// A `/v1/completions` body for `prompt`.
pub fn completion(model: &str, prompt: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 1})
            .to_string()
            .into_bytes(),
    )
}
