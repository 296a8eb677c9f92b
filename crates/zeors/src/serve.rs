//! `zeors serve`: builds the storages and the server from flags or a `zeo.conf`, sets up
//! logging, the pid file and signals, and runs until SIGTERM or SIGINT.
//!
//! (About 1,000 lines: the one place where every flag and `zeo.conf` section becomes a
//! running storage — FileStorage, proxy, PostgreSQL, replicated — and where start-up
//! ordering lives: addresses bound before storages open, signals before accepting.)

use crate::config::{self, LogConf, StorageKind, ZeoConf};
use crate::logfile::LogFile;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

#[derive(Args)]
pub struct ServeArgs {
    /// Read this ZConfig file, as `runzeo -C` does (`<zeo>`, `<filestorage>`,
    /// `<zeoclient>`, `<eventlog>`). Flags given as well override it.
    #[arg(short = 'C', long = "configure", value_name = "ZEO.CONF")]
    configure: Option<PathBuf>,

    /// Address to listen on: HOST:PORT, PORT (all interfaces) or a unix socket PATH
    /// (anything containing "/"). Repeatable. Default: 127.0.0.1:8100.
    #[arg(short = 'a', long = "address")]
    addresses: Vec<String>,

    /// Data.fs to serve (created if missing; its directory must exist, except for the
    /// default var/, which is created). Default: var/Data.fs.
    #[arg(short = 'f', long = "filename")]
    filename: Option<PathBuf>,

    /// Blob directory: with a Data.fs, where its blobs are kept (Python ZODB's layout,
    /// created if missing); in proxy mode, the blob cache (or, with --shared-blob-dir,
    /// the upstream server's own blob directory). Without it, blobs are refused.
    #[arg(long, value_name = "DIR")]
    blob_dir: Option<PathBuf>,

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

    /// Transactions remembered for clients reconnecting with a cache. Default: 100.
    #[arg(long)]
    invalidation_queue_size: Option<usize>,

    /// Speak msgpack instead of pickle (as `msgpack true` in zeo.conf).
    #[arg(long)]
    msgpack: bool,

    /// TLS: the server's PEM certificate (chain); enables TLS on TCP addresses.
    #[arg(long, value_name = "PEM")]
    tls_certificate: Option<PathBuf>,

    /// TLS: the server's PEM private key, if not in the certificate file.
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,

    /// TLS: require client certificates signed by this CA (file or directory).
    #[arg(long, value_name = "PEM")]
    tls_authenticate: Option<PathBuf>,

    /// Output queued for one client (replies, invalidations) before it is considered
    /// stuck and disconnected. Default: 256MB.
    #[arg(long, value_parser = crate::parse_size)]
    max_client_queue: Option<u64>,

    /// Output queued for all clients together: past it, clients with more than a little
    /// output waiting are not read from (and their requests not started) until it
    /// drains. Default: 256MB.
    #[arg(long, value_parser = crate::parse_size, value_name = "SIZE")]
    max_queued_total: Option<u64>,

    /// Connections served at once (every address together); more are closed at once.
    /// Default: 10000.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// Open iterators (`iterator_start`, record iterators) per connection; more are
    /// refused with an error. Default: 100.
    #[arg(long, value_name = "N")]
    max_iterators: Option<usize>,

    /// Record data one transaction may carry (its stores together); its vote fails with
    /// an error beyond it and nothing is committed. Default: 2GB.
    #[arg(long, value_parser = crate::parse_size, value_name = "SIZE")]
    max_transaction_size: Option<u64>,

    /// Record data one transaction keeps in memory before the rest waits for its vote in
    /// a temporary file (in TMPDIR, as runzeo's). Default: 2MB.
    #[arg(long, value_parser = crate::parse_size, value_name = "SIZE")]
    spill_threshold: Option<u64>,

    /// Seconds a connection may stay silent (no request, no heartbeat: ZEO clients send
    /// one every 60 s) with nothing of its own in progress before it is closed; 0: never.
    /// Default: 600.
    #[arg(long, value_name = "SECONDS")]
    idle_timeout: Option<f64>,

    /// Permissions of unix sockets, in octal (e.g. 660 to let the group connect).
    /// Default: as the umask makes them, as runzeo does (owner only with umask 022).
    #[arg(long, value_parser = parse_mode, value_name = "OCTAL")]
    socket_mode: Option<u32>,

    /// Serve Prometheus metrics at http://ADDRESS/metrics (off by default).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_address: Option<String>,

    /// Write the process id here while running.
    #[arg(long = "pid-file", value_name = "PATH")]
    pid_file: Option<PathBuf>,

    /// Log filter, e.g. `info`, `debug`, `zeors=debug,server=debug`. Overrides RUST_LOG
    /// and the level in zeo.conf.
    #[arg(long)]
    log_level: Option<String>,

    /// Replication (primary): listen for replicas at HOST:PORT, PORT or a socket path
    /// (zc.zrs's `replicate-to`) and feed them the Data.fs's transactions. A replica
    /// given this too feeds further replicas (chains).
    #[arg(long, value_name = "ADDRESS")]
    replicate_to: Option<String>,

