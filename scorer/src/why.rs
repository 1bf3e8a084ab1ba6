//! `kvroute-scorer why`: the operator's "why did this go there" — for one
//! prompt, which pods hold how many of its blocks, in which tier, read from
//! the same index the scorers use.

use crate::config::ServeArgs;
use anyhow::{Context, bail};
use kvroute_core::index::Index;
use kvroute_core::keys::ExtraKeys;
use kvroute_core::scoring::score_prefixes;
use kvroute_tokens::ChatOptions;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct WhyArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// The model (or LoRA adapter) the request names.
    #[arg(long)]
    pub model: String,
    /// A completion prompt.
    #[arg(long, group = "input")]
    pub prompt: Option<String>,
    /// A file holding a completion prompt.
    #[arg(long, group = "input")]
    pub prompt_file: Option<PathBuf>,
    /// A file holding a chat request body or its `messages` array (JSON).
    #[arg(long, group = "input")]
    pub messages_file: Option<PathBuf>,
    /// Token ids, comma separated.
    #[arg(long, group = "input", value_delimiter = ',')]
    pub token_ids: Option<Vec<u32>>,
    /// vLLM's cache_salt of the request.
    #[arg(long)]
    pub cache_salt: Option<String>,
}

pub async fn run(args: WhyArgs, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let s = &args.serve;
    if s.redis.urls(&env).is_empty() {
        bail!(
            "why reads the shared index: give --redis-url (or KVROUTE_REDIS_URL / KVCACHE_INDEXER_REDIS_ADDR)"
        );
    }
    let keys = s.keys.scheme()?;
    let config = s.route_config().map_err(anyhow::Error::msg)?;
    let (base, lora) = match config.adapters.get(&args.model) {
        Some(b) => (b.clone(), Some(args.model.as_str())),
        None => (args.model.clone(), None),
    };
    let tokens: Vec<u32> = if let Some(ids) = &args.token_ids {
        ids.clone()
    } else {
        let registry = crate::service::tokenizers(s)?;
        let tok = registry
            .get(&base)
            .with_context(|| format!("no tokenizer for {base}: give --tokenizer {base}=PATH"))?;
        if let Some(f) = &args.messages_file {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).context("messages JSON")?;
            let messages = v.get("messages").cloned().unwrap_or(v);
            let messages = messages
                .as_array()
                .context("messages must be a JSON array")?
                .clone();
            tok.encode_chat(&messages, &ChatOptions::default())?
        } else {
            let prompt = match (&args.prompt, &args.prompt_file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?,
                (None, None) => {
                    bail!("give --prompt, --prompt-file, --messages-file or --token-ids")
                }
            };
            tok.encode_completion(&prompt)?
        }
    };
    let extra = ExtraKeys {
        lora,
        cache_salt: args.cache_salt.as_deref(),
    };
    let block_keys = keys.block_keys(&tokens, extra);
    let index = s.redis.open(&env).await?;
    index.set_lookup_mode(s.lookup_mode);
    let lookup = index
        .lookup(&kvroute_core::ids::ModelName::new(&base), &block_keys, None)
        .await?;
    println!(
        "model {base}{}: {} tokens, {} full blocks of {} ({} scheme, seed {:?})",
        lora.map(|l| format!(" (LoRA {l})")).unwrap_or_default(),
        tokens.len(),
        block_keys.len(),
        keys.block_size(),
        keys.scheme(),
        keys.seed()
    );
    if let Some(first) = block_keys.first() {
        println!("first block: redis-cli HKEYS '{base}@{first}'");
    }
    let scores = score_prefixes(&lookup.pods, block_keys.len(), &config.tiers);
    if scores.is_empty() {
        println!("no pod holds the first block: requests for this prompt route by load");
        return Ok(());
    }
    println!("{:<28} {:>8} {:>8}  tiers", "pod", "blocks", "score");
    let mut rows: Vec<_> = lookup.pods.iter().zip(&scores).collect();
    rows.sort_by(|a, b| b.1.normalized.total_cmp(&a.1.normalized));
    for (p, sc) in rows {
        let tiers: Vec<String> = p.tiers.iter().map(|(t, d)| format!("{t}:{d}")).collect();
        println!(
            "{:<28} {:>8} {:>8.3}  {}",
            p.pod.as_str(),
            p.depth,
            sc.normalized,
            tiers.join(" ")
        );
    }
    Ok(())
}
