//! The router's tokenization stage with real tokenizers: cold prompts are
//! tokenized off the async workers (other decisions keep flowing on a
//! single-threaded runtime), an overloaded pool routes by load and counts
//! why, and for models without a local tokenizer a vLLM pod's `/tokenize`
//! (played by `support/vllm_tokenize.py`: Python `tokenizers` and jinja2 on
//! the same Llama 3 and tiny tokenizers) gives the same keys and pick as
//! tokenizing locally.

mod support;

use kvroute_core::ids::{ModelName, PodId, Tier};
use kvroute_core::index::IndexOp;
use kvroute_core::index::memory::MemoryIndex;
use kvroute_core::keys::ExtraKeys;
use kvroute_tokens::{TokenizerOptions, TokenizerRegistry};
use metrics_exporter_prometheus::PrometheusBuilder;
use scorer::candidates::Candidates;
use scorer::decide::{Decide, Prompt, RouteRequest};
use scorer::load::Load;
use scorer::route::{EndpointPicker, RouteConfig};
use scorer::tokenize::{PoolConfig, RemoteConfig, TokenizeConfig};
use serde_json::json;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::e2e::prose;
use support::index::{
    LLAMA, TINY, chat_ids, completion_ids, key_scheme, llama3_tokenizer, tiny_dir, tokenizers,
};
use tokio::io::AsyncBufReadExt;

const A: &str = "127.0.0.31:8000";
const B: &str = "127.0.0.32:8000";

fn router(
    registry: TokenizerRegistry,
    endpoints: &[String],
    tokenize: TokenizeConfig,
) -> (EndpointPicker<MemoryIndex>, Arc<MemoryIndex>) {
    let index = Arc::new(MemoryIndex::new(1_000_000));
    let r = EndpointPicker::new(
        index.clone(),
        key_scheme(),
        Arc::new(registry),
        Arc::new(Candidates::new(endpoints).expect("endpoints")),
        Load::default(),
        RouteConfig {
            tokenize,
            ..RouteConfig::default()
        },
        7,
    );
    (r, index)
}

fn llama_only() -> TokenizerRegistry {
    let r = TokenizerRegistry::new(
        [(LLAMA.to_string(), llama3_tokenizer())],
        vec![],
        TokenizerOptions::default(),
    );
    r.preload();
    r
}

fn store(index: &MemoryIndex, pod: &str, model: &str, tokens: &[u32]) -> usize {
    let keys = key_scheme().block_keys(tokens, ExtraKeys::NONE);
    index.apply_sync(&[IndexOp::store_keys(
        &ModelName::new(model),
        &PodId::new(pod),
        Tier::gpu(),
        &keys,
    )]);
    keys.len()
}

fn request(model: &str, prompt: Prompt) -> RouteRequest {
    RouteRequest {
        model: model.into(),
        prompt,
        cache_salt: None,
        chat_template_kwargs: None,
        request_id: None,
    }
}

/// Text the BPE word cache cannot shortcut: seeded random words, so a
/// cold tokenization of it really costs a BPE pass per word.
fn random_words(seed: u64, bytes: usize) -> String {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out = String::with_capacity(bytes + 16);
    while out.len() < bytes {
        let len = 2 + next() % 9;
        for _ in 0..len {
            out.push(char::from(b'a' + (next() % 26) as u8));
        }
        out.push(if next() % 11 == 0 { '\n' } else { ' ' });
    }
    out
}

