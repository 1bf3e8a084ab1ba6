//! `kvroute-loadtest bench index`: the block index on a local `redis-server`
//! (started here through `kvroute_testkit::redis_server`) and in memory, each number
//! next to a baseline measured in the same run on the same machine:
//!
//! 1. blocks stored per second through `RedisIndex::apply` (64-block Store
//!    ops) vs `redis-benchmark -t hset -P 64` (raw pipelined HSET);
//! 2. lookup latency of 64-block prompts held by 4, 16 and 64 pods vs a PING
//!    round trip and a raw pipeline of 64 HKEYS from the same process;
//! 3. Redis bytes per (block, pod) entry, bookkeeping included;
//! 4. the same lookups on `MemoryIndex`.
//!
//! Seeded (`--seed`), warmed up, bounded in time; `--quick` scales it down.

use crate::machine::{fmt_int, load_average, machine, redis_benchmark};
use anyhow::Context;
use kvroute_core::ids::{BlockKey, ModelName, PodId, Tier};
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::index::{Index, IndexOp, StoredBlock};
use kvroute_redis::RedisIndex;
use kvroute_testkit::redis_server::RedisServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Blocks per Store op and per prompt: vLLM publishes stores per request,
/// and a 1k-token prompt at block size 16 is 64 blocks.
const BLOCKS: usize = 64;
/// Distinct pods writing in the throughput runs.
const WRITER_PODS: usize = 16;
/// Distinct prompts per lookup row (so lookups do not hit one hot key set).
const PROMPTS: usize = 64;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// (block, pod) entries written for the memory measurement.
    #[arg(long, default_value_t = 1_000_000)]
    blocks: usize,
    /// Holder pods per block in the memory measurement.
    #[arg(long, default_value_t = 4)]
    pods_per_block: usize,
    /// Seconds measured per write-throughput row (after a 1 s warmup).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// 64-block Store ops per `apply` batch.
    #[arg(long, default_value_t = 16)]
    batch_ops: usize,
    /// Concurrent `apply` batches in the second throughput row.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Measured lookups per latency row (plus 10% warmup).
    #[arg(long, default_value_t = 5000)]
    lookups: usize,
    /// Requests of the `redis-benchmark` HSET baseline.
    #[arg(long, default_value_t = 1_000_000)]
    hset_requests: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Scale everything down (a smoke run of a few seconds).
    #[arg(long)]
    quick: bool,
}

pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.quick {
        args.blocks = args.blocks.min(100_000);
        args.seconds = args.seconds.min(1);
        args.lookups = args.lookups.min(500);
        args.hset_requests = args.hset_requests.min(200_000);
    }
    let server = RedisServer::start().context("starting redis-server")?;
    let index = Arc::new(RedisIndex::connect(&server.url()).await?);
    println!(
        "kvroute bench index (seed {}, {}, load average at start {})",
        args.seed,
        machine(),
        load_average()
    );
    println!(
        "redis: {} on 127.0.0.1:{}, client and server share the machine\n",
        redis_version(),
        server.port()
    );

    println!(
        "(1) writes: 64-block Store ops, {} per apply batch",
        args.batch_ops
    );
    // Two baselines: redis-benchmark's own HSET test (one hash, random
    // fields) and HSET of one field on random keys, which is what a plain
    // llm-d-layout writer sends per (block, pod) entry.
    let hset = redis_benchmark(server.port(), args.hset_requests, &["-t", "hset"], "HSET")?;
    println!(
        "    baseline  redis-benchmark -P 64 -t hset:                       {:>10} req/s",
        fmt_int(hset)
    );
    let hset_keys = redis_benchmark(
        server.port(),
        args.hset_requests,
        &["HSET", "m@__rand_int__", "127.0.0.1:8000@gpu", ""],
        "HSET m@__rand_int__",
    )?;
    println!(
        "    baseline  redis-benchmark -P 64 HSET m@<random> <pod>@gpu '':  {:>10} req/s",
        fmt_int(hset_keys)
    );
    for in_flight in [1, args.in_flight] {
        index.flush_all().await?;
        let w = write_throughput(&index, &args, in_flight).await?;
        println!(
            "    RedisIndex::apply, {in_flight} batch(es) in flight:                {:>10} blocks/s  = {:.2} x -t hset, {:.2} x random-key HSET",
            fmt_int(w.blocks_per_s),
            w.blocks_per_s / hset,
            w.blocks_per_s / hset_keys,
        );
        println!(
            "        per batch of {} blocks: {:.0} script calls, {:.2} round trips",
            args.batch_ops * BLOCKS,
            w.scripts_per_batch,
            w.round_trips_per_batch
        );
    }

    println!("\n(2) lookup latency, 64-block prompts, one lookup at a time, every pod a candidate");
    println!("    {:<60} {:>8}  {:>8}", "", "p50 µs", "p99 µs");
    index.flush_all().await?;
    let memory = MemoryIndex::new(1 << 22);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut rows = Vec::new();
    for holders in [4usize, 16, 64] {
        let model = ModelName::new(format!("bench-{holders}-holders"));
        let prompts = populate_prompts(&mut rng, &model, holders, &index, &memory).await?;
        rows.push((holders, model, prompts));
    }
    let conn = redis::Client::open(server.url())?
        .get_multiplexed_async_connection()
        .await?;
    let n = args.lookups;
    let ping = measure(n, |_| {
        let index = index.clone();
        async move { index.ping().await.map(|_| ()) }
    })
    .await?;
    print_latency("baseline  PING round trip (RedisIndex::ping)", ping);
    // Per prompt size, the raw pipeline, RedisIndex and MemoryIndex run
    // interleaved, lookup by lookup, so that noise from other processes on
    // the machine hits all three alike.
    for (holders, model, prompts) in &rows {
        let (mut raw, mut redis, mut mem) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n + n / 10 {
            let keys = &prompts[i % PROMPTS];
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.cmd("HKEYS").arg(format!("{model}@{}", k.0));
            }
            let start = Instant::now();
            pipe.query_async::<Vec<Vec<String>>>(&mut conn.clone())
                .await?;
            let d_raw = start.elapsed();
            let start = Instant::now();
            let l = index.lookup(model, keys, None).await?;
            let d_redis = start.elapsed();
            check_depth(l.max_depth(), l.pods.len(), *holders)?;
            let start = Instant::now();
            let l = memory.lookup(model, keys, None).await?;
            let d_mem = start.elapsed();
            check_depth(l.max_depth(), l.pods.len(), *holders)?;
            if i >= n / 10 {
                raw.push(d_raw);
                redis.push(d_redis);
                mem.push(d_mem);
            }
        }
        println!("    {holders} holder pods per block:");
        print_latency(
            "  baseline  raw pipeline of 64 HKEYS (redis crate)",
            percentiles(raw),
        );
        print_latency("  RedisIndex::lookup", percentiles(redis));
        print_latency("  (4) MemoryIndex::lookup", percentiles(mem));
    }
    drop(conn);

    println!();
    memory_per_entry(&index, &server, &args).await?;
    println!("\nload average at end {}", load_average());
    Ok(())
}

struct Writes {
    blocks_per_s: f64,
    scripts_per_batch: f64,
    round_trips_per_batch: f64,
}

