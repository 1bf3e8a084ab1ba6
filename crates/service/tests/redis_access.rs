//! Reaching Redis the way operators secure it, through `RedisArgs::open`
//! (the code path of both binaries): TLS with a private CA and with client
//! certificates, least-privilege ACL users for the ingester and the scorer
//! (the commands `docs/redis-acl.md` lists, applied to a real server), and
//! configuration errors reported as [`IndexError::Config`], on which the
//! binaries exit instead of retrying forever.

use clap::Parser;
use kvroute_core::ids::{BlockKey, ModelName, PodId, Tier};
use kvroute_core::index::{Index, IndexError, IndexOp};
use kvroute_redis::AnyIndex;
use kvroute_service::config::RedisArgs;
use kvroute_testkit::redis_server::{RedisServer, documented_acl};
use kvroute_testkit::tls::TestCa;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    redis: RedisArgs,
}

fn args(argv: &[&str]) -> RedisArgs {
    let mut all = vec!["test"];
    all.extend_from_slice(argv);
    Cli::try_parse_from(all).expect("flags parse").redis
}

fn no_env(_: &str) -> Option<String> {
    None
}

async fn open(argv: &[&str]) -> Result<AnyIndex, IndexError> {
    args(argv).open(no_env).await
}

fn path(p: std::path::PathBuf) -> String {
    p.display().to_string()
}

/// Stores a 3-block prefix on one pod, then reads it back.
async fn round_trip(index: &AnyIndex, what: &str) {
    let (model, pod) = (ModelName::new("m"), PodId::new("127.0.0.11:8000"));
    let keys = [BlockKey(11), BlockKey(12), BlockKey(13)];
    index
        .apply(&[IndexOp::store_keys(&model, &pod, Tier::gpu(), &keys)])
        .await
        .unwrap_or_else(|e| panic!("{what}: store: {e}"));
    let found = index
        .lookup(&model, &keys, None)
        .await
        .unwrap_or_else(|e| panic!("{what}: lookup: {e}"));
    assert_eq!(found.max_depth(), 3, "{what}: {found:?}");
}

