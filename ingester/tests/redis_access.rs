//! The ingester process against a misconfigured Redis: configuration errors
//! (wrong password, unreadable TLS file, bad URL) stop it with a clear
//! message instead of an endless retry, and `--help` never prints the Redis
//! password from the environment. (TLS and the documented ACL user are
//! tested through the shared `RedisArgs::open` in
//! `crates/service/tests/redis_access.rs`.)

use kvroute_testkit::net::free_port;
use kvroute_testkit::process::{assert_help_hides, assert_redis_config_errors_stop};

const BIN: &str = env!("CARGO_BIN_EXE_kvroute-ingester");

#[test]
fn configuration_errors_stop_the_ingester() {
    let zmq = format!("tcp://127.0.0.1:{}", free_port().expect("port"));
    assert_redis_config_errors_stop(BIN, &["--zmq-bind", &zmq, "--http-addr", "127.0.0.1:0"]);
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
