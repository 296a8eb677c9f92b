//! The upstream storage: a [`Storage`] served from a persistent cache and an upstream
//! ZEO server.
//!
//! ## Consistency
//! Everything that changes the proxy's view of upstream — invalidation callbacks, the
//! reply to a forwarded `tpc_finish`, the catch-up after a (re)connect — goes through
//! one `apply` step ([`link`]), in upstream tid order, under one lock. `apply` first hands
//! the transaction to the server's invalidation hub (so downstream clients are told before
//! anything can read the new state), then updates the cache, then publishes the new last
//! tid. Loads read the last tid *before* looking in the cache and report it as their
//! snapshot; the server refuses to send a "current" reply older than an invalidation it
//! already queued for that client, and the load is simply redone.
//!
//! Loads that miss are sent upstream on the one connection that also carries the
//! invalidations, pipelined (any number in flight) ([`fetch`]). ZEO orders a connection's
//! replies and callbacks, and the client reader hands us both in that order, so a reply
//! tells exactly which upstream transactions it reflects (`seen`); the cache refuses to
//! keep as current a revision that a later invalidation already ended.
//!
//! ## Restarts and reconnects
//! The cache records the last upstream tid it has applied. After connecting, the proxy
//! asks upstream what changed since (`getInvalidations`), or, when upstream's queue does
//! not reach that far, walks upstream's transaction log from that tid, and applies it
//! all before serving anything new from upstream ([`catchup`]). Downstream clients stay
//! connected throughout and receive ordinary invalidations. Invalidation callbacks that
//! arrive during the catch-up are held and applied after it, in order.
//!
//! ## Iteration, undo and pack
//! Upstream's iterators are walked for downstream ones, bounded by the proxy's last tid
//! ([`iteration`]); the undo log is upstream's, with Zope's filters applied here
//! ([`undo`]); a pack is forwarded and the cache then checks what it may have removed
//! before serving it ([`pack`]). `get_info` reports the interfaces upstream offers.
//!
//! ## Commits
//! A downstream transaction is forwarded at its vote, on the same connection ([`commit`]).
//! The server holds its commit lock from the first vote to finish or abort, conflict
//! rounds included, so at most one forwarded transaction is open upstream at a time and
//! its conflict rounds keep upstream's lock too.

mod catchup;
mod commit;
mod fetch;
mod iteration;
mod link;
mod pack;
mod undo;
mod warm;

use crate::blobs::{BlobConfig, ProxyBlobs};
use crate::cache::{Cache, CacheConfig};
use crate::store_queue::StoreQueue;
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing::{info, warn};
use zeo_client::Address;
use zeo_proto::reply::History;
use zeo_proto::Request;
use zodb::{
    CurrentRecord, HistoryEntry, InvalidationSink, LoadBefore, Oid, Storage, StorageError,
    StorageInfo, Tid, Transaction, TransactionIterator, TxnKey, UndoEntry, UndoFilter, Vote,
};

use commit::Commits;
use fetch::Fetching;
pub use link::LinkState;
use link::{Link, UpstreamInfo};
use pack::PackState;

/// Settings of proxy mode.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Upstream servers, tried in order (failover).
    pub upstreams: Vec<Address>,
    /// Storage name to register with upstream.
    pub storage: String,
    /// Register read-only upstream (and refuse downstream writes).
    pub read_only: bool,
    pub cache: CacheConfig,
    pub connect_timeout: Duration,
    /// How often the cache is made durable.
    pub flush_interval: Duration,
    /// How many oids to fetch from upstream at a time.
    pub oid_batch: usize,
    /// Blob support (a blob cache, or upstream's shared blob directory); `None`: none.
    pub blobs: Option<BlobConfig>,
    /// After a miss, how many of the objects the fetched record references to fetch
    /// too, before anyone asks (0: none). See [`fetch`].
    pub prefetch: usize,
    /// Told how a catch-up that walks upstream's transaction log advances.
    pub progress: zodb::progress::ProgressHandle,
    /// TLS to upstream (`<ssl>` in `<zeoclient>`); `None`: plain TCP.
    pub tls: Option<zeo_tls::ClientTls>,
    /// Fill the cache from a zeors upstream in the background, once (see [`warm`]).
    pub warm: bool,
    /// Compress the link with zstd when upstream is zeors (negotiated; a stock upstream
    /// sees plain ZEO). Never over TLS: the length of compressed, encrypted traffic that
    /// mixes many clients' data with what one of them chose to store would tell that
    /// client about the others' data (as CRIME did for HTTPS).
    pub compress: bool,
}

