//! The `ProcessingResponse` messages the picker sends, one constructor per
//! kind, so the stream state machine reads as protocol steps.
//!
//! In FULL_DUPLEX_STREAMED mode every body reply must be a
//! `streamed_response` (a plain body mutation makes Envoy answer 500), and a
//! header value set anywhere but `raw_value` is silently dropped by Envoy.

use super::metadata::{DESTINATION_HEADER, destination_metadata};
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation,
    processing_response::Response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;

/// The largest body chunk sent back to Envoy (llm-d's endpoint picker uses
/// the same bound, safely below gRPC and Envoy buffer limits).
pub const MAX_CHUNK_BYTES: usize = 62_000;

/// The request-headers answer that routes: the destination header (set, so a
/// client-supplied value is replaced), a cleared route cache so the router
/// sees it, and the same endpoint in `envoy.lb` dynamic metadata.
pub fn route(endpoint: &str) -> ProcessingResponse {
    let mutation = HeaderMutation {
        set_headers: vec![set_header(DESTINATION_HEADER, endpoint)],
        remove_headers: Vec::new(),
    };
    ProcessingResponse {
        dynamic_metadata: Some(destination_metadata(endpoint)),
        response: Some(Response::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: Some(mutation),
                clear_route_cache: true,
                ..Default::default()
            }),
        })),
        ..Default::default()
    }
}

/// One chunk of the request body streamed back upstream.
pub fn request_body(body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    wrap(Response::RequestBody(streamed(body, end_of_stream)))
}

/// One chunk of the response body streamed back to the client.
pub fn response_body(body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    wrap(Response::ResponseBody(streamed(body, end_of_stream)))
}

/// Response headers pass unchanged.
pub fn response_headers() -> ProcessingResponse {
    wrap(Response::ResponseHeaders(HeadersResponse {
        response: Some(CommonResponse::default()),
    }))
}

/// Request trailers pass unchanged.
pub fn request_trailers() -> ProcessingResponse {
    wrap(Response::RequestTrailers(TrailersResponse::default()))
}

/// Response trailers pass unchanged.
pub fn response_trailers() -> ProcessingResponse {
    wrap(Response::ResponseTrailers(TrailersResponse::default()))
}

/// An error the client gets instead of an upstream response, with an
/// OpenAI-style JSON body: `{"error": {"message", "type", "param", "code"}}`.
pub fn immediate(code: u16, error_type: &str, message: &str) -> ProcessingResponse {
    let body = serde_json::json!({
        "error": {"message": message, "type": error_type, "param": null, "code": code}
    });
    wrap(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus { code: code.into() }),
        headers: Some(HeaderMutation {
            set_headers: vec![set_header("content-type", "application/json")],
            remove_headers: Vec::new(),
        }),
        body: body.to_string().into_bytes(),
        grpc_status: None,
        details: format!("kvroute_{error_type}"),
    }))
}

/// Splits `body` into `streamed_response` payloads of at most
/// [`MAX_CHUNK_BYTES`], `end_of_stream` on the last when `end` is set. An
/// empty body still yields one (empty) chunk, so the end is always signalled.
/// A body that fits one chunk is moved, not copied.
pub fn chunks(body: Vec<u8>, end: bool) -> Chunks {
    Chunks {
        body,
        pos: 0,
        end,
        done: false,
    }
}

/// Iterator of `(payload, end_of_stream)`; see [`chunks`].
#[derive(Debug)]
pub struct Chunks {
    body: Vec<u8>,
    pos: usize,
    end: bool,
    done: bool,
}

impl Iterator for Chunks {
    type Item = (Vec<u8>, bool);

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.pos == 0 && self.body.len() <= MAX_CHUNK_BYTES {
            self.done = true;
            return Some((std::mem::take(&mut self.body), self.end));
        }
        let stop = (self.pos + MAX_CHUNK_BYTES).min(self.body.len());
        let chunk = self.body[self.pos..stop].to_vec();
        self.pos = stop;
        self.done = stop == self.body.len();
        Some((chunk, self.end && self.done))
    }
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        ..Default::default()
    }
}

fn streamed(body: Vec<u8>, end_of_stream: bool) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    }
}

fn wrap(response: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_bounds_and_end_flag() {
        let sizes = |len: usize, end: bool| -> Vec<(usize, bool)> {
            chunks(vec![7; len], end)
                .map(|(c, e)| (c.len(), e))
                .collect()
        };
        assert_eq!(sizes(0, true), vec![(0, true)]);
        assert_eq!(sizes(MAX_CHUNK_BYTES, true), vec![(MAX_CHUNK_BYTES, true)]);
        assert_eq!(
            sizes(MAX_CHUNK_BYTES + 1, true),
            vec![(MAX_CHUNK_BYTES, false), (1, true)]
        );
        assert_eq!(
            sizes(2 * MAX_CHUNK_BYTES, false),
            vec![(MAX_CHUNK_BYTES, false), (MAX_CHUNK_BYTES, false)]
        );
        let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let back: Vec<u8> = chunks(body.clone(), true).flat_map(|(c, _)| c).collect();
        assert_eq!(back, body);
    }

    #[test]
    fn route_sets_raw_value_and_metadata() {
        let r = route("127.0.0.1:8000");
        let Some(Response::RequestHeaders(h)) = r.response else {
            panic!("headers response")
        };
        let common = h.response.expect("common response");
        assert!(common.clear_route_cache);
        let set = &common.header_mutation.expect("mutation").set_headers[0];
        let header = set.header.as_ref().expect("header");
        assert_eq!(header.key, DESTINATION_HEADER);
        assert_eq!(header.raw_value, b"127.0.0.1:8000");
        assert!(header.value.is_empty());
        assert!(
            r.dynamic_metadata
                .expect("metadata")
                .fields
                .contains_key("envoy.lb")
        );
    }
}