    /// Replication (replica): follow the primary listening at this address (its
    /// --replicate-to; zc.zrs's `replicate-from`), keeping -f a copy of its Data.fs.
    /// Clients of a replica are read-only unless --forward-writes is given.
    #[arg(long, value_name = "ADDRESS")]
    replicate_from: Option<String>,

    /// Replication (replica): send a keep-alive to the primary every SECONDS
    /// (zc.zrs's `keep-alive-delay`). Default: none.
    #[arg(long, value_name = "SECONDS")]
    keep_alive_delay: Option<f64>,

    /// Replication (replica): clients may commit; their commits are sent to the
    /// primary's ZEO server at this address, and `tpc_finish` returns once the replica
    /// has applied the transaction (read-your-writes).
    #[arg(long, value_name = "HOST:PORT")]
    forward_writes: Option<String>,

    /// Proxy mode: serve the storage of this upstream ZEO server (HOST:PORT or socket
    /// path) through a persistent cache instead of a Data.fs. Repeat for failover.
    #[arg(long = "upstream", value_name = "ADDRESS")]
    upstreams: Vec<String>,

    /// Proxy mode: TLS to upstream (as `<ssl>` in `<zeoclient>`), checking its
    /// certificate against the system's CAs unless --upstream-tls-authenticate is given.
    /// Implied by any other --upstream-tls-* flag.
    #[arg(long)]
    upstream_tls: bool,

    /// Proxy mode: the client certificate (PEM) presented to upstream.
    #[arg(long, value_name = "PEM")]
    upstream_tls_certificate: Option<PathBuf>,

    /// Proxy mode: the key of --upstream-tls-certificate, if not in that file.
    #[arg(long, value_name = "PEM")]
    upstream_tls_key: Option<PathBuf>,

    /// Proxy mode: certificates (a PEM file, or an OpenSSL hashed directory) upstream's
    /// certificate must be or chain to.
    #[arg(long, value_name = "PEM")]
    upstream_tls_authenticate: Option<PathBuf>,

    /// Proxy mode: the name upstream's certificate must carry (and that is sent as SNI),
    /// instead of the host of --upstream.
    #[arg(long, value_name = "NAME")]
    upstream_tls_server_hostname: Option<String>,

    /// Proxy mode: do not check upstream's certificate's name (`check-hostname false`).
    #[arg(long)]
    upstream_tls_no_check_hostname: bool,

    /// Proxy mode: name of the storage on the upstream server.
    #[arg(long, default_value = "1")]
    upstream_storage: String,

    /// Proxy mode: directory of the persistent cache.
    #[arg(long, default_value = "var/cache")]
    cache_dir: PathBuf,

    /// Proxy mode: size bound of the cache, e.g. 500MB, 20GB.
    #[arg(long, default_value = "1GB", value_parser = crate::parse_size)]
    cache_size: u64,

    /// Proxy mode: size bound of the blob cache in --blob-dir, e.g. 10GB.
    #[arg(long, default_value = "10GB", value_parser = crate::parse_size)]
    blob_cache_size: u64,

    /// --blob-dir is shared with clients: with a Data.fs, clients configured with
    /// `shared-blob-dir` write their blob files into it and commit them with
    /// `storeBlobShared` (refused without this flag); in proxy mode, it is the upstream
    /// server's blob directory (a network file system), read and written directly.
    #[arg(long)]
    shared_blob_dir: bool,

    /// Proxy mode (also with -C): after a cache miss, fetch up to N of the objects the
    /// fetched record references before they are asked for, overlapping the slow link's
    /// round trips in a cold traversal; 0 turns prefetching off.
    #[arg(long, default_value_t = 64, value_name = "N")]
    prefetch: usize,

    /// Proxy mode (also with -C): memory for the cache's index (its page cache and the
    /// window of recent invalidations), e.g. 64MB. Default: 1/64 of the cache size,
    /// between 16MB and 256MB.
    #[arg(long, value_parser = crate::parse_size, value_name = "SIZE")]
    cache_index_memory: Option<u64>,

    /// Proxy mode (also with -C): fill the cache from a zeors upstream in the background,
    /// every object once, while clients' misses keep priority on the link; a restart
    /// resumes where it stopped. Over a stock upstream it does nothing (and says so).
    #[arg(long)]
    warm: bool,

    /// Proxy mode (also with -C): do not compress the link to a zeors upstream. By
    /// default it is compressed with zstd when upstream offers it (a stock upstream sees
    /// plain ZEO), except over TLS.
    #[arg(long)]
    no_upstream_compression: bool,

    /// Serve a RelStorage database on PostgreSQL instead of a Data.fs: a libpq
    /// connection string (`host=/run/postgresql dbname=zodb`) or a postgresql:// URL.
    /// The schema is created when missing. --blob-dir is then where blobs are staged
    /// and cached on this machine (the blobs themselves live in the database).
    #[arg(long, value_name = "DSN")]
    postgresql: Option<String>,

