//! The scorer as operators run it: the `kvroute-scorer` binary in its own
//! process (so its CPU time can be read from `/proc/<pid>/stat` apart from
//! the load generator's), through `kvroute_testkit::scorer`.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub struct ScorerProcess {
    inner: kvroute_testkit::scorer::ScorerProcess,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

/// What the process is started with.
pub struct Launch<'a> {
    pub binary: &'a Path,
    pub redis_url: String,
    /// `MODEL=PATH` per model.
    pub tokenizers: Vec<String>,
    pub endpoints: &'a [String],
    pub seed: u64,
}

/// `--scorer-bin`, else `kvroute-scorer` next to this binary.
pub fn binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    crate::machine::sibling_binary("kvroute-scorer", explicit, "--scorer-bin")
}

impl ScorerProcess {
    /// Starts the process (returns once its `/readyz` answers 200).
    pub async fn start(launch: &Launch<'_>) -> anyhow::Result<Self> {
        let args: Vec<String> = [
            "--redis-url",
            &launch.redis_url,
            "--tokenizer",
            &launch.tokenizers.join(","),
            "--endpoints",
            &launch.endpoints.join(","),
            "--seed",
            &launch.seed.to_string(),
            "--log",
            "warn",
        ]
        .map(String::from)
        .into();
        let inner =
            kvroute_testkit::scorer::ScorerProcess::start(&kvroute_testkit::scorer::Launch {
                binary: launch.binary,
                args: &args,
                name: "bench",
                clear_env: false,
            })
            .await
            .with_context(|| format!("starting {}", launch.binary.display()))?;
        Ok(ScorerProcess {
            grpc: inner.grpc,
            http: inner.http,
            inner,
        })
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.inner.pid().context("the scorer process is gone")
    }

    /// Waits until `/v1/score` of `probe` answers with a prefix decision:
    /// the server is up and the index connected.
    pub async fn wait_ready(&mut self, probe: &Bytes) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            if !self.inner.is_running() {
                bail!(
                    "kvroute-scorer exited during startup:\n{}",
                    self.inner.log()
                );
            }
            match score(self.http, probe).await {
                Ok(reply) if reply.contains("\"reason\":\"prefix\"") => return Ok(()),
                Ok(reply) => last = reply,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("kvroute-scorer not ready after 30 s: {last}")
    }

    /// CPU seconds (user + system) the process has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        crate::machine::cpu_seconds(self.pid()?)
    }
}

async fn score(addr: SocketAddr, body: &Bytes) -> anyhow::Result<String> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::builder()
        .method("POST")
        .uri("/v1/score")
        .header("host", "scorer")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))?;
    let response = sender.send_request(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
