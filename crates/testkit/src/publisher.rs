//! A vLLM-format KV-event publisher for the ingester's tests:
//! `peers/vllm_publisher.py` (beside this crate's `src/`) drives vLLM's own
//! msgspec event classes over pyzmq PUB (bind or connect) with a replay
//! ROUTER, following a JSON script. This is its Rust handle: start it, wait
//! for the lines it prints, end its `{"wait": name}` steps, kill it.
//!
//! Test support: every method panics with a clear message on failure (a
//! missing venv fails the test; a skipped interoperability test proves
//! nothing).

use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long a line the test waits for may take.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// The publisher script.
pub fn script_path() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/vllm_publisher.py")
}

/// The venv interpreter with pyzmq and msgspec; a missing one fails the test.
pub fn python() -> PathBuf {
    let path = crate::test_env::venv_python().unwrap_or_default();
    assert!(
        path.is_file(),
        "no Python with pyzmq and msgspec at {path:?} ($KVROUTE_PYTHON, else \
         ~/.cache/kvroute/venv/bin/python): run ./scripts/test.sh once to create it"
    );
    path
}

/// A running `vllm_publisher.py`.
pub struct Peer {
    child: Child,
    /// Its lifeline (the peer exits on EOF, so no orphan outlives the test)
    /// and the channel `wait` steps are ended on.
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Its PUB endpoint (resolved when it bound port 0).
    pub pub_ep: String,
    pub replay_ep: Option<String>,
    /// When its READY line was read: its sockets were up by then.
    pub ready_at: Instant,
}

impl Peer {
    /// Starts the peer with `script` and waits for its READY line.
    pub async fn spawn(script: Value) -> Peer {
        let mut child = Command::new(python())
            .arg(script_path())
            .arg(script.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start vllm_publisher.py");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = next_line(&mut lines, "READY").await;
        let ready_at = Instant::now();
        let info: Value =
            serde_json::from_str(line.trim_start_matches("READY ")).expect("READY json");
        Peer {
            child,
            stdin,
            lines,
            pub_ep: info["pub"].as_str().expect("pub endpoint").to_owned(),
            replay_ep: info["replay"].as_str().map(str::to_owned),
            ready_at,
        }
    }

    /// Waits for a stdout line starting with `prefix`.
    pub async fn wait_for(&mut self, prefix: &str) -> String {
        next_line(&mut self.lines, prefix).await
    }

    /// Ends a `{"wait": name}` step.
    pub async fn resume(&mut self, name: &str) {
        self.stdin
            .write_all(format!("{name}\n").as_bytes())
            .await
            .expect("write to peer");
        self.stdin.flush().await.expect("flush peer stdin");
    }

    /// Kills the peer (as a pod dying would).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>, prefix: &str) -> String {
    let read = async {
        while let Some(line) = lines.next_line().await.expect("peer stdout") {
            if line.starts_with(prefix) {
                return line;
            }
        }
        panic!(
            "peer exited before printing {prefix} (pyzmq or msgspec missing? run ./scripts/test.sh)"
        );
    };
    tokio::time::timeout(LINE_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("peer printed no {prefix} line within {LINE_TIMEOUT:?}"))
}