fn pool(threads: usize, queue: usize, deadline: Duration) -> TokenizeConfig {
    TokenizeConfig {
        pool: PoolConfig {
            threads,
            queue,
            deadline,
        },
        ..TokenizeConfig::default()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn cold_tokenization_does_not_hold_up_other_decisions() {
    let endpoints = [A.to_string(), B.to_string()];
    let (r, index) = router(
        llama_only(),
        &endpoints,
        pool(1, 8, Duration::from_secs(60)),
    );
    let r = Arc::new(r);
    let ids: Vec<u32> = (0..64).collect();
    store(&index, B, LLAMA, &ids);
    let cold = random_words(1, 300_000);

    // One runtime thread: if the cold prompt were tokenized on it, nothing
    // else could run until it was done.
    let started = Instant::now();
    let slow = tokio::spawn({
        let (r, text) = (r.clone(), cold.clone());
        async move { r.score(&request(LLAMA, Prompt::Text(text)), None).await }
    });
    let mut meanwhile = 0u32;
    while !slow.is_finished() {
        let d = r
            .decide(request(LLAMA, Prompt::TokenIds(ids.clone())), None)
            .await
            .expect("decision");
        assert_eq!((d.endpoint.as_str(), d.reason), (B, "prefix"));
        r.finished(&d);
        meanwhile += 1;
        tokio::task::yield_now().await;
    }
    let took = started.elapsed();
    let report = slow.await.expect("task");
    assert_eq!(
        report.reason.as_label(),
        "load",
        "tokenized, nothing cached"
    );
    assert!(report.blocks > 2_000, "{} blocks", report.blocks);
    assert!(
        meanwhile >= 20,
        "only {meanwhile} decisions ran during a {took:?} cold tokenization"
    );
    let stats = r.tokenize().stats();
    assert_eq!((stats.pool, stats.cached), (1, 0));
    // The same text again is served from the prefix cache, without the pool.
    let again = r
        .score(&request(LLAMA, Prompt::Text(cold.clone())), None)
        .await;
    assert_eq!(again.blocks, report.blocks);
    let stats = r.tokenize().stats();
    assert_eq!((stats.pool, stats.cached), (1, 1));
}

#[tokio::test(flavor = "current_thread")]
async fn an_overloaded_pool_routes_by_load_and_counts_why() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let endpoints = [A.to_string(), B.to_string()];

    // One thread, no queue: a second cold prompt is refused at once.
    let (r, _) = router(
        llama_only(),
        &endpoints,
        pool(1, 0, Duration::from_secs(60)),
    );
    let r = Arc::new(r);
    let busy = tokio::spawn({
        let r = r.clone();
        let text = random_words(2, 300_000);
        async move { r.decide(request(LLAMA, Prompt::Text(text)), None).await }
    });
    while r.tokenize().pool().running() == 0 {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let d = r
        .decide(request(LLAMA, Prompt::Text(random_words(3, 50_000))), None)
        .await
        .expect("still routed");
    assert_eq!(d.reason, "tokenize_overloaded");
    assert!(started.elapsed() < Duration::from_millis(100));
    // A prompt already cached needs no thread: still routed on its prefix path.
    let warm = r
        .decide(request(LLAMA, Prompt::TokenIds((0..64).collect())), None)
        .await
        .expect("routed");
    assert_eq!(warm.reason, "load");
    assert_eq!(busy.await.expect("task").expect("routed").reason, "load");

    // A deadline shorter than the work: abandoned, routed by load; the work
    // still finishes and warms the cache for the next identical prompt.
    let (r, _) = router(
        llama_only(),
        &endpoints,
        pool(1, 4, Duration::from_millis(5)),
    );
    let text = random_words(4, 300_000);
    let d = r
        .decide(request(LLAMA, Prompt::Text(text.clone())), None)
        .await
        .expect("still routed");
    assert_eq!(d.reason, "tokenize_timeout");
    let deadline = Instant::now() + Duration::from_secs(60);
    while r.tokenize().pool().running() > 0 {
        assert!(Instant::now() < deadline, "abandoned job never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let d = r
        .decide(request(LLAMA, Prompt::Text(text)), None)
        .await
        .expect("routed");
    assert_eq!(d.reason, "load");
    assert_eq!(r.tokenize().stats().cached, 1);

    let text = handle.render();
    for want in [
        r#"kvroute_scorer_fallbacks_total{reason="tokenize_overloaded"} 1"#,
        r#"kvroute_scorer_fallbacks_total{reason="tokenize_timeout"} 1"#,
        r#"kvroute_scorer_tokenize_path_total{path="cached"} 1"#,
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
}

/// `support/vllm_tokenize.py` serving Llama 3 and the tiny fixture on
/// several loopback addresses, like a pool of vLLM pods.
struct FakeVllm {
    child: tokio::process::Child,
    addrs: Vec<String>,
}

impl FakeVllm {
    async fn start(ips: &[&str], slow: &[&str]) -> FakeVllm {
        let python = kvroute_testkit::test_env::venv_python().expect("venv python");
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/vllm_tokenize.py");
        let mut cmd = tokio::process::Command::new(&python);
        cmd.arg(script)
            .arg("--model")
            .arg(format!("{LLAMA}={}", llama3_tokenizer().display()))
            .arg("--model")
            .arg(format!("{TINY}={}", tiny_dir().display()));
        for ip in ips {
            cmd.arg("--bind").arg(ip);
        }
        for s in slow {
            cmd.arg("--slow").arg(s);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run ./scripts/test.sh once)", python.display()));
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(60),
            tokio::io::BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .expect("fake vLLM ready in time")
        .expect("read");
        let addrs: Vec<String> = line
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("fake vLLM said {line:?}"))
            .split_whitespace()
            .map(String::from)
            .collect();
        assert_eq!(addrs.len(), ips.len());
        FakeVllm { child, addrs }
    }

    /// POSTs to /tokenize so far, over all addresses.
    async fn requests(&self) -> u64 {
        let body = stats(&self.addrs[0]).await;
        let v: serde_json::Value = serde_json::from_slice(&body).expect("stats json");
        v["requests"].as_u64().expect("requests")
    }
}

/// `GET /stats` as a raw HTTP/1.0 exchange (the server closes after it).
async fn stats(addr: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /stats HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    buf.split_off(at + 4)
}

impl Drop for FakeVllm {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn remote(timeout: Duration) -> TokenizeConfig {
    TokenizeConfig {
        remote: Some(RemoteConfig {
            timeout,
            ..RemoteConfig::default()
        }),
        ..TokenizeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_tokenize_gives_the_keys_and_pick_of_local_tokenization() {
    let vllm = FakeVllm::start(&["127.0.0.41", "127.0.0.42"], &[TINY]).await;
    let (p1, p2) = (vllm.addrs[0].clone(), vllm.addrs[1].clone());
    let endpoints = [p1.clone(), p2.clone()];
    let toks = tokenizers();
    // Debug builds on a busy CI machine: the wait is generous here; the
    // timeout case below uses the slow model.
    let (by_pod, index) = router(
        TokenizerRegistry::new([], vec![], TokenizerOptions::default()),
        &endpoints,
        remote(Duration::from_secs(10)),
    );
    // Loaded up front: a first load in the pool takes longer than its
    // deadline in a debug build (that request would route by load).
    let local_tokenizers = tokenizers();
    local_tokenizers.preload();
    let (local, local_index) = router(local_tokenizers, &endpoints, TokenizeConfig::default());

    // Completion, Llama 3: p2 holds the whole prompt, p1 its first half.
    let prompt = format!("{} {}", prose("remote", 3_000), random_words(5, 2_000));
    let ids = completion_ids(&toks, LLAMA, &prompt);
    for ix in [&index, &local_index] {
        store(ix, &p2, LLAMA, &ids);
        store(ix, &p1, LLAMA, &ids[..ids.len() / 2]);
    }
    let req = request(LLAMA, Prompt::Text(prompt.clone()));
    let want = local.score(&req, None).await;
    assert_eq!(
        (want.reason.as_label(), want.picked.as_deref()),
        ("prefix", Some(p2.as_str()))
    );
    for round in 0..2 {
        let got = by_pod.score(&req, None).await;
        assert_eq!(got.reason.as_label(), "prefix", "round {round}");
        assert_eq!(got.blocks, want.blocks, "round {round}");
        assert_eq!(got.picked, want.picked, "round {round}");
        let depths = |r: &scorer::route::Report| {
            r.scores
                .iter()
                .map(|s| (s.endpoint.clone(), s.blocks))
                .collect::<Vec<_>>()
        };
        assert_eq!(depths(&got), depths(&want), "round {round}");
    }
    // The second round was a cache hit: one request reached the pods.
    assert_eq!(vllm.requests().await, 1);
    assert_eq!(by_pod.tokenize().stats().remote, 2);

    // A chat through the tiny fixture's template: the slow model, so the
    // first decision gives up at a short timeout, routes by load, and the
    // late answer fills the cache for the next identical request.
    let (quick, quick_index) = router(
        TokenizerRegistry::new([], vec![], TokenizerOptions::default()),
        &endpoints,
        remote(Duration::from_millis(100)),
    );
    let messages = vec![
        json!({"role": "system", "content": prose("system prompt", 1_500)}),
        json!({"role": "user", "content": "Which pod holds this conversation?"}),
    ];
    let blocks = store(&quick_index, &p1, TINY, &chat_ids(&toks, TINY, &messages));
    let chat = request(TINY, Prompt::Chat(messages));
    let first = quick.score(&chat, None).await;
    assert_eq!(first.reason.as_label(), "remote_tokenize_timeout");
    assert!(first.picked.is_some());
    // The late answer lands in the cache (the slow pod answers after
    // 0.5 s); until then a request joins the one in flight and times out.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let second = loop {
        let report = quick.score(&chat, None).await;
        if report.reason.as_label() != "remote_tokenize_timeout"
            || std::time::Instant::now() > deadline
        {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(second.reason.as_label(), "prefix");
    assert_eq!(second.blocks, blocks);
    assert_eq!(second.picked.as_deref(), Some(p1.as_str()));

    // An unknown model: vLLM answers 404; routed by load.
    let other = request("no/such-model", Prompt::Text("hello".into()));
    assert_eq!(
        by_pod.score(&other, None).await.reason.as_label(),
        "remote_tokenize_failed"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_dead_pod_is_skipped_and_no_pod_means_routing_by_load() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let vllm = FakeVllm::start(&["127.0.0.43"], &[]).await;
    let live = vllm.addrs[0].clone();
    // Nothing listens there: bound, then closed.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.44:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let toks = tokenizers();
    let endpoints = [dead.clone(), live.clone()];
    let (r, index) = router(
        TokenizerRegistry::new([], vec![], TokenizerOptions::default()),
        &endpoints,
        remote(Duration::from_secs(10)),
    );
    // Whichever pod the rotation starts at, the prompt gets tokenized.
    for i in 0..3 {
        let prompt = format!("Question {i}: {}", prose("failover", 800));
        store(&index, &live, LLAMA, &completion_ids(&toks, LLAMA, &prompt));
        let report = r.score(&request(LLAMA, Prompt::Text(prompt)), None).await;
        assert_eq!(report.reason.as_label(), "prefix", "prompt {i}");
        assert_eq!(report.picked.as_deref(), Some(live.as_str()));
    }
    // Only dead pods: counted, routed by load. Remote off: no_tokenizer.
    let (r, _) = router(
        TokenizerRegistry::new([], vec![], TokenizerOptions::default()),
        std::slice::from_ref(&dead),
        remote(Duration::from_secs(10)),
    );
    let d = r
        .decide(request(LLAMA, Prompt::Text("hello there".into())), None)
        .await
        .expect("still routed");
    assert_eq!(
        (d.endpoint.as_str(), d.reason),
        (dead.as_str(), "remote_tokenize_failed")
    );
    let (off, _) = router(
        TokenizerRegistry::new([], vec![], TokenizerOptions::default()),
        std::slice::from_ref(&live),
        TokenizeConfig::default(),
    );
    let report = off
        .score(&request(LLAMA, Prompt::Text("hello there".into())), None)
        .await;
    assert_eq!(report.reason.as_label(), "no_tokenizer");
    let text = handle.render();
    for want in [
        r#"kvroute_scorer_fallbacks_total{reason="remote_tokenize_failed"} 1"#,
        r#"kvroute_scorer_remote_tokenize_total{outcome="connect_error"} 1"#,
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
}
