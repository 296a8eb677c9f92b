//! Connections: the bounded pool, the session settings every connection gets, and how
//! database errors become the errors a ZODB client understands.
//!
//! Invariants:
//! - Every connection has `lock_timeout` = the commit lock timeout (so a writer blocked
//!   on another's object lock fails with a ConflictError instead of waiting forever) and
//!   `idle_in_transaction_session_timeout` set, so a transaction left open by a stuck
//!   client cannot hold locks for long; a zeors process that dies closes its sockets and
//!   PostgreSQL rolls back at once.
//! - Connections go back to the pool only outside a transaction: the commit path either
//!   commits, rolls back, or detaches the connection (which closes it).
//! - Errors that mean "the database went away" become [`StorageError::Disconnected`]
//!   (ZEO's `ClientDisconnected`, a `TransientError` that ZODB's transaction retries);
//!   lock timeouts and deadlocks become conflicts, as RelStorage reports them.

use crate::options::Options;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use zodb::{Oid, StorageError, Tid};

/// Errors opening the storage.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bad PostgreSQL DSN {dsn:?}: {message}")]
    Dsn { dsn: String, message: String },
    #[error("cannot reach PostgreSQL ({target}): {message}")]
    Unreachable { target: String, message: String },
    #[error("PostgreSQL schema: {0}")]
    Schema(#[from] crate::schema::SchemaError),
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("blob directory: {0}")]
    BlobDir(std::io::Error),
}

/// The parsed connection settings, with zeors's session settings added.
pub fn config(opts: &Options) -> Result<tokio_postgres::Config, OpenError> {
    let mut cfg: tokio_postgres::Config = opts.dsn.parse().map_err(|e| OpenError::Dsn {
        dsn: opts.dsn.clone(),
        message: describe(&e),
    })?;
    if cfg.get_application_name().is_none() {
        cfg.application_name("zeors");
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(10));
    }
    let lock_ms = opts.commit_lock_timeout.as_millis().max(1);
    // Bounded, generous: a client between vote and finish is normally milliseconds.
    let idle_ms = (opts.commit_lock_timeout.as_millis() * 4).max(60_000);
    let mut extra = cfg.get_options().unwrap_or("").to_string();
    extra.push_str(&format!(
        " -c lock_timeout={lock_ms} -c idle_in_transaction_session_timeout={idle_ms}"
    ));
    cfg.options(extra.trim());
    Ok(cfg)
}

/// A short description of where the database is, for messages (no password).
pub fn target(cfg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    format!(
        "host={} dbname={}",
        if hosts.is_empty() {
            "default".to_string()
        } else {
            hosts.join(",")
        },
        cfg.get_dbname().unwrap_or("(user's)")
    )
}

pub fn pool(cfg: tokio_postgres::Config, size: usize) -> Pool {
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size.max(2))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(60)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .expect("pool settings are valid")
}

/// True when the error says the connection or the server is gone (retrying on a fresh
/// connection may work).
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            let s = c.code();
            s.starts_with("08") || s.starts_with("57P") || *c == SqlState::ADMIN_SHUTDOWN
        }
        // No SQLSTATE: an I/O or protocol error.
        None => true,
    }
}

/// Maps a database error to what the ZEO client sees.
pub fn storage_error(e: tokio_postgres::Error) -> StorageError {
    if let Some(code) = e.code() {
        if *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
        {
            let read_current = e
                .as_db_error()
                .and_then(|d| d.hint())
                .is_some_and(|h| h.contains("readCurrent"));
            return if read_current {
                StorageError::ReadConflict {
                    oid: Oid(0),
                    committed: Tid::ZERO,
                    read: Tid::ZERO,
                }
            } else {
                StorageError::Conflict {
                    oid: Oid(0),
                    committed: Tid::ZERO,
                    read: Tid::ZERO,
                    class_name: None,
                }
            };
        }
    }
    if is_connection_error(&e) {
        return StorageError::Disconnected(format!("PostgreSQL: {e}"));
    }
    StorageError::Transaction(format!("PostgreSQL: {}", describe(&e)))
}

pub fn pool_error(e: deadpool_postgres::PoolError) -> StorageError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => storage_error(e),
        other => StorageError::Disconnected(format!("PostgreSQL connection pool: {other}")),
    }
}

/// The error with the server's message when there is one.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                source = cause.source();
            }
            s
        }
    }
}

/// A pooled connection that may be inside a database transaction. It goes back to the
/// pool only through [`TxnConn::release`] (after a ROLLBACK) or [`TxnConn::done`] (after
/// a COMMIT); dropped any other way — an error path, or the future that held it
/// cancelled in the middle of a statement — it is closed instead, and PostgreSQL rolls
/// back and releases its locks. No connection reaches the pool inside a transaction or
/// holding a lock.
pub(crate) struct TxnConn(Option<deadpool_postgres::Object>);

impl TxnConn {
    pub fn new(conn: deadpool_postgres::Object) -> TxnConn {
        TxnConn(Some(conn))
    }

    /// Rolls back and returns the connection to the pool (closes it if that fails).
    pub async fn release(mut self) {
        let ok = self
            .0
            .as_ref()
            .expect("present until consumed")
            .batch_execute("ROLLBACK")
            .await
            .is_ok();
        if ok {
            drop(self.0.take());
        }
    }

    /// Returns the connection to the pool: only after its transaction ended.
    pub fn done(mut self) {
        drop(self.0.take());
    }
}

impl std::ops::Deref for TxnConn {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("present until consumed")
    }
}

impl Drop for TxnConn {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(deadpool_postgres::Object::take(conn));
        }
    }
}
