//! llm-d's remote-indexer API over a real tonic channel: the scorer's gRPC
//! server (ext_proc, health and `indexer.v1.IndexerService` on one port) on
//! `127.0.0.1:0`, a hand-written tonic client, and blocks written into a
//! real Redis through `shared`'s index, as the ingester writes them.

mod support;

use kvroute_core::ids::{ModelName, PodId, Tier};
use kvroute_core::index::{Index, IndexOp, StoredBlock};
use kvroute_core::keys::ExtraKeys;
use kvroute_redis::AnyIndex;
use kvroute_redis::RedisIndex;
use kvroute_testkit::redis_server::RedisServer;
use scorer::background::LateIndex;
use scorer::ext_proc::ExtProcConfig;
use scorer::grpc::{self, GrpcHealth, TlsArgs};
use scorer::indexer_api::{GetPodScoresRequest, IndexerServiceServer, PodScorer};
use scorer::route::RouteConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use support::decide::TableDecide;
use support::index::{TINY, completion_ids, key_scheme, tokenizers};
use support::indexer_client::IndexerClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const A: &str = "127.0.0.1:8000";
const B: &str = "127.0.0.2:8000";
const C: &str = "127.0.0.3:8000";

/// The gRPC server with the indexer API over `index`; stops on drop of the token.
async fn serve(index: Arc<LateIndex>, shutdown: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let api = IndexerServiceServer::new(PodScorer::new(
        index,
        key_scheme(),
        Arc::new(tokenizers()),
        &RouteConfig::default(),
    ));
    let health = GrpcHealth::new().await;
    health.set_ready(true).await;
    let decide = Arc::new(TableDecide::new(&[], A));
    tokio::spawn(async move {
        let tls = TlsArgs {
            grpc_tls_cert: None,
            grpc_tls_key: None,
        };
        grpc::serve(
            listener,
            decide,
            ExtProcConfig::default(),
            Some(api),
            &tls,
            &health,
            shutdown,
        )
        .await
        .expect("gRPC server");
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_pod_scores_over_grpc() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .expect("join")
        .expect("redis-server");
    let writer = RedisIndex::connect(&redis.url()).await.expect("writer");
    let index = Arc::new(LateIndex::ready(AnyIndex::Redis(
        RedisIndex::connect(&redis.url()).await.expect("reader"),
    )));
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let addr = serve(index, shutdown).await;
    let mut client = IndexerClient::connect(addr).await;

    // A holds the whole prompt on GPU, B on CPU, C its first two blocks;
    // a pod holding only later blocks has no prefix.
    let prompt = "You are a helpful assistant. Answer briefly and cite sources. ".repeat(8);
    let ids = completion_ids(&tokenizers(), TINY, &prompt);
    let keys = key_scheme().block_keys(&ids, ExtraKeys::NONE);
    assert!(keys.len() >= 4, "{} blocks", keys.len());
    let store = |pod: &str, tier: Tier, range: std::ops::Range<usize>| IndexOp::Store {
        model: ModelName::new(TINY),
        pod: PodId::new(pod),
        tier,
        blocks: keys[range]
            .iter()
            .map(|&key| StoredBlock { key, engine: None })
            .collect(),
    };
    let n = keys.len();
    writer
        .apply(&[
            store(A, Tier::gpu(), 0..n),
            store(B, Tier::cpu(), 0..n),
            store(C, Tier::gpu(), 0..2),
            store("127.0.0.4:8000", Tier::gpu(), 1..n),
        ])
        .await
        .expect("store");

    let scores = client
        .get_pod_scores(&prompt, TINY, &[])
        .await
        .expect("all pods");
    let got: Vec<(&str, f64)> = scores.iter().map(|s| (s.pod.as_str(), s.score)).collect();
    let nf = n as f64;
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0], (A, nf));
    assert_eq!(got[1].0, B);
    assert!((got[1].1 - 0.8 * nf).abs() < 1e-9, "{got:?}");
    assert_eq!(got[2], (C, 2.0));
    assert!(scores.iter().all(|s| s.data_parallel_rank.is_none()));

    // Only the pods asked for; one holding nothing is absent (llm-d's map).
    let scores = client
        .get_pod_scores(&prompt, TINY, &[C, "127.0.0.9:8000"])
        .await
        .expect("subset");
    let got: Vec<(&str, f64)> = scores.iter().map(|s| (s.pod.as_str(), s.score)).collect();
    assert_eq!(got, [(C, 2.0)]);

    // A prompt nobody holds, and one shorter than a block: no scores.
    for prompt in [
        "a different prompt entirely, long enough for a block or two",
        "hi",
    ] {
        let scores = client
            .get_pod_scores(prompt, TINY, &[])
            .await
            .expect("miss");
        assert!(scores.is_empty(), "{prompt}: {scores:?}");
    }

    // Errors as gRPC statuses.
    let status = |r: Result<_, tonic::Status>| r.expect_err("an error").code();
    assert_eq!(
        status(client.get_pod_scores(&prompt, "", &[]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        status(client.get_pod_scores(&prompt, "no/such-model", &[]).await),
        Code::FailedPrecondition
    );
    let other = "/indexer.v1.IndexerService/NoSuchMethod";
    assert_eq!(
        status(client.call(other, GetPodScoresRequest::default()).await),
        Code::Unimplemented
    );

    // Health still answers on the same port.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let reply = health
        .check(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .expect("health check");
    assert_eq!(reply.into_inner().status, 1, "SERVING");

    // Without an index (Redis unreachable): UNAVAILABLE, not a crash.
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let addr = serve(Arc::new(LateIndex::default()), shutdown).await;
    let mut client = IndexerClient::connect(addr).await;
    assert_eq!(
        status(client.get_pod_scores(&prompt, TINY, &[]).await),
        Code::Unavailable
    );
}
