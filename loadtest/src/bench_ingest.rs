//! `kvroute-loadtest bench ingest`: the write path end to end. Simulated vLLM
//! pods publish over ZeroMQ to the real `kvroute-ingester` binary, which
//! writes a local `redis-server`; both are started here.
//!
//! Per row (1, 4, 16 publishing pods, a fresh ingester each):
//! 1. maximum rate: publishers send as fast as a window of batches in flight
//!    allows (sent minus applied; a PUB drops what a slow subscriber cannot
//!    take, so an unbounded sender would measure loss, not throughput), and
//!    the applied rate is read from the ingester's `/metrics`: the
//!    `kvroute_ingester_lag_seconds` histogram gets one sample per batch when
//!    the Redis write holding it succeeds, so its count is "batches applied";
//! 2. lag at half that rate, paced: batch `ts` -> applied from the same
//!    histogram, and publish -> visible in Redis from sampled stores polled
//!    every millisecond.
//!
//! Next to it, in the same run: `redis-benchmark -P 64 -t hset`, and the CPU
//! time of the ingester, redis-server and this process (publishers), so the
//! output says which one limited the rate. Seeded, warmed up, bounded in
//! time; `--quick` scales it down.

mod probe;
mod workload;

use anyhow::{Context, bail};
use kvroute_core::events::Encoding;
use kvroute_core::keys::{HashScheme, KeyScheme};
use kvroute_testkit::redis_server::RedisServer;
use probe::{IngesterProc, LAG, Metrics, Sample, fmt_int, quantile};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use workload::{Control, PodStream, Shape};

/// PYTHONHASHSEED of the simulated fleet (and the ingester's --hash-seed).
const SEED: &str = "bench";
const BATCHES: &str = "kvroute_ingester_batches_total";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Publishing pod counts, one row each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pods: Vec<usize>,
    /// Seconds measured at the maximum rate, per row (after the warmup).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds measured at half the maximum rate, per row.
    #[arg(long, default_value_t = 5.0)]
    lag_seconds: f64,
    /// Seconds of warmup per row.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Events per batch (even: half stores, half evictions).
    #[arg(long, default_value_t = 4)]
    events_per_batch: usize,
    /// Blocks per event (16 blocks = a 256-token prefix).
    #[arg(long, default_value_t = 16)]
    blocks_per_event: usize,
    /// Stores each pod holds before evicting its oldest.
    #[arg(long, default_value_t = 256)]
    held: usize,
    /// Most batches in flight (sent, not yet applied) over all pods.
    #[arg(long, default_value_t = 2048)]
    window: u64,
    /// vLLM generation: v0.11 (map events, sha256_cbor digests) or v0.10
    /// (array events, sha256_cbor_64bit ints).
    #[arg(long, default_value = "v0.11", value_parser = ["v0.10", "v0.11"])]
    vllm: String,
    /// The ingester's ordering workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// The ingester's `--max-inflight-writes` (index writes in flight per
    /// worker); unset: the ingester's default.
    #[arg(long)]
    max_inflight_writes: Option<usize>,
    /// The ingester binary (default: `kvroute-ingester` beside this one).
    #[arg(long)]
    ingester_bin: Option<PathBuf>,
    /// Requests of the `redis-benchmark` HSET baseline.
    #[arg(long, default_value_t = 1_000_000)]
    hset_requests: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Scale everything down (a smoke run of a few seconds per row).
    #[arg(long)]
    quick: bool,
}

/// CPU seconds of the three processes at one instant.
#[derive(Clone, Copy)]
struct Cpu {
    ingester: f64,
    redis: f64,
    bench: f64,
}

fn cpu(ingester: &str, redis: &str) -> Cpu {
    let s = |pid: &str| probe::cpu_seconds(pid).unwrap_or(f64::NAN);
    Cpu {
        ingester: s(ingester),
        redis: s(redis),
        bench: s("self"),
    }
}

pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        args.seconds = args.seconds.min(1.5);
        args.lag_seconds = args.lag_seconds.min(1.5);
        args.warmup = args.warmup.min(0.5);
        args.hset_requests = args.hset_requests.min(200_000);
        args.held = args.held.min(64);
    }
    if args.events_per_batch < 2 || !args.events_per_batch.is_multiple_of(2) {
        bail!("--events-per-batch must be even and at least 2");
    }
    if args.blocks_per_event == 0 || args.held == 0 || args.pods.contains(&0) {
        bail!("--blocks-per-event, --held and every --pods must be at least 1");
    }
    let bin = probe::ingester_binary(args.ingester_bin.as_deref())?;
    let (scheme, encoding) = match args.vllm.as_str() {
        "v0.10" => (HashScheme::Sha256Cbor64, Encoding::Array),
        _ => (HashScheme::Sha256Cbor, Encoding::Map),
    };
    let shape = Shape {
        scheme: KeyScheme::new(scheme, SEED, 16)?,
        encoding,
        events_per_batch: args.events_per_batch,
        blocks_per_event: args.blocks_per_event,
        held: args.held,
    };
    let server = RedisServer::start().context("starting redis-server")?;
    println!(
        "kvroute bench ingest (seed {}, {})",
        args.seed,
        probe::machine()
    );
    println!(
        "vLLM {} ({scheme}, {encoding:?} events), {} events per batch ({} blocks each; half stores, half evictions), {} stores held per pod",
        args.vllm, args.events_per_batch, args.blocks_per_event, args.held
    );
    println!(
        "ingester: {} --workers {}{}, Redis on 127.0.0.1:{}; publishers, ingester and Redis share the machine\n",
        bin.display(),
        args.workers,
        args.max_inflight_writes
            .map_or(String::new(), |n| format!(" --max-inflight-writes {n}")),
        server.port()
    );
    let hset = probe::redis_benchmark_hset(server.port(), args.hset_requests)?;
    println!(
        "baseline  redis-benchmark -P 64 -t hset: {} req/s\n",
        fmt_int(hset)
    );
    let redis_pid = probe::redis_pid(&server.url()).await?;
    for &pods in &args.pods {
        row(&args, &bin, &server, &redis_pid, &shape, pods, hset).await?;
    }
    Ok(())
}

