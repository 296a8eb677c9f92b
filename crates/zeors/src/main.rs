//! `zeors`: the command-line entry point. Parses flags, sets up logging, opens the
//! storages and runs the server until SIGTERM or SIGINT.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

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
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on: HOST:PORT, PORT (all interfaces) or a unix socket PATH
    /// (anything containing "/"). Repeatable.
    #[arg(short = 'a', long = "address", default_value = "127.0.0.1:8100")]
    addresses: Vec<String>,

    /// Data.fs to serve (created if missing).
    #[arg(short = 'f', long = "filename", default_value = "var/Data.fs")]
    filename: PathBuf,

    /// Name clients use to select the storage (`ClientStorage(storage=...)`).
    #[arg(long = "storage-name", default_value = "1")]
    storage_name: String,

    /// Serve read-only: writable registrations are refused.
    #[arg(long)]
    read_only: bool,

    /// Seconds a client may hold the commit lock between vote and finish before it is
    /// disconnected and its transaction aborted. Default: no limit (as runzeo).
    #[arg(short = 't', long = "transaction-timeout", value_name = "SECONDS")]
    transaction_timeout: Option<f64>,

    /// Transactions remembered for clients reconnecting with a cache.
    #[arg(long, default_value_t = 100)]
    invalidation_queue_size: usize,

    /// Speak msgpack instead of pickle (as `msgpack true` in zeo.conf).
    #[arg(long)]
    msgpack: bool,

    /// Log filter, e.g. `info`, `debug`, `zeors=debug,server=debug`. Overrides RUST_LOG.
    #[arg(long)]
    log_level: Option<String>,
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log_level.as_deref());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(serve(args))
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let msgpack_env = std::env::var("ZEO_MSGPACK")
        .map(|v| !v.is_empty())
        .unwrap_or(false);
    let config = server::ServerConfig {
        read_only: args.read_only,
        encoding: if args.msgpack || msgpack_env {
            zeo_proto::Encoding::Msgpack
        } else {
            zeo_proto::Encoding::Pickle
        },
        transaction_timeout: match args.transaction_timeout {
            Some(t) if t > 0.0 && t.is_finite() => Some(Duration::from_secs_f64(t)),
            Some(t) => bail!("transaction timeout must be a positive number of seconds, not {t}"),
            None => None,
        },
        invalidation_queue_size: args.invalidation_queue_size,
        ..Default::default()
    };

    if let Some(dir) = args.filename.parent() {
        if !dir.as_os_str().is_empty() && !args.read_only {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let storage = filestorage::FileStorage::open(
        &args.filename,
        filestorage::Options {
            read_only: args.read_only,
            create: !args.read_only,
            // Data durable before the status byte can flip: safe against any write-back order.
            sync_on_vote: true,
            ..Default::default()
        },
    )
    .with_context(|| format!("opening {}", args.filename.display()))?;
    info!(path = %args.filename.display(), name = %args.storage_name, "opened FileStorage");
    let storages: Vec<(String, Arc<dyn zodb::Storage>)> =
        vec![(args.storage_name.clone(), Arc::new(storage))];

    let server = server::Server::new(config, storages).await?;
    for address in &args.addresses {
        let listener = server::Listener::bind(address)
            .await
            .with_context(|| format!("listening on {address}"))?;
        server.serve(listener);
    }

    wait_for_signal().await?;
    info!("shutting down");
    server.shutdown().await;
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}
