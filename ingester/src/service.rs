//! The ingester as a running service: builds every stage from [`RunArgs`],
//! runs them until `shutdown`, then drains.
//!
//! sockets --RawBatch--> dispatcher --(FNV-1a of topic)--> workers --> index
//! (one [`RawBatch`] type all the way; the worker parses its topic)
//!
//! Startup order: metrics and the admin server first (so `/healthz` answers
//! and `/readyz` explains what is missing), then the sockets (bound and
//! dialled at once, so nothing pods publish meanwhile is lost), then the
//! index (retried until Redis answers; batches received meanwhile are held,
//! bounded, in [`EarlyBuffer`]), then the workers, which get the held batches
//! first.
//!
//! `/readyz` checks: `index` (every master answers PING), `writes` (the last
//! index writes did not all fail, see [`crate::write_health`]), `sockets` (every
//! bind address bound and the sockets still running) and `pipeline` (no
//! worker stalled for `--stall-after`, see [`pipeline::PipelineStats`]). A failing check prints
//! its reason.

use crate::admin;
use crate::bookkeeping::{self, Keying, ModelsSeen};
use crate::config::RunArgs;
use crate::early::EarlyBuffer;
use crate::keys::Keyer;
use crate::metrics as m;
use crate::pipeline::{self, Workers};
use crate::purge::{self, LastHeard, PurgePolicy};
use crate::replay::{ReplayError, ReplayOptions, RouterReplayer};
use crate::socket::{self, Malformed, RawBatch, Rejected, SocketConfig, SocketStats, SubOptions};
use crate::targets::{Discovery, Shard};
use crate::worker::{NoReplay, ReplayLimits, ReplayedBatches, Replayer, Worker, WorkerConfig};
use crate::write_health::WatchedIndex;
use anyhow::Context;
use kvroute_core::events::Topic;
use kvroute_core::index::IndexError;
use kvroute_redis::AnyIndex;
use kvroute_service::health::{Check, Readiness};
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Either replay client, so one worker type serves both configurations.
pub enum AnyReplayer {
    None(NoReplay),
    Router(RouterReplayer),
}

impl Replayer for AnyReplayer {
    async fn fetch(&self, topic: &Topic, from: u64) -> Result<ReplayedBatches, ReplayError> {
        match self {
            AnyReplayer::None(r) => r.fetch(topic, from).await,
            AnyReplayer::Router(r) => r.fetch(topic, from).await,
        }
    }

    async fn fetch_rank(
        &self,
        topic: &Topic,
        rank: Option<u32>,
        from: u64,
    ) -> Result<ReplayedBatches, ReplayError> {
        match self {
            AnyReplayer::None(r) => r.fetch_rank(topic, rank, from).await,
            AnyReplayer::Router(r) => r.fetch_rank(topic, rank, from).await,
        }
    }

    fn can_replay(&self) -> bool {
        match self {
            AnyReplayer::None(r) => r.can_replay(),
            AnyReplayer::Router(r) => r.can_replay(),
        }
    }
}

/// Runs the ingester until `shutdown` is cancelled, serving the admin HTTP
/// API on `admin` (bound by the caller, from `--http-addr` in `main`: a test
/// binds port 0 and reads the port back, with no free-port race). `env` reads
/// environment variables (the process environment in `main`, a map in tests).
///
/// The ZeroMQ bind addresses stay addresses: the `zeromq` crate's
/// `Socket::bind` takes an endpoint string and binds its own listener; it
/// cannot adopt one bound beforehand.
pub async fn run(
    args: RunArgs,
    admin: tokio::net::TcpListener,
    env: impl Fn(&str) -> Option<String>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_targets(args, admin, env, metrics, shutdown, None).await
}

