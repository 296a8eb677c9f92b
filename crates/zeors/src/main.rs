//! `zeors`: the command-line entry point. Parses flags, sets up logging, opens the
//! storages and runs the server until SIGTERM or SIGINT.
//!
//! An operator's mistake (a wrong path, a port in use, a damaged file) ends the process
//! with one line on stderr — `zeors: error: ` and the whole chain of causes, each said
//! once — and exit status 1, never a Rust backtrace, whatever `RUST_BACKTRACE` says:
//! backtraces are for bugs, and panics keep theirs.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::process::ExitCode;

mod config;
mod logfile;
mod progress;
mod promote;
mod serve;
mod tools;
mod zconfig;

/// The error and its causes on one line, outermost first. A cause whose text its parent
/// already ends with (errors that print their source, like `I/O error: {0}`) is left out,
/// so nothing is said twice; line breaks inside a message become spaces.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || out.ends_with(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether log lines on stderr may carry colour: only on a terminal, and never when
/// `NO_COLOR` is set to anything (<https://no-color.org>).
pub(crate) fn stderr_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
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

/// Logging for the offline tools: warnings, and the progress lines when no bar can be
/// shown (see [`progress`]); `RUST_LOG` replaces that filter.
fn init_tool_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,zeors::progress=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stderr_colour())
        .with_writer(progress::Stderr)
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

fn main() -> ExitCode {
    ignore_sigxfsz();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        init_tool_logging();
    }
    let status = match cli.command {
        Command::Serve(args) => serve::run(*args).map(|()| 0),
        Command::Check(args) => tools::check(args),
        Command::Dump(args) => tools::dump(args),
        Command::Info(args) => tools::info(args),
        Command::Pack(args) => tools::pack(args),
        Command::Promote(args) => promote::run(args).map(|c| c.clamp(0, 255) as u8),
    };
    match status {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("zeors: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;
    use anyhow::Context;

    #[test]
    fn each_cause_once_on_one_line() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "x: No such file");
        let e = Err::<(), _>(zodb::StorageError::Io(io))
            .context("opening x")
            .unwrap_err();
        // StorageError::Io prints its source; the source is not repeated.
        assert_eq!(one_line(&e), "opening x: I/O error: x: No such file");
        let e = anyhow::anyhow!("first\nsecond").context("outer");
        assert_eq!(one_line(&e), "outer: first second");
    }
}
