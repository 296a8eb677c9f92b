//! The zeors ZEO server: the tokio glue between sockets and storages.
//!
//! * [`Server`] owns the configured storages, each with its commit lock, its
//!   invalidation [`hub::Hub`] and its statistics, and accepts connections on any number
//!   of listeners.
//! * Each connection is a [`session`]: it performs the handshake, decodes requests,
//!   runs them against its registered storage and queues replies in its [`outbox`].
//!
//! The server knows nothing about file formats: a storage is anything implementing
//! [`zodb::Storage`], whether a FileStorage or a proxy to an upstream server.

pub mod hub;
mod listener;
pub mod metrics;
pub mod outbox;
mod session;
pub mod stats;
pub mod tls;

pub use listener::{remove_stale_socket, Listener, Reserved};

use hub::Hub;
use parking_lot::Mutex;
use stats::Stats;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use zeo_proto::Encoding;
use zodb::Storage;

/// Server-wide settings (the `<zeo>` section of `zeo.conf`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Refuse writable registrations on every storage.
    pub read_only: bool,
    /// Marshalling announced to clients.
    pub encoding: Encoding,
    /// A client holding the commit lock longer than this is disconnected and its
    /// transaction aborted. `None`: no limit (the Python server's default).
    pub transaction_timeout: Option<Duration>,
    /// Transactions remembered per storage for `getInvalidations`.
    pub invalidation_queue_size: usize,
    /// Largest accepted message.
    pub max_message_size: usize,
    /// Bytes queued for one client before it is considered stuck and disconnected.
    pub max_queued_bytes: usize,
    /// Bytes queued for all clients together before the server stops reading from (and
    /// starting the requests of) clients with more than a little output waiting; see
    /// [`outbox::QueueBudget`].
    pub max_queued_total: usize,
    /// Requests one connection may have in progress at once before reading pauses.
    pub max_pipelined: usize,
    /// Connections served at once, over every listener; more are closed when accepted.
    pub max_connections: usize,
    /// Iterators (transaction and record iterators) one connection may have open.
    pub max_iterators: usize,
    /// A connection that sends nothing for this long (ZEO clients send a heartbeat every
    /// 60 s) while none of its requests is in progress is closed. `None`: never.
    pub idle_timeout: Option<Duration>,
    /// The most record data one transaction may carry; its vote fails beyond it.
    pub max_transaction_size: u64,
    /// Record data one transaction keeps in memory; the rest waits for the vote in a
    /// temporary file (see `session::spill`).
    pub spill_threshold: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            read_only: false,
            encoding: Encoding::Pickle,
            transaction_timeout: None,
            invalidation_queue_size: 100,
            max_message_size: zeo_proto::frame::DEFAULT_MAX_FRAME,
            max_queued_bytes: 256 * 1024 * 1024,
            max_queued_total: 256 * 1024 * 1024,
            max_pipelined: 256,
            max_connections: 10_000,
            max_iterators: 100,
            idle_timeout: Some(Duration::from_secs(600)),
            max_transaction_size: 2 << 30,
            spill_threshold: 2 << 20,
        }
    }
}

/// One served storage and the server state that belongs to it.
pub struct StorageHandle {
    pub name: String,
    pub storage: Arc<dyn Storage>,
    pub hub: Arc<Hub>,
    /// Serializes commits from vote to finish/abort. FIFO, so waiting voters are served
    /// in order.
    pub commit_lock: Arc<tokio::sync::Mutex<()>>,
    pub stats: Stats,
}

/// State shared by every session.
pub(crate) struct Shared {
    pub config: ServerConfig,
    pub storages: HashMap<String, Arc<StorageHandle>>,
    pub next_session: AtomicU64,
    pub next_txn: AtomicU64,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: Arc<metrics::ServerMetrics>,
    /// The bound on output queued for all connections together.
    pub budget: Arc<outbox::QueueBudget>,
}

/// A ZEO server over a set of named storages.
pub struct Server {
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Server {
    /// Prepares the storages: seeds each invalidation queue from the storage's recent
    /// transactions and attaches the hub as the storage's invalidation sink.
    pub async fn new(
        config: ServerConfig,
        storages: Vec<(String, Arc<dyn Storage>)>,
    ) -> zodb::Result<Server> {
        let mut map = HashMap::new();
        for (name, storage) in storages {
            let recent = storage
                .recent_transactions(config.invalidation_queue_size)
                .await?;
            let hub = Arc::new(Hub::new(
                storage.last_transaction(),
                recent,
                config.invalidation_queue_size,
            ));
            storage.attach(hub.clone());
            map.insert(
                name.clone(),
                Arc::new(StorageHandle {
                    name,
                    storage: storage.clone(),
                    hub,
                    commit_lock: Arc::new(tokio::sync::Mutex::new(())),
                    stats: Stats {
                        storage: Some(storage.clone()),
                        ..Stats::new()
                    },
                }),
            );
        }
        let (shutdown_tx, shutdown) = watch::channel(false);
        Ok(Server {
            shared: Arc::new(Shared {
                storages: map,
                next_session: AtomicU64::new(1),
                next_txn: AtomicU64::new(1),
                shutdown,
                metrics: Arc::new(metrics::ServerMetrics::default()),
                budget: Arc::new(outbox::QueueBudget::new(config.max_queued_total)),
                config,
            }),
            shutdown_tx,
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Starts accepting connections on `listener` in the background.
    pub fn serve(&self, listener: Listener) {
        let shared = self.shared.clone();
        let handle = tokio::spawn(listener::accept_loop(listener, shared));
        self.tasks.lock().push(handle);
    }

    /// Serves Prometheus metrics on `listener` (`GET /metrics`) in the background.
    pub fn serve_metrics(&self, listener: tokio::net::TcpListener) {
        let handle = tokio::spawn(metrics::serve(listener, self.shared.clone()));
        self.tasks.lock().push(handle);
    }

    /// The metrics text, as the endpoint would serve it.
    pub fn render_metrics(&self) -> String {
        metrics::render(&self.shared)
    }

    pub fn storage(&self, name: &str) -> Option<Arc<StorageHandle>> {
        self.shared.storages.get(name).cloned()
    }

    /// Stops accepting, closes every session (aborting transactions not yet voted or
    /// finished; a `tpc_finish` in progress completes), then closes the storages.
    pub async fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
        for handle in self.shared.storages.values() {
            // Wait for an in-flight commit to finish or abort before closing.
            let _guard = handle.commit_lock.lock().await;
            if let Err(e) = handle.storage.close().await {
                tracing::error!(storage = %handle.name, error = %e, "closing storage failed");
            }
        }
    }
}
