//! The scorer's configuration: every flag also reads a `KVROUTE_*`
//! environment variable (the Redis address also llm-d's
//! `KVCACHE_INDEXER_REDIS_ADDR`).

use crate::ext_proc::ExtProcConfig;
use crate::grpc::TlsArgs;
use crate::route::RouteConfig;
use crate::tokenize::{PoolConfig, RemoteConfig, TokenizeConfig};
use kvroute_core::index::LookupMode;
use kvroute_core::scoring::TierWeights;
use kvroute_core::scoring::pick::{LoadLimits, PickWeights};
use kvroute_service::config::{KeyArgs, RedisArgs};
use kvroute_service::duration::parse_duration;
use kvroute_service::telemetry::LogArgs;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `--lookup-mode`: `bisect` or `linear`, listed in `--help`, parsed by
/// [`LookupMode`]'s `FromStr` (kvroute-core has no clap).
fn lookup_mode_parser() -> impl clap::builder::TypedValueParser<Value = LookupMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["bisect", "linear"])
        // Only the two listed values reach the map, and both parse.
        .map(|s| s.parse::<LookupMode>().unwrap_or_default())
}

/// Where requests go and how they are scored.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub ext_proc: ExtProcConfig,
    #[command(flatten)]
    pub tls: TlsArgs,

    /// gRPC address: Envoy ext_proc plus grpc.health.v1 (llm-d uses 9002).
    #[arg(long, env = "KVROUTE_GRPC_ADDR", default_value = "0.0.0.0:9002")]
    pub grpc_addr: SocketAddr,
    /// Optional separate gRPC health address (llm-d uses 9003).
    #[arg(long, env = "KVROUTE_GRPC_HEALTH_ADDR")]
    pub grpc_health_addr: Option<SocketAddr>,
    /// HTTP address: /v1/score, /healthz, /readyz, /metrics.
    #[arg(long, env = "KVROUTE_HTTP_ADDR", default_value = "0.0.0.0:9090")]
    pub http_addr: SocketAddr,

    /// `MODEL=PATH` where PATH is a tokenizer.json or a directory holding it
    /// (and tokenizer_config.json for the chat template). Repeatable.
    #[arg(long = "tokenizer", env = "KVROUTE_TOKENIZER", value_delimiter = ',')]
    pub tokenizer: Vec<String>,
    /// Directories holding models (`<dir>/<org>/<name>/` or a Hugging Face
    /// cache `models--<org>--<name>/snapshots/...`). Repeatable.
    #[arg(long = "models-dir", env = "KVROUTE_MODELS_DIR", value_delimiter = ',')]
    pub models_dir: Vec<PathBuf>,
    /// Threads tokenizing cold prompts at once, off the async workers (0:
    /// one per core). Cached prompts are served inline without a thread.
    #[arg(long, env = "KVROUTE_TOKENIZE_THREADS", default_value_t = 0)]
    pub tokenize_threads: usize,
    /// Cold prompts waiting for a tokenizing thread before more are routed
    /// by load at once (`tokenize_overloaded`).
    #[arg(long, env = "KVROUTE_TOKENIZE_QUEUE", default_value_t = 64)]
    pub tokenize_queue: usize,
    /// Give up on a cold tokenization (waiting included) after this long and
    /// route by load; the work still finishes and warms the caches.
    #[arg(long, env = "KVROUTE_TOKENIZE_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub tokenize_timeout: Duration,
    /// For a model with no local tokenizer, ask a candidate vLLM pod
    /// (`POST /tokenize`) for the ids, cached per exact prompt. Off by
    /// default: it adds a round trip to each new prompt and work on the pods.
    #[arg(long, env = "KVROUTE_REMOTE_TOKENIZE", default_value_t = false)]
    pub remote_tokenize: bool,
    /// How long a decision waits for a pod's `/tokenize` answer.
    #[arg(long, env = "KVROUTE_REMOTE_TOKENIZE_TIMEOUT", default_value = "100ms", value_parser = parse_duration)]
    pub remote_tokenize_timeout: Duration,
    /// `ADAPTER=BASE_MODEL`: a LoRA adapter served on top of a base model. Repeatable.
    #[arg(long = "lora", env = "KVROUTE_LORA", value_delimiter = ',')]
    pub lora: Vec<String>,

    /// Candidate endpoints: `IP:PORT` or `NAME:PORT` (re-resolved), comma separated.
    #[arg(long, env = "KVROUTE_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Re-resolve DNS names among --endpoints this often.
    #[arg(long, env = "KVROUTE_DNS_REFRESH", default_value = "5s", value_parser = parse_duration)]
    pub dns_refresh: Duration,

    /// Weight of the prefix-cache score in the blend.
    #[arg(long, env = "KVROUTE_WEIGHT_PREFIX", default_value_t = 2.0)]
    pub weight_prefix: f64,
    /// Weight of the waiting-queue headroom (vLLM num_requests_waiting).
    #[arg(long, env = "KVROUTE_WEIGHT_QUEUE", default_value_t = 1.0)]
    pub weight_queue: f64,
    /// Weight of KV-cache headroom (1 - vLLM kv_cache_usage_perc).
    #[arg(long, env = "KVROUTE_WEIGHT_KV_USAGE", default_value_t = 1.0)]
    pub weight_kv_usage: f64,
    /// Weight of in-flight headroom (requests routed and not finished).
    #[arg(long, env = "KVROUTE_WEIGHT_IN_FLIGHT", default_value_t = 1.0)]
    pub weight_in_flight: f64,
    /// Weight of the prefill-backlog term: this scorer's in-flight uncached
    /// prompt tokens on a pod plus the request's own, in seconds of
    /// prefill (`--prefill-tokens-per-s`) below `--prefill-horizon-s`.
    #[arg(long, env = "KVROUTE_WEIGHT_TOKENS", default_value_t = kvroute_core::scoring::pick::DEFAULT_TOKENS_WEIGHT)]
    pub weight_tokens: f64,
    /// One pod's prefill throughput in tokens/s (turns pending prompt
    /// tokens into seconds; the default is Llama-3.1-8B on one H100).
    #[arg(long, env = "KVROUTE_PREFILL_TOKENS_PER_S", default_value_t = kvroute_core::scoring::pick::DEFAULT_PREFILL_TOKENS_PER_S)]
    pub prefill_tokens_per_s: f64,
    /// Seconds of prefill backlog at which the prefill term bottoms out.
    #[arg(long, env = "KVROUTE_PREFILL_HORIZON_S", default_value_t = kvroute_core::scoring::pick::DEFAULT_PREFILL_HORIZON_S)]
    pub prefill_horizon_s: f64,
    /// A pod with this many requests in flight is saturated: chosen only
    /// when all are. A running-batch bound (vLLM's `max_num_seqs`), not a
    /// queue one: in-flight requests are mostly decoding.
    #[arg(long, env = "KVROUTE_MAX_IN_FLIGHT", default_value_t = kvroute_core::scoring::pick::DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: u32,
    /// Requests in flight at which the in-flight term bottoms out (a
    /// tie-break among lightly loaded pods; the prefill backlog term ranks
    /// busy ones).
    #[arg(long, env = "KVROUTE_IN_FLIGHT_SCALE", default_value_t = kvroute_core::scoring::pick::DEFAULT_IN_FLIGHT_SCALE)]
    pub in_flight_scale: f64,
    /// A pod with this many waiting requests is saturated.
    #[arg(long, env = "KVROUTE_MAX_WAITING", default_value_t = 16)]
    pub max_waiting: u32,
    /// Tier weights, `gpu=1,cpu=0.8,other=0.5`.
    #[arg(
        long,
        env = "KVROUTE_TIER_WEIGHTS",
        default_value = "gpu=1,cpu=0.8,other=0.5"
    )]
    pub tier_weights: TierWeights,

    /// Give up on an index lookup after this long (route by load).
    #[arg(long, env = "KVROUTE_LOOKUP_TIMEOUT", default_value = "50ms", value_parser = parse_duration)]
    pub lookup_timeout: Duration,
    /// Look up at most this many blocks of a prompt (its first ones). The
    /// default, 8192, covers a 128k-token context at block size 16; a
    /// longer prompt's lookup stops there (counted,
    /// `kvroute_scorer_lookups_capped_total`), so one 2M-token prompt cannot
    /// hold Redis for tens of milliseconds.
    #[arg(long, env = "KVROUTE_MAX_LOOKUP_BLOCKS", default_value_t = crate::route::DEFAULT_MAX_LOOKUP_BLOCKS)]
    pub max_lookup_blocks: usize,
    /// Count a prompt's blocks as held by an endpoint while requests this
    /// replica routed there are computing them (from the decision to the
    /// request's end), before the engine's BlockStored reaches the index:
    /// requests sharing a long prefix that arrive during its first prefill
    /// then follow it instead of each paying the prefill on another pod.
    /// `false` scores by the index alone.
    #[arg(long, env = "KVROUTE_PENDING_PREFIXES", default_value_t = true, action = clap::ArgAction::Set)]
    pub pending_prefixes: bool,
    /// Block keys the pending-prefix records hold at most in all (past
    /// it, decisions are not recorded: counted, routed by the index alone).
    #[arg(long, env = "KVROUTE_PENDING_PREFIX_MAX_BLOCKS", default_value_t = crate::pending::DEFAULT_MAX_BLOCKS)]
    pub pending_prefix_max_blocks: usize,
    /// How the index finds each pod's prefix: `bisect` reads O(pods x log
    /// blocks) blocks and is exact when pods hold prefixes of the prompt
    /// (what vLLM's hash chaining gives); `linear` reads every block of the
    /// matched prefix and is exact on any index content.
    #[arg(long, env = "KVROUTE_LOOKUP_MODE", default_value_t = LookupMode::Bisect, value_parser = lookup_mode_parser())]
    pub lookup_mode: LookupMode,
    /// Scrape each endpoint's vLLM /metrics this often.
    #[arg(long, env = "KVROUTE_SCRAPE_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
    pub scrape_interval: Duration,
    /// Take an endpoint out of the candidates after this many scrapes in a
    /// row that could not reach it (refused, reset, timed out); it is back
    /// at the first scrape it answers. A pod answering with an HTTP error
    /// stays in. When all candidates are down, routing uses all of them.
    /// 0 disables. Default 3: one lost scrape does not flap a pod, and a
    /// dead one is out within ~3 scrape intervals.
    #[arg(long, env = "KVROUTE_DOWN_AFTER_FAILURES", default_value_t = crate::load::DEFAULT_DOWN_AFTER)]
    pub down_after_failures: u32,
    /// Ignore scraped metrics older than this.
    #[arg(long, env = "KVROUTE_METRICS_MAX_AGE", default_value = "2s", value_parser = parse_duration)]
    pub metrics_max_age: Duration,
    /// Share in-flight counts with the other replicas through Redis this often.
    #[arg(long, env = "KVROUTE_IN_FLIGHT_SYNC", default_value = "100ms", value_parser = parse_duration)]
    pub in_flight_sync: Duration,
    /// This replica's name in Redis (default: $HOSTNAME, else a random id).
    #[arg(long, env = "KVROUTE_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Read the ingesters' `kvroute:keying`, `kvroute:models` and
    /// `kvroute:pods` this often (docs/scorer-operations.md, "Keying contract").
    #[arg(long, env = "KVROUTE_KEYING_CHECK_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub keying_check_interval: Duration,
    /// Start even when `kvroute:keying` disagrees with --hash-scheme,
    /// --hash-seed or --block-size (every lookup misses; requests route by
    /// load). Without it such a scorer refuses to start.
    #[arg(long, env = "KVROUTE_ALLOW_KEYING_MISMATCH", default_value_t = false)]
    pub allow_keying_mismatch: bool,
    /// Seed of the random tie-break (default: from the clock).
    #[arg(long, env = "KVROUTE_SEED")]
    pub seed: Option<u64>,
}