fn expect_config(result: Result<AnyIndex, IndexError>, what: &str, needle: &str) {
    match result {
        Err(IndexError::Config(msg)) => {
            assert!(
                msg.contains(needle),
                "{what}: {msg:?} should name {needle:?}"
            )
        }
        Err(other) => panic!("{what}: expected a configuration error, got {other:?}"),
        Ok(_) => panic!("{what}: connected"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_client_certificates() {
    let ca = TestCa::new().expect("test CA");
    let server = RedisServer::start_tls(&ca, false).expect("TLS redis-server");
    let url = server.tls_url().expect("tls url");

    // Before: `rediss://` was not compiled in ("can't connect with TLS, the
    // feature is not enabled"), retried forever.
    let index = open(&["--redis-url", &url, "--redis-tls-ca", &path(ca.ca_pem())])
        .await
        .expect("rediss:// with the private CA");
    round_trip(&index, "TLS").await;

    // The system trust store does not know the test CA: a configuration
    // error naming the certificate, not an endless retry.
    expect_config(
        open(&["--redis-url", &url]).await,
        "unknown CA",
        "certificate",
    );

    // TLS files with a plain URL: the operator meant TLS.
    expect_config(
        open(&[
            "--redis-url",
            &server.url(),
            "--redis-tls-ca",
            &path(ca.ca_pem()),
        ])
        .await,
        "files with redis://",
        "rediss://",
    );
    expect_config(
        open(&["--redis-url", &url, "--redis-tls-ca", "/nonexistent/ca.pem"]).await,
        "missing CA file",
        "/nonexistent/ca.pem",
    );

    // Mutual TLS: the server asks for a client certificate.
    let mtls = RedisServer::start_tls(&ca, true).expect("mTLS redis-server");
    let url = mtls.tls_url().expect("tls url");
    let with_client = open(&[
        "--redis-url",
        &url,
        "--redis-tls-ca",
        &path(ca.ca_pem()),
        "--redis-tls-cert",
        &path(ca.client_cert()),
        "--redis-tls-key",
        &path(ca.client_key()),
    ])
    .await
    .expect("mutual TLS with the client certificate");
    round_trip(&with_client, "mutual TLS").await;
    assert!(
        open(&["--redis-url", &url, "--redis-tls-ca", &path(ca.ca_pem())])
            .await
            .is_err(),
        "a server requiring client certificates refuses a client without one"
    );
}

/// `docs/redis-acl.md`'s rules for `user`, with `password` for `CHANGE-ME`.
fn documented(user: &str, password: &str) -> Vec<String> {
    documented_acl(user)
        .expect("docs/redis-acl.md")
        .into_iter()
        .map(|r| {
            if r == ">CHANGE-ME" {
                format!(">{password}")
            } else {
                r
            }
        })
        .collect()
}

fn set_user(server: &RedisServer, name: &str, rules: &[String]) {
    let mut cmd = vec!["ACL", "SETUSER", name];
    cmd.extend(rules.iter().map(String::as_str));
    assert_eq!(server.command(&cmd).expect("ACL SETUSER"), "OK");
}

fn user_url(server: &RedisServer, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{}/", server.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_acl_users_for_both_services() {
    let server = RedisServer::start().expect("redis-server");
    set_user(
        &server,
        "kvroute-ingester",
        &documented("kvroute-ingester", "ingester-pw"),
    );
    set_user(
        &server,
        "kvroute-scorer",
        &documented("kvroute-scorer", "scorer-pw"),
    );
    let scorer_url = user_url(&server, "kvroute-scorer", "scorer-pw");

    // The scorer first, on an empty Redis: before, its `SET kvroute:layout
    // 1 NX` at connect failed with NOPERM and it routed by load forever.
    let scorer = open(&["--redis-url", &scorer_url])
        .await
        .expect("read-only scorer user connects to an empty Redis");

    let ingester = open(&[
        "--redis-url",
        &user_url(&server, "kvroute-ingester", "ingester-pw"),
    ])
    .await
    .expect("ingester user connects");
    round_trip(&ingester, "ingester user").await;
    assert_eq!(
        server.command(&["GET", "kvroute:layout"]).expect("GET"),
        "1",
        "the ingester wrote the layout marker"
    );
    // Clearing a pod runs the scripts' inner commands too.
    let (model, pod) = (ModelName::new("m"), PodId::new("127.0.0.11:8000"));
    ingester
        .apply(&[IndexOp::ClearPod { pod: pod.clone() }])
        .await
        .expect("ingester user clears a pod");
    ingester
        .apply(&[IndexOp::store_keys(
            &model,
            &pod,
            Tier::gpu(),
            &[BlockKey(7), BlockKey(8)],
        )])
        .await
        .expect("store again");

    // The scorer reads what the ingester wrote, through its lookup script.
    let found = scorer
        .lookup(&model, &[BlockKey(7), BlockKey(8)], None)
        .await
        .expect("scorer user looks up");
    assert_eq!(found.max_depth(), 2, "{found:?}");
    // ... and may not write the index.
    let denied = scorer
        .apply(&[IndexOp::store_keys(
            &model,
            &pod,
            Tier::gpu(),
            &[BlockKey(9)],
        )])
        .await;
    assert!(
        denied.is_err(),
        "the scorer user must not write: {denied:?}"
    );

    // A wrong password is a configuration error (the binaries exit on it).
    expect_config(
        open(&["--redis-url", &user_url(&server, "kvroute-scorer", "wrong")]).await,
        "wrong password",
        "",
    );
    // A user without SCRIPT LOAD: a configuration error naming the rule.
    set_user(
        &server,
        "no-scripts",
        &["on", ">pw", "~*", "+@read", "+ping"].map(String::from),
    );
    expect_config(
        open(&["--redis-url", &user_url(&server, "no-scripts", "pw")]).await,
        "no +script|load",
        "script|load",
    );
}
