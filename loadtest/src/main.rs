//! `kvroute-loadtest`: benchmarks of kvroute's parts against same-run
//! baselines (and, later, the vLLM fleet simulator and the demo).
use clap::{Parser, Subcommand};

mod bench_decision;
mod bench_index;
mod bench_ingest;
mod bench_keys;
mod demo;
mod live;
mod machine;
mod sim;

#[derive(Parser)]
#[command(name = "kvroute-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks; each prints its numbers next to a baseline measured in the same run.
    #[command(subcommand)]
    Bench(Bench),
    /// The index at work: simulated vLLM pods' KV events decoded, keyed and
    /// written to Redis, inspected with redis-cli, looked up, a pod cleared.
    Demo(demo::Args),
    /// The fleet simulator: every routing policy over the same workload on
    /// simulated vLLM engines, in virtual time.
    Sim(sim::Args),
    /// The real system under real traffic: simulated vLLM pods behind the
    /// real ingester, scorers and Envoy; kvroute against baselines.
    Live(live::Args),
}

#[derive(Subcommand)]
enum Bench {
    /// Block-key throughput vs raw SHA-256 of the same bytes.
    Keys(bench_keys::Args),
    /// Index writes, lookups and memory on a local Redis (started by the benchmark) and in memory.
    Index(bench_index::Args),
    /// The ingester end to end: vLLM-format publishers -> kvroute-ingester -> a local Redis.
    Ingest(bench_ingest::Args),
    /// Decision latency (in process, ext_proc, through Envoy) and decisions per second per core.
    Decision(bench_decision::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(Bench::Keys(args)) => bench_keys::run(args),
        Command::Bench(Bench::Index(args)) => bench_index::run(args).await,
        Command::Bench(Bench::Ingest(args)) => bench_ingest::run(args).await,
        Command::Bench(Bench::Decision(args)) => bench_decision::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        // Runs on its own threads (one per job); kvroute's policy makes its
        // own current-thread runtime inside each.
        Command::Live(args) => live::run(args).await,
        Command::Sim(args) => tokio::task::block_in_place(|| sim::run(args)),
    }
}
