//! `zeo-bench`: the load generator of the server benchmark suite (`bench/server/`).
//!
//! Each subcommand drives one workload against any ZEO server (zeors or the stock Python
//! `runzeo`, the same code for both), and prints one JSON object on stdout that the
//! suite's orchestrator (`bench/server/bench.py`) collects. Everything runs over loopback;
//! the `relay` subcommand shapes a link (bandwidth and delay) for the proxy and
//! replication scenarios.
//!
//! Figures that depend on the server process (CPU seconds, RSS) are read from `/proc`
//! when `--server-pid` is given, at the exact boundaries of the measured window.

mod commits;
mod fanout;
mod floor;
mod lag;
mod loads;
mod meta;
mod micro;
mod pgfloor;
mod procfs;
mod read;
mod relay;
mod rng;
mod stats;
mod txn;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "zeo-bench", version, about = "Benchmark ZEO servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Random `loadBefore` throughput and latency (closed loop, pipelined).
    Loads(loads::Args),
    /// Commits of small transactions, optionally with a contended hot set.
    Commits(commits::Args),
    /// Invalidation fan-out: time from `tpc_finish` until idle clients are told.
    Fanout(fanout::Args),
    /// Replication lag: when a replica's clients learn of the primary's commits.
    Lag(lag::Args),
    /// Reads a fixed sample of objects (cold/warm reads through a proxy).
    Read(read::Args),
    /// A TCP relay that shapes the link (bandwidth, delay) and counts bytes.
    Relay(relay::Args),
    /// A minimal server on the same framing that answers every load from memory: the
    /// floor the real servers' figures are compared with.
    Floor(floor::Args),
    /// Micro-benchmarks of the protocol codec's hot paths.
    Micro(micro::Args),
    /// One PostgreSQL round trip (`SELECT 1`, and zeors's cache-miss statement): the
    /// database's share of a cold load.
    Pgfloor(pgfloor::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    // The floor server's workers, when told; else as many as the CPUs it may use.
    if let Command::Floor(a) = &cli.command {
        if let Some(n) = a.threads {
            rt.worker_threads(n.max(1));
        }
    }
    let rt = rt.enable_all().build()?;
    let report = match cli.command {
        Command::Loads(a) => serde_json::to_value(rt.block_on(loads::run(a))?)?,
        Command::Commits(a) => serde_json::to_value(rt.block_on(commits::run(a))?)?,
        Command::Fanout(a) => serde_json::to_value(rt.block_on(fanout::run(a))?)?,
        Command::Lag(a) => serde_json::to_value(rt.block_on(lag::run(a))?)?,
        Command::Read(a) => serde_json::to_value(rt.block_on(read::run(a))?)?,
        Command::Relay(a) => return rt.block_on(relay::run(a)),
        Command::Micro(a) => serde_json::to_value(micro::run(a))?,
        Command::Pgfloor(a) => serde_json::to_value(rt.block_on(pgfloor::run(a))?)?,
        Command::Floor(a) => return rt.block_on(floor::run(a)),
    };
    println!("{report}");
    Ok(())
}
