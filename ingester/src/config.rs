//! The ingester's configuration: every flag also reads a `KVROUTE_*`
//! environment variable (the Redis address also llm-d's
//! `KVCACHE_INDEXER_REDIS_ADDR`).

use kvroute_service::config::{KeyArgs, RedisArgs};
use kvroute_service::duration::parse_duration;
use kvroute_service::telemetry::LogArgs;
use std::net::SocketAddr;
use std::time::Duration;

/// `kvroute-ingester`: vLLM KV events from ZeroMQ into the block index.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub log: LogArgs,

    /// Bind a SUB socket here; vLLM pods connect to it (their
    /// `--kv-events-config` endpoint). Repeatable. `tcp://*:P` is accepted.
    #[arg(long = "zmq-bind", env = "KVROUTE_ZMQ_BIND", value_delimiter = ',')]
    pub zmq_bind: Vec<String>,
    /// Dial a publisher: `tcp://HOST:PORT`, where HOST may be a DNS name that
    /// is re-resolved (e.g. a headless Service listing every pod). Repeatable.
    #[arg(
        long = "zmq-connect",
        env = "KVROUTE_ZMQ_CONNECT",
        value_delimiter = ','
    )]
    pub zmq_connect: Vec<String>,
    /// Topic prefix to subscribe to (vLLM's default topic is empty; llm-d
    /// deployments publish `kv@<pod>@<model>`).
    #[arg(long, env = "KVROUTE_TOPIC_FILTER", default_value = "kv@")]
    pub topic_filter: String,
    /// Re-resolve DNS names of `--zmq-connect` this often.
    #[arg(long, env = "KVROUTE_DNS_REFRESH", default_value = "10s", value_parser = parse_duration)]
    pub dns_refresh: Duration,
    /// Number of ingester replicas sharing the `--zmq-connect` publishers.
    #[arg(long, env = "KVROUTE_REPLICAS", default_value_t = 1)]
    pub replicas: u32,
    /// This replica's ordinal (0-based); defaults to the numeric suffix of
    /// $HOSTNAME (a StatefulSet pod name), else 0.
    #[arg(long, env = "KVROUTE_REPLICA_ORDINAL")]
    pub replica_ordinal: Option<u32>,
    /// Replay endpoint of each publisher for refilling sequence gaps, with
    /// `{host}` standing for the pod's IP, e.g. `tcp://{host}:5558`
    /// (vLLM's `replay_endpoint`); data-parallel rank r is asked at the
    /// port + r, where vLLM binds it. Without it gaps are counted and logged.
    /// Also used to rebuild a pod whose operations were dropped during a
    /// Redis outage, from what vLLM still buffers, once it has been cleared.
    #[arg(long, env = "KVROUTE_REPLAY_ENDPOINT")]
    pub replay_endpoint: Option<String>,
    /// Give up on a replay after this long.
    #[arg(long, env = "KVROUTE_REPLAY_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub replay_timeout: Duration,
    /// Gap replays running at once over all workers. Replays run beside the
    /// workers (other pods never wait for one); each holds a socket and up to
    /// vLLM's replay buffer in memory, hence a bound.
    #[arg(long, env = "KVROUTE_REPLAY_CONCURRENCY", default_value_t = 8)]
    pub replay_concurrency: usize,
    /// Longest a gap replay may take, waiting for a replay slot included;
    /// the stream's live batches are held meanwhile. Above --replay-timeout
    /// so a replay that queued briefly still gets its full timeout.
    #[arg(long, env = "KVROUTE_REPLAY_BUDGET", default_value = "5s", value_parser = parse_duration)]
    pub replay_budget: Duration,
    /// After a failed replay, a pod's gaps are counted but not replayed for
    /// this long: an unreachable replay host costs one timeout per cooldown,
    /// not one per gap.
    #[arg(long, env = "KVROUTE_REPLAY_COOLDOWN", default_value = "30s", value_parser = parse_duration)]
    pub replay_cooldown: Duration,
    /// Live batches a stream holds while its gap is replayed; more are
    /// dropped and counted (kvroute_ingester_replay_overflow_total) and show
    /// as a later gap. 1024 is seconds of a busy pod's engine steps.
    #[arg(long, env = "KVROUTE_REPLAY_MAX_HELD", default_value_t = 1024)]
    pub replay_max_held: usize,
    /// A sequence gap of more batches than this is implausible (a spoofed
    /// or corrupt sequence, e.g. seq + 2^63): the batch is skipped and counted
    /// (kvroute_ingester_malformed_total{reason="seq_jump"}) and changes
    /// nothing; if the stream continues from it, it is taken as a new stream
    /// (the pod cleared). vLLM replays at most its buffer (10,000 batches by
    /// default) and steps at most a few hundred batches a second, so a
    /// million is over an hour of a busy pod, far past anything replayable.
    #[arg(long, env = "KVROUTE_MAX_SEQ_GAP", default_value_t = 1_000_000)]
    pub max_seq_gap: u64,
    /// A batch stamped (vLLM's `ts`, its wall clock) further than this
    /// before or after the ingester's clock is skipped and counted
    /// (reason="bad_timestamp"): `ts=1.0` would add 1.8e9 s to the lag
    /// histogram. One hour is far beyond clock drift under NTP and any
    /// queueing the bounded pipeline allows.
    #[arg(long, env = "KVROUTE_MAX_CLOCK_SKEW", default_value = "1h", value_parser = parse_duration)]
    pub max_clock_skew: Duration,
    /// Publisher streams (topic and data-parallel rank) tracked over all
    /// workers; past it the stream idle longest is forgotten (counted in
    /// kvroute_ingester_topics_evicted_total; its next batch counts as a
    /// first one). Per-topic state is a few hundred bytes plus the index
    /// client's per-pod cache; 10,000 is far above any one fleet's pods.
    #[arg(long, env = "KVROUTE_MAX_TOPICS", default_value_t = 10_000)]
    pub max_topics: usize,
    /// Warn (once per silent period; counted as
    /// kvroute_ingester_topic_warnings_total{reason="nothing_received"})
    /// when publishers stay connected this long and no message arrives: the
    /// sign of a topic outside --topic-filter such as vLLM's default empty
    /// one, which the publisher itself filters out. Idle pods publish
    /// nothing either, hence minutes.
    #[arg(long, env = "KVROUTE_WARN_SILENT_PUBLISHERS_AFTER", default_value = "5m", value_parser = parse_duration)]
    pub warn_silent_publishers_after: Duration,
    /// `/readyz` fails (check `pipeline`) once the dispatcher has waited this
    /// long on a full worker queue, or a worker with queued batches has taken
    /// none for this long: the index is falling behind every pod on it.
    #[arg(long, env = "KVROUTE_STALL_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub stall_after: Duration,

    /// Largest ZeroMQ message (all frames together) a publisher or replay
    /// socket may send, in bytes (suffixes KiB, MiB, GiB). A frame header
    /// declaring more is rejected before anything is allocated for it, the
    /// connection is dropped, logged and counted
    /// (`kvroute_ingester_zmq_rejected_total{reason="too_large"}`). vLLM
    /// sends one batch per engine step; measured with vLLM's encoding
    /// (32-byte hashes, a 152k vocabulary, as many evictions as stores) a
    /// step costs 8.4 bytes per scheduled token: 70 KB at vLLM's default
    /// 8,192-token step, 1.1 MB at 131,072, 8.8 MB at 1,048,576. 16 MiB
    /// keeps a 1M-token step with room to spare; worst-case memory of
    /// partly received messages is this times the connections open.
    #[arg(long, env = "KVROUTE_ZMQ_MAX_MESSAGE_SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub zmq_max_message_size: usize,
    /// Bind mode: an accepted connection must finish the ZMTP handshake
    /// (greeting and READY) within this, or it is closed and counted
    /// (`reason="handshake_timeout"`). libzmq completes it in one round
    /// trip; the margin is for a loaded node.
    #[arg(long, env = "KVROUTE_ZMQ_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub zmq_handshake_timeout: Duration,
    /// Payload bytes of batches held while the index is not reachable yet at
    /// startup (the sockets are up before it); applied in order once Redis
    /// answers. Past it new batches are dropped, counted
    /// (`kvroute_ingester_startup_dropped_batches_total`) and handled as a
    /// sequence gap (replayed with `--replay-endpoint`). 64 MiB holds some
    /// 10,000 busy engine steps.
    #[arg(long, env = "KVROUTE_STARTUP_BUFFER", default_value = "64MiB", value_parser = parse_size)]
    pub startup_buffer: usize,
    /// How often the ingester checks that Redis kept its data (`kvroute:epoch`:
    /// a restart empty or from an older dump clears and rebuilds this
    /// ingester's pods), and stamps `kvroute:models`. One small pipeline.
    #[arg(long, env = "KVROUTE_REDIS_EPOCH_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub redis_epoch_interval: Duration,
    /// Bind mode: connections each `--zmq-bind` address keeps at once
    /// (handshaking or established); one beyond it is closed at once and
    /// counted (`reason="too_many_connections"`). Each vLLM data-parallel
    /// rank holds one: raise it for more publishers per replica.
    #[arg(long, env = "KVROUTE_ZMQ_MAX_CONNECTIONS", default_value_t = 256)]
    pub zmq_max_connections: usize,

    /// Admin and observability HTTP address (/healthz, /readyz, /metrics, /admin/purge).
    /// On every interface by default, for Kubernetes probes and Prometheus;
    /// `/admin/*` answers only a loopback peer or `--admin-token`.
    #[arg(long, env = "KVROUTE_HTTP_ADDR", default_value = "0.0.0.0:9100")]
    pub http_addr: SocketAddr,
    /// Bearer token that authorizes `/admin/*` from any peer
    /// (`Authorization: Bearer <token>`, compared in constant time). Unset:
    /// only loopback peers may call them.
    #[arg(long, env = "KVROUTE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Whether a loopback peer may call `/admin/*` without the token
    /// (`kubectl exec ... curl localhost:9100/admin/purge`). Set false behind
    /// a sidecar proxy that forwards outside traffic from loopback.
    #[arg(long, env = "KVROUTE_ADMIN_ALLOW_LOOPBACK", default_value_t = true, action = clap::ArgAction::Set)]
    pub admin_allow_loopback: bool,

    /// Ordering workers (each pod's events stay on one).
    #[arg(long, env = "KVROUTE_WORKERS", default_value_t = 4)]
    pub workers: usize,
    /// Queue length per worker, in batches.
    #[arg(long, env = "KVROUTE_QUEUE", default_value_t = 1024)]
    pub queue: usize,
    /// Payload bytes all worker queues may hold together (suffixes KiB, MiB,
    /// GiB); past it the sockets wait. The queues bound batches by count and
    /// one batch may reach --zmq-max-message-size, so without this bound
    /// --queue x --workers x 16 MiB (64 GiB at the defaults) could queue. At
    /// vLLM's ~70 KB per default engine step, 256 MiB is several thousand
    /// batches, more than the queues hold.
    #[arg(long, env = "KVROUTE_MAX_QUEUED_BYTES", default_value = "256MiB", value_parser = parse_size)]
    pub max_queued_bytes: usize,
    /// Operations a worker holds while the index is unreachable; past this
    /// the oldest pod's operations are dropped and the pod is rebuilt later.
    #[arg(long, env = "KVROUTE_MAX_PENDING_OPS", default_value_t = 100_000)]
    pub max_pending_ops: usize,
    /// Index writes in flight per worker. Writes in flight carry different
    /// pods (one pod's operations are written one write after the other, so
    /// they apply in publication order on any backend), and the worker keeps
    /// keying batches while they run.
    #[arg(long, env = "KVROUTE_MAX_INFLIGHT_WRITES", default_value_t = 4)]
    pub max_inflight_writes: usize,
    /// Chain states remembered to continue chains from `parent_block_hash`.
    /// Each costs ~350 bytes of resident memory (measured: `cargo run -p
    /// kvroute-ingester --example chain_cache_rss`), so the default 500,000
    /// is ~180 MB; size it to the blocks your pods hold at once (sum of
    /// their KV-cache blocks) if chains continue across evictions.
    #[arg(long, env = "KVROUTE_CHAIN_CACHE", default_value_t = 500_000)]
    pub chain_cache: u64,
    /// Grace period to drain queues on SIGTERM.
    #[arg(long, env = "KVROUTE_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Purge a pod once the `--zmq-connect` endpoint it was heard on has been
    /// out of the connect set (DNS, replica shard) this long; pods heard in
    /// bind mode are not affected (see `--purge-silent-after`). Unset: never.
    #[arg(long, env = "KVROUTE_PURGE_AFTER", value_parser = parse_duration)]
    pub purge_after: Option<Duration>,
    /// Purge a pod that has published nothing for this long (bind mode's
    /// only signal that a pod went away; in connect mode a connected pod
    /// counts as alive). vLLM publishes only when its cache changes, so an
    /// idle bind-mode pod is silent too and loses its entries until it stores
    /// again: set this above the longest idle period worth routing for.
    /// Unset (the default): never.
    #[arg(long, env = "KVROUTE_PURGE_SILENT_AFTER", value_parser = parse_duration)]
    pub purge_silent_after: Option<Duration>,
}

