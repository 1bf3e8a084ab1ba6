//! The real `kvroute-scorer` binary as a child process, for the end-to-end
//! tests: gRPC and HTTP on free loopback ports, its log in a temporary
//! directory (attached to failures), readiness polled on `/readyz`, and the
//! HTTP API (`/v1/score`, `/metrics`) a test inspects it through.
//!
//! The process is started through `sh` with a watchdog holding a pipe this
//! process writes (the Redis fixture's trick): when the test process dies —
//! a nextest timeout included — the pipe closes and the watchdog kills the
//! scorer, so no orphan keeps ports or CPU.

use super::http::{self, Client};
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test. Cargo defines `CARGO_BIN_EXE_*` for integration
/// tests only; `examples/ext_proc_floor.rs` also includes this support
/// module (and never starts the binary), hence `option_env!`.
pub fn bin() -> &'static str {
    match option_env!("CARGO_BIN_EXE_kvroute-scorer") {
        Some(path) => path,
        None => panic!("CARGO_BIN_EXE_kvroute-scorer: only integration tests run the binary"),
    }
}

/// `exec`s the command after forking a watchdog that kills it (`$$` is the
/// shell's pid, which `exec` hands on) when stdin (fd 3) reaches EOF.
const LAUNCHER: &str = r#"exec 3<&0
(read _lifeline <&3; kill -9 $$) >/dev/null 2>&1 &
exec "$@" </dev/null 3<&-"#;

pub struct ScorerProc {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    child: Option<Child>,
    lifeline: Option<ChildStdin>,
    dir: PathBuf,
}

impl ScorerProc {
    /// Starts `kvroute-scorer` with `args` (plus its listen addresses and a
    /// log filter) and returns once `/readyz` answers 200.
    pub async fn start(name: &str, args: &[String]) -> ScorerProc {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(name, args).await {
                Ok(p) => return p,
                // A port taken between picking and binding: pick again.
                Err(log) if log.contains("binding --") => last = log,
                Err(log) => panic!("kvroute-scorer {name} did not start:\n{log}"),
            }
        }
        panic!("kvroute-scorer {name} could not bind:\n{last}");
    }

    async fn try_start(name: &str, args: &[String]) -> Result<ScorerProc, String> {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dir = std::env::temp_dir().join(format!(
            "kvroute-scorer-{}-{name}-{}",
            std::process::id(),
            http.port()
        ));
        fs::create_dir_all(&dir).expect("scorer temp dir");
        let log = fs::File::create(dir.join("scorer.log")).expect("scorer log");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(LAUNCHER)
            .arg("kvroute-scorer-launcher")
            .arg(bin())
            .arg("--grpc-addr")
            .arg(grpc.to_string())
            .arg("--http-addr")
            .arg(http.to_string())
            .args(["--log", "info,scorer=debug"])
            .args(args)
            // Nothing from the test's environment (KVROUTE_*, llm-d's
            // KVCACHE_INDEXER_REDIS_ADDR) may configure the scorer.
            .env_clear()
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin()));
        let lifeline = child.stdin.take();
        let mut proc = ScorerProc {
            grpc,
            http,
            child: Some(child),
            lifeline,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if proc.exited() {
                return Err(proc.log());
            }
            if proc.try_get("/readyz").await.is_some_and(|(s, _)| s == 200) {
                return Ok(proc);
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 20 s\n{}", proc.log()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("scorer.log")).unwrap_or_default()
    }

    async fn try_get(&self, path: &str) -> Option<(u16, String)> {
        let stream = tokio::net::TcpStream::connect(self.http).await.ok()?;
        drop(stream);
        let mut client = Client::connect(self.http).await;
        let reply = client
            .call(http::request("GET", path, &[], http::full("")))
            .await;
        Some((
            reply.status.as_u16(),
            String::from_utf8_lossy(&reply.body).into_owned(),
        ))
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        match self.try_get("/metrics").await {
            Some((200, text)) => text,
            other => panic!("/metrics: {other:?}"),
        }
    }

    /// Sum of the samples of counter `name` whose labels include every
    /// `key="value"` in `labels`.
    pub async fn counter(&self, name: &str, labels: &[&str]) -> f64 {
        sum_samples(&self.metrics().await, name, labels)
    }

    /// `POST /v1/score`: the decision the scorer would make, as JSON.
    pub async fn score(&self, body: &serde_json::Value) -> serde_json::Value {
        let mut client = Client::connect(self.http).await;
        let reply = client
            .call(http::request(
                "POST",
                "/v1/score",
                &[("content-type", "application/json")],
                http::full(body.to_string()),
            ))
            .await;
        assert_eq!(reply.status, 200, "/v1/score: {:?}", reply.body);
        reply.json()
    }

    /// Polls `/v1/score` for `body` until `accept` holds; the last report.
    pub async fn score_until(
        &self,
        body: &serde_json::Value,
        within: Duration,
        what: &str,
        accept: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let report = self.score(body).await;
            if accept(&report) {
                return report;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: not within {within:?}; last report {report:#}\n--- scorer log ---\n{}",
                    tail(&self.log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ScorerProc {
    fn drop(&mut self) {
        // Closing the pipe makes the watchdog kill the scorer; waiting for
        // that before killing directly keeps the pid from being reused under
        // the watchdog.
        self.lifeline = None;
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One score per endpoint from a `/v1/score` report: `(endpoint, field)`.
pub fn per_endpoint(report: &serde_json::Value, field: &str) -> Vec<(String, serde_json::Value)> {
    report["scores"]
        .as_array()
        .map(|scores| {
            scores
                .iter()
                .map(|s| {
                    (
                        s["endpoint"].as_str().unwrap_or_default().to_owned(),
                        s[field].clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `field` of `endpoint`'s score in a `/v1/score` report.
pub fn endpoint_field(
    report: &serde_json::Value,
    endpoint: &str,
    field: &str,
) -> serde_json::Value {
    per_endpoint(report, field)
        .into_iter()
        .find(|(e, _)| e == endpoint)
        .map(|(_, v)| v)
        .unwrap_or(serde_json::Value::Null)
}

/// Sums the Prometheus samples of `name` carrying all of `labels`.
pub fn sum_samples(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            (metric == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
