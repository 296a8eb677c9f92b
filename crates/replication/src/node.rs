//! A replicated FileStorage: the [`zodb::Storage`] a zeors server serves when it is a
//! primary that feeds replicas or a replica that follows one.
//!
//! Invariants:
//! - Every transaction, whether a client's commit (primary) or one applied from the
//!   stream (replica), is durable and published by the FileStorage before the node's
//!   [`CommitSignal`] says so; feeders (this node's own replicas) and waiting forwarded
//!   commits rely on it.
//! - A replica's clients see a transaction only once it is durable: the FileStorage
//!   reports it to the server's invalidation hub from its `finish`, after the fsync,
//!   before loads can read it, in tid order (the stream is applied in order, one
//!   transaction at a time).
//! - A replica accepts no local commit: its only writer is the stream. Clients' commits
//!   are refused (read-only, as zc.zrs secondaries) or forwarded to the primary (see
//!   [`crate::forward`]); after promotion the node is a primary and commits locally.
//! - Transactions applied from the stream use keys from a range of their own
//!   ([`APPLY_KEYS`]), which never reach the server's hub: the node reports them with the
//!   committer of a forwarded commit, or with none.

use crate::forward::Forwarder;
use crate::signal::CommitSignal;
use async_trait::async_trait;
use bytes::Bytes;
use filestorage::FileStorage;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use zodb::{
    CurrentRecord, HistoryEntry, InvalidationSink, LoadBefore, Oid, Result, Storage, StorageError,
    StorageInfo, StorageMetric, Tid, Transaction, TransactionIterator, TransactionMeta, TxnKey,
    TxnOp, UndoEntry, UndoFilter, Vote,
};

/// Transaction keys of applied transactions start here; the server counts its own from 1.
pub const APPLY_KEYS: u64 = 1 << 63;

/// What the node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Accepts commits; may feed replicas.
    Primary,
    /// Follows the primary at `source`.
    Replica { source: String },
}

/// The state of a replica's link, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    /// Connected, transactions pending on the primary.
    CatchingUp,
    /// Connected, nothing pending.
    Following,
    /// The primary's history is not ours: nothing is applied.
    Diverged,
    /// Not following (a primary, or a promoted replica).
    None,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::CatchingUp => "catching-up",
            LinkState::Following => "following",
            LinkState::Diverged => "diverged",
            LinkState::None => "none",
        }
    }
}

/// Counters and gauges of replication, read by `server_status` and the metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    /// Transactions applied from the stream.
    pub applied: AtomicU64,
    /// Bytes received from the primary (on the wire, compressed or not).
    pub bytes_in: AtomicU64,
    /// Bytes of stream after decompression.
    pub bytes_in_raw: AtomicU64,
    /// Bytes sent to replicas (on the wire).
    pub bytes_out: AtomicU64,
    /// Bytes of stream before compression.
    pub bytes_out_raw: AtomicU64,
    /// Connections to the primary made after the first.
    pub reconnects: AtomicU64,
    /// Replicas connected now.
    pub replicas: AtomicU64,
    /// The primary's last tid as it last told us (heartbeat), 0 if unknown.
    pub primary_last: AtomicU64,
    /// Transactions the primary has that we do not, as it last told us.
    pub pending: AtomicU64,
    /// Commits forwarded to the primary.
    pub forwarded: AtomicU64,
    pub(crate) link: Mutex<Option<LinkState>>,
    /// The last refusal (divergence), for status.
    pub(crate) last_error: Mutex<Option<String>>,
}

impl Stats {
    pub fn link(&self) -> LinkState {
        self.link.lock().unwrap_or(LinkState::None)
    }

    pub(crate) fn set_link(&self, s: LinkState) {
        *self.link.lock() = Some(s);
    }
}

/// A forwarded commit waiting for its transaction to come back through the stream.
#[derive(Debug, Default)]
struct Forwards {
    /// Local transaction key → the tid the primary gave it, once known.
    in_flight: HashMap<TxnKey, Option<Tid>>,
}

/// The replicated storage. Cheap to share (`Arc`).
pub struct Node {
    fs: FileStorage,
    role: RwLock<Role>,
    pub(crate) signal: Arc<CommitSignal>,
    stats: Stats,
    hub: RwLock<Option<Arc<dyn InvalidationSink>>>,
    next_key: AtomicU64,
    forwarder: RwLock<Option<Arc<Forwarder>>>,
    forwards: Mutex<Forwards>,
    forwards_cv: parking_lot::Condvar,
    /// Set at close: feeders send what is committed and stop.
    closing: tokio::sync::watch::Sender<bool>,
    /// Background tasks (feeders, the follower) to wait for at close.
    pub(crate) tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Stops the follower (promotion, close).
    pub(crate) stop_follow: tokio::sync::watch::Sender<bool>,
    /// The follower's task, while the node follows a primary.
    pub(crate) follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("role", &*self.role.read())
            .finish_non_exhaustive()
    }
}