/// `in_flight` tasks apply batches of random 64-block stores, 1 s warmup
/// then `args.seconds` measured.
async fn write_throughput(
    index: &Arc<RedisIndex>,
    args: &Args,
    in_flight: usize,
) -> anyhow::Result<Writes> {
    let warmup_end = Instant::now() + Duration::from_secs(1);
    let end = warmup_end + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..in_flight {
        let index = index.clone();
        let (seed, batch_ops) = (args.seed.wrapping_add(t as u64 + 1), args.batch_ops);
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let model = ModelName::new("bench-writes");
            let pods: Vec<PodId> = (0..WRITER_PODS)
                .map(|i| PodId::new(format!("10.0.0.{i}:8000")))
                .collect();
            let (mut blocks, mut scripts, mut round_trips, mut batches) = (0u64, 0u64, 0u64, 0u64);
            loop {
                let ops: Vec<IndexOp> = (0..batch_ops)
                    .map(|_| IndexOp::Store {
                        model: model.clone(),
                        pod: pods[rng.random_range(0..WRITER_PODS)].clone(),
                        tier: Tier::gpu(),
                        blocks: (0..BLOCKS)
                            .map(|_| StoredBlock {
                                key: BlockKey(rng.random()),
                                engine: None,
                            })
                            .collect(),
                    })
                    .collect();
                let stats = index.apply_with_stats(&ops).await?;
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= warmup_end {
                    blocks += (batch_ops * BLOCKS) as u64;
                    scripts += u64::from(stats.script_calls);
                    round_trips += u64::from(stats.round_trips);
                    batches += 1;
                }
            }
            Ok::<_, anyhow::Error>((blocks, scripts, round_trips, batches))
        });
    }
    let (mut blocks, mut scripts, mut round_trips, mut batches) = (0, 0, 0, 0);
    while let Some(done) = tasks.join_next().await {
        let (b, s, r, n) = done??;
        (blocks, scripts, round_trips, batches) =
            (blocks + b, scripts + s, round_trips + r, batches + n);
    }
    let batches = batches.max(1) as f64;
    Ok(Writes {
        blocks_per_s: blocks as f64 / args.seconds as f64,
        scripts_per_batch: scripts as f64 / batches,
        round_trips_per_batch: round_trips as f64 / batches,
    })
}

/// `PROMPTS` random 64-block prompts, each stored whole by `holders` pods, in
/// both backends.
async fn populate_prompts(
    rng: &mut StdRng,
    model: &ModelName,
    holders: usize,
    index: &RedisIndex,
    memory: &MemoryIndex,
) -> anyhow::Result<Vec<Vec<BlockKey>>> {
    let prompts: Vec<Vec<BlockKey>> = (0..PROMPTS)
        .map(|_| (0..BLOCKS).map(|_| BlockKey(rng.random())).collect())
        .collect();
    for prompt in &prompts {
        let ops: Vec<IndexOp> = (0..holders)
            .map(|h| IndexOp::Store {
                model: model.clone(),
                pod: PodId::new(format!("10.1.{}.{}:8000", h / 250, h % 250)),
                tier: Tier::gpu(),
                blocks: prompt
                    .iter()
                    .map(|&key| StoredBlock { key, engine: None })
                    .collect(),
            })
            .collect();
        index.apply(&ops).await?;
        memory.apply(&ops).await?;
    }
    Ok(prompts)
}

fn check_depth(
    depth: u32,
    pods: usize,
    holders: usize,
) -> Result<(), kvroute_core::index::IndexError> {
    if depth as usize != BLOCKS || pods != holders {
        return Err(kvroute_core::index::IndexError::Reply(format!(
            "lookup found depth {depth} on {pods} pods, expected {BLOCKS} on {holders}"
        )));
    }
    Ok(())
}

/// Runs `op(i)` `n` times one after the other (after `n / 10` warmup runs);
/// (p50, p99).
async fn measure<F, Fut, E>(n: usize, mut op: F) -> anyhow::Result<(Duration, Duration)>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    for i in 0..n / 10 {
        op(i).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        op(i).await?;
        samples.push(start.elapsed());
    }
    Ok(percentiles(samples))
}

/// (p50, p99) of `samples` (zero when empty).
fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    samples.sort_unstable();
    let at = |q: usize| samples[(samples.len() * q / 100).min(samples.len() - 1)];
    (at(50), at(99))
}

