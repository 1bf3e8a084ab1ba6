//! The real system under test, started for one run and stopped with it:
//! a Redis, the simulated pods (in this process), `kvroute-ingester`
//! dialing them (connect mode, with vLLM's replay socket), `kvroute-scorer`
//! replicas, and one Envoy whose main listener is the operators' template
//! (`deploy/envoy/envoy.yaml.tmpl`) with every scorer behind it, plus
//! listeners for the baselines: Envoy's own round-robin and random load
//! balancing over the pods, and a direct listener where the client names
//! the pod (the oracle). Every child process runs under the testkit's
//! watchdog, so it dies with this process, also on Ctrl-C.

use super::pod::{Fleet, PodSpec};
use anyhow::{Context, bail};
use kvroute_core::events::Encoding;
use kvroute_sim::engine::EngineConfig;
use kvroute_testkit::envoy::{self, Launch};
use kvroute_testkit::net::free_port;
use kvroute_testkit::process::Guarded;
use kvroute_testkit::redis_server::{RedisCluster, RedisServer};
use kvroute_testkit::scorer::{self as scorer_proc, ScorerProcess};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TEMPLATE: &str = include_str!("../../../deploy/envoy/envoy.yaml.tmpl");

/// How a run routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Envoy -> ext_proc -> the kvroute scorers.
    Kvroute,
    /// Envoy's ROUND_ROBIN over the pods.
    RoundRobin,
    /// Envoy's RANDOM over the pods.
    Random,
    /// The client names the pod (`x-gateway-destination-endpoint`) after
    /// reading every engine's true state.
    Oracle,
}

impl Routing {
    pub fn name(self) -> &'static str {
        match self {
            Routing::Kvroute => "kvroute",
            Routing::RoundRobin => "round-robin",
            Routing::Random => "random",
            Routing::Oracle => "oracle",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Routing> {
        Ok(match s {
            "kvroute" => Routing::Kvroute,
            "round-robin" => Routing::RoundRobin,
            "random" => Routing::Random,
            "oracle" => Routing::Oracle,
            other => bail!("unknown live policy {other:?}: kvroute, round-robin, random, oracle"),
        })
    }
}

/// The index's Redis: one server, or a local Redis Cluster.
pub enum Redis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    /// Every server's URL (a cluster's seed list).
    pub fn urls(&self) -> Vec<String> {
        match self {
            Redis::Single(r) => vec![r.url()],
            Redis::Cluster(c) => c.urls(),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Redis::Cluster(_))
    }

    /// `--redis-url` once per URL (with `--redis-cluster` for a cluster).
    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = self
            .urls()
            .into_iter()
            .flat_map(|u| ["--redis-url".to_string(), u])
            .collect();
        if self.is_cluster() {
            a.push("--redis-cluster".into());
        }
        a
    }

    /// Server pids (for the CPU/RSS report).
    pub fn pids(&mut self) -> Vec<u32> {
        match self {
            Redis::Single(r) => r.pid().into_iter().collect(),
            Redis::Cluster(c) => c.servers().iter().filter_map(RedisServer::pid).collect(),
        }
    }
}

/// What a stack is made of.
pub struct StackConfig<'a> {
    pub pods: usize,
    /// A local 3-master Redis Cluster instead of one server.
    pub redis_cluster: bool,
    /// First two octets of the pods' loopback addresses.
    pub pod_net: &'a str,
    pub scorers: usize,
    pub engine: EngineConfig,
    pub encoding: Encoding,
    pub model: &'a str,
    pub tokenizer_dir: &'a Path,
    pub tokenizer: Arc<kvroute_tokens::Tokenizer>,
    pub hash_seed: &'a str,
    pub routing: Routing,
    /// Where logs and configs go.
    pub dir: &'a Path,
    pub envoy: &'a Path,
    pub bin_dir: &'a Path,
}

pub struct Stack {
    pub fleet: Fleet,
    pub endpoints: Vec<String>,
    pub redis: Redis,
    pub ingester: Option<Guarded>,
    pub ingester_http: Option<SocketAddr>,
    pub scorers: Vec<ScorerProcess>,
    _envoy: envoy::Envoy,
    /// The listener this run's client sends to.
    pub listen_port: u16,
}

/// Loopback address of pod `i` under `net` (the first two octets,
/// `127.0` by default): `127.0.0.11`, `127.0.0.12`, ... (200 per /24).
pub fn pod_ip(net: &str, i: usize) -> String {
    format!("{net}.{}.{}", i / 200, 11 + i % 200)
}