    /// With --postgresql: the history-preserving layout (true, RelStorage's default) or
    /// the history-free one (false).
    #[arg(long, value_name = "BOOL", default_value = "true", action = clap::ArgAction::Set)]
    keep_history: bool,

    /// PostgreSQL storages (--postgresql or <relstorage>): database connections this
    /// server keeps at most. Default: 16.
    #[arg(long, value_name = "N")]
    pg_pool_size: Option<usize>,

    /// PostgreSQL storages: how often (milliseconds) the database is polled for commits
    /// made by RelStorage clients; other zeors servers' commits arrive by NOTIFY at once.
    /// Default: 100.
    #[arg(long, value_name = "MS")]
    pg_poll_interval: Option<u64>,

    /// PostgreSQL storages: memory for recent object states, e.g. 64MB (in zeo.conf:
    /// `cache-local-mb`). Default: 64MB.
    #[arg(long, value_parser = crate::parse_size, value_name = "SIZE")]
    pg_cache_size: Option<u64>,

    /// PostgreSQL storages: seconds a commit waits for an object lock held by another
    /// writer before failing with a ConflictError (in zeo.conf: `commit-lock-timeout`).
    /// Default: 30.
    #[arg(long, value_name = "SECONDS")]
    commit_lock_timeout: Option<f64>,
}

/// Settings of proxy storages that come from the command line even with -C.
#[derive(Debug, Clone, Copy)]
struct ProxyTuning {
    /// References prefetched per miss.
    prefetch: usize,
    /// Memory for each cache's index; `None`: derived from the cache size.
    index_memory: Option<u64>,
    /// Warm each cache from upstream in the background.
    warm: bool,
    /// Compress links to zeors upstreams.
    compress: bool,
}

/// Everything needed to start, whether it came from flags or a file.
struct Plan {
    addresses: Vec<String>,
    server: server::ServerConfig,
    storages: Vec<config::StorageConf>,
    log: LogConf,
    pid_file: Option<PathBuf>,
    socket_mode: Option<u32>,
    metrics_address: Option<String>,
    tls: Option<server::tls::TlsSettings>,
    warnings: Vec<String>,
    proxy: ProxyTuning,
    /// The directory of the default `var/Data.fs`, the only one zeors creates: a path
    /// that is given and does not exist is a typo until proven otherwise (Python's
    /// FileStorage raises FileNotFoundError too).
    default_dir: Option<PathBuf>,
    pg: PgTuning,
}

/// Settings of PostgreSQL storages given on the command line (they override zeo.conf).
#[derive(Debug, Clone, Copy)]
struct PgTuning {
    pool_size: Option<usize>,
    poll_interval: Option<Duration>,
    cache_bytes: Option<usize>,
    commit_lock_timeout: Option<Duration>,
}

/// Where the default storage lives when neither -f, --upstream nor -C says otherwise.
const DEFAULT_PATH: &str = "var/Data.fs";

/// The largest `--max-transaction-size`: a spilling transaction maps a sparse file of
/// that size, which must stay far within the address space and file size limits.
const MAX_TRANSACTION_SIZE: u64 = 1 << 40;

/// The `--upstream-tls*` flags, if any is given.
fn upstream_tls(args: &ServeArgs) -> Option<zeo_tls::ClientTlsSettings> {
    let any = args.upstream_tls
        || args.upstream_tls_certificate.is_some()
        || args.upstream_tls_key.is_some()
        || args.upstream_tls_authenticate.is_some()
        || args.upstream_tls_server_hostname.is_some()
        || args.upstream_tls_no_check_hostname;
    any.then(|| zeo_tls::ClientTlsSettings {
        certificate: args.upstream_tls_certificate.clone(),
        key: args.upstream_tls_key.clone(),
        authenticate: args.upstream_tls_authenticate.clone(),
        check_hostname: !args.upstream_tls_no_check_hostname,
        server_hostname: args.upstream_tls_server_hostname.clone(),
    })
}