impl ProxyConfig {
    pub fn new(upstreams: Vec<Address>, cache: CacheConfig) -> ProxyConfig {
        ProxyConfig {
            upstreams,
            storage: "1".into(),
            read_only: false,
            cache,
            connect_timeout: Duration::from_secs(10),
            flush_interval: Duration::from_secs(1),
            oid_batch: 100,
            blobs: None,
            prefetch: 64,
            progress: Default::default(),
            tls: None,
            warm: false,
            compress: true,
        }
    }
}

/// A storage that proxies an upstream ZEO server through a persistent cache.
pub struct UpstreamStorage {
    inner: Arc<Inner>,
}

/// The proxy's state, by concept: the cache and the order in which upstream transactions
/// reach it (here), the link ([`Link`]), loads in flight ([`Fetching`]) and forwarded
/// commits ([`Commits`]).
struct Inner {
    config: ProxyConfig,
    cache: Arc<Cache>,
    /// Where stores into the cache wait for its one store thread.
    stores: StoreQueue,
    sink: OnceLock<Arc<dyn InvalidationSink>>,
    /// Serializes the application of upstream transactions.
    apply_lock: Mutex<()>,
    last_tid: AtomicU64,
    blobs: Option<ProxyBlobs>,
    link: Link,
    fetching: Fetching,
    commits: Commits,
    packs: PackState,
    warming: warm::Warming,
}

impl UpstreamStorage {
    /// Opens the cache. Nothing is sent upstream until the server attaches its sink.
    pub fn open(config: ProxyConfig) -> Result<UpstreamStorage, StorageError> {
        if config.upstreams.is_empty() {
            return Err(StorageError::Value(
                "proxy mode needs at least one upstream address".into(),
            ));
        }
        let cache = Cache::open(config.cache.clone()).map_err(|e| {
            StorageError::Io(std::io::Error::other(format!(
                "opening the proxy cache: {e}"
            )))
        })?;
        let last = cache.last_tid();
        info!(last_tid = %last, dir = %config.cache.dir.display(), "opened proxy cache");
        let cache = Arc::new(cache);
        let stores = StoreQueue::start(cache.clone()).map_err(StorageError::Io)?;
        let blobs = match &config.blobs {
            Some(b) => Some(ProxyBlobs::open(b).map_err(|e| {
                StorageError::Io(std::io::Error::new(
                    e.kind(),
                    format!("opening the blob directory {}: {e}", b.dir.display()),
                ))
            })?),
            None => None,
        };
        Ok(UpstreamStorage {
            inner: Arc::new(Inner {
                config,
                stores,
                cache,
                sink: OnceLock::new(),
                apply_lock: Mutex::new(()),
                last_tid: AtomicU64::new(last.0),
                blobs,
                link: Link::new(),
                fetching: Fetching::new(),
                commits: Commits {
                    slot: Mutex::new(None),
                    oids: tokio::sync::Mutex::new(VecDeque::new()),
                },
                packs: PackState::default(),
                warming: warm::Warming::default(),
            }),
        })
    }

    /// Waits until upstream is connected and caught up, up to `timeout`. Returns whether
    /// it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.link.state.subscribe();
        let fut = async {
            while *rx.borrow_and_update() != LinkState::Ready {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, fut).await.unwrap_or(false)
    }

    pub fn is_connected(&self) -> bool {
        self.inner.link.conn.read().is_some()
    }

