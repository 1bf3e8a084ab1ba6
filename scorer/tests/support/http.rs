//! A minimal HTTP/1.1 client on hyper's connection API: one keep-alive
//! connection per [`Client`], fixed-length or chunked request bodies, and
//! response bodies read whole or frame by frame.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpStream;

pub type Body = BoxBody<Bytes, Infallible>;

/// A body with a `content-length`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A body sent with `transfer-encoding: chunked`, one chunk per element.
pub fn chunked(chunks: Vec<Bytes>) -> Body {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, Infallible>(Frame::data(c)));
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

/// A request to `path` with `headers`; `host` is set for HTTP/1.1.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: Body) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "kvroute.test");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(body).expect("valid request")
}

pub struct Client {
    sender: http1::SendRequest<Body>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender }
    }

    /// Sends and returns the response head; the body is still streaming.
    pub async fn send(&mut self, request: Request<Body>) -> Response<Incoming> {
        self.sender.ready().await.expect("connection ready");
        self.sender.send_request(request).await.expect("response")
    }

    /// Sends and reads the whole response.
    pub async fn call(&mut self, request: Request<Body>) -> Reply {
        read(self.send(request).await).await
    }
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn read(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The next data frame of a streaming response (`None` at its end).
pub async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("response frame").into_data() {
            return Some(data);
        }
    }
    None
}

/// `POST /v1/score` with a JSON body on `client`'s connection.
pub async fn score(client: &mut Client, body: &serde_json::Value) -> Reply {
    client
        .call(request(
            "POST",
            "/v1/score",
            &[("content-type", "application/json")],
            full(body.to_string()),
        ))
        .await
}
