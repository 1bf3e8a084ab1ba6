//! The ext_proc protocol over a real tonic channel: the scorer's gRPC server
//! on `127.0.0.1:0`, a test client playing Envoy's part message by message,
//! and a table-driven `Decide` that records what it was asked.

mod support;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest,
};
use envoy_types::pb::google::protobuf::{ListValue, Value, value::Kind};
use scorer::decide::Prompt;
use scorer::ext_proc::{ExtProcConfig, MAX_CHUNK_BYTES};
use std::sync::Arc;
use std::time::Duration;
use support::decide::{NO_CANDIDATES_MODEL, TableDecide};
use support::extproc::{
    Stream, body, completion, destination, headers, immediate, routed, streamed, subset_metadata,
};
use support::scorer::Scorer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const POD_A: &str = "127.0.0.1:8000";
const POD_B: &str = "127.0.0.2:8000";
const POD_DEFAULT: &str = "127.0.0.9:8000";

async fn scorer(config: ExtProcConfig) -> (Arc<TableDecide>, Scorer) {
    let decide = Arc::new(TableDecide::new(
        &[("model-a", POD_A), ("model-b", POD_B)],
        POD_DEFAULT,
    ));
    let scorer = Scorer::start(Arc::clone(&decide), config).await;
    (decide, scorer)
}

#[tokio::test]
async fn buffers_the_body_then_routes_and_streams_it_back() {
    let (decide, scorer) = scorer(ExtProcConfig::default()).await;
    let mut s = Stream::open(&scorer).await;
    let payload = completion("model-a", &"hello ".repeat(500));
    s.send(headers("/v1/completions", &[], false), None).await;
    for part in payload.chunks(97) {
        s.send(body(part, false), None).await;
    }
    s.quiet().await;
    s.send(body(b"", true), None).await;
    assert_eq!(routed(&mut s).await, POD_A);
    let (back, sizes) = s.request_body().await;
    assert_eq!(back, payload);
    assert_eq!(sizes.len(), 1);
    let (request, subset) = decide.last_call().expect("decided");
    assert_eq!(request.model, "model-a");
    assert_eq!(request.request_id.as_deref(), Some("req-1"));
    assert!(matches!(request.prompt, Prompt::Text(ref t) if t.starts_with("hello hello")));
    assert_eq!(subset, None);
}

#[tokio::test]
async fn large_body_comes_back_identical_in_bounded_chunks() {
    let (_decide, scorer) = scorer(ExtProcConfig::default()).await;
    let mut s = Stream::open(&scorer).await;
    let messages = serde_json::json!([{"role": "user", "content": "x".repeat(300_000)}]);
    let payload = serde_json::json!({"model": "model-b", "messages": messages})
        .to_string()
        .into_bytes();
    s.send(headers("/v1/chat/completions", &[], false), None)
        .await;
    for part in payload.chunks(16_384) {
        s.send(body(part, false), None).await;
    }
    s.send(body(b"", true), None).await;
    assert_eq!(routed(&mut s).await, POD_B);
    let (back, sizes) = s.request_body().await;
    assert!(back == payload, "body changed on the way back");
    assert!(sizes.iter().all(|&n| n <= MAX_CHUNK_BYTES), "{sizes:?}");
    assert_eq!(sizes.len(), payload.len().div_ceil(MAX_CHUNK_BYTES));
}

#[tokio::test]
async fn headers_only_request_routes_at_once_and_echoes_the_response() {
    let (decide, scorer) = scorer(ExtProcConfig::default()).await;
    let mut s = Stream::open(&scorer).await;
    s.send(headers("/v1/models", &[], true), None).await;
    assert_eq!(routed(&mut s).await, POD_DEFAULT);
    let (request, _) = decide.last_call().expect("decided");
    assert_eq!(
        (request.model.as_str(), request.prompt),
        ("", Prompt::Text(String::new()))
    );

    s.send(Msg::ResponseHeaders(HttpHeaders::default()), None)
        .await;
    let Reply::ResponseHeaders(h) = s.next().await else {
        panic!("response headers reply")
    };
    assert_eq!(h.response, Some(CommonResponse::default()));
    let big = vec![b'r'; MAX_CHUNK_BYTES + 10];
    for (part, end) in [(&b"abc"[..], false), (&big[..], false), (&b"def"[..], true)] {
        s.send(
            Msg::ResponseBody(HttpBody {
                body: part.to_vec(),
                end_of_stream: end,
                ..Default::default()
            }),
            None,
        )
        .await;
    }
    let mut echoed = Vec::new();
    loop {
        let Reply::ResponseBody(b) = s.next().await else {
            panic!("response body reply")
        };
        let (chunk, end) = streamed(b.response);
        assert!(chunk.len() <= MAX_CHUNK_BYTES);
        echoed.extend_from_slice(&chunk);
        if end {
            break;
        }
    }
    assert_eq!(echoed, [&b"abc"[..], &big, b"def"].concat());
    assert_eq!(decide.wait_finished(1).await, 1);
    assert_eq!(decide.finished.lock().as_slice(), [POD_DEFAULT]);
}

