//! `kvroute-loadtest sim`: the fleet simulator's command line. Builds a
//! workload once (token ids and the engines' block hashes), replays it
//! through a fresh simulated fleet per (pod count, policy) — two runs at a
//! time, one per core — and reports every run side by side.

pub mod kvroute;

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kvroute_core::keys::{HashScheme, KeyScheme};
use kvroute_sim::engine::EngineConfig;
use kvroute_sim::fleet::{self, DEFAULT_EVENT_DELAY_S, DEFAULT_SCRAPE_INTERVAL_S, FleetConfig};
use kvroute_sim::policy::Policy;
use kvroute_sim::policy::basic::{LeastLoaded, Oracle, Random, RoundRobin, SessionAffinity};
use kvroute_sim::report::{self, RunResult};
use kvroute_sim::request::SimRequest;
use kvroute_sim::workload::{self, SimTokenizer, WorkloadKind, WorkloadSpec};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Workloads (comma list): `mooncake` (the vendored synthetic Mooncake
    /// trace), `repeated`, `tenants`, `multi-turn`, `rag`, `llmd-precise`,
    /// `unique`, or `trace:FILE.jsonl` (any Mooncake-format trace).
    #[arg(long, value_delimiter = ',', default_value = "mooncake")]
    workload: Vec<String>,
    /// Requests per workload (default: the workload's own size; a trace's
    /// first N lines).
    #[arg(long)]
    requests: Option<usize>,
    /// Mean arrival rate in requests/s of generated workloads (default:
    /// the workload's own).
    #[arg(long)]
    rate: Option<f64>,
    /// Pod counts to simulate (each gets every policy).
    #[arg(long, value_delimiter = ',', default_value = "8,16")]
    pods: Vec<usize>,
    /// Policies (comma list) or `all`.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    policies: Vec<String>,
    /// Seed of every policy's tie-breaks and the workload generators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// KV event -> router propagation delay.
    #[arg(long, default_value_t = DEFAULT_EVENT_DELAY_S * 1e3)]
    event_delay_ms: f64,
    /// Engine metric scrape interval.
    #[arg(long, default_value_t = DEFAULT_SCRAPE_INTERVAL_S * 1e3)]
    scrape_interval_ms: f64,
    /// vLLM `--gpu-memory-utilization` (sets each engine's KV capacity).
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Override the KV capacity in blocks per engine.
    #[arg(long)]
    num_gpu_blocks: Option<usize>,
    /// Arrival-time scale for traces (0.5: twice as fast).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Engines publish `sha256_cbor_64bit` hashes while kvroute keys with
    /// `sha256_cbor`, so the ingester must map every block.
    #[arg(long)]
    engine_hash_differs: bool,
    /// kvroute's blend weights `prefix,queue,kv_usage,in_flight[,tokens]`
    /// (the scorer's `--weight-*`; default its defaults; without the fifth,
    /// the prefill-backlog weight keeps its default).
    #[arg(long, value_delimiter = ',')]
    kvroute_weights: Option<Vec<f64>>,
    /// kvroute's `--max-in-flight` / `--max-waiting` saturation limits.
    #[arg(long)]
    kvroute_max_in_flight: Option<u32>,
    /// kvroute's `--in-flight-scale` (in-flight term's bottom).
    #[arg(long)]
    kvroute_in_flight_scale: Option<f64>,
    #[arg(long)]
    kvroute_max_waiting: Option<u32>,
    /// kvroute's `--prefill-tokens-per-s` (one pod's prefill rate).
    #[arg(long)]
    kvroute_prefill_tokens_per_s: Option<f64>,
    /// kvroute's `--prefill-horizon-s` (backlog where the term bottoms out).
    #[arg(long)]
    kvroute_prefill_horizon_s: Option<f64>,
    /// kvroute's `--pending-prefixes` (merge the prefixes its routed
    /// requests are still computing into lookups; default on).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kvroute_pending_prefixes: bool,
    /// Runs at a time.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Where the CSV, Markdown and PNG files go.
    #[arg(long, default_value = "kvroute-report")]
    out_dir: PathBuf,
}

/// Every policy, in report order.
pub const ALL_POLICIES: &[&str] = &[
    "kvroute",
    "oracle",
    "llm-d-precise",
    "llm-d-precise-2:1:1",
    "gie-approx",
    "dynamo",
    "sglang",
    "aibrix",
    "least-loaded",
    "session-affinity",
    "round-robin",
    "random",
];

/// The seed of block hashes (vLLM's `PYTHONHASHSEED`).
const HASH_SEED: &str = "0";