fn plan(args: &ServeArgs) -> Result<Plan> {
    let conf = match &args.configure {
        Some(path) => config::load(path)?,
        None => ZeoConf {
            storages: vec![config::StorageConf {
                name: args.storage_name.clone(),
                kind: if let Some(dsn) = &args.postgresql {
                    let mut o = relstorage::Options::new(dsn.clone());
                    o.layout = relstorage::Layout::from_keep_history(args.keep_history);
                    o.blob_dir = args.blob_dir.clone();
                    o.name = args.storage_name.clone();
                    StorageKind::Postgres(o)
                } else if args.upstreams.is_empty() {
                    StorageKind::File {
                        path: args
                            .filename
                            .clone()
                            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH)),
                        blob_dir: args.blob_dir.clone(),
                        read_only: false,
                        quota: None,
                        pack_gc: true,
                        pack_keep_old: true,
                        shared_blob_dir: args.shared_blob_dir,
                    }
                } else {
                    StorageKind::Upstream {
                        servers: args.upstreams.clone(),
                        storage: args.upstream_storage.clone(),
                        cache_dir: args.cache_dir.clone(),
                        cache_size: args.cache_size,
                        read_only: false,
                        blob_dir: args.blob_dir.clone(),
                        blob_cache_size: Some(args.blob_cache_size),
                        shared_blob_dir: args.shared_blob_dir,
                        tls: upstream_tls(args),
                    }
                },
                zrs: None,
            }],
            ..Default::default()
        },
    };
    let mut conf = conf;
    let flags_zrs = config::ZrsConf {
        replicate_to: args.replicate_to.clone(),
        replicate_from: args.replicate_from.clone(),
        keep_alive_delay: args.keep_alive_delay.unwrap_or(0.0),
        forward_writes: args.forward_writes.clone(),
    };
    if flags_zrs != config::ZrsConf::default() {
        if !args.upstreams.is_empty() {
            bail!("replication (--replicate-to/--replicate-from) serves a Data.fs, not a proxy (--upstream)");
        }
        let files: Vec<&mut config::StorageConf> = conf
            .storages
            .iter_mut()
            .filter(|s| matches!(s.kind, StorageKind::File { .. }))
            .collect();
        let [storage] = <[_; 1]>::try_from(files).map_err(|_| {
            anyhow::anyhow!("--replicate-to/--replicate-from need exactly one FileStorage (use <zrs> sections in zeo.conf for several)")
        })?;
        let mut z = storage.zrs.clone().unwrap_or_default();
        if flags_zrs.replicate_to.is_some() {
            z.replicate_to = flags_zrs.replicate_to;
        }
        if flags_zrs.replicate_from.is_some() {
            z.replicate_from = flags_zrs.replicate_from;
        }
        if args.keep_alive_delay.is_some() {
            z.keep_alive_delay = flags_zrs.keep_alive_delay;
        }
        if flags_zrs.forward_writes.is_some() {
            z.forward_writes = flags_zrs.forward_writes;
        }
        config::check_zrs(&z)?;
        storage.zrs = Some(z);
    }
    if args.configure.is_some()
        && (args.filename.is_some()
            || !args.upstreams.is_empty()
            || args.blob_dir.is_some()
            || args.postgresql.is_some()
            || upstream_tls(args).is_some())
    {
        bail!("give storages either in zeo.conf or with -f/--upstream/--postgresql/--blob-dir, not both");
    }
    if args.postgresql.is_some() && (args.filename.is_some() || !args.upstreams.is_empty()) {
        bail!("--postgresql serves a database: it goes with neither -f nor --upstream");
    }
    if args
        .commit_lock_timeout
        .is_some_and(|t| !(t > 0.0 && t.is_finite()))
    {
        bail!("--commit-lock-timeout must be a positive number of seconds");
    }
    if args.shared_blob_dir && args.blob_dir.is_none() {
        bail!("--shared-blob-dir needs --blob-dir");
    }
    let addresses = if !args.addresses.is_empty() {
        args.addresses.clone()
    } else if !conf.zeo.addresses.is_empty() {
        conf.zeo.addresses.clone()
    } else {
        vec!["127.0.0.1:8100".to_string()]
    };
    let msgpack_env = std::env::var("ZEO_MSGPACK")
        .map(|v| !v.is_empty())
        .unwrap_or(false);
    let msgpack = args.msgpack || conf.zeo.msgpack.unwrap_or(msgpack_env);
    let timeout = args.transaction_timeout.or(conf.zeo.transaction_timeout);
    let defaults = server::ServerConfig::default();
    let server = server::ServerConfig {
        read_only: args.read_only || conf.zeo.read_only,
        encoding: if msgpack {
            zeo_proto::Encoding::Msgpack
        } else {
            zeo_proto::Encoding::Pickle
        },
        transaction_timeout: match timeout {
            Some(t) if t > 0.0 && t.is_finite() => Some(Duration::from_secs_f64(t)),
            Some(0.0) => None,
            Some(t) => bail!("transaction timeout must be a positive number of seconds, not {t}"),
            None => None,
        },
        invalidation_queue_size: args
            .invalidation_queue_size
            .or(conf.zeo.invalidation_queue_size)
            .unwrap_or(100),
        max_queued_bytes: args
            .max_client_queue
            .or(conf.zeo.max_client_queue)
            .unwrap_or(defaults.max_queued_bytes as u64) as usize,
        max_queued_total: args
            .max_queued_total
            .or(conf.zeo.max_queued_total)
            .unwrap_or(defaults.max_queued_total as u64) as usize,
        max_connections: args
            .max_connections
            .or(conf.zeo.max_connections)
            .unwrap_or(defaults.max_connections),
        max_iterators: args
            .max_iterators
            .or(conf.zeo.max_iterators)
            .unwrap_or(defaults.max_iterators),
        max_transaction_size: match args.max_transaction_size.or(conf.zeo.max_transaction_size) {
            None => defaults.max_transaction_size,
            Some(n) if (1..=MAX_TRANSACTION_SIZE).contains(&n) => n,
            Some(n) => bail!("max transaction size must be between 1 byte and 1TB, not {n} bytes"),
        },
        spill_threshold: args
            .spill_threshold
            .or(conf.zeo.spill_threshold)
            .unwrap_or(defaults.spill_threshold),
        idle_timeout: match args.idle_timeout.or(conf.zeo.idle_timeout) {
            None => defaults.idle_timeout,
            Some(0.0) => None,
            Some(t) if t > 0.0 && t.is_finite() => Some(Duration::from_secs_f64(t)),
            Some(t) => bail!("idle timeout must be a positive number of seconds or 0, not {t}"),
        },
        ..defaults
    };
    let tls = match (&args.tls_certificate, conf.zeo.ssl) {
        (Some(cert), _) => Some(server::tls::TlsSettings {
            certificate: cert.clone(),
            key: args.tls_key.clone(),
            authenticate: args.tls_authenticate.clone(),
        }),
        (None, Some(ssl)) => Some(server::tls::TlsSettings {
            certificate: ssl.certificate,
            key: ssl.key,
            authenticate: ssl.authenticate,
        }),
        (None, None) => None,
    };
    let mut log = conf.log.clone().unwrap_or(LogConf {
        path: None,
        level: "info".into(),
    });
    if let Some(level) = &args.log_level {
        log.level = level.clone();
    } else if conf.log.is_none() {
        if let Ok(env) = std::env::var("RUST_LOG") {
            log.level = env;
        }
    }
    Ok(Plan {
        addresses,
        server,
        storages: conf.storages,
        log,
        pid_file: args.pid_file.clone().or(conf.zeo.pid_filename),
        socket_mode: args.socket_mode.or(conf.zeo.socket_mode),
        metrics_address: args.metrics_address.clone(),
        tls,
        warnings: conf.warnings,
        proxy: ProxyTuning {
            prefetch: args.prefetch,
            index_memory: args.cache_index_memory,
            warm: args.warm,
            compress: !args.no_upstream_compression,
        },
        pg: PgTuning {
            pool_size: args.pg_pool_size,
            poll_interval: args
                .pg_poll_interval
                .map(|ms| Duration::from_millis(ms.max(1))),
            cache_bytes: args.pg_cache_size.map(|b| b as usize),
            commit_lock_timeout: args.commit_lock_timeout.map(Duration::from_secs_f64),
        },
        default_dir: (args.configure.is_none()
            && args.filename.is_none()
            && args.upstreams.is_empty())
        .then(|| {
            Path::new(DEFAULT_PATH)
                .parent()
                .expect("the default path has a directory")
                .to_path_buf()
        }),
    })
}

