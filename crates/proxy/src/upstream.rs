//! The upstream storage: a [`Storage`] served from a persistent cache and an upstream
//! ZEO server.
//!
//! ## Consistency
//! Everything that changes the proxy's view of upstream — invalidation callbacks, the
//! reply to a forwarded `tpc_finish`, the catch-up after a (re)connect — goes through
//! one `apply` step, in upstream tid order, under one lock. `apply` first hands the
//! transaction to the server's invalidation hub (so downstream clients are told before
//! anything can read the new state), then updates the cache, then publishes the new last
//! tid. Loads read the last tid *before* looking in the cache and report it as their
//! snapshot; the server refuses to send a "current" reply older than an invalidation it
//! already queued for that client, and the load is simply redone.
//!
//! Loads that miss are sent upstream on the one connection that also carries the
//! invalidations, pipelined (any number in flight). ZEO orders a connection's replies and
//! callbacks, and the client reader hands us both in that order, so a reply tells exactly
//! which upstream transactions it reflects (`seen`); the cache refuses to keep as
//! current a revision that a later invalidation already ended.
//!
//! ## Restarts and reconnects
//! The cache records the last upstream tid it has applied. After connecting, the proxy
//! asks upstream what changed since (`getInvalidations`), or, when upstream's queue does
//! not reach that far, walks upstream's transaction log from that tid, and applies it
//! all before serving anything new from upstream. Downstream clients stay connected
//! throughout and receive ordinary invalidations. Invalidation callbacks that arrive
//! during the catch-up are held and applied after it, in order.

use crate::blobcache::BlobCache;
use crate::blobs::{BlobConfig, ProxyBlobs};
use crate::cache::{Cache, CacheConfig};
use crate::store_queue::StoreQueue;
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};
use zeo_client::{
    connect_any, Address, Backoff, Callbacks, ClientError, ConnectOptions, Connection,
};
use zeo_proto::Value;
use zodb::{
    Conflict, HistoryEntry, InvalidationSink, LoadBefore, Loaded, Oid, Storage, StorageError,
    StorageInfo, Tid, Transaction, TxnKey, TxnOp, Vote,
};

/// How long a request waits for a reconnected upstream link to finish catching up.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

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
    /// too, before anyone asks (0: none). See [`Inner::prefetch_references`].
    pub prefetch: usize,
}

/// Prefetches in flight at most, across all misses: a bound on the link share and on the
/// requests queued ahead of real misses.
const PREFETCH_IN_FLIGHT: usize = 128;

/// Prefetched oids remembered until asked for; past this many (prefetches that were not
/// needed), the memory is cleared.
const UNCLAIMED_MAX: usize = 100_000;

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
        }
    }
}

/// A storage that proxies an upstream ZEO server through a persistent cache.
pub struct UpstreamStorage {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProxyConfig,
    cache: Arc<Cache>,
    /// Where stores into the cache wait for its one store thread.
    stores: StoreQueue,
    sink: OnceLock<Arc<dyn InvalidationSink>>,
    /// Serializes the application of upstream transactions.
    apply_lock: Mutex<()>,
    last_tid: AtomicU64,
    /// The caught-up upstream connection, if any.
    link: RwLock<Option<Connection>>,
    /// Where the upstream link stands (see [`LinkState`]).
    state: watch::Sender<LinkState>,
    upstream_info: Mutex<UpstreamInfo>,
    /// Upstream is zeors and can list changed oids since any tid.
    upstream_lists_changes: AtomicBool,
    oids: tokio::sync::Mutex<VecDeque<Oid>>,
    commit: Mutex<Option<Forwarded>>,
    /// Upstream loads in flight, with the requests waiting for each.
    inflight: Mutex<HashMap<(Oid, Tid), Vec<FetchWaiter>>>,
    /// Prefetches in flight by oid; a miss on one of them waits for it (the receiver
    /// sees `true` once the object is in the cache, or the sender dropped).
    prefetching: Mutex<HashMap<Oid, watch::Receiver<bool>>>,
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    /// Oids prefetched and not asked for yet. When one is asked for, the traversal that
    /// prefetch bet on is real, and its references are prefetched in turn: one level at a
    /// time, driven by what clients load, never a walk of the whole database.
    unclaimed: Mutex<HashSet<Oid>>,
    any_unclaimed: AtomicBool,
    /// Objects prefetched, and loads that found theirs being prefetched or prefetched.
    prefetched: AtomicU64,
    /// Bytes over the upstream link, across reconnects.
    traffic: Arc<zeo_client::Traffic>,
    /// Loads answered from the cache / fetched upstream.
    hits: AtomicU64,
    misses: AtomicU64,
    shutdown: watch::Sender<bool>,
    blobs: Option<ProxyBlobs>,
}

#[derive(Default, Clone)]
struct UpstreamInfo {
    length: u64,
    size: u64,
    name: String,
    supports_undo: bool,
    /// Upstream's storage has blobs (`IBlobStorage` in its `get_info`).
    blobs: bool,
}

type FetchWaiter = tokio::sync::oneshot::Sender<Result<Fetched, StorageError>>;

