//! A 2-pod fleet on random loopback addresses (ports from the OS), driven
//! with a real HTTP/1.1 client and real ZMQ SUB and DEALER sockets.

use super::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use kvroute_core::events::{KvEvent, decode_batch, parse_frames, parse_replay_frames};
use rand::Rng;
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use zeromq::{DealerSocket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

const MODEL: &str = "test/tiny-model";

fn tokenizer() -> Arc<Tokenizer> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/tokens/tiny");
    Arc::new(
        Tokenizer::from_path(MODEL, &dir, &kvroute_tokens::TokenizerOptions::default())
            .expect("tiny tokenizer loads"),
    )
}

/// A random 127.x.y.z, so parallel tests (and other processes on :0
/// ports) never share an address.
fn random_loopback() -> IpAddr {
    let mut r = rand::rng();
    IpAddr::V4(Ipv4Addr::new(
        127,
        r.random_range(1..=254),
        r.random_range(0..=255),
        r.random_range(2..=254),
    ))
}

/// Pod 0 publishes vLLM >= 0.11's map encoding, pod 1 vLLM 0.10's arrays.
async fn fleet() -> Fleet {
    let specs = [Encoding::Map, Encoding::Array]
        .into_iter()
        .enumerate()
        .map(|(index, encoding)| {
            let ip = random_loopback();
            PodSpec {
                index,
                http: SocketAddr::new(ip, 0),
                kv_pub: SocketAddr::new(ip, 0),
                replay: SocketAddr::new(ip, 0),
                model: MODEL.into(),
                encoding,
                engine: EngineConfig::llama31_8b_h100(0.9),
                replay_buffer_steps: DEFAULT_REPLAY_BUFFER_STEPS,
            }
        })
        .collect();
    Fleet::start(specs, tokenizer())
        .await
        .expect("fleet starts")
}

struct Reply {
    status: u16,
    pod: Option<String>,
    /// Body frames with the time each arrived, seconds after the request
    /// was sent.
    frames: Vec<(f64, Bytes)>,
}

impl Reply {
    fn body(&self) -> String {
        let all: Vec<u8> = self.frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
        String::from_utf8(all).expect("UTF-8 body")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body()).expect("JSON body")
    }
}

async fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("x-session-id", "ignored");
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let req = builder
        .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
        .expect("request");
    let sent = Instant::now();
    let res = sender.send_request(req).await.expect("response");
    let status = res.status().as_u16();
    let pod = res
        .headers()
        .get(POD_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = res.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Ok(data) = frame.into_data() {
            frames.push((sent.elapsed().as_secs_f64(), data));
        }
    }
    Reply {
        status,
        pod,
        frames,
    }
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    send(addr, "POST", path, Some(body.to_string().as_bytes())).await
}

/// The JSON of every `data:` event of an SSE body, and whether it ended
/// with `[DONE]`; with the arrival time of the first event.
fn sse_events(reply: &Reply) -> (Vec<Value>, bool, f64) {
    let body = reply.body();
    let mut events = Vec::new();
    let mut done = false;
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").expect("a data: line");
        assert!(!done, "nothing after [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).expect("chunk JSON"));
        }
    }
    let first = reply.frames.first().map_or(f64::INFINITY, |(t, _)| *t);
    (events, done, first)
}

