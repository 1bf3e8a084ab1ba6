//! Part (e): warm decisions while cold ones are being tokenized. Streams
//! sending cold prompts back to back keep the scorer's tokenizer busy; a
//! warm prompt's ext_proc decision is timed request by request meanwhile.
//! Tokenizing on the async workers would queue warm decisions behind
//! tens of milliseconds of BPE; off them, warm decisions only share the CPU.

use super::extproc::{Client, completion};
use super::prompts;
use super::{Samples, row};
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What one row of part (e) sends.
pub struct Mix<'a> {
    pub warm_body: Bytes,
    pub warm_blocks: usize,
    pub cold_model: String,
    pub cold_text: &'a str,
    pub cold_blocks: usize,
    pub subset: Metadata,
    pub pods: usize,
}

/// For each count of cold streams: warm decision latencies and cold
/// decisions per second, printed as a table.
pub async fn run(
    client: &Client,
    mix: &Mix<'_>,
    cold_streams: &[usize],
    samples: usize,
    seconds: f64,
) -> anyhow::Result<()> {
    println!(
        "| warm blocks | pods | cold streams ({} blocks) | warm ext_proc p50 / p99 µs | warm decisions | cold decisions/s |",
        mix.cold_blocks
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    // Cold texts never repeat across rows or runs of this process.
    let next_cold = Arc::new(AtomicU64::new(1 << 40));
    for &streams in cold_streams {
        // Let the cold streams get going before the window opens.
        let start = Instant::now() + Duration::from_millis(300);
        let end = start + Duration::from_secs_f64(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let (mut client, subset, next) =
                (client.clone(), mix.subset.clone(), next_cold.clone());
            let (model, text) = (mix.cold_model.clone(), mix.cold_text.to_string());
            tasks.spawn(async move {
                let mut done = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let body = completion(&model, &prompts::cold_text(&text, i));
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
        // Warm decisions back to back for the whole window (at least
        // `samples` of them).
        let mut warm = Samples::default();
        let mut client = client.clone();
        while Instant::now() < end || warm.0.len() < samples {
            let (d, _) = client.decide(&mix.warm_body, Some(&mix.subset)).await?;
            warm.push(d);
        }
        let mut cold = 0;
        while let Some(done) = tasks.join_next().await {
            cold += done??;
        }
        println!(
            "| {} | {} | {streams} | {} | {} | {:.1} |",
            mix.warm_blocks,
            mix.pods,
            row(&warm),
            warm.0.len(),
            cold as f64 / seconds
        );
    }
    Ok(())
}
