//! `--purge-after` in connect mode: a publisher whose endpoint leaves the
//! connect set is purged after the configured time, one still in the set is
//! kept however quiet it is. The service runs in-process (the library's
//! `run_with_targets`) so the test can move an endpoint out of the set, as a
//! DNS change would; sockets, pipeline and Redis are the real ones.

use super::harness::{Engine, Peer, SEED, batch, gpu, keys, tokens, topic};
use super::{index, redis};
use clap::Parser;
use ingester::config::RunArgs;
use kvroute_core::keys::HashScheme;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_left_the_connect_set_is_purged_after_the_time() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let engine = Engine::new(SCHEME, SEED);
    let store = |t: &[u32]| batch(vec![engine.stored(None, t, None).0]);
    let (p, q) = ("127.0.0.61:8000", "127.0.0.62:8000");
    let (p_tokens, q_tokens) = (tokens(610, 2), tokens(620, 2));
    let publisher = |pod: &str, t: &[u32]| {
        json!({
            "topic": topic(pod, model), "pub": "tcp://127.0.0.1:0",
            "await_subscriber_ms": 8000, "steps": [store(t)],
        })
    };
    let pp = Peer::spawn(publisher(p, &p_tokens)).await;
    let pq = Peer::spawn(publisher(q, &q_tokens)).await;
    let both: BTreeSet<String> = [pp.pub_ep.clone(), pq.pub_ep.clone()].into();

    // Port 0, read back: no free-port probe to race other tests.
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the admin listener");
    let http = admin.local_addr().expect("admin address").to_string();
    let connect = format!("{},{}", pp.pub_ep, pq.pub_ep);
    let url = redis.url();
    let cli = Cli::try_parse_from([
        "kvroute-ingester",
        "--redis-url",
        &url,
        "--http-addr",
        &http,
        "--zmq-connect",
        &connect,
        "--hash-scheme",
        SCHEME.as_str(),
        "--hash-seed",
        SEED,
        "--block-size",
        "16",
        "--purge-after",
        "500ms",
    ])
    .expect("arguments");
    let (targets, rx) = watch::channel(both);
    let stop = CancellationToken::new();
    let service = tokio::spawn(ingester::service::run_with_targets(
        cli.run,
        admin,
        |_: &str| None,
        None,
        stop.clone(),
        Some(rx),
    ));

    let (kp, kq) = (keys(SCHEME, &p_tokens), keys(SCHEME, &q_tokens));
    idx.expect("P indexed", &kp, &[&gpu(p)]).await;
    idx.expect("Q indexed", &kq, &[&gpu(q)]).await;

    // P's endpoint leaves the set (its DNS record went away).
    targets.send_replace([pq.pub_ep.clone()].into());
    let left = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    idx.assert("P kept before --purge-after", &kp, &[&gpu(p)])
        .await;
    idx.expect("P purged after --purge-after", &kp, &[]).await;
    assert!(left.elapsed() >= Duration::from_millis(300));
    // Q has been silent all along, but it is in the set: kept.
    idx.assert("Q kept", &kq, &[&gpu(q)]).await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), service)
        .await
        .expect("service stops")
        .expect("task")
        .expect("clean exit");
    pp.kill().await;
    pq.kill().await;
}
