//! `kvroute-ingester`: thin entry point; everything lives in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use ingester::config::RunArgs;
use ingester::purge::resolve;
use kvroute_core::ids::PodId;
use kvroute_core::index::{Index, IndexOp};
use kvroute_service::config::RedisArgs;
use tokio_util::sync::CancellationToken;

/// vLLM KV-cache events (ZeroMQ) into kvroute's block index (Redis, or the
/// embedded memory index when no --redis-url is given — useful only inside
/// one process, e.g. tests: scorers cannot read it).
#[derive(Parser)]
#[command(
    name = "kvroute-ingester",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Remove every index entry of the given pods (e.g. a pod that was
    /// decommissioned while no ingester was running). A pod id without a
    /// rank also removes every data-parallel rank (`#dpN`) of that endpoint
    /// registered in the index.
    Purge {
        #[command(flatten)]
        redis: RedisArgs,
        /// Pod ids as they appear in the index (`127.0.0.5:8000`,
        /// `127.0.0.5:8000#dp1`).
        #[arg(required = true)]
        pods: Vec<String>,
    },
}

/// Exit code for bad configuration (EX_USAGE), so orchestration sees it.
const EX_USAGE: i32 = 64;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Purge { redis, pods }) => purge(redis, pods).await,
        None => {
            if let Err(e) = cli.run.validate() {
                eprintln!("kvroute-ingester: {e}");
                std::process::exit(EX_USAGE);
            }
            kvroute_service::telemetry::init_tracing(&cli.run.log)?;
            let metrics = kvroute_service::telemetry::install_metrics()?;
            let shutdown = CancellationToken::new();
            tokio::spawn(kvroute_service::telemetry::cancel_on_signal(
                shutdown.clone(),
            ));
            let admin = tokio::net::TcpListener::bind(cli.run.http_addr)
                .await
                .with_context(|| format!("binding the admin address {}", cli.run.http_addr))?;
            ingester::service::run(cli.run, admin, env, Some(metrics), shutdown).await
        }
    }
}

async fn purge(redis: RedisArgs, pods: Vec<String>) -> anyhow::Result<()> {
    if redis.urls(env).is_empty() {
        anyhow::bail!(
            "purge needs --redis-url (or KVROUTE_REDIS_URL / KVCACHE_INDEXER_REDIS_ADDR)"
        );
    }
    let index = redis.open(env).await?;
    // The registry of pods: ranks of an endpoint that no running process
    // may know of (this one has heard nothing).
    let known = index.known_pods().await?;
    // Resolve every id first: a typo fails the whole command before
    // anything is cleared.
    let mut targets: Vec<(PodId, u64)> = Vec::new();
    for p in &pods {
        let p = p.trim();
        if p.is_empty() || p.contains('@') {
            anyhow::bail!("{p:?} is not a pod id (like 127.0.0.5:8000)");
        }
        let resolved = resolve(&index, &PodId::new(p), &known).await?;
        if !resolved.matched {
            anyhow::bail!(
                "no pod matches {p:?}: it is not in kvroute:pods and holds no entries \
                 (a typo? pod ids look like 127.0.0.5:8000 or 127.0.0.5:8000#dp1)"
            );
        }
        for t in resolved.pods {
            if !targets.iter().any(|(p, _)| *p == t.0) {
                targets.push(t);
            }
        }
    }
    let ops: Vec<IndexOp> = targets
        .iter()
        .map(|(p, _)| IndexOp::ClearPod { pod: p.clone() })
        .collect();
    index.apply(&ops).await?;
    for (p, _) in &targets {
        println!("purged {p}");
    }
    let entries: u64 = targets.iter().map(|(_, n)| n).sum();
    println!("purged {} pods, {entries} entries", targets.len());
    Ok(())
}
