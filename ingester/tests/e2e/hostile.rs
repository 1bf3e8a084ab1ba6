//! Hostile ZeroMQ peers against the running binary: raw TCP clients and
//! servers that speak just enough ZMTP 3 by hand to reach the frame decoder
//! (`vendor/zeromq`, bounded by `--zmq-max-message-size`), stall the
//! handshake, or exceed the connection cap. In each test a well-behaved
//! vLLM-format publisher keeps publishing through it all, and the index
//! (real Redis) must show its batches: the ingester stays up, drops only
//! the offender and counts it (`kvroute_ingester_zmq_rejected_total`).
//!
//! Before the bounds, the first test's 73 bytes (greeting + a frame header
//! declaring 32 GiB) aborted the process: `memory allocation of 34359803913
//! bytes failed`, exit 134 (reproduced by running it with
//! `--zmq-max-message-size 64GiB`, i.e. no effective bound).

use super::harness::{
    DEADLINE, Engine, Ingester, Peer, SEED, batch, connecting, gpu, keys, tokens, topic,
};
use super::{index, redis};
use kvroute_core::keys::HashScheme;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;
const REJECTED: &str = "kvroute_ingester_zmq_rejected_total";
/// What the peer's frame header declares: 32 GiB.
const HUGE: u64 = 32 << 30;

/// A ZMTP 3.0 greeting: signature, version 3.0, NULL mechanism, as client.
fn greeting() -> Vec<u8> {
    let mut g = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 0];
    let mut mechanism = b"NULL".to_vec();
    mechanism.resize(20, 0);
    g.extend(mechanism);
    g.push(0); // as-server
    g.resize(64, 0); // filler
    g
}

/// A READY command announcing `socket_type` (short command frame).
fn ready(socket_type: &str) -> Vec<u8> {
    let mut body = vec![5];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type.as_bytes());
    let mut frame = vec![0x04, body.len() as u8];
    frame.extend(body);
    frame
}

/// A long message frame header declaring [`HUGE`] bytes, and no data.
fn huge_header() -> Vec<u8> {
    let mut h = vec![0x02];
    h.extend_from_slice(&HUGE.to_be_bytes());
    h
}

/// Reads (and discards) until the other side closes; whether it did
/// within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_to_end).await.is_ok()
}

/// A TCP connection to the ingester's bound SUB that sends `bytes`.
async fn dial(ing: &Ingester, bytes: &[u8]) -> TcpStream {
    let addr = ing.zmq.trim_start_matches("tcp://");
    let mut s = TcpStream::connect(addr).await.expect("connect to the SUB");
    if !bytes.is_empty() {
        s.write_all(bytes).await.expect("send");
    }
    s
}