#[tokio::test]
async fn client_destination_header_is_overwritten() {
    let (_decide, scorer) = scorer(ExtProcConfig::default()).await;
    let mut s = Stream::open(&scorer).await;
    let spoofed = [("x-gateway-destination-endpoint", "6.6.6.6:1")];
    s.send(headers("/v1/completions", &spoofed, false), None)
        .await;
    s.send(body(&completion("model-b", "p"), true), None).await;
    // `destination` checks the mutation is a set (not an append) in raw_value.
    assert_eq!(routed(&mut s).await, POD_B);
}

#[tokio::test]
async fn subset_hint_reaches_decide_in_both_forms() {
    let (decide, scorer) = scorer(ExtProcConfig::default()).await;
    let list = Kind::ListValue(ListValue {
        values: [POD_B, POD_DEFAULT]
            .map(|e| Value {
                kind: Some(Kind::StringValue(e.to_owned())),
            })
            .to_vec(),
    });
    let csv = Kind::StringValue(format!("{POD_DEFAULT}, {POD_B}"));
    for (hint, want) in [(list, [POD_B, POD_DEFAULT]), (csv, [POD_DEFAULT, POD_B])] {
        let mut s = Stream::open(&scorer).await;
        s.send(
            headers("/v1/completions", &[], false),
            Some(subset_metadata(hint)),
        )
        .await;
        s.send(body(&completion("model-a", "p"), true), None).await;
        assert_eq!(
            routed(&mut s).await,
            want[0],
            "model-a's pod is outside the subset"
        );
        let (_, subset) = decide.last_call().expect("decided");
        assert_eq!(subset, Some(want.map(str::to_owned).to_vec()));
    }
}

