//! The load generator: replays a workload in real time (divided by the
//! speed-up), one streaming request per arrival on its own connection to
//! Envoy, and measures what a user sees: time to the first streamed chunk
//! (TTFT) and to the end, and which pod answered (`x-kvroute-pod`).

use super::pod::POD_HEADER;
use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// What one request saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ttft: Duration,
    pub e2e: Duration,
    /// `x-kvroute-pod` of the response.
    pub pod: String,
    /// `data:` chunks before `[DONE]`.
    pub chunks: u32,
}

/// Sends one streaming request to Envoy's listener on `port` and reads the
/// whole SSE stream. `started` is when the request was due (TTFT counts
/// from there, so client-side lateness is not hidden).
pub async fn send(
    port: u16,
    path: &str,
    body: Bytes,
    headers: &[(&str, String)],
    started: Instant,
) -> anyhow::Result<Outcome> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connecting to Envoy")?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "kvroute-live")
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let response = sender.send_request(req.body(Full::new(body))?).await?;
    let status = response.status();
    let pod = response
        .headers()
        .get(POD_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body = response.into_body();
    if status != 200 {
        let text = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        bail!("{status} from {pod:?}: {}", String::from_utf8_lossy(&text));
    }
    let mut ttft = None;
    let mut chunks = 0u32;
    let mut done = false;
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the stream")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        // Count complete SSE events (`data: ...\n\n`).
        while let Some(end) = find(&pending, b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            if event.starts_with(b"data: [DONE]") {
                done = true;
            } else if event.starts_with(b"data:") {
                chunks += 1;
                ttft.get_or_insert_with(|| started.elapsed());
            }
        }
    }
    if !done {
        bail!("the stream from {pod} ended without [DONE]");
    }
    let Some(ttft) = ttft else {
        bail!("the stream from {pod} had no chunk");
    };
    Ok(Outcome {
        ttft,
        e2e: started.elapsed(),
        pod,
        chunks,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Approximate quantiles of a Prometheus histogram `name` in `text`
/// (summed over its label sets), interpolated within buckets.
pub fn histogram_quantiles(text: &str, name: &str) -> Option<kvroute_sim::report::Quantiles> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let (mut sum, mut count) = (0.0, 0.0);
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        if let Some(rest) = series.strip_prefix(&bucket) {
            let le = rest
                .split("le=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .and_then(|s| {
                    if s == "+Inf" {
                        Some(f64::INFINITY)
                    } else {
                        s.parse().ok()
                    }
                });
            if let Some(le) = le {
                match buckets.iter_mut().find(|b| b.0 == le) {
                    Some(b) => b.1 += v,
                    None => buckets.push((le, v)),
                }
            }
        } else if series.starts_with(&format!("{name}_sum")) {
            sum += v;
        } else if series.starts_with(&format!("{name}_count")) {
            count += v;
        }
    }
    if count <= 0.0 || buckets.is_empty() {
        return None;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let at = |q: f64| {
        let rank = q * count;
        let mut prev = (0.0, 0.0);
        for &(le, c) in &buckets {
            if c >= rank {
                if le.is_infinite() {
                    return prev.0;
                }
                let span = (c - prev.1).max(f64::MIN_POSITIVE);
                return prev.0 + (le - prev.0) * ((rank - prev.1) / span).clamp(0.0, 1.0);
            }
            prev = (le, c);
        }
        prev.0
    };
    Some(kvroute_sim::report::Quantiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        mean: sum / count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_within_buckets() {
        let text = "\
# TYPE x histogram
x_bucket{a=\"1\",le=\"0.1\"} 50
x_bucket{a=\"1\",le=\"1\"} 90
x_bucket{a=\"1\",le=\"+Inf\"} 100
x_sum{a=\"1\"} 30
x_count{a=\"1\"} 100
";
        let q = histogram_quantiles(text, "x").expect("a histogram");
        assert!((q.p50 - 0.1).abs() < 1e-9, "{q:?}");
        assert!((q.p90 - 1.0).abs() < 1e-9, "{q:?}");
        // p99 falls in +Inf: reported as the last finite bound.
        assert!((q.p99 - 1.0).abs() < 1e-9, "{q:?}");
        assert!((q.mean - 0.3).abs() < 1e-9);
        assert!(histogram_quantiles("", "x").is_none());
    }
}
