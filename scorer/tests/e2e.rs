//! End to end with the real `kvroute-scorer` binary: client -> Envoy (1.40,
//! configured from `deploy/envoy/envoy.yaml.tmpl`) -> ext_proc (the scorer
//! process) -> fake vLLM pods on 127.0.0.11/12/13, with the index in a real
//! Redis that the test writes as the ingester would (keys computed with
//! `kvroute_core::keys` from the token ids of the same tokenizers the scorer is
//! given).
//!
//! Processes cost a second or two to start on the 2-core CI machines, so
//! each test function starts its fixtures once and runs related checks in
//! turn, each named in its failure message; waits poll with deadlines.

mod support;

use bytes::Bytes;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::e2e::{
    JSON, NO_ENDPOINT, completion, expect_delivered, fail, post, prose, scorer_args, start_envoy,
    start_redis, why,
};
use support::envoy::Envoy;
use support::http::{self, Client};
use support::index::{
    IndexWriter, LLAMA, TINY, chat_ids, completion_ids, key_args, tokenizer_args, tokenizers,
};
use support::indexer_client::IndexerClient;
use support::pods::Fleet;
use support::scorer_proc::{ScorerProc, endpoint_field, sum_samples};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_pod_the_index_names() {
    let redis = start_redis().await;
    let fleet = Fleet::start(2).await;
    let (a, b) = (fleet.pods[0].name.clone(), fleet.pods[1].name.clone());
    let scorer = ScorerProc::start("routing", &scorer_args(&redis, &fleet, &[])).await;
    // The second listener's subset hint allows only `a`.
    let envoy = start_envoy(&scorer, &a).await;
    let (main, subset) = (envoy.ports.main, envoy.ports.subset);
    let writer = IndexWriter::connect(&redis.url()).await;
    let toks = tokenizers();

    // Completions, Llama 3 tokenizer: `b` holds the prompt. The first
    // /v1/score answers "prefix" once the scorer's index is connected.
    let prompt = prose("completions", 2_000);
    let ids = completion_ids(&toks, LLAMA, &prompt);
    let keys = writer.store(LLAMA, &b, &ids).await;
    let report = scorer
        .score_until(
            &json!({"model": LLAMA, "prompt": prompt}),
            Duration::from_secs(10),
            "index connected",
            |r| r["reason"] == "prefix",
        )
        .await;
    assert_eq!(report["picked"], b.as_str(), "{report:#}");
    assert_eq!(report["blocks"], keys.len(), "scorer's keys = test's keys");
    assert_eq!(endpoint_field(&report, &b, "blocks"), keys.len());
    let body = completion(LLAMA, &prompt, false);
    let reply = post(main, "/v1/completions", &[], http::full(body.clone())).await;
    expect_delivered("completion", &reply, &b, &body, &envoy, &scorer);

    // Bodies over 64 KiB, fixed-length and chunked, sharing that prefix.
    let big = format!("{prompt}{}", prose("filler", 120_000));
    let body = completion(LLAMA, &big, false);
    let reply = post(main, "/v1/completions", &[], http::full(body.clone())).await;
    expect_delivered("120 KB body", &reply, &b, &body, &envoy, &scorer);
    let chunks = body.chunks(7_000).map(Bytes::copy_from_slice).collect();
    let reply = post(main, "/v1/completions", &[], http::chunked(chunks)).await;
    expect_delivered("chunked upload", &reply, &b, &body, &envoy, &scorer);

    // Chat through the tiny fixture's template.
    let messages = vec![
        json!({"role": "system", "content": prose("a system prompt", 600)}),
        json!({"role": "user", "content": "Which pod holds this conversation?"}),
    ];
    writer
        .store(TINY, &b, &chat_ids(&toks, TINY, &messages))
        .await;
    let body = json!({"model": TINY, "messages": messages})
        .to_string()
        .into_bytes();
    let reply = post(main, "/v1/chat/completions", &[], http::full(body.clone())).await;
    expect_delivered("chat", &reply, &b, &body, &envoy, &scorer);

    // A client-set destination header is replaced by the picker's choice.
    let body = completion(LLAMA, &prompt, false);
    let spoof = ("x-gateway-destination-endpoint", a.as_str());
    let reply = post(main, "/v1/completions", &[spoof], http::full(body.clone())).await;
    expect_delivered("spoofed destination", &reply, &b, &body, &envoy, &scorer);

    // The subset hint wins over the index: only `a` is allowed there.
    let reply = post(subset, "/v1/completions", &[], http::full(body.clone())).await;
    expect_delivered("subset hint", &reply, &a, &body, &envoy, &scorer);

    // A streaming response passes through as the pod produces it.
    fleet.hold(true);
    let mut client = Client::connect(Envoy::addr(main)).await;
    let request = http::request(
        "POST",
        "/v1/completions",
        &[JSON],
        http::full(completion(LLAMA, &prompt, true)),
    );
    let mut response = client.send(request).await;
    assert_eq!(response.status(), 200, "streaming");
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        http::next_data(response.body_mut()),
    )
    .await;
    let Ok(Some(first)) = first else {
        fail(
            "streaming",
            format!("no first event: {first:?}"),
            &envoy,
            &scorer,
        )
    };
    fleet.hold(false);
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(data) = http::next_data(response.body_mut()).await {
        text.push_str(&String::from_utf8_lossy(&data));
    }
    assert_eq!(text.matches("data: ").count(), 5, "streaming: {text}");
    assert!(
        text.contains(&b) && text.ends_with("data: [DONE]\n\n"),
        "streaming: {text}"
    );

    // An unparseable body: the picker's 400, and no pod sees it.
    let arrived = fleet.arrived();
    let reply = post(main, "/v1/completions", &[], http::full("{nope")).await;
    assert_eq!(reply.status, 400, "{:?}", reply.body);
    assert_eq!(reply.json()["error"]["code"], 400);
    assert_eq!(fleet.arrived(), arrived, "400 reached a pod");

    // llm-d's remote-indexer API on the same gRPC port.
    let mut indexer = IndexerClient::connect(scorer.grpc).await;
    let scores = indexer
        .get_pod_scores(&prompt, LLAMA, &[])
        .await
        .expect("GetPodScores");
    assert_eq!(scores.len(), 1, "{scores:?}");
    assert_eq!(
        (scores[0].pod.as_str(), scores[0].score),
        (b.as_str(), keys.len() as f64)
    );
    let only_a = indexer.get_pod_scores(&prompt, LLAMA, &[&a]).await;
    assert_eq!(only_a.expect("GetPodScores for a"), vec![]);

    // `why` names the pod holding the prompt's blocks, for text and chat.
    let mut args = vec!["--redis-url".to_string(), redis.url()];
    args.extend(key_args());
    args.extend(tokenizer_args());
    let mut text_args = args.clone();
    text_args.extend([
        "--model".into(),
        LLAMA.into(),
        "--prompt".into(),
        prompt.clone(),
    ]);
    let out = why(&text_args).await;
    let row = out.lines().find(|l| l.starts_with(b.as_str()));
    let row = row.unwrap_or_else(|| panic!("why: no row for {b}:\n{out}"));
    assert!(
        row.split_whitespace().nth(1) == Some(&keys.len().to_string()),
        "why: {b} holds {} blocks:\n{out}",
        keys.len()
    );
    assert!(!out.contains(&a), "why: {a} holds nothing:\n{out}");
    let file =
        std::env::temp_dir().join(format!("kvroute-e2e-messages-{}.json", std::process::id()));
    std::fs::write(&file, json!({"messages": messages}).to_string()).expect("messages file");
    let mut chat_args = args.clone();
    chat_args.extend(["--model".into(), TINY.into(), "--messages-file".into()]);
    chat_args.push(file.display().to_string());
    let out = why(&chat_args).await;
    let _ = std::fs::remove_file(&file);
    assert!(
        out.lines().any(|l| l.starts_with(b.as_str())),
        "why chat:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_routes_by_load_then_prefix_resumes() {
    let mut redis = start_redis().await;
    let fleet = Fleet::start(2).await;
    let b = fleet.pods[1].name.clone();
    let scorer = ScorerProc::start("outage", &scorer_args(&redis, &fleet, &[])).await;
    let envoy = start_envoy(&scorer, NO_ENDPOINT).await;
    let main = envoy.ports.main;
    let toks = tokenizers();
    let prompt = prose("an outage", 1_500);
    let ids = completion_ids(&toks, TINY, &prompt);
    let score_body = json!({"model": TINY, "prompt": prompt});
    let body = completion(TINY, &prompt, false);

    IndexWriter::connect(&redis.url())
        .await
        .store(TINY, &b, &ids)
        .await;
    let connected = |r: &Value| r["reason"] == "prefix";
    scorer
        .score_until(&score_body, Duration::from_secs(10), "index", connected)
        .await;
    let reply = post(main, "/v1/completions", &[], http::full(body.clone())).await;
    expect_delivered("before the outage", &reply, &b, &body, &envoy, &scorer);

    // No candidate at all (the gateway's subset names nothing routable): 503.
    let arrived = fleet.arrived();
    let reply = post(
        envoy.ports.subset,
        "/v1/completions",
        &[],
        http::full(body.clone()),
    )
    .await;
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    assert_eq!(reply.json()["error"]["code"], 503);
    assert_eq!(fleet.arrived(), arrived, "503 reached a pod");

    // Redis dies: every request still routes (by load) and succeeds, and
    // the fallback is counted.
    tokio::task::block_in_place(|| redis.kill());
    let fallbacks = |text: &str| {
        ["index_unavailable", "index_timeout"]
            .iter()
            .map(|r| {
                let label = format!("reason=\"{r}\"");
                sum_samples(text, "kvroute_scorer_fallbacks_total", &[&label])
            })
            .sum::<f64>()
    };
    let before = fallbacks(&scorer.metrics().await);
    let started = Instant::now();
    for i in 0..8 {
        let reply = post(main, "/v1/completions", &[], http::full(body.clone())).await;
        let pod = reply.json()["backend"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let check = format!("outage request {i}");
        expect_delivered(&check, &reply, &pod, &body, &envoy, &scorer);
    }
    let per_request = started.elapsed() / 8;
    let after = fallbacks(&scorer.metrics().await);
    assert!(after >= before + 8.0, "fallbacks {before} -> {after}");
    assert!(
        per_request < Duration::from_secs(1),
        "{per_request:?} per request"
    );
    let report = scorer.score(&score_body).await;
    assert!(
        matches!(
            report["reason"].as_str(),
            Some("index_unavailable" | "index_timeout")
        ),
        "{report:#}"
    );
    let mut indexer = IndexerClient::connect(scorer.grpc).await;
    let status = indexer
        .get_pod_scores(&prompt, TINY, &[])
        .await
        .expect_err("GetPodScores without Redis");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ),
        "{status:?}"
    );

    // Redis is back (empty); once the blocks are written again, prefix
    // routing resumes without restarting the scorer.
    tokio::task::block_in_place(|| redis.restart()).expect("restart redis");
    IndexWriter::connect(&redis.url())
        .await
        .store(TINY, &b, &ids)
        .await;
    let back = |r: &Value| r["reason"] == "prefix" && r["picked"] == b.as_str();
    scorer
        .score_until(&score_body, Duration::from_secs(15), "after restart", back)
        .await;
    for i in 0..3 {
        let reply = post(main, "/v1/completions", &[], http::full(body.clone())).await;
        expect_delivered(
            &format!("after restart {i}"),
            &reply,
            &b,
            &body,
            &envoy,
            &scorer,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_blending_in_flight_sharing_and_vllm_metrics() {
    let redis = start_redis().await;
    let fleet = Fleet::start(3).await;
    let names: Vec<String> = fleet.pods.iter().map(|p| p.name.clone()).collect();
    let hot = names[1].clone();
    let load_flags = |replica: &'static str| {
        [
            "--max-in-flight",
            "8",
            "--max-waiting",
            "4",
            "--scrape-interval",
            "50ms",
            "--in-flight-sync",
            "100ms",
            "--replica-id",
            replica,
        ]
    };
    let one = ScorerProc::start("r1", &scorer_args(&redis, &fleet, &load_flags("r1"))).await;
    let two = ScorerProc::start("r2", &scorer_args(&redis, &fleet, &load_flags("r2"))).await;
    let envoy = start_envoy(&one, NO_ENDPOINT).await;
    let main = envoy.ports.main;
    let prompt = prose("a hot prefix", 1_500);
    let ids = completion_ids(&tokenizers(), TINY, &prompt);
    IndexWriter::connect(&redis.url())
        .await
        .store(TINY, &hot, &ids)
        .await;
    let score_body = json!({"model": TINY, "prompt": prompt});
    let body = completion(TINY, &prompt, false);
    let in_flight = |r: &Value, pod: &str| endpoint_field(r, pod, "in_flight");
    let settled = |r: &Value| {
        r["reason"] == "prefix"
            && r["picked"] == hot.as_str()
            && names
                .iter()
                .all(|p| endpoint_field(r, p, "waiting") == 0 && in_flight(r, p) == 0)
    };
    for scorer in [&one, &two] {
        let within = Duration::from_secs(10);
        scorer
            .score_until(&score_body, within, "connected and scraped", settled)
            .await;
    }

    // A low rate: every request goes to the pod holding the prefix.
    for i in 0..10 {
        let reply = post(main, "/v1/completions", &[], http::full(body.clone())).await;
        expect_delivered(&format!("low rate {i}"), &reply, &hot, &body, &envoy, &one);
    }
    one.score_until(&score_body, Duration::from_secs(5), "released", settled)
        .await;

    // 40 held in flight, started one after another: the hot pod takes 8
    // (--max-in-flight), the others fill to 8 each, and once every pod is
    // saturated the prefix decides again.
    fleet.hold(true);
    let base = fleet.arrived();
    let mut requests = Vec::new();
    for i in 0..40 {
        let body = body.clone();
        requests.push(tokio::spawn(async move {
            post(main, "/v1/completions", &[], http::full(body)).await
        }));
        fleet
            .wait_arrivals(base + i + 1, Duration::from_secs(10))
            .await;
    }
    let last_started = Instant::now();
    let order = fleet.arrivals()[base..].to_vec();
    let count = |pod: &str, range: std::ops::Range<usize>| {
        order[range].iter().filter(|p| *p == pod).count()
    };
    assert_eq!(count(&hot, 0..8), 8, "first 8 to the hot pod: {order:?}");
    assert_eq!(count(&hot, 8..24), 0, "then the others: {order:?}");
    for p in &names {
        let want = if *p == hot { 24 } else { 8 };
        assert_eq!(count(p, 0..40), want, "{p}: {order:?}");
    }

    // The second replica, which routed none of them, counts them within a
    // few sync intervals.
    let shared = |r: &Value| names.iter().all(|p| in_flight(r, p) == count(p, 0..40));
    two.score_until(
        &score_body,
        Duration::from_secs(2),
        "in flight shared",
        shared,
    )
    .await;
    let seen_after = last_started.elapsed();
    assert!(
        seen_after < Duration::from_secs(1),
        "shared after {seen_after:?}"
    );

    // Released, every request completes on the pod that took it, and both
    // replicas see the counts drop back to zero.
    fleet.hold(false);
    for (i, request) in requests.into_iter().enumerate() {
        let reply = request.await.expect("request task");
        expect_delivered(&format!("held {i}"), &reply, &order[i], &body, &envoy, &one);
    }
    for scorer in [&one, &two] {
        let idle = |r: &Value| names.iter().all(|p| in_flight(r, p) == 0);
        scorer
            .score_until(&score_body, Duration::from_secs(2), "drained", idle)
            .await;
    }

    // vLLM reports a queue above --max-waiting on the hot pod: it is avoided
    // despite its prefix, and chosen again once the queue drains.
    fleet.pods[1].set_waiting(10);
    let queued = |r: &Value| {
        endpoint_field(r, &hot, "waiting") == 10 && endpoint_field(r, &hot, "saturated") == true
    };
    one.score_until(&score_body, Duration::from_secs(5), "queue scraped", queued)
        .await;
    for i in 0..6 {
        let reply = post(main, "/v1/completions", &[], http::full(body.clone())).await;
        let pod = reply.json()["backend"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        expect_delivered(&format!("queued {i}"), &reply, &pod, &body, &envoy, &one);
        assert_ne!(pod, hot, "request {i} went to the queued pod");
    }
    fleet.pods[1].set_waiting(0);
    one.score_until(
        &score_body,
        Duration::from_secs(5),
        "queue drained",
        settled,
    )
    .await;
    let reply = post(main, "/v1/completions", &[], http::full(body.clone())).await;
    expect_delivered("queue drained", &reply, &hot, &body, &envoy, &one);
}