/// A downstream transaction forwarded upstream (between vote and finish/abort).
struct Forwarded {
    key: TxnKey,
    conn: Connection,
    /// Operations already sent upstream (re-votes after conflicts send only the new ones).
    sent: usize,
    /// Oids stored, in order, with their data (for the invalidation and the cache).
    stored: Vec<(Oid, Option<Bytes>)>,
    /// Oids whose committed data differs from what was sent (resolved upstream, undone).
    changed: Vec<Oid>,
    /// The blob files sent, to keep in the blob cache once committed.
    blobs: Vec<(Oid, std::path::PathBuf)>,
}

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

/// Holds invalidation callbacks while a new connection catches up.
#[derive(Default)]
struct Gate {
    open: bool,
    held: Vec<(Tid, Vec<Oid>)>,
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
        let (state, _) = watch::channel(LinkState::Down);
        let (shutdown, _) = watch::channel(false);
        Ok(UpstreamStorage {
            inner: Arc::new(Inner {
                config,
                stores,
                cache,
                sink: OnceLock::new(),
                apply_lock: Mutex::new(()),
                last_tid: AtomicU64::new(last.0),
                link: RwLock::new(None),
                state,
                upstream_info: Mutex::new(UpstreamInfo::default()),
                upstream_lists_changes: AtomicBool::new(false),
                oids: tokio::sync::Mutex::new(VecDeque::new()),
                commit: Mutex::new(None),
                inflight: Mutex::new(HashMap::new()),
                prefetching: Mutex::new(HashMap::new()),
                prefetch_slots: Arc::new(tokio::sync::Semaphore::new(PREFETCH_IN_FLIGHT)),
                unclaimed: Mutex::new(HashSet::new()),
                any_unclaimed: AtomicBool::new(false),
                prefetched: AtomicU64::new(0),
                traffic: Arc::new(zeo_client::Traffic::default()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                shutdown,
                blobs,
            }),
        })
    }

    /// Waits until upstream is connected and caught up, up to `timeout`. Returns whether
    /// it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.state.subscribe();
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
        self.inner.link.read().is_some()
    }

    pub fn link_state(&self) -> LinkState {
        *self.inner.state.borrow()
    }

    pub fn cache_stats(&self) -> crate::cache::CacheStats {
        self.inner.cache.stats()
    }
}

impl Inner {
    fn last_tid(&self) -> Tid {
        Tid(self.last_tid.load(Ordering::Acquire))
    }

