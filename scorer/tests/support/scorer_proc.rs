//! The real `kvroute-scorer` binary as a child process, for the end-to-end
//! tests: gRPC and HTTP on free loopback ports, its log in a temporary
//! directory (attached to failures), readiness polled on `/readyz`, and the
//! HTTP API (`/v1/score`, `/metrics`) a test inspects it through.
//!
//! Started, watched and stopped by `kvroute_testkit::scorer` (the process
//! dies with the test, a nextest timeout included).

use super::http::{self, Client};
use kvroute_testkit::process::tail;
use kvroute_testkit::scorer::{Launch, ScorerProcess};
use std::net::SocketAddr;
use std::path::Path;
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

pub struct ScorerProc {
    inner: ScorerProcess,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl ScorerProc {
    /// Starts `kvroute-scorer` with `args` (plus its listen addresses and a
    /// log filter) from an empty environment and returns once `/readyz`
    /// answers 200.
    pub async fn start(name: &str, args: &[String]) -> ScorerProc {
        let mut all = vec!["--log".to_string(), "info,scorer=debug".into()];
        all.extend(args.iter().cloned());
        let inner = ScorerProcess::start(&Launch {
            binary: Path::new(bin()),
            args: &all,
            name,
            clear_env: true,
        })
        .await
        .unwrap_or_else(|e| panic!("kvroute-scorer {name} did not start: {e}"));
        ScorerProc {
            grpc: inner.grpc,
            http: inner.http,
            inner,
        }
    }

    pub fn log(&self) -> String {
        self.inner.log()
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
        let reply = http::score(&mut client, body).await;
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
