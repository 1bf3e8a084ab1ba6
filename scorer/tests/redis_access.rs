//! The scorer process against a secured Redis: the documented least-
//! privilege ACL user routes by prefix and shares in-flight counts (before:
//! NOPERM at connect, routing by load forever); configuration errors stop
//! the process with a clear message instead of an endless retry; `--help`
//! never prints the Redis password from the environment.

mod support;

use kvroute_testkit::process::{assert_help_hides, assert_redis_config_errors_stop};
use kvroute_testkit::redis_server::documented_acl;
use serde_json::json;
use std::time::{Duration, Instant};
use support::e2e::{prose, scorer_args, start_redis};
use support::index::{IndexWriter, LLAMA, completion_ids, tokenizers};
use support::pods::Fleet;
use support::scorer_proc::{ScorerProc, bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_user_routes_by_prefix_and_shares_load() {
    let redis = start_redis().await;
    let mut setuser = vec!["ACL".to_string(), "SETUSER".into(), "kvroute-scorer".into()];
    setuser.extend(
        documented_acl("kvroute-scorer")
            .expect("docs/redis-acl.md")
            .into_iter()
            .map(|r| if r == ">CHANGE-ME" { ">pw".into() } else { r }),
    );
    let setuser: Vec<&str> = setuser.iter().map(String::as_str).collect();
    assert_eq!(redis.command(&setuser).expect("ACL SETUSER"), "OK");

    let fleet = Fleet::start(2).await;
    let b = fleet.pods[1].name.clone();
    let acl_url = format!("redis://kvroute-scorer:pw@127.0.0.1:{}/", redis.port());
    let mut args = scorer_args(&redis, &fleet, &["--replica-id", "acl-test"]);
    let at = args
        .iter()
        .position(|a| a == "--redis-url")
        .expect("url flag");
    args[at + 1] = acl_url;
    // Connects to an empty Redis (no layout marker yet) as that user.
    let scorer = ScorerProc::start("acl", &args).await;

    let writer = IndexWriter::connect(&redis.url()).await;
    let prompt = prose("acl", 2_000);
    writer
        .store(LLAMA, &b, &completion_ids(&tokenizers(), LLAMA, &prompt))
        .await;
    let report = scorer
        .score_until(
            &json!({"model": LLAMA, "prompt": prompt}),
            Duration::from_secs(15),
            "routes by prefix as the ACL user",
            |r| r["reason"] == "prefix",
        )
        .await;
    assert_eq!(report["picked"], b.as_str(), "{report:#}");

    // In-flight sharing writes only its own keys, and may.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let member = redis
            .command(&["SISMEMBER", "kvroute:scorers", "acl-test"])
            .unwrap_or_default();
        if member == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never registered in kvroute:scorers; log:\n{}",
            scorer.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!scorer.log().contains("NOPERM"), "{}", scorer.log());
}

#[test]
fn configuration_errors_stop_the_scorer() {
    let base = ["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"];
    assert_redis_config_errors_stop(bin(), &base);
}

#[test]
fn help_does_not_print_the_redis_password_from_the_environment() {
    assert_help_hides(
        bin(),
        "KVROUTE_REDIS_URL",
        "redis://:s3cret,half@127.0.0.1:6379/",
        "s3cret",
    );
}
