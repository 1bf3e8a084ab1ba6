//! The transport layer against real ZeroMQ peers: `kvroute_testkit::publisher`
//! (pyzmq/libzmq + msgspec, vLLM's wire format) publishing to the ingester's
//! SUB sockets in both modes, a publisher restart in connect mode, malformed
//! frames, vLLM's replay ROUTER in both reply shapes, and runtime changes of
//! the endpoint set. Loopback only, ports from the OS.

use ingester::replay::{self, ReplayError, ReplayOptions, RouterReplayer};
use ingester::socket::{
    self, BoundSub, Malformed, RawBatch, SocketConfig, SocketStats, SubOptions,
};
use ingester::worker::Replayer;
use kvroute_core::events::{KvEvent, decode_batch, parse_topic};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const BLOCK_SIZE: u32 = 16;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

use kvroute_testkit::publisher::{Peer, python};

fn free_port() -> u16 {
    kvroute_testkit::net::free_port().expect("free port")
}

/// The token ids the peer generates for batch `seq`.
fn assert_generated(batch: &RawBatch) {
    let decoded = decode_batch(&batch.payload).expect("payload decodes");
    let [KvEvent::BlockStored(stored)] = decoded.events.as_slice() else {
        panic!("one BlockStored per generated batch: {decoded:?}");
    };
    let first = batch.seq as u32 * BLOCK_SIZE;
    assert_eq!(
        stored.token_ids,
        (first..first + BLOCK_SIZE).collect::<Vec<_>>(),
        "{}",
        batch.topic
    );
}

async fn recv(rx: &mut mpsc::Receiver<RawBatch>, within: Duration) -> RawBatch {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("a batch in time")
        .expect("channel open")
}

