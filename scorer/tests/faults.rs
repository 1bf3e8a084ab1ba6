//! Faults and hostile input against the real `kvroute-scorer` binary (a
//! real Redis where the index matters): dead pods, runaway chat
//! templates, callers naming hosts to dial, oversized or idle streams,
//! misconfigured keying. One scorer process per test function; waits poll
//! with deadlines.

mod support;

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use support::e2e::{prose, scorer_args, start_redis};
use support::index::{IndexWriter, LLAMA, completion_ids, tokenizers};
use support::pods::Fleet;
use support::scorer_proc::{ScorerProc, endpoint_field, sum_samples};

/// Whether `endpoint` appears among a report's scores.
fn scored(report: &Value, endpoint: &str) -> bool {
    report["scores"]
        .as_array()
        .is_some_and(|s| s.iter().any(|e| e["endpoint"] == endpoint))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pod_holding_the_prefix_leaves_the_candidates_until_it_answers() {
    let redis = start_redis().await;
    let fleet = Fleet::start(1).await;
    let live = fleet.pods[0].name.clone();
    let live_addr: SocketAddr = live.parse().expect("addr");
    // Nothing listens there (yet): a pod that died.
    let dead_addr = SocketAddr::from(([127, 0, 0, 12], live_addr.port()));
    let dead = dead_addr.to_string();
    let extra = ["--endpoints", &dead, "--scrape-interval", "100ms"];
    let scorer = ScorerProc::start("dead-pod", &scorer_args(&redis, &fleet, &extra)).await;
    let writer = IndexWriter::connect(&redis.url()).await;
    let toks = tokenizers();

    // The live pod holds one prompt (to see the index connected), the dead
    // one the whole of another.
    let warm = prose("live pod", 1_500);
    writer
        .store(LLAMA, &live, &completion_ids(&toks, LLAMA, &warm))
        .await;
    scorer
        .score_until(
            &json!({"model": LLAMA, "prompt": warm}),
            Duration::from_secs(10),
            "index connected",
            |r| r["reason"] == "prefix" && r["picked"] == live.as_str(),
        )
        .await;
    let prompt = prose("dead pod", 1_500);
    writer
        .store(LLAMA, &dead, &completion_ids(&toks, LLAMA, &prompt))
        .await;
    let body = json!({"model": LLAMA, "prompt": prompt});
    // Once its scrapes fail three times in a row it is out: the live pod
    // gets the prompt, and keeps getting it.
    scorer
        .score_until(
            &body,
            Duration::from_secs(10),
            "dead pod marked down",
            |r| r["picked"] == live.as_str() && !scored(r, &dead),
        )
        .await;
    for i in 0..5 {
        let r = scorer.score(&body).await;
        assert_eq!(r["picked"], live.as_str(), "request {i}: {r:#}");
    }
    let transitions = "kvroute_scorer_endpoint_transitions_total";
    assert_eq!(scorer.counter(transitions, &[r#"to="down""#]).await, 1.0);
    assert_eq!(
        sum_samples(
            &scorer.metrics().await,
            "kvroute_scorer_endpoints_down",
            &[]
        ),
        1.0
    );
    let log = scorer.log();
    assert_eq!(
        log.matches("endpoint unreachable").count(),
        1,
        "one WARN for the transition:\n{log}"
    );

    // It answers again: back, and its prefix wins.
    let back = Fleet::start_at(&[dead_addr]).await;
    let r = scorer
        .score_until(&body, Duration::from_secs(10), "pod back", |r| {
            r["picked"] == dead.as_str() && r["reason"] == "prefix"
        })
        .await;
    assert!(endpoint_field(&r, &dead, "blocks").as_u64() > Some(0));
    assert_eq!(scorer.counter(transitions, &[r#"to="up""#]).await, 1.0);
    assert!(scorer.log().contains("endpoint answers again"));

    // Every pod unreachable: still routed (by whatever is known), never
    // "no endpoint".
    drop(back);
    drop(fleet);
    scorer
        .score_until(&body, Duration::from_secs(10), "all down", |_| true)
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sum_samples(
        &scorer.metrics().await,
        "kvroute_scorer_endpoints_down",
        &[],
    ) < 2.0
    {
        assert!(std::time::Instant::now() < deadline, "both pods never down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = scorer.score(&body).await;
    assert!(r["picked"].is_string(), "all down still picks: {r:#}");
    assert!(scored(&r, &live) && scored(&r, &dead), "{r:#}");
    assert!(
        scorer
            .counter("kvroute_scorer_all_candidates_down_total", &[])
            .await
            >= 1.0
    );
}

/// A model directory: the tiny fixture's tokenizer with `template` as its
/// chat template.
fn model_with_template(name: &str, template: &str) -> std::path::PathBuf {
    let tiny = support::index::tiny_dir();
    let dir = std::env::temp_dir().join(format!("kvroute-faults-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("model dir");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny.join(f), dir.join(f)).expect("copy tokenizer");
    }
    std::fs::write(dir.join("chat_template.jinja"), template).expect("template");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_chat_templates_stop_off_the_async_workers() {
    // Loops ~1e10 times; writes 1e9 copies of a string (6 GB).
    let loops = model_with_template(
        "loops",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    );
    let repeats = model_with_template(
        "repeats",
        "{% for m in messages %}{% for i in range(100000) %}{% for j in range(10000) %}{{ 'repeat' }}{% endfor %}{% endfor %}{% endfor %}",
    );
    let fleet = Fleet::start(1).await;
    let args: Vec<String> = [
        "--endpoints".to_string(),
        fleet.endpoints(),
        "--tokenizer".into(),
        format!("loops={}", loops.display()),
        "--tokenizer".into(),
        format!("repeats={}", repeats.display()),
        // Long enough that the answer is the render's own limit, not the
        // pool giving up on it.
        "--tokenize-timeout".into(),
        "60s".into(),
        "--tokenize-threads".into(),
        "2".into(),
    ]
    .to_vec();
    let scorer = std::sync::Arc::new(ScorerProc::start("templates", &args).await);
    // Small chats (these rendered inline on the async workers before).
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let started = std::time::Instant::now();
    let requests: Vec<_> = ["loops", "repeats", "loops", "repeats"]
        .into_iter()
        .map(|model| {
            let (scorer, body) = (scorer.clone(), chat(model));
            tokio::spawn(async move { scorer.score(&body).await })
        })
        .collect();
    // Meanwhile the scorer's async side answers health checks promptly.
    let mut probes = 0;
    while !requests.iter().all(|r| r.is_finished()) {
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            kvroute_testkit::net::http("GET", scorer.http, "/healthz"),
        )
        .await;
        assert!(
            matches!(probe, Ok(Ok((200, _)))),
            "/healthz during the renders: {probe:?}\n{}",
            scorer.log()
        );
        probes += 1;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "renders not bounded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(probes > 0);
    for r in requests {
        let report = r.await.expect("request");
        assert_eq!(report["reason"], "template_limit", "{report:#}");
        assert!(report["picked"].is_string(), "still routed: {report:#}");
    }
    // (/v1/score is a dry run: decisions, not reports, feed the fallback
    // counter; the WARN names the model.)
    let log = scorer.log();
    assert!(log.contains("chat template stopped at its limit"), "{log}");
    for d in [loops, repeats] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_cannot_make_the_scorer_dial_a_host_of_their_choice() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A listener on a loopback port that is no candidate: counts whoever
    // connects.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let target_addr = target.local_addr().expect("addr").to_string();
    let dialed = std::sync::Arc::new(AtomicUsize::new(0));
    let accept = tokio::spawn({
        let dialed = dialed.clone();
        async move {
            while let Ok((_s, _)) = target.accept().await {
                dialed.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let fleet = Fleet::start(1).await;
    let args: Vec<String> = [
        "--endpoints",
        &fleet.endpoints(),
        "--remote-tokenize",
        "--remote-tokenize-timeout",
        "2s",
    ]
    .map(String::from)
    .to_vec();
    let scorer = ScorerProc::start("ssrf", &args).await;
    // No local tokenizer for this model: remote tokenization would ask a pod.
    let report = scorer
        .score(&json!({
            "model": "no-local-tokenizer",
            "prompt": "the prompt a caller wants posted elsewhere",
            "endpoints": [target_addr],
        }))
        .await;
    assert_eq!(report["reason"], "remote_tokenize_failed", "{report:#}");
    let mut indexer = support::indexer_client::IndexerClient::connect(scorer.grpc).await;
    let answer = indexer
        .call(
            scorer::indexer_api::GET_POD_SCORES_PATH,
            scorer::indexer_api::GetPodScoresRequest {
                prompt: "the prompt a caller wants posted elsewhere".into(),
                model_name: "no-local-tokenizer".into(),
                pod_identifiers: vec![target_addr.clone()],
            },
        )
        .await;
    assert!(answer.is_err(), "no pod tokenized it: {answer:?}");
    // Both answered, so any dial would have happened by now.
    assert_eq!(
        dialed.load(Ordering::SeqCst),
        0,
        "the scorer dialed {target_addr}"
    );
    assert_eq!(
        scorer
            .counter("kvroute_scorer_dial_rejected_total", &[])
            .await,
        2.0
    );
    // A candidate named by the caller is still asked (the fake pod has no
    // /tokenize, so it fails there, but it was dialed: its log says so).
    let report = scorer
        .score(&json!({
            "model": "no-local-tokenizer",
            "prompt": "asked of a candidate",
            "endpoints": [fleet.pods[0].name],
        }))
        .await;
    assert_eq!(report["reason"], "remote_tokenize_failed", "{report:#}");
    assert_eq!(fleet.arrivals(), vec![fleet.pods[0].name.clone()]);
    accept.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keying_that_disagrees_with_the_ingesters_is_refused_or_flagged() {
    let redis = start_redis().await;
    let fleet = Fleet::start(1).await;
    let client = redis::Client::open(redis.url()).expect("client");
    // Past redis-rs's 500 ms default on a loaded CI machine.
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect");
    let _: () = redis::cmd("HSET")
        .arg("kvroute:keying")
        .arg(&[
            ("hash_scheme", "sha256_cbor"),
            ("hash_seed", "another-seed"),
            ("block_size", "16"),
            ("updated_ms", "1"),
            ("writer", "ingester-0"),
        ])
        .query_async(&mut conn)
        .await
        .expect("seed keying");
    // The ingesters index a pod that is no candidate, and one model.
    let _: () = redis::cmd("SADD")
        .arg("kvroute:pods")
        .arg("127.0.0.99:8000")
        .query_async(&mut conn)
        .await
        .expect("pods");
    let _: () = redis::cmd("HSET")
        .arg("kvroute:models")
        .arg(LLAMA)
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("models");

    // Refused, saying why.
    let args = scorer_args(&redis, &fleet, &["--keying-check-interval", "100ms"]);
    let refused = kvroute_testkit::scorer::ScorerProcess::start(&kvroute_testkit::scorer::Launch {
        binary: std::path::Path::new(support::scorer_proc::bin()),
        args: &args,
        name: "keying-refused",
        clear_env: true,
    })
    .await;
    let Err(e) = refused else {
        panic!("a scorer with another seed started")
    };
    let msg = e.to_string();
    assert!(
        msg.contains("another-seed")
            && msg.contains("kvroute-e2e")
            && msg.contains("--allow-keying-mismatch"),
        "{msg}"
    );

    // Allowed: it runs, says so in /readyz (still 200) and the gauge.
    let args = scorer_args(
        &redis,
        &fleet,
        &[
            "--keying-check-interval",
            "100ms",
            "--allow-keying-mismatch",
        ],
    );
    let scorer = ScorerProc::start("keying-allowed", &args).await;
    let (code, text) = kvroute_testkit::net::http("GET", scorer.http, "/readyz")
        .await
        .expect("readyz");
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains("keying: mismatch:") && text.contains("another-seed"),
        "{text}"
    );
    let metrics = scorer.metrics().await;
    assert_eq!(
        sum_samples(&metrics, "kvroute_scorer_keying_mismatch", &[]),
        1.0
    );
    // The indexed pod matches no candidate: gauge and WARN.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sum_samples(
        &scorer.metrics().await,
        "kvroute_scorer_indexed_pods_unmatched",
        &[],
    ) < 1.0
    {
        assert!(std::time::Instant::now() < deadline, "{}", scorer.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        scorer
            .log()
            .contains("no pod in kvroute:pods is a candidate")
    );
    // The keying is fixed by the operator: the mismatch clears.
    let _: () = redis::cmd("HSET")
        .arg("kvroute:keying")
        .arg("hash_seed")
        .arg(support::index::SEED)
        .query_async(&mut conn)
        .await
        .expect("fix keying");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = kvroute_testkit::net::http("GET", scorer.http, "/readyz")
            .await
            .expect("readyz");
        if text.contains("keying: ok") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sum_samples(
            &scorer.metrics().await,
            "kvroute_scorer_keying_mismatch",
            &[]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_are_capped_and_score_bodies_share_the_ext_proc_limit() {
    let redis = start_redis().await;
    let fleet = Fleet::start(1).await;
    let pod = fleet.pods[0].name.clone();
    let extra = ["--max-lookup-blocks", "4", "--max-body-bytes", "4194304"];
    let scorer = ScorerProc::start("limits", &scorer_args(&redis, &fleet, &extra)).await;
    let writer = IndexWriter::connect(&redis.url()).await;
    // 20 blocks held; only the first 4 are looked up.
    let ids: Vec<u32> = (0..20 * 16).collect();
    writer.store(LLAMA, &pod, &ids).await;
    let body = json!({"model": LLAMA, "token_ids": ids});
    let r = scorer
        .score_until(&body, Duration::from_secs(10), "index connected", |r| {
            r["reason"] == "prefix"
        })
        .await;
    assert_eq!(r["blocks"], 20, "{r:#}");
    assert_eq!(endpoint_field(&r, &pod, "blocks"), 4, "{r:#}");
    assert!(
        scorer
            .counter("kvroute_scorer_lookups_capped_total", &[])
            .await
            >= 1.0
    );
    // /v1/score takes what ext_proc takes (--max-body-bytes; axum's own
    // default was 2 MiB), and no more.
    let prompt = |bytes: usize| json!({"model": "no-tokenizer", "prompt": "a ".repeat(bytes / 2)});
    let mut client = support::http::Client::connect(scorer.http).await;
    let reply = support::http::score(&mut client, &prompt(3 << 20)).await;
    assert_eq!(reply.status, 200, "3 MiB: {:?}", reply.body);
    let mut client = support::http::Client::connect(scorer.http).await;
    let reply = support::http::score(&mut client, &prompt(5 << 20)).await;
    assert_eq!(reply.status, 413, "5 MiB");
}