/// [`run`], with the connect-mode endpoint set given by the caller instead
/// of resolved from `--zmq-connect` (`None`: resolved). Tests use it to move
/// a publisher out of the set, as a DNS change would.
pub async fn run_with_targets(
    args: RunArgs,
    admin: tokio::net::TcpListener,
    env: impl Fn(&str) -> Option<String>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
    targets: Option<watch::Receiver<BTreeSet<String>>>,
) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let keys = args.keys.scheme().context("key scheme")?;
    let readiness = Readiness::default();
    let redis_ok = readiness.check("index");
    let writes_ok = readiness.check("writes");
    let sockets_ok = readiness.check("sockets");
    let pipeline_ok = readiness.check("pipeline");
    pipeline_ok.pass();
    redis_ok.fail("not connected yet");
    sockets_ok.fail("not bound yet");

    let addr = admin.local_addr().context("the admin listener's address")?;
    tracing::info!(%addr, "admin HTTP listening (/healthz /readyz /metrics /admin/purge)");
    // Served from now on, so `/readyz` explains a startup waiting for Redis.
    let admin_slot = admin::AdminSlot::default();
    let http_shutdown = shutdown.clone();
    let auth = admin::AdminAuth {
        token: args.admin_token.as_deref().map(Arc::from),
        allow_loopback: args.admin_allow_loopback,
    };
    let app = admin::router(readiness.clone(), metrics, admin_slot.clone(), auth)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let http = tokio::spawn(async move {
        let served = axum::serve(admin, app)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin HTTP server failed");
        }
    });

    tracing::info!(
        index = %args.redis.describe(&env),
        scheme = %keys.scheme(),
        seed = keys.seed(),
        block_size = keys.block_size(),
        bind = ?args.zmq_bind,
        connect = ?args.zmq_connect,
        workers = args.workers,
        "starting kvroute-ingester"
    );
    // Connect-mode targets, resolved and sharded across replicas.
    let connect = if targets.is_some() {
        targets
    } else if args.zmq_connect.is_empty() {
        None
    } else {
        let targets = Discovery::parse(&args.zmq_connect).context("--zmq-connect")?;
        let ordinal = args.ordinal(&env);
        let shard = Shard::new(args.replicas, ordinal).context("--replicas/--replica-ordinal")?;
        tracing::info!(
            replicas = args.replicas,
            ordinal,
            "connect mode: taking the publishers of this shard"
        );
        Some(
            Discovery::new(targets, shard, args.dns_refresh)
                .start(shutdown.clone())
                .await,
        )
    };
    let purge_targets = connect.clone();

    let stats = Arc::new(SocketStats::default());
    let (tx, mut rx) = mpsc::channel::<RawBatch>(args.queue);
    let socket_config = SocketConfig {
        options: SubOptions {
            topic_filter: args.topic_filter.clone(),
            max_message_size: args.zmq_max_message_size,
            handshake_timeout: args.zmq_handshake_timeout,
            max_connections: args.zmq_max_connections,
            ..SubOptions::default()
        },
        bind: args.zmq_bind.clone(),
        connect,
    };
    let socket_shutdown = shutdown.clone();
    let socket_stats = stats.clone();
    let socket_check = sockets_ok.clone();
    let sockets = tokio::spawn(async move {
        let up = socket_check.clone();
        let r = socket::run_with(
            socket_config,
            tx,
            socket_stats,
            socket_shutdown.clone(),
            move || up.pass(),
        )
        .await;
        match &r {
            Err(e) => {
                tracing::error!(error = %e, "sockets stopped");
                socket_check.fail(format!("sockets stopped: {e}"));
                socket_shutdown.cancel();
            }
            Ok(()) => socket_check.fail("sockets stopped: shutdown"),
        }
        r
    });

    // Socket metrics from now on; PING once the index is open.
    let health_index: Arc<OnceLock<Arc<AnyIndex>>> = Arc::default();
    spawn_health(
        health_index.clone(),
        redis_ok.clone(),
        stats.clone(),
        (args.warn_silent_publishers_after, args.topic_filter.clone()),
        shutdown.clone(),
    );

    // Sockets first: what pods publish while Redis is unreachable is held
    // (bounded) and applied once it answers (`early.rs`).
    let mut early = EarlyBuffer::new(args.startup_buffer);
    let opened = {
        let open = open_index(&args, &env, &shutdown);
        tokio::pin!(open);
        loop {
            tokio::select! {
                opened = &mut open => break opened?,
                Some(batch) = rx.recv() => early.push(batch),
            }
        }
    };
    let Some(index) = opened else {
        // Shut down before the index came up (or a socket failed).
        let _ = http.await;
        return match sockets.await {
            Ok(Err(e)) => Err(e).context("ZeroMQ sockets"),
            Err(e) => Err(e).context("ZeroMQ socket task"),
            Ok(Ok(())) => Ok(()),
        };
    };
    if !early.is_empty() || early.dropped() > 0 {
        tracing::info!(
            held = early.len(),
            dropped = early.dropped(),
            "index connected: applying what arrived meanwhile"
        );
    }
    let index = Arc::new(index);
    redis_ok.pass();
    let watched = Arc::new(WatchedIndex::new(index.clone(), writes_ok));

    let policy = PurgePolicy {
        gone_after: args.purge_after,
        silent_after: args.purge_silent_after,
    };
    let heard = policy.is_enabled().then(LastHeard::default);
    let models = ModelsSeen::default();
    let keying = Keying {
        hash_scheme: keys.scheme().as_str().to_owned(),
        hash_seed: args.keys.hash_seed.clone(),
        block_size: keys.block_size(),
        writer: env("HOSTNAME")
            .unwrap_or_else(|| format!("kvroute-ingester-{}", std::process::id())),
    };
    let keyer = Keyer::new(keys, args.chain_cache);
    let worker_config = WorkerConfig {
        topic_prefix: args
            .topic_filter
            .split('@')
            .next()
            .unwrap_or("kv")
            .to_string(),
        max_pending_ops: args.max_pending_ops,
        max_inflight_writes: args.max_inflight_writes,
        heard: heard.clone(),
        models: matches!(index.as_ref(), AnyIndex::Redis(_)).then(|| models.clone()),
        replay: ReplayLimits::new(
            args.replay_concurrency,
            args.replay_budget,
            args.replay_cooldown,
            args.replay_max_held,
        ),
        max_seq_gap: args.max_seq_gap,
        max_clock_skew: Some(args.max_clock_skew),
        max_topics: args.max_topics.div_ceil(args.workers.max(1)),
        ..WorkerConfig::default()
    };
    let workers: Vec<_> = (0..args.workers)
        .map(|_| {
            let replayer = match &args.replay_endpoint {
                Some(t) => AnyReplayer::Router(RouterReplayer::new(
                    t.clone(),
                    ReplayOptions {
                        max_message_size: args.zmq_max_message_size,
                        ..ReplayOptions::new(args.replay_timeout)
                    },
                )),
                None => AnyReplayer::None(NoReplay),
            };
            Worker::new(
                watched.clone(),
                keyer.clone(),
                replayer,
                worker_config.clone(),
            )
        })
        .collect();
    let workers = Workers::start(workers, args.queue, args.drain_timeout)
        .limit_queued_bytes(args.max_queued_bytes);
    pipeline::spawn_monitor(
        workers.stats(),
        pipeline_ok,
        args.stall_after,
        shutdown.clone(),
    );

    let _ = admin_slot.set(admin::Admin {
        purger: workers.purger(),
        index: index.clone(),
    });

    let _ = health_index.set(index.clone());
    if matches!(index.as_ref(), AnyIndex::Redis(_)) {
        tokio::spawn(bookkeeping::run(
            index.clone(),
            keying,
            models,
            workers.purger(),
            args.redis_epoch_interval,
            shutdown.clone(),
        ));
    }
    if let Some(heard) = &heard {
        purge::spawn(
            policy,
            heard.clone(),
            purge_targets,
            stats.clone(),
            workers.purger(),
            shutdown.clone(),
        );
    }

    // What arrived before the index answered, in order, then the losses
    // past the startup buffer's bound as gaps, then live batches.
    let (held, dropped_from) = early.drain();
    for batch in held {
        if !workers.dispatch(batch).await {
            break;
        }
    }
    for (topic, from) in dropped_from {
        workers.missed(topic, from).await;
    }
    // Runs until the sockets stop and the channel drains.
    pipeline::run_dispatcher(rx, &workers).await;
    sockets_ok.fail("shutting down");
    tracing::info!(grace = ?args.drain_timeout, "draining worker queues");
    workers.shutdown().await;
    let sockets = sockets.await;
    let _ = http.await;
    // A socket that could not bind (or failed later) stopped the service:
    // that is a failure the exit code must show, not a clean shutdown.
    match sockets {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e).context("ZeroMQ sockets"),
        Err(e) => return Err(e).context("ZeroMQ socket task"),
    }
    tracing::info!("kvroute-ingester stopped");
    Ok(())
}