fn bind_options(filter: &str) -> SubOptions {
    SubOptions {
        topic_filter: filter.to_owned(),
        ..SubOptions::default()
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_mode_three_publishers_in_order_and_filtered() {
    init_tracing();
    let sub = BoundSub::bind(&["tcp://127.0.0.1:0".into()], &bind_options("kv@"))
        .await
        .expect("bind");
    let endpoint = sub.endpoints()[0].clone();
    // A small channel, so the receiver also exercises waiting for room.
    let (tx, mut rx) = mpsc::channel(8);
    let stats = Arc::new(SocketStats::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(sub.run(tx, stats.clone(), stop.clone()));

    let topics: Vec<String> = (0..3)
        .map(|i| format!("kv@127.0.0.1:800{i}@org/model-{i}"))
        .collect();
    let spawns = topics.iter().enumerate().map(|(i, topic)| {
        Peer::spawn(json!({
            "topic": topic,
            "encoding": if i == 0 { "v0.10" } else { "v0.33" },
            "pub": endpoint, "pub_mode": "connect", "await_subscriber_ms": 5000,
            "data_parallel_rank": if i == 2 { json!(1) } else { Value::Null },
            "steps": [
                {"publish": 20},
                {"publish": 5, "topic": "other@127.0.0.1:8000@m"},
                {"publish": 5, "topic": ""},
                {"publish": 30, "interval_ms": 1},
            ],
        }))
    });
    let mut peers = futures::future::join_all(spawns).await;
    for p in &mut peers {
        assert_eq!(p.wait_for("SUBSCRIBED").await, "SUBSCRIBED");
    }

    let mut per_topic: HashMap<String, Vec<u64>> = HashMap::new();
    while per_topic.values().map(Vec::len).sum::<usize>() < 150 {
        let b = recv(&mut rx, Duration::from_secs(5)).await;
        assert!(
            topics.contains(&b.topic),
            "only subscribed topics arrive: {:?}",
            b.topic
        );
        assert!(
            b.source.starts_with("bind:tcp://127.0.0.1:"),
            "{}",
            b.source
        );
        assert_generated(&b);
        per_topic.entry(b.topic.clone()).or_default().push(b.seq);
    }
    for topic in &topics {
        // Seqs 20..30 went out under the other topics and were filtered away.
        let want: Vec<u64> = (0..20).chain(30..60).collect();
        assert_eq!(per_topic[topic], want, "{topic}: every batch, in order");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err(),
        "nothing else"
    );
    let s = stats.snapshot();
    assert_eq!(s.received, 150);
    assert_eq!(s.malformed_total(), 0);
    assert_eq!(s.bind_peers, 3);

    for p in peers {
        p.kill().await;
    }
    eventually("peers gone", || stats.snapshot().bind_peers == 0).await;
    stop.cancel();
    task.await.expect("join").expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_mode_redials_a_restarted_publisher_within_a_second() {
    init_tracing();
    let port = free_port();
    let pub_ep = format!("tcp://127.0.0.1:{port}");
    let script = json!({
        "topic": "kv@127.0.0.1:8000@m", "pub": pub_ep, "forever_interval_ms": 5,
    });
    let first = Peer::spawn(script.clone()).await;
    let (targets_tx, targets) = watch::channel(BTreeSet::from([pub_ep.clone()]));
    let (tx, mut rx) = mpsc::channel(4096);
    let stats = Arc::new(SocketStats::default());
    let stop = CancellationToken::new();
    // The empty filter: everything the publisher sends.
    let options = SubOptions {
        topic_filter: String::new(),
        ..SubOptions::default()
    };
    let task = tokio::spawn(socket::run_connect(
        targets,
        options,
        tx,
        stats.clone(),
        stop.clone(),
    ));

    let b = recv(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(b.source, format!("connect:{pub_ep}"));
    assert_generated(&b);
    first.kill().await;
    // Down for five refused redials: an exponential backoff (100, 200, 400,
    // 800 ms...) would by then wait 1.6 s before the next one, and the
    // latency check below would catch it. Then drain what the first sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.snapshot().connect_failures < 5 {
        assert!(
            Instant::now() < deadline,
            "redials were not refused meanwhile"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while rx.try_recv().is_ok() {}
    assert_eq!(stats.snapshot().connect_peers, 0, "the loss was noticed");

    let second = Peer::spawn(script).await;
    let b = recv(&mut rx, Duration::from_secs(3)).await;
    let latency = b.received_at.saturating_duration_since(second.ready_at);
    eprintln!(
        "reconnect latency: first batch {latency:?} after the restarted publisher was ready (seq {})",
        b.seq
    );
    assert!(
        latency < Duration::from_secs(1),
        "heard again after {latency:?}"
    );
    assert!(
        b.seq < 200,
        "a batch of the new incarnation (seq {})",
        b.seq
    );
    assert_generated(&b);
    let s = stats.snapshot();
    assert_eq!(
        (
            s.connects,
            s.reconnects,
            s.connect_peers,
            s.connect_endpoints
        ),
        (2, 1, 1, 1)
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops promptly")
        .expect("join")
        .expect("clean stop");
    assert_eq!(stats.snapshot().connect_endpoints, 0);
    second.kill().await;
    drop(targets_tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_counted_and_skipped() {
    init_tracing();
    let sub = BoundSub::bind(&["tcp://127.0.0.1:0".into()], &bind_options("kv@"))
        .await
        .expect("bind");
    let endpoint = sub.endpoints()[0].clone();
    let (tx, mut rx) = mpsc::channel(64);
    let stats = Arc::new(SocketStats::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(sub.run(tx, stats.clone(), stop.clone()));

    let topic_hex = hex::encode("kv@127.0.0.1:8000@m");
    let mut peer = Peer::spawn(json!({
        "topic": "kv@127.0.0.1:8000@m", "pub": endpoint, "pub_mode": "connect",
        "await_subscriber_ms": 5000,
        "steps": [
            {"publish": 2},
            {"frames": [topic_hex, "0000000000000002"]},
            {"frames": [topic_hex, "00000000000002", "93"]},
            {"frames": ["6b7640ff", "0000000000000002", "93"]},
            {"frames": [topic_hex, "0000000000000002", "93", "00"]},
            {"publish": 2},
        ],
    }))
    .await;
    peer.wait_for("SUBSCRIBED").await;
    let seqs = [
        recv(&mut rx, Duration::from_secs(5)).await,
        recv(&mut rx, Duration::from_secs(5)).await,
        recv(&mut rx, Duration::from_secs(5)).await,
        recv(&mut rx, Duration::from_secs(5)).await,
    ]
    .map(|b| {
        assert_generated(&b);
        b.seq
    });
    assert_eq!(seqs, [0, 1, 2, 3], "good batches still flow, in order");
    let s = stats.snapshot();
    assert_eq!(s.malformed(Malformed::FrameCount), 2);
    assert_eq!(s.malformed(Malformed::SeqLength), 1);
    assert_eq!(s.malformed(Malformed::TopicNotUtf8), 1);
    assert_eq!(s.received, 4);
    stop.cancel();
    task.await.expect("join").expect("clean stop");
    peer.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_in_both_reply_shapes() {
    init_tracing();
    let topic = "kv@127.0.0.1:8000@m";
    for shape in ["v0.10", "v0.33"] {
        let mut peer = Peer::spawn(json!({
            "topic": topic, "replay": "tcp://127.0.0.1:0", "replay_shape": shape,
            "steps": [{"publish": 3}, {"skip": 2}, {"publish": 1}],
        }))
        .await;
        assert_eq!(peer.wait_for("DONE").await, "DONE 6");
        let ep = peer.replay_ep.clone().expect("replay endpoint");

        let got = replay::replay(&ep, 2, Duration::from_secs(3))
            .await
            .expect("replay");
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [2, 3, 4, 5],
            "{shape}"
        );
        for r in &got {
            let want_topic = (shape == "v0.33").then(|| topic.to_owned());
            assert_eq!(r.topic, want_topic, "{shape}");
            assert_generated(&RawBatch {
                topic: topic.into(),
                seq: r.seq,
                payload: r.payload.clone(),
                received_at: Instant::now(),
                source: ep.clone(),
            });
        }
        // Past the end: only the end marker comes back.
        assert!(
            replay::replay(&ep, 100, Duration::from_secs(3))
                .await
                .expect("empty")
                .is_empty()
        );
        // The count bound.
        let opts = ReplayOptions {
            max_batches: 3,
            ..ReplayOptions::new(Duration::from_secs(3))
        };
        let err = replay::replay_with(&ep, 0, opts)
            .await
            .expect_err("too many");
        assert!(matches!(err, ReplayError::TooMany { max: 3, .. }), "{err}");
        // The byte bound: the first payload is already over it.
        let opts = ReplayOptions {
            max_bytes: 1,
            ..ReplayOptions::new(Duration::from_secs(3))
        };
        let err = replay::replay_with(&ep, 0, opts)
            .await
            .expect_err("too large");
        assert!(matches!(err, ReplayError::TooLarge { max: 1, .. }), "{err}");
        // Through the worker's Replayer, with the pod's host in the template.
        let port = ep.rsplit(':').next().expect("port");
        let r = RouterReplayer::new(
            format!("tcp://{{host}}:{port}"),
            ReplayOptions::new(Duration::from_secs(3)),
        );
        let fetched = r
            .fetch(&parse_topic(topic).expect("topic"), 4)
            .await
            .expect("fetch");
        assert_eq!(fetched.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(fetched[0].1, got[2].payload.to_vec());
        peer.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_set_changes_at_runtime() {
    init_tracing();
    let a = Peer::spawn(json!({"topic": "kv@127.0.0.1:8001@m", "forever_interval_ms": 10})).await;
    let b = Peer::spawn(json!({"topic": "kv@127.0.0.1:8002@m", "forever_interval_ms": 10})).await;
    let (targets_tx, targets) = watch::channel(BTreeSet::from([a.pub_ep.clone()]));
    let (tx, mut rx) = mpsc::channel(4096);
    let stats = Arc::new(SocketStats::default());
    let stop = CancellationToken::new();
    let config = SocketConfig {
        options: SubOptions::default(),
        bind: vec![],
        connect: Some(targets),
    };
    let task = tokio::spawn(socket::run(config, tx, stats.clone(), stop.clone()));

    let first = recv(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(first.topic, "kv@127.0.0.1:8001@m");

    targets_tx.send_replace(BTreeSet::from([a.pub_ep.clone(), b.pub_ep.clone()]));
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        seen.insert(recv(&mut rx, Duration::from_secs(5)).await.topic);
    }
    let s = stats.snapshot();
    assert_eq!(
        (
            s.connects,
            s.reconnects,
            s.connect_endpoints,
            s.connect_peers
        ),
        (2, 0, 2, 2)
    );

    // Remove A: its batches stop, B's keep coming on the same connection.
    targets_tx.send_replace(BTreeSet::from([b.pub_ep.clone()]));
    eventually("A's socket closed", || {
        stats.snapshot().connect_endpoints == 1
    })
    .await;
    while rx.try_recv().is_ok() {}
    let until = Instant::now() + Duration::from_millis(300);
    let mut from_b = 0;
    while let Ok(Some(batch)) = tokio::time::timeout_at(until.into(), rx.recv()).await {
        assert_eq!(
            batch.topic, "kv@127.0.0.1:8002@m",
            "nothing from the removed endpoint"
        );
        from_b += 1;
    }
    assert!(from_b >= 10, "B undisturbed: {from_b} batches in 300 ms");
    let s = stats.snapshot();
    assert_eq!((s.connects, s.reconnects, s.connect_peers), (2, 0, 1));

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops promptly")
        .expect("join")
        .expect("clean stop");
    a.kill().await;
    b.kill().await;
}

/// The peer's encoder is vLLM's: it reproduces every payload of the vLLM
/// reference vectors byte for byte (`testdata/vllm`).
#[tokio::test]
async fn python_peer_reproduces_vllm_payload_bytes() {
    let out = Command::new(python())
        .arg(kvroute_testkit::publisher::script_path())
        .arg("--check-fixtures")
        .arg(kvroute_testkit::test_env::testdata("vllm"))
        .output()
        .await
        .expect("run the fixture check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "payload mismatch:\n{text}");
    assert!(
        text.lines().filter(|l| l.starts_with("ok ")).count() >= 20,
        "{text}"
    );
}
