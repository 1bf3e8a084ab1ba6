//! The ingester process against a misconfigured Redis: configuration errors
//! (wrong password, unreadable TLS file, bad URL) stop it with a clear
//! message instead of an endless retry, and `--help` never prints the Redis
//! password from the environment. (TLS and the documented ACL user are
//! tested through the shared `RedisArgs::open` in
//! `crates/service/tests/redis_access.rs`.)

use kvroute_testkit::net::free_port;
use kvroute_testkit::process::run_to_exit;
use kvroute_testkit::redis_server::RedisServer;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kvroute-ingester");

#[test]
fn configuration_errors_stop_the_ingester() {
    let redis = RedisServer::start().expect("redis-server");
    assert_eq!(
        redis
            .command(&["ACL", "SETUSER", "u", "on", ">right", "~*", "+@all"])
            .expect("ACL SETUSER"),
        "OK"
    );
    let wrong = format!("redis://u:wrong@127.0.0.1:{}/", redis.port());
    let tls = format!("rediss://127.0.0.1:{}/", redis.port());
    let zmq = format!("tcp://127.0.0.1:{}", free_port().expect("port"));
    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "wrong password",
            vec!["--redis-url", &wrong],
            "Redis configuration",
        ),
        (
            "unreadable TLS file",
            vec!["--redis-url", &tls, "--redis-tls-ca", "/nonexistent/ca.pem"],
            "/nonexistent/ca.pem",
        ),
        (
            "bad URL",
            vec!["--redis-url", "redis://127.0.0.1:notaport/"],
            "invalid Redis URL",
        ),
    ];
    for (what, flags, needle) in cases {
        let mut args = vec!["--zmq-bind", &zmq, "--http-addr", "127.0.0.1:0"];
        args.extend(flags);
        let ended = run_to_exit(BIN, &args, &[], Duration::from_secs(20)).expect("run");
        let status = ended.status.unwrap_or_else(|| {
            panic!(
                "{what}: still running after 20 s (retrying?):\n{}",
                ended.output
            )
        });
        assert!(!status.success(), "{what}: exited 0:\n{}", ended.output);
        assert!(
            ended.output.contains(needle),
            "{what}: the message should name {needle:?}:\n{}",
            ended.output
        );
        assert!(
            !ended.output.contains("wrong@"),
            "{what}: password in the log"
        );
    }
}

#[test]
fn help_does_not_print_the_redis_password_from_the_environment() {
    let ended = run_to_exit(
        BIN,
        &["--help"],
        &[("KVROUTE_REDIS_URL", "redis://:s3cret,half@127.0.0.1:6379/")],
        Duration::from_secs(20),
    )
    .expect("run --help");
    assert!(
        ended.status.is_some_and(|s| s.success()),
        "{}",
        ended.output
    );
    assert!(
        ended.output.contains("KVROUTE_REDIS_URL"),
        "{}",
        ended.output
    );
    assert!(!ended.output.contains("s3cret"), "{}", ended.output);
}