    pub fn link_state(&self) -> LinkState {
        *self.inner.link.state.borrow()
    }

    pub fn cache_stats(&self) -> crate::cache::CacheStats {
        self.inner.cache.stats()
    }
}

impl Inner {
    fn last_tid(&self) -> Tid {
        Tid(self.last_tid.load(Ordering::Acquire))
    }

    /// Applies one upstream transaction (see the module docs for the order of steps).
    /// `whole_set` marks a catch-up summary of many transactions.
    fn apply(&self, tid: Tid, oids: &[Oid], committer: Option<TxnKey>, whole_set: bool) {
        let _guard = self.apply_lock.lock();
        if tid <= self.last_tid() {
            tracing::debug!(%tid, "upstream transaction already applied");
            return;
        }
        if let Some(sink) = self.sink.get() {
            sink.invalidate(tid, oids, committer);
        }
        if whole_set {
            self.cache.invalidate_many(tid, oids);
        } else {
            self.cache.invalidate(tid, oids);
        }
        if let Some(blobs) = &self.blobs {
            blobs.invalidated(oids);
        }
        self.last_tid.store(tid.0, Ordering::Release);
    }
}

/// What the proxy advertises in `get_info`: the interfaces upstream's storage offers (as
/// the stock proxy does, a `ClientStorage` mirroring its server), except blobs when the
/// proxy has no blob directory; undo and record iteration as upstream has them. Before
/// upstream has been reached, what a FileStorage upstream offers.
fn advertised(ui: &UpstreamInfo, blobs_configured: bool) -> (Vec<(String, String)>, bool, bool) {
    let Some(ifaces) = &ui.interfaces else {
        let defaults = [
            "IStorageRestoreable",
            "IStorageIteration",
            "IStorageUndoable",
            "IStorageCurrentRecordIteration",
            "IExternalGC",
            "IStorage",
        ];
        let list = defaults
            .iter()
            .map(|n| ("ZODB.interfaces".to_string(), n.to_string()))
            .collect();
        return (list, true, true);
    };
    let list = ifaces
        .iter()
        .filter(|(m, n)| !(m == "zope.interface" && n == "Interface"))
        .filter(|(_, n)| blobs_configured || !n.starts_with("IBlobStorage"))
        .cloned()
        .collect();
    (list, ui.supports_undo, ui.supports_record_iternext)
}

#[async_trait]
impl Storage for UpstreamStorage {
    fn info(&self) -> StorageInfo {
        let ui = self.inner.link.info.lock().clone();
        let (interfaces, supports_undo, supports_record_iternext) =
            advertised(&ui, self.inner.blobs.is_some());
        StorageInfo {
            length: ui.length,
            size: ui.size,
            name: format!("proxy of {} ({})", self.inner.config.upstreams[0], ui.name),
            supports_undo,
            supports_record_iternext,
            interfaces,
        }
    }

    fn is_read_only(&self) -> bool {
        self.inner.config.read_only
    }

    fn last_transaction(&self) -> Tid {
        self.inner.last_tid()
    }

    fn attach(&self, sink: Arc<dyn InvalidationSink>) {
        if self.inner.sink.set(sink).is_err() {
            warn!("proxy storage attached twice; keeping the first sink");
            return;
        }
        tokio::spawn(self.inner.clone().run_link());
        tokio::spawn(self.inner.clone().run_flusher());
        if self.inner.config.warm {
            tokio::spawn(self.inner.clone().run_warm());
        }
    }

    async fn load_before(&self, oid: Oid, before: Tid) -> zodb::Result<LoadBefore> {
        self.inner.load_before(oid, before).await
    }

    async fn load_serial(&self, oid: Oid, serial: Tid) -> zodb::Result<Bytes> {
        if let Some(data) = self.inner.cache.load_serial(oid, serial) {
            return Ok(data);
        }
        let conn = self.inner.link().await?;
        Ok(conn.load_serial(oid, serial).await?)
    }