/// An octal file mode (`660`, `0660`, `0o660`).
fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    let digits = s.trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal file mode such as 660")),
    }
}

/// Runs `zeors serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let plan = plan(&args)?;
    let logfile = init_logging(&plan.log)?;
    for w in &plan.warnings {
        warn!("{w}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut fresh = FreshFiles {
        storages: Vec::new(),
        dir: plan.default_dir.clone().filter(|d| !d.exists()),
        serving: false,
    };
    let result = rt.block_on(serve(plan, logfile, &mut fresh));
    // Storages, listeners and tasks are gone with the runtime: nothing holds the files.
    drop(rt);
    if result.is_err() && !fresh.serving {
        fresh.remove_if_unused();
    }
    result
}

/// What this start created, so that a start that fails before serving leaves nothing
/// behind: a typo'd port must not leave a new empty Data.fs that a later start would
/// happily serve.
struct FreshFiles {
    /// Data.fs files this process created (it held their lock, so no other process did),
    /// each with the companions that did not exist before.
    storages: Vec<(PathBuf, Vec<PathBuf>)>,
    /// The default directory, if it did not exist.
    dir: Option<PathBuf>,
    /// Set once clients are accepted: from then on nothing is removed.
    serving: bool,
}

impl FreshFiles {
    /// The companions of `path` that do not exist yet; call before opening it.
    fn missing_companions(path: &Path) -> Vec<PathBuf> {
        [".index", ".lock", ".tmp", ".index.index_tmp"]
            .iter()
            .map(|suffix| {
                let mut p = path.as_os_str().to_owned();
                p.push(suffix);
                PathBuf::from(p)
            })
            .filter(|p| !p.exists())
            .collect()
    }

    /// Removes what this start created, as long as nothing was committed to it (a new
    /// file holds only the 4-byte magic).
    fn remove_if_unused(self) {
        for (path, companions) in self.storages {
            match std::fs::metadata(&path) {
                Ok(m) if m.len() <= 4 => {}
                _ => continue,
            }
            for p in std::iter::once(&path).chain(&companions) {
                if let Err(e) = std::fs::remove_file(p) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        warn!(file = %p.display(), error = %e, "could not remove a file created by this failed start");
                    }
                }
            }
        }
        if let Some(dir) = self.dir {
            // Only if empty: anything else in it is not ours to delete.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn init_logging(log: &LogConf) -> Result<Option<LogFile>> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    match &log.path {
        None => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(crate::stderr_colour())
                .with_writer(crate::progress::Stderr)
                .init();
            Ok(None)
        }
        Some(path) => {
            let file = LogFile::open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(file.clone())
                .init();
            Ok(Some(file))
        }
    }
}