/// A byte count: `1048576`, `512KiB`, `16MiB`, `1GiB` (also `KB`/`MB`/`GB`
/// as powers of 1024, `B`, any case, spaces allowed before the unit).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like 16MiB or 1048576)"))?;
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl RunArgs {
    /// The replica ordinal: the flag, else `$HOSTNAME`'s numeric suffix.
    pub fn ordinal(&self, env: impl Fn(&str) -> Option<String>) -> u32 {
        self.replica_ordinal
            .or_else(|| {
                let host = env("HOSTNAME")?;
                let suffix = host.rsplit('-').next()?;
                suffix.parse().ok()
            })
            .unwrap_or(0)
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.zmq_bind.is_empty() && self.zmq_connect.is_empty() {
            return Err("nothing to receive from: give --zmq-bind and/or --zmq-connect".into());
        }
        if self.workers == 0 || self.queue == 0 || self.max_inflight_writes == 0 {
            return Err("--workers, --queue and --max-inflight-writes must be at least 1".into());
        }
        if self.replay_concurrency == 0 || self.stall_after.is_zero() || self.max_topics == 0 {
            return Err(
                "--replay-concurrency, --stall-after and --max-topics must be above zero".into(),
            );
        }
        if self.max_queued_bytes == 0 {
            return Err("--max-queued-bytes must be above zero".into());
        }
        if self.zmq_max_connections == 0 || self.zmq_max_message_size == 0 {
            return Err(
                "--zmq-max-connections and --zmq-max-message-size must be above zero".into(),
            );
        }
        if self.zmq_handshake_timeout.is_zero() {
            return Err("--zmq-handshake-timeout must be above zero".into());
        }
        if self.replicas == 0 {
            return Err("--replicas must be at least 1".into());
        }
        if self.purge_after.is_some_and(|d| d.is_zero())
            || self.purge_silent_after.is_some_and(|d| d.is_zero())
        {
            return Err("--purge-after and --purge-silent-after must be above zero".into());
        }
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err("--admin-token must not be empty".into());
        }
        if let Some(t) = &self.replay_endpoint
            && !t.contains("{host}")
        {
            return Err(format!("--replay-endpoint {t:?} must contain {{host}}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn parses_the_documented_interface() {
        let cli = Cli::try_parse_from([
            "kvroute-ingester",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--zmq-bind",
            "tcp://127.0.0.1:5557",
            "--zmq-connect",
            "tcp://127.0.0.11:5557",
            "--zmq-connect",
            "tcp://127.0.0.12:5557",
            "--hash-scheme",
            "sha256_cbor_64bit",
            "--hash-seed",
            "42",
            "--block-size",
            "32",
            "--http-addr",
            "127.0.0.1:9100",
        ])
        .expect("parse");
        let r = cli.run;
        assert_eq!(r.zmq_connect.len(), 2);
        assert_eq!(r.keys.block_size, 32);
        assert_eq!(
            r.redis.urls(|_| None),
            vec!["redis://127.0.0.1:6379".to_string()]
        );
        assert!(r.validate().is_ok());
    }

    #[test]
    fn validation_and_ordinal() {
        let cli = Cli::try_parse_from(["x"]).expect("parse");
        assert!(cli.run.validate().is_err());
        let env = |k: &str| (k == "HOSTNAME").then(|| "kvroute-ingester-2".to_string());
        assert_eq!(cli.run.ordinal(env), 2);
        assert_eq!(cli.run.ordinal(|_| None), 0);
        let cli = Cli::try_parse_from([
            "x",
            "--zmq-bind",
            "tcp://127.0.0.1:1",
            "--replay-endpoint",
            "tcp://x:1",
        ])
        .expect("parse");
        assert!(cli.run.validate().is_err());
        let cli = Cli::try_parse_from([
            "x",
            "--zmq-bind",
            "tcp://127.0.0.1:1",
            "--purge-silent-after",
            "0s",
        ])
        .expect("parse");
        assert!(cli.run.validate().is_err());
        let cli = Cli::try_parse_from([
            "x",
            "--zmq-bind",
            "tcp://127.0.0.1:1",
            "--purge-silent-after",
            "10m",
        ])
        .expect("parse");
        assert_eq!(cli.run.purge_silent_after, Some(Duration::from_secs(600)));
        assert!(cli.run.validate().is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("512 kib"), Ok(512 << 10));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert!(parse_size("16 MiBs").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("").is_err());
        let cli = Cli::try_parse_from(["x", "--zmq-bind", "tcp://127.0.0.1:1"]).expect("parse");
        assert_eq!(cli.run.zmq_max_message_size, 16 << 20);
        assert_eq!(cli.run.zmq_max_connections, 256);
        assert_eq!(cli.run.zmq_handshake_timeout, Duration::from_secs(5));
        let cli = Cli::try_parse_from([
            "x",
            "--zmq-bind",
            "tcp://127.0.0.1:1",
            "--zmq-max-connections",
            "0",
        ])
        .expect("parse");
        assert!(cli.run.validate().is_err());
    }

    #[test]
    fn durations() {
        let cli = Cli::try_parse_from(["x", "--dns-refresh", "500ms", "--purge-after", "2m"])
            .expect("parse");
        assert_eq!(cli.run.dns_refresh, Duration::from_millis(500));
        assert_eq!(cli.run.purge_after, Some(Duration::from_secs(120)));
        assert!(Cli::try_parse_from(["x", "--purge-after", "3 days"]).is_err());
        assert!(Cli::try_parse_from(["x", "--dns-refresh", "-1s"]).is_err());
    }
}
