//! Part (a'): where a warm in-process decision's time goes, stage by stage
//! (cached tokenization, block keys with and without the key cache, the
//! lookup, the whole `EndpointPicker::score`), interleaved sample by sample.

use super::prompts::{self, Prompt};
use super::{Args, Samples, row};
use kvroute_core::keys::{ExtraKeys, KeyCache, KeyScheme};
use kvroute_redis::RedisIndex;
use kvroute_tokens::TokenizerRegistry;
use scorer::decide::{Prompt as ReqPrompt, RouteRequest};
use scorer::route::EndpointPicker;
use std::time::{Duration, Instant};

/// Where a warm in-process decision's time goes, for the largest pod count:
/// each stage timed alone, interleaved sample by sample.
pub async fn run(
    router: &EndpointPicker<RedisIndex>,
    registry: &TokenizerRegistry,
    index: &RedisIndex,
    scheme: &KeyScheme,
    prompts: &[Prompt],
    args: &Args,
) -> anyhow::Result<()> {
    let pods = args.pods.iter().copied().max().unwrap_or(1);
    let model = prompts::model(pods);
    let tok = registry.get(&model)?;
    let cache = KeyCache::new(scheme.clone(), kvroute_core::keys::cache::DEFAULT_MAX_BYTES);
    println!(
        "\n(a') where a warm in-process decision goes, {pods} pods, p50 / p99 µs of each stage alone"
    );
    println!(
        "| blocks | tokenize, uncached | tokenize, cached | block keys, uncached | block keys, cached | lookup | EndpointPicker::score |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for prompt in prompts {
        let mut s: [Samples; 6] = Default::default();
        let req = RouteRequest {
            model: model.clone(),
            prompt: ReqPrompt::Text(prompt.text.clone()),
            cache_salt: None,
            chat_template_kwargs: None,
            request_id: None,
        };
        let name = kvroute_core::ids::ModelName::new(&model);
        let warmup = (args.samples / 10).max(1);
        let deadline = Instant::now() + Duration::from_secs_f64(args.cell_seconds);
        // The tokenizer alone, uncached, a few times (it is slow).
        for _ in 0..(args.cold_samples / 4).max(3) {
            let t = Instant::now();
            tok.encode_uncached(&prompt.text, true)?;
            s[5].push(t.elapsed());
        }
        for i in 0..warmup + args.samples {
            let t = Instant::now();
            let ids = tok.encode_completion(&prompt.text)?;
            let d0 = t.elapsed();
            let t = Instant::now();
            let keys = scheme.block_keys(&ids, ExtraKeys::NONE);
            let d1 = t.elapsed();
            let t = Instant::now();
            let cached = cache.block_keys(&ids, ExtraKeys::NONE);
            let d2 = t.elapsed();
            anyhow::ensure!(keys == cached && keys == prompt.keys, "keys differ");
            let t = Instant::now();
            kvroute_core::index::Index::lookup(index, &name, &keys, None).await?;
            let d3 = t.elapsed();
            let t = Instant::now();
            router.score(&req, None).await;
            let d4 = t.elapsed();
            if i >= warmup {
                for (k, d) in [d0, d1, d2, d3, d4].into_iter().enumerate() {
                    s[k].push(d);
                }
                if Instant::now() > deadline {
                    break;
                }
            }
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            prompt.blocks,
            row(&s[5]),
            row(&s[0]),
            row(&s[1]),
            row(&s[2]),
            row(&s[3]),
            row(&s[4])
        );
    }
    Ok(())
}
