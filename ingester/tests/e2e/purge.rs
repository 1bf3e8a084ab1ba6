//! Pods leaving the index without an event saying so (`--purge-silent-after`,
//! `--purge-after`), and the operator's purges of an endpoint's
//! data-parallel ranks that the purging process never heard.

use super::harness::{
    Engine, Ingester, Peer, SEED, batch, bind_endpoint, connecting, gpu, keys, purge_cli, tokens,
    topic,
};
use super::{index, redis};
use kvroute_core::ids::{ModelName, PodId, Tier};
use kvroute_core::index::{Index as _, IndexOp};
use kvroute_core::keys::HashScheme;
use kvroute_redis::RedisIndex;
use serde_json::json;
use std::time::{Duration, Instant};

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;
const PURGES: &str = "kvroute_ingester_purges_total";

/// Bind mode has no pod list: a pod that published nothing for
/// `--purge-silent-after` is purged, one that keeps publishing is kept, and
/// `--purge-after` (the connect set) never touches pods heard in bind mode.
/// A purged pod that publishes again is indexed again. In connect mode the
/// connection is the sign of life: an idle pod is kept while connected and
/// purged once it has been unreachable that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_pods_are_purged_active_and_connect_pods_are_kept() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let engine = Engine::new(SCHEME, SEED);
    let store = |t: &[u32]| batch(vec![engine.stored(None, t, None).0]);
    let (a, b, c) = ("127.0.0.71:8000", "127.0.0.72:8000", "127.0.0.73:8000");
    let (a_first, a_again, b_tokens, c_tokens) = (
        tokens(710, 2),
        tokens(711, 1),
        tokens(720, 2),
        tokens(730, 2),
    );

    // C publishes on its own socket, which the ingester dials (connect mode),
    // once, then idles.
    let pc = Peer::spawn(json!({
        "topic": topic(c, model), "pub": "tcp://127.0.0.1:0", "await_subscriber_ms": 8000,
        "steps": [store(&c_tokens)],
    }))
    .await;
    let zmq = bind_endpoint();
    let ing = Ingester::start_bound(
        &redis.url(),
        &zmq,
        &[
            "--hash-scheme",
            SCHEME.as_str(),
            "--zmq-connect",
            &pc.pub_ep,
            "--purge-after",
            "300ms",
            "--purge-silent-after",
            "1500ms",
        ],
    )
    .await;
    // A (bind mode) stores once and then stays connected but silent, as an
    // idle or hung vLLM does; B (bind mode) keeps publishing.
    let mut pa = Peer::spawn(connecting(
        &ing,
        &topic(a, model),
        "v0.10",
        json!([store(&a_first), {"wait": "again"}, store(&a_again)]),
    ))
    .await;
    let mut pb_script = connecting(&ing, &topic(b, model), "v0.33", json!([store(&b_tokens)]));
    pb_script["forever_interval_ms"] = json!(150);
    let pb = Peer::spawn(pb_script).await;

    let (ka, kb, kc) = (
        keys(SCHEME, &a_first),
        keys(SCHEME, &b_tokens),
        keys(SCHEME, &c_tokens),
    );
    idx.expect("A stored", &ka, &[&gpu(a)]).await;
    let seen = Instant::now();
    idx.expect("B stored", &kb, &[&gpu(b)]).await;
    idx.expect("C stored", &kc, &[&gpu(c)]).await;

    // Well past --purge-after: A, a bind-mode pod, is not "gone" (it was
    // never in the connect set), and not yet silent for 1.5 s.
    tokio::time::sleep(Duration::from_millis(900).saturating_sub(seen.elapsed())).await;
    idx.assert("A kept before --purge-silent-after", &ka, &[&gpu(a)])
        .await;
    idx.expect("A purged once silent", &ka, &[]).await;
    assert!(
        seen.elapsed() >= Duration::from_millis(900),
        "purged too early"
    );
    idx.assert("B, still publishing, kept", &kb, &[&gpu(b)])
        .await;
    idx.assert("C, idle but connected, kept", &kc, &[&gpu(c)])
        .await;
    assert_eq!(ing.metric(PURGES, &[("reason", "silent")]).await, 1.0);
    assert_eq!(ing.metric(PURGES, &[("reason", "gone")]).await, 0.0);

    // A speaks again: indexed again (its sequence continues; nothing is
    // held against a purged pod).
    pa.resume("again").await;
    idx.expect("A indexed again", &keys(SCHEME, &a_again), &[&gpu(a)])
        .await;

    // C goes away: unreachable and silent, it is purged after the time.
    pc.kill().await;
    let killed = Instant::now();
    idx.expect("C purged once unreachable", &kc, &[]).await;
    assert!(killed.elapsed() >= Duration::from_millis(1400));
    idx.assert("B kept", &kb, &[&gpu(b)]).await;
    for p in [pa, pb] {
        p.kill().await;
    }
}

/// Entries of `pod` for `tokens`, written straight into Redis as another
/// ingester (or an earlier process) would have.
fn store_op(model: &str, pod: &str, t: &[u32]) -> IndexOp {
    IndexOp::store_keys(
        &ModelName::new(model),
        &PodId::new(pod),
        Tier::gpu(),
        &keys(SCHEME, t),
    )
}