impl Stack {
    pub async fn start(c: &StackConfig<'_>) -> anyhow::Result<Stack> {
        let redis = if c.redis_cluster {
            Redis::Cluster(RedisCluster::start(3).context("starting a 3-master Redis Cluster")?)
        } else {
            Redis::Single(RedisServer::start().context("starting redis-server")?)
        };
        let specs: Vec<PodSpec> = (0..c.pods)
            .map(|i| {
                let ip = pod_ip(c.pod_net, i);
                let at = |port: u16| -> anyhow::Result<SocketAddr> {
                    Ok(format!("{ip}:{port}").parse()?)
                };
                Ok(PodSpec {
                    index: i,
                    http: at(8000)?,
                    kv_pub: at(5557)?,
                    replay: at(5558)?,
                    model: c.model.to_string(),
                    encoding: c.encoding,
                    engine: c.engine.clone(),
                    replay_buffer_steps: super::pod::DEFAULT_REPLAY_BUFFER_STEPS,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let fleet = Fleet::start(specs, c.tokenizer.clone())
            .await
            .context("starting the simulated pods")?;
        let endpoints: Vec<String> = (0..c.pods)
            .map(|i| fleet.addrs(i).http.to_string())
            .collect();

        let (mut ingester, mut ingester_http, mut scorers) = (None, None, Vec::new());
        if c.routing == Routing::Kvroute {
            let http = free_port()?;
            let mut connect = Vec::with_capacity(c.pods);
            for i in 0..c.pods {
                let a = fleet.addrs(i);
                // The ingester finds each replay socket from the pod's host
                // (`tcp://{host}:5558`), as vLLM's default port pair.
                if a.replay.port() != 5558 || a.replay.ip() != a.kv_pub.ip() {
                    bail!(
                        "pod {i} ({}) replays at {}, not its host's :5558",
                        a.topic,
                        a.replay
                    );
                }
                connect.push(format!("tcp://{}", a.kv_pub));
            }
            let mut args = redis.args();
            args.extend(key_args(c));
            args.extend([
                "--zmq-connect".into(),
                connect.join(","),
                "--replay-endpoint".into(),
                "tcp://{host}:5558".into(),
                "--http-addr".into(),
                format!("127.0.0.1:{http}"),
            ]);
            let log = std::fs::File::create(c.dir.join("ingester.log"))?;
            let out = log.try_clone()?;
            let bin = c.bin_dir.join("kvroute-ingester");
            let child = Guarded::spawn(&bin, &args, |cmd| {
                cmd.stdout(out).stderr(log).env("RUST_LOG", "warn");
            })
            .with_context(|| format!("starting {}", bin.display()))?;
            ingester = Some(child);
            let addr: SocketAddr = format!("127.0.0.1:{http}").parse()?;
            wait_http_ok(addr, "/readyz", Duration::from_secs(30))
                .await
                .context("kvroute-ingester did not become ready (ingester.log)")?;
            ingester_http = Some(addr);

            let bin = c.bin_dir.join("kvroute-scorer");
            for r in 0..c.scorers.max(1) {
                let mut args = redis.args();
                args.extend(key_args(c));
                args.extend([
                    "--endpoints".into(),
                    endpoints.join(","),
                    "--tokenizer".into(),
                    format!("{}={}", c.model, c.tokenizer_dir.display()),
                    "--replica-id".into(),
                    format!("live-{r}"),
                ]);
                let p = ScorerProcess::start(&scorer_proc::Launch {
                    binary: &bin,
                    args: &args,
                    name: &format!("live-{r}"),
                    clear_env: true,
                })
                .await
                .with_context(|| format!("starting scorer replica {r}"))?;
                scorers.push(p);
            }
        }

        let (config, admin, listen_port) = envoy_config(&endpoints, &scorers)?;
        std::fs::write(c.dir.join("envoy.yaml"), &config)?;
        let envoy = envoy::Envoy::start(&Launch {
            binary: c.envoy,
            config: &config,
            overlay: None,
            admin_port: admin,
            base_id: std::process::id() + 11,
            name: "live-envoy",
        })
        .context("starting Envoy")?;
        let port = match c.routing {
            Routing::Kvroute => listen_port.kvroute,
            Routing::RoundRobin => listen_port.round_robin,
            Routing::Random => listen_port.random,
            Routing::Oracle => listen_port.direct,
        };
        Ok(Stack {
            fleet,
            endpoints,
            redis,
            ingester,
            ingester_http,
            scorers,
            _envoy: envoy,
            listen_port: port,
        })
    }

    pub fn envoy_pid(&self) -> Option<u32> {
        self._envoy.pid()
    }

    /// Stops the pods (the processes stop when the stack drops).
    pub async fn stop(self) {
        let Stack { fleet, .. } = self;
        fleet.shutdown().await;
    }
}

/// How the ingester and the scorers key blocks: `sha256_cbor` with the
/// pods' seed and block size (what they publish unless told otherwise).
fn key_args(c: &StackConfig<'_>) -> [String; 6] {
    [
        "--hash-scheme".into(),
        "sha256_cbor".into(),
        "--hash-seed".into(),
        c.hash_seed.into(),
        "--block-size".into(),
        c.engine.block_size.to_string(),
    ]
}

/// Polls `addr` until `path` answers 200.
pub async fn wait_http_ok(addr: SocketAddr, path: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok((200, _)) = kvroute_testkit::net::http("GET", addr, path).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr}{path} did not answer 200 within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ports of the live Envoy's listeners.
pub struct Ports {
    pub kvroute: u16,
    pub round_robin: u16,
    pub random: u16,
    pub direct: u16,
}

/// The operators' template with every scorer replica in its scorer
/// cluster, plus the baselines' listeners and clusters.
fn envoy_config(
    endpoints: &[String],
    scorers: &[ScorerProcess],
) -> anyhow::Result<(String, u16, Ports)> {
    let admin = free_port()?;
    let ports = Ports {
        kvroute: free_port()?,
        round_robin: free_port()?,
        random: free_port()?,
        direct: free_port()?,
    };
    // Without scorers (baseline runs) the template's scorer cluster points
    // at a port nothing listens on; no request uses that listener.
    let first = scorers
        .first()
        .map_or_else(|| "127.0.0.1:9".parse(), |s| Ok(s.grpc))
        .map_err(|e: std::net::AddrParseError| anyhow::anyhow!(e))?;
    let mut config = envoy::render(
        TEMPLATE,
        &[
            ("ADMIN_PORT", admin.to_string()),
            ("LISTEN_ADDRESS", "127.0.0.1".into()),
            ("LISTEN_PORT", ports.kvroute.to_string()),
            ("SCORER_ADDRESS", first.ip().to_string()),
            ("SCORER_PORT", first.port().to_string()),
        ],
    )
    .map_err(|e| anyhow::anyhow!("rendering the Envoy template: {e}"))?;
    // The template lists one scorer address; the other replicas join the
    // same endpoint list (Envoy round-robins ext_proc streams over them).
    let one = format!(
        "              socket_address: {{ address: {}, port_value: {} }}",
        first.ip(),
        first.port()
    );
    if scorers.len() > 1 {
        let Some(at) = config.rfind(&one) else {
            bail!(
                "the Envoy template's scorer endpoint line changed; update loadtest/src/live/stack.rs"
            );
        };
        let mut more = String::new();
        for s in &scorers[1..] {
            let _ = write!(
                more,
                "\n        - endpoint:\n            address:\n              socket_address: {{ address: {}, port_value: {} }}",
                s.grpc.ip(),
                s.grpc.port()
            );
        }
        config.insert_str(at + one.len(), &more);
    }
    let listener = |name: &str, port: u16, cluster: &str| {
        format!(
            r#"  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: {cluster}, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
        )
    };
    let hosts: String = endpoints
        .iter()
        .map(|e| {
            let (ip, port) = e.rsplit_once(':').unwrap_or((e, "8000"));
            format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}\n"
            )
        })
        .collect();
    let cluster = |name: &str, lb: &str| {
        format!(
            r#"  - name: {name}
    type: STATIC
    lb_policy: {lb}
    connect_timeout: 5s
    circuit_breakers: {{ thresholds: [{{ max_connections: 40000, max_pending_requests: 40000, max_requests: 40000 }}] }}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
{hosts}"#
        )
    };
    let listeners = [
        listener(
            "baseline_round_robin",
            ports.round_robin,
            "pods_round_robin",
        ),
        listener("baseline_random", ports.random, "pods_random"),
        listener("direct", ports.direct, "kvroute_pods"),
    ]
    .concat();
    // Listeners go after the template's listener, clusters after its
    // clusters (both lists end where the next section starts).
    let Some(at) = config.find("\n  clusters:") else {
        bail!("the Envoy template has no clusters section");
    };
    config.insert_str(at + 1, &listeners);
    config.push('\n');
    config.push_str(&cluster("pods_round_robin", "ROUND_ROBIN"));
    config.push_str(&cluster("pods_random", "RANDOM"));
    Ok((config, admin, ports))
}

/// Where this binary's siblings (`kvroute-ingester`, `kvroute-scorer`) are.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating kvroute-loadtest")?;
    let dir = exe
        .parent()
        .context("kvroute-loadtest has no directory")?
        .to_path_buf();
    for b in ["kvroute-ingester", "kvroute-scorer"] {
        if !dir.join(b).is_file() {
            bail!(
                "{} not found beside kvroute-loadtest: build it (cargo build --release -p kvroute-ingester -p kvroute-scorer)",
                dir.join(b).display()
            );
        }
    }
    Ok(dir)
}
