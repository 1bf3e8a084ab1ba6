//! What `e2e.rs` drives and reads: the `kvroute-ingester` binary as a child
//! process (admin HTTP over a minimal HTTP/1.1 client, SIGTERM via `kill`),
//! the Python vLLM publisher (`kvroute_testkit::publisher`) with its
//! `wait` steps, the Redis index read directly (HKEYS, GET), and vLLM-side
//! block hashes computed with `kvroute_core::keys` (the publisher's own scheme and
//! seed, which may differ from the ingester's on purpose).
//!
//! Every wait is a poll with a deadline, never a fixed sleep: the whole file
//! has to stay fast on two cores.

use kvroute_core::ids::BlockKey;
use kvroute_core::keys::{ChainState, ExtraKeys, HashScheme, KeyScheme};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Tokens per block, on both sides.
pub const BLOCK_SIZE: usize = 16;
/// The seed the ingester is configured with (vLLM's PYTHONHASHSEED).
pub const SEED: &str = "42";
/// How long any expected state may take to appear: long enough for a write
/// retry whose backoff reached its 5 s cap, on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` every 20 ms until it returns `Ok`, panicking with its last
/// error after [`DEADLINE`].
pub async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {DEADLINE:?} waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A port nothing listens on right now (the OS picks it).
pub fn free_port() -> u16 {
    kvroute_testkit::net::free_port().expect("free port")
}

// ---------------------------------------------------------------- keys

/// A publisher's hashing: vLLM's scheme with the publisher's seed.
#[derive(Clone)]
pub struct Engine {
    scheme: KeyScheme,
}

impl Engine {
    pub fn new(scheme: HashScheme, seed: &str) -> Self {
        Engine {
            scheme: KeyScheme::new(scheme, seed, BLOCK_SIZE).expect("scheme"),
        }
    }

    /// The chain states of `tokens`' full blocks continuing from `parent`
    /// (`None`: from the root).
    pub fn chain(&self, parent: Option<ChainState>, tokens: &[u32]) -> Vec<ChainState> {
        let mut out = Vec::new();
        let (start, index) = match parent {
            Some(p) => (p, 1),
            None => (self.scheme.root(), 0),
        };
        self.scheme
            .chain(start, index, tokens, ExtraKeys::NONE, |s| out.push(*s));
        out
    }

    /// A `BlockStored` event in the peer's JSON, hashes as vLLM publishes
    /// them under this scheme (an int under sha256_cbor_64bit, the 32-byte
    /// digest under sha256_cbor). Returns the event and its chain states.
    pub fn stored(
        &self,
        parent: Option<ChainState>,
        tokens: &[u32],
        medium: Option<&str>,
    ) -> (Value, Vec<ChainState>) {
        let states = self.chain(parent, tokens);
        let event = json!({
            "type": "BlockStored",
            "block_hashes": states.iter().map(hash_json).collect::<Vec<_>>(),
            "parent_block_hash": parent.as_ref().map(hash_json),
            "token_ids": tokens,
            "block_size": BLOCK_SIZE,
            "medium": medium,
        });
        (event, states)
    }
}

/// A hash as the peer's JSON carries it: an int, or hex of the digest.
pub fn hash_json(state: &ChainState) -> Value {
    match state {
        ChainState::U64(v) => json!(v),
        ChainState::Digest(d) => json!(hex::encode(d)),
    }
}

/// `BlockRemoved` of these blocks (by the engine's hashes).
pub fn removed(states: &[ChainState]) -> Value {
    json!({"type": "BlockRemoved", "block_hashes": states.iter().map(hash_json).collect::<Vec<_>>()})
}

pub fn cleared() -> Value {
    json!({"type": "AllBlocksCleared"})
}

/// The router's keys (the ingester's scheme, seed [`SEED`]) of every full
/// block of `tokens`, chained from the root.
pub fn keys(scheme: HashScheme, tokens: &[u32]) -> Vec<BlockKey> {
    KeyScheme::new(scheme, SEED, BLOCK_SIZE)
        .expect("scheme")
        .block_keys(tokens, ExtraKeys::NONE)
}

/// `blocks` full blocks of token ids unique to `tag`.
pub fn tokens(tag: u32, blocks: usize) -> Vec<u32> {
    (0..(blocks * BLOCK_SIZE) as u32)
        .map(|i| tag * 100_000 + i)
        .collect()
}

// ---------------------------------------------------------------- redis

/// Reads the index the way an operator (or llm-d) does; a fresh connection
/// per call, because tests kill and restart the server underneath.
pub struct Index {
    pub url: String,
    pub model: String,
}

