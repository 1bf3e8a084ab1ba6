//! Command-line and environment configuration groups both binaries flatten
//! into their own `Config`, so a flag means the same thing everywhere.
//!
//! Every flag also reads a `KVROUTE_*` environment variable. The Redis
//! address additionally accepts llm-d's `KVCACHE_INDEXER_REDIS_ADDR`, so an
//! llm-d deployment's configuration points kvroute at the same index. Tests
//! build configs with `try_parse_from` and pass environment lookups as
//! closures, never touching the process environment.

use kvroute_core::index::IndexError;
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::keys::{HashScheme, KeyError, KeyScheme};
use kvroute_redis::AnyIndex;
use kvroute_redis::{RedisIndex, TlsFiles};
use std::path::PathBuf;

/// Environment variable llm-d's indexer reads its Redis address from.
pub const LLMD_REDIS_ENV: &str = "KVCACHE_INDEXER_REDIS_ADDR";

/// How block keys are computed: must match the fleet's vLLM configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// vLLM's `--prefix-caching-hash-algo`: sha256_cbor (vLLM >= 0.11) or
    /// sha256_cbor_64bit (vLLM 0.10).
    #[arg(long, env = "KVROUTE_HASH_SCHEME", default_value = "sha256_cbor")]
    pub hash_scheme: HashScheme,
    /// vLLM's PYTHONHASHSEED (vLLM >= 0.11 uses "vllm-none-hash" when unset).
    #[arg(long, env = "KVROUTE_HASH_SEED", default_value = "vllm-none-hash")]
    pub hash_seed: String,
    /// vLLM's `--block-size`.
    #[arg(long, env = "KVROUTE_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
}

impl KeyArgs {
    pub fn scheme(&self) -> Result<KeyScheme, KeyError> {
        KeyScheme::new(self.hash_scheme, &self.hash_seed, self.block_size)
    }
}

/// Where the index lives.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis URL (`redis://[[user]:password@]host:port[/db]`, `rediss://` for
    /// TLS; `host:port` is accepted). Repeat it, or separate URLs by commas,
    /// to list Redis Cluster seed nodes; when the value holds URLs, only a
    /// comma before `redis://` or `rediss://` separates them, so a password
    /// may contain commas. Without it the embedded in-memory index is used,
    /// which is only useful inside one process. The value may hold a
    /// password: `--help` does not print it from the environment.
    #[arg(long = "redis-url", env = "KVROUTE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Vec<String>,
    /// Treat the Redis address(es) as a Redis Cluster (implied by several URLs).
    #[arg(long, env = "KVROUTE_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// PEM file of the CA certificate(s) that sign the Redis server's
    /// certificate (`rediss://` only; default: the system trust store).
    #[arg(long, env = "KVROUTE_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,
    /// PEM client certificate for Redis servers that require mutual TLS
    /// (`tls-auth-clients yes`); needs `--redis-tls-key`.
    #[arg(long, env = "KVROUTE_REDIS_TLS_CERT", requires = "redis_tls_key")]
    pub redis_tls_cert: Option<PathBuf>,
    /// PEM private key of `--redis-tls-cert`.
    #[arg(long, env = "KVROUTE_REDIS_TLS_KEY", requires = "redis_tls_cert")]
    pub redis_tls_key: Option<PathBuf>,
    /// Capacity of the in-memory index in blocks (when no Redis is configured).
    #[arg(long, env = "KVROUTE_MEMORY_BLOCKS", default_value_t = 4_000_000)]
    pub memory_blocks: usize,
}

impl RedisArgs {
    /// The Redis URLs to use, taking llm-d's variable when no URL was given.
    /// `env` looks up an environment variable (the process environment in
    /// binaries, a map in tests).
    pub fn urls(&self, env: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let raw: Vec<String> = if self.redis_url.is_empty() {
            env(LLMD_REDIS_ENV).map(|v| vec![v]).unwrap_or_default()
        } else {
            self.redis_url.clone()
        };
        raw.iter()
            .flat_map(|v| split_urls(v))
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(normalize_url)
            .collect()
    }

    /// Whether the URLs name a cluster.
    pub fn is_cluster(&self, urls: &[String]) -> bool {
        self.redis_cluster || urls.len() > 1
    }

    /// Reads the TLS files named by the flags.
    pub fn tls_files(&self) -> Result<TlsFiles, IndexError> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| {
                IndexError::Config(format!(
                    "cannot read the Redis TLS {what} {}: {e}",
                    p.display()
                ))
            })
        };
        Ok(TlsFiles {
            ca: self
                .redis_tls_ca
                .as_ref()
                .map(|p| read(p, "CA file"))
                .transpose()?,
            client: match (&self.redis_tls_cert, &self.redis_tls_key) {
                (Some(c), Some(k)) => Some((read(c, "certificate")?, read(k, "key")?)),
                _ => None,
            },
        })
    }

    /// Opens the configured index: Redis (single node or cluster) when an
    /// address is configured, else the embedded memory index.
    /// [`IndexError::Config`] means retrying cannot help (bad URL,
    /// credentials, ACL, TLS files or certificates): callers exit on it.
    pub async fn open(&self, env: impl Fn(&str) -> Option<String>) -> Result<AnyIndex, IndexError> {
        let urls = self.urls(env);
        if urls.is_empty() {
            return Ok(AnyIndex::Memory(MemoryIndex::new(self.memory_blocks)));
        }
        let tls = self.tls_files()?;
        let index = if self.is_cluster(&urls) {
            RedisIndex::connect_cluster_with(&urls, &tls).await?
        } else {
            RedisIndex::connect_with(&urls[0], &tls).await?
        };
        Ok(AnyIndex::Redis(index))
    }

    /// The configured address with any password hidden, for startup logs.
    pub fn describe(&self, env: impl Fn(&str) -> Option<String>) -> String {
        let urls = self.urls(env);
        if urls.is_empty() {
            return format!("memory (capacity {} blocks)", self.memory_blocks);
        }
        urls.iter().map(|u| redact(u)).collect::<Vec<_>>().join(",")
    }
}

