//! Block-key throughput next to raw SHA-256 throughput of the very same bytes,
//! measured in the same run: the ratio shows what the CBOR encoding and
//! chaining cost on top of the hash itself.

use kvroute_core::keys::{ChainState, ExtraKeys, HashScheme, KeyScheme, cbor};
use sha2::{Digest, Sha256};
use std::hint::black_box;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Tokens per measured prompt.
    #[arg(long, default_value_t = 1 << 20)]
    tokens: usize,
    /// Block sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    block_sizes: Vec<usize>,
    /// Minimum measuring time per row.
    #[arg(long, default_value = "2s", value_parser = humantime_secs)]
    time: Duration,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let n = s.trim_end_matches('s');
    n.parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| format!("{s}: {e}"))
}

/// Runs `f` repeatedly for at least `time`; returns items per second.
fn rate(time: Duration, items: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < time {
        f();
        n += 1;
    }
    (n * items) as f64 / start.elapsed().as_secs_f64()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Token ids spread over a Llama-3-sized vocabulary, so CBOR widths vary
    // as in real prompts.
    let tokens: Vec<u32> = (0..args.tokens as u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 128_256) as u32)
        .collect();
    println!(
        "# block keys vs raw SHA-256 of the same bytes ({} tokens)",
        args.tokens
    );
    println!(
        "{:<20} {:>6} {:>14} {:>14} {:>10} {:>14}",
        "scheme", "block", "keys/s", "sha256/s", "ratio", "ns/key"
    );
    for &bs in &args.block_sizes {
        for scheme in [HashScheme::Sha256Cbor, HashScheme::Sha256Cbor64] {
            let ks = KeyScheme::new(scheme, "vllm-none-hash", bs)?;
            let blocks = tokens.len() / bs;
            // The exact bytes the chain hashes, prepared ahead so the baseline
            // measures SHA-256 alone.
            let mut encoded = Vec::with_capacity(blocks);
            let mut parent = ks.root();
            for chunk in tokens.chunks_exact(bs) {
                let mut buf = Vec::new();
                let p = match &parent {
                    ChainState::Digest(d) => cbor::Parent::Digest(d),
                    ChainState::U64(v) => cbor::Parent::U64(*v),
                };
                cbor::write_block(&mut buf, p, chunk, None);
                encoded.push(buf);
                parent = ks.chain(parent, 1, chunk, ExtraKeys::NONE, |_| {});
            }
            let keys_rate = rate(args.time, blocks, || {
                black_box(ks.block_keys(black_box(&tokens), ExtraKeys::NONE));
            });
            let sha_rate = rate(args.time, blocks, || {
                for b in &encoded {
                    black_box(Sha256::digest(black_box(b)));
                }
            });
            println!(
                "{:<20} {:>6} {:>14.0} {:>14.0} {:>10.3} {:>14.1}",
                scheme.as_str(),
                bs,
                keys_rate,
                sha_rate,
                keys_rate / sha_rate,
                1e9 / keys_rate
            );
        }
    }
    Ok(())
}
