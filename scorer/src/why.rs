//! `kvroute-scorer why`: the operator's "why did this go there" — for one
//! prompt, which pods hold how many of its blocks, in which tier, read from
//! the same index the scorers use, through the router's own prefix stage
//! ([`crate::prefix`]: same model resolution, tokenization paths, keys,
//! lookup deadline and tier weights).

use crate::candidates::Candidates;
use crate::config::ServeArgs;
use crate::decide::{Prompt, RouteRequest};
use crate::prefix::{PrefixError, PrefixLookup};
use crate::reason::Fallback;
use crate::tokenize::Tokenize;
use anyhow::{Context, bail};
use kvroute_core::keys::KeyCache;
use std::path::PathBuf;
use std::sync::Arc;

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
    let request = route_request(&args)?;
    // Remote tokenization (when on) asks a configured pod, as the router does.
    let candidates = Candidates::new(&s.endpoints).context("--endpoints")?;
    let endpoints = candidates.for_request(None);
    let index = s.redis.open(&env).await?;
    index.set_lookup_mode(s.lookup_mode);
    let registry = crate::service::tokenizers(s)?;
    if !matches!(request.prompt, Prompt::TokenIds(_)) {
        // Loaded before the clock starts, as a serving scorer has its
        // tokenizers loaded by the time it matters: a first load can take
        // longer than --tokenize-timeout. A model without one fails below.
        let base = config.adapters.get(&args.model).unwrap_or(&args.model);
        let _ = registry.get(base);
    }
    let cache = KeyCache::new(keys.clone(), kvroute_core::keys::cache::DEFAULT_MAX_BYTES);
    let tokenize = Tokenize::new(registry, cache, config.tokenize.clone());
    // The router's own path: what is printed is what a decision would see.
    let prefixes = PrefixLookup::new(Arc::new(index), Arc::new(tokenize), &config);
    let found = prefixes.lookup(&request, &endpoints).await;
    let (base, lora) = (&found.base, found.lora.as_deref());
    let pods = match found.pods {
        Ok(pods) => pods,
        Err(PrefixError::Tokenize(Fallback::NoTokenizer)) => {
            bail!("no tokenizer for {base}: give --tokenizer {base}=PATH")
        }
        Err(e) => bail!(
            "{e}: requests for this prompt route by load ({})",
            e.fallback()
        ),
    };
    println!(
        "model {base}{}: {} full blocks of {} ({} scheme, seed {:?})",
        lora.map(|l| format!(" (LoRA {l})")).unwrap_or_default(),
        found.keys.len(),
        keys.block_size(),
        keys.scheme(),
        keys.seed()
    );
    if let Some(first) = found.keys.first() {
        println!("first block: redis-cli HKEYS '{base}@{first}'");
    }
    if pods.is_empty() {
        println!("no pod holds the first block: requests for this prompt route by load");
        return Ok(());
    }
    println!("{:<28} {:>8} {:>8}  tiers", "pod", "blocks", "score");
    let mut rows = pods;
    rows.sort_by(|a, b| b.score.normalized.total_cmp(&a.score.normalized));
    for p in rows {
        let tiers: Vec<String> = p
            .prefix
            .tiers
            .iter()
            .map(|(t, d)| format!("{t}:{d}"))
            .collect();
        println!(
            "{:<28} {:>8} {:>8.3}  {}",
            p.prefix.pod.as_str(),
            p.prefix.depth,
            p.score.normalized,
            tiers.join(" ")
        );
    }
    Ok(())
}

/// The request the router would get for this prompt.
fn route_request(args: &WhyArgs) -> anyhow::Result<RouteRequest> {
    let read = |f: &PathBuf| {
        std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
    };
    let mut chat_template_kwargs = None;
    let prompt = if let Some(ids) = &args.token_ids {
        Prompt::TokenIds(ids.clone())
    } else if let Some(f) = &args.messages_file {
        let v: serde_json::Value = serde_json::from_str(&read(f)?).context("messages JSON")?;
        chat_template_kwargs = v.get("chat_template_kwargs").cloned();
        let messages = v.get("messages").cloned().unwrap_or(v);
        let messages = messages
            .as_array()
            .context("messages must be a JSON array")?
            .clone();
        Prompt::Chat(messages)
    } else {
        match (&args.prompt, &args.prompt_file) {
            (Some(p), _) => Prompt::Text(p.clone()),
            (None, Some(f)) => Prompt::Text(read(f)?),
            (None, None) => bail!("give --prompt, --prompt-file, --messages-file or --token-ids"),
        }
    };
    Ok(RouteRequest {
        model: args.model.clone(),
        prompt,
        cache_salt: args.cache_salt.clone(),
        chat_template_kwargs,
        request_id: None,
    })
}
