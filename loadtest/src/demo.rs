//! `kvroute-loadtest demo`: the index at work, end to end in one process.
//!
//! Three simulated vLLM pods publish KV events for a shared system prompt and
//! their own conversations, encoded exactly as vLLM encodes them (both
//! generations); each batch is decoded, keyed from its token ids and written
//! through the Redis index (a throwaway `redis-server` unless `--redis-url`
//! is given). The demo then shows what an operator sees with `redis-cli`,
//! which pod each prompt would go to and why, and a pod being cleared.

use anyhow::{Context, bail};
use kvroute_core::events::{
    BlockHash, BlockStored, Encoding, EventBatch, KvEvent, decode_batch, encode_batch, parse_topic,
};
use kvroute_core::ids::BlockKey;
use kvroute_core::index::{Index, IndexOp, StoredBlock};
use kvroute_core::keys::{ExtraKeys, HashScheme, KeyScheme};
use kvroute_core::scoring::{TierWeights, score_prefixes};
use kvroute_redis::RedisIndex;
use kvroute_testkit::redis_server::RedisServer;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Use this Redis instead of starting a throwaway one (the demo writes
    /// under the model name `demo/llama-3-8b`).
    #[arg(long)]
    redis_url: Option<String>,
    /// Keep the throwaway Redis running until Enter is pressed, to explore it
    /// with redis-cli.
    #[arg(long)]
    keep: bool,
}

const MODEL: &str = "demo/llama-3-8b";
const BLOCK: usize = 16;

/// Token ids of a synthetic prompt: `n` tokens derived from `seed`.
fn tokens(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (seed.wrapping_mul(7919) + i * 31) % 128_000)
        .collect()
}