#[tokio::test]
async fn bad_bodies_get_400() {
    let (decide, scorer) = scorer(ExtProcConfig::default()).await;
    let cases: [(&str, &[u8]); 5] = [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", br#"{"prompt": "no model"}"#),
        ("/v1/foo", br#"{"model": "m"}"#),
        (
            "/v1/chat/completions",
            br#"{"model": "m", "messages": "not a list"}"#,
        ),
        ("/v1/completions", br#"{"model": "m", "prompt": [-5]}"#),
    ];
    for (path, payload) in cases {
        let mut s = Stream::open(&scorer).await;
        s.send(headers(path, &[], false), None).await;
        s.send(body(payload, false), None).await;
        s.send(body(b"", true), None).await;
        let (code, json, reply) = immediate(s.next().await);
        assert_eq!(code, 400, "{}", String::from_utf8_lossy(payload));
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{json}"
        );
        assert_eq!(json["error"]["code"], 400);
        let content_type = &reply.headers.expect("headers").set_headers[0];
        assert_eq!(
            content_type.header.as_ref().map(|h| h.raw_value.as_slice()),
            Some(&b"application/json"[..])
        );
        s.ends().await;
    }
    assert_eq!(decide.decided(), 0);
    assert_eq!(decide.finished_count(), 0);
}

#[tokio::test]
async fn no_candidates_gets_503_and_oversized_bodies_413() {
    let (decide, scorer) = scorer(ExtProcConfig {
        max_body_bytes: 1000,
        ..ExtProcConfig::default()
    })
    .await;
    let mut s = Stream::open(&scorer).await;
    s.send(headers("/v1/completions", &[], false), None).await;
    s.send(body(&completion(NO_CANDIDATES_MODEL, "p"), true), None)
        .await;
    let (code, json, _) = immediate(s.next().await);
    assert_eq!(
        (code, &json["error"]["code"]),
        (503, &serde_json::json!(503))
    );
    s.ends().await;

    let mut s = Stream::open(&scorer).await;
    s.send(headers("/v1/completions", &[], false), None).await;
    s.send(body(&[b' '; 600], false), None).await;
    s.send(body(&[b' '; 600], false), None).await;
    let (code, _, _) = immediate(s.next().await);
    assert_eq!(code, 413);
    assert_eq!((decide.decided(), decide.finished_count()), (1, 0));

    // One gRPC message over the decoding limit (4 MiB + 64 KiB here): a
    // 413 too, not a stream that ends without an answer.
    let mut s = Stream::open(&scorer).await;
    s.send(headers("/v1/completions", &[], false), None).await;
    s.send(body(&vec![b' '; 5 << 20], false), None).await;
    let (code, json, _) = immediate(s.next().await);
    assert_eq!(code, 413, "{json}");
    assert_eq!(decide.decided(), 1);
}

#[tokio::test]
async fn over_the_buffer_budget_routes_unbuffered_and_idle_bodies_get_408() {
    let (decide, scorer) = scorer(ExtProcConfig {
        max_body_bytes: 10_000,
        max_buffered_bytes: 1_500,
        body_idle_timeout: std::time::Duration::from_secs(1),
    })
    .await;
    // A holds 800 bytes of the budget while its body is incomplete.
    let payload = completion("model-a", &"hello ".repeat(200));
    let mut a = Stream::open(&scorer).await;
    a.send(headers("/v1/completions", &[], false), None).await;
    a.send(body(&payload[..800], false), None).await;
    a.quiet().await;
    // B's 800 bytes would pass it: routed by load at once, body streamed
    // through as it comes, never buffered.
    let mut b = Stream::open(&scorer).await;
    b.send(headers("/v1/completions", &[], false), None).await;
    b.send(body(&[b'x'; 800], false), None).await;
    assert_eq!(routed(&mut b).await, POD_DEFAULT);
    let Reply::RequestBody(first) = b.next().await else {
        panic!("body echoed")
    };
    assert_eq!(streamed(first.response), (vec![b'x'; 800], false));
    b.send(body(&[b'y'; 200], true), None).await;
    let Reply::RequestBody(rest) = b.next().await else {
        panic!("rest echoed")
    };
    assert_eq!(streamed(rest.response), (vec![b'y'; 200], true));
    // A still completes, buffered, and routes on its prompt.
    a.send(body(&payload[800..], true), None).await;
    assert_eq!(routed(&mut a).await, POD_A);
    assert_eq!(a.request_body().await.0, payload);
    assert_eq!(decide.decided(), 2);

    // A body that stalls: 408 and the stream ends.
    let mut c = Stream::open(&scorer).await;
    c.send(headers("/v1/completions", &[], false), None).await;
    c.send(body(b"{\"model\"", false), None).await;
    let (code, _, _) = immediate(c.next().await);
    assert_eq!(code, 408);
    c.ends().await;
}

#[tokio::test]
async fn response_trailers_end_the_request_once() {
    let (decide, scorer) = scorer(ExtProcConfig::default()).await;
    let mut s = Stream::open(&scorer).await;
    s.send(headers("/v1/completions", &[], false), None).await;
    s.send(body(&completion("model-a", "p"), false), None).await;
    // Request trailers instead of an empty final chunk also end the body.
    s.send(Msg::RequestTrailers(HttpTrailers::default()), None)
        .await;
    assert_eq!(routed(&mut s).await, POD_A);
    let Reply::RequestBody(b) = s.next().await else {
        panic!("body")
    };
    assert_eq!(streamed(b.response), (completion("model-a", "p"), false));
    assert!(matches!(s.next().await, Reply::RequestTrailers(_)));
    s.send(Msg::ResponseHeaders(HttpHeaders::default()), None)
        .await;
    assert!(matches!(s.next().await, Reply::ResponseHeaders(_)));
    s.send(
        Msg::ResponseBody(HttpBody {
            body: b"x".to_vec(),
            ..Default::default()
        }),
        None,
    )
    .await;
    assert!(matches!(s.next().await, Reply::ResponseBody(_)));
    assert_eq!(decide.finished_count(), 0, "response still streaming");
    assert_eq!(
        decide.prefill_done_count(),
        1,
        "first body byte: prefill done"
    );
    s.send(Msg::ResponseTrailers(HttpTrailers::default()), None)
        .await;
    assert!(matches!(s.next().await, Reply::ResponseTrailers(_)));
    assert_eq!(decide.wait_finished(1).await, 1);
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        decide.finished_count(),
        1,
        "the stream's end must not release again"
    );
}

