//! The `redis-server` fixture itself.

use crate::common::*;
use kvroute_core::ids::{BlockKey, Tier};
use kvroute_core::index::Index;
use kvroute_redis::RedisIndex;
use kvroute_testkit::redis_server::RedisServer;
use std::time::{Duration, Instant};

/// Kills the child test process when the parent test fails early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Child mode of the test below: start a server, publish its port, wait to be killed.
const CHILD_ENV: &str = "KVROUTE_FIXTURE_CHILD_PORT_FILE";

#[test]
fn fixture_server_dies_with_its_test_process() {
    if let Some(port_file) = std::env::var_os(CHILD_ENV) {
        let server = RedisServer::start().unwrap();
        let published = format!("{} {}", server.port(), server.dir().display());
        // Written then renamed, so the parent never reads half of it.
        let partial = std::path::PathBuf::from(&port_file).with_extension("partial");
        std::fs::write(&partial, published).unwrap();
        std::fs::rename(&partial, &port_file).unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let port_file =
        std::env::temp_dir().join(format!("kvroute-fixture-port-{}", std::process::id()));
    let _ = std::fs::remove_file(&port_file);
    let mut child = KillOnDrop(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "fixture::fixture_server_dies_with_its_test_process",
                "--nocapture",
            ])
            .env(CHILD_ENV, &port_file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let (port, dir): (u16, String) = loop {
        let published = std::fs::read_to_string(&port_file).unwrap_or_default();
        if let Some((p, d)) = published.split_once(' ')
            && let Ok(p) = p.parse()
        {
            break (p, d.to_owned());
        }
        assert!(Instant::now() < deadline, "child never started its server");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    // SIGKILL: no destructor runs in the child, as with a nextest timeout.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "redis-server on {port} outlived its test process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The killed child could not clean up its server's directory.
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(&port_file);
}

#[tokio::test]
async fn fixture_restarts_on_the_same_port_empty() {
    let mut server = RedisServer::start().unwrap();
    let port = server.port();
    let index = RedisIndex::connect(&server.url()).await.unwrap();
    index
        .apply(&[store(pod_a(), Tier::gpu(), &[1])])
        .await
        .unwrap();
    server.kill();
    assert!(!server.is_running());
    assert!(index.ping().await.is_err());
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    // The connection manager reconnects; the scripts are reloaded on NOSCRIPT.
    let deadline = Instant::now() + Duration::from_secs(5);
    while index.ping().await.is_err() {
        assert!(Instant::now() < deadline, "index did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        index
            .lookup(&model(), &[BlockKey(1)], None)
            .await
            .unwrap()
            .pods
            .is_empty()
    );
    index
        .apply(&[store(pod_a(), Tier::gpu(), &[1])])
        .await
        .unwrap();
    assert_eq!(
        index
            .lookup(&model(), &[BlockKey(1)], None)
            .await
            .unwrap()
            .max_depth(),
        1
    );
}
