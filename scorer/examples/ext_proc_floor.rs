//! The latency floor of kvroute's ext_proc path through a real Envoy, next
//! to Envoy's direct path, as `docs/envoy-ext-proc.md` measures it: Envoy
//! 1.40 with `--concurrency 1`, one keep-alive client connection, sequential
//! requests with a completions body, and a `direct_response` listener as the
//! pod so only Envoy and the picker cost anything. The picker's `Decide`
//! does nothing (one fixed endpoint), so the difference between the two
//! paths is the ext_proc protocol round trip plus the front end's own work
//! (buffering, parsing the body, streaming it back).
//!
//! ```text
//! cargo run --release -p kvroute-scorer --example ext_proc_floor [-- REQUESTS]
//! ```
//!
//! Prints percentiles; asserts nothing. Uses the test venv's Envoy.

#[path = "../tests/support/mod.rs"]
mod support;

use scorer::decide::{Decide, DecideError, Decision, RouteRequest};
use scorer::ext_proc::ExtProcConfig;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use support::envoy::Envoy;
use support::http::{self, Client};
use support::scorer::Scorer;

/// Routes everything to one endpoint, known once Envoy has its ports.
#[derive(Default)]
struct Fixed(OnceLock<String>);

impl Decide for Fixed {
    fn decide(
        &self,
        _request: RouteRequest,
        _subset: Option<Vec<String>>,
    ) -> impl Future<Output = Result<Decision, DecideError>> + Send {
        let endpoint = self.0.get().cloned().ok_or(DecideError::NoCandidates);
        async move {
            endpoint.map(|endpoint| Decision {
                endpoint,
                reason: "fixed",
                charge: None,
            })
        }
    }

    fn finished(&self, _decision: &Decision) {}
}

const WARMUP: usize = 200;

#[tokio::main]
async fn main() {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    // The front end's own share: end of request body -> routing headers sent.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("metrics recorder");
    let decide = Arc::new(Fixed::default());
    let scorer = Scorer::start(Arc::clone(&decide), ExtProcConfig::default()).await;
    let addr = scorer.addr;
    let envoy = tokio::task::spawn_blocking(move || Envoy::start(addr, "127.0.0.1:1"))
        .await
        .expect("envoy");
    let echo = format!("127.0.0.1:{}", envoy.ports.echo);
    let _ = decide.0.set(echo);
    let version = std::process::Command::new(support::envoy::binary())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!("{version}");
    println!(
        "{requests} sequential requests per row after {WARMUP} warm-up, one connection, Envoy --concurrency 1\n"
    );
    println!(
        "{:<28} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "path", "body", "p50 µs", "p90 µs", "p99 µs", "mean µs"
    );
    for prompt_bytes in [40_000, 150_000] {
        let body = completion(prompt_bytes);
        for (name, port) in [
            ("direct (no ext_proc)", envoy.ports.direct),
            ("ext_proc, no-op Decide", envoy.ports.main),
        ] {
            let mut times = measure(port, &body, requests).await;
            times.sort_unstable();
            let pct = |p: f64| {
                times[((times.len() as f64 * p) as usize).min(times.len() - 1)].as_micros()
            };
            let mean = times.iter().sum::<Duration>().as_micros() / times.len() as u128;
            println!(
                "{name:<28} {:>7}B {:>9} {:>9} {:>9} {:>9}",
                body.len(),
                pct(0.50),
                pct(0.90),
                pct(0.99),
                mean
            );
        }
    }
    drop(envoy);
    println!("\nscorer decision time (parse + decide + send headers), all rows:");
    for line in recorder.render().lines() {
        if line.starts_with("kvroute_scorer_decision_seconds") {
            println!("  {line}");
        }
    }
}

fn completion(prompt_bytes: usize) -> Vec<u8> {
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(prompt_bytes / 44);
    serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 1})
        .to_string()
        .into_bytes()
}

async fn measure(port: u16, body: &[u8], requests: usize) -> Vec<Duration> {
    let mut client = Client::connect(Envoy::addr(port)).await;
    let body = bytes::Bytes::copy_from_slice(body);
    let mut times = Vec::with_capacity(requests);
    for i in 0..WARMUP + requests {
        let request = http::request(
            "POST",
            "/v1/completions",
            &[("content-type", "application/json")],
            http::full(body.clone()),
        );
        let started = Instant::now();
        let reply = client.call(request).await;
        let elapsed = started.elapsed();
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        if i >= WARMUP {
            times.push(elapsed);
        }
    }
    times
}
