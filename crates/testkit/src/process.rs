//! Child processes that die with the test that started them.
//!
//! A fixture process (redis-server, the scorer, Envoy) is launched through
//! `sh`, whose background watchdog holds the read end of a pipe this process
//! writes; when the write end closes — this process exits, is killed by a
//! nextest timeout, or the guard drops — the watchdog kills the child. No
//! `unsafe` (no `prctl`), no polling, no orphan holding ports or CPU.

use std::ffi::OsStr;
use std::io;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// `$0` of the launcher is a label; the rest of its arguments are the
/// command. fd 3 keeps the pipe for the watchdog; the command gets
/// /dev/null as stdin so only the watchdog holds the pipe. `$$` is the
/// shell's pid, which `exec` hands to the command, so the watchdog kills the
/// command itself (and [`Guarded::id`] is the command's pid).
const LAUNCHER: &str = r#"exec 3<&0
(read _lifeline <&3; kill -9 $$) >/dev/null 2>&1 &
exec "$@" </dev/null 3<&-"#;

/// A running child under the watchdog.
#[derive(Debug)]
pub struct Guarded {
    child: Option<Child>,
    /// Write end of the watchdog's pipe; dropping it kills the child.
    lifeline: Option<ChildStdin>,
}

impl Guarded {
    /// Starts `program args...`; `configure` sets environment and output
    /// (stdin belongs to the watchdog).
    pub fn spawn<I, S>(
        program: impl AsRef<OsStr>,
        args: I,
        configure: impl FnOnce(&mut Command),
    ) -> io::Result<Guarded>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(LAUNCHER)
            .arg("kvroute-fixture")
            .arg(program)
            .args(args);
        configure(&mut cmd);
        let mut child = cmd.stdin(Stdio::piped()).spawn()?;
        let lifeline = child.stdin.take();
        Ok(Guarded {
            child: Some(child),
            lifeline,
        })
    }

    /// The command's pid (the shell `exec`s into it).
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once it exited (a stopped guard counts as exited).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(Some(ExitStatus::default())),
        }
    }

    /// Whether the command is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Kills the command (SIGKILL through the watchdog) and reaps it.
    pub fn stop(&mut self) {
        // Closing the pipe makes the watchdog kill the command; waiting for
        // that (rather than killing first) lets the watchdog exit before the
        // pid is reaped and could be reused under it.
        self.lifeline = None;
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => sleep(Duration::from_millis(5)),
            }
        }
        // The watchdog failed (it should not): kill directly.
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` lines of `text` (a log attached to a failure).
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_kills_the_command() {
        let mut g = Guarded::spawn("sleep", ["30"], |c| {
            c.stdout(Stdio::null());
        })
        .expect("spawn sleep");
        assert!(g.is_running());
        let pid = g.id().expect("pid");
        g.stop();
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
                // A zombie entry may linger until reaped by its parent (us: done).
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .unwrap_or_default()
                    .is_empty()
            }
        );
        assert!(g.try_wait().expect("wait").is_some());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}

/// What a process that was expected to end did: its exit status (`None`:
/// still running at the deadline, then killed) and its stdout and stderr.
#[derive(Debug)]
pub struct Ended {
    pub status: Option<ExitStatus>,
    pub output: String,
}

/// Runs `program args...` from an empty environment plus `env` under the
/// watchdog, until it exits or `within` passes; for checks that a binary
/// stops by itself (a configuration error, `--help`).
pub fn run_to_exit(
    program: impl AsRef<OsStr>,
    args: &[&str],
    env: &[(&str, &str)],
    within: Duration,
) -> io::Result<Ended> {
    let path = std::env::temp_dir().join(format!(
        "kvroute-run-{}-{}.log",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ u128::from(RUNS.fetch_add(1, Relaxed))
    ));
    let log = std::fs::File::create(&path)?;
    let err = log.try_clone()?;
    let mut child = Guarded::spawn(program, args, |c| {
        c.env_clear().env("RUST_BACKTRACE", "0");
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(log).stderr(err);
    })?;
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.stop();
            break None;
        }
        sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    Ok(Ended { status, output })
}

static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
use std::sync::atomic::Ordering::Relaxed;

/// Asserts that `binary --help`, with `var=value` in its environment, exits
/// 0, names `var` and never prints `secret` (clap prints env values unless
/// told not to).
pub fn assert_help_hides(binary: &str, var: &str, value: &str, secret: &str) {
    let ended = run_to_exit(
        binary,
        &["--help"],
        &[(var, value)],
        Duration::from_secs(20),
    )
    .expect("run --help");
    assert!(
        ended.status.is_some_and(|s| s.success()),
        "{}",
        ended.output
    );
    assert!(ended.output.contains(var), "{}", ended.output);
    assert!(
        !ended.output.contains(secret),
        "--help printed {secret:?}:\n{}",
        ended.output
    );
}

/// Asserts that `binary base... flags...` stops by itself within 20 s with
/// a non-zero status and a message containing `needle`, for each
/// `(what, flags, needle)`, and that no output contains `forbidden` (e.g.
/// a password).
pub fn assert_exits_with(
    binary: &str,
    base: &[&str],
    cases: &[(&str, Vec<&str>, &str)],
    forbidden: &str,
) {
    for (what, flags, needle) in cases {
        let mut args = base.to_vec();
        args.extend(flags.iter().copied());
        let ended = run_to_exit(binary, &args, &[], Duration::from_secs(20)).expect("run");
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
            !ended.output.contains(forbidden),
            "{what}: {forbidden:?} in the output"
        );
    }
}

/// Asserts that `binary base...` exits with the reason for each Redis
/// configuration error both services must stop on (a wrong password, an
/// unreadable TLS file, an unparseable URL), against a real `redis-server`,
/// never printing the password.
pub fn assert_redis_config_errors_stop(binary: &str, base: &[&str]) {
    let redis = crate::redis_server::RedisServer::start().expect("redis-server");
    assert_eq!(
        redis
            .command(&["ACL", "SETUSER", "u", "on", ">right", "~*", "+@all"])
            .expect("ACL SETUSER"),
        "OK"
    );
    let wrong = format!("redis://u:wrong@127.0.0.1:{}/", redis.port());
    let tls = format!("rediss://127.0.0.1:{}/", redis.port());
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
    assert_exits_with(binary, base, &cases, "wrong@");
}
