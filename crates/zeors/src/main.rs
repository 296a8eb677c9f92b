//! `zeors`: the command-line entry point. Parses flags, sets up logging, opens the
//! storages and runs the server until SIGTERM or SIGINT.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod config;
mod logfile;
mod promote;
mod serve;
mod tools;
mod zconfig;

/// Ends the process with a tool's exit status.
fn exit_with(status: Result<i32>) -> Result<()> {
    let code = status?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

#[derive(Parser)]
#[command(
    name = "zeors",
    version,
    about = "A ZEO storage server for ZODB, written in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve storages to ZEO clients (the `runzeo` equivalent).
    Serve(Box<serve::ServeArgs>),
    /// Check a Data.fs: the format (as fstest) and the references (as fsrefs).
    Check(tools::CheckArgs),
    /// Print every transaction and data record of a Data.fs (as fsdump).
    Dump(tools::DumpArgs),
    /// Pack a Data.fs that is not being served (a served one is packed through ZEO).
    Pack(tools::PackArgs),
    /// Open a Data.fs read-only and tell what it holds and how long opening took.
    Info(tools::InfoArgs),
    /// Make a running replica a primary that accepts commits (sends it SIGUSR1).
    Promote(promote::PromoteArgs),
}

/// Parses sizes the way zeo.conf writes them: a number with an optional KB/MB/GB/TB suffix.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("TB", 1u64 << 40),
        ("GB", 1 << 30),
        ("MB", 1 << 20),
        ("KB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a size: {s:?} (examples: 500MB, 20GB)"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("size must be positive: {s:?}"));
    }
    Ok((n * mult as f64) as u64)
}

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// A file size limit (`ulimit -f`, `RLIMIT_FSIZE`) must make the write that crosses it
/// fail with EFBIG, which the storage reports to the committing client (or the tool to
/// its user), instead of killing the whole server with SIGXFSZ. CPython ignores SIGXFSZ
/// at startup for the same reason, so `runzeo` behaves this way too.
fn ignore_sigxfsz() {
    // SAFETY: only sets the disposition of one signal to "ignore", before any other
    // thread exists; no handler code is installed.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn main() -> Result<()> {
    ignore_sigxfsz();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Check(args) => exit_with(tools::check(args)),
        Command::Dump(args) => exit_with(tools::dump(args)),
        Command::Info(args) => exit_with(tools::info(args)),
        Command::Promote(args) => exit_with(promote::run(args)),
        Command::Pack(args) => {
            // The tool prints its own summary; the pack's progress logs need RUST_LOG=info.
            let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
            init_logging(Some(&level));
            exit_with(tools::pack(args))
        }
    }
}
