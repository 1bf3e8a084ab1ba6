//! The scorer as a running service: builds the router from [`ServeArgs`],
//! serves gRPC (ext_proc, health, llm-d's indexer API) and HTTP (score API,
//! health, metrics), runs the background tasks, and stops on `shutdown`.
//!
//! Readiness never depends on Redis: without the index the scorer still
//! routes by load, and Envoy cannot fail open in FULL_DUPLEX_STREAMED mode,
//! so an unready scorer would take traffic down with it.

use crate::background::{self, LateIndex};
use crate::candidates::Candidates;
use crate::config::ServeArgs;
use crate::grpc::{self, GrpcHealth};
use crate::indexer_api::{IndexerServiceServer, PodScorer};
use crate::load::Load;
use crate::route::EndpointPicker;
use anyhow::Context;
use kvroute_service::health::Readiness;
use kvroute_tokens::{TokenizerOptions, TokenizerRegistry, parse_tokenizer_arg};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The tokenizers the service (and the `why` subcommand) uses.
pub fn tokenizers(args: &ServeArgs) -> anyhow::Result<Arc<TokenizerRegistry>> {
    let explicit = args
        .tokenizer
        .iter()
        .map(|t| parse_tokenizer_arg(t))
        .collect::<Result<Vec<_>, _>>()
        .context("--tokenizer")?;
    Ok(Arc::new(TokenizerRegistry::new(
        explicit,
        args.models_dir.clone(),
        TokenizerOptions::default(),
    )))
}

/// The scorer's sockets, bound by the caller: the binary binds the flags'
/// addresses (`--grpc-addr`, `--http-addr`, `--grpc-health-addr`, which
/// [`run`] then ignores); tests bind `127.0.0.1:0` and read `local_addr()`,
/// so nothing races for a port between probing and binding it.
#[derive(Debug)]
pub struct Listeners {
    /// ext_proc, `grpc.health.v1` and llm-d's indexer API.
    pub grpc: TcpListener,
    /// `POST /v1/score`, `/healthz`, `/readyz`, `/metrics`.
    pub http: TcpListener,
    /// An extra health-only gRPC port (llm-d's 9003), if any.
    pub grpc_health: Option<TcpListener>,
}

