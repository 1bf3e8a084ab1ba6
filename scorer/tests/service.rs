//! The whole scorer service (`scorer::service::run`) in process, on sockets
//! the test binds itself on `127.0.0.1:0`: nothing probes for a free port
//! and races another test for it.

mod support;

use clap::Parser;
use scorer::config::ServeArgs;
use scorer::service::{self, Listeners};
use std::time::Duration;
use support::http::{self, Client};
use support::index::{TINY, key_args};
use support::indexer_client::IndexerClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const A: &str = "127.0.0.1:8000";
const B: &str = "127.0.0.2:8000";

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_the_listeners_it_is_given() {
    let (grpc, http_listener, health_listener) = (bind().await, bind().await, bind().await);
    let grpc_addr = grpc.local_addr().expect("grpc addr");
    let http_addr = http_listener.local_addr().expect("http addr");
    let health_addr = health_listener.local_addr().expect("health addr");
    let tiny = format!(
        "{TINY}={}",
        kvroute_testkit::test_env::testdata("tokens/tiny").display()
    );
    let mut argv = vec![
        "kvroute-scorer".to_string(),
        "--endpoints".into(),
        format!("{A},{B}"),
        "--tokenizer".into(),
        tiny,
    ];
    argv.extend(key_args());
    let args = Cli::try_parse_from(argv).expect("flags").serve;
    let shutdown = CancellationToken::new();
    let listeners = Listeners {
        grpc,
        http: http_listener,
        grpc_health: Some(health_listener),
    };
    // No --redis-url: an in-memory index, empty.
    let task = tokio::spawn(service::run(
        args,
        listeners,
        |_: &str| None,
        None,
        shutdown.clone(),
    ));

    // HTTP: ready, and a dry run routes by load (nothing cached).
    let mut client = Client::connect(http_addr).await;
    let mut ready = None;
    for _ in 0..100 {
        let reply = client
            .call(http::request("GET", "/readyz", &[], http::full("")))
            .await;
        if reply.status == 200 {
            ready = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready.is_some(), "never ready");
    let body = serde_json::json!({"model": TINY, "prompt": "the quick brown fox ".repeat(8)});
    let reply = http::score(&mut client, &body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let report = reply.json();
    assert_eq!(report["reason"], "load", "{report}");
    assert!([A, B].contains(&report["picked"].as_str().unwrap_or("")));

    // gRPC: health on both gRPC listeners, llm-d's indexer API on the main one.
    for addr in [grpc_addr, health_addr] {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "liveness".into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "{addr}");
    }
    let mut indexer = IndexerClient::connect(grpc_addr).await;
    let scores = indexer
        .get_pod_scores(&"the quick brown fox ".repeat(8), TINY, &[])
        .await
        .expect("GetPodScores");
    assert_eq!(scores, vec![]);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stopped in time")
        .expect("join")
        .expect("service ran");
}
