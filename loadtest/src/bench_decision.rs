//! `kvroute-loadtest bench decision`: how long the scorer takes to decide,
//! from prompt text to endpoint, on a local `redis-server` (started here),
//! next to a Redis PING round trip measured in the same run.
//!
//! Prompts of 16, 128, 512 and 2048 blocks (Llama 3 tokens, block size 16)
//! x 4, 16 and 64 candidate pods, pod `k` of `P` holding the first
//! `(k + 1) / P` of the prompt (`--holdings spread`, the worst case) or a
//! routed fleet's shape (`--holdings fleet`: a shared quarter everywhere,
//! at most 4 distinct depths); warm (the same text again: tokenization
//! cached) and cold (a new text each time through the real Llama 3
//! tokenizer, same full blocks). Measured:
//!
//! - (0) the lookup alone: `lua/lookup.lua` vs a pipeline of HKEYS; and on
//!   a local 3-master Redis Cluster, bisection in rounds vs one wave;
//! - (a) in process, `EndpointPicker::score` (tokens -> keys -> lookup -> score ->
//!   pick);
//! - (b) ext_proc in -> routing headers out, over a real gRPC connection to
//!   the `kvroute-scorer` binary (its own process);
//! - (c) through Envoy: the scorer's listener next to a do-nothing picker's
//!   listener of the same Envoy, request by request, and the difference
//!   (the scorer's own cost, as `docs/envoy-ext-proc.md` prescribes);
//! - (d) decisions per second per core: a closed loop of concurrent ext_proc
//!   streams, divided by the CPU seconds the scorer process used;
//! - (e) warm ext_proc decisions while 0, 1, 2, 4 streams send cold prompts
//!   of the largest size back to back (tokenization off the async workers).
//!
//! Seeded (`--seed`), warmed up, bounded in time (`--cell-seconds`);
//! `--quick` scales it down.

mod breakdown;
mod envoy;
mod extproc;
mod lookups;
mod mixed;
mod prompts;
mod scorer_proc;
mod throughput;

use crate::machine::{load_average, machine};
use anyhow::Context;
use bytes::Bytes;
use kvroute_core::keys::{HashScheme, KeyScheme};
use kvroute_redis::RedisIndex;
use kvroute_testkit::redis_server::RedisServer;
use kvroute_tokens::{TokenizerOptions, TokenizerRegistry};
use scorer::candidates::Candidates;
use scorer::decide::{Prompt as ReqPrompt, RouteRequest};
use scorer::load::Load;
use scorer::route::{EndpointPicker, RouteConfig};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Prompt sizes in blocks of 16 tokens.
    #[arg(long, value_delimiter = ',', default_value = "16,128,512,2048")]
    blocks: Vec<usize>,
    /// Candidate pod counts (at most 64).
    #[arg(long, value_delimiter = ',', default_value = "4,16,64")]
    pods: Vec<usize>,
    /// Warm decisions measured per cell and path (plus 10% warmup).
    #[arg(long, default_value_t = 400)]
    samples: usize,
    /// Cold decisions measured per cell and path (each a new text).
    #[arg(long, default_value_t = 100)]
    cold_samples: usize,
    /// A cell stops after this many seconds even if short of samples.
    #[arg(long, default_value_t = 6.0)]
    cell_seconds: f64,
    /// Seconds of the closed loop (after 1 s of warmup).
    #[arg(long, default_value_t = 5)]
    loop_seconds: u64,
    /// Concurrent ext_proc streams in the closed loop.
    #[arg(long, default_value_t = 8)]
    loop_streams: usize,
    /// The `kvroute-scorer` binary (default: next to this one).
    #[arg(long)]
    scorer_bin: Option<PathBuf>,
    /// The Envoy binary (default: `$KVROUTE_ENVOY`, else the test venv's).
    #[arg(long)]
    envoy_bin: Option<PathBuf>,
    /// Skip the Envoy rows.
    #[arg(long)]
    no_envoy: bool,
    /// Skip the Redis Cluster lookup rows.
    #[arg(long)]
    no_cluster: bool,
    /// What the pods hold of each prompt: `spread`, every pod at its own
    /// depth (the worst case for bisection), or `fleet`, the shape a routed
    /// fleet shows (a shared prefix everywhere, a few pods deeper).
    #[arg(long, value_enum, default_value_t = prompts::Holdings::Spread)]
    holdings: prompts::Holdings,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Scale everything down (a smoke run of about a minute).
    #[arg(long)]
    quick: bool,
}