/// A prompt of `words` distinct words.
fn long_text(words: usize, salt: &str) -> String {
    (0..words)
        .map(|k| format!("{salt}{k}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_reports_the_tokenizers_prompt_length() {
    let fleet = fleet().await;
    let addr = fleet.addrs(0).http;
    let prompt = "The quick brown fox jumps over the lazy dog, twice.";
    let expected = tokenizer().encode_completion(prompt).expect("encode").len();
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body());
    assert_eq!(r.pod.as_deref(), Some(addr.to_string().as_str()));
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], expected);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], expected + 3);
    assert_eq!(v["choices"][0]["text"], " the cached prefix");
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Token ids are taken as they are; max_tokens defaults to 16.
    let r = post(addr, "/v1/completions", &json!({"prompt": [5, 6, 7, 8]})).await;
    assert_eq!(r.status, 200, "{}", r.body());
    assert_eq!(r.json()["usage"]["prompt_tokens"], 4);
    assert_eq!(r.json()["usage"]["completion_tokens"], 16);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chat_pays_prefill_once_then_hits_the_cache() {
    let fleet = fleet().await;
    let addr = fleet.addrs(1).http;
    let messages = json!([
        {"role": "system", "content": long_text(900, "sys")},
        {"role": "user", "content": "Summarize."},
    ]);
    let tokens = tokenizer()
        .encode_chat(
            messages.as_array().expect("list"),
            &kvroute_tokens::ChatOptions::default(),
        )
        .expect("chat encodes");
    let len = tokens.len();
    assert!(
        (2000..8192).contains(&len),
        "one prefill step, long enough to time: {len}"
    );
    let cost = fleet.with_engine(1, |e| e.config().cost.clone());
    let prefill = cost.step_time(len as u64, 0, 0);
    let hit_blocks = (len - 1) / 16;
    let rest = cost.step_time((len - hit_blocks * 16) as u64, 0, 0);
    let body = json!({
        "model": MODEL, "messages": messages, "stream": true,
        "max_completion_tokens": 5, "max_tokens": 99,
    });

    let first = post(addr, "/v1/chat/completions", &body).await;
    assert_eq!(first.status, 200, "{}", first.body());
    assert_eq!(first.pod.as_deref(), Some(addr.to_string().as_str()));
    let (events, done, ttft1) = sse_events(&first);
    assert!(done, "ends with [DONE]");
    assert_eq!(
        events.len(),
        5,
        "one chunk per token (max_completion_tokens wins)"
    );
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = events
        .iter()
        .map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content")
        })
        .collect();
    assert_eq!(text, " the cached prefix routes to");
    assert_eq!(events[4]["choices"][0]["finish_reason"], "length");
    assert!(
        events[..4]
            .iter()
            .all(|e| e["choices"][0]["finish_reason"].is_null())
    );
    assert!(
        ttft1 >= prefill,
        "first chunk at {ttft1:.4}s, before the {prefill:.4}s prefill"
    );

    let second = post(addr, "/v1/chat/completions", &body).await;
    let (events, done, ttft2) = sse_events(&second);
    assert!(done && events.len() == 5);
    assert!(ttft2 >= rest, "{ttft2} < {rest}");
    assert!(
        ttft2 < ttft1,
        "cache hit: {ttft2:.4}s is not faster than {ttft1:.4}s"
    );

    let m = send(addr, "GET", "/metrics", None).await;
    assert_eq!(m.status, 200);
    let text = m.body();
    assert_eq!(
        metric(&text, "vllm:prefix_cache_hits_total"),
        (hit_blocks * 16) as f64
    );
    assert_eq!(
        metric(&text, "vllm:prefix_cache_queries_total"),
        (2 * len) as f64
    );
    assert_eq!(metric(&text, "vllm:num_requests_running"), 0.0);
    assert!(text.contains(&format!("model_name=\"{MODEL}\"")));
    // The other pod saw nothing.
    let other = send(fleet.addrs(0).http, "GET", "/metrics", None).await;
    assert_eq!(
        metric(&other.body(), "vllm:prefix_cache_queries_total"),
        0.0
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_completion_with_usage() {
    let fleet = fleet().await;
    let addr = fleet.addrs(0).http;
    let body = json!({
        "model": MODEL, "prompt": "hello there", "stream": true, "max_tokens": 2,
        "stream_options": {"include_usage": true},
    });
    let r = post(addr, "/v1/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.body());
    let (events, done, _) = sse_events(&r);
    assert!(done);
    assert_eq!(events.len(), 3, "2 tokens and the usage chunk");
    assert_eq!(events[0]["choices"][0]["text"], " the");
    assert_eq!(events[1]["choices"][0]["finish_reason"], "length");
    assert_eq!(events[2]["choices"], json!([]));
    assert_eq!(events[2]["usage"]["completion_tokens"], 2);
    fleet.shutdown().await;
}

/// Frames of a message from a DEALER: the empty delimiter dropped.
fn replay_frames(msg: ZmqMessage) -> Vec<Bytes> {
    let mut frames = msg.into_vec();
    assert!(
        frames.first().is_some_and(|f| f.is_empty()),
        "delimiter first"
    );
    frames.remove(0);
    frames
}

/// Replays from `start`; returns (topic, seq, payload) up to the end marker.
async fn replay(addr: SocketAddr, start: u64) -> Vec<(String, u64, Bytes)> {
    let mut dealer = DealerSocket::new();
    dealer
        .connect(&format!("tcp://{addr}"))
        .await
        .expect("dealer connects");
    let mut req = ZmqMessage::from(Bytes::new());
    req.push_back(Bytes::copy_from_slice(&start.to_be_bytes()));
    dealer.send(req).await.expect("replay request");
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), dealer.recv())
            .await
            .expect("replay reply in time")
            .expect("replay reply");
        let frames = replay_frames(msg);
        let m = parse_replay_frames(&frames).expect("replay frames");
        if m.is_replay_end() {
            assert!(m.payload.is_empty());
            break;
        }
        out.push((m.topic.to_owned(), m.seq, Bytes::copy_from_slice(m.payload)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_are_published_and_replayed_in_both_encodings() {
    let fleet = fleet().await;
    for pod in 0..2 {
        let addrs = fleet.addrs(pod).clone();
        let mut sub = SubSocket::new();
        sub.connect(&format!("tcp://{}", addrs.kv_pub))
            .await
            .expect("sub connects");
        sub.subscribe("").await.expect("subscribe");
        // The subscription reaches the PUB after the handshake.
        tokio::time::sleep(Duration::from_millis(300)).await;

        // 40 prompt tokens and 1 output token: 2 full blocks, no decode.
        let prompt: Vec<u32> = (0..40).map(|k| 100 + k * 7 + pod as u32).collect();
        let r = post(
            addrs.http,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body());
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("a batch in time")
            .expect("a batch");
        let frames = msg.into_vec();
        let m = parse_frames(&frames).expect("[topic, seq, payload]");
        assert_eq!(m.topic, format!("kv@{}@{MODEL}", addrs.http));
        assert_eq!(m.topic, addrs.topic);
        assert_eq!(m.seq, 0);
        let batch = decode_batch(m.payload).expect("payload decodes");
        assert!(batch.skipped.is_empty());
        let [KvEvent::BlockStored(stored)] = batch.events.as_slice() else {
            panic!("one BlockStored: {:?}", batch.events);
        };
        assert_eq!(stored.token_ids, prompt[..32]);
        assert_eq!(stored.parent_block_hash, None);
        let scheme = EngineConfig::llama31_8b_h100(0.9).scheme;
        let expected = kvroute_sim::request::SimRequest::new(0, 0.0, prompt, 1, None, &scheme);
        let engine_hashes = |h: &[kvroute_core::events::BlockHash]| {
            h.iter().map(|b| b.engine()).collect::<Vec<_>>()
        };
        assert_eq!(
            engine_hashes(&stored.block_hashes),
            engine_hashes(expected.block_hashes())
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!((now - batch.ts).abs() < 60.0, "ts is wall-clock seconds");

        // A second prompt: its own batch, seq 1.
        let r = post(
            addrs.http,
            "/v1/completions",
            &json!({"prompt": (0..20).collect::<Vec<u32>>(), "max_tokens": 1}),
        )
        .await;
        assert_eq!(r.status, 200);
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("a second batch in time")
            .expect("a batch");
        let second = msg.into_vec();
        assert_eq!(parse_frames(&second).expect("frames").seq, 1);
        assert_eq!(fleet.stats(pod).batches, 2);

        let all = replay(addrs.replay, 0).await;
        assert_eq!(all.iter().map(|b| b.1).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(all[0].2, frames[2], "the published payload, byte for byte");
        assert_eq!(all[1].2, second[2]);
        // Map (newer vLLM) replies carry the topic; 0.10's do not.
        let topic = if pod == 0 { addrs.topic.as_str() } else { "" };
        assert!(all.iter().all(|b| b.0 == topic));
        let from1 = replay(addrs.replay, 1).await;
        assert_eq!(from1.iter().map(|b| b.1).collect::<Vec<_>>(), vec![1]);
        assert!(replay(addrs.replay, 2).await.is_empty());
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_models_and_health() {
    let fleet = fleet().await;
    let addr = fleet.addrs(0).http;
    let bad = send(addr, "POST", "/v1/completions", Some(b"{not json")).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["code"], 400);
    assert_eq!(bad.pod.as_deref(), Some(addr.to_string().as_str()));
    let bad = send(addr, "POST", "/v1/chat/completions", Some(b"[1, 2]")).await;
    assert_eq!(bad.status, 400);

    let wrong = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(wrong.status, 404);
    let e = wrong.json();
    assert_eq!(e["error"]["type"], "NotFoundError");
    assert_eq!(e["error"]["message"], "The model `other` does not exist.");

    for body in [
        json!({"prompt": "x", "max_tokens": 0}),
        json!({"prompt": "x", "stream": "yes"}),
        json!({"prompt": 5}),
        json!({"prompt": []}),
        json!({"prompt": [1, -2]}),
    ] {
        let r = post(addr, "/v1/completions", &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body());
        assert!(r.json()["error"]["message"].is_string());
    }
    // Longer than the whole cache (27,724 blocks of 16 tokens).
    let capacity = fleet.with_engine(0, |e| e.cache().capacity()) * 16;
    let huge: Vec<u32> = (0..capacity as u32).collect();
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": huge, "max_tokens": 2, "stream": true}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("maximum context length"))
    );

    let models = send(addr, "GET", "/v1/models", None).await;
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], MODEL);
    let health = send(addr, "GET", "/health", None).await;
    assert_eq!((health.status, health.body().as_str()), (200, ""));
    assert_eq!(health.pod.as_deref(), Some(addr.to_string().as_str()));
    let missing = send(addr, "GET", "/nope", None).await;
    assert_eq!(missing.status, 404);
    assert!(missing.pod.is_some(), "every response names the pod");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_does_not_stop_the_engine() {
    let fleet = fleet().await;
    let addr = fleet.addrs(0).http;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    let body = json!({"prompt": "bye", "stream": true, "max_tokens": 200}).to_string();
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("host", "pod")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let res = sender.send_request(req).await.expect("response");
    let mut body = res.into_body();
    let first = body.frame().await.expect("a first frame").expect("frame");
    assert!(first.is_data());
    drop(body);
    drop(sender);
    conn.abort();
    // The engine still runs the request to its 200th token, then answers
    // the next one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.with_engine(0, |e| e.metrics().generation_tokens) < 200 {
        assert!(Instant::now() < deadline, "the request never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "next", "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(fleet.with_engine(0, |e| e.metrics().generation_tokens), 201);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_pods_serve_at_once() {
    // One random 127.a.b.0/24 for all pods, as live mode's 127.0.0.{11+i}.
    let IpAddr::V4(base) = random_loopback() else {
        unreachable!("random_loopback is IPv4")
    };
    let [_, a, b, _] = base.octets();
    let specs = (0..64)
        .map(|index| {
            let ip = IpAddr::V4(Ipv4Addr::new(127, a, b, 11 + index as u8));
            PodSpec {
                index,
                http: SocketAddr::new(ip, 0),
                kv_pub: SocketAddr::new(ip, 0),
                replay: SocketAddr::new(ip, 0),
                model: MODEL.into(),
                encoding: Encoding::Map,
                engine: EngineConfig::llama31_8b_h100(0.9),
                replay_buffer_steps: 16,
            }
        })
        .collect();
    let fleet = Fleet::start(specs, tokenizer())
        .await
        .expect("64 pods start");
    assert_eq!(fleet.pods(), 64);
    let requests: Vec<_> = (0..64)
        .map(|i| {
            let addr = fleet.addrs(i).http;
            tokio::spawn(async move {
                let body = json!({"prompt": format!("pod {i} says hello"), "max_tokens": 4});
                post(addr, "/v1/completions", &body).await
            })
        })
        .collect();
    for (i, r) in requests.into_iter().enumerate() {
        let r = r.await.expect("request task");
        assert_eq!(r.status, 200);
        assert_eq!(r.pod, Some(fleet.addrs(i).http.to_string()));
    }
    for i in 0..64 {
        let s = fleet.stats(i);
        assert_eq!(s.steps, 4, "pod {i}: one prefill and three decode steps");
        assert!(s.max_lag_s >= s.mean_lag_s);
    }
    let t = Instant::now();
    fleet.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown is prompt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_requests() {
    let fleet = fleet().await;
    let addr = fleet.addrs(0).http;
    // ~7 ms a decode step: 100,000 tokens would take minutes.
    let long = json!({"prompt": "long", "max_tokens": 100_000});
    let waiting = tokio::spawn(async move { post(addr, "/v1/completions", &long).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.stats(0).steps < 3 {
        assert!(Instant::now() < deadline, "the engine never stepped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fleet.shutdown().await;
    let r = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the request ends with the fleet")
        .expect("request task");
    assert_eq!(r.status, 503);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "closed"
    );
}
