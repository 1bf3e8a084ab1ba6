//! The scorer's gRPC server: Envoy's ext_proc service plus `grpc.health.v1`
//! with the service names gateways probe for an endpoint picker
//! (`liveness`, `readiness`, `envoy.service.ext_proc.v3.ExternalProcessor`)
//! and, when given, llm-d's remote-indexer API ([`crate::indexer_api`]),
//! optionally behind TLS.
//!
//! The caller binds the sockets and passes a cancellation token (tests bind
//! `127.0.0.1:0`); the binary decides when the process is live and ready and
//! drives [`GrpcHealth`]. llm-d serves ext_proc on 9002 and health on 9003:
//! [`serve`] carries both on one port, [`serve_health`] adds a health-only one.

use crate::decide::Decide;
use crate::ext_proc::{ExtProcConfig, ext_proc_service};
use crate::indexer_api::IndexerServiceServer;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use kvroute_service::health::Readiness;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tracing::info;

/// Health service name a liveness probe asks for.
pub const LIVENESS: &str = "liveness";
/// Health service name a readiness probe asks for.
pub const READINESS: &str = "readiness";
/// Health service name of the ext_proc service itself (follows readiness).
pub const EXT_PROC_SERVICE: &str = <ExternalProcessorServer<()> as NamedService>::NAME;

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("reading TLS {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS needs both a certificate and a key")]
    TlsIncomplete,
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// PEM certificate chain and private key for serving TLS.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate (chain) for the gRPC server; plaintext without it.
    #[arg(long, env = "KVROUTE_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key matching `--grpc-tls-cert`.
    #[arg(long, env = "KVROUTE_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// Whether TLS is configured; an error when only half of it is.
    pub fn files(&self) -> Result<Option<(PathBuf, PathBuf)>, GrpcError> {
        match (&self.grpc_tls_cert, &self.grpc_tls_key) {
            (Some(cert), Some(key)) => Ok(Some((cert.clone(), key.clone()))),
            (None, None) => Ok(None),
            _ => Err(GrpcError::TlsIncomplete),
        }
    }
}

/// Handle on the `grpc.health.v1` statuses. Starts live and not ready:
/// the binary calls [`GrpcHealth::set_ready`] once it can route.
#[derive(Debug, Clone)]
pub struct GrpcHealth {
    reporter: HealthReporter,
}

impl GrpcHealth {
    pub async fn new() -> Self {
        let health = Self {
            reporter: HealthReporter::new(),
        };
        health.set_live(true).await;
        health.set_ready(false).await;
        health
    }

    /// `liveness` (and the server-wide `""` status).
    pub async fn set_live(&self, live: bool) {
        let status = serving(live);
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(LIVENESS, status).await;
    }

    /// `readiness` and the ext_proc service name.
    pub async fn set_ready(&self, ready: bool) {
        let status = serving(ready);
        self.reporter.set_service_status(READINESS, status).await;
        self.reporter
            .set_service_status(EXT_PROC_SERVICE, status)
            .await;
    }

    /// Mirrors a [`Readiness`] (the HTTP `/readyz` checks) into gRPC
    /// readiness every `every`, until `shutdown`; then reports not ready, so
    /// a draining scorer stops getting new streams.
    pub async fn follow(&self, readiness: Readiness, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.set_ready(readiness.report().0).await,
            }
        }
        self.set_ready(false).await;
    }

    /// The `grpc.health.v1.Health` service over these statuses.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }
}

fn serving(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Serves ext_proc, health and (when given) `indexer.v1.IndexerService` on
/// `listener` until `shutdown`, then drains open streams (Envoy finishes
/// in-flight requests on its side).
pub async fn serve<D: Decide>(
    listener: TcpListener,
    decide: Arc<D>,
    config: ExtProcConfig,
    indexer: Option<IndexerServiceServer>,
    tls: &TlsArgs,
    health: &GrpcHealth,
    shutdown: CancellationToken,
) -> Result<(), GrpcError> {
    let addr = listener.local_addr().ok();
    let mut builder = builder(tls)?;
    info!(
        ?addr,
        tls = tls.grpc_tls_cert.is_some(),
        indexer_api = indexer.is_some(),
        "serving ext_proc and gRPC health"
    );
    builder
        .add_service(health.service())
        .add_service(ext_proc_service(decide, config))
        .add_optional_service(indexer)
        .serve_with_incoming_shutdown(incoming(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Serves only `grpc.health.v1` on `listener` (llm-d's separate health port).
pub async fn serve_health(
    listener: TcpListener,
    tls: &TlsArgs,
    health: &GrpcHealth,
    shutdown: CancellationToken,
) -> Result<(), GrpcError> {
    let addr = listener.local_addr().ok();
    let mut builder = builder(tls)?;
    info!(?addr, "serving gRPC health");
    builder
        .add_service(health.service())
        .serve_with_incoming_shutdown(incoming(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Accepted connections with Nagle off: ext_proc is many small messages on
/// one long-lived HTTP/2 connection, and each waits for the previous reply.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

fn builder(tls: &TlsArgs) -> Result<Server, GrpcError> {
    let mut server = Server::builder()
        // Request bodies of a few hundred KiB cross in one window instead of
        // waiting for window updates chunk by chunk.
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some((cert, key)) = tls.files()? {
        // Read once at startup; a blocking read of two small files is fine here.
        let read = |what, path: PathBuf| {
            std::fs::read(&path).map_err(|source| GrpcError::TlsFile { what, path, source })
        };
        let identity = Identity::from_pem(read("certificate", cert)?, read("key", key)?);
        server = server.tls_config(ServerTlsConfig::new().identity(identity))?;
    }
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        tls: TlsArgs,
    }

    #[test]
    fn tls_needs_cert_and_key_together() {
        let none = Cli::try_parse_from(["scorer"]).expect("plaintext");
        assert!(none.tls.files().expect("valid").is_none());
        let both = Cli::try_parse_from([
            "scorer",
            "--grpc-tls-cert",
            "c.pem",
            "--grpc-tls-key",
            "k.pem",
        ])
        .expect("tls");
        let files = both.tls.files().expect("valid").expect("tls on");
        assert_eq!(files, (PathBuf::from("c.pem"), PathBuf::from("k.pem")));
        assert!(Cli::try_parse_from(["scorer", "--grpc-tls-cert", "c.pem"]).is_err());
        assert!(Cli::try_parse_from(["scorer", "--grpc-tls-key", "k.pem"]).is_err());
    }
}
