//! The scorer's gRPC server (ext_proc + health) on `127.0.0.1:0`.

use scorer::decide::Decide;
use scorer::ext_proc::ExtProcConfig;
use scorer::grpc::{self, GrpcHealth, TlsArgs};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running scorer; stops when dropped.
pub struct Scorer {
    pub addr: SocketAddr,
    pub health: GrpcHealth,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Scorer {
    pub async fn start<D: Decide>(decide: Arc<D>, config: ExtProcConfig) -> Self {
        Self::start_tls(
            decide,
            config,
            TlsArgs {
                grpc_tls_cert: None,
                grpc_tls_key: None,
            },
        )
        .await
    }

    pub async fn start_tls<D: Decide>(decide: Arc<D>, config: ExtProcConfig, tls: TlsArgs) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind scorer");
        let addr = listener.local_addr().expect("scorer address");
        let health = GrpcHealth::new().await;
        health.set_ready(true).await;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (health, shutdown) = (health.clone(), shutdown.clone());
            async move {
                grpc::serve(listener, decide, config, None, &tls, &health, shutdown)
                    .await
                    .expect("scorer gRPC server");
            }
        });
        Self {
            addr,
            health,
            shutdown,
            task,
        }
    }
}

impl Drop for Scorer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}