impl Index {
    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let client = redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        // redis-rs answers "timed out" after 500 ms by default; a SAVE (or
        // any command) on a loaded 2-core CI machine can take longer, and
        // the test's own reads must not fail for that.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(10)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())
    }

    /// HKEYS `<model>@<key>`: the `<pod>@<tier>` fields holding the block.
    pub async fn holders(&self, key: BlockKey) -> Result<BTreeSet<String>, String> {
        let mut c = self.conn().await?;
        redis::cmd("HKEYS")
            .arg(format!("{}@{}", self.model, key.0))
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())
    }

    /// GET of any key (the `engine:` mapping).
    pub async fn get(&self, name: &str) -> Result<Option<String>, String> {
        let mut c = self.conn().await?;
        redis::cmd("GET")
            .arg(name)
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())
    }

    /// Any command, for tests that change the server under the ingester
    /// (`CONFIG SET maxmemory 1`).
    pub async fn command(&self, args: &[&str]) -> Result<redis::Value, String> {
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.map_err(|e| e.to_string())
    }

    /// `Ok` when every key's holders are exactly `fields`.
    pub async fn check(&self, keys: &[BlockKey], fields: &[&str]) -> Result<(), String> {
        let want: BTreeSet<String> = fields.iter().map(|f| f.to_string()).collect();
        for (i, k) in keys.iter().enumerate() {
            let got = self.holders(*k).await?;
            if got != want {
                return Err(format!("block {i} ({k:?}): holders {got:?}, want {want:?}"));
            }
        }
        Ok(())
    }

    /// Waits until every key's holders are exactly `fields`.
    pub async fn expect(&self, what: &str, keys: &[BlockKey], fields: &[&str]) {
        until(what, || self.check(keys, fields)).await
    }

    /// Asserts (no waiting) that every key's holders are exactly `fields`.
    pub async fn assert(&self, what: &str, keys: &[BlockKey], fields: &[&str]) {
        if let Err(e) = self.check(keys, fields).await {
            panic!("{what}: {e}");
        }
    }
}

/// `<pod>@gpu`, the holder field of a pod's default tier.
pub fn gpu(pod: &str) -> String {
    format!("{pod}@gpu")
}

// ---------------------------------------------------------------- ingester

/// The `kvroute-ingester` binary, running.
pub struct Ingester {
    child: Child,
    pub http: SocketAddr,
    /// The SUB bind endpoint, when started in bind mode.
    pub zmq: String,
}

impl Ingester {
    /// Starts the binary in bind mode on a free port plus `args`, and waits
    /// until `/readyz` answers 200.
    pub async fn start(redis_url: &str, args: &[&str]) -> Ingester {
        Self::start_bound(redis_url, &bind_endpoint(), args).await
    }

    /// Bind mode on `zmq` (from [`bind_endpoint`], when the publishers must
    /// know it before the ingester starts).
    pub async fn start_bound(redis_url: &str, zmq: &str, args: &[&str]) -> Ingester {
        let mut all = vec!["--zmq-bind", zmq];
        all.extend_from_slice(args);
        Self::start_raw(redis_url, &all, zmq.to_owned()).await
    }

    /// Starts the binary with exactly `args` (plus Redis, HTTP and keys).
    pub async fn start_raw(redis_url: &str, args: &[&str], zmq: String) -> Ingester {
        let ing = Self::spawn(redis_url, args, zmq).await;
        ing.wait_ready(true).await;
        ing
    }

