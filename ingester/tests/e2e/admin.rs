//! Who may call `/admin/*` over real HTTP: the health endpoints stay open,
//! the admin API answers a loopback peer or the bearer token.

use super::harness::{Ingester, gpu, keys, tokens};
use super::{index, redis};
use kvroute_core::ids::{ModelName, PodId, Tier};
use kvroute_core::index::{Index as _, IndexOp};
use kvroute_core::keys::HashScheme;
use kvroute_redis::RedisIndex;
use kvroute_testkit::net::http_with_headers;

const SCHEME: HashScheme = HashScheme::Sha256Cbor64;
const REFUSED: &str = "kvroute_ingester_admin_refused_total";

/// Before, `POST /admin/purge` answered anyone who reached the port (on
/// 0.0.0.0 by default). With `--admin-token` and loopback not trusted (as
/// behind a sidecar proxy forwarding from loopback): no token or a wrong one
/// is 401 and clears nothing, the token purges; without a token configured
/// a non-trusted peer gets 403. `/metrics`, `/healthz`, `/readyz` need nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_needs_loopback_or_the_token_health_stays_open() {
    let redis = redis();
    let model = "m";
    let idx = index(&redis, model);
    let pod = "127.0.0.87:8000";
    let t = tokens(870, 2);
    let writer = RedisIndex::connect(&redis.url()).await.expect("connect");
    writer
        .apply(&[IndexOp::store_keys(
            &ModelName::new(model),
            &PodId::new(pod),
            Tier::gpu(),
            &keys(SCHEME, &t),
        )])
        .await
        .expect("seed");

    let ing = Ingester::start(
        &redis.url(),
        &[
            "--hash-scheme",
            SCHEME.as_str(),
            "--admin-token",
            "s3cret",
            "--admin-allow-loopback",
            "false",
        ],
    )
    .await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(ing.get(path).await.0, 200, "{path} stays open");
    }
    let purge = format!("/admin/purge?pod={pod}");
    let (code, body) = ing.post(&purge).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let (code, _) = http_with_headers(
        "POST",
        ing.http,
        &purge,
        &[("Authorization", "Bearer s3cre")],
    )
    .await
    .expect("HTTP");
    assert_eq!(code, 401, "a wrong token");
    idx.assert("nothing purged", &keys(SCHEME, &t), &[&gpu(pod)])
        .await;
    assert_eq!(ing.metric(REFUSED, &[("reason", "no_token")]).await, 1.0);
    assert_eq!(ing.metric(REFUSED, &[("reason", "bad_token")]).await, 1.0);
    let (code, body) = http_with_headers(
        "POST",
        ing.http,
        &purge,
        &[("Authorization", "Bearer s3cret")],
    )
    .await
    .expect("HTTP");
    assert_eq!(code, 202, "{body}");
    idx.expect("purged with the token", &keys(SCHEME, &t), &[])
        .await;

    // No token configured and loopback not trusted: nobody may.
    let closed = Ingester::start(
        &redis.url(),
        &[
            "--hash-scheme",
            SCHEME.as_str(),
            "--admin-allow-loopback",
            "false",
        ],
    )
    .await;
    let (code, body) = closed.post(&purge).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("loopback"), "{body}");
    assert_eq!(closed.get("/readyz").await.0, 200);
}
