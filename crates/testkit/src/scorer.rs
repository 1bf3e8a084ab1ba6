//! The `kvroute-scorer` binary in its own process, as operators run it: for
//! end-to-end tests (several replicas, Redis outages) and for the decision
//! benchmark (its CPU time read from `/proc/<pid>/stat` apart from the load
//! generator's). Listens on two free loopback ports, logs to a file in its
//! own directory (attached to failures), runs under the watchdog, and is
//! killed and reaped when dropped.

use crate::net::{free_port, http, loopback};
use crate::process::{Guarded, tail};
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How a scorer process is started.
pub struct Launch<'a> {
    pub binary: &'a Path,
    /// Everything but `--grpc-addr`/`--http-addr`, which the launcher picks.
    pub args: &'a [String],
    /// A label for its directory and failures.
    pub name: &'a str,
    /// Start from an empty environment (plus `RUST_BACKTRACE=1`), so nothing
    /// of the caller's (`KVROUTE_*`, llm-d's `KVCACHE_INDEXER_REDIS_ADDR`)
    /// configures the scorer.
    pub clear_env: bool,
}

/// A running scorer.
pub struct ScorerProcess {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    child: Guarded,
    dir: PathBuf,
}

/// How long a scorer may take to answer `/readyz` 200.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Starts tried when a picked port was taken before the scorer bound it.
const PORT_ATTEMPTS: usize = 3;

impl ScorerProcess {
    /// Starts the scorer and returns once `/readyz` answers 200 (which does
    /// not wait for Redis: the scorer routes by load without it). An error
    /// carries the scorer's log.
    pub async fn start(launch: &Launch<'_>) -> io::Result<ScorerProcess> {
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            match Self::try_start(launch).await {
                Ok(p) => return Ok(p),
                // A port taken between picking and binding: pick again.
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("kvroute-scorer did not start")))
    }

    async fn try_start(launch: &Launch<'_>) -> io::Result<ScorerProcess> {
        let grpc = loopback(free_port()?);
        let http_addr = loopback(free_port()?);
        let dir = std::env::temp_dir().join(format!(
            "kvroute-scorer-{}-{}-{}",
            std::process::id(),
            launch.name,
            http_addr.port()
        ));
        fs::create_dir_all(&dir)?;
        let log = fs::File::create(dir.join("scorer.log"))?;
        let mut args = vec![
            "--grpc-addr".to_string(),
            grpc.to_string(),
            "--http-addr".into(),
            http_addr.to_string(),
        ];
        args.extend(launch.args.iter().cloned());
        let out = log.try_clone()?;
        let child = Guarded::spawn(launch.binary, &args, |c| {
            if launch.clear_env {
                c.env_clear().env("RUST_BACKTRACE", "1");
            }
            c.stdout(out).stderr(log);
        })?;
        let mut proc = ScorerProcess {
            grpc,
            http: http_addr,
            child,
            dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if proc.child.try_wait()?.is_some() {
                let log = proc.log();
                let kind = if log.contains("binding --") || log.contains("Address already in use") {
                    io::ErrorKind::AddrInUse
                } else {
                    io::ErrorKind::Other
                };
                return Err(io::Error::new(
                    kind,
                    format!(
                        "kvroute-scorer {} exited during startup:\n{}",
                        launch.name,
                        tail(&log, 40)
                    ),
                ));
            }
            if matches!(http("GET", proc.http, "/readyz").await, Ok((200, _))) {
                return Ok(proc);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "kvroute-scorer {} not ready after {READY_TIMEOUT:?}:\n{}",
                    launch.name,
                    tail(&proc.log(), 40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("scorer.log")).unwrap_or_default()
    }

    /// Its pid (for `/proc/<pid>/stat`).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }
}

impl Drop for ScorerProcess {
    fn drop(&mut self) {
        self.child.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