    /// [`Ingester::start_raw`] without waiting for readiness. The admin
    /// server binds port 0 and the address comes back in the process's
    /// "admin HTTP listening" log line: no free-port probe to race.
    /// `--hash-seed` is [`SEED`] unless `args` give one.
    pub async fn spawn(redis_url: &str, args: &[&str], zmq: String) -> Ingester {
        let seed = if args.contains(&"--hash-seed") {
            &[][..]
        } else {
            &["--hash-seed", SEED][..]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvroute-ingester"))
            .args(["--redis-url", redis_url, "--http-addr", "127.0.0.1:0"])
            .args(seed)
            .args(["--block-size", &BLOCK_SIZE.to_string()])
            .args(args)
            .env("KVROUTE_LOG", "info,ingester=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start kvroute-ingester");
        let stderr = child.stderr.take().expect("piped stderr");
        let http = admin_addr(stderr).await;
        Ingester { child, http, zmq }
    }

    /// Waits until `/readyz` is 200 (`true`) or 503 (`false`).
    pub async fn wait_ready(&self, ready: bool) {
        let want = if ready { 200 } else { 503 };
        let addr = self.http;
        until(&format!("/readyz {want}"), || async move {
            match http(addr, "GET", "/readyz").await {
                Ok((code, _)) if code == want => Ok(()),
                Ok((code, body)) => Err(format!("{code} {body}")),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Waits until `/readyz` answers `code` with a body containing every
    /// one of `parts` (the failing checks' reasons); returns the body.
    pub async fn wait_readyz(&self, code: u16, parts: &[&str]) -> String {
        let addr = self.http;
        until(&format!("/readyz {code} with {parts:?}"), || async move {
            match http(addr, "GET", "/readyz").await {
                Ok((c, body)) if c == code && parts.iter().all(|p| body.contains(p)) => Ok(body),
                Ok((c, body)) => Err(format!("{c} {body}")),
                Err(e) => Err(e),
            }
        })
        .await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http(self.http, "GET", path).await.expect("admin HTTP")
    }

    pub async fn post(&self, path: &str) -> (u16, String) {
        http(self.http, "POST", path).await.expect("admin HTTP")
    }

    /// The sum of every sample of `name` whose labels include all of
    /// `labels` (`[("reason", "bad_topic")]`); 0 when absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (code, text) = self.get("/metrics").await;
        assert_eq!(code, 200, "/metrics");
        metric_sum(&text, name, labels)
    }

    /// Waits until [`Ingester::metric`] reaches `at_least`.
    pub async fn expect_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) {
        until(&format!("{name}{labels:?} >= {at_least}"), || async move {
            let v = self.metric(name, labels).await;
            if v >= at_least {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        })
        .await
    }

    /// Waits until the metric equals `value` (a counter that settles: the
    /// worker may still be shedding when an earlier metric is reached).
    pub async fn expect_metric_eq(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        until(&format!("{name}{labels:?} == {value}"), || async move {
            let v = self.metric(name, labels).await;
            if v == value {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        })
        .await
    }

    /// Whether the process is still running (a crash shows here).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM (through `kill`: the crate forbids unsafe, so no libc).
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");
    }

    /// Waits for the process to exit, at most `within`.
    pub async fn exit(mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("kvroute-ingester still running after {within:?}"))
            .expect("wait")
    }
}

/// Reads the child's log until it names its admin address, echoing every
/// line to the test's stderr (and keeps echoing afterwards, so the child
/// never blocks on a full pipe).
async fn admin_addr(stderr: tokio::process::ChildStderr) -> SocketAddr {
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            let plain = strip_ansi(&line);
            if !plain.contains("admin HTTP listening") {
                continue;
            }
            let addr = plain
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .and_then(|a| a.parse::<SocketAddr>().ok());
            if addr.is_some() {
                return addr;
            }
        }
        None
    })
    .await;
    let Ok(Some(addr)) = found else {
        panic!("kvroute-ingester did not log its admin address within {DEADLINE:?}");
    };
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
        }
    });
    addr
}

/// The text of a log line without its colour escapes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A loopback endpoint on a free port for the ingester's SUB to bind.
pub fn bind_endpoint() -> String {
    format!("tcp://127.0.0.1:{}", free_port())
}

/// Sums the samples of a Prometheus text exposition matching name and labels.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            let matches = n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// One HTTP/1.1 request with `Connection: close`: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    kvroute_testkit::net::http(method, addr, path)
        .await
        .map_err(|e| format!("{method} {addr}{path}: {e}"))
}

/// Runs `kvroute-ingester purge --redis-url URL PODS...`: (exit ok, stdout).
pub async fn purge_cli(redis_url: &str, pods: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvroute-ingester"))
        .args(["purge", "--redis-url", redis_url])
        .args(pods)
        .output()
        .await
        .expect("run purge");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

// ---------------------------------------------------------------- peer

pub use kvroute_testkit::publisher::Peer;

/// A script for a peer that connects to the ingester's bound SUB, waits for
/// its subscription, then runs `steps` under `topic`.
pub fn connecting(ingester: &Ingester, topic: &str, encoding: &str, steps: Value) -> Value {
    json!({
        "topic": topic, "encoding": encoding,
        "pub": ingester.zmq, "pub_mode": "connect", "await_subscriber_ms": 8000,
        "steps": steps,
    })
}

/// `kv@<pod>@<model>`.
pub fn topic(pod: &str, model: &str) -> String {
    format!("kv@{pod}@{model}")
}

/// One batch step of explicit events.
pub fn batch(events: Vec<Value>) -> Value {
    json!({"batch": events})
}