/// Splits a list of seeds. Bare `host:port` lists (llm-d's form, no
/// credentials possible) split at every comma; a value holding URLs splits
/// only before `redis://` / `rediss://`, because a password may contain a
/// comma (URL userinfo allows it unescaped) and splitting there would leak
/// half of it into a "seed" and the logs.
fn split_urls(value: &str) -> Vec<&str> {
    if !value.contains("://") {
        return value.split(',').collect();
    }
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        let rest = &value[i + 1..];
        let rest = rest.trim_start();
        if rest.starts_with("redis://") || rest.starts_with("rediss://") {
            out.push(&value[start..i]);
            start = i + 1;
        }
    }
    out.push(&value[start..]);
    out
}

/// `redis://user:secret@host` -> `redis://user:***@host`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// `host:port` (llm-d's form) -> `redis://host:port`; URLs pass unchanged.
fn normalize_url(s: &str) -> String {
    if s.contains("://") {
        s.to_string()
    } else {
        format!("redis://{s}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        redis: RedisArgs,
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_match_current_vllm() {
        let cli = Cli::try_parse_from(["x"]).expect("parse");
        assert_eq!(cli.keys.hash_scheme, HashScheme::Sha256Cbor);
        assert_eq!(cli.keys.hash_seed, "vllm-none-hash");
        assert_eq!(cli.keys.block_size, 16);
        assert!(cli.redis.urls(no_env).is_empty());
    }

    #[test]
    fn llmd_address_is_an_alias() {
        let cli = Cli::try_parse_from(["x"]).expect("parse");
        let env = |k: &str| (k == LLMD_REDIS_ENV).then(|| "127.0.0.1:6379".to_string());
        assert_eq!(
            cli.redis.urls(env),
            vec!["redis://127.0.0.1:6379".to_string()]
        );
        let cli =
            Cli::try_parse_from(["x", "--redis-url", "redis://127.0.0.2:7000"]).expect("parse");
        assert_eq!(
            cli.redis.urls(env),
            vec!["redis://127.0.0.2:7000".to_string()]
        );
    }

    #[test]
    fn a_comma_in_a_password_does_not_split_the_url() {
        let cli = Cli::try_parse_from(["x", "--redis-url", "redis://:pa,ss@127.0.0.1:6379/0"])
            .expect("parse");
        let urls = cli.redis.urls(no_env);
        assert_eq!(urls, vec!["redis://:pa,ss@127.0.0.1:6379/0".to_string()]);
        assert!(!cli.redis.is_cluster(&urls));
        assert_eq!(cli.redis.describe(no_env), "redis://:***@127.0.0.1:6379/0");
        // The same through the environment variable llm-d sets.
        let cli = Cli::try_parse_from(["x"]).expect("parse");
        let env = |k: &str| (k == LLMD_REDIS_ENV).then(|| "rediss://u:a,b@127.0.0.1:1".to_string());
        assert_eq!(
            cli.redis.urls(env),
            vec!["rediss://u:a,b@127.0.0.1:1".to_string()]
        );
        // Seeds with credentials still split before each scheme.
        let cli = Cli::try_parse_from([
            "x",
            "--redis-url",
            "redis://:p,q@127.0.0.1:7000, redis://:p,q@127.0.0.1:7001",
        ])
        .expect("parse");
        assert_eq!(
            cli.redis.urls(no_env),
            vec![
                "redis://:p,q@127.0.0.1:7000".to_string(),
                "redis://:p,q@127.0.0.1:7001".to_string()
            ]
        );
    }

    #[test]
    fn help_hides_the_redis_url_from_the_environment() {
        // The binaries' tests run `--help` with a password in the variable.
        use clap::CommandFactory;
        let cmd = Cli::command();
        let url = cmd
            .get_arguments()
            .find(|a| a.get_id() == "redis_url")
            .expect("redis_url");
        assert!(url.is_hide_env_values_set());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://:s3cret@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://u:p@h:1"), "redis://u:***@h:1");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn several_urls_mean_a_cluster() {
        let cli = Cli::try_parse_from([
            "x",
            "--redis-url",
            "127.0.0.1:7000,127.0.0.1:7001",
            "--hash-scheme",
            "sha256_cbor_64bit",
        ])
        .expect("parse");
        let urls = cli.redis.urls(no_env);
        assert_eq!(urls.len(), 2);
        assert!(cli.redis.is_cluster(&urls));
        assert_eq!(cli.keys.hash_scheme, HashScheme::Sha256Cbor64);
        assert!(Cli::try_parse_from(["x", "--hash-scheme", "xxhash"]).is_err());
    }
}
