//! Part (d): decisions per second per core, from a closed loop of
//! concurrent ext_proc streams and the scorer process's CPU time.

use super::Args;
use super::extproc::Client;
use super::scorer_proc::ScorerProcess;
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use std::time::{Duration, Instant};

/// `args.loop_streams` tasks deciding back to back; (decisions/s, cores the
/// scorer process kept busy) over the measured window.
pub async fn closed_loop(
    client: &Client,
    scorer: &ScorerProcess,
    body: &Bytes,
    subset: &Metadata,
    args: &Args,
) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + Duration::from_secs(args.loop_seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.loop_streams {
        let (mut client, body, subset) = (client.clone(), body.clone(), subset.clone());
        tasks.spawn(async move {
            let mut done = 0u64;
            loop {
                client.decide(&body, Some(&subset)).await?;
                let now = Instant::now();
                if now >= end {
                    return Ok::<_, anyhow::Error>(done);
                }
                if now >= start {
                    done += 1;
                }
            }
        });
    }
    tokio::time::sleep_until(start.into()).await;
    let cpu_start = scorer.cpu_seconds()?;
    tokio::time::sleep_until(end.into()).await;
    let cpu_end = scorer.cpu_seconds()?;
    let mut decisions = 0;
    while let Some(done) = tasks.join_next().await {
        decisions += done??;
    }
    let seconds = args.loop_seconds as f64;
    Ok((decisions as f64 / seconds, (cpu_end - cpu_start) / seconds))
}