    async fn history(&self, oid: Oid, size: usize) -> zodb::Result<Vec<HistoryEntry>> {
        let conn = self.inner.link().await?;
        let h: History = conn
            .request(&Request::History {
                oid: Some(oid),
                size: Some(size),
            })
            .await?;
        Ok(h.0)
    }

    async fn new_oids(&self, count: usize) -> zodb::Result<Vec<Oid>> {
        if self.inner.config.read_only {
            return Err(StorageError::ReadOnly);
        }
        self.inner.new_oids(count).await
    }

    async fn vote(&self, txn: &Transaction) -> zodb::Result<Vote> {
        self.inner.vote(txn).await
    }

    async fn finish(&self, key: TxnKey) -> zodb::Result<Tid> {
        self.inner.finish(key).await
    }

    async fn abort(&self, key: TxnKey) {
        self.inner.abort(key).await
    }

    async fn recent_transactions(&self, count: usize) -> zodb::Result<Vec<(Tid, Vec<Oid>)>> {
        Ok(self.inner.cache.recent_transactions(count))
    }

    async fn invalidations_since(&self, tid: Tid) -> zodb::Result<Option<(Tid, Vec<Oid>)>> {
        Ok(self.inner.cache.invalidations_since(tid))
    }

    async fn undo_log(
        &self,
        first: i64,
        last: i64,
        filter: Option<UndoFilter>,
    ) -> zodb::Result<Vec<UndoEntry>> {
        self.inner.undo_log(first, last, filter).await
    }

    async fn iterator(
        &self,
        start: Option<Tid>,
        stop: Option<Tid>,
    ) -> zodb::Result<Box<dyn TransactionIterator>> {
        Ok(Box::new(self.inner.iterator(start, stop).await?))
    }

    async fn record_iternext(&self, next: Option<Oid>) -> zodb::Result<CurrentRecord> {
        self.inner.record_iternext(next).await
    }

    async fn pack(&self, pack_time: f64) -> zodb::Result<()> {
        self.inner.pack(pack_time).await
    }

    fn blob_temp_dir(&self) -> Option<std::path::PathBuf> {
        self.inner.blobs.as_ref().map(ProxyBlobs::temp_dir)
    }

    fn blob_shared_dir(&self, oid: Oid) -> zodb::Result<std::path::PathBuf> {
        match &self.inner.blobs {
            Some(b) => b.shared_dir(oid),
            None => Err(StorageError::Unsupported("blobs")),
        }
    }

    async fn open_blob(&self, oid: Oid, serial: Tid) -> zodb::Result<std::fs::File> {
        let blobs = self
            .inner
            .blobs
            .as_ref()
            .ok_or(StorageError::Unsupported("blobs"))?;
        if blobs.cache().is_some() && !self.inner.revision_exists(oid, serial).await? {
            // A blob file cached before a pack that removed its revision.
            return Err(StorageError::PosKey(oid));
        }
        blobs.open_blob(oid, serial, self.inner.link().await).await
    }

