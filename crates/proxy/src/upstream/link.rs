//! The upstream link: connecting (with failover and backoff), catching up, holding
//! invalidation callbacks until the catch-up is done, and the steady flush of the cache.

use super::Inner;
use crate::blobcache::BlobCache;
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{error, info, warn};
use zeo_client::{connect_any, Backoff, Callbacks, ClientError, ConnectOptions, Connection};
use zeo_proto::reply::{Info, SizeInfo};
use zodb::{Oid, StorageError, Tid};

/// How long a request waits for a reconnected upstream link to finish catching up.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// The upstream link, as the server start-up and monitoring see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected.
    Down,
    /// Connected, applying what changed since the cache's tid.
    CatchingUp,
    /// Connected and caught up: serving.
    Ready,
}

/// What upstream said of itself at the last `get_info` (and `info` callbacks since).
#[derive(Default, Clone)]
pub(super) struct UpstreamInfo {
    pub length: u64,
    pub size: u64,
    pub name: String,
    /// Upstream's storage has blobs (`IBlobStorage` in its `get_info`).
    pub blobs: bool,
    /// The interfaces upstream's `get_info` listed; `None` before it was reached.
    pub interfaces: Option<Vec<(String, String)>>,
    pub supports_undo: bool,
    pub supports_record_iternext: bool,
}

/// The link's state.
pub(super) struct Link {
    /// The caught-up upstream connection, if any.
    pub conn: RwLock<Option<Connection>>,
    /// Where the upstream link stands (see [`LinkState`]).
    pub state: watch::Sender<LinkState>,
    pub info: Mutex<UpstreamInfo>,
    /// Upstream is zeors and can list changed oids since any tid.
    pub lists_changes: AtomicBool,
    /// Upstream is zeors and sends current records in bulk (the warm-up uses them).
    pub bulk_reads: AtomicBool,
    /// Bytes over the upstream link, across reconnects.
    pub traffic: Arc<zeo_client::Traffic>,
    pub shutdown: watch::Sender<bool>,
}

impl Link {
    pub fn new() -> Link {
        Link {
            conn: RwLock::new(None),
            state: watch::channel(LinkState::Down).0,
            info: Mutex::new(UpstreamInfo::default()),
            lists_changes: AtomicBool::new(false),
            bulk_reads: AtomicBool::new(false),
            traffic: Arc::new(zeo_client::Traffic::default()),
            shutdown: watch::channel(false).0,
        }
    }
}

/// Holds invalidation callbacks while a new connection catches up.
#[derive(Default)]
pub(super) struct Gate {
    pub open: bool,
    pub held: Vec<(Tid, Vec<Oid>)>,
}

