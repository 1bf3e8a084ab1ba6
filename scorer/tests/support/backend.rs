//! Fake vLLM pods: an HTTP/1.1 server that answers with who it is and what
//! it received (body length and SHA-256, the destination header, framing),
//! or, for `"stream": true` bodies, with a server-sent-events stream that
//! pauses after its first event until the test releases it — so a test can
//! prove the first event got through Envoy before the rest was produced.

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::http::Body;

pub struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: JoinHandle<()>,
}

pub struct State {
    /// `ip:port`, as the picker names it.
    pub name: String,
    /// Requests served.
    pub hits: AtomicUsize,
    /// Lets a paused SSE stream continue after its first event.
    pub release: Notify,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }
}

/// Two pods on `127.0.0.11` and `127.0.0.12` sharing one free port, like
/// vLLM pods that all listen on 8000.
pub async fn start_pair() -> (Backend, Backend) {
    for _ in 0..50 {
        let first = bind("127.0.0.11".parse().expect("ip"), 0).expect("bind 127.0.0.11");
        let port = first.local_addr().expect("addr").port();
        if let Ok(second) = bind("127.0.0.12".parse().expect("ip"), port) {
            return (serve(first), serve(second));
        }
    }
    panic!("no port free on both 127.0.0.11 and 127.0.0.12");
}

fn bind(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, port))?;
    socket.listen(128)
}

fn serve(listener: TcpListener) -> Backend {
    let addr = listener.local_addr().expect("addr");
    let state = Arc::new(State {
        name: addr.to_string(),
        hits: AtomicUsize::new(0),
        release: Notify::new(),
    });
    let task = tokio::spawn({
        let state = Arc::clone(&state);
        async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&state), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    });
    Backend { addr, state, task }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let info = serde_json::json!({
        "backend": state.name,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "destination_header": req.headers().get_all("x-gateway-destination-endpoint")
            .iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>(),
        "transfer_encoding": header("transfer-encoding"),
        "content_length": header("content-length"),
    });
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let streaming = body.len() < 1 << 20
        && serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("stream")?.as_bool())
            == Some(true);
    let response = Response::builder().header("x-backend", &state.name);
    if streaming {
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(sse(state, tx));
        let body = StreamBody::new(ReceiverStream::new(rx)).boxed();
        return Ok(response
            .header("content-type", "text/event-stream")
            .body(body)
            .expect("response"));
    }
    let mut info = info;
    info["len"] = body.len().into();
    info["sha256"] = hex::encode(Sha256::digest(&body)).into();
    let body = super::http::full(info.to_string());
    Ok(response
        .header("content-type", "application/json")
        .body(body)
        .expect("response"))
}

/// `data: {"backend": ..., "n": i}` events and `data: [DONE]`, pausing after
/// the first until [`State::release`] is notified.
async fn sse(state: Arc<State>, tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>) {
    let event = |n: usize| {
        Ok(Frame::data(Bytes::from(format!(
            "data: {{\"backend\": \"{}\", \"n\": {n}}}\n\n",
            state.name
        ))))
    };
    if tx.send(event(0)).await.is_err() {
        return;
    }
    state.release.notified().await;
    for n in 1..4 {
        if tx.send(event(n)).await.is_err() {
            return;
        }
    }
    let _ = tx
        .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
        .await;
}
