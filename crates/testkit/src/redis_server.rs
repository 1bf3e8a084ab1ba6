//! Throwaway `redis-server` processes for tests and benchmarks: a single
//! node ([`RedisServer`]) or a local cluster of masters ([`RedisCluster`]).
//!
//! Each server listens on a free loopback port, persists nothing, keeps its
//! files in its own temporary directory (removed on drop) and dies with the
//! process that started it, even when that process is killed (a nextest
//! timeout): see [`crate::process`].
//!
//! Compiled in every build (not only `cfg(test)`) because
//! `kvroute-loadtest bench` starts its Redis with it too.

use crate::net::free_port;
use crate::process::{Guarded, tail};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server may take to answer PING after spawn.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a fresh cluster may take to report `cluster_state:ok` everywhere.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(15);
/// Spawn attempts when a picked port was taken in between (parallel tests).
const PORT_ATTEMPTS: usize = 5;

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// One `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    /// Arguments after `--port`, reused by [`RedisServer::restart`].
    extra_args: Vec<String>,
    /// The running server; `None` after [`RedisServer::kill`].
    child: Option<Guarded>,
    /// The TLS port of [`RedisServer::start_tls`] (the plain port stays
    /// open for the fixture's own PING and for tests' setup commands).
    tls_port: Option<u16>,
}

impl RedisServer {
    /// Starts a standalone server on a free loopback port.
    pub fn start() -> io::Result<RedisServer> {
        Self::start_with(|_| Vec::new())
    }

