//! The ingester process against a misconfigured Redis: configuration errors
//! (wrong password, unreadable TLS file, bad URL) stop it with a clear
//! message instead of an endless retry, and `--help` never prints the Redis
//! password from the environment. (TLS and the documented ACL user are
//! tested through the shared `RedisArgs::open` in
//! `crates/service/tests/redis_access.rs`.)

use kvroute_testkit::net::free_port;
use kvroute_testkit::process::{assert_exits_with, assert_help_hides};
use kvroute_testkit::redis_server::RedisServer;

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
    assert_exits_with(
        BIN,
        &["--zmq-bind", &zmq, "--http-addr", "127.0.0.1:0"],
        &cases,
        "wrong@",
    );
}

#[test]
fn help_does_not_print_the_redis_password_from_the_environment() {
    assert_help_hides(
        BIN,
        "KVROUTE_REDIS_URL",
        "redis://:s3cret,half@127.0.0.1:6379/",
        "s3cret",
    );
}