impl ServeArgs {
    pub fn route_config(&self) -> Result<RouteConfig, String> {
        let mut adapters = HashMap::new();
        for l in &self.lora {
            let (adapter, base) = l
                .split_once('=')
                .ok_or_else(|| format!("--lora {l:?}: expected ADAPTER=BASE_MODEL"))?;
            adapters.insert(adapter.trim().to_string(), base.trim().to_string());
        }
        Ok(RouteConfig {
            weights: PickWeights {
                prefix: self.weight_prefix,
                queue: self.weight_queue,
                kv_usage: self.weight_kv_usage,
                in_flight: self.weight_in_flight,
                tokens: self.weight_tokens,
            },
            limits: LoadLimits {
                max_in_flight: Some(self.max_in_flight),
                in_flight_scale: self.in_flight_scale,
                max_waiting: Some(self.max_waiting),
                max_kv_usage: None,
                prefill_tokens_per_s: self.prefill_tokens_per_s,
                prefill_horizon_s: self.prefill_horizon_s,
            },
            tiers: self.tier_weights.clone(),
            lookup_timeout: self.lookup_timeout,
            max_lookup_blocks: self.max_lookup_blocks,
            pending_prefixes: self.pending_prefixes,
            pending_max_blocks: self.pending_prefix_max_blocks,
            metrics_max_age: self.metrics_max_age,
            adapters,
            tokenize: TokenizeConfig {
                pool: PoolConfig {
                    threads: self.tokenize_threads,
                    queue: self.tokenize_queue,
                    deadline: self.tokenize_timeout,
                },
                remote: self.remote_tokenize.then(|| RemoteConfig {
                    timeout: self.remote_tokenize_timeout,
                    ..RemoteConfig::default()
                }),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn parses_the_documented_interface() {
        let cli = Cli::try_parse_from([
            "kvroute-scorer",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--grpc-addr",
            "127.0.0.1:9002",
            "--http-addr",
            "127.0.0.1:9090",
            "--hash-scheme",
            "sha256_cbor",
            "--hash-seed",
            "42",
            "--block-size",
            "16",
            "--tokenizer",
            "meta-llama/Llama-3.1-8B=/models/llama/tokenizer.json",
            "--endpoints",
            "127.0.0.11:8000,127.0.0.12:8000",
            "--lora",
            "sql-lora=meta-llama/Llama-3.1-8B",
        ])
        .expect("parse");
        let s = cli.serve;
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.tokenizer.len(), 1);
        let rc = s.route_config().expect("route config");
        assert_eq!(
            rc.adapters.get("sql-lora").map(String::as_str),
            Some("meta-llama/Llama-3.1-8B")
        );
        assert_eq!(rc.lookup_timeout, Duration::from_millis(50));
        assert_eq!(s.lookup_mode, LookupMode::Bisect);
        assert_eq!(rc.tokenize, TokenizeConfig::default());
        let cli = Cli::try_parse_from([
            "x",
            "--tokenize-threads",
            "3",
            "--tokenize-timeout",
            "1s",
            "--remote-tokenize",
            "--remote-tokenize-timeout",
            "40ms",
        ])
        .expect("parse");
        let t = cli.serve.route_config().expect("route config").tokenize;
        assert_eq!((t.pool.threads, t.pool.queue), (3, 64));
        assert_eq!(t.pool.deadline, Duration::from_secs(1));
        assert_eq!(t.remote.map(|r| r.timeout), Some(Duration::from_millis(40)));
        let cli = Cli::try_parse_from(["x", "--lookup-mode", "linear"]).expect("parse");
        assert_eq!(cli.serve.lookup_mode, LookupMode::Linear);
        assert!(Cli::try_parse_from(["x", "--lookup-mode", "fast"]).is_err());
    }

    #[test]
    fn durations_and_bad_lora() {
        // The one grammar both binaries share: minutes work here too.
        let cli = Cli::try_parse_from(["x", "--dns-refresh", "1m"]).expect("parse");
        assert_eq!(cli.serve.dns_refresh, Duration::from_secs(60));
        let cli = Cli::try_parse_from(["x", "--lora", "nobase"]).expect("parse");
        assert!(cli.serve.route_config().is_err());
    }
}