/// The sink the FileStorage reports to: the server's hub, with applied transactions
/// reported under the committer of the forwarded commit they carry, if any.
struct NodeSink(Weak<Node>);

impl InvalidationSink for NodeSink {
    fn invalidate(&self, tid: Tid, oids: &[Oid], committer: Option<TxnKey>) {
        let Some(node) = self.0.upgrade() else {
            return;
        };
        let committer = match committer {
            Some(k) if k >= APPLY_KEYS => node.forwarded_committer(tid),
            other => other,
        };
        let hub = node.hub.read().clone();
        if let Some(hub) = hub {
            hub.invalidate(tid, oids, committer);
        }
    }

    fn reset(&self, tid: Tid) {
        if let Some(hub) = self.0.upgrade().and_then(|n| n.hub.read().clone()) {
            hub.reset(tid);
        }
    }
}

/// A transaction received from the stream, ready to apply.
#[derive(Debug)]
pub struct Incoming {
    pub meta: TransactionMeta,
    pub ops: Vec<TxnOp>,
    /// Blob files of records, owned by the caller (removed after the apply).
    pub blobs: Vec<(Oid, PathBuf)>,
}

impl Node {
    pub fn new(fs: FileStorage, role: Role) -> Arc<Node> {
        let last = fs.core().last_transaction();
        let link = match role {
            Role::Primary => None,
            Role::Replica { .. } => Some(LinkState::Connecting),
        };
        let node = Arc::new(Node {
            fs,
            role: RwLock::new(role),
            signal: Arc::new(CommitSignal::new(last)),
            stats: Stats {
                link: Mutex::new(link),
                ..Stats::default()
            },
            hub: RwLock::new(None),
            next_key: AtomicU64::new(APPLY_KEYS),
            forwarder: RwLock::new(None),
            forwards: Mutex::new(Forwards::default()),
            forwards_cv: parking_lot::Condvar::new(),
            closing: tokio::sync::watch::Sender::new(false),
            tasks: Mutex::new(Vec::new()),
            stop_follow: tokio::sync::watch::Sender::new(false),
            follower: Mutex::new(None),
        });
        node.fs
            .core()
            .attach(Arc::new(NodeSink(Arc::downgrade(&node))));
        node
    }

    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    pub(crate) fn closing_rx(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub(crate) fn set_closing(&self) {
        self.closing.send_replace(true);
        self.signal.poke();
    }

    pub fn file_storage(&self) -> &FileStorage {
        &self.fs
    }

    pub fn role(&self) -> Role {
        self.role.read().clone()
    }

    pub fn is_replica(&self) -> bool {
        matches!(*self.role.read(), Role::Replica { .. })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn signal(&self) -> &Arc<CommitSignal> {
        &self.signal
    }

    /// Whether the storage keeps blobs (and so speaks `zrs2.1`).
    pub fn has_blobs(&self) -> bool {
        self.fs.core().blob_dir().is_some()
    }

    /// Sends clients' commits to the primary instead of refusing them.
    pub fn set_forwarder(&self, f: Arc<Forwarder>) {
        *self.forwarder.write() = Some(f);
    }

    pub(crate) fn forwarder(&self) -> Option<Arc<Forwarder>> {
        self.forwarder.read().clone()
    }

    /// Applies one transaction of the stream: vote and finish with the records as given
    /// (explicit tid, restore path), durable before it returns, then published.
    pub async fn apply(&self, incoming: Incoming) -> Result<Tid> {
        if !self.is_replica() {
            return Err(StorageError::Transaction(
                "this node is a primary: it applies no replicated transaction".into(),
            ));
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let txn = Transaction {
            key,
            meta: incoming.meta,
            ops: incoming.ops,
        };
        let blobs = incoming.blobs;
        let core = self.fs.core().clone();
        let tid = tokio::task::spawn_blocking(move || {
            match core.vote_restore(&txn, &blobs)? {
                Vote::Ok { .. } => {}
                Vote::Conflicts(c) => {
                    core.abort(key);
                    return Err(StorageError::Transaction(format!(
                        "restore reported conflicts: {c:?}"
                    )));
                }
            }
            core.finish(key)
        })
        .await
        .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))??;
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        self.signal.publish(tid);
        Ok(tid)
    }

    /// Makes this replica a primary: stops following (waiting for the follower to end,
    /// so no transaction is half applied) and accepts commits from then on.
    pub async fn promote(&self) -> Result<Tid> {
        if !self.is_replica() {
            return Err(StorageError::Value("this node is already a primary".into()));
        }
        self.stop_follow.send_replace(true);
        // An apply in progress completes; then the follower returns.
        crate::replica::wait_stopped(self).await;
        *self.role.write() = Role::Primary;
        self.stats.set_link(LinkState::None);
        if let Some(f) = self.forwarder.write().take() {
            f.close();
        }
        let last = self.fs.core().last_transaction();
        tracing::warn!(last = %last, "promoted: this node is now a primary and accepts commits");
        Ok(last)
    }

    /// The committer to report for an applied transaction: the local key of the
    /// forwarded commit that made it, when there is one. Waits (briefly) for forwarded
    /// commits whose tid the primary has not told yet: the stream can be faster than
    /// the reply, and a committer must not receive its own invalidation.
    fn forwarded_committer(&self, tid: Tid) -> Option<TxnKey> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut f = self.forwards.lock();
        loop {
            if let Some((&k, _)) = f.in_flight.iter().find(|(_, t)| **t == Some(tid)) {
                return Some(k);
            }
            if !f.in_flight.values().any(Option::is_none) {
                return None;
            }
            if self.forwards_cv.wait_until(&mut f, deadline).timed_out() {
                return None;
            }
        }
    }