/// Latency samples of one row.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// (p50, p99); zero when empty.
    pub fn percentiles(&self) -> (Duration, Duration) {
        let mut s = self.0.clone();
        if s.is_empty() {
            return (Duration::ZERO, Duration::ZERO);
        }
        s.sort_unstable();
        let at = |q: usize| s[(s.len() * q / 100).min(s.len() - 1)];
        (at(50), at(99))
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `p50 / p99` in µs.
pub fn row(s: &Samples) -> String {
    let (p50, p99) = s.percentiles();
    format!("{:.0} / {:.0}", micros(p50), micros(p99))
}

/// Runs `op(i)` (which times itself) `warmup + samples` times one after the
/// other, keeping the last `samples`, or until `seconds` have passed.
async fn measure<F, Fut>(samples: usize, seconds: f64, mut op: F) -> anyhow::Result<Samples>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Vec<Duration>>>,
{
    let warmup = (samples / 10).max(1);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut out = Samples::default();
    for i in 0..warmup + samples {
        let times = op(i).await?;
        if i >= warmup {
            times.into_iter().for_each(|t| out.push(t));
        }
        if i >= warmup && Instant::now() > deadline {
            break;
        }
    }
    Ok(out)
}

pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        args.samples = args.samples.min(60);
        args.cold_samples = args.cold_samples.min(15);
        args.cell_seconds = args.cell_seconds.min(1.0);
        args.loop_seconds = args.loop_seconds.min(1);
    }
    anyhow::ensure!(
        args.pods.iter().all(|&p| (1..=64).contains(&p)),
        "--pods: 1 to 64"
    );
    let max_pods = args.pods.iter().copied().max().unwrap_or(1);
    println!(
        "kvroute bench decision (seed {}; {}; load average at start {})",
        args.seed,
        machine(),
        load_average()
    );
    let server = RedisServer::start().context("starting redis-server")?;
    let index = Arc::new(RedisIndex::connect(&server.url()).await?);
    let mut ping = Samples::default();
    for i in 0..(args.samples * 5).max(200) {
        let d = index.ping().await?;
        if i >= 20 {
            ping.push(d);
        }
    }
    println!(
        "redis-server on 127.0.0.1:{} (same machine); PING round trip p50 / p99 µs: {}\n",
        server.port(),
        row(&ping)
    );

    let tokenizer_json = prompts::llama3_tokenizer()?;
    let scheme = KeyScheme::new(
        HashScheme::Sha256Cbor,
        "vllm-none-hash",
        prompts::BLOCK_SIZE,
    )?;
    let prompts = prompts::build(&tokenizer_json, &scheme, &args.blocks, args.seed)?;
    let pod_port = envoy::free_port()?;
    let endpoints = prompts::endpoints(max_pods, pod_port);
    let entries = prompts::fill(&index, &prompts, &args.pods, &endpoints, args.holdings).await?;
    println!(
        "index: {entries} (block, pod) entries, holdings {:?}; Llama 3 tokenizer {}\n",
        args.holdings,
        tokenizer_json.display()
    );

    println!("(0) the lookup alone, one at a time, every pod a candidate");
    lookups::compare(&index, &prompts, &args.pods, args.samples).await?;
    if !args.no_cluster {
        println!(
            "\n(0') the lookup alone on a local 3-master Redis Cluster, every pod a candidate"
        );
        lookups::compare_cluster(
            &prompts,
            &args.pods,
            &endpoints,
            args.holdings,
            args.samples / 2,
        )
        .await?;
    }

    let mut cold_id = 0u64;
    let mut next_cold = || {
        cold_id += 1;
        cold_id
    };
    let tokenizer_args: Vec<String> = args
        .pods
        .iter()
        .map(|&p| format!("{}={}", prompts::model(p), tokenizer_json.display()))
        .collect();

    println!("\n(a) in process: EndpointPicker::score (tokenize, keys, lookup, score, pick)");
    let registry = Arc::new(TokenizerRegistry::new(
        tokenizer_args
            .iter()
            .filter_map(|a| a.split_once('='))
            .map(|(m, p)| (m.to_string(), PathBuf::from(p))),
        vec![],
        TokenizerOptions::default(),
    ));
    registry.preload();
    let router = EndpointPicker::new(
        index.clone(),
        scheme.clone(),
        registry.clone(),
        Arc::new(Candidates::new(&endpoints)?),
        Load::default(),
        RouteConfig::default(),
        args.seed,
    );
    let mut table = Vec::new();
    for prompt in &prompts {
        for &pods in &args.pods {
            let subset = endpoints[..pods].to_vec();
            for warm in [true, false] {
                let n = if warm {
                    args.samples
                } else {
                    args.cold_samples
                };
                let s = measure(n, args.cell_seconds, |_| {
                    let text = if warm {
                        prompt.text.clone()
                    } else {
                        prompts::cold_text(&prompt.text, next_cold())
                    };
                    let req = RouteRequest {
                        model: prompts::model(pods),
                        prompt: ReqPrompt::Text(text),
                        cache_salt: None,
                        chat_template_kwargs: None,
                        request_id: None,
                    };
                    let (router, subset) = (&router, &subset);
                    async move {
                        let started = Instant::now();
                        let report = router.score(&req, Some(subset)).await;
                        let d = started.elapsed();
                        anyhow::ensure!(
                            report.blocks == prompt.blocks && report.reason.as_label() == "prefix",
                            "unexpected decision: {} blocks, reason {}",
                            report.blocks,
                            report.reason
                        );
                        Ok(vec![d])
                    }
                })
                .await?;
                table.push(Cell {
                    blocks: prompt.blocks,
                    pods,
                    warm,
                    in_process: s,
                    ..Cell::default()
                });
            }
        }
    }
    print_table(&table, false);
    breakdown::run(&router, &registry, &index, &scheme, &prompts, &args).await?;

    println!("\n(b) ext_proc to the kvroute-scorer process: first message -> routing headers");
    let scorer_bin = scorer_proc::binary(args.scorer_bin.as_deref())?;
    let mut scorer = scorer_proc::ScorerProcess::start(&scorer_proc::Launch {
        binary: &scorer_bin,
        redis_url: server.url(),
        tokenizers: tokenizer_args.clone(),
        endpoints: &endpoints,
        seed: args.seed,
    })
    .await?;
    let probe = serde_json::json!({
        "model": prompts::model(args.pods[0]),
        "prompt": prompts[0].text,
        "endpoints": endpoints[..args.pods[0]],
    });
    scorer.wait_ready(&Bytes::from(probe.to_string())).await?;
    let client = extproc::Client::connect(scorer.grpc).await?;
    for cell in &mut table {
        let prompt = prompts
            .iter()
            .find(|p| p.blocks == cell.blocks)
            .context("prompt")?;
        let subset = extproc::subset(&endpoints[..cell.pods]);
        let n = if cell.warm {
            args.samples
        } else {
            args.cold_samples
        };
        let model = prompts::model(cell.pods);
        let warm_body = extproc::completion(&model, &prompt.text);
        cell.ext_proc = measure(n, args.cell_seconds, |_| {
            let body = if cell.warm {
                warm_body.clone()
            } else {
                extproc::completion(&model, &prompts::cold_text(&prompt.text, next_cold()))
            };
            let (mut client, subset) = (client.clone(), &subset);
            let pods = &endpoints[..cell.pods];
            async move {
                let (d, endpoint) = client.decide(&body, Some(subset)).await?;
                anyhow::ensure!(
                    pods.contains(&endpoint),
                    "routed outside the subset: {endpoint}"
                );
                Ok(vec![d])
            }
        })
        .await?;
    }
    print_table(&table, false);
    floor(&prompts, &endpoints, &args).await?;

    if !args.no_envoy {
        println!(
            "\n(c) through Envoy (--concurrency 1, one keep-alive connection): the scorer's listener, \
             a do-nothing picker's listener, request by request, and the difference of their percentiles"
        );
        let shutdown = CancellationToken::new();
        let noop_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let noop_addr = noop_listener.local_addr()?;
        tokio::spawn(envoy::serve_noop(
            noop_listener,
            endpoints[0].clone(),
            shutdown.clone(),
        ));
        let envoy_bin = envoy::binary(args.envoy_bin.as_deref())?;
        let subsets: Vec<(usize, &[String])> =
            args.pods.iter().map(|&p| (p, &endpoints[..p])).collect();
        let envoy = envoy::Envoy::start(
            &envoy_bin,
            &envoy::Layout {
                scorer: scorer.grpc,
                noop: noop_addr,
                subsets,
                pods: &endpoints,
            },
        )?;
        for cell in &mut table {
            let prompt = prompts
                .iter()
                .find(|p| p.blocks == cell.blocks)
                .context("prompt")?;
            let port = envoy
                .scorer_ports
                .iter()
                .find(|(p, _)| *p == cell.pods)
                .map(|(_, port)| *port)
                .context("listener")?;
            let mut to_scorer = envoy::Http::connect(port).await?;
            let mut to_noop = envoy::Http::connect(envoy.noop_port).await?;
            let model = prompts::model(cell.pods);
            let warm_body = extproc::completion(&model, &prompt.text);
            let n = if cell.warm {
                args.samples
            } else {
                args.cold_samples
            };
            let (mut scored, mut noop) = (Samples::default(), Samples::default());
            let warmup = (n / 10).max(1);
            let deadline = Instant::now() + Duration::from_secs_f64(args.cell_seconds);
            for i in 0..warmup + n {
                let body = if cell.warm {
                    warm_body.clone()
                } else {
                    extproc::completion(&model, &prompts::cold_text(&prompt.text, next_cold()))
                };
                let d_scorer = to_scorer.post(&body).await?;
                let d_noop = to_noop.post(&body).await?;
                if i >= warmup {
                    scored.push(d_scorer);
                    noop.push(d_noop);
                    if Instant::now() > deadline {
                        break;
                    }
                }
            }
            cell.envoy = scored;
            cell.noop = noop;
        }
        drop(envoy);
        shutdown.cancel();
        print_table(&table, true);
    }

    println!(
        "\n(d) throughput: a closed loop of {} concurrent ext_proc streams on one HTTP/2 connection to the scorer process, warm prompts, {} s after 1 s of warmup",
        args.loop_streams, args.loop_seconds
    );
    println!(
        "| blocks | pods | decisions/s | scorer CPU (cores busy) | decisions per CPU-second |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let loops: Vec<(usize, usize)> = [(512, 16), (2048, 64)]
        .into_iter()
        .filter(|(b, p)| args.blocks.contains(b) && args.pods.contains(p))
        .collect();
    for (blocks, pods) in loops {
        let prompt = prompts
            .iter()
            .find(|p| p.blocks == blocks)
            .context("prompt")?;
        let body = extproc::completion(&prompts::model(pods), &prompt.text);
        let subset = extproc::subset(&endpoints[..pods]);
        let (rate, cores) =
            throughput::closed_loop(&client, &scorer, &body, &subset, &args).await?;
        println!(
            "| {blocks} | {pods} | {rate:.0} | {cores:.2} | {:.0} |",
            rate / cores.max(1e-9)
        );
    }

    println!(
        "\n(e) warm ext_proc decisions, request by request, while streams send cold prompts back to back"
    );
    let warm = prompts
        .iter()
        .find(|p| p.blocks == 512)
        .or(prompts.first())
        .context("prompt")?;
    let cold = prompts.iter().max_by_key(|p| p.blocks).context("prompt")?;
    let pods = args.pods[0];
    let mix = mixed::Mix {
        warm_body: extproc::completion(&prompts::model(pods), &warm.text),
        warm_blocks: warm.blocks,
        cold_model: prompts::model(pods),
        cold_text: &cold.text,
        cold_blocks: cold.blocks,
        subset: extproc::subset(&endpoints[..pods]),
        pods,
    };
    mixed::run(
        &client,
        &mix,
        &[0, 1, 2, 4],
        args.samples,
        args.cell_seconds,
    )
    .await?;
    drop(scorer);
    println!("\nload average at end {}", load_average());
    Ok(())
}

