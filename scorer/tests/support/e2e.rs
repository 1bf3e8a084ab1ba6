//! Shared steps of the end-to-end tests with the real binary (`e2e.rs`):
//! starting the fixtures (Redis, the scorer process, Envoy), the scorer's
//! flags, request bodies, sending through Envoy, and checking what the pod
//! received, with both processes' logs attached to a failure.

use super::envoy::Envoy;
use super::http::{self, Client, Reply};
use super::index::{key_args, tokenizer_args};
use super::pods::Fleet;
use super::scorer_proc::{ScorerProc, bin};
use kvroute_testkit::process::tail;
use kvroute_testkit::redis_server::RedisServer;
use serde_json::json;

pub const JSON: (&str, &str) = ("content-type", "application/json");
/// The subset hint of Envoy's second listener when a test wants no
/// candidate at all: it names nothing routable.
pub const NO_ENDPOINT: &str = "no-such-endpoint";

pub async fn start_redis() -> RedisServer {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .expect("join")
        .expect("redis-server")
}

pub async fn start_envoy(scorer: &ScorerProc, subset_endpoint: &str) -> Envoy {
    let (grpc, subset) = (scorer.grpc, subset_endpoint.to_owned());
    tokio::task::spawn_blocking(move || Envoy::start(grpc, &subset))
        .await
        .expect("envoy start")
}

/// Flags every scorer here gets: the index, the pods, keys and tokenizers.
pub fn scorer_args(redis: &RedisServer, fleet: &Fleet, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--redis-url".into(),
        redis.url(),
        "--endpoints".into(),
        fleet.endpoints(),
        "--seed".into(),
        "7".into(),
        // These tests check where requests go, not the tokenization deadline
        // (tests/tokenize.rs does): a 120 KB prompt on a loaded 2-core
        // machine can take longer than the 250 ms default.
        "--tokenize-timeout".into(),
        "10s".into(),
    ];
    args.extend(key_args());
    args.extend(tokenizer_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A prompt of about `bytes` bytes of varied words (distinct per `topic`).
pub fn prose(topic: &str, bytes: usize) -> String {
    let words = [
        "cache", "prefix", "router", "block", "token", "pod", "latency", "gateway", "prefill",
        "decode", "index", "replica",
    ];
    let mut out = format!("Notes on {topic}:");
    let mut i = 0usize;
    while out.len() < bytes {
        out.push(' ');
        out.push_str(words[(i * 7 + i / 3) % words.len()]);
        if i % 9 == 8 {
            out.push('.');
        }
        i += 1;
    }
    out
}

pub fn completion(model: &str, prompt: &str, stream: bool) -> Vec<u8> {
    json!({"model": model, "prompt": prompt, "max_tokens": 8, "stream": stream})
        .to_string()
        .into_bytes()
}

/// Sends `body` to Envoy's listener `port` on a fresh connection.
pub async fn post(port: u16, path: &str, headers: &[(&str, &str)], body: http::Body) -> Reply {
    let mut client = Client::connect(Envoy::addr(port)).await;
    let mut all = vec![JSON];
    all.extend_from_slice(headers);
    client.call(http::request("POST", path, &all, body)).await
}

/// Failure context: the check, what went wrong, and both processes' logs.
pub fn fail(check: &str, what: String, envoy: &Envoy, scorer: &ScorerProc) -> ! {
    panic!(
        "{check}: {what}\n--- envoy log ---\n{}\n--- scorer log ---\n{}",
        tail(&envoy.log(), 30),
        tail(&scorer.log(), 60)
    )
}

/// Checks a pod's report: it came from `pod`, the body arrived intact and
/// the only destination header is the picker's.
pub fn expect_delivered(
    check: &str,
    reply: &Reply,
    pod: &str,
    sent: &[u8],
    envoy: &Envoy,
    scorer: &ScorerProc,
) {
    if reply.status != 200 {
        let body = String::from_utf8_lossy(&reply.body).into_owned();
        fail(
            check,
            format!("status {}: {body}", reply.status),
            envoy,
            scorer,
        );
    }
    let report = reply.json();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(sent));
    let want = json!({
        "backend": pod, "len": sent.len(), "sha256": sha, "destination_header": [pod],
    });
    for key in ["backend", "len", "sha256", "destination_header"] {
        if report[key] != want[key] {
            let what = format!("{key}: got {}, want {}", report[key], want[key]);
            fail(check, what, envoy, scorer);
        }
    }
}

/// Runs `kvroute-scorer why` with `args`; its stdout.
pub async fn why(args: &[String]) -> String {
    let out = tokio::process::Command::new(bin())
        .arg("why")
        .args(args)
        .env_clear()
        .output()
        .await
        .expect("run why");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "why {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
