//! Playing Envoy's side of an ext_proc stream in tests: open a stream to
//! the scorer, send the messages Envoy would send, and read the replies back
//! with the protocol checks every test needs (raw_value, clear_route_cache,
//! `envoy.lb` metadata, streamed_response bodies).

use super::scorer::Scorer;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HttpBody, HttpHeaders, ImmediateResponse, ProcessingRequest,
    ProcessingResponse, body_mutation,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// One ext_proc stream, driven the way Envoy drives it.
pub struct Stream {
    pub tx: mpsc::Sender<ProcessingRequest>,
    pub rx: Streaming<ProcessingResponse>,
}

impl Stream {
    pub async fn open(scorer: &Scorer) -> Self {
        let mut client = ExternalProcessorClient::connect(format!("http://{}", scorer.addr))
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(64);
        let rx = client
            .process(ReceiverStream::new(rx))
            .await
            .expect("process")
            .into_inner();
        Self { tx, rx }
    }

    pub async fn send(&self, request: Msg, metadata: Option<Metadata>) {
        let message = ProcessingRequest {
            request: Some(request),
            metadata_context: metadata,
            ..Default::default()
        };
        self.tx.send(message).await.expect("send");
    }

    pub async fn next(&mut self) -> Reply {
        let message = tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a reply within 5 s")
            .expect("stream ok")
            .expect("a reply, not the end of the stream");
        message.response.expect("a response")
    }

    /// Nothing arrives for a while (the picker is still buffering).
    pub async fn quiet(&mut self) {
        let next = tokio::time::timeout(Duration::from_millis(150), self.rx.message()).await;
        assert!(
            next.is_err(),
            "unexpected reply before the body ended: {next:?}"
        );
    }

    /// The server closed the stream.
    pub async fn ends(&mut self) {
        let next = tokio::time::timeout(Duration::from_secs(5), self.rx.message()).await;
        assert!(matches!(next, Ok(Ok(None))), "stream should end: {next:?}");
    }

    /// Request body chunks streamed back, until end_of_stream.
    pub async fn request_body(&mut self) -> (Vec<u8>, Vec<usize>) {
        let (mut body, mut sizes) = (Vec::new(), Vec::new());
        loop {
            let Reply::RequestBody(reply) = self.next().await else {
                panic!("request body reply")
            };
            let (chunk, end) = streamed(reply.response);
            sizes.push(chunk.len());
            body.extend_from_slice(&chunk);
            if end {
                return (body, sizes);
            }
        }
    }
}

pub fn headers(path: &str, extra: &[(&str, &str)], end_of_stream: bool) -> Msg {
    let method = if end_of_stream { "GET" } else { "POST" };
    let mut list = vec![
        (":method", method),
        (":path", path),
        ("x-request-id", "req-1"),
    ];
    list.extend_from_slice(extra);
    let headers = list
        .into_iter()
        .map(|(k, v)| HeaderValue {
            key: k.to_owned(),
            raw_value: v.as_bytes().to_vec(),
            ..Default::default()
        })
        .collect();
    Msg::RequestHeaders(HttpHeaders {
        headers: Some(HeaderMap { headers }),
        end_of_stream,
        ..Default::default()
    })
}

pub fn body(bytes: &[u8], end_of_stream: bool) -> Msg {
    Msg::RequestBody(HttpBody {
        body: bytes.to_vec(),
        end_of_stream,
        ..Default::default()
    })
}

pub fn completion(model: &str, prompt: &str) -> Vec<u8> {
    serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 1})
        .to_string()
        .into_bytes()
}

pub fn streamed(response: Option<CommonResponse>) -> (Vec<u8>, bool) {
    match response
        .and_then(|r| r.body_mutation)
        .and_then(|m| m.mutation)
    {
        Some(body_mutation::Mutation::StreamedResponse(s)) => (s.body, s.end_of_stream),
        other => panic!("expected a streamed_response, got {other:?}"),
    }
}

/// The destination the request-headers reply sets (checking how it is set).
pub fn destination(reply: Reply) -> String {
    let Reply::RequestHeaders(h) = reply else {
        panic!("request headers reply, got {reply:?}")
    };
    let common = h.response.expect("common response");
    assert!(common.clear_route_cache, "route cache must be cleared");
    let set = common.header_mutation.expect("header mutation").set_headers;
    assert_eq!(set.len(), 1);
    let option = &set[0];
    // Every other field at its default: no append, so the value replaces any
    // client-sent header.
    let plain = HeaderValueOption {
        header: option.header.clone(),
        ..Default::default()
    };
    assert_eq!(option, &plain, "must overwrite");
    let header = option.header.as_ref().expect("header");
    assert_eq!(header.key, "x-gateway-destination-endpoint");
    assert!(
        header.value.is_empty(),
        "Envoy ignores `value`; raw_value only"
    );
    String::from_utf8(header.raw_value.clone()).expect("utf-8")
}

pub async fn routed(stream: &mut Stream) -> String {
    let message = tokio::time::timeout(Duration::from_secs(5), stream.rx.message())
        .await
        .expect("reply")
        .expect("ok")
        .expect("message");
    let endpoint = {
        let metadata = message.dynamic_metadata.clone().expect("dynamic metadata");
        let lb = metadata.fields.get("envoy.lb").and_then(|v| v.kind.clone());
        let Some(Kind::StructValue(lb)) = lb else {
            panic!("envoy.lb struct")
        };
        match lb
            .fields
            .get("x-gateway-destination-endpoint")
            .and_then(|v| v.kind.clone())
        {
            Some(Kind::StringValue(s)) => s,
            other => panic!("destination in metadata: {other:?}"),
        }
    };
    assert_eq!(destination(message.response.expect("response")), endpoint);
    endpoint
}

pub fn immediate(reply: Reply) -> (i32, serde_json::Value, ImmediateResponse) {
    let Reply::ImmediateResponse(r) = reply else {
        panic!("immediate response, got {reply:?}")
    };
    let code = r.status.expect("status").code;
    let body = serde_json::from_slice(&r.body).expect("JSON error body");
    (code, body, r)
}

pub fn subset_metadata(value: Kind) -> Metadata {
    let hint = Struct {
        fields: [(
            "x-gateway-destination-endpoint-subset".to_owned(),
            Value { kind: Some(value) },
        )]
        .into(),
    };
    Metadata {
        filter_metadata: [("envoy.lb.subset_hint".to_owned(), hint)].into(),
        ..Default::default()
    }
}