/// The first non-empty response body chunk (the first streamed token)
/// ends the prefill once; headers and empty chunks do not; the response's
/// end then calls `finished` once, after it.
#[tokio::test]
async fn first_response_byte_ends_the_prefill_once() {
    let (decide, scorer) = scorer(ExtProcConfig::default()).await;
    let mut s = Stream::open(&scorer).await;
    s.send(headers("/v1/completions", &[], false), None).await;
    s.send(body(&completion("model-b", "p"), true), None).await;
    assert_eq!(routed(&mut s).await, POD_B);
    assert!(matches!(s.next().await, Reply::RequestBody(_)));
    s.send(Msg::ResponseHeaders(HttpHeaders::default()), None)
        .await;
    assert!(matches!(s.next().await, Reply::ResponseHeaders(_)));
    let chunk = |b: &[u8], end: bool| {
        Msg::ResponseBody(HttpBody {
            body: b.to_vec(),
            end_of_stream: end,
            ..Default::default()
        })
    };
    s.send(chunk(b"", false), None).await;
    assert!(matches!(s.next().await, Reply::ResponseBody(_)));
    assert_eq!(decide.prefill_done_count(), 0, "headers and empty chunks");
    s.send(chunk(b"data: {\"t\":1}\n\n", false), None).await;
    assert!(matches!(s.next().await, Reply::ResponseBody(_)));
    assert_eq!(decide.prefill_done.lock().as_slice(), [POD_B]);
    s.send(chunk(b"data: {\"t\":2}\n\n", false), None).await;
    assert!(matches!(s.next().await, Reply::ResponseBody(_)));
    assert_eq!(decide.finished_count(), 0);
    s.send(chunk(b"data: [DONE]\n\n", true), None).await;
    assert!(matches!(s.next().await, Reply::ResponseBody(_)));
    assert_eq!(decide.wait_finished(1).await, 1);
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        (decide.prefill_done_count(), decide.finished_count()),
        (1, 1),
        "one first byte, one end"
    );
}

#[tokio::test]
async fn finished_once_when_the_client_goes_away() {
    let (decide, scorer) = scorer(ExtProcConfig::default()).await;
    for cut_after_response_headers in [false, true] {
        let mut s = Stream::open(&scorer).await;
        s.send(headers("/v1/completions", &[], false), None).await;
        s.send(body(&completion("model-b", "p"), true), None).await;
        assert_eq!(routed(&mut s).await, POD_B);
        s.request_body().await;
        if cut_after_response_headers {
            s.send(Msg::ResponseHeaders(HttpHeaders::default()), None)
                .await;
            assert!(matches!(s.next().await, Reply::ResponseHeaders(_)));
        }
        drop(s);
    }
    // A stream dropped before any decision releases nothing.
    let s = Stream::open(&scorer).await;
    s.send(headers("/v1/completions", &[], false), None).await;
    drop(s);
    assert_eq!(decide.wait_finished(2).await, 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(decide.finished.lock().as_slice(), [POD_B, POD_B]);
}

#[tokio::test]
async fn metrics_count_outcomes_and_decision_time() {
    static RECORDER: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    let handle = RECORDER.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("recorder")
    });
    let (_decide, scorer) = scorer(ExtProcConfig::default()).await;
    let mut s = Stream::open(&scorer).await;
    s.send(headers("/v1/completions", &[], false), None).await;
    s.send(body(&completion("model-a", "p"), true), None).await;
    routed(&mut s).await;
    let mut s = Stream::open(&scorer).await;
    s.send(headers("/v1/completions", &[], false), None).await;
    s.send(body(b"nope", true), None).await;
    immediate(s.next().await);
    let text = handle.render();
    for want in [
        r#"kvroute_scorer_requests_total{outcome="routed"}"#,
        r#"kvroute_scorer_requests_total{outcome="bad_request"}"#,
        r#"kvroute_scorer_immediate_responses_total{code="400"}"#,
        "kvroute_scorer_decision_seconds",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
}