/// One row of the results: a prompt size, a pod count, warm or cold.
/// Part (b'): the ext_proc transport alone. The warm bodies of (b), sent the
/// same way to a picker that decides nothing (it names a fixed pod), served
/// on a runtime and thread of its own so that it does not share the
/// client's: what (b) costs before the scorer does any work, to subtract.
async fn floor(
    prompts: &[prompts::Prompt],
    endpoints: &[String],
    args: &Args,
) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let endpoint = endpoints[0].clone();
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            envoy::serve_noop(listener, endpoint, stop).await;
            Ok(())
        })
    });
    let client = extproc::Client::connect(addr).await?;
    println!(
        "\n(b') the ext_proc transport alone: the same warm bodies to a do-nothing picker (own thread and runtime, names a fixed pod)"
    );
    println!("| blocks | body KiB | do-nothing picker ext_proc p50 / p99 µs |");
    println!("|---:|---:|---:|");
    let mut done = Vec::new();
    for prompt in prompts {
        if done.contains(&prompt.blocks) {
            continue;
        }
        done.push(prompt.blocks);
        let body = extproc::completion(&prompts::model(args.pods[0]), &prompt.text);
        let subset = extproc::subset(&endpoints[..args.pods[0]]);
        let samples = measure(args.samples, args.cell_seconds, |_| {
            let (mut client, body, subset) = (client.clone(), &body, &subset);
            async move { Ok(vec![client.decide(body, Some(subset)).await?.0]) }
        })
        .await?;
        println!(
            "| {} | {:.0} | {} |",
            prompt.blocks,
            body.len() as f64 / 1024.0,
            row(&samples)
        );
    }
    drop(client);
    shutdown.cancel();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("do-nothing picker thread panicked"))??;
    Ok(())
}