    /// Starts a server that also serves TLS with `ca`'s server certificate
    /// on [`RedisServer::tls_url`]; `client_certs`: clients must present a
    /// certificate `ca` signed (`tls-auth-clients yes`).
    pub fn start_tls(ca: &crate::tls::TestCa, client_certs: bool) -> io::Result<RedisServer> {
        let tls_port = free_port()?;
        let path = |p: std::path::PathBuf| p.display().to_string();
        let mut server = Self::start_with(|_| {
            vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                path(ca.server_cert()),
                "--tls-key-file".into(),
                path(ca.server_key()),
                "--tls-ca-cert-file".into(),
                path(ca.ca_pem()),
                "--tls-auth-clients".into(),
                if client_certs { "yes" } else { "no" }.into(),
            ]
        })?;
        server.tls_port = Some(tls_port);
        Ok(server)
    }

    /// `rediss://127.0.0.1:<tls port>/` of a [`RedisServer::start_tls`] server.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}/"))
    }

    /// Runs one command on the plain port (test setup: `ACL SETUSER`,
    /// `CONFIG SET`); the reply as text.
    pub fn command(&self, args: &[&str]) -> io::Result<String> {
        command(self.port, args)
    }

    /// Starts a server; `extra(dir)` adds arguments (the cluster's).
    fn start_with(extra: impl Fn(&Path) -> Vec<String>) -> io::Result<RedisServer> {
        let binary = find_in_path("redis-server")?;
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let dir = temp_dir()?;
            let mut server = RedisServer {
                port: free_port()?,
                extra_args: extra(&dir),
                dir,
                child: None,
                tls_port: None,
            };
            match server.spawn(&binary) {
                Ok(()) => return Ok(server),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    fn spawn(&mut self, binary: &Path) -> io::Result<()> {
        let log_path = self.dir.join("redis.log");
        let log = fs::File::create(&log_path)?;
        let mut args = vec![
            "--port".to_string(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--logfile".into(),
            String::new(),
            "--dir".into(),
            self.dir.display().to_string(),
        ];
        args.extend(self.extra_args.iter().cloned());
        let out = log.try_clone()?;
        self.child = Some(Guarded::spawn(binary, &args, |c| {
            c.stdout(out).stderr(log);
        })?);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(self.port).is_ok() {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if exited.is_some() || Instant::now() > deadline {
                self.kill();
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                let kind = if log.contains("Address already in use") {
                    io::ErrorKind::AddrInUse
                } else {
                    io::ErrorKind::Other
                };
                let what = match exited {
                    Some(status) => format!("exited with {status}"),
                    None => format!("did not answer PING within {START_TIMEOUT:?}"),
                };
                return Err(io::Error::new(
                    kind,
                    format!(
                        "redis-server on port {} {what}; its log:\n{}",
                        self.port,
                        tail(&log, 20)
                    ),
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Its pid, while it runs (for `/proc/<pid>/stat`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Guarded::id)
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (log, cluster config); removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `127.0.0.1:<port>`, as `redis-cli --cluster` wants it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server abruptly (SIGKILL, nothing saved) and waits for it.
    /// The port and directory are kept for [`RedisServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.stop();
        }
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`];
    /// kills it first when running). Data is gone: nothing is persisted.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let binary = find_in_path("redis-server")?;
        self.spawn(&binary)
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(Guarded::is_running)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A local Redis Cluster of masters without replicas.
#[derive(Debug)]
pub struct RedisCluster {
    servers: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` (at least 3, as `redis-cli --cluster create`
    /// requires) cluster-enabled servers, assigns the slots with
    /// `redis-cli --cluster create` and waits for `cluster_state:ok` on every node.
    pub fn start(masters: usize) -> io::Result<RedisCluster> {
        if masters < 3 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a Redis Cluster needs at least 3 masters",
            ));
        }
        let cli = find_in_path("redis-cli")?;
        let mut servers = Vec::with_capacity(masters);
        for _ in 0..masters {
            // The cluster bus port is set explicitly: the default (port + 10000)
            // can be taken or exceed 65535 for a high ephemeral port.
            let bus = free_port()?;
            servers.push(RedisServer::start_with(|dir| {
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    dir.join("nodes.conf").display().to_string(),
                    "--cluster-node-timeout".into(),
                    "2000".into(),
                    "--cluster-port".into(),
                    bus.to_string(),
                ]
            })?);
        }
        let output = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(servers.iter().map(RedisServer::addr))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let cluster = RedisCluster { servers };
        cluster.wait_ok()?;
        Ok(cluster)
    }

    fn wait_ok(&self) -> io::Result<()> {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        for server in &self.servers {
            loop {
                let info = command(server.port, &["CLUSTER", "INFO"]).unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(io::Error::other(format!(
                        "cluster node {} not ok after {CLUSTER_TIMEOUT:?}:\n{info}",
                        server.addr()
                    )));
                }
                sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// `redis://127.0.0.1:<port>/` of every master: seeds for `connect_cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(RedisServer::url).collect()
    }

    /// The masters, e.g. to kill one in a fault test.
    pub fn servers(&mut self) -> &mut [RedisServer] {
        &mut self.servers
    }
}

/// The rules of `ACL SETUSER <user> ...` as `docs/redis-acl.md` gives
/// them, so that the tests apply exactly what the documentation tells
/// operators to.
pub fn documented_acl(user: &str) -> io::Result<Vec<String>> {
    let path = crate::test_env::repo_root().join("docs/redis-acl.md");
    let text = fs::read_to_string(&path)?;
    let prefix = format!("ACL SETUSER {user} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|rules| rules.split_whitespace().map(str::to_string).collect())
        .ok_or_else(|| io::Error::other(format!("{}: no `{prefix}...` line", path.display())))
}

/// Runs one command against a local server, synchronously; the reply as text.
fn command(port: u16, args: &[&str]) -> io::Result<String> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(io::Error::other)?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(io::Error::other)?;
    let mut cmd = redis::cmd(args.first().copied().unwrap_or("PING"));
    for a in args.iter().skip(1) {
        cmd.arg(*a);
    }
    cmd.query::<String>(&mut conn).map_err(io::Error::other)
}

fn ping(port: u16) -> io::Result<()> {
    match command(port, &["PING"])?.as_str() {
        "PONG" => Ok(()),
        other => Err(io::Error::other(format!("PING answered {other}"))),
    }
}

/// A fresh directory under the system temp dir, unique per process and call.
fn temp_dir() -> io::Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("kvroute-redis-{}-{n}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn find_in_path(name: &str) -> io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{name} not found in PATH; install Redis >= 7 (Debian/Ubuntu: `apt-get install redis-server`, \
                     which also provides redis-cli)"
                ),
            )
        })
}