async fn row(
    args: &Args,
    bin: &std::path::Path,
    server: &RedisServer,
    redis_pid: &str,
    shape: &Shape,
    pods: usize,
    hset: f64,
) -> anyhow::Result<()> {
    let url = server.url();
    let mut conn = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
    let streams: Vec<Arc<PodStream>> = (0..pods)
        .map(|i| Arc::new(PodStream::build(i, shape, args.seed)))
        .collect();
    let mut extra: Vec<String> = [
        "--hash-scheme",
        shape.scheme.scheme().as_str(),
        "--hash-seed",
        SEED,
        "--block-size",
        "16",
        "--workers",
        &args.workers.to_string(),
    ]
    .map(str::to_owned)
    .into();
    if let Some(n) = args.max_inflight_writes {
        extra.extend(["--max-inflight-writes".to_owned(), n.to_string()]);
    }
    let ing = IngesterProc::start(bin, &url, &extra).await?;
    let ing_pid = ing.pid().context("ingester exited")?.to_string();
    let ctl = Arc::new(Control::default());
    ctl.window.store(args.window, Relaxed);

    // The monitor keeps `applied` current for the publishers' window.
    let (http, monitor_ctl) = (ing.http, ctl.clone());
    let monitor = tokio::spawn(async move {
        while !monitor_ctl.stop.load(Relaxed) {
            if let Ok((200, text)) = probe::get(http, "/metrics").await {
                let m = Metrics::from_text(text);
                monitor_ctl
                    .applied
                    .store(m.sum(&format!("{LAG}_count"), &[]) as u64, Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let (sample_tx, sample_rx) = mpsc::unbounded_channel::<Sample>();
    let seen = Arc::new(Mutex::new((Vec::new(), 0u64)));
    let sampler = tokio::spawn(probe::sampler(url.clone(), sample_rx, seen.clone()));
    // Handshake: slow until every pod's first batch arrived, then a pause to
    // count what PUB dropped before the subscriptions reached it.
    ctl.set_rate(200.0);
    let mut publishers = tokio::task::JoinSet::new();
    for s in &streams {
        let fut = workload::publish(s.clone(), ing.zmq.clone(), ctl.clone(), sample_tx.clone());
        publishers.spawn(fut);
    }
    drop(sample_tx);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ing.metrics().await?.sum(BATCHES, &[("verdict", "first")]) < pods as f64 {
        if Instant::now() > deadline {
            bail!("not every publisher reached the ingester within 5 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctl.pause.store(true, Relaxed);
    let mut last = (u64::MAX, Instant::now());
    while last.1.elapsed() < Duration::from_millis(200) {
        let applied = ctl.applied.load(Relaxed);
        if applied != last.0 {
            last = (applied, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dropped = ctl.sent.load(Relaxed) - last.0.min(ctl.sent.load(Relaxed));
    ctl.dropped.store(dropped, Relaxed);
    ctl.set_rate(0.0);
    ctl.pause.store(false, Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;

    // (1) the maximum rate.
    let (m0, c0, t0) = (
        ing.metrics().await?,
        cpu(&ing_pid, redis_pid),
        Instant::now(),
    );
    let (busy0, wait0) = (ctl.busy_ns.load(Relaxed), ctl.wait_ns.load(Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let (m1, c1, dt) = (ing.metrics().await?, cpu(&ing_pid, redis_pid), t0.elapsed());
    let (busy, wait) = (
        (ctl.busy_ns.load(Relaxed) - busy0) as f64 / 1e9,
        (ctl.wait_ns.load(Relaxed) - wait0) as f64 / 1e9,
    );
    let d = |name: &str, labels: &[(&str, &str)]| m1.sum(name, labels) - m0.sum(name, labels);
    let secs = dt.as_secs_f64();
    let batches = d(&format!("{LAG}_count"), &[]) / secs;
    let events = batches * args.events_per_batch as f64;
    let blocks = events * args.blocks_per_event as f64;
    let writes = d("kvroute_ingester_index_writes_total", &[("outcome", "ok")]);
    let write_s = d("kvroute_ingester_index_write_seconds_sum", &[]);
    let cores = |a: f64, b: f64| (b - a) / secs;
    let (ci, cr, cb) = (
        cores(c0.ingester, c1.ingester),
        cores(c0.redis, c1.redis),
        cores(c0.bench, c1.bench),
    );
    println!(
        "{pods:>2} pod(s)  max: {:>7} batches/s = {:>8} events/s = {:>10} blocks/s = {:.3} x HSET/s",
        fmt_int(batches),
        fmt_int(events),
        fmt_int(blocks),
        blocks / hset
    );
    println!(
        "          CPU (cores): ingester {ci:.2}, redis-server {cr:.2}, publishers {cb:.2}; {:.0} writes/s, {:.1} batches per write, {:.2} ms per write, {:.2} writes in flight on average",
        writes / secs,
        batches * secs / writes.max(1.0),
        1e3 * write_s / writes.max(1.0),
        write_s / secs
    );
    println!(
        "          publishers: {:.0}% of their time waiting for the ingester (window {}), {:.1} µs to encode+send a batch -> {}",
        100.0 * wait / (busy + wait).max(1e-9),
        args.window,
        1e6 * busy / (batches * secs).max(1.0),
        bottleneck(
            [ci, cr, cb],
            wait / (busy + wait).max(1e-9),
            write_s / secs / pods.min(args.workers) as f64
        )
    );

    // (2) lag at half the maximum rate.
    let per_pod = batches / 2.0 / pods as f64;
    ctl.set_rate(per_pod);
    // Let the window's backlog drain before measuring.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ctl.in_flight() > 4 * pods as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // About 100 sampled stores per second over all pods.
    let every = (per_pod * pods as f64 / 100.0).round().max(1.0) as u64;
    seen.lock().unwrap_or_else(|e| e.into_inner()).0.clear();
    ctl.sample_every.store(every, Relaxed);
    let (h0, l0) = (ing.metrics().await?.buckets(LAG), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(args.lag_seconds)).await;
    let h1 = ing.metrics().await?.buckets(LAG);
    let lag_secs = l0.elapsed().as_secs_f64();
    ctl.sample_every.store(0, Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await; // the last samples land
    let (mut visible, lost) = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    visible.sort();
    let n_lag = h1.last().map_or(0.0, |b| b.1) - h0.last().map_or(0.0, |b| b.1);
    let ms = |q: f64| quantile(&h0, &h1, q).map_or("-".into(), |s| format!("{:.2}", s * 1e3));
    let pct = |q: f64| {
        let i = ((visible.len() as f64 * q).ceil() as usize).clamp(1, visible.len().max(1)) - 1;
        visible
            .get(i)
            .map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
    };
    println!(
        "          at {} batches/s ({} blocks/s): ts -> applied p50 {} ms, p99 {} ms ({} batches, histogram); publish -> visible in Redis p50 {} ms, p99 {} ms ({} samples, {lost} unseen)",
        fmt_int(n_lag / lag_secs),
        fmt_int(n_lag / lag_secs * (args.events_per_batch * args.blocks_per_event) as f64),
        ms(0.5),
        ms(0.99),
        fmt_int(n_lag),
        pct(0.5),
        pct(0.99),
        visible.len()
    );

    // Drain, then check nothing was lost on the way.
    ctl.stop.store(true, Relaxed);
    let mut sent = 0;
    while let Some(r) = publishers.join_next().await {
        sent += r??;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let end = loop {
        let m = ing.metrics().await?;
        if m.sum(&format!("{LAG}_count"), &[]) >= (sent - dropped) as f64
            || Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let applied = end.sum(&format!("{LAG}_count"), &[]);
    // As integers: an empty f64 sum is -0.
    let gaps = end.sum("kvroute_ingester_gap_batches_total", &[]) as u64;
    let disagree = end.sum(
        "kvroute_ingester_hash_agreement_total",
        &[("agree", "false")],
    ) as u64;
    println!(
        "          check: {} of {} batches sent were applied ({dropped} sent before the subscriptions arrived, dropped by PUB), {gaps} in sequence gaps, {disagree} hash disagreements\n",
        fmt_int(applied),
        fmt_int(sent as f64)
    );
    monitor.abort();
    sampler.abort();
    ing.stop().await;
    Ok(())
}

/// Which stage limited the maximum rate, from CPU use (Redis is one
/// thread: a core) and from how many Redis writes the ingester's busy
/// workers had in flight on average (a worker keys its next batches while
/// its writes run, but one pod's writes go one after the other).
fn bottleneck([ingester, redis, publishers]: [f64; 3], waiting: f64, writing: f64) -> String {
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let total = ingester + redis + publishers;
    let who = if redis > 0.9 {
        "bottleneck: redis-server (its one core busy)".to_owned()
    } else if waiting < 0.5 {
        "bottleneck: the publishers (they rarely waited)".to_owned()
    } else if total > 0.9 * cores {
        format!("bottleneck: the machine's {cores:.0} cores (all busy)")
    } else if writing > 0.8 {
        format!(
            "bottleneck: the ingester's workers, {writing:.2} Redis writes in flight each on average, cores left idle"
        )
    } else {
        "bottleneck: the ingester (cores left idle)".to_owned()
    };
    format!("{who}; total CPU {total:.2} of {cores:.0} cores")
}