async fn expect_alive(ing: &mut Ingester) {
    assert!(ing.running(), "kvroute-ingester exited");
    assert_eq!(ing.get("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_mode_survives_huge_frames_stalled_handshakes_and_too_many_connections() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let mut ing = Ingester::start(
        &redis.url(),
        &[
            "--hash-scheme",
            SCHEME.as_str(),
            "--zmq-handshake-timeout",
            "300ms",
            "--zmq-max-connections",
            "3",
        ],
    )
    .await;
    let engine = Engine::new(SCHEME, SEED);
    let pod = "127.0.0.61:8000";
    let (before, after) = (tokens(610, 1), tokens(611, 1));
    let steps = json!([
        batch(vec![engine.stored(None, &before, None).0]),
        {"wait": "more"},
        batch(vec![engine.stored(None, &after, None).0]),
    ]);
    let mut peer = Peer::spawn(connecting(&ing, &topic(pod, model), "v0.33", steps)).await;
    let holder = gpu(pod);
    idx.expect(
        "the good publisher's first batch",
        &keys(SCHEME, &before),
        &[&holder],
    )
    .await;

    // The 73 bytes that used to abort the process: refused in the handshake.
    let mut s = dial(&ing, &[greeting(), huge_header()].concat()).await;
    assert!(
        closed_within(&mut s, DEADLINE).await,
        "oversized peer not dropped"
    );
    ing.expect_metric(REJECTED, &[("mode", "bind"), ("reason", "too_large")], 1.0)
        .await;
    expect_alive(&mut ing).await;

    // The same after a complete handshake, as a message frame.
    let mut s = dial(&ing, &[greeting(), ready("PUB"), huge_header()].concat()).await;
    assert!(
        closed_within(&mut s, DEADLINE).await,
        "oversized message not dropped"
    );
    ing.expect_metric(REJECTED, &[("mode", "bind"), ("reason", "too_large")], 2.0)
        .await;
    expect_alive(&mut ing).await;

    // A peer that connects and says nothing is closed after the timeout.
    let start = Instant::now();
    let mut s = dial(&ing, &[]).await;
    assert!(
        closed_within(&mut s, DEADLINE).await,
        "silent peer not dropped"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "closed before the handshake timeout: {:?}",
        start.elapsed()
    );
    ing.expect_metric(
        REJECTED,
        &[("mode", "bind"), ("reason", "handshake_timeout")],
        1.0,
    )
    .await;

    // Cap 3: the publisher and two idle PUBs hold every slot...
    let held = [greeting(), ready("PUB")].concat();
    let mut idle = vec![dial(&ing, &held).await, dial(&ing, &held).await];
    ing.expect_metric_eq(
        "kvroute_ingester_connected_publishers",
        &[("mode", "bind")],
        3.0,
    )
    .await;
    // ...so a fourth is closed at once, without a handshake.
    let mut s = dial(&ing, &held).await;
    assert!(
        closed_within(&mut s, DEADLINE).await,
        "connection over the cap kept"
    );
    ing.expect_metric(
        REJECTED,
        &[("mode", "bind"), ("reason", "too_many_connections")],
        1.0,
    )
    .await;
    // A slot given back is taken again.
    idle.pop();
    ing.expect_metric_eq(
        "kvroute_ingester_connected_publishers",
        &[("mode", "bind")],
        2.0,
    )
    .await;
    idle.push(dial(&ing, &held).await);
    ing.expect_metric_eq(
        "kvroute_ingester_connected_publishers",
        &[("mode", "bind")],
        3.0,
    )
    .await;
    drop(idle);

    // The good publisher was never disturbed.
    peer.resume("more").await;
    idx.expect(
        "the good publisher's later batch",
        &keys(SCHEME, &after),
        &[&holder],
    )
    .await;
    expect_alive(&mut ing).await;
    assert_eq!(
        ing.metric("kvroute_ingester_batches_total", &[("verdict", "gap")])
            .await,
        0.0
    );
    peer.kill().await;
}

/// A fake PUB: every connection gets our greeting, then (first connection)
/// a huge frame header where READY belongs, or (later ones) READY and a
/// huge message header; each is read until the ingester closes it.
async fn hostile_pub(listener: TcpListener) {
    let mut n = 0;
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let bytes = if n == 0 {
            [greeting(), huge_header()].concat()
        } else {
            [greeting(), ready("PUB"), huge_header()].concat()
        };
        n += 1;
        tokio::spawn(async move {
            let _ = s.write_all(&bytes).await;
            closed_within(&mut s, DEADLINE).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_mode_survives_a_publisher_sending_huge_frames() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let listener = TcpListener::bind("127.0.0.62:0").await.expect("bind");
    let hostile = format!("tcp://{}", listener.local_addr().expect("addr"));
    tokio::spawn(hostile_pub(listener));
    let engine = Engine::new(SCHEME, SEED);
    let pod = "127.0.0.63:8000";
    let (before, after) = (tokens(630, 1), tokens(631, 1));
    let mut peer = Peer::spawn(json!({
        "topic": topic(pod, model), "pub": "tcp://127.0.0.63:0", "await_subscriber_ms": 8000,
        "steps": [
            batch(vec![engine.stored(None, &before, None).0]),
            {"wait": "more"},
            batch(vec![engine.stored(None, &after, None).0]),
        ],
    }))
    .await;
    let targets = format!("{hostile},{}", peer.pub_ep);
    let mut ing = Ingester::start_raw(
        &redis.url(),
        &["--zmq-connect", &targets, "--hash-scheme", SCHEME.as_str()],
        String::new(),
    )
    .await;
    let holder = gpu(pod);
    idx.expect(
        "the good publisher's first batch",
        &keys(SCHEME, &before),
        &[&holder],
    )
    .await;
    // Refused in the handshake, then as a message; the ingester redials.
    ing.expect_metric(
        REJECTED,
        &[("mode", "connect"), ("reason", "too_large")],
        2.0,
    )
    .await;
    expect_alive(&mut ing).await;
    peer.resume("more").await;
    idx.expect(
        "the good publisher's later batch",
        &keys(SCHEME, &after),
        &[&holder],
    )
    .await;
    expect_alive(&mut ing).await;
    peer.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_server_sending_a_huge_frame_fails_the_replay_only() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let ip = "127.0.0.64";
    // The hostile ROUTER: READY, then a frame header declaring 32 GiB as
    // the reply to the replay request.
    let listener = TcpListener::bind(format!("{ip}:0")).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let bytes = [greeting(), ready("ROUTER"), huge_header()].concat();
                let _ = s.write_all(&bytes).await;
                closed_within(&mut s, DEADLINE).await;
            });
        }
    });
    let engine = Engine::new(SCHEME, SEED);
    let pod = format!("{ip}:8000");
    let (first, lost, last) = (tokens(640, 1), tokens(641, 1), tokens(642, 1));
    let zmq = super::harness::bind_endpoint();
    let peer = Peer::spawn(json!({
        "topic": topic(&pod, model), "encoding": "v0.33", "pub": zmq, "pub_mode": "connect",
        "await_subscriber_ms": 8000,
        "steps": [
            batch(vec![engine.stored(None, &first, None).0]),
            {"batch": [engine.stored(None, &lost, None).0], "send": false},
            batch(vec![engine.stored(None, &last, None).0]),
        ],
    }))
    .await;
    let template = format!("tcp://{{host}}:{port}");
    let mut ing = Ingester::start_bound(
        &redis.url(),
        &zmq,
        &[
            "--hash-scheme",
            SCHEME.as_str(),
            "--replay-endpoint",
            &template,
        ],
    )
    .await;
    let holder = gpu(&pod);
    idx.expect("the batch after the gap", &keys(SCHEME, &last), &[&holder])
        .await;
    idx.assert("the batch before it", &keys(SCHEME, &first), &[&holder])
        .await;
    idx.assert("the gap, not refilled", &keys(SCHEME, &lost), &[])
        .await;
    ing.expect_metric(
        REJECTED,
        &[("mode", "replay"), ("reason", "too_large")],
        1.0,
    )
    .await;
    assert_eq!(
        ing.metric("kvroute_ingester_replays_total", &[("outcome", "error")])
            .await,
        1.0
    );
    assert_eq!(
        ing.metric("kvroute_ingester_gap_batches_total", &[]).await,
        1.0
    );
    expect_alive(&mut ing).await;
    peer.kill().await;
}
