//! Bytes of resident memory per `--chain-cache` entry: fills the cache type
//! the ingester's `Keyer` holds (`moka::sync::Cache<(ModelName,
//! EngineHash), ChainState>`, one shared model name as in a real fleet)
//! with N full-digest chain states and reads `VmRSS` from
//! `/proc/self/status` before and after.
//!
//! `cargo run -p kvroute-ingester --example chain_cache_rss -- 2000000`
//! (a measurement, not a test: run it by hand; the numbers are in
//! docs/benchmarks-history.md).

use kvroute_core::ids::{EngineHash, ModelName};
use kvroute_core::keys::ChainState;
use moka::sync::Cache;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let model = ModelName::new("meta-llama/Llama-3.1-8B-Instruct");
    let before = rss_bytes();
    let cache: Cache<(ModelName, EngineHash), ChainState> = Cache::new(n);
    for i in 0..n {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        cache.insert((model.clone(), EngineHash(i)), ChainState::Digest(d));
    }
    cache.run_pending_tasks();
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    println!(
        "entries={} rss_before={} rss_after={} bytes_per_entry={per:.0}",
        cache.entry_count(),
        before,
        after
    );
}
