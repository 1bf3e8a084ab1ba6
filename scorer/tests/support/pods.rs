//! A fleet of fake vLLM pods for the end-to-end tests that run the real
//! scorer: pods on 127.0.0.11, .12, ... sharing one port (as vLLM pods all
//! listen on 8000), each answering with who it is and what it received
//! (body length and SHA-256, the destination header), streaming SSE for
//! `"stream": true` bodies, and serving vLLM's `/metrics` with a settable
//! `vllm:num_requests_waiting`.
//!
//! A pod can *hold* its responses: requests arrive (and are logged, in
//! arrival order across the fleet) but get no response until the hold is
//! lifted, so they stay in flight in the scorer's load accounting. A held
//! stream sends its first event and pauses.

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::http::{Body, full};

pub struct Fleet {
    pub pods: Vec<Pod>,
    /// Inference requests (not `/metrics`) in arrival order: pod names.
    arrivals: Arc<Mutex<Vec<String>>>,
}

pub struct Pod {
    /// `ip:port`, as the scorer and Envoy name it.
    pub name: String,
    state: Arc<PodState>,
    task: JoinHandle<()>,
}

struct PodState {
    name: String,
    /// true: responses wait (streams after their first event).
    hold: watch::Sender<bool>,
    /// What `/metrics` reports as `vllm:num_requests_waiting`.
    waiting: AtomicU32,
    arrivals: Arc<Mutex<Vec<String>>>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pod {
    pub fn hold(&self, hold: bool) {
        self.state.hold.send_replace(hold);
    }

    pub fn set_waiting(&self, waiting: u32) {
        self.state.waiting.store(waiting, Ordering::SeqCst);
    }
}

impl Fleet {
    /// `n` pods (at most 8) on 127.0.0.11.. sharing one free port.
    pub async fn start(n: usize) -> Fleet {
        assert!((1..=8).contains(&n), "1..=8 pods");
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        'attempt: for _ in 0..50 {
            let first = bind(ip(0), 0).expect("bind 127.0.0.11");
            let port = first.local_addr().expect("addr").port();
            let mut listeners = vec![first];
            for i in 1..n {
                match bind(ip(i), port) {
                    Ok(l) => listeners.push(l),
                    Err(_) => continue 'attempt,
                }
            }
            let pods = listeners
                .into_iter()
                .map(|l| serve(l, arrivals.clone()))
                .collect();
            return Fleet { pods, arrivals };
        }
        panic!("no port free on 127.0.0.11..1{n}");
    }

    /// Pods on exactly `addrs` (one brought back where another died).
    pub async fn start_at(addrs: &[SocketAddr]) -> Fleet {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let pods = addrs
            .iter()
            .map(|a| {
                let l = bind(a.ip(), a.port()).unwrap_or_else(|e| panic!("bind {a}: {e}"));
                serve(l, arrivals.clone())
            })
            .collect();
        Fleet { pods, arrivals }
    }

    /// `--endpoints` for the scorer.
    pub fn endpoints(&self) -> String {
        let names: Vec<&str> = self.pods.iter().map(|p| p.name.as_str()).collect();
        names.join(",")
    }

    pub fn hold(&self, hold: bool) {
        for p in &self.pods {
            p.hold(hold);
        }
    }

    /// Every arrival so far, in order.
    pub fn arrivals(&self) -> Vec<String> {
        self.arrivals.lock().clone()
    }

    pub fn arrived(&self) -> usize {
        self.arrivals.lock().len()
    }

    /// Waits until `n` requests arrived in total; their pods, in order.
    pub async fn wait_arrivals(&self, n: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let all = self.arrivals();
            if all.len() >= n {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} requests reached a pod within {within:?}",
                all.len()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn ip(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 11 + i as u8])
}

fn bind(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, port))?;
    socket.listen(256)
}

fn serve(listener: TcpListener, arrivals: Arc<Mutex<Vec<String>>>) -> Pod {
    let name = listener.local_addr().expect("addr").to_string();
    let state = Arc::new(PodState {
        name: name.clone(),
        hold: watch::channel(false).0,
        waiting: AtomicU32::new(0),
        arrivals,
    });
    let task = tokio::spawn({
        let state = Arc::clone(&state);
        async move {
            // Connections live in this task's set, so a dropped pod closes
            // its keep-alive connections too (it is dead, not half-alive).
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&state), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    });
    Pod { name, state, task }
}

async fn released(state: &PodState) {
    let mut rx = state.hold.subscribe();
    let _ = rx.wait_for(|hold| !*hold).await;
}

async fn handle(
    state: Arc<PodState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/metrics" {
        let text = format!(
            "# TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{model_name=\"m\"}} {}\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{model_name=\"m\"}} 0\n",
            state.waiting.load(Ordering::SeqCst)
        );
        return Ok(Response::new(full(text)));
    }
    state.arrivals.lock().push(state.name.clone());
    let mut info = serde_json::json!({
        "backend": state.name,
        "path": req.uri().path(),
        "destination_header": req.headers().get_all("x-gateway-destination-endpoint")
            .iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>(),
    });
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let streaming = serde_json::from_slice::<serde_json::Value>(&body)
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
    released(&state).await;
    info["len"] = body.len().into();
    info["sha256"] = hex::encode(Sha256::digest(&body)).into();
    Ok(response
        .header("content-type", "application/json")
        .body(full(info.to_string()))
        .expect("response"))
}

/// `data: {"backend": ..., "n": i}` events and `data: [DONE]`; a held pod
/// pauses after the first event until released.
async fn sse(state: Arc<PodState>, tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>) {
    let event = |n: usize| {
        Ok(Frame::data(Bytes::from(format!(
            "data: {{\"backend\": \"{}\", \"n\": {n}}}\n\n",
            state.name
        ))))
    };
    if tx.send(event(0)).await.is_err() {
        return;
    }
    released(&state).await;
    for n in 1..4 {
        if tx.send(event(n)).await.is_err() {
            return;
        }
    }
    let _ = tx
        .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
        .await;
}