pub fn run(args: Args) -> anyhow::Result<()> {
    let router = KeyScheme::new(HashScheme::Sha256Cbor, HASH_SEED, 16)?;
    let engine_scheme = if args.engine_hash_differs {
        KeyScheme::new(HashScheme::Sha256Cbor64, HASH_SEED, 16)?
    } else {
        router.clone()
    };
    let policies: Vec<String> = if args.policies.iter().any(|p| p == "all") {
        ALL_POLICIES.iter().map(|p| p.to_string()).collect()
    } else {
        args.policies.clone()
    };
    for p in &policies {
        if !ALL_POLICIES.contains(&p.as_str()) {
            bail!("unknown policy {p:?}; known: {}", ALL_POLICIES.join(", "));
        }
    }

    let t0 = Instant::now();
    let mut engine = EngineConfig::llama31_8b_h100(args.gpu_memory_utilization);
    engine.scheme = engine_scheme.clone();
    if let Some(n) = args.num_gpu_blocks {
        engine.num_gpu_blocks = n;
    }
    println!(
        "engine: {}, {} KV blocks of {} tokens, max_num_seqs {}, max_num_batched_tokens {}, chunked prefill {}, prefill {:.0} tok/s per {}-token step; event delay {} ms, scrape every {} ms",
        engine.model_name,
        engine.num_gpu_blocks,
        engine.block_size,
        engine.max_num_seqs,
        engine.max_num_batched_tokens,
        engine.chunked_prefill,
        engine
            .cost
            .prefill_tokens_per_s(u64::from(engine.max_num_batched_tokens)),
        engine.max_num_batched_tokens,
        args.event_delay_ms,
        args.scrape_interval_ms
    );
    let tokenizer = SimTokenizer::build();
    let mut all = Vec::new();
    for w in &args.workload {
        let t = Instant::now();
        let (name, requests) = load_workload(&args, w, &tokenizer, &engine_scheme)?;
        let tokens: usize = requests.iter().map(SimRequest::prompt_len).sum();
        println!(
            "workload {name}: {} requests, {:.2}M prompt tokens, {:.0} s of arrivals (built in {:.1} s)",
            requests.len(),
            tokens as f64 / 1e6,
            requests.last().map_or(0.0, |r| r.arrival),
            t.elapsed().as_secs_f64()
        );
        all.extend(run_workload(
            &args, &name, &requests, &policies, &engine, &router,
        )?);
    }
    print!("{}", report::terminal_table(&all));
    let written = report::write_all(&all, &args.out_dir, "sim")
        .with_context(|| format!("writing the report under {}", args.out_dir.display()))?;
    println!("CSV {}", written.csv.display());
    println!("Markdown {}", written.markdown.display());
    for c in &written.charts {
        println!("chart {}", c.display());
    }
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Every (pod count, policy) run of one workload, `--jobs` at a time.
fn run_workload(
    args: &Args,
    name: &str,
    requests: &[SimRequest],
    policies: &[String],
    engine: &EngineConfig,
    router: &KeyScheme,
) -> anyhow::Result<Vec<RunResult>> {
    let jobs: Vec<(usize, String)> = args
        .pods
        .iter()
        .flat_map(|&n| policies.iter().map(move |p| (n, p.clone())))
        .collect();
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>32} [{bar:30}] {pos}/{len} requests {elapsed_precise} (eta {eta})",
    )?
    .progress_chars("=> ");
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<RunResult>>> = Mutex::new(vec![None; jobs.len()]);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..args.jobs.max(1) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some((pods, policy)) = jobs.get(i) else {
                        break;
                    };
                    let bar = bars.add(ProgressBar::new(requests.len() as u64));
                    bar.set_style(style.clone());
                    bar.set_prefix(format!("{name} {policy} x{pods}"));
                    let config = FleetConfig {
                        pods: *pods,
                        engine: engine.clone(),
                        event_delay_s: args.event_delay_ms / 1e3,
                        scrape_interval_s: args.scrape_interval_ms / 1e3,
                    };
                    let scheme = &engine.scheme;
                    match make_policy(args, policy, *pods, args.seed, router, scheme, engine) {
                        Ok(mut p) => {
                            let r = fleet::run(&config, name, requests, p.as_mut(), &mut |done| {
                                if done % 32 == 0 {
                                    bar.set_position(done);
                                }
                            });
                            bar.finish();
                            results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("{policy}: {e:#}")),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    if !failures.is_empty() {
        bail!("policies failed to start: {}", failures.join("; "));
    }
    Ok(results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .flatten()
        .collect())
}