#[derive(Debug, Default)]
struct Cell {
    blocks: usize,
    pods: usize,
    warm: bool,
    in_process: Samples,
    ext_proc: Samples,
    envoy: Samples,
    noop: Samples,
}

fn print_table(cells: &[Cell], with_envoy: bool) {
    print!("| blocks | pods | tokenization | in process p50 / p99 µs | ext_proc p50 / p99 µs |");
    if with_envoy {
        print!(" Envoy p50 / p99 µs | Envoy no-op picker p50 / p99 µs | difference p50 / p99 µs |");
    }
    println!();
    println!(
        "|---:|---:|---|---:|---:|{}",
        if with_envoy { "---:|---:|---:|" } else { "" }
    );
    for c in cells {
        print!(
            "| {} | {} | {} | {} | {} |",
            c.blocks,
            c.pods,
            if c.warm { "warm" } else { "cold" },
            row(&c.in_process),
            if c.ext_proc.0.is_empty() {
                "-".to_string()
            } else {
                row(&c.ext_proc)
            },
        );
        if with_envoy {
            let (e50, e99) = c.envoy.percentiles();
            let (n50, n99) = c.noop.percentiles();
            print!(
                " {} | {} | {:.0} / {:.0} |",
                row(&c.envoy),
                row(&c.noop),
                micros(e50) - micros(n50),
                micros(e99) - micros(n99)
            );
        }
        println!();
    }
}