/// Opens one storage from its configuration; a replicated FileStorage becomes a
/// [`replication::Node`] (started later by [`start_replication`]).
async fn open_storage(
    conf: &config::StorageConf,
    server_read_only: bool,
    tuning: ProxyTuning,
    default_dir: Option<&Path>,
    pg: PgTuning,
) -> Result<Opened> {
    match &conf.kind {
        StorageKind::Postgres(opts) => {
            let mut opts = opts.clone();
            opts.read_only |= server_read_only;
            opts.pool_size = pg.pool_size.unwrap_or(16);
            if let Some(p) = pg.poll_interval {
                opts.poll_interval = p;
            }
            if let Some(c) = pg.cache_bytes {
                opts.cache_bytes = c;
            }
            if let Some(t) = pg.commit_lock_timeout {
                opts.commit_lock_timeout = t;
            }
            if opts.name.is_empty() {
                opts.name = conf.name.clone();
            }
            let layout = opts.layout;
            let storage = relstorage::PgStorage::open(opts)
                .await
                .map_err(|e| anyhow::anyhow!("storage {:?}: {e}", conf.name))?;
            info!(name = %conf.name, ?layout, "opened RelStorage database on PostgreSQL");
            Ok(Opened::Pg(Arc::new(storage)))
        }
        StorageKind::File {
            path,
            blob_dir,
            read_only,
            quota,
            pack_gc,
            pack_keep_old,
            shared_blob_dir,
        } => {
            if *shared_blob_dir && blob_dir.is_none() {
                bail!("storage {:?}: shared-blob-dir needs a blob-dir", conf.name);
            }
            // Only the storage's own `read-only` opens the file read-only (and then a
            // missing file is an error). A read-only *server* (`--read-only`, `<zeo>
            // read-only`) opens its storage as usual, creating a missing file as runzeo
            // does, and refuses writes at registration.
            let read_only = *read_only;
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            if let Some(dir) = dir {
                if !read_only && Some(dir) == default_dir {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                } else {
                    match std::fs::metadata(dir) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                            "{}: no such directory {} (zeors creates only the default {}; \
                             create the directory or correct the path)",
                            path.display(),
                            dir.display(),
                            DEFAULT_PATH
                        ),
                        Ok(m) if !m.is_dir() => {
                            bail!("{}: {} is not a directory", path.display(), dir.display())
                        }
                        // Anything else (permissions) the open reports, naming the file.
                        _ => {}
                    }
                }
            }
            let storage = filestorage::FileStorage::open(
                path,
                filestorage::Options {
                    read_only,
                    // runzeo creates a missing Data.fs too (FileStorage opens with "a+").
                    create: !read_only,
                    quota: *quota,
                    // Data durable before the status byte can flip: safe against any
                    // write-back order.
                    sync_on_vote: true,
                    pack_discard_old: !*pack_keep_old,
                    pack_without_gc: !*pack_gc,
                    blob_dir: blob_dir.clone(),
                    shared_blob_dir: *shared_blob_dir,
                    ..Default::default()
                },
            )
            .map_err(|e| {
                // Its errors name the file they are about (Data.fs or its .lock, .index,
                // .trN or blob directory); say which storage only if one does not.
                if e.to_string().contains(&*path.to_string_lossy()) {
                    anyhow::Error::new(e)
                } else {
                    anyhow::Error::new(e).context(format!("opening {}", path.display()))
                }
            })?;
            info!(path = %path.display(), name = %conf.name, "opened FileStorage");
            if let Some(z) = &conf.zrs {
                let role = match &z.replicate_from {
                    Some(source) => replication::Role::Replica {
                        source: source.clone(),
                    },
                    None => replication::Role::Primary,
                };
                if read_only && role == replication::Role::Primary {
                    warn!(name = %conf.name, "a read-only primary: replicas are fed, clients cannot commit");
                }
                let node = replication::Node::new(storage, role.clone());
                if let Some(address) = &z.forward_writes {
                    node.set_forwarder(replication::Forwarder::new(replication::ForwardConfig {
                        servers: vec![address.clone()],
                        storage: conf.name.clone(),
                    }));
                }
                info!(
                    name = %conf.name,
                    role = match role { replication::Role::Primary => "primary", _ => "replica" },
                    replicate_from = z.replicate_from.as_deref().unwrap_or("-"),
                    replicate_to = z.replicate_to.as_deref().unwrap_or("-"),
                    forward_writes = z.forward_writes.as_deref().unwrap_or("-"),
                    "replication"
                );
                return Ok(Opened::Replicated(node, z.clone()));
            }
            Ok(Opened::File(Arc::new(storage)))
        }
        StorageKind::Upstream {
            servers,
            storage,
            cache_dir,
            cache_size,
            read_only,
            blob_dir,
            blob_cache_size,
            shared_blob_dir,
            tls,
        } => {
            if *shared_blob_dir && blob_dir.is_none() {
                bail!("storage {:?}: shared-blob-dir needs a blob-dir", conf.name);
            }
            let cache = proxy::cache::CacheConfig {
                dir: cache_dir.clone(),
                max_bytes: *cache_size,
                invalidation_log_size: proxy::cache::DEFAULT_INVALIDATION_LOG_SIZE,
                index_memory: tuning.index_memory,
            };
            let mut pconfig = proxy::ProxyConfig::new(
                servers
                    .iter()
                    .map(|a| zeo_client::Address(a.clone()))
                    .collect(),
                cache,
            );
            pconfig.storage = storage.clone();
            pconfig.read_only = *read_only || server_read_only;
            pconfig.prefetch = tuning.prefetch;
            pconfig.warm = tuning.warm;
            pconfig.compress = tuning.compress;
            pconfig.progress = zodb::progress::ProgressHandle::new(
                crate::progress::Reporter::for_server(format!("storage {:?}", conf.name)),
            );
            pconfig.tls = match tls {
                Some(t) => Some(
                    zeo_tls::ClientTls::new(t)
                        .with_context(|| format!("storage {:?}: TLS to upstream", conf.name))?,
                ),
                None => None,
            };
            pconfig.blobs = blob_dir.as_ref().map(|dir| proxy::blobs::BlobConfig {
                dir: dir.clone(),
                // Python's ClientStorage does not bound its blob cache by default either.
                max_bytes: blob_cache_size.unwrap_or(u64::MAX),
                shared: *shared_blob_dir,
            });
            let storage =
                proxy::UpstreamStorage::open(pconfig).context("opening the proxy storage")?;
            info!(name = %conf.name, upstream = ?servers, cache = %cache_dir.display(), "proxy storage");
            Ok(Opened::Proxy(Arc::new(storage)))
        }
    }
}

