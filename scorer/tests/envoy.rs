//! End to end through a real Envoy (1.40, from the test venv) configured from
//! `deploy/envoy/envoy.yaml.tmpl`: client -> Envoy -> ext_proc (the scorer
//! with a table-driven `Decide`) -> Envoy's ORIGINAL_DST cluster -> fake vLLM
//! pods on 127.0.0.11 and 127.0.0.12.
//!
//! Starting Envoy costs about a second, so one test function starts it once
//! and runs every check against it, each check named in its failure message.

mod support;

use bytes::Bytes;
use scorer::ext_proc::ExtProcConfig;
use std::sync::Arc;
use std::time::Duration;
use support::backend::{self, Backend};
use support::decide::{NO_CANDIDATES_MODEL, TableDecide};
use support::envoy::Envoy;
use support::http::{self, Client, Reply};
use support::scorer::Scorer;

struct World {
    pod_a: Backend,
    pod_b: Backend,
    decide: Arc<TableDecide>,
    envoy: Envoy,
    _scorer: Scorer,
}

impl World {
    async fn client(&self, port: u16) -> Client {
        Client::connect(Envoy::addr(port)).await
    }

    /// Fails `check` with Envoy's log attached.
    fn fail(&self, check: &str, what: String) -> ! {
        panic!("{check}: {what}\n--- envoy log ---\n{}", self.envoy.log())
    }

    fn expect_status(&self, check: &str, reply: &Reply, status: u16) {
        if reply.status.as_u16() != status {
            let body = String::from_utf8_lossy(&reply.body);
            self.fail(
                check,
                format!("status {} (want {status}): {body}", reply.status),
            );
        }
    }

    /// The backend report of a routed request, checked to come from `pod`
    /// with the body intact and only the picker's destination header.
    fn expect_delivered(&self, check: &str, reply: &Reply, pod: &Backend, sent: &[u8]) {
        self.expect_status(check, reply, 200);
        let report = reply.json();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(sent));
        let want = serde_json::json!({
            "backend": pod.state.name,
            "len": sent.len(),
            "sha256": sha,
            "destination_header": [pod.state.name],
        });
        for key in ["backend", "len", "sha256", "destination_header"] {
            if report[key] != want[key] {
                self.fail(
                    check,
                    format!("{key}: got {}, want {}", report[key], want[key]),
                );
            }
        }
    }
}

