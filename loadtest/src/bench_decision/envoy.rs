//! The Envoy rows: one Envoy 1.40 (`--concurrency 1`, its own `--base-id`)
//! with, per pod count, an ext_proc listener in front of the scorer whose
//! gateway subset hint names that many pods (set by `set_metadata`, as a GIE
//! gateway would); a listener whose ext_proc picker does nothing (buffers
//! the body, names a fixed pod, streams the body back: the floor of the
//! path, as `docs/envoy-ext-proc.md` measures it); and the pods themselves
//! as `direct_response` listeners on `127.0.0.{11..}`, so upstream costs
//! nothing. The ext_proc filter settings are `deploy/envoy`'s.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use scorer::decide::{Decide, DecideError, Decision, RouteRequest};
use scorer::ext_proc::{ExtProcConfig, ext_proc_service};
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A `Decide` that names one endpoint and does nothing else.
pub struct Fixed(pub String);

impl Decide for Fixed {
    fn decide(
        &self,
        _request: RouteRequest,
        _subset: Option<Vec<String>>,
    ) -> impl Future<Output = Result<Decision, DecideError>> + Send {
        let endpoint = self.0.clone();
        async move {
            Ok(Decision {
                endpoint,
                reason: "fixed",
                charge: None,
            })
        }
    }

    fn finished(&self, _decision: &Decision) {}
}

/// Serves the do-nothing picker on `listener` until `shutdown`, with the
/// same HTTP/2 window settings as the scorer's server.
pub async fn serve_noop(listener: TcpListener, endpoint: String, shutdown: CancellationToken) {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = tonic::transport::Server::builder()
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .add_service(ext_proc_service(
            Arc::new(Fixed(endpoint)),
            ExtProcConfig::default(),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        eprintln!("no-op picker stopped: {e}");
    }
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(kvroute_testkit::net::free_port()?)
}

pub struct Envoy {
    _envoy: kvroute_testkit::envoy::Envoy,
    /// Per pod count, its scorer listener's port.
    pub scorer_ports: Vec<(usize, u16)>,
    pub noop_port: u16,
}

/// What the Envoy config needs.
pub struct Layout<'a> {
    pub scorer: SocketAddr,
    pub noop: SocketAddr,
    /// (pod count, that many endpoints) per scorer listener.
    pub subsets: Vec<(usize, &'a [String])>,
    /// Every pod endpoint, each gets a `direct_response` listener.
    pub pods: &'a [String],
}

impl Envoy {
    pub fn start(binary: &Path, layout: &Layout<'_>) -> anyhow::Result<Self> {
        let admin = free_port()?;
        let scorer_ports = layout
            .subsets
            .iter()
            .map(|(n, _)| Ok((*n, free_port()?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let noop_port = free_port()?;
        let config = render(layout, admin, &scorer_ports, noop_port)?;
        let envoy = kvroute_testkit::envoy::Envoy::start(&kvroute_testkit::envoy::Launch {
            binary,
            config: &config,
            overlay: None,
            admin_port: admin,
            // Apart from the test suite's Envoys (which use the pid itself).
            base_id: std::process::id() + 7,
            name: "bench-envoy",
        })?;
        Ok(Envoy {
            _envoy: envoy,
            scorer_ports,
            noop_port,
        })
    }
}

/// The Envoy binary: `--envoy-bin`, else `kvroute_testkit::envoy::binary`
/// (`$KVROUTE_ENVOY`, else the test venv's).
pub fn binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    match explicit {
        Some(p) => Ok(p.to_path_buf()),
        None => Ok(kvroute_testkit::envoy::binary()?),
    }
}

const EXT_PROC: &str = r#"          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service: { envoy_grpc: { cluster_name: CLUSTER } }
              failure_mode_allow: false
              message_timeout: 1000s
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SEND
                request_body_mode: FULL_DUPLEX_STREAMED
                response_body_mode: FULL_DUPLEX_STREAMED
                request_trailer_mode: SEND
                response_trailer_mode: SEND
              metadata_options:
                forwarding_namespaces: { untyped: ["envoy.lb.subset_hint"] }
                receiving_namespaces: { untyped: ["envoy.lb"] }
"#;

const ROUTER: &str = r#"          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#;

fn listener(out: &mut String, name: &str, addr: &str, port: u16, route: &str, filters: &str) {
    let _ = write!(
        out,
        r#"  - name: {name}
    address: {{ socket_address: {{ address: {addr}, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                {route}
          http_filters:
{filters}"#
    );
}

fn render(
    layout: &Layout<'_>,
    admin: u16,
    scorer_ports: &[(usize, u16)],
    noop_port: u16,
) -> anyhow::Result<String> {
    let mut out = format!(
        "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\nstatic_resources:\n  listeners:\n"
    );
    let to_pods = "route: { cluster: kvroute_pods, timeout: 0s }";
    for ((pods, subset), (_, port)) in layout.subsets.iter().zip(scorer_ports) {
        let list = subset
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let filters = format!(
            r#"          - name: envoy.filters.http.set_metadata
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config
              metadata:
              - metadata_namespace: envoy.lb.subset_hint
                value: {{ x-gateway-destination-endpoint-subset: [{list}] }}
{}{ROUTER}"#,
            EXT_PROC.replace("CLUSTER", "scorer")
        );
        listener(
            &mut out,
            &format!("scorer_p{pods}"),
            "127.0.0.1",
            *port,
            to_pods,
            &filters,
        );
    }
    let noop = format!("{}{ROUTER}", EXT_PROC.replace("CLUSTER", "noop"));
    listener(&mut out, "noop", "127.0.0.1", noop_port, to_pods, &noop);
    for (k, pod) in layout.pods.iter().enumerate() {
        let addr: SocketAddr = pod.parse().with_context(|| format!("pod {pod}"))?;
        let ok = r#"direct_response: { status: 200, body: { inline_string: "ok" } }"#;
        listener(
            &mut out,
            &format!("pod_{k}"),
            &addr.ip().to_string(),
            addr.port(),
            ok,
            ROUTER,
        );
    }
    let h2 = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
"#;
    let _ = write!(
        out,
        r#"  clusters:
  - name: kvroute_pods
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    original_dst_lb_config: {{ use_http_header: true, http_header_name: x-gateway-destination-endpoint }}
    circuit_breakers: {{ thresholds: [{{ max_connections: 40000, max_pending_requests: 40000, max_requests: 40000 }}] }}
"#
    );
    for (name, addr) in [("scorer", layout.scorer), ("noop", layout.noop)] {
        let _ = write!(
            out,
            r#"  - name: {name}
    type: STATIC
    connect_timeout: 2s
{h2}    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }}] }}]
"#,
            addr.ip(),
            addr.port()
        );
    }
    Ok(out)
}

/// One keep-alive HTTP/1.1 connection to an Envoy listener.
pub struct Http {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Http {
    pub async fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http { sender })
    }

    /// POST `/v1/completions`; the time to the whole response.
    pub async fn post(&mut self, body: &Bytes) -> anyhow::Result<Duration> {
        let request = hyper::Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .header("host", "bench")
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))?;
        self.sender.ready().await?;
        let started = Instant::now();
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let elapsed = started.elapsed();
        if status != 200 {
            bail!(
                "Envoy answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(elapsed)
    }
}