enum Opened {
    File(Arc<filestorage::FileStorage>),
    Proxy(Arc<proxy::UpstreamStorage>),
    Replicated(Arc<replication::Node>, config::ZrsConf),
    Pg(Arc<relstorage::PgStorage>),
}

/// Starts feeding replicas and following primaries. Runs after the server has attached
/// its invalidation hubs, so that no applied transaction is missed by them.
async fn start_replication(nodes: &[(Arc<replication::Node>, config::ZrsConf)]) -> Result<()> {
    for (node, z) in nodes {
        if let Some(address) = &z.replicate_to {
            if address.contains('/') {
                server::remove_stale_socket(std::path::Path::new(address))
                    .with_context(|| format!("listening for replicas on {address}"))?;
            }
            let listener = replication::net::Listener::bind(address)
                .await
                .with_context(|| format!("listening for replicas on {address}"))?;
            replication::primary::spawn(node.clone(), listener);
        }
        if let Some(source) = &z.replicate_from {
            let mut f = replication::FollowConfig::new(source.clone());
            if z.keep_alive_delay > 0.0 {
                f.keep_alive = Some(Duration::from_secs_f64(z.keep_alive_delay));
            }
            replication::replica::spawn(node.clone(), f);
        }
    }
    Ok(())
}

/// Promotes every replica (SIGUSR1, `zeors promote`).
async fn promote(nodes: &[(Arc<replication::Node>, config::ZrsConf)]) {
    let mut any = false;
    for (node, _) in nodes {
        if node.is_replica() {
            any = true;
            match node.promote().await {
                Ok(tid) => info!(last = %tid, "promoted to primary"),
                Err(e) => warn!(error = %e, "promotion failed"),
            }
        }
    }
    if !any {
        warn!("promotion asked, but no storage is a replica");
    }
}