/// Purging an endpoint clears every data-parallel rank registered in
/// `kvroute:pods`, over the admin API of an ingester that never heard any of
/// them and with the CLI (a process that heard nothing); other endpoints,
/// and a rank-qualified purge's sibling ranks, stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_an_endpoint_clears_ranks_this_process_never_heard() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let (x, y, z) = ("127.0.0.81:8000", "127.0.0.82:8000", "127.0.0.83:8000");
    let t = |tag| tokens(tag, 2);
    let entries = [
        (format!("{x}#dp0"), t(810)),
        (format!("{x}#dp1"), t(811)),
        (format!("{x}#dp7"), t(817)),
        (y.to_string(), t(820)),
        (format!("{y}#dp0"), t(821)),
        (format!("{z}#dp0"), t(830)),
        (format!("{z}#dp2"), t(832)),
        // Another port of the same IP is another endpoint.
        ("127.0.0.81:8001#dp0".to_string(), t(840)),
    ];
    let writer = RedisIndex::connect(&redis.url()).await.expect("connect");
    let ops: Vec<IndexOp> = entries
        .iter()
        .map(|(pod, tk)| store_op(model, pod, tk))
        .collect();
    writer.apply(&ops).await.expect("seed the index");
    for (pod, tk) in &entries {
        idx.assert("seeded", &keys(SCHEME, tk), &[&gpu(pod)]).await;
    }

    let ing = Ingester::start(&redis.url(), &["--hash-scheme", SCHEME.as_str()]).await;
    let (code, body) = ing.post(&format!("/admin/purge?pod={x}")).await;
    assert_eq!(code, 202, "{body}");
    for pod in [
        x.to_string(),
        format!("{x}#dp0"),
        format!("{x}#dp1"),
        format!("{x}#dp7"),
    ] {
        assert!(body.contains(&format!("purging {pod}\n")), "{body}");
    }
    for (pod, tk) in &entries[..3] {
        idx.expect(&format!("{pod} purged over HTTP"), &keys(SCHEME, tk), &[])
            .await;
    }
    // A rank names one cache: its siblings and the rankless pod stay.
    let (code, body) = ing.post(&format!("/admin/purge?pod={y}%23dp0")).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(
        body,
        format!("purging {y}#dp0\npurging 1 pods holding 2 entries\n")
    );
    idx.expect("Y#dp0 purged", &keys(SCHEME, &entries[4].1), &[])
        .await;
    idx.assert("Y kept", &keys(SCHEME, &entries[3].1), &[&gpu(y)])
        .await;

    let (ok, out) = purge_cli(&redis.url(), &[z]).await;
    assert!(ok, "purge CLI failed: {out}");
    assert_eq!(
        out,
        format!("purged {z}\npurged {z}#dp0\npurged {z}#dp2\npurged 3 pods, 4 entries\n")
    );
    for (pod, tk) in &entries[5..7] {
        idx.assert(&format!("{pod} purged by the CLI"), &keys(SCHEME, tk), &[])
            .await;
    }
    let (pod, tk) = &entries[7];
    idx.assert("the other port kept", &keys(SCHEME, tk), &[&gpu(pod)])
        .await;
    idx.assert("Y kept", &keys(SCHEME, &entries[3].1), &[&gpu(y)])
        .await;
}

/// After Redis comes back empty (FLUSHALL, a restart without persistence)
/// the registry `kvroute:pods` is written again as pods publish: before, a
/// pod the writer had registered once was never re-added, so the operator's
/// purge of its endpoint found no `#dpN` rank, cleared nothing and still
/// printed "purged". The answers count pods and entries, and an id that
/// matches nothing is refused (CLI exit code, HTTP 404) instead of
/// "purged".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_after_a_wipe_finds_reregistered_ranks_and_refuses_typos() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let engine = Engine::new(SCHEME, SEED);
    let endpoint = "127.0.0.86:8000";
    let pod = format!("{endpoint}#dp1");
    let (before, after) = (tokens(860, 2), tokens(861, 3));
    let ing = Ingester::start(&redis.url(), &["--hash-scheme", SCHEME.as_str()]).await;
    let mut script = connecting(
        &ing,
        &topic(endpoint, model),
        "v0.33",
        json!([
            batch(vec![engine.stored(None, &before, None).0]),
            {"wait": "wiped"},
            batch(vec![engine.stored(None, &after, None).0]),
        ]),
    );
    script["data_parallel_rank"] = json!(1);
    let mut peer = Peer::spawn(script).await;
    idx.expect("stored", &keys(SCHEME, &before), &[&gpu(&pod)])
        .await;
    idx.command(&["FLUSHALL"]).await.expect("FLUSHALL");
    peer.resume("wiped").await;
    idx.expect(
        "stored after the wipe",
        &keys(SCHEME, &after),
        &[&gpu(&pod)],
    )
    .await;
    let registered = idx
        .command(&["SISMEMBER", "kvroute:pods", &pod])
        .await
        .expect("SISMEMBER");
    assert_eq!(
        registered,
        redis::Value::Int(1),
        "re-registered after the wipe"
    );

    // A typo: refused, nothing cleared.
    let (ok, out) = purge_cli(&redis.url(), &["127.0.0.86:8001"]).await;
    assert!(!ok, "a pod id matching nothing must fail: {out}");
    let (code, body) = ing.post("/admin/purge?pod=127.0.0.86:8009").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no pod matches"), "{body}");
    idx.assert("kept", &keys(SCHEME, &after), &[&gpu(&pod)])
        .await;

    // The endpoint finds its rank through the registry and says what it cleared.
    let (ok, out) = purge_cli(&redis.url(), &[endpoint]).await;
    assert!(ok, "purge CLI failed: {out}");
    assert_eq!(
        out,
        format!("purged {endpoint}\npurged {pod}\npurged 2 pods, 3 entries\n")
    );
    idx.assert("the rank purged", &keys(SCHEME, &after), &[])
        .await;
    peer.kill().await;
}