impl Inner {
    /// The upstream connection. While a reconnected link is catching up, requests wait
    /// for it (a catch-up takes a few round trips) instead of failing; when upstream is
    /// down they fail at once, as a disconnected ZEO client's calls do.
    pub(super) async fn link(&self) -> Result<Connection, StorageError> {
        if let Some(conn) = self.link.conn.read().clone() {
            return Ok(conn);
        }
        let mut rx = self.link.state.subscribe();
        let wait = async {
            loop {
                match *rx.borrow_and_update() {
                    LinkState::Ready | LinkState::Down => return,
                    LinkState::CatchingUp => {}
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(CATCH_UP_WAIT, wait).await;
        self.link.conn.read().clone().ok_or_else(|| {
            StorageError::Disconnected("the upstream server is not connected".into())
        })
    }

    pub(super) fn update_info(&self, info: &Info) {
        let mut ui = self.link.info.lock();
        ui.length = info.length;
        ui.size = info.size;
        ui.name = info.name.clone();
        ui.blobs = crate::blobs::advertises_blobs(info);
        ui.interfaces = Some(info.interfaces.clone());
        ui.supports_undo = info.supports_undo;
        ui.supports_record_iternext = info.supports_record_iternext;
        if self.blobs.is_some() && !ui.blobs {
            warn!("a blob directory is configured but the upstream storage has no blobs: blobs are refused");
        }
        let lists = info.extensions.iter().any(|e| e == "changed_since");
        self.link.lists_changes.store(lists, Ordering::Relaxed);
        let bulk = info.extensions.iter().any(|e| e == "current_records");
        self.link.bulk_reads.store(bulk, Ordering::Relaxed);
    }

    fn update_size(&self, info: SizeInfo) {
        let mut ui = self.link.info.lock();
        ui.length = info.length;
        ui.size = info.size;
    }

    /// Connects, catches up and keeps the link, reconnecting with backoff, until shutdown.
    pub(super) async fn run_link(self: Arc<Self>) {
        let mut shutdown = self.link.shutdown.subscribe();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let opts = ConnectOptions {
            storage: self.config.storage.clone(),
            read_only: self.config.read_only,
            connect_timeout: self.config.connect_timeout,
            traffic: Some(self.link.traffic.clone()),
            tls: self.config.tls.clone(),
            compress: self.config.compress && self.config.tls.is_none(),
            ..Default::default()
        };
        let mut failures = 0u32;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let gate = Arc::new(Mutex::new(Gate::default()));
            let weak = Arc::downgrade(&self);
            let make = || -> Arc<dyn Callbacks> {
                Arc::new(LinkCallbacks {
                    inner: weak.clone(),
                    gate: gate.clone(),
                })
            };
            match connect_any(&self.config.upstreams, &opts, make).await {
                Ok(conn) => match self.caught_up(&conn, &gate).await {
                    Ok(()) => {
                        backoff.reset();
                        failures = 0;
                        info!(upstream = %conn.address(), last_tid = %self.last_tid(), compressed = conn.is_compressed(),
                              "upstream connected and caught up");
                        *self.link.conn.write() = Some(conn.clone());
                        self.link.state.send_replace(LinkState::Ready);
                        tokio::select! {
                            _ = conn.closed() => warn!(upstream = %conn.address(), "upstream connection lost; reconnecting"),
                            _ = shutdown.changed() => {}
                        }
                        *self.link.conn.write() = None;
                        self.link.state.send_replace(LinkState::Down);
                        conn.close();
                    }
                    Err(e) => {
                        warn!(upstream = %conn.address(), error = %e, "catching up with upstream failed");
                        self.link.state.send_replace(LinkState::Down);
                        conn.close();
                    }
                },
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        warn!(error = %e, attempts = failures, "cannot reach any upstream server");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.changed() => break,
            }
        }
    }

    /// Catches up over a new connection, telling the world it is doing so.
    async fn caught_up(
        self: &Arc<Self>,
        conn: &Connection,
        gate: &Arc<Mutex<Gate>>,
    ) -> Result<(), ClientError> {
        self.link.state.send_replace(LinkState::CatchingUp);
        // Nothing of ours is waiting for an `info` callback on a new connection.
        self.packs.reset_infos();
        self.catch_up(conn, gate).await
    }

    /// Makes the cache durable at a steady pace.
    pub(super) async fn run_flusher(self: Arc<Self>) {
        let mut shutdown = self.link.shutdown.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.flush_interval) => {}
                _ = shutdown.changed() => break,
            }
            let cache = self.cache.clone();
            match tokio::task::spawn_blocking(move || cache.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "flushing the proxy cache failed"),
                Err(e) => error!(error = %e, "cache flush task failed"),
            }
        }
    }
}

/// Callbacks of one upstream connection.
struct LinkCallbacks {
    inner: Weak<Inner>,
    gate: Arc<Mutex<Gate>>,
}

#[async_trait]
impl Callbacks for LinkCallbacks {
    async fn invalidate_transaction(&self, tid: Tid, oids: Vec<Oid>) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut gate = self.gate.lock();
        if !gate.open {
            gate.held.push((tid, oids));
            return;
        }
        inner.apply(tid, &oids, None, false);
    }

    async fn info(&self, info: SizeInfo) {
        if let Some(inner) = self.inner.upgrade() {
            inner.update_size(info);
            if self.gate.lock().open {
                inner.size_info_received();
            }
        }
    }

    // Blob downloads (`sendBlob`) go to the blob cache.
    async fn receive_blob_start(&self, oid: Oid, serial: Tid) {
        if let Some(c) = self.blob_cache() {
            c.receive_start(oid, serial).await;
        }
    }

    async fn receive_blob_chunk(&self, oid: Oid, serial: Tid, chunk: Bytes) {
        if let Some(c) = self.blob_cache() {
            c.receive_chunk(oid, serial, chunk).await;
        }
    }

    async fn receive_blob_stop(&self, oid: Oid, serial: Tid) {
        if let Some(c) = self.blob_cache() {
            c.receive_stop(oid, serial).await;
        }
    }
}

impl LinkCallbacks {
    fn blob_cache(&self) -> Option<Arc<BlobCache>> {
        self.inner.upgrade()?.blobs.as_ref()?.cache().cloned()
    }
}