fn completion(model: &str, prompt_bytes: usize, stream: bool) -> Vec<u8> {
    let prompt = "the quick brown fox ".repeat(prompt_bytes / 20 + 1);
    serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 8, "stream": stream})
        .to_string()
        .into_bytes()
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_end_to_end() {
    let (pod_a, pod_b) = backend::start_pair().await;
    let (a, b) = (pod_a.state.name.clone(), pod_b.state.name.clone());
    let decide = Arc::new(TableDecide::new(&[("model-a", &a), ("model-b", &b)], &a));
    let scorer = Scorer::start(Arc::clone(&decide), ExtProcConfig::default()).await;
    let (scorer_addr, subset_pod) = (scorer.addr, b.clone());
    let envoy = tokio::task::spawn_blocking(move || Envoy::start(scorer_addr, &subset_pod))
        .await
        .expect("envoy start");
    let w = World {
        pod_a,
        pod_b,
        decide,
        envoy,
        _scorer: scorer,
    };
    let main = w.envoy.ports.main;

    // Routing follows the decision; small and >64 KiB bodies arrive intact.
    let mut client = w.client(main).await;
    for (model, pod, size) in [("model-a", &w.pod_a, 2_000), ("model-b", &w.pod_b, 300_000)] {
        let body = completion(model, size, false);
        let reply = client
            .call(http::request(
                "POST",
                "/v1/completions",
                &[JSON],
                http::full(body.clone()),
            ))
            .await;
        w.expect_delivered(&format!("route {model} ({size} B)"), &reply, pod, &body);
    }

    // A chunked client upload (no content-length) of ~200 KB.
    let body = completion("model-b", 200_000, false);
    let chunks = body.chunks(7_000).map(Bytes::copy_from_slice).collect();
    let reply = client
        .call(http::request(
            "POST",
            "/v1/completions",
            &[JSON],
            http::chunked(chunks),
        ))
        .await;
    w.expect_delivered("chunked upload", &reply, &w.pod_b, &body);

    // A client-set destination header is replaced by the picker's choice.
    let body = completion("model-b", 500, false);
    let spoof = ("x-gateway-destination-endpoint", a.as_str());
    let reply = client
        .call(http::request(
            "POST",
            "/v1/completions",
            &[JSON, spoof],
            http::full(body.clone()),
        ))
        .await;
    w.expect_delivered("spoofed destination header", &reply, &w.pod_b, &body);

    // Body-less requests route at once (by load; here the fallback pod).
    let reply = client
        .call(http::request(
            "GET",
            "/v1/models",
            &[],
            http::full(Bytes::new()),
        ))
        .await;
    w.expect_delivered("headers-only GET", &reply, &w.pod_a, b"");

    // Chat bodies route by model too.
    let chat =
        serde_json::json!({"model": "model-b", "messages": [{"role": "user", "content": "hi"}]});
    let body = chat.to_string().into_bytes();
    let reply = client
        .call(http::request(
            "POST",
            "/v1/chat/completions",
            &[JSON],
            http::full(body.clone()),
        ))
        .await;
    w.expect_delivered("chat", &reply, &w.pod_b, &body);

    // A streaming response passes through as it is produced: the first SSE
    // event reaches the client while the pod is still holding the rest.
    let body = completion("model-a", 1_000, true);
    let mut response = client
        .send(http::request(
            "POST",
            "/v1/completions",
            &[JSON],
            http::full(body),
        ))
        .await;
    if response.status() != 200 {
        w.fail("streaming", format!("status {}", response.status()));
    }
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        http::next_data(response.body_mut()),
    )
    .await;
    let first = match first {
        Ok(Some(data)) => data,
        other => w.fail(
            "streaming",
            format!("first event not delivered before the rest: {other:?}"),
        ),
    };
    assert!(
        first.starts_with(b"data: {"),
        "streaming: first event {first:?}"
    );
    w.pod_a.state.release.notify_one();
    let mut events = vec![first];
    while let Some(data) = http::next_data(response.body_mut()).await {
        events.push(data);
    }
    let text: String = events
        .iter()
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect();
    assert_eq!(
        text.matches("data: ").count(),
        5,
        "streaming: all events arrive: {text}"
    );
    assert!(
        text.ends_with("data: [DONE]\n\n") && text.contains(&a),
        "streaming: {text}"
    );

    // The subset hint set before ext_proc restricts the choice: model-a's
    // pod is outside it, so the request lands on the one pod the hint allows.
    let before = w.decide.decided();
    let mut subset_client = w.client(w.envoy.ports.subset).await;
    let body = completion("model-a", 500, false);
    let reply = subset_client
        .call(http::request(
            "POST",
            "/v1/completions",
            &[JSON],
            http::full(body.clone()),
        ))
        .await;
    w.expect_delivered("subset hint", &reply, &w.pod_b, &body);
    let (_, subset) = w.decide.last_call().expect("decided");
    assert_eq!(w.decide.decided(), before + 1);
    assert_eq!(
        subset,
        Some(vec![b.clone()]),
        "subset hint as ext_proc received it"
    );

    // Errors come back as the picker's immediate responses.
    let hits = (w.pod_a.hits(), w.pod_b.hits());
    for (check, body, status) in [
        ("400 not JSON", b"{nope".to_vec(), 400),
        ("400 no model", br#"{"prompt": "x"}"#.to_vec(), 400),
        (
            "503 no candidates",
            completion(NO_CANDIDATES_MODEL, 100, false),
            503,
        ),
    ] {
        let mut client = w.client(main).await;
        let reply = client
            .call(http::request(
                "POST",
                "/v1/completions",
                &[JSON],
                http::full(body),
            ))
            .await;
        w.expect_status(check, &reply, status);
        let error = reply.json();
        assert_eq!(error["error"]["code"], status, "{check}: {error}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{check}"
        );
    }
    assert_eq!(
        (w.pod_a.hits(), w.pod_b.hits()),
        hits,
        "rejected requests reach no pod"
    );

    // A client that leaves mid-response: Envoy ends the ext_proc stream and
    // the picker still releases the endpoint.
    let released = w.decide.finished_count();
    let mut leaver = w.client(main).await;
    let body = completion("model-b", 1_000, true);
    let mut response = leaver
        .send(http::request(
            "POST",
            "/v1/completions",
            &[JSON],
            http::full(body),
        ))
        .await;
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        http::next_data(response.body_mut()),
    )
    .await;
    assert!(
        matches!(first, Ok(Some(_))),
        "client gone: first event {first:?}"
    );
    assert_eq!(
        w.decide.finished_count(),
        released,
        "client gone: released while streaming"
    );
    drop((response, leaver));

    // Every routed request was released exactly once (the 503 was never routed).
    let routed = w.decide.decided() - 1;
    assert_eq!(w.decide.wait_finished(routed).await, routed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(w.decide.finished_count(), routed, "finished more than once");

    // Envoy saw nothing wrong with the protocol.
    let stats = w.envoy.admin("/stats?filter=ext_proc").1;
    for line in stats.lines() {
        let bad = [
            "spurious_msgs_received",
            "streams_failed",
            "rejected_header_mutations",
            "message_timeouts",
        ];
        if bad.iter().any(|b| line.contains(b)) && !line.ends_with(": 0") {
            w.fail("envoy ext_proc stats", line.to_owned());
        }
    }
    assert!(
        stats.contains("http.kvroute_inference.ext_proc.streams_started"),
        "stats: {stats}"
    );
}
