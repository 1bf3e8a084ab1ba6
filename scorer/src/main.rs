//! `kvroute-scorer`: thin entry point; everything lives in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use scorer::config::ServeArgs;
use scorer::service::Listeners;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Envoy ext_proc endpoint picker: routes each LLM request to the vLLM pod
/// holding the longest cached prefix of its prompt, balanced against load.
#[derive(Parser)]
#[command(
    name = "kvroute-scorer",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// For one prompt, which pods hold how many of its blocks (the
    /// operator's "why did this request go there").
    Why(scorer::why::WhyArgs),
}

/// Binds the addresses the flags name (the library serves what it is given).
async fn bind(args: &ServeArgs) -> anyhow::Result<Listeners> {
    let bind = |flag: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {flag} {addr}"))
    };
    Ok(Listeners {
        grpc: bind("--grpc-addr", args.grpc_addr).await?,
        http: bind("--http-addr", args.http_addr).await?,
        grpc_health: match args.grpc_health_addr {
            Some(a) => Some(bind("--grpc-health-addr", a).await?),
            None => None,
        },
    })
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Exit code for bad configuration (EX_USAGE).
const EX_USAGE: i32 = 64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Why(args)) => scorer::why::run(args, env).await,
        None => {
            if let Err(e) = cli
                .serve
                .route_config()
                .and(cli.serve.keys.scheme().map_err(|e| e.to_string()))
            {
                eprintln!("kvroute-scorer: {e}");
                std::process::exit(EX_USAGE);
            }
            kvroute_service::telemetry::init_tracing(&cli.serve.log)?;
            let metrics = kvroute_service::telemetry::install_metrics()?;
            let shutdown = CancellationToken::new();
            tokio::spawn(kvroute_service::telemetry::cancel_on_signal(
                shutdown.clone(),
            ));
            let listeners = bind(&cli.serve).await?;
            let ran =
                scorer::service::run(cli.serve, listeners, env, Some(metrics), shutdown).await;
            // A configuration the index contradicts: the message, no backtrace.
            if let Err(e) = &ran
                && let Some(m) = e.downcast_ref::<scorer::keying::KeyingMismatch>()
            {
                tracing::error!("{m}");
                eprintln!("kvroute-scorer: {m}");
                std::process::exit(EX_USAGE);
            }
            ran
        }
    }
}