/// Opens the index, retrying with backoff while Redis is unreachable (the
/// process stays up and unready rather than crash-looping). `None` when
/// shutdown came first.
async fn open_index(
    args: &RunArgs,
    env: &impl Fn(&str) -> Option<String>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<AnyIndex>> {
    let mut delay = Duration::from_millis(100);
    loop {
        match args.redis.open(env).await {
            Ok(i) => return Ok(Some(i)),
            // Bad URL, credentials, ACL or TLS: retrying cannot fix it.
            Err(e @ IndexError::Config(_)) => {
                return Err(anyhow::Error::new(e).context("Redis configuration"));
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "index not reachable yet");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Publishers connected while nothing arrives: a topic outside
/// `--topic-filter` is dropped by the publisher itself (ZeroMQ filters at
/// the PUB side), so the topic check in the worker never sees it and the
/// only sign is silence on a live connection. Warns once per silent period.
#[derive(Default)]
struct SilentPublishers {
    /// Since when publishers are connected with `received` unchanged.
    since: Option<(std::time::Instant, u64)>,
    warned: bool,
}

impl SilentPublishers {
    /// Returns true once when publishers have been connected `after` with
    /// nothing received.
    fn observe(&mut self, peers: u64, received: u64, after: Duration) -> bool {
        let now = std::time::Instant::now();
        match self.since {
            _ if peers == 0 => {
                self.since = None;
                self.warned = false;
            }
            Some((_, r)) if received != r => {
                self.since = Some((now, received));
                self.warned = false;
            }
            None => self.since = Some((now, received)),
            Some((t, _)) if !self.warned && now.duration_since(t) >= after => {
                self.warned = true;
                return true;
            }
            Some(_) => {}
        }
        false
    }
}

/// Keeps `/readyz` and the socket metrics current.
fn spawn_health(
    index: Arc<OnceLock<Arc<AnyIndex>>>,
    redis_ok: Check,
    stats: Arc<SocketStats>,
    (silent_after, topic_filter): (Duration, String),
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut silent = SilentPublishers::default();
        loop {
            if let Some(AnyIndex::Redis(r)) = index.get().map(|i| i.as_ref()) {
                match r.ping().await {
                    Ok(_) => redis_ok.pass(),
                    Err(e) => redis_ok.fail(format!("PING failed: {e}")),
                }
            }
            let s = stats.snapshot();
            metrics::counter!("kvroute_ingester_messages_received_total").absolute(s.received);
            metrics::counter!("kvroute_ingester_messages_filtered_total").absolute(s.filtered);
            for reason in Malformed::ALL {
                metrics::counter!(m::MALFORMED, "reason" => reason.as_label())
                    .absolute(s.malformed(reason));
            }
            for reason in Rejected::ALL {
                for mode in ["bind", "connect"] {
                    metrics::counter!(m::ZMQ_REJECTED, "mode" => mode, "reason" => reason.as_label())
                        .absolute(s.rejected(mode, reason));
                }
            }
            metrics::counter!("kvroute_ingester_reconnects_total").absolute(s.reconnects);
            metrics::gauge!("kvroute_ingester_connected_publishers", "mode" => "bind")
                .set(s.bind_peers as f64);
            metrics::gauge!("kvroute_ingester_connected_publishers", "mode" => "connect")
                .set(s.connect_peers as f64);
            if silent.observe(s.bind_peers + s.connect_peers, s.received, silent_after) {
                metrics::counter!(m::TOPIC_WARNINGS, "reason" => "nothing_received").increment(1);
                tracing::warn!(
                    publishers = s.bind_peers + s.connect_peers,
                    silent_for = ?silent_after,
                    filter = %topic_filter,
                    "publishers are connected but no message arrived: if they serve requests, \
                     their topic does not start with --topic-filter (vLLM's default topic is \
                     empty, and the subscription filters it out at the publisher); publish \
                     kv@<pod-ip>:<port>@<model>"
                );
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
}
