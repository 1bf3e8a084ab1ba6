//! Part (0): the lookup alone, the two ways a single Redis can answer it —
//! `lua/lookup.lua` (bisection, one EVALSHA) and a pipeline of one HKEYS
//! per block (the linear walk's read) — lookup by lookup, interleaved, so
//! that noise hits both alike. Where each wins sets
//! `kvroute_core::index::bisect::DEFAULT_LINEAR_MAX_BLOCKS`.

use super::prompts::{self, Prompt};
use super::{Samples, row};
use kvroute_core::ids::ModelName;
use kvroute_core::index::{Index, LookupMode};
use kvroute_redis::RedisIndex;
use std::time::Instant;

pub async fn compare(
    index: &RedisIndex,
    prompts: &[Prompt],
    pod_counts: &[usize],
    samples: usize,
) -> anyhow::Result<()> {
    println!(
        "| blocks | pods | HKEYS pipeline p50 / p99 µs | lookup.lua p50 / p99 µs | blocks read by lookup.lua |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let settings = index.lookup_settings();
    let default_linear_max = settings.linear_max_blocks();
    settings.set_linear_max_blocks(0);
    for prompt in prompts {
        for &pods in pod_counts {
            let model = ModelName::new(prompts::model(pods));
            let (mut pipeline, mut script) = (Samples::default(), Samples::default());
            let mut reads = 0;
            let warmup = samples / 10;
            for i in 0..warmup + samples {
                index.set_lookup_mode(LookupMode::Linear);
                let started = Instant::now();
                let linear = index.lookup(&model, &prompt.keys, None).await?;
                let d_pipeline = started.elapsed();
                index.set_lookup_mode(LookupMode::Bisect);
                let before = index.stats().lookup_reads;
                let started = Instant::now();
                let bisect = index.lookup(&model, &prompt.keys, None).await?;
                let d_script = started.elapsed();
                anyhow::ensure!(
                    bisect == linear,
                    "lookup.lua and the walk disagree on the {}-block prompt",
                    prompt.blocks
                );
                if i >= warmup {
                    pipeline.push(d_pipeline);
                    script.push(d_script);
                    reads = index.stats().lookup_reads - before;
                }
            }
            println!(
                "| {} | {pods} | {} | {} | {reads} |",
                prompt.blocks,
                row(&pipeline),
                row(&script)
            );
        }
    }
    settings.set_linear_max_blocks(default_linear_max);
    index.set_lookup_mode(LookupMode::Bisect);
    Ok(())
}

/// Part (0'): the same lookups on a local 3-master Redis Cluster, where no
/// script can see a whole prompt: one wave of HKEYS per master (the linear
/// walk's read) vs the bisection in rounds of pipelined HLEN/HKEYS vs the
/// bisection by one `lookup.lua` call per master (the default on Redis 7),
/// lookup by lookup, interleaved.
pub async fn compare_cluster(
    prompts: &[Prompt],
    pod_counts: &[usize],
    endpoints: &[String],
    holdings: prompts::Holdings,
    samples: usize,
) -> anyhow::Result<()> {
    let cluster = kvroute_testkit::redis_server::RedisCluster::start(3)?;
    let index = std::sync::Arc::new(RedisIndex::connect_cluster(&cluster.urls()).await?);
    prompts::fill(&index, prompts, pod_counts, endpoints, holdings).await?;
    let mut ping = Samples::default();
    for _ in 0..samples.max(100) {
        ping.push(index.ping().await?);
    }
    println!(
        "PING of all 3 masters concurrently p50 / p99 µs: {}\n",
        row(&ping)
    );
    println!(
        "| blocks | pods | one wave of HKEYS p50 / p99 µs | bisection in rounds (or one wave read whole up to {} blocks) p50 / p99 µs | blocks read / round trips | one script per master p50 / p99 µs | blocks read / round trips |",
        kvroute_redis::CLUSTER_READ_WHOLE_MAX_BLOCKS
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let settings = index.lookup_settings();
    for prompt in prompts {
        for &pods in pod_counts {
            let model = ModelName::new(prompts::model(pods));
            let (mut linear, mut bisect) = (Samples::default(), Samples::default());
            let mut per_master = Samples::default();
            let (mut reads, mut trips) = (0, 0);
            let (mut pm_reads, mut pm_trips) = (0, 0);
            let warmup = samples / 10;
            for i in 0..warmup + samples {
                index.set_lookup_mode(LookupMode::Linear);
                let started = Instant::now();
                let walk = index.lookup(&model, &prompt.keys, None).await?;
                let d_linear = started.elapsed();
                index.set_lookup_mode(LookupMode::Bisect);
                settings.set_per_master_scripts(false);
                let before = index.stats();
                let started = Instant::now();
                let got = index.lookup(&model, &prompt.keys, None).await?;
                let d_bisect = started.elapsed();
                anyhow::ensure!(got == walk, "cluster bisection and walk disagree");
                let after = index.stats();
                settings.set_per_master_scripts(true);
                let started = Instant::now();
                let got = index.lookup(&model, &prompt.keys, None).await?;
                let d_per_master = started.elapsed();
                anyhow::ensure!(got == walk, "per-master bisection and walk disagree");
                let last = index.stats();
                anyhow::ensure!(
                    last.node_lookups_redone == 0,
                    "a per-master lookup was redone"
                );
                if i >= warmup {
                    linear.push(d_linear);
                    bisect.push(d_bisect);
                    per_master.push(d_per_master);
                    reads = after.lookup_reads - before.lookup_reads;
                    trips = after.lookup_round_trips - before.lookup_round_trips;
                    pm_reads = last.lookup_reads - after.lookup_reads;
                    pm_trips = last.lookup_round_trips - after.lookup_round_trips;
                }
            }
            println!(
                "| {} | {pods} | {} | {} | {reads} / {trips} | {} | {pm_reads} / {pm_trips} |",
                prompt.blocks,
                row(&linear),
                row(&bisect),
                row(&per_master)
            );
        }
    }
    Ok(())
}