fn print_latency(label: &str, (p50, p99): (Duration, Duration)) {
    println!("    {label:<60} {:>8.1}  {:>8.1}", micros(p50), micros(p99));
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `args.blocks` (block, pod) entries: `blocks / pods_per_block` keys, each
/// stored by `pods_per_block` pods; `used_memory` delta and `MEMORY USAGE`
/// samples of the block hashes and of the per-slot bookkeeping.
async fn memory_per_entry(
    index: &Arc<RedisIndex>,
    server: &RedisServer,
    args: &Args,
) -> anyhow::Result<()> {
    index.flush_all().await?;
    let mut conn = redis::Client::open(server.url())?
        .get_multiplexed_async_connection()
        .await?;
    let before = used_memory(&mut conn).await?;
    let pods = args.pods_per_block.max(1);
    let keys_n = (args.blocks / pods).max(BLOCKS);
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let keys: Arc<Vec<u64>> = Arc::new((0..keys_n).map(|_| rng.random()).collect());
    let model = ModelName::new("bench-memory");
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let workers = args.in_flight.max(1);
    for w in 0..workers {
        let (index, keys, model) = (index.clone(), keys.clone(), model.clone());
        tasks.spawn(async move {
            // Worker w writes every workers-th chunk of 16 Store ops.
            let chunks: Vec<&[u64]> = keys.chunks(BLOCKS).collect();
            for (i, group) in chunks.chunks(16).enumerate() {
                if i % workers != w {
                    continue;
                }
                let ops: Vec<IndexOp> = (0..pods)
                    .flat_map(|p| {
                        let model = model.clone();
                        group.iter().map(move |chunk| IndexOp::Store {
                            model: model.clone(),
                            pod: PodId::new(format!("10.2.0.{p}:8000")),
                            tier: Tier::gpu(),
                            blocks: chunk
                                .iter()
                                .map(|&k| StoredBlock {
                                    key: BlockKey(k),
                                    engine: None,
                                })
                                .collect(),
                        })
                    })
                    .collect();
                index.apply(&ops).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let fill = start.elapsed();
    let entries = (keys_n * pods) as f64;
    let after = used_memory(&mut conn).await?;
    let delta = after.saturating_sub(before) as f64;

    // MEMORY USAGE of sampled block hashes and of every per-slot pod entry.
    let samples = 1000.min(keys_n);
    let mut pipe = redis::pipe();
    for k in keys.iter().take(samples) {
        pipe.cmd("MEMORY").arg("USAGE").arg(format!("{model}@{k}"));
    }
    let block_bytes: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
    let block_avg = block_bytes.iter().flatten().sum::<u64>() as f64 / samples as f64;
    let mut pipe = redis::pipe();
    for slot in 0..16384u16 {
        let tag = kvroute_redis::tag_for_slot(slot);
        for p in 0..pods {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("kvroute:{{{tag}}}:pod:10.2.0.{p}:8000"));
        }
    }
    let pod_bytes: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
    let pod_total = pod_bytes.iter().flatten().sum::<u64>() as f64;

    println!(
        "(3) Redis memory at {} (block, pod) entries ({} keys x {pods} pods, filled in {:.1} s = {} entries/s)",
        fmt_int(entries),
        fmt_int(keys_n as f64),
        fill.as_secs_f64(),
        fmt_int(entries / fill.as_secs_f64())
    );
    println!(
        "    used_memory delta per entry, everything included:        {:>7.1} B",
        delta / entries
    );
    println!(
        "    block HASH <model>@<key> per entry (MEMORY USAGE, {samples} keys): {:>7.1} B  ({:.0} B per key)",
        block_avg / pods as f64,
        block_avg
    );
    println!(
        "    per-slot pod entries kvroute:{{tag}}:pod:* per entry (all):    {:>7.1} B",
        pod_total / entries
    );
    Ok(())
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO memory has no used_memory")
}

fn redis_version() -> String {
    std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.split_whitespace()
                .find_map(|w| w.strip_prefix("v=").map(str::to_owned))
        })
        .map_or_else(
            || "redis-server (version unknown)".into(),
            |v| format!("redis-server {v}"),
        )
}