    fn metrics(&self) -> Vec<zodb::StorageMetric> {
        let inner = &self.inner;
        let cache = inner.cache.stats();
        let m = |name, help, counter, value: u64| zodb::StorageMetric {
            name,
            help,
            counter,
            value: value as f64,
        };
        let f = &inner.fetching;
        vec![
            m(
                "cache_hits",
                "Loads answered from the proxy cache.",
                true,
                f.hits.load(Ordering::Relaxed),
            ),
            m(
                "cache_misses",
                "Loads fetched from upstream.",
                true,
                f.misses.load(Ordering::Relaxed),
            ),
            m(
                "cache_prefetched",
                "Objects fetched from upstream because a fetched record referenced them.",
                true,
                f.prefetched.load(Ordering::Relaxed),
            ),
            m(
                "cache_stores_skipped",
                "Records not written to the proxy cache because its store queue was full.",
                true,
                inner.stores.skipped(),
            ),
            m(
                "cache_evictions",
                "Records evicted from the proxy cache.",
                true,
                cache.evictions,
            ),
            m(
                "cache_bytes",
                "Bytes of the proxy cache on disk.",
                false,
                cache.bytes,
            ),
            m(
                "cache_entries",
                "Records in the proxy cache.",
                false,
                cache.entries,
            ),
            m(
                "cache_max_bytes",
                "The proxy cache's bound on disk (--cache-size): cache_bytes over it is the fill.",
                false,
                inner.config.cache.max_bytes,
            ),
            m(
                "cache_warmed_objects",
                "Objects stored in the proxy cache by the warm-up (--warm), since start.",
                true,
                inner.warming.objects.load(Ordering::Relaxed),
            ),
            m(
                "cache_warmed_bytes",
                "Bytes of records stored in the proxy cache by the warm-up, since start.",
                true,
                inner.warming.bytes.load(Ordering::Relaxed),
            ),
            m(
                "cache_warm_done",
                "1 once the warm-up (--warm) has fetched every object upstream holds.",
                false,
                inner.warming.done.load(Ordering::Relaxed) as u64,
            ),
            m(
                "cache_warm_position",
                "The lowest oid the warm-up has not stored yet.",
                false,
                inner.warming.position.load(Ordering::Relaxed),
            ),
            m(
                "upstream_bytes_received",
                "Bytes received from upstream.",
                true,
                inner.link.traffic.bytes_in.load(Ordering::Relaxed),
            ),
            m(
                "upstream_bytes_sent",
                "Bytes sent to upstream.",
                true,
                inner.link.traffic.bytes_out.load(Ordering::Relaxed),
            ),
            m(
                "upstream_compressed",
                "1 when the upstream link is up and compressed (zstd, negotiated with a zeors upstream).",
                false,
                inner
                    .link
                    .conn
                    .read()
                    .as_ref()
                    .is_some_and(|c| c.is_compressed()) as u64,
            ),
            m(
                "upstream_connected",
                "1 when the upstream link is up and caught up.",
                false,
                inner.link.conn.read().is_some() as u64,
            ),
        ]
        .into_iter()
        .chain(inner.blobs.iter().flat_map(ProxyBlobs::metrics))
        .collect()
    }

    async fn close(&self) -> zodb::Result<()> {
        self.inner.link.shutdown.send_replace(true);
        if let Some(conn) = self.inner.link.conn.write().take() {
            conn.close();
        }
        // Let the stores already queued land first, so that the flush keeps them.
        let drained = self.inner.stores.submit_and_wait(0, |_| {});
        let _ = tokio::time::timeout(Duration::from_secs(10), drained).await;
        let cache = self.inner.cache.clone();
        tokio::task::spawn_blocking(move || cache.flush())
            .await
            .map_err(|e| StorageError::Io(std::io::Error::other(e)))?
            .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(n: &str) -> (String, String) {
        ("ZODB.interfaces".into(), n.into())
    }

    #[test]
    fn the_proxy_advertises_what_upstream_offers() {
        let ui = UpstreamInfo {
            interfaces: Some(vec![
                iface("IBlobStorageRestoreable"),
                iface("IBlobStorage"),
                iface("IStorageUndoable"),
                iface("IStorage"),
                ("zope.interface".into(), "Interface".into()),
            ]),
            supports_undo: true,
            supports_record_iternext: false,
            ..Default::default()
        };
        let (with_blobs, undo, iternext) = advertised(&ui, true);
        assert_eq!(
            with_blobs,
            vec![
                iface("IBlobStorageRestoreable"),
                iface("IBlobStorage"),
                iface("IStorageUndoable"),
                iface("IStorage")
            ]
        );
        assert!(undo && !iternext);
        let (without, _, _) = advertised(&ui, false);
        assert_eq!(without, vec![iface("IStorageUndoable"), iface("IStorage")]);
        let (unknown, undo, iternext) = advertised(&UpstreamInfo::default(), false);
        assert!(unknown.contains(&iface("IStorageIteration")) && undo && iternext);
    }
}