async fn serve(plan: Plan, logfile: Option<LogFile>, fresh: &mut FreshFiles) -> Result<()> {
    // Everything about the addresses that can fail does so before a storage is created
    // or opened; clients are refused (not queued) until the storages are ready.
    let acceptor = match &plan.tls {
        Some(t) => {
            if t.authenticate.is_none() {
                warn!(
                    "TLS without client authentication: any client that can reach the server \
                     may connect and register writable; give --tls-authenticate (or \
                     `authenticate` in <ssl>) to require client certificates"
                );
            }
            Some(server::tls::acceptor(t).context("setting up TLS")?)
        }
        None => None,
    };
    let mut reserved = Vec::new();
    for address in &plan.addresses {
        let socket = server::Listener::reserve(address, plan.socket_mode)
            .await
            .with_context(|| format!("listening on {address}"))?;
        if acceptor.is_some() && address.contains('/') {
            bail!("listening on {address}: TLS on a unix socket is not supported");
        }
        reserved.push((address, socket));
    }
    let metrics = match &plan.metrics_address {
        Some(address) => Some((
            address,
            server::Listener::reserve(address, None)
                .await
                .with_context(|| format!("metrics endpoint on {address}"))?,
        )),
        None => None,
    };

    let mut storages: Vec<(String, Arc<dyn zodb::Storage>)> = Vec::new();
    let mut proxies = Vec::new();
    let mut nodes = Vec::new();
    for conf in &plan.storages {
        let new_file = match &conf.kind {
            StorageKind::File { path, .. } if !path.exists() => {
                Some((path.clone(), FreshFiles::missing_companions(path)))
            }
            _ => None,
        };
        let opened = open_storage(
            conf,
            plan.server.read_only,
            plan.proxy,
            plan.default_dir.as_deref(),
            plan.pg,
        )
        .await?;
        // Opened with its lock held: this process created the file.
        fresh.storages.extend(new_file);
        match opened {
            Opened::File(s) => storages.push((conf.name.clone(), s)),
            Opened::Pg(s) => storages.push((conf.name.clone(), s)),
            Opened::Proxy(p) => {
                proxies.push(p.clone());
                storages.push((conf.name.clone(), p));
            }
            Opened::Replicated(n, z) => {
                storages.push((conf.name.clone(), n.clone()));
                nodes.push((n, z));
            }
        }
    }
    let server = server::Server::new(plan.server, storages).await?;
    start_replication(&nodes).await?;
    // A proxy serves only once it knows where upstream stands; with a warm cache it
    // starts after a short wait even if upstream is unreachable, serving the cache.
    for p in &proxies {
        let cached = zodb::Storage::last_transaction(&**p) != zodb::Tid::ZERO;
        loop {
            if p.wait_ready(Duration::from_secs(10)).await {
                break;
            }
            match p.link_state() {
                // Upstream answered: wait for the catch-up rather than serve an old state.
                proxy::LinkState::CatchingUp => info!("still catching up with upstream..."),
                _ if cached => {
                    warn!("upstream not reachable yet; serving from the cache meanwhile");
                    break;
                }
                _ => warn!(
                    "waiting for the upstream server (the cache is empty, nothing to serve yet)"
                ),
            }
        }
    }
    let signals = Signals::install()?;
    for (address, socket) in reserved {
        let mut listener = socket
            .listen()
            .with_context(|| format!("listening on {address}"))?;
        if let Some(acceptor) = &acceptor {
            if !address.contains('/') {
                listener = listener.with_tls(acceptor.clone())?;
            }
        }
        server.serve(listener);
        fresh.serving = true;
    }
    if let Some((address, socket)) = metrics {
        let listener = socket
            .listen_tcp()
            .with_context(|| format!("metrics endpoint on {address}"))?;
        info!(%address, "serving metrics at /metrics");
        server.serve_metrics(listener);
    }
    // Written only now that the storages are locked and every address is bound: an
    // instance that fails to start never touches the pid file of one that runs.
    let pid = PidFile::create(plan.pid_file.as_deref())?;
    signals.wait(logfile, &nodes).await;
    info!("shutting down");
    server.shutdown().await;
    drop(pid);
    info!("stopped");
    Ok(())
}

/// The signals a serving process handles. Installed before the first listener accepts,
/// so that a SIGTERM sent as soon as the server is reachable stops it cleanly instead of
/// killing it (before that, the default action ends a start that is still opening).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Waits for SIGTERM or SIGINT; SIGHUP and SIGUSR2 reopen the log file (log rotation);
    /// SIGUSR1 promotes replicas to primaries (`zeors promote`).
    async fn wait(
        mut self,
        logfile: Option<LogFile>,
        nodes: &[(Arc<replication::Node>, config::ZrsConf)],
    ) {
        loop {
            tokio::select! {
                _ = self.term.recv() => { info!("SIGTERM received"); return }
                _ = self.int.recv() => { info!("SIGINT received"); return }
                _ = self.hup.recv() => reopen(&logfile),
                _ = self.usr2.recv() => reopen(&logfile),
                _ = self.usr1.recv() => { info!("SIGUSR1 received: promoting"); promote(nodes).await }
            }
        }
    }
}

fn reopen(logfile: &Option<LogFile>) {
    if let Some(f) = logfile {
        match f.reopen() {
            Ok(()) => info!("log file reopened"),
            Err(e) => eprintln!("zeors: reopening the log file failed: {e}"),
        }
    }
}

/// The pid file: written once the server runs, removed when dropped if it still names
/// this process (never another instance's).
struct PidFile(Option<PathBuf>);

impl PidFile {
    fn create(path: Option<&Path>) -> Result<PidFile> {
        let Some(path) = path else {
            return Ok(PidFile(None));
        };
        // Written beside and renamed into place: a reader never sees a partial file.
        let tmp = path.with_extension(format!("zeors-{}.tmp", std::process::id()));
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing pid file {}", path.display()))?;
        Ok(PidFile(Some(path.to_path_buf())))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let Some(p) = &self.0 else { return };
        match std::fs::read_to_string(p) {
            Ok(text) if text.trim() == std::process::id().to_string() => {
                let _ = std::fs::remove_file(p);
            }
            Ok(_) => {
                warn!(path = %p.display(), "the pid file names another process now; left in place")
            }
            Err(_) => {}
        }
    }
}