    pub(crate) fn forward_started(&self, key: TxnKey) {
        self.forwards.lock().in_flight.insert(key, None);
    }

    pub(crate) fn forward_finished(&self, key: TxnKey, tid: Option<Tid>) {
        let mut f = self.forwards.lock();
        match tid {
            Some(t) => {
                f.in_flight.insert(key, Some(t));
            }
            None => {
                f.in_flight.remove(&key);
            }
        }
        self.forwards_cv.notify_all();
    }

    pub(crate) fn forward_done(&self, key: TxnKey) {
        self.forwards.lock().in_flight.remove(&key);
        self.forwards_cv.notify_all();
    }

    fn replication_metrics(&self) -> Vec<StorageMetric> {
        let s = &self.stats;
        let g = |name, help, value: f64| StorageMetric {
            name,
            help,
            counter: false,
            value,
        };
        let c = |name, help, v: &AtomicU64| StorageMetric {
            name,
            help,
            counter: true,
            value: v.load(Ordering::Relaxed) as f64,
        };
        let (lag_txns, lag_seconds) = self.lag();
        vec![
            g(
                "replication_is_replica",
                "1 when this node follows a primary, 0 when it is a primary",
                self.is_replica() as u8 as f64,
            ),
            g(
                "replication_connected",
                "1 when a replica is connected to its primary",
                matches!(s.link(), LinkState::CatchingUp | LinkState::Following) as u8 as f64,
            ),
            g(
                "replication_diverged",
                "1 when the primary refused this replica's history",
                (s.link() == LinkState::Diverged) as u8 as f64,
            ),
            g(
                "replication_lag_transactions",
                "transactions committed on the primary and not yet applied here",
                lag_txns as f64,
            ),
            g(
                "replication_lag_seconds",
                "time between the primary's last transaction and the last one applied here",
                lag_seconds,
            ),
            c(
                "replication_applied_transactions",
                "transactions applied from the primary's stream",
                &s.applied,
            ),
            c(
                "replication_received_bytes",
                "bytes received from the primary (on the wire)",
                &s.bytes_in,
            ),
            c(
                "replication_received_stream_bytes",
                "bytes of replication stream received (after decompression)",
                &s.bytes_in_raw,
            ),
            c(
                "replication_sent_bytes",
                "bytes sent to replicas (on the wire)",
                &s.bytes_out,
            ),
            c(
                "replication_sent_stream_bytes",
                "bytes of replication stream sent (before compression)",
                &s.bytes_out_raw,
            ),
            c(
                "replication_reconnects",
                "connections to the primary after the first",
                &s.reconnects,
            ),
            g(
                "replication_replicas",
                "replicas connected to this node",
                s.replicas.load(Ordering::Relaxed) as f64,
            ),
            c(
                "replication_forwarded_commits",
                "client commits forwarded to the primary",
                &s.forwarded,
            ),
        ]
    }

    /// Lag behind the primary: transactions, and seconds between the primary's last
    /// transaction and ours (0 when caught up or unknown).
    pub fn lag(&self) -> (u64, f64) {
        if !self.is_replica() {
            return (0, 0.0);
        }
        let pending = self.stats.pending.load(Ordering::Relaxed);
        let primary = Tid(self.stats.primary_last.load(Ordering::Relaxed));
        let ours = self.fs.core().last_transaction();
        let seconds = if primary > ours && ours != Tid::ZERO {
            zodb::timestamp::tid_to_unix(primary) - zodb::timestamp::tid_to_unix(ours)
        } else {
            0.0
        };
        (pending, seconds.max(0.0))
    }