mod grpc_server {
    use super::*;
    use scorer::grpc::TlsArgs;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    async fn status(health: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let reply = health
            .check(request)
            .await
            .expect("health check")
            .into_inner();
        ServingStatus::try_from(reply.status).expect("known status")
    }

    const SERVICES: [&str; 4] = [
        "",
        "liveness",
        "readiness",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ];

    #[tokio::test]
    async fn health_follows_the_toggles() {
        let (_decide, scorer) = scorer(ExtProcConfig::default()).await;
        let channel = Channel::from_shared(format!("http://{}", scorer.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut health = HealthClient::new(channel);
        for service in SERVICES {
            assert_eq!(
                status(&mut health, service).await,
                ServingStatus::Serving,
                "{service}"
            );
        }
        scorer.health.set_ready(false).await;
        let want = [
            ServingStatus::Serving,
            ServingStatus::Serving,
            ServingStatus::NotServing,
            ServingStatus::NotServing,
        ];
        for (service, want) in SERVICES.into_iter().zip(want) {
            assert_eq!(status(&mut health, service).await, want, "{service}");
        }
        scorer.health.set_live(false).await;
        assert_eq!(
            status(&mut health, "liveness").await,
            ServingStatus::NotServing
        );
    }

    #[tokio::test]
    async fn readiness_follows_the_http_checks_until_shutdown() {
        let (_decide, scorer) = scorer(ExtProcConfig::default()).await;
        let channel = Channel::from_shared(format!("http://{}", scorer.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut health = HealthClient::new(channel);
        let readiness = kvroute_service::health::Readiness::default();
        let check = readiness.check("index");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let follower = tokio::spawn({
            let (health, shutdown) = (scorer.health.clone(), shutdown.clone());
            async move {
                health
                    .follow(readiness, Duration::from_millis(5), shutdown)
                    .await
            }
        });
        let mut wait_for = async |want: ServingStatus| {
            for _ in 0..400 {
                if status(&mut health, "readiness").await == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            false
        };
        assert!(
            wait_for(ServingStatus::NotServing).await,
            "check failing: not ready"
        );
        check.set(true);
        assert!(
            wait_for(ServingStatus::Serving).await,
            "check passing: ready"
        );
        shutdown.cancel();
        follower.await.expect("follower ends on shutdown");
        assert!(
            wait_for(ServingStatus::NotServing).await,
            "not ready after shutdown"
        );
    }

    #[tokio::test]
    async fn serves_tls_from_cert_and_key_files() {
        let ca = kvroute_testkit::tls::TestCa::new().expect("test CA (openssl CLI)");
        let (cert, key) = (ca.server_cert(), ca.server_key());
        let pem = std::fs::read(ca.ca_pem()).expect("CA cert");

        let decide = Arc::new(TableDecide::new(&[("model-a", POD_A)], POD_DEFAULT));
        let tls = TlsArgs {
            grpc_tls_cert: Some(cert),
            grpc_tls_key: Some(key),
        };
        let scorer = Scorer::start_tls(decide, ExtProcConfig::default(), tls).await;
        let client_tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://{}", scorer.addr))
            .expect("uri")
            .tls_config(client_tls)
            .expect("client tls")
            .connect()
            .await
            .expect("TLS connect");
        let mut client = ExternalProcessorClient::new(channel.clone());
        let (tx, rx) = mpsc::channel(4);
        let mut replies = client
            .process(ReceiverStream::new(rx))
            .await
            .expect("process")
            .into_inner();
        let request = ProcessingRequest {
            request: Some(headers("/v1/models", &[], true)),
            ..Default::default()
        };
        tx.send(request).await.expect("send");
        let reply = replies
            .message()
            .await
            .expect("ok")
            .expect("reply")
            .response
            .expect("response");
        assert_eq!(destination(reply), POD_DEFAULT);
        assert_eq!(
            status(&mut HealthClient::new(channel), "readiness").await,
            ServingStatus::Serving
        );
    }
}
