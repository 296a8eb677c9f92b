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

    /// Proxy mode: serve the storage of this upstream ZEO server (HOST:PORT or socket
    /// path) through a persistent cache instead of a Data.fs. Repeat for failover.
    #[arg(long = "upstream", value_name = "ADDRESS")]
    upstreams: Vec<String>,

    /// Proxy mode: name of the storage on the upstream server.
    #[arg(long, default_value = "1")]
    upstream_storage: String,

    /// Proxy mode: directory of the persistent cache.
    #[arg(long, default_value = "var/cache")]
    cache_dir: PathBuf,

    /// Proxy mode: size bound of the cache, e.g. 500MB, 20GB.
    #[arg(long, default_value = "1GB", value_parser = parse_size)]
    cache_size: u64,
}

/// Parses sizes the way zeo.conf writes them: a number with an optional KB/MB/GB/TB suffix.
fn parse_size(s: &str) -> Result<u64, String> {
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

    if !args.upstreams.is_empty() {
        return serve_proxy(args, config).await;
    }
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
    run_server(server, &args.addresses).await
}

/// Proxy mode: the storage is a ZEO client of the upstream server, with a persistent cache.
async fn serve_proxy(args: ServeArgs, config: server::ServerConfig) -> Result<()> {
    let cache = proxy::cache::CacheConfig {
        dir: args.cache_dir.clone(),
        max_bytes: args.cache_size,
        invalidation_log_size: 100_000,
    };
    let mut pconfig = proxy::ProxyConfig::new(
        args.upstreams
            .iter()
            .map(|a| zeo_client::Address(a.clone()))
            .collect(),
        cache,
    );
    pconfig.storage = args.upstream_storage.clone();
    pconfig.read_only = args.read_only;
    let storage =
        Arc::new(proxy::UpstreamStorage::open(pconfig).context("opening the proxy storage")?);
    let cached = zodb::Storage::last_transaction(&*storage) != zodb::Tid::ZERO;
    let storages: Vec<(String, Arc<dyn zodb::Storage>)> =
        vec![(args.storage_name.clone(), storage.clone())];
    let server = server::Server::new(config, storages).await?;
    // Serve only once we know where upstream stands; with a warm cache, start serving
    // it after a short wait even if upstream is unreachable.
    info!(upstream = ?args.upstreams, cache = %args.cache_dir.display(), "proxy mode: connecting upstream");
    if cached {
        if !storage.wait_ready(Duration::from_secs(10)).await {
            tracing::warn!("upstream not reachable yet; serving from the cache meanwhile");
        }
    } else {
        while !storage.wait_ready(Duration::from_secs(30)).await {
            tracing::warn!(
                "waiting for the upstream server (the cache is empty, nothing to serve yet)"
            );
        }
    }
    run_server(server, &args.addresses).await
}

async fn run_server(server: server::Server, addresses: &[String]) -> Result<()> {
    for address in addresses {
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