    /// The fields this node adds to `server_status`.
    pub fn status_fields(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![(
            "role",
            match self.role() {
                Role::Primary => "primary".to_string(),
                Role::Replica { .. } => "replica".to_string(),
            },
        )];
        if let Role::Replica { source } = self.role() {
            let (lag_txns, lag_seconds) = self.lag();
            v.push(("replicate-from", source));
            v.push(("replication", self.stats.link().name().to_string()));
            v.push(("replication-lag-transactions", lag_txns.to_string()));
            v.push(("replication-lag-seconds", format!("{lag_seconds:.3}")));
            if let Some(e) = self.stats.last_error.lock().clone() {
                v.push(("replication-error", e));
            }
        }
        v.push((
            "replicas",
            self.stats.replicas.load(Ordering::Relaxed).to_string(),
        ));
        v
    }
}

#[async_trait]
impl Storage for Node {
    fn info(&self) -> StorageInfo {
        self.fs.info()
    }

    fn is_read_only(&self) -> bool {
        self.fs.is_read_only() || (self.is_replica() && self.forwarder().is_none())
    }

    fn last_transaction(&self) -> Tid {
        self.fs.last_transaction()
    }

    fn attach(&self, sink: Arc<dyn InvalidationSink>) {
        *self.hub.write() = Some(sink);
    }

    async fn load_before(&self, oid: Oid, before: Tid) -> Result<LoadBefore> {
        self.fs.load_before(oid, before).await
    }

    async fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Bytes> {
        self.fs.load_serial(oid, serial).await
    }

    async fn history(&self, oid: Oid, size: usize) -> Result<Vec<HistoryEntry>> {
        self.fs.history(oid, size).await
    }

    async fn new_oids(&self, count: usize) -> Result<Vec<Oid>> {
        if self.is_replica() {
            return match self.forwarder() {
                Some(f) => f.new_oids(count).await,
                None => Err(StorageError::ReadOnly),
            };
        }
        self.fs.new_oids(count).await
    }

    async fn vote(&self, txn: &Transaction) -> Result<Vote> {
        if self.is_replica() {
            return match self.forwarder() {
                Some(f) => f.vote(self, txn).await,
                None => Err(StorageError::ReadOnly),
            };
        }
        self.fs.vote(txn).await
    }

    async fn finish(&self, key: TxnKey) -> Result<Tid> {
        if let Some(f) = self.forwarder().filter(|f| f.has(key)) {
            return f.finish(self, key).await;
        }
        let tid = self.fs.finish(key).await?;
        self.signal.publish(tid);
        Ok(tid)
    }

    async fn abort(&self, key: TxnKey) {
        if let Some(f) = self.forwarder().filter(|f| f.has(key)) {
            return f.abort(key).await;
        }
        self.fs.abort(key).await
    }

    async fn recent_transactions(&self, count: usize) -> Result<Vec<(Tid, Vec<Oid>)>> {
        self.fs.recent_transactions(count).await
    }

    async fn invalidations_since(&self, tid: Tid) -> Result<Option<(Tid, Vec<Oid>)>> {
        self.fs.invalidations_since(tid).await
    }

    async fn close(&self) -> Result<()> {
        crate::shutdown(self).await;
        self.fs.close().await
    }

    fn metrics(&self) -> Vec<StorageMetric> {
        let mut m = self.fs.metrics();
        m.extend(self.replication_metrics());
        m
    }

    fn status(&self) -> Vec<(&'static str, String)> {
        self.status_fields()
    }

    async fn undo_log(
        &self,
        first: i64,
        last: i64,
        filter: Option<UndoFilter>,
    ) -> Result<Vec<UndoEntry>> {
        self.fs.undo_log(first, last, filter).await
    }

    async fn iterator(
        &self,
        start: Option<Tid>,
        stop: Option<Tid>,
    ) -> Result<Box<dyn TransactionIterator>> {
        self.fs.iterator(start, stop).await
    }

    async fn record_iternext(&self, next: Option<Oid>) -> Result<CurrentRecord> {
        self.fs.record_iternext(next).await
    }

    async fn pack(&self, pack_time: f64) -> Result<()> {
        self.fs.pack(pack_time).await
    }

    fn blob_temp_dir(&self) -> Option<PathBuf> {
        self.fs.blob_temp_dir()
    }

    fn blob_shared_dir(&self, oid: Oid) -> Result<PathBuf> {
        self.fs.blob_shared_dir(oid)
    }

    async fn open_blob(&self, oid: Oid, serial: Tid) -> Result<std::fs::File> {
        self.fs.open_blob(oid, serial).await
    }
}
