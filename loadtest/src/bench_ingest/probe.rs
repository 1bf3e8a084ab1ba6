//! What `bench ingest` measures with: the `kvroute-ingester` process (spawn,
//! `/metrics` scraping, histogram quantiles), per-process CPU time from
//! `/proc`, the publish -> visible-in-Redis sampler, and the
//! `redis-benchmark` baseline.

use anyhow::{Context, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The applied-batches counter: the lag histogram records one sample per
/// batch when the write holding it succeeds, so its `_count` is exactly
/// "batches applied to Redis".
pub const LAG: &str = "kvroute_ingester_lag_seconds";

/// `--ingester-bin`, else `kvroute-ingester` beside this binary.
pub fn ingester_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    crate::machine::sibling_binary("kvroute-ingester", explicit, "--ingester-bin")
}

/// A running ingester.
pub struct IngesterProc {
    child: Child,
    pub http: SocketAddr,
    pub zmq: String,
}

impl IngesterProc {
    /// Starts the binary (bind mode, logs at warn) and waits for `/readyz`.
    pub async fn start(bin: &Path, redis_url: &str, extra: &[String]) -> anyhow::Result<Self> {
        let zmq = format!("tcp://127.0.0.1:{}", free_port()?);
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let child = Command::new(bin)
            .args(["--redis-url", redis_url, "--zmq-bind", &zmq])
            .args(["--http-addr", &http.to_string()])
            .args(extra)
            .env("KVROUTE_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let proc = IngesterProc { child, http, zmq };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if matches!(get(http, "/readyz").await, Ok((200, _))) {
                return Ok(proc);
            }
            if Instant::now() > deadline {
                bail!("kvroute-ingester not ready within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (code, text) = get(self.http, "/metrics").await?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(Metrics(text))
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// One `/metrics` scrape.
pub struct Metrics(String);

impl Metrics {
    pub fn from_text(text: String) -> Self {
        Metrics(text)
    }

    /// Sum of the samples of `name` whose labels include every `labels` pair.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// (labels text, value) of every sample named exactly `name`.
    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(move |l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, labels) = series.split_once('{').unwrap_or((series, ""));
                (n == name).then_some((labels, value.parse().ok()?))
            })
    }

    /// The cumulative buckets `(le, count)` of a histogram, sorted by `le`.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut out: Vec<(f64, f64)> = self
            .samples(&bucket)
            .filter_map(|(labels, v)| {
                let le = labels.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// The `q` quantile of the observations between two scrapes of a
/// histogram, interpolated linearly inside its bucket (Prometheus'
/// `histogram_quantile`); `None` without observations.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, c)| {
            let b = before.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
            (le, c - b)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, count) in &delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            let inside = (count - below).max(f64::MIN_POSITIVE);
            return Some(lo + (le - lo) * (rank - below) / inside);
        }
        (lo, below) = (le, count);
    }
    None
}

/// One HTTP/1.1 GET with `Connection: close`: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(kvroute_testkit::net::http("GET", addr, path).await?)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(kvroute_testkit::net::free_port()?)
}

/// CPU seconds (user + system) a process has used (`machine::cpu_seconds`).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    crate::machine::cpu_seconds(pid).ok()
}

/// The redis-server pid, from `INFO server`.
pub async fn redis_pid(url: &str) -> anyhow::Result<String> {
    let mut c = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut c).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .map(|p| p.trim().to_owned())
        .context("INFO server has no process_id")
}

/// A store to watch for: published at `at`, visible once `key` has `field`.
pub struct Sample {
    pub key: String,
    pub field: String,
    pub at: Instant,
}

/// Polls Redis every millisecond (one pipeline of HEXISTS for every
/// outstanding sample) and records publish -> visible latencies; samples
/// unseen after 10 s are counted as lost.
pub async fn sampler(
    url: String,
    mut rx: mpsc::UnboundedReceiver<Sample>,
    out: Arc<Mutex<(Vec<Duration>, u64)>>,
) -> anyhow::Result<()> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut waiting: Vec<Sample> = Vec::new();
    loop {
        loop {
            match rx.try_recv() {
                Ok(s) => waiting.push(s),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        if !waiting.is_empty() {
            let mut pipe = redis::pipe();
            for s in &waiting {
                pipe.cmd("HEXISTS").arg(&s.key).arg(&s.field);
            }
            let seen: Vec<bool> = pipe.query_async(&mut conn).await?;
            let now = Instant::now();
            let mut results = out.lock().unwrap_or_else(|e| e.into_inner());
            let mut i = 0;
            waiting.retain(|s| {
                let keep = !seen.get(i).copied().unwrap_or(false);
                i += 1;
                if !keep {
                    results.0.push(now - s.at);
                } else if now - s.at > Duration::from_secs(10) {
                    results.1 += 1;
                    return false;
                }
                keep
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `redis-benchmark -P 64 -t hset`: requests per second.
pub fn redis_benchmark_hset(port: u16, requests: usize) -> anyhow::Result<f64> {
    crate::machine::redis_benchmark(port, requests, &["-t", "hset"], "HSET")
}

/// CPU model, core count and load average, for the record.
pub fn machine() -> String {
    format!(
        "{}, load average at start {}",
        crate::machine::machine(),
        crate::machine::load_average()
    )
}

pub use crate::machine::fmt_int;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let before = [(0.001, 0.0), (0.01, 0.0), (f64::INFINITY, 0.0)];
        let after = [(0.001, 50.0), (0.01, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(&before, &after, 0.5), Some(0.001));
        let p75 = quantile(&before, &after, 0.75).expect("p75");
        assert!((p75 - 0.0055).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(&after, &after, 0.5), None);
    }

    #[test]
    fn metrics_parse() {
        let m = Metrics(
            "# TYPE x counter\nx{a=\"1\",b=\"2\"} 3\nx{a=\"2\"} 4\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\n"
                .into(),
        );
        assert_eq!(m.sum("x", &[]), 7.0);
        assert_eq!(m.sum("x", &[("a", "1")]), 3.0);
        assert_eq!(m.buckets("h"), vec![(0.5, 1.0), (f64::INFINITY, 2.0)]);
        assert_eq!(fmt_int(1234567.8), "1,234,568");
    }
}