    /// The upstream connection. While a reconnected link is catching up, requests wait
    /// for it (a catch-up takes a few round trips) instead of failing; when upstream is
    /// down they fail at once, as a disconnected ZEO client's calls do.
    async fn link(&self) -> Result<Connection, StorageError> {
        if let Some(conn) = self.link.read().clone() {
            return Ok(conn);
        }
        let mut rx = self.state.subscribe();
        let wait = async {
            loop {
                match *rx.borrow_and_update() {
                    LinkState::Ready => return,
                    LinkState::Down => return,
                    LinkState::CatchingUp => {}
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(CATCH_UP_WAIT, wait).await;
        self.link.read().clone().ok_or_else(|| {
            StorageError::Disconnected("the upstream server is not connected".into())
        })
    }

    /// Applies one upstream transaction (see the module docs for the order of steps).
    /// `whole_set` marks a catch-up summary of many transactions.
    fn apply(&self, tid: Tid, oids: &[Oid], committer: Option<TxnKey>, whole_set: bool) {
        let _guard = self.apply_lock.lock();
        if tid <= self.last_tid() {
            debug!(%tid, "upstream transaction already applied");
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

    /// Brings the cache up to date with upstream over a fresh connection.
    async fn catch_up(
        self: &Arc<Self>,
        conn: &Connection,
        gate: &Arc<Mutex<Gate>>,
    ) -> Result<(), ClientError> {
        let info = conn.get_info().await?;
        self.update_info(&info, true);
        let upstream_tid = conn.registered_tid;
        let ours = self.last_tid();
        if ours > upstream_tid {
            error!(cache = %ours, upstream = %upstream_tid,
                   "upstream is behind the proxy cache (restored from an older backup?); refusing it");
            return Err(ClientError::Disconnected);
        }
        if ours == Tid::ZERO {
            // Nothing cached: just adopt upstream's position.
            self.apply(upstream_tid, &[], None, true);
        } else if ours < upstream_tid {
            self.replay_since(conn, ours, upstream_tid).await?;
        }
        // Now apply what arrived meanwhile, and let callbacks through directly.
        let mut g = gate.lock();
        for (tid, oids) in std::mem::take(&mut g.held) {
            self.apply(tid, &oids, None, false);
        }
        g.open = true;
        Ok(())
    }

    /// Applies every upstream transaction after `since`.
    async fn replay_since(
        self: &Arc<Self>,
        conn: &Connection,
        since: Tid,
        upstream_tid: Tid,
    ) -> Result<(), ClientError> {
        if let Some((tid, oids)) = conn.get_invalidations(since).await? {
            info!(since = %since, to = %tid, oids = oids.len(), "caught up from upstream's invalidation queue");
            self.apply(tid, &oids, None, true);
            return Ok(());
        }
        if self.upstream_lists_changes.load(Ordering::Relaxed) {
            let v = conn
                .call("zeors_changed_since", vec![Value::from(since)])
                .await?;
            if let Some((tid, oids)) = parse_tid_oids(&v) {
                info!(since = %since, to = %tid, oids = oids.len(), "caught up with upstream's change list");
                self.apply(tid, &oids, None, true);
                return Ok(());
            }
        }
        let walked = if self.upstream_lists_changes.load(Ordering::Relaxed) {
            // A zeors upstream runs iterator calls concurrently, so walk it one call at
            // a time (only reached when its change list is not enough).
            self.replay_by_iteration(conn, since).await
        } else {
            match self.replay_by_iteration_pipelined(conn, since).await {
                Err(ClientError::Remote(e)) => {
                    warn!(error = ?e, "pipelined walk of upstream's log refused; walking it call by call");
                    self.replay_by_iteration(conn, self.last_tid()).await
                }
                other => other,
            }
        };
        match walked {
            Ok(n) => {
                info!(since = %since, transactions = n, "caught up by walking upstream's transaction log");
                if self.last_tid() < upstream_tid {
                    self.apply(upstream_tid, &[], None, true);
                }
                Ok(())
            }
            Err(ClientError::Remote(e)) => {
                warn!(error = ?e, "upstream cannot list what changed; dropping every current cache entry");
                let _guard = self.apply_lock.lock();
                self.cache.drop_current(upstream_tid);
                if let Some(sink) = self.sink.get() {
                    // Downstream clients cannot be told which objects changed either:
                    // they must reconnect and drop their caches.
                    sink.reset(upstream_tid);
                }
                self.last_tid.store(upstream_tid.0, Ordering::Release);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Walks upstream's transactions after `since` with the iterator calls and applies
    /// each. Only oids are kept; the records' data is dropped (upstream sends it anyway).
    async fn replay_by_iteration(
        self: &Arc<Self>,
        conn: &Connection,
        since: Tid,
    ) -> Result<usize, ClientError> {
        let start = Tid(since.0 + 1);
        let iid = conn
            .call("iterator_start", vec![Value::from(start), Value::None])
            .await?;
        let mut count = 0;
        loop {
            let txn = conn.call("iterator_next", vec![iid.clone()]).await?;
            let Some(tid) = txn
                .as_seq()
                .and_then(|s| s.first())
                .and_then(|t| t.as_bytes())
                .and_then(|b| Tid::from_slice(b))
            else {
                break;
            };
            let riid = conn
                .call("iterator_record_start", vec![iid.clone(), Value::from(tid)])
                .await?;
            let mut oids = Vec::new();
            loop {
                let rec = conn
                    .call("iterator_record_next", vec![riid.clone()])
                    .await?;
                match rec
                    .as_seq()
                    .and_then(|s| s.first())
                    .and_then(|o| o.as_bytes())
                    .and_then(|b| Oid::from_slice(b))
                {
                    Some(oid) => oids.push(oid),
                    None => break,
                }
            }
            self.apply(tid, &oids, None, false);
            count += 1;
        }
        let _ = conn.send_oneway("iterator_gc", vec![Value::List(vec![iid])]);
        Ok(count)
    }

    /// Walks upstream's transactions after `since` with the iterator calls of a stock
    /// server, pipelined so that a long gap costs a few round trips per hundred
    /// transactions instead of several per transaction (over a 20 ms link, 1,000
    /// transactions one call at a time take a minute). The stock server handles a
    /// connection's requests in order, which the pipelining relies on:
    ///
    /// 1. list the tids with a window of `iterator_next` calls on one iterator;
    /// 2. per batch of transactions, open one iterator bounded to each (`start = stop =
    ///    tid`), position it and open its record iterator in one burst, then drain the
    ///    record iterators with bursts of `iterator_record_next`.
    ///
    /// The records' data comes along anyway; each object's latest revision is kept in
    /// the cache as current, so the objects that changed do not have to be fetched again.
    async fn replay_by_iteration_pipelined(
        self: &Arc<Self>,
        conn: &Connection,
        since: Tid,
    ) -> Result<usize, ClientError> {
        use futures::future::join_all;
        const WINDOW: usize = 100;
        let tid_at = |v: &Value, i: usize| {
            v.as_seq()
                .and_then(|s| s.get(i))
                .and_then(Value::as_bytes)
                .and_then(|b| Tid::from_slice(b))
        };
        let start = Tid(since.0 + 1);
        let iid = conn
            .call("iterator_start", vec![Value::from(start), Value::None])
            .await?;
        let mut tids = Vec::new();
        'list: loop {
            let replies =
                join_all((0..WINDOW).map(|_| conn.call("iterator_next", vec![iid.clone()]))).await;
            for r in replies {
                match r {
                    Ok(v) => match tid_at(&v, 0) {
                        Some(t) => tids.push(t),
                        None => break 'list,
                    },
                    // Calls after the end find the iterator gone.
                    Err(ClientError::Remote(_)) => break 'list,
                    Err(e) => return Err(e),
                }
            }
        }
        let mut latest: HashMap<Oid, (Tid, Bytes)> = HashMap::new();
        for chunk in tids.chunks(WINDOW) {
            let iids: Vec<Value> = join_all(
                chunk
                    .iter()
                    .map(|t| conn.call("iterator_start", vec![Value::from(*t), Value::from(*t)])),
            )
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
            let mut calls = Vec::with_capacity(2 * chunk.len());
            for (t, iid) in chunk.iter().zip(&iids) {
                calls.push(conn.call("iterator_next", vec![iid.clone()]));
                calls.push(conn.call("iterator_record_start", vec![iid.clone(), Value::from(*t)]));
            }
            let replies = join_all(calls).await;
            let mut riids: Vec<Option<Value>> = Vec::with_capacity(chunk.len());
            for pair in replies.chunks(2) {
                match &pair[1] {
                    Ok(riid) => riids.push(Some(riid.clone())),
                    Err(ClientError::Remote(e)) => {
                        return Err(ClientError::Remote(e.clone()));
                    }
                    Err(_) => return Err(ClientError::Disconnected),
                }
            }
            let mut oids: Vec<Vec<Oid>> = vec![Vec::new(); chunk.len()];
            // Most transactions touch a few objects: ask for a few records first and
            // more for the transactions that have more, since every call past a record
            // iterator's end costs an error reply.
            let mut burst = 2;
            loop {
                let open: Vec<(usize, Value)> = riids
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.clone().map(|r| (i, r)))
                    .collect();
                if open.is_empty() {
                    break;
                }
                let calls = open.iter().flat_map(|(_, riid)| {
                    (0..burst).map(move |_| conn.call("iterator_record_next", vec![riid.clone()]))
                });
                let replies = join_all(calls).await;
                let per = burst;
                burst = (burst * 4).min(256);
                for ((i, _), batch) in open.iter().zip(replies.chunks(per)) {
                    for r in batch {
                        let rec = match r {
                            Ok(v) => v,
                            Err(ClientError::Remote(_)) => {
                                riids[*i] = None;
                                break;
                            }
                            Err(_) => return Err(ClientError::Disconnected),
                        };
                        let Some(s) = rec.as_seq() else {
                            riids[*i] = None;
                            break;
                        };
                        let Some(oid) = s
                            .first()
                            .and_then(Value::as_bytes)
                            .and_then(|b| Oid::from_slice(b))
                        else {
                            riids[*i] = None;
                            break;
                        };
                        oids[*i].push(oid);
                        match s.get(2) {
                            Some(Value::Bytes(data)) => {
                                latest.insert(oid, (chunk[*i], data.clone()));
                            }
                            _ => {
                                latest.remove(&oid);
                            }
                        }
                    }
                }
            }
            for (t, o) in chunk.iter().zip(&oids) {
                self.apply(*t, o, None, false);
            }
            let mut gc = iids;
            let _ = conn.send_oneway("iterator_gc", vec![Value::List(std::mem::take(&mut gc))]);
        }
        let _ = conn.send_oneway("iterator_gc", vec![Value::List(vec![iid])]);
        let seen = self.last_tid();
        let bytes = latest.values().map(|(_, d)| d.len()).sum();
        self.stores.submit(bytes, move |cache| {
            for (oid, (start, data)) in latest {
                cache.store(oid, start, None, data, seen);
            }
        });
        Ok(tids.len())
    }

    fn update_info(&self, info: &Value, full: bool) {
        let mut ui = self.upstream_info.lock();
        if let Some(n) = info.get("length").and_then(Value::as_int) {
            ui.length = n.max(0) as u64;
        }
        if let Some(n) = info.get("size").and_then(Value::as_int) {
            ui.size = n.max(0) as u64;
        }
        if full {
            if let Some(name) = info.get("name").and_then(Value::as_str) {
                ui.name = name.to_string();
            }
            ui.supports_undo = info.get("supportsUndo").map(Value::truthy).unwrap_or(false);
            ui.blobs = crate::blobs::advertises_blobs(info);
            if self.blobs.is_some() && !ui.blobs {
                warn!("a blob directory is configured but the upstream storage has no blobs: blobs are refused");
            }
            let lists = info
                .get("zeors_extensions")
                .and_then(Value::as_seq)
                .map(|s| s.iter().any(|v| v.as_str() == Some("changed_since")))
                .unwrap_or(false);
            self.upstream_lists_changes.store(lists, Ordering::Relaxed);
        }
    }

    /// Connects, catches up and keeps the link, reconnecting with backoff, until shutdown.
    async fn run_link(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let opts = ConnectOptions {
            storage: self.config.storage.clone(),
            read_only: self.config.read_only,
            connect_timeout: self.config.connect_timeout,
            traffic: Some(self.traffic.clone()),
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
                        info!(upstream = %conn.address(), last_tid = %self.last_tid(), "upstream connected and caught up");
                        *self.link.write() = Some(conn.clone());
                        self.state.send_replace(LinkState::Ready);
                        tokio::select! {
                            _ = conn.closed() => warn!(upstream = %conn.address(), "upstream connection lost; reconnecting"),
                            _ = shutdown.changed() => {}
                        }
                        *self.link.write() = None;
                        self.state.send_replace(LinkState::Down);
                        conn.close();
                    }
                    Err(e) => {
                        warn!(upstream = %conn.address(), error = %e, "catching up with upstream failed");
                        self.state.send_replace(LinkState::Down);
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
        self.state.send_replace(LinkState::CatchingUp);
        self.catch_up(conn, gate).await
    }

    /// Makes the cache durable at a steady pace.
    async fn run_flusher(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
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

/// What upstream answered to `loadBefore`: the revision, and the tid it reflects.
type Fetched = (Option<(Bytes, Tid, Option<Tid>)>, Tid);

/// The error a waiter of a shared fetch gets (errors are not `Clone`).
fn share_error(e: &StorageError) -> StorageError {
    match e {
        StorageError::PosKey(oid) => StorageError::PosKey(*oid),
        StorageError::Disconnected(m) => StorageError::Disconnected(m.clone()),
        other => StorageError::Remote {
            class_path: "ZODB.POSException.StorageError".into(),
            message: other.to_string(),
        },
    }
}

impl Inner {
    /// `loadBefore` upstream, shared: concurrent misses of the same revision (several
    /// front-ends warming up on the same pages) cross the slow link once. The request
    /// runs in its own task so that a client disconnecting mid-way cannot strand the
    /// others waiting for it.
    async fn fetch(self: &Arc<Self>, oid: Oid, before: Tid) -> Result<Fetched, StorageError> {
        let key = (oid, before);
        let waiter = {
            let mut inflight = self.inflight.lock();
            match inflight.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    inflight.insert(key, Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiter {
            return rx.await.unwrap_or_else(|_| {
                Err(StorageError::Disconnected(
                    "upstream fetch abandoned".into(),
                ))
            });
        }
        let inner = self.clone();
        let task = tokio::spawn(async move {
            let result = match inner.link().await {
                Ok(conn) => {
                    // Every transaction applied before the request is sent is committed
                    // upstream and reflected in the answer, our own commits included, of
                    // which upstream sends us no invalidation: the connection's `seen`
                    // alone stays below a commit made through this proxy until someone
                    // else commits, and an answer about an object that commit changed
                    // would be refused as overtaken and the load retried forever
                    // (whenever the cache could not keep the committed state: a full
                    // disk, a record too big for it).
                    let floor = inner.last_tid();
                    conn.load_before(oid, before)
                        .await
                        .map(|(answer, seen)| (answer, seen.max(floor)))
                        .map_err(StorageError::from)
                }
                Err(e) => Err(e),
            };
            let waiters = inner.inflight.lock().remove(&key).unwrap_or_default();
            for w in waiters {
                let _ = w.send(match &result {
                    Ok(f) => Ok(f.clone()),
                    Err(e) => Err(share_error(e)),
                });
            }
            result
        });
        task.await
            .unwrap_or_else(|e| Err(StorageError::Io(std::io::Error::other(e))))
    }
}

impl Inner {
    /// Starts fetching the objects `data` references that the cache lacks, at most
    /// `config.prefetch` of them and [`PREFETCH_IN_FLIGHT`] in all.
    ///
    /// A ZODB client that loads an object nearly always loads what it references next (a
    /// BTree's buckets, a folder's items, a page's parts), one object per round trip of
    /// the slow link, since each of its threads has one load in flight. Fetching those
    /// references as soon as the record that names them arrives overlaps those round
    /// trips: a cold traversal costs about one round trip per level instead of per
    /// object. The fetches go through the same path as misses, so what lands in the
    /// cache is exactly what a miss would have stored.
    fn prefetch_references(self: &Arc<Self>, data: &[u8]) {
        let wanted = self.config.prefetch;
        if wanted == 0 {
            return;
        }
        let Ok(refs) = zodb::refs::references(data) else {
            return;
        };
        let mut started = 0;
        for oid in refs {
            if started == wanted {
                break;
            }
            if self.prefetching.lock().contains_key(&oid) || self.cache.has_current(oid) {
                continue;
            }
            let Ok(permit) = self.prefetch_slots.clone().try_acquire_owned() else {
                break;
            };
            let (done, waiting) = watch::channel(false);
            {
                let mut prefetching = self.prefetching.lock();
                if prefetching.contains_key(&oid) {
                    continue;
                }
                prefetching.insert(oid, waiting);
            }
            started += 1;
            let inner = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Ok((Some((data, start, end)), seen)) = inner.fetch(oid, Tid::MAX).await {
                    inner.prefetched.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut unclaimed = inner.unclaimed.lock();
                        if unclaimed.len() >= UNCLAIMED_MAX {
                            unclaimed.clear();
                        }
                        unclaimed.insert(oid);
                        inner.any_unclaimed.store(true, Ordering::Release);
                    }
                    inner
                        .stores
                        .submit_and_wait(data.len(), move |cache| {
                            cache.store(oid, start, end, data, seen)
                        })
                        .await;
                }
                inner.prefetching.lock().remove(&oid);
                let _ = done.send(true);
            });
        }
    }

    /// A load found `oid` in the cache: if it got there by prefetch, the bet paid off and
    /// what it references is fetched next.
    fn claim(self: &Arc<Self>, oid: Oid, data: &[u8]) {
        if !self.any_unclaimed.load(Ordering::Acquire) {
            return;
        }
        let claimed = {
            let mut unclaimed = self.unclaimed.lock();
            let found = unclaimed.remove(&oid);
            if unclaimed.is_empty() {
                self.any_unclaimed.store(false, Ordering::Release);
            }
            found
        };
        if claimed {
            self.prefetch_references(data);
        }
    }

    /// When `oid` is being prefetched: waits for that, then looks in the cache again.
    async fn await_prefetch(&self, oid: Oid, before: Tid) -> Option<crate::cache::CachedRevision> {
        let mut waiting = self.prefetching.lock().get(&oid)?.clone();
        // An error means the prefetch task is gone: look anyway.
        let _ = waiting.wait_for(|done| *done).await;
        self.cache.load_before(oid, before)
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

    async fn info(&self, info: Value) {
        if let Some(inner) = self.inner.upgrade() {
            inner.update_info(&info, false);
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

fn parse_tid_oids(v: &Value) -> Option<(Tid, Vec<Oid>)> {
    let s = v.as_seq()?;
    let tid = Tid::from_slice(s.first()?.as_bytes()?)?;
    let oids = s
        .get(1)?
        .as_seq()?
        .iter()
        .filter_map(|o| o.as_bytes().and_then(|b| Oid::from_slice(b)))
        .collect();
    Some((tid, oids))
}

fn client_txn_id(key: TxnKey) -> Value {
    Value::Int((key & 0x3fff_ffff_ffff_ffff) as i64)
}

#[async_trait]
impl Storage for UpstreamStorage {
    fn info(&self) -> StorageInfo {
        let ui = self.inner.upstream_info.lock().clone();
        StorageInfo {
            length: ui.length,
            size: ui.size,
            name: format!("proxy of {} ({})", self.inner.config.upstreams[0], ui.name),
            supports_undo: false,
            supports_record_iternext: false,
            interfaces: self
                .inner
                .blobs
                .iter()
                .filter(|_| ui.blobs)
                .map(|_| ("ZODB.interfaces", "IBlobStorage"))
                .chain([
                    ("ZODB.interfaces", "IStorageRestoreable"),
                    ("ZODB.interfaces", "IExternalGC"),
                    ("ZODB.interfaces", "IStorage"),
                ])
                .collect(),
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
    }

    async fn load_before(&self, oid: Oid, before: Tid) -> zodb::Result<LoadBefore> {
        let inner = &self.inner;
        let snapshot = inner.last_tid();
        // Looked up on the calling thread: an index read and one positioned read that
        // the page cache nearly always serves (see FileStorage's loads for the measure).
        let hit = match inner.cache.load_before(oid, before) {
            Some(rev) => {
                inner.hits.fetch_add(1, Ordering::Relaxed);
                Some(rev)
            }
            None => {
                inner.misses.fetch_add(1, Ordering::Relaxed);
                inner.await_prefetch(oid, before).await
            }
        };
        if let Some(rev) = hit {
            inner.claim(oid, &rev.data);
            return Ok(LoadBefore {
                revision: Some(Loaded {
                    data: rev.data,
                    start: rev.start,
                    end: rev.end,
                }),
                snapshot,
            });
        }
        let (answer, seen) = inner.fetch(oid, before).await?;
        match answer {
            Some((data, start, end)) => {
                if end.is_none() {
                    inner.prefetch_references(&data);
                }
                let stored = data.clone();
                inner.stores.submit(stored.len(), move |cache| {
                    cache.store(oid, start, end, stored, seen)
                });
                Ok(LoadBefore {
                    revision: Some(Loaded { data, start, end }),
                    snapshot: seen,
                })
            }
            None => Ok(LoadBefore {
                revision: None,
                snapshot: seen,
            }),
        }
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
        let v = conn
            .call("history", vec![Value::from(oid), Value::Int(size as i64)])
            .await?;
        let entries = v
            .as_seq()
            .unwrap_or(&[])
            .iter()
            .filter_map(history_entry)
            .collect();
        Ok(entries)
    }

    async fn new_oids(&self, count: usize) -> zodb::Result<Vec<Oid>> {
        if self.inner.config.read_only {
            return Err(StorageError::ReadOnly);
        }
        let mut pool = self.inner.oids.lock().await;
        while pool.len() < count {
            let conn = self.inner.link().await?;
            pool.extend(
                conn.new_oids(self.inner.config.oid_batch.max(count))
                    .await?,
            );
        }
        Ok(pool.drain(..count).collect())
    }

    async fn vote(&self, txn: &Transaction) -> zodb::Result<Vote> {
        if self.inner.config.read_only {
            return Err(StorageError::ReadOnly);
        }
        let taken = {
            let mut slot = self.inner.commit.lock();
            match slot.take() {
                Some(f) if f.key == txn.key && f.conn.is_connected() => Some(f),
                _ => None,
            }
        };
        let id = client_txn_id(txn.key);
        let mut fwd = match taken {
            Some(f) => f,
            None => {
                if let Some(tid) = txn.meta.tid {
                    // Checked here too, whatever upstream would accept: a stock upstream
                    // takes any tid, and one far ahead would stamp every later upstream
                    // transaction after it.
                    let last = Tid(self.inner.last_tid.load(Ordering::Acquire));
                    zodb::timestamp::check_explicit_tid(tid, last, zodb::timestamp::now_unix())
                        .map_err(StorageError::Value)?;
                }
                let conn = self.inner.link().await?;
                let ext = Value::Dict(zeo_proto::extension_from_bytes(&txn.meta.extension));
                conn.send_oneway(
                    "tpc_begin",
                    vec![
                        id.clone(),
                        Value::Bytes(Bytes::from(txn.meta.user.clone())),
                        Value::Bytes(Bytes::from(txn.meta.description.clone())),
                        ext,
                        txn.meta.tid.map(Value::from).unwrap_or(Value::None),
                        Value::Str((txn.meta.status as char).to_string()),
                    ],
                )?;
                Forwarded {
                    key: txn.key,
                    conn,
                    sent: 0,
                    stored: Vec::new(),
                    changed: Vec::new(),
                    blobs: Vec::new(),
                }
            }
        };
        for op in &txn.ops[fwd.sent.min(txn.ops.len())..] {
            let (name, args) = match op {
                TxnOp::Store { oid, serial, data } => {
                    fwd.stored.push((*oid, Some(data.clone())));
                    (
                        "storea",
                        vec![
                            Value::from(*oid),
                            Value::from(*serial),
                            Value::Bytes(data.clone()),
                            id.clone(),
                        ],
                    )
                }
                TxnOp::CheckCurrent { oid, serial } => (
                    "checkCurrentSerialInTransaction",
                    vec![Value::from(*oid), Value::from(*serial), id.clone()],
                ),
                TxnOp::Delete { oid, serial } => (
                    "deleteObject",
                    vec![Value::from(*oid), Value::from(*serial), id.clone()],
                ),
                TxnOp::Restore {
                    oid,
                    serial,
                    data,
                    prev_txn,
                } => (
                    "restorea",
                    vec![
                        Value::from(*oid),
                        Value::from(*serial),
                        data.clone().map(Value::Bytes).unwrap_or(Value::None),
                        prev_txn.map(Value::from).unwrap_or(Value::None),
                        id.clone(),
                    ],
                ),
                TxnOp::Undo { transaction_id } => (
                    "undoa",
                    vec![
                        Value::Bytes(Bytes::from(transaction_id.clone())),
                        id.clone(),
                    ],
                ),
                TxnOp::StoreBlob {
                    oid,
                    serial,
                    data,
                    file,
                } => {
                    let upstream_blobs = self.inner.upstream_info.lock().blobs;
                    let sent = match self.inner.blobs.as_ref().filter(|_| upstream_blobs) {
                        Some(blobs) => {
                            blobs
                                .forward(&fwd.conn, *oid, *serial, data, file, &id)
                                .await
                        }
                        None => Err(StorageError::Unsupported("blobs")),
                    };
                    if let Err(e) = sent {
                        // Upstream holds part of the transaction: drop it there.
                        let _ = fwd.conn.call("tpc_abort", vec![id.clone()]).await;
                        return Err(e);
                    }
                    fwd.stored.push((*oid, Some(data.clone())));
                    fwd.blobs.push((*oid, file.clone()));
                    continue;
                }
            };
            fwd.conn.send_oneway(name, args)?;
        }
        fwd.sent = txn.ops.len();
        let result = fwd.conn.call("vote", vec![id.clone()]).await;
        let items = match result {
            Ok(v) => v,
            Err(e) => {
                // Upstream has dropped its side of the transaction already.
                return Err(e.into());
            }
        };
        let mut conflicts = Vec::new();
        let mut changed = Vec::new();
        for item in items.as_seq().unwrap_or(&[]) {
            match item {
                Value::Bytes(b) => changed.extend(Oid::from_slice(b)),
                Value::Dict(_) => {
                    let oid = item
                        .get("oid")
                        .and_then(Value::as_bytes)
                        .and_then(|b| Oid::from_slice(b));
                    let serials = item.get("serials").and_then(Value::as_seq);
                    let tid_at = |i: usize| {
                        serials
                            .and_then(|s| s.get(i))
                            .and_then(Value::as_bytes)
                            .and_then(|b| Tid::from_slice(b))
                    };
                    let data = item
                        .get("data")
                        .and_then(Value::as_bytes)
                        .cloned()
                        .unwrap_or_default();
                    if let (Some(oid), Some(committed), Some(read)) = (oid, tid_at(0), tid_at(1)) {
                        conflicts.push(Conflict {
                            oid,
                            committed,
                            read,
                            data,
                        });
                    }
                }
                _ => {}
            }
        }
        if !conflicts.is_empty() {
            // Upstream would keep the transaction open for the client's resolution, but
            // this one connection carries every downstream client's commits and others
            // commit while this client resolves (a second tpc_begin on the connection
            // would make upstream drop it). So abort it upstream now: the re-vote sends
            // the whole transaction again, where the resolved stores replace the
            // conflicting ones (zeors and the stock server both replay it that way).
            if let Err(e) = fwd.conn.call("tpc_abort", vec![id.clone()]).await {
                debug!(error = %e, "upstream tpc_abort after conflicts failed");
            }
            return Ok(Vote::Conflicts(conflicts));
        }
        fwd.changed = changed.clone();
        *self.inner.commit.lock() = Some(fwd);
        Ok(Vote::Ok { changed })
    }

    async fn finish(&self, key: TxnKey) -> zodb::Result<Tid> {
        let mut fwd = match self.inner.commit.lock().take() {
            Some(f) if f.key == key => f,
            other => {
                *self.inner.commit.lock() = other;
                return Err(StorageError::Transaction(
                    "finish without a voted transaction".into(),
                ));
            }
        };
        let oids: Vec<Oid> = fwd.stored.iter().map(|(o, _)| *o).collect();
        let blob_files = std::mem::take(&mut fwd.blobs);
        let blobs_changed = fwd.changed.clone();
        let weak = Arc::downgrade(&self.inner);
        let stored = fwd.stored;
        let changed = fwd.changed;
        // Applied in the reader, in order with upstream's callbacks: upstream does not
        // send us an invalidation for our own commit, this reply is its place in the order.
        let hook: zeo_client::ReplyHook = Box::new(move |result| {
            let (Some(inner), Ok(v)) = (weak.upgrade(), result) else {
                return;
            };
            let Some(tid) = v.as_bytes().and_then(|b| Tid::from_slice(b)) else {
                return;
            };
            inner.apply(tid, &oids, Some(key), false);
            // Keep what was committed as the new current revisions, off the reader (a
            // store may have to evict). If a later invalidation overtakes it, the cache
            // refuses it, since it was seen at `tid`.
            let bytes = stored
                .iter()
                .map(|(_, d)| d.as_ref().map_or(0, Bytes::len))
                .sum();
            inner.stores.submit(bytes, move |cache| {
                // A transaction voted again after conflicts holds several stores of the
                // same oid: upstream commits the last one (the client's resolution), so
                // only that one may be cached; an earlier one is the unresolved state.
                let mut seen = std::collections::HashSet::new();
                for (oid, data) in stored.into_iter().rev() {
                    if !seen.insert(oid) {
                        continue;
                    }
                    if let Some(data) = data {
                        if !changed.contains(&oid) {
                            cache.store(oid, tid, None, data, tid);
                        }
                    }
                }
            });
        });
        let v = fwd
            .conn
            .call_with_hook("tpc_finish", vec![client_txn_id(key)], hook)
            .await?;
        let tid = v
            .as_bytes()
            .and_then(|b| Tid::from_slice(b))
            .ok_or_else(|| {
                StorageError::Disconnected(format!(
                    "unexpected tpc_finish reply from upstream: {v:?}"
                ))
            })?;
        if let (Some(blobs), false) = (&self.inner.blobs, blob_files.is_empty()) {
            blobs.committed(tid, blob_files, &blobs_changed).await;
        }
        Ok(tid)
    }

    async fn abort(&self, key: TxnKey) {
        let fwd = {
            let mut slot = self.inner.commit.lock();
            match slot.take() {
                Some(f) if f.key == key => Some(f),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        if let Some(f) = fwd {
            if let Err(e) = f.conn.call("tpc_abort", vec![client_txn_id(key)]).await {
                debug!(error = %e, "upstream tpc_abort failed");
            }
        }
    }

    async fn recent_transactions(&self, count: usize) -> zodb::Result<Vec<(Tid, Vec<Oid>)>> {
        Ok(self.inner.cache.recent_transactions(count))
    }

    async fn invalidations_since(&self, tid: Tid) -> zodb::Result<Option<(Tid, Vec<Oid>)>> {
        Ok(self.inner.cache.invalidations_since(tid))
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
        vec![
            m(
                "cache_hits",
                "Loads answered from the proxy cache.",
                true,
                inner.hits.load(Ordering::Relaxed),
            ),
            m(
                "cache_misses",
                "Loads fetched from upstream.",
                true,
                inner.misses.load(Ordering::Relaxed),
            ),
            m(
                "cache_prefetched",
                "Objects fetched from upstream because a fetched record referenced them.",
                true,
                inner.prefetched.load(Ordering::Relaxed),
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
                "upstream_bytes_received",
                "Bytes received from upstream.",
                true,
                inner.traffic.bytes_in.load(Ordering::Relaxed),
            ),
            m(
                "upstream_bytes_sent",
                "Bytes sent to upstream.",
                true,
                inner.traffic.bytes_out.load(Ordering::Relaxed),
            ),
            m(
                "upstream_connected",
                "1 when the upstream link is up and caught up.",
                false,
                inner.link.read().is_some() as u64,
            ),
        ]
        .into_iter()
        .chain(inner.blobs.iter().flat_map(ProxyBlobs::metrics))
        .collect()
    }

    async fn close(&self) -> zodb::Result<()> {
        self.inner.shutdown.send_replace(true);
        if let Some(conn) = self.inner.link.write().take() {
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

/// Rebuilds a history entry from the dict upstream sent (extension keys merged in).
fn history_entry(v: &Value) -> Option<HistoryEntry> {
    let Value::Dict(items) = v else { return None };
    let tid = v
        .get("tid")
        .and_then(Value::as_bytes)
        .and_then(|b| Tid::from_slice(b))?;
    let bytes_of = |k: &str| match v.get(k) {
        Some(Value::Bytes(b)) => b.to_vec(),
        Some(Value::Str(s)) => s.as_bytes().to_vec(),
        _ => Vec::new(),
    };
    const KNOWN: [&str; 6] = ["time", "tid", "serial", "user_name", "description", "size"];
    let ext: Vec<(Value, Value)> = items
        .iter()
        .filter(|(k, _)| !k.as_str().is_some_and(|k| KNOWN.contains(&k)))
        .cloned()
        .collect();
    Some(HistoryEntry {
        tid,
        user: bytes_of("user_name"),
        description: bytes_of("description"),
        extension: zeo_proto::extension_to_bytes(&Value::Dict(ext)),
        size: v.get("size").and_then(Value::as_int).unwrap_or(0).max(0) as u64,
    })
}