/// Runs the scorer on `listeners` until `shutdown` is cancelled.
pub async fn run(
    args: ServeArgs,
    listeners: Listeners,
    env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let keys = args.keys.scheme().context("key scheme")?;
    let route_config = args.route_config().map_err(anyhow::Error::msg)?;
    let candidates = Arc::new(Candidates::new(&args.endpoints).context("--endpoints")?);
    let tokenizers = tokenizers(&args)?;
    let Listeners {
        grpc: grpc_listener,
        http: http_listener,
        grpc_health: health_listener,
    } = listeners;
    tracing::info!(
        grpc = ?grpc_listener.local_addr().ok(),
        http = ?http_listener.local_addr().ok(),
        index = %args.redis.describe(&env),
        lookup_mode = %args.lookup_mode,
        scheme = %keys.scheme(),
        seed = keys.seed(),
        block_size = keys.block_size(),
        endpoints = ?args.endpoints,
        tokenizers = ?args.tokenizer,
        tokenize_threads = args.tokenize_threads,
        tokenize_queue = args.tokenize_queue,
        tokenize_timeout = ?args.tokenize_timeout,
        remote_tokenize = args.remote_tokenize,
        "starting kvroute-scorer"
    );

    let index = Arc::new(LateIndex::with_lookup_mode(args.lookup_mode));
    let env = Arc::new(env);
    let urls = args.redis.urls(&*env);
    // A configuration error (bad URL, credentials, ACL, TLS) stops the
    // service: retrying cannot fix it. Set before the shutdown it triggers,
    // so the exit path below always sees it.
    let fatal: Arc<std::sync::OnceLock<String>> = Arc::default();
    {
        let (index, redis, env, shutdown, fatal) = (
            index.clone(),
            args.redis.clone(),
            env.clone(),
            shutdown.clone(),
            fatal.clone(),
        );
        tokio::spawn(async move {
            let result =
                background::connect_index(index, redis, move |k| env(k), shutdown.clone()).await;
            if let Err(e) = result {
                tracing::error!(error = %e, "Redis configuration error: stopping (retrying cannot fix it)");
                let _ = fatal.set(e.to_string());
                shutdown.cancel();
            }
        });
    }
    let load = Load::new(args.down_after_failures);
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed)
    });
    // The ingesters' keying, models and pods (docs/architecture.md,
    // "Keying contract"): a disagreeing keying refuses to start here.
    let readiness = Readiness::default();
    let index_info = Arc::new(crate::keying::IndexInfo::new(
        &args.keys,
        readiness.advisory("keying"),
    ));
    if !urls.is_empty() {
        let cluster = args.redis.is_cluster(&urls);
        crate::keying::check_at_start(
            &urls,
            cluster,
            &index_info,
            args.allow_keying_mismatch,
            Duration::from_secs(2),
        )
        .await
        .context("configuration")?;
        tokio::spawn(crate::keying::run(
            urls.clone(),
            cluster,
            index_info.clone(),
            candidates.clone(),
            tokenizers.clone(),
            args.remote_tokenize,
            args.keying_check_interval,
            shutdown.clone(),
        ));
    }
    let router = Arc::new(
        EndpointPicker::new(
            index.clone(),
            keys,
            tokenizers,
            candidates.clone(),
            load.clone(),
            route_config.clone(),
            seed,
        )
        .with_index_info(index_info),
    );
    // Tokenizers named explicitly load now (a bad path should show at start,
    // not on the first request); models found in directories load lazily.
    // Both on the stage's loader thread (see `tokenize/loader.rs` for why).
    for (model, result) in router.tokenize().preload().await {
        match result {
            Ok(tok) if tok.chat_template().is_none() => tracing::warn!(
                %model,
                "tokenizer loaded without a chat template: chat requests for this model route by load"
            ),
            Ok(_) => tracing::info!(%model, "tokenizer loaded"),
            Err(e) => {
                tracing::warn!(%model, error = %e, "tokenizer failed to load: this model routes by load")
            }
        }
    }
    // llm-d's remote-indexer API scores from the same index, and tokenizes
    // through the router's stage (one pool bounds all tokenization work).
    let indexer_api = IndexerServiceServer::new(
        PodScorer::sharing(index, router.tokenize().clone(), &route_config)
            .dialing(candidates.clone()),
    );

    tokio::spawn(
        candidates
            .clone()
            .run_refresh(args.dns_refresh, shutdown.clone()),
    );
    tokio::spawn(background::scrape_metrics(
        candidates.clone(),
        load.clone(),
        args.scrape_interval,
        args.scrape_interval.max(Duration::from_millis(100)),
        shutdown.clone(),
    ));
    if !urls.is_empty() {
        let replica = args
            .replica_id
            .clone()
            .or_else(|| env("HOSTNAME"))
            .unwrap_or_else(|| format!("scorer-{seed:x}"));
        let tls = args
            .redis
            .tls_files()
            .context("Redis TLS files")?
            .certificates();
        tokio::spawn(background::share_in_flight(
            urls.clone(),
            args.redis.is_cluster(&urls),
            tls,
            replica,
            load.clone(),
            args.in_flight_sync,
            shutdown.clone(),
        ));
    }

    // Ready once both servers are listening (the caller bound them).
    let serving = readiness.check("serving");
    let health = GrpcHealth::new().await;
    {
        let (health, readiness, shutdown) = (health.clone(), readiness.clone(), shutdown.clone());
        tokio::spawn(async move {
            health
                .follow(readiness, Duration::from_millis(500), shutdown)
                .await
        });
    }
    let app = kvroute_service::health::router(readiness, metrics).merge(crate::http_api::router(
        router.clone(),
        args.ext_proc.max_body_bytes,
    ));
    let http_shutdown = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(http_listener, app)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await
    });
    if let Some(l) = health_listener {
        let (tls, health, shutdown) = (args.tls.clone(), health.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = grpc::serve_health(l, &tls, &health, shutdown).await {
                tracing::error!(error = %e, "gRPC health server failed");
            }
        });
    }
    serving.set(true);
    let served = grpc::serve(
        grpc_listener,
        router,
        args.ext_proc.clone(),
        Some(indexer_api),
        &args.tls,
        &health,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    let _ = http.await;
    if let Some(e) = fatal.get() {
        anyhow::bail!("Redis configuration: {e}");
    }
    served.context("gRPC server")?;
    tracing::info!("kvroute-scorer stopped");
    Ok(())
}
