//! What a PostgreSQL storage is opened with (from `--postgresql` flags or a
//! `<relstorage>` section).

use crate::schema::Layout;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Options {
    /// libpq-style connection string (`host=/run/postgresql dbname=zodb user=zodb`) or
    /// a `postgresql://` URL.
    pub dsn: String,
    /// History-preserving (`keep-history true`, RelStorage's default) or history-free.
    pub layout: Layout,
    /// Create the schema when it is missing (RelStorage's `create-schema`, default on).
    pub create_schema: bool,
    pub read_only: bool,
    /// Database connections this server keeps at most (loads, commits, polls).
    pub pool_size: usize,
    /// How long a commit waits for an object lock held by another writer before failing
    /// with a ConflictError (RelStorage's `commit-lock-timeout`, default 30 s).
    pub commit_lock_timeout: Duration,
    /// How often the transaction table is polled for commits made by RelStorage clients
    /// (commits by other zeors servers also arrive by NOTIFY at once).
    pub poll_interval: Duration,
    /// Bytes of recent object states kept in memory.
    pub cache_bytes: usize,
    /// Where blobs are staged and cached on this machine (RelStorage's `blob-dir`);
    /// without it, blobs are refused.
    pub blob_dir: Option<PathBuf>,
    /// Bound of the downloaded blobs kept in `blob_dir` (`blob-cache-size`); `None`:
    /// unbounded, as RelStorage's default.
    pub blob_cache_bytes: Option<u64>,
    /// The storage's name as `get_info` reports it.
    pub name: String,
}

impl Options {
    pub fn new(dsn: impl Into<String>) -> Options {
        Options {
            dsn: dsn.into(),
            layout: Layout::HistoryPreserving,
            create_schema: true,
            read_only: false,
            pool_size: 8,
            commit_lock_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            cache_bytes: 64 << 20,
            blob_dir: None,
            blob_cache_bytes: None,
            name: String::new(),
        }
    }
}