/// Generates one workload (named as `WorkloadKind` parses it, or
/// `mooncake` for the vendored synthetic Mooncake trace) and hashes it.
fn load_workload(
    args: &Args,
    workload: &str,
    tokenizer: &SimTokenizer,
    scheme: &KeyScheme,
) -> anyhow::Result<(String, Vec<SimRequest>)> {
    let (name, kind) = match workload {
        "mooncake" => (
            "mooncake".to_string(),
            WorkloadKind::Trace(kvroute_testkit::test_env::testdata(
                "traces/mooncake_synthetic_trace.jsonl",
            )),
        ),
        w => {
            let kind: WorkloadKind = w.parse()?;
            let name = match &kind {
                WorkloadKind::Trace(p) => p
                    .file_stem()
                    .map_or("trace".into(), |s| s.to_string_lossy().into_owned()),
                k => k.to_string(),
            };
            (name, kind)
        }
    };
    let mut spec = WorkloadSpec::new(kind);
    spec.seed = args.seed;
    spec.requests = args.requests;
    spec.time_scale = args.time_scale;
    if let Some(r) = args.rate {
        spec.rate = r;
    }
    let w = workload::generate(&spec, tokenizer).with_context(|| format!("workload {name}"))?;
    Ok((name, w.into_sim(scheme)))
}

/// The scorer's routing configuration, with the command line's overrides.
fn kvroute_config(args: &Args) -> anyhow::Result<scorer::route::RouteConfig> {
    let mut c = scorer::route::RouteConfig::default();
    if let Some(w) = &args.kvroute_weights {
        let (prefix, queue, kv_usage, in_flight, tokens) = match w[..] {
            [p, q, k, i] => (p, q, k, i, c.weights.tokens),
            [p, q, k, i, t] => (p, q, k, i, t),
            _ => bail!(
                "--kvroute-weights takes 4 or 5 numbers: prefix,queue,kv_usage,in_flight[,tokens]"
            ),
        };
        c.weights = kvroute_core::scoring::pick::PickWeights {
            prefix,
            queue,
            kv_usage,
            in_flight,
            tokens,
        };
    }
    if let Some(r) = args.kvroute_prefill_tokens_per_s {
        c.limits.prefill_tokens_per_s = r;
    }
    if let Some(h) = args.kvroute_prefill_horizon_s {
        c.limits.prefill_horizon_s = h;
    }
    if let Some(m) = args.kvroute_max_in_flight {
        c.limits.max_in_flight = Some(m);
    }
    if let Some(m) = args.kvroute_max_waiting {
        c.limits.max_waiting = Some(m);
    }
    if let Some(s) = args.kvroute_in_flight_scale {
        c.limits.in_flight_scale = s;
    }
    c.pending_prefixes = args.kvroute_pending_prefixes;
    Ok(c)
}

fn make_policy(
    args: &Args,
    name: &str,
    pods: usize,
    seed: u64,
    router: &KeyScheme,
    engine_scheme: &KeyScheme,
    engine: &EngineConfig,
) -> anyhow::Result<Box<dyn Policy>> {
    use kvroute_sim::policy::{aibrix, dynamo, gie, llmd, sglang};
    let bs = engine.block_size;
    Ok(match name {
        "kvroute" => Box::new(kvroute::Kvroute::new(
            pods,
            router.clone(),
            engine_scheme,
            kvroute_config(args)?,
            kvroute::SCORER_SCRAPE_INTERVAL_S,
            seed,
        )?),
        "oracle" => Box::new(Oracle::new(seed)),
        // R: the engines' own single-chunk prefill rate, the calibration
        // recipe's definition (peer notes 1.11 sim 4).
        "llm-d-precise" => Box::new(llmd::LlmdPrecise::new(
            pods,
            seed,
            llmd::LlmdPreciseConfig {
                peak_prefill_throughput: engine
                    .cost
                    .prefill_tokens_per_s(u64::from(engine.max_num_batched_tokens)),
                block_size: bs,
                ..Default::default()
            },
        )?),
        "llm-d-precise-2:1:1" => Box::new(llmd::LlmdPreciseClassic::new(
            pods,
            seed,
            llmd::LlmdPreciseClassicConfig::default(),
        )?),
        "gie-approx" => Box::new(gie::LlmdApprox::new(
            pods,
            seed,
            gie::LlmdApproxConfig::default(),
        )?),
        "dynamo" => Box::new(dynamo::Dynamo::new(
            pods,
            seed,
            dynamo::DynamoConfig {
                block_size: bs,
                ..Default::default()
            },
        )?),
        "sglang" => Box::new(sglang::SglangCacheAware::new(
            pods,
            seed,
            sglang::SglangConfig::default(),
        )?),
        "aibrix" => Box::new(aibrix::AibrixPrefix::new(
            pods,
            seed,
            aibrix::AibrixConfig::default(),
        )?),
        "random" => Box::new(Random::new(seed)),
        "round-robin" => Box::new(RoundRobin::default()),
        "session-affinity" => Box::new(SessionAffinity::new(seed)),
        "least-loaded" => Box::new(LeastLoaded::new(seed)),
        other => bail!("unknown policy {other:?}"),
    })
}