fn redis_cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .context("running redis-cli (install redis-tools)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let (server, url) = match &args.redis_url {
        Some(u) => (None, u.clone()),
        None => {
            let s = RedisServer::start().context("starting redis-server (install redis-server)")?;
            let url = s.url();
            (Some(s), url)
        }
    };
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').split('/').next())
        .and_then(|p| p.parse().ok())
        .context("port of the Redis URL")?;
    println!("== Redis at {url}");
    let index = RedisIndex::connect(&url).await?;
    let keys = KeyScheme::new(HashScheme::Sha256Cbor, "vllm-none-hash", BLOCK)?;

    // A 512-token system prompt shared by every conversation.
    let system = tokens(1, 512);
    let conversation = |seed: u32| [system.clone(), tokens(seed, 256)].concat();
    let pods = [
        (
            "127.0.0.11:8000",
            vec![conversation(100), conversation(101)],
            Encoding::Map,
        ),
        ("127.0.0.12:8000", vec![system.clone()], Encoding::Array),
        ("127.0.0.13:8000", vec![tokens(900, 320)], Encoding::Map),
    ];

    println!("\n== vLLM pods publish KV events (msgpack EventBatch, both encodings)");
    for (seq, (pod, prompts, encoding)) in pods.iter().enumerate() {
        let topic = format!("kv@{pod}@{MODEL}");
        let events: Vec<KvEvent> = prompts
            .iter()
            .map(|p| {
                let hashes = keys.block_keys(p, ExtraKeys::NONE);
                KvEvent::BlockStored(BlockStored {
                    block_hashes: hashes.iter().map(|k| BlockHash::U64(k.0)).collect(),
                    token_ids: p[..hashes.len() * BLOCK].to_vec(),
                    block_size: BLOCK as u32,
                    ..BlockStored::default()
                })
            })
            .collect();
        let payload = encode_batch(
            &EventBatch {
                ts: 1.7e9,
                events,
                data_parallel_rank: None,
            },
            *encoding,
        );
        // What the ingester does with the three frames.
        let parsed = parse_topic(&topic)?;
        let batch = decode_batch(&payload)?;
        let pod_id = parsed.pod_id(batch.data_parallel_rank);
        let mut ops = Vec::new();
        let mut blocks = 0;
        for ev in &batch.events {
            let KvEvent::BlockStored(s) = ev else {
                continue;
            };
            let computed = keys.block_keys(&s.token_ids, ExtraKeys::NONE);
            let agree = computed
                .iter()
                .zip(s.engine_hashes())
                .filter(|(k, e)| k.0 == e.0)
                .count();
            blocks += computed.len();
            println!(
                "   {topic} seq={seq} {:?}: {} blocks, engine hash == key for {agree}",
                encoding,
                computed.len()
            );
            ops.push(IndexOp::Store {
                model: parsed.model.clone(),
                pod: pod_id.clone(),
                tier: s.tier(),
                blocks: computed
                    .iter()
                    .zip(s.engine_hashes())
                    .map(|(&key, e)| StoredBlock {
                        key,
                        engine: Some(e),
                    })
                    .collect(),
            });
        }
        index.apply(&ops).await?;
        println!("   -> {blocks} (block, pod) entries written in one round trip");
    }

    let first = keys.block_keys(&system, ExtraKeys::NONE)[0];
    println!("\n== What an operator sees");
    println!("$ redis-cli --scan --pattern '{MODEL}@*' | wc -l");
    let scan = redis_cli(port, &["--scan", "--pattern", &format!("{MODEL}@*")])?;
    println!("{}", scan.lines().count());
    println!("$ redis-cli HKEYS '{MODEL}@{first}'");
    print!(
        "{}",
        redis_cli(port, &["HKEYS", &format!("{MODEL}@{first}")])?
    );

    let prompts = [
        (
            "conversation 100, next turn",
            [conversation(100), tokens(5, 64)].concat(),
        ),
        (
            "a new conversation",
            [system.clone(), tokens(777, 200)].concat(),
        ),
        ("an unrelated prompt", tokens(4242, 300)),
    ];
    show_lookups(&index, &keys, &prompts).await?;

    println!("\n== 127.0.0.11:8000 restarts (AllBlocksCleared): its entries go, without SCAN");
    index
        .apply(&[IndexOp::ClearPod {
            pod: kvroute_core::ids::PodId::new("127.0.0.11:8000"),
        }])
        .await?;
    println!("$ redis-cli HKEYS '{MODEL}@{first}'");
    print!(
        "{}",
        redis_cli(port, &["HKEYS", &format!("{MODEL}@{first}")])?
    );
    show_lookups(&index, &keys, &prompts[..1]).await?;

    if args.keep && server.is_some() {
        println!(
            "\nRedis stays up at {url} (try: redis-cli -p {port} --scan). Press Enter to stop."
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
    }
    drop(server);
    Ok(())
}

async fn show_lookups(
    index: &RedisIndex,
    keys: &KeyScheme,
    prompts: &[(&str, Vec<u32>)],
) -> anyhow::Result<()> {
    println!("\n== Where prompts would go (longest cached prefix, tier-weighted)");
    for (name, prompt) in prompts {
        let ks: Vec<BlockKey> = keys.block_keys(prompt, ExtraKeys::NONE);
        let lookup = index
            .lookup(&kvroute_core::ids::ModelName::new(MODEL), &ks, None)
            .await?;
        let scores = score_prefixes(&lookup.pods, ks.len(), &TierWeights::default());
        println!(
            "   {name} ({} blocks, {} read):",
            ks.len(),
            lookup.blocks_examined
        );
        if scores.is_empty() {
            println!("      no pod holds its first block -> route by load");
        }
        for s in &scores {
            println!(
                "      {:<18} {:>3} blocks cached  score {:.2}",
                s.pod.as_str(),
                s.blocks,
                s.normalized
            );
        }
        let best = scores.iter().map(|s| s.normalized).fold(0.0, f64::max);
        let top: Vec<&str> = scores
            .iter()
            .filter(|s| s.normalized == best)
            .map(|s| s.pod.as_str())
            .collect();
        match top.as_slice() {
            [] => {}
            [one] => println!("      -> {one}"),
            many => println!("      -> tie between {}: load decides", many.join(", ")),
        }
    }
    if prompts.is_empty() {
        bail!("no prompts");
    }
    Ok(())
}
