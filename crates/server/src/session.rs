//! One client connection.
//!
//! A session performs the handshake, then reads messages and runs them. Cheap requests
//! are answered inline; loads and other storage reads run as futures inside the session
//! (so one client's pipelined loads proceed concurrently); `vote` and `tpc_finish` run as
//! separate tasks because they must finish or clean up even if the connection drops.
//!
//! Transaction state follows ZEO: stores are buffered from `tpc_begin` to `vote`; `vote`
//! takes the storage's commit lock (possibly waiting) and hands the buffer to the
//! storage; the lock is held until `tpc_finish` or `tpc_abort`. On conflicts the lock is
//! released and the buffer kept, so the client can resolve them, store the results and
//! vote again (ZEO's client-side conflict resolution).

use crate::hub::SessionId;
use crate::outbox::Outbox;
use crate::{stats, Shared, StorageHandle};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use zeo_proto::message::{self, ClientHello};
use zeo_proto::request::{Request, RequestError};
use zeo_proto::{exception, frame, Encoding, Limits, Message, Value};
use zodb::{StorageError, Tid, Transaction, TransactionMeta, TxnKey, TxnOp, Vote};

mod blobs;

/// How long a new connection may take to answer the protocol handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long queued output may take to drain when a session ends.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames at least this large are written directly instead of being coalesced.
const DIRECT_WRITE: usize = 64 * 1024;

pub(crate) async fn run<S>(stream: S, peer: String, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let server_encoding = shared.config.encoding;
    if wr
        .write_all(&frame::frame(server_encoding.server_hello()))
        .await
        .is_err()
    {
        return;
    }
    // Small to start with: a thousand idle connections must not cost a thousand large
    // buffers; a client sending big records makes its own buffer grow.
    let mut buf = BytesMut::with_capacity(4 * 1024);
    let hello =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut rd, &mut buf, 64)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "connection lost during handshake");
                return;
            }
            Err(_) => {
                info!(%peer, "no handshake within {HANDSHAKE_TIMEOUT:?}, closing");
                return;
            }
        };
    let encoding = match message::parse_client_hello(&hello) {
        Ok(ClientHello::Protocol(e)) => e,
        Ok(ClientHello::Ruok) => {
            let status = Value::Dict(
                shared
                    .storages
                    .values()
                    .map(|h| (Value::Str(h.name.clone()), server_status(h, &shared)))
                    .collect(),
            );
            let _ = wr
                .write_all(&frame::frame(stats::to_json(&status).as_bytes()))
                .await;
            let _ = wr.shutdown().await;
            return;
        }
        Err(e) => {
            warn!(%peer, error = %e, "bad handshake, closing");
            return;
        }
    };

    let (outbox, rx) = Outbox::new(encoding, shared.config.max_queued_bytes);
    let outbox = Arc::new(outbox);
    let mut writer = tokio::spawn(write_loop(
        wr,
        rx,
        Arc::downgrade(&outbox),
        shared.metrics.clone(),
    ));
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    debug!(session = id, %peer, ?encoding, "connected");
    let mut session = Session {
        id,
        peer,
        shared,
        outbox,
        encoding,
        label: String::new(),
        registered: None,
        txn: TxnState::Idle,
        pending: FuturesUnordered::new(),
        limits: Limits::default(),
        iterators: Arc::new(parking_lot::Mutex::new(Iterators::default())),
        upload: None,
    };
    // A panic while serving (a bug: none is known to be reachable from the network) is
    // confined to this connection. Tokio would contain it to this task anyway, but the
    // session must still be cleaned up: without that, a transaction it had voted would
    // stay staged in the storage and wedge every later commit, and the hub would keep
    // queueing invalidations for it.
    let reason = match AssertUnwindSafe(session.serve(&mut rd, buf))
        .catch_unwind()
        .await
    {
        Ok(reason) => reason,
        Err(panic) => Close::Panic(panic_message(panic.as_ref())),
    };
    session.cleanup(&reason).await;
    drop(session);
    // The writer ends when every handle on the outbox is gone and the queue is drained.
    if tokio::time::timeout(FLUSH_TIMEOUT, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Why a session ended.
enum Close {
    PeerClosed,
    Io(std::io::Error),
    Protocol(String),
    Shutdown,
    Stuck,
    Timeout,
    /// Serving the connection panicked (the message).
    Panic(String),
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Close::PeerClosed => f.write_str("closed by the client"),
            Close::Io(e) => write!(f, "I/O error: {e}"),
            Close::Protocol(why) => write!(f, "protocol error: {why}"),
            Close::Shutdown => f.write_str("server shutting down"),
            Close::Stuck => f.write_str("client not reading"),
            Close::Timeout => f.write_str("transaction timeout"),
            Close::Panic(what) => write!(f, "internal error (panic: {what})"),
        }
    }
}

struct Registered {
    handle: Arc<StorageHandle>,
    read_only: bool,
}

/// A transaction between `tpc_begin` and its end.
struct Open {
    /// The client's name for it (`id(txn)`).
    id: Value,
    txn: Transaction,
    /// The blob files its `StoreBlob` operations name, removed when it ends.
    blob_files: blobs::TempFiles,
}

enum TxnState {
    Idle,
    /// Buffering stores.
    Begun(Open),
    /// `vote` is waiting for the commit lock or running in the storage.
    Voting {
        id: Value,
        key: TxnKey,
        handle: JoinHandle<VoteDone>,
        /// A `tpc_abort` that arrived meanwhile, to be honoured once the vote is back.
        abort_msgid: Option<Value>,
    },
    /// Voted; the commit lock is held until finish or abort.
    Voted {
        open: Open,
        guard: OwnedMutexGuard<()>,
        deadline: Option<Instant>,
    },
    /// `tpc_finish` is running; its task replies and releases the lock.
    Finishing {
        handle: JoinHandle<()>,
    },
}

struct VoteDone {
    guard: OwnedMutexGuard<()>,
    result: zodb::Result<Vote>,
    open: Open,
    msgid: Value,
}

enum TxnEvent {
    Voted(Box<Result<VoteDone, tokio::task::JoinError>>),
    Finished,
}

struct Session {
    id: SessionId,
    peer: String,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    encoding: Encoding,
    label: String,
    registered: Option<Registered>,
    txn: TxnState,
    /// Requests in progress (loads and other reads).
    pending: FuturesUnordered<BoxFuture<'static, ()>>,
    limits: Limits,
    /// This connection's transaction and record iterators (`iterator_start`…).
    iterators: Arc<parking_lot::Mutex<Iterators>>,
    /// A blob upload between `storeBlobStart` and `storeBlobEnd`.
    upload: Option<blobs::Upload>,
}

enum Event {
    Shutdown,
    Trouble,
    RequestDone,
    Txn(TxnEvent),
    TxnTimeout,
    Read(std::io::Result<usize>),
}

/// Sleeps until `deadline`, or forever without one (no clock read when there is none).
async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn wait_txn(state: &mut TxnState) -> TxnEvent {
    match state {
        TxnState::Voting { handle, .. } => TxnEvent::Voted(Box::new(handle.await)),
        TxnState::Finishing { handle } => {
            let _ = handle.await;
            TxnEvent::Finished
        }
        _ => std::future::pending().await,
    }
}

impl Session {
    async fn serve<R: AsyncRead + Unpin>(&mut self, rd: &mut R, mut buf: BytesMut) -> Close {
        let mut shutdown = self.shared.shutdown.clone();
        if *shutdown.borrow() {
            return Close::Shutdown;
        }
        let max_frame = self.shared.config.max_message_size;
        // The client pipelines its first requests behind the handshake.
        if let Err(close) = self.handle_buffered(&mut buf, max_frame).await {
            return close;
        }
        // Made once, not on every turn of the loop: each new one would register (and drop
        // one unregister) a waiter under a lock, for every request. Both end the session
        // when they fire, so neither is polled after completing.
        let outbox = self.outbox.clone();
        let trouble = outbox.trouble.notified();
        tokio::pin!(trouble);
        let shutdown_changed = shutdown.changed();
        tokio::pin!(shutdown_changed);
        loop {
            let can_read = self.pending.len() < self.shared.config.max_pipelined;
            let deadline = match &self.txn {
                TxnState::Voted { deadline, .. } => *deadline,
                _ => None,
            };
            let event = tokio::select! {
                _ = &mut shutdown_changed => Event::Shutdown,
                _ = &mut trouble => Event::Trouble,
                Some(()) = self.pending.next(), if !self.pending.is_empty() => Event::RequestDone,
                ev = wait_txn(&mut self.txn) => Event::Txn(ev),
                _ = sleep_until_deadline(deadline), if deadline.is_some() => Event::TxnTimeout,
                r = rd.read_buf(&mut buf), if can_read => Event::Read(r),
            };
            match event {
                Event::Shutdown => return Close::Shutdown,
                Event::Trouble => {
                    if self.outbox.is_overflowed() {
                        warn!(session = self.id, peer = %self.peer, queued = self.outbox.queued_bytes(),
                              "client is not reading its replies; disconnecting it");
                        return Close::Stuck;
                    }
                    return Close::PeerClosed;
                }
                Event::RequestDone => {}
                Event::Txn(ev) => self.txn_event(ev).await,
                Event::TxnTimeout => {
                    warn!(session = self.id, peer = %self.peer, label = %self.label,
                          "transaction timeout: commit lock held too long; aborting and disconnecting");
                    return Close::Timeout;
                }
                Event::Read(Ok(0)) => return Close::PeerClosed,
                Event::Read(Err(e)) => return Close::Io(e),
                Event::Read(Ok(n)) => {
                    self.shared
                        .metrics
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                    if let Err(close) = self.handle_buffered(&mut buf, max_frame).await {
                        return close;
                    }
                }
            }
        }
    }

    /// Runs every complete message in `buf`.
    async fn handle_buffered(&mut self, buf: &mut BytesMut, max_frame: usize) -> Result<(), Close> {
        loop {
            match frame::decode_frame(buf, max_frame) {
                Ok(Some(payload)) => self.handle_frame(&payload).await?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    warn!(session = self.id, peer = %self.peer, error = %e, "bad frame, closing");
                    return Err(Close::Protocol(e.to_string()));
                }
            }
        }
    }

    /// Ends the session: stop receiving invalidations, abort what the client left
    /// unfinished and wait for a finish in progress.
    async fn cleanup(&mut self, reason: &Close) {
        match reason {
            Close::PeerClosed | Close::Shutdown => {
                debug!(session = self.id, peer = %self.peer, %reason, "disconnected")
            }
            Close::Panic(_) => {
                tracing::error!(session = self.id, peer = %self.peer, label = %self.label, %reason,
                                "closing connection; aborting its transaction")
            }
            _ => {
                info!(session = self.id, peer = %self.peer, label = %self.label, %reason, "closing connection")
            }
        }
        let Some(reg) = &self.registered else { return };
        let handle = reg.handle.clone();
        handle.hub.unregister(self.id);
        match std::mem::replace(&mut self.txn, TxnState::Idle) {
            TxnState::Idle => {}
            TxnState::Begun(_) => end_txn_stats(&handle, true),
            TxnState::Voting {
                key, handle: task, ..
            } => {
                if let Ok(done) = task.await {
                    if matches!(done.result, Ok(Vote::Ok { .. })) {
                        handle.storage.abort(key).await;
                    }
                    release_lock(&handle, key, done.guard);
                }
                end_txn_stats(&handle, true);
            }
            TxnState::Voted { open, guard, .. } => {
                handle.storage.abort(open.txn.key).await;
                release_lock(&handle, open.txn.key, guard);
                end_txn_stats(&handle, true);
            }
            TxnState::Finishing { handle: task } => {
                let _ = task.await;
            }
        }
    }

    async fn handle_frame(&mut self, payload: &[u8]) -> Result<(), Close> {
        let limits = self.limits.for_message(payload.len());
        let msg = Message::decode(self.encoding, payload, &limits).map_err(|e| {
            warn!(session = self.id, peer = %self.peer, error = %e, "undecodable message");
            Close::Protocol(e.to_string())
        })?;
        if msg.is_heartbeat() || msg.name == message::REPLY {
            return Ok(());
        }
        let oneway = msg.is_oneway();
        let request = match Request::parse(&msg.name, &msg.args) {
            Ok(r) => r,
            Err(RequestError::UnknownMethod(name)) => {
                warn!(session = self.id, peer = %self.peer, method = %name, "invalid method, closing");
                return Err(Close::Protocol(format!("invalid method {name:?}")));
            }
            Err(e) => {
                warn!(session = self.id, peer = %self.peer, error = %e, "bad request");
                if oneway {
                    return Err(Close::Protocol(e.to_string()));
                }
                self.reply_exception(
                    &msg.msgid,
                    "builtins.TypeError",
                    Value::Tuple(vec![Value::Str(e.to_string())]),
                );
                return Ok(());
            }
        };
        let Some(reg) = &self.registered else {
            return match request {
                Request::Register { storage, read_only } => {
                    self.register(&msg.msgid, storage, read_only);
                    Ok(())
                }
                _ => {
                    warn!(session = self.id, peer = %self.peer, method = %msg.name, "call before register, closing");
                    Err(Close::Protocol(format!("{} before register", msg.name)))
                }
            };
        };
        let handle = reg.handle.clone();
        let read_only = reg.read_only;
        let msgid = msg.msgid;
        match request {
            Request::Register { .. } => {
                warn!(session = self.id, peer = %self.peer, "duplicate register, closing");
                return Err(Close::Protocol("duplicate register".into()));
            }
            Request::GetInfo => self.reply(&msgid, info_dict(&handle)),
            Request::LastTransaction => self.reply(&msgid, Value::from(handle.hub.last_tid())),
            Request::Ping => self.reply(&msgid, Value::None),
            Request::SetClientLabel { label } => self.label = label,
            Request::ServerStatus => self.reply(&msgid, server_status(&handle, &self.shared)),
            Request::NewOid => self.reply_exception(
                &msgid,
                "builtins.AttributeError",
                Value::Tuple(vec![Value::str(
                    "'ZEOStorage' object has no attribute 'new_oid'",
                )]),
            ),
            Request::GetInvalidations { tid } => match handle.hub.invalidations_since(tid) {
                Some(answer) => self.reply(&msgid, invalidations_value(Some(answer))),
                None => {
                    let storage = handle.storage.clone();
                    self.spawn_call(msgid, async move {
                        Ok(invalidations_value(storage.invalidations_since(tid).await?))
                    });
                }
            },
            Request::ChangedSince { tid } => {
                let storage = handle.storage.clone();
                self.spawn_call(msgid, async move {
                    Ok(invalidations_value(storage.invalidations_since(tid).await?))
                });
            }
            Request::NewOids { count } => {
                if read_only {
                    self.reply_error(&msgid, &StorageError::ReadOnly);
                } else {
                    let storage = handle.storage.clone();
                    self.spawn_call(msgid, async move {
                        let oids = storage.new_oids(count).await?;
                        Ok(Value::List(oids.into_iter().map(Value::from).collect()))
                    });
                }
            }
            Request::LoadBefore { oid, before } => {
                Stats::incr(&handle.stats.loads);
                let outbox = self.outbox.clone();
                self.pending
                    .push(Box::pin(load_before(handle, outbox, msgid, oid, before)));
            }
            Request::LoadSerial { oid, serial } => {
                Stats::incr(&handle.stats.loads);
                let storage = handle.storage.clone();
                self.spawn_call(msgid, async move {
                    Ok(Value::Bytes(storage.load_serial(oid, serial).await?))
                });
            }
            Request::GetTid { oid } => {
                let storage = handle.storage.clone();
                self.spawn_call(msgid, async move {
                    match storage.load_before(oid, Tid::MAX).await?.revision {
                        Some(rev) => Ok(Value::from(rev.start)),
                        None => Err(StorageError::PosKey(oid)),
                    }
                });
            }
            Request::History { oid, size } => {
                let storage = handle.storage.clone();
                self.spawn_call(msgid, async move {
                    let entries = storage.history(oid, size).await?;
                    Ok(Value::List(entries.iter().map(history_dict).collect()))
                });
            }
            Request::TpcBegin {
                txn,
                user,
                description,
                extension,
                tid,
                status,
            } => {
                if read_only {
                    warn!(session = self.id, peer = %self.peer, "tpc_begin on a read-only connection, closing");
                    return Err(Close::Protocol("read-only".into()));
                }
                return self
                    .tpc_begin(&handle, txn, user, description, extension, tid, status)
                    .await;
            }
            Request::Storea {
                oid,
                serial,
                data,
                txn,
            } => {
                Stats::incr(&handle.stats.stores);
                return self.buffer(
                    read_only,
                    &txn,
                    "storea",
                    TxnOp::Store { oid, serial, data },
                );
            }
            Request::CheckCurrentSerialInTransaction { oid, serial, txn } => {
                return self.buffer(
                    read_only,
                    &txn,
                    "checkCurrentSerialInTransaction",
                    TxnOp::CheckCurrent { oid, serial },
                );
            }
            Request::DeleteObject { oid, serial, txn } => {
                return self.buffer(
                    read_only,
                    &txn,
                    "deleteObject",
                    TxnOp::Delete { oid, serial },
                );
            }
            Request::Restorea {
                oid,
                serial,
                data,
                prev_txn,
                txn,
            } => {
                Stats::incr(&handle.stats.stores);
                return self.buffer(
                    read_only,
                    &txn,
                    "restorea",
                    TxnOp::Restore {
                        oid,
                        serial,
                        data,
                        prev_txn,
                    },
                );
            }
            Request::Undoa {
                transaction_id,
                txn,
            } => {
                return self.buffer(
                    read_only,
                    &txn,
                    "undoa",
                    TxnOp::Undo {
                        transaction_id: transaction_id.to_vec(),
                    },
                );
            }
            Request::Vote { txn } => self.vote(&handle, read_only, msgid, txn),
            Request::TpcFinish { txn } => self.tpc_finish(&handle, read_only, msgid, txn),
            Request::TpcAbort { txn } => self.tpc_abort(&handle, read_only, msgid, txn).await,
            Request::UndoLog { first, last } => self.undo_log(&handle, msgid, first, last, None),
            Request::UndoInfo { first, last, spec } => {
                self.undo_log(&handle, msgid, first, last, Some(spec))
            }
            Request::IteratorStart { start, stop } => {
                self.iterator_start(&handle, msgid, start, stop)
            }
            Request::IteratorNext { iid } => self.iterator_next(msgid, iid),
            Request::IteratorRecordStart { txn_iid, tid } => {
                self.iterator_record_start(msgid, txn_iid, tid)
            }
            Request::IteratorRecordNext { riid } => self.iterator_record_next(msgid, riid),
            Request::IteratorGc { iids } => {
                {
                    let mut its = self.iterators.lock();
                    for iid in iids {
                        its.slots.remove(&iid);
                    }
                }
                // Sent one-way by ClientStorage, but answered when called.
                if !oneway {
                    self.reply(&msgid, Value::None);
                }
            }
            Request::RecordIternext { next } => {
                let storage = handle.storage.clone();
                let next = match next.as_deref().map(zodb::Oid::from_slice) {
                    None => None,
                    Some(Some(oid)) => Some(oid),
                    Some(None) => {
                        self.reply_error(
                            &msgid,
                            &StorageError::Value("record_iternext: next must be an oid".into()),
                        );
                        return Ok(());
                    }
                };
                self.spawn_call(msgid, async move {
                    let r = storage.record_iternext(next).await?;
                    Ok(Value::Tuple(vec![
                        Value::from(r.oid),
                        Value::from(r.tid),
                        Value::Bytes(r.data),
                        r.next.map(Value::from).unwrap_or(Value::None),
                    ]))
                });
            }
            Request::Pack { time, wait } => self.pack(&handle, msgid, time, wait, oneway),
            Request::SendBlob { oid, serial } => {
                if oneway {
                    return Err(Close::Protocol("sendBlob sent one-way".into()));
                }
                self.send_blob(&handle, msgid, oid, serial);
            }
            Request::StoreBlobStart => return self.store_blob_start(&handle, read_only).await,
            Request::StoreBlobChunk { chunk } => return self.store_blob_chunk(chunk).await,
            Request::StoreBlobEnd {
                oid,
                serial,
                data,
                txn,
            } => return self.store_blob_end(oid, serial, data, txn).await,
            Request::StoreBlobShared {
                oid,
                serial,
                data,
                filename,
                txn,
            } => {
                return self.store_blob_shared(&handle, read_only, oid, serial, data, filename, txn)
            }
        }
        Ok(())
    }

    fn register(&mut self, msgid: &Value, storage: String, read_only: bool) {
        let Some(handle) = self.shared.storages.get(&storage).cloned() else {
            info!(session = self.id, peer = %self.peer, %storage, "register: unknown storage");
            self.reply_error(
                msgid,
                &StorageError::Value(format!("unknown storage: {storage}")),
            );
            return;
        };
        if !read_only && (self.shared.config.read_only || handle.storage.is_read_only()) {
            self.reply_error(msgid, &StorageError::ReadOnly);
            return;
        }
        // Reading the last tid, subscribing and queueing the reply happen under the hub's
        // lock, so the reply precedes every invalidation after that tid.
        let encoding = self.encoding;
        let msgid = msgid.clone();
        let tid = handle.hub.register(self.id, self.outbox.clone(), |tid| {
            message::reply_frame(encoding, &msgid, Value::from(tid))
        });
        debug!(session = self.id, peer = %self.peer, %storage, read_only, %tid, "registered");
        self.registered = Some(Registered { handle, read_only });
    }

    #[allow(clippy::too_many_arguments)]
    async fn tpc_begin(
        &mut self,
        handle: &Arc<StorageHandle>,
        id: Value,
        user: Bytes,
        description: Bytes,
        extension: Value,
        tid: Option<Tid>,
        status: u8,
    ) -> Result<(), Close> {
        self.settle_finish().await;
        match &self.txn {
            TxnState::Idle => {}
            TxnState::Begun(open) if open.id == id => return Ok(()),
            _ => {
                warn!(session = self.id, peer = %self.peer, "tpc_begin while another transaction is active, closing");
                return Err(Close::Protocol("duplicate tpc_begin".into()));
            }
        }
        let key = self.shared.next_txn.fetch_add(1, Ordering::Relaxed);
        handle.stats.active_txns.fetch_add(1, Ordering::Relaxed);
        self.txn = TxnState::Begun(Open {
            id,
            txn: Transaction {
                key,
                meta: TransactionMeta {
                    user: user.to_vec(),
                    description: description.to_vec(),
                    extension: zeo_proto::extension_to_bytes(&extension),
                    tid,
                    status,
                },
                ops: Vec::new(),
            },
            blob_files: blobs::TempFiles::default(),
        });
        Ok(())
    }

    /// Buffers a one-way transaction operation. Misuse closes the connection, as a
    /// failing one-way call does in ZEO (there is no way to report it).
    fn buffer(&mut self, read_only: bool, id: &Value, what: &str, op: TxnOp) -> Result<(), Close> {
        if read_only {
            warn!(session = self.id, peer = %self.peer, "{what} on a read-only connection, closing");
            return Err(Close::Protocol("read-only".into()));
        }
        match &mut self.txn {
            TxnState::Begun(open) if open.id == *id => {
                open.txn.ops.push(op);
                Ok(())
            }
            _ => {
                warn!(session = self.id, peer = %self.peer, "{what} outside its transaction, closing");
                Err(Close::Protocol(format!("{what} without tpc_begin")))
            }
        }
    }

    fn vote(&mut self, handle: &Arc<StorageHandle>, read_only: bool, msgid: Value, id: Value) {
        if read_only {
            self.reply_error(&msgid, &StorageError::ReadOnly);
            return;
        }
        let open = match std::mem::replace(&mut self.txn, TxnState::Idle) {
            TxnState::Begun(open) if open.id == id => open,
            other => {
                self.txn = other;
                self.reply_error(
                    &msgid,
                    &StorageError::Transaction(
                        "vote for a transaction that is not open on this connection".into(),
                    ),
                );
                return;
            }
        };
        let key = open.txn.key;
        let handle = handle.clone();
        let session = self.id;
        let metrics = self.shared.metrics.clone();
        let task = tokio::spawn(async move {
            handle.stats.waiting.fetch_add(1, Ordering::Relaxed);
            let waiting_since = std::time::Instant::now();
            let guard = handle.commit_lock.clone().lock_owned().await;
            metrics
                .commit_lock_wait
                .observe(waiting_since.elapsed().as_secs_f64());
            handle.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            *handle.stats.lock_time.lock() = Some(zodb::timestamp::now_unix());
            handle.hub.begin_commit(key, session);
            let result = handle.storage.vote(&open.txn).await;
            VoteDone {
                guard,
                result,
                open,
                msgid,
            }
        });
        self.txn = TxnState::Voting {
            id,
            key,
            handle: task,
            abort_msgid: None,
        };
    }

    async fn txn_event(&mut self, ev: TxnEvent) {
        let Some(reg) = &self.registered else { return };
        let handle = reg.handle.clone();
        match ev {
            TxnEvent::Finished => self.txn = TxnState::Idle,
            TxnEvent::Voted(joined) => {
                let TxnState::Voting {
                    key, abort_msgid, ..
                } = std::mem::replace(&mut self.txn, TxnState::Idle)
                else {
                    return;
                };
                let done = match *joined {
                    Ok(done) => done,
                    Err(e) => {
                        // The vote task panicked; its lock guard was dropped with it.
                        tracing::error!(session = self.id, error = %e, "vote failed unexpectedly");
                        handle.hub.end_commit(key);
                        end_txn_stats(&handle, true);
                        return;
                    }
                };
                let VoteDone {
                    guard,
                    result,
                    open,
                    msgid,
                } = done;
                match result {
                    Ok(Vote::Ok { changed }) => {
                        self.reply(
                            &msgid,
                            Value::List(changed.into_iter().map(Value::from).collect()),
                        );
                        let deadline = self
                            .shared
                            .config
                            .transaction_timeout
                            .map(|t| Instant::now() + t);
                        debug!(
                            session = self.id,
                            ?deadline,
                            "voted; holding the commit lock"
                        );
                        self.txn = TxnState::Voted {
                            open,
                            guard,
                            deadline,
                        };
                    }
                    Ok(Vote::Conflicts(conflicts)) => {
                        release_lock(&handle, key, guard);
                        handle
                            .stats
                            .conflicts
                            .fetch_add(conflicts.len() as u64, Ordering::Relaxed);
                        let list = conflicts
                            .into_iter()
                            .map(|c| {
                                Value::dict([
                                    ("oid", Value::from(c.oid)),
                                    (
                                        "serials",
                                        Value::Tuple(vec![
                                            Value::from(c.committed),
                                            Value::from(c.read),
                                        ]),
                                    ),
                                    ("data", Value::Bytes(c.data)),
                                ])
                            })
                            .collect();
                        self.reply(&msgid, Value::List(list));
                        self.txn = TxnState::Begun(open);
                    }
                    Err(e) => {
                        release_lock(&handle, key, guard);
                        if matches!(
                            e,
                            StorageError::Conflict { .. } | StorageError::ReadConflict { .. }
                        ) {
                            Stats::incr(&handle.stats.conflicts);
                        }
                        end_txn_stats(&handle, true);
                        self.reply_error(&msgid, &e);
                    }
                }
                if let Some(abort_msgid) = abort_msgid {
                    self.abort_current(&handle).await;
                    self.reply(&abort_msgid, Value::None);
                }
            }
        }
    }

    fn tpc_finish(
        &mut self,
        handle: &Arc<StorageHandle>,
        read_only: bool,
        msgid: Value,
        id: Value,
    ) {
        if read_only {
            self.reply_error(&msgid, &StorageError::ReadOnly);
            return;
        }
        match std::mem::replace(&mut self.txn, TxnState::Idle) {
            TxnState::Voted { open, guard, .. } if open.id == id => {
                let handle = handle.clone();
                let outbox = self.outbox.clone();
                let key = open.txn.key;
                let task = tokio::spawn(async move {
                    match handle.storage.finish(key).await {
                        Ok(tid) => {
                            Stats::incr(&handle.stats.commits);
                            let info = handle.storage.info();
                            let size_info = Value::dict([
                                ("length", Value::Int(info.length as i64)),
                                ("size", Value::Int(info.size as i64)),
                            ]);
                            outbox.send(message::callback_frame(
                                outbox.encoding,
                                "info",
                                vec![size_info],
                            ));
                            outbox.send(message::reply_frame(
                                outbox.encoding,
                                &msgid,
                                Value::from(tid),
                            ));
                        }
                        Err(e) => {
                            tracing::error!(storage = %handle.name, error = %e, "tpc_finish failed; transaction aborted");
                            handle.storage.abort(key).await;
                            send_error(&outbox, &msgid, &e);
                        }
                    }
                    // Only now, after the reply is queued, may the next transaction commit.
                    release_lock(&handle, key, guard);
                    end_txn_stats(&handle, false);
                    drop(open);
                });
                self.txn = TxnState::Finishing { handle: task };
            }
            TxnState::Begun(open) if open.id == id => {
                self.txn = TxnState::Begun(open);
                self.reply_exception(
                    &msgid,
                    "builtins.AssertionError",
                    Value::Tuple(vec![Value::str("finished called wo lock")]),
                );
            }
            other => {
                // No such transaction: Python answers None.
                self.txn = other;
                self.reply(&msgid, Value::None);
            }
        }
    }

    async fn tpc_abort(
        &mut self,
        handle: &Arc<StorageHandle>,
        read_only: bool,
        msgid: Value,
        id: Value,
    ) {
        if read_only {
            self.reply_error(&msgid, &StorageError::ReadOnly);
            return;
        }
        let matches = match &mut self.txn {
            TxnState::Begun(open) | TxnState::Voted { open, .. } => open.id == id,
            TxnState::Voting {
                id: vid,
                abort_msgid,
                ..
            } if *vid == id => {
                *abort_msgid = Some(msgid);
                return;
            }
            _ => false,
        };
        if matches {
            Stats::incr(&handle.stats.aborts);
            self.abort_current(handle).await;
        }
        self.reply(&msgid, Value::None);
    }

    /// A client may start its next transaction as soon as it has the `tpc_finish` reply,
    /// which the finish task queues just before it ends: wait for that task here rather
    /// than mistaking the new `tpc_begin` for a second concurrent transaction.
    async fn settle_finish(&mut self) {
        if let TxnState::Finishing { handle } = &mut self.txn {
            let _ = handle.await;
            self.txn = TxnState::Idle;
        }
    }

    /// Drops the current transaction (buffered or voted) and releases the lock.
    async fn abort_current(&mut self, handle: &Arc<StorageHandle>) {
        // An unfinished blob upload belongs to the transaction: its file goes too.
        self.upload = None;
        match std::mem::replace(&mut self.txn, TxnState::Idle) {
            TxnState::Begun(_) => end_txn_stats(handle, false),
            TxnState::Voted { open, guard, .. } => {
                handle.storage.abort(open.txn.key).await;
                release_lock(handle, open.txn.key, guard);
                end_txn_stats(handle, false);
            }
            other => self.txn = other,
        }
    }

    /// `undoLog` / `undoInfo`: read in the background (a long log must not hold up the
    /// connection's other requests), as the stock server runs them in a thread.
    fn undo_log(
        &mut self,
        handle: &Arc<StorageHandle>,
        msgid: Value,
        first: i64,
        last: i64,
        spec: Option<Value>,
    ) {
        let filter = spec.and_then(undo_filter);
        let storage = handle.storage.clone();
        self.spawn_call(msgid, async move {
            match storage.undo_log(first, last, filter).await {
                Ok(entries) => Ok(Value::List(entries.iter().map(undo_dict).collect())),
                // Python answers an empty log for storages without undo.
                Err(StorageError::Unsupported(_)) => Ok(Value::Tuple(vec![])),
                Err(e) => Err(e),
            }
        });
    }

    fn iterator_start(
        &mut self,
        handle: &Arc<StorageHandle>,
        msgid: Value,
        start: Option<Tid>,
        stop: Option<Tid>,
    ) {
        let storage = handle.storage.clone();
        let iterators = self.iterators.clone();
        let iid = iterators.lock().next_id();
        self.spawn_call(msgid, async move {
            let it = storage.iterator(start, stop).await?;
            iterators.lock().slots.insert(
                iid,
                IterSlot::Txn(Arc::new(tokio::sync::Mutex::new(TxnSlot {
                    it,
                    last: None,
                }))),
            );
            Ok(Value::Int(iid))
        });
    }

    fn iterator_next(&mut self, msgid: Value, iid: i64) {
        let slot = match self.iterators.lock().slots.get(&iid) {
            Some(IterSlot::Txn(t)) => t.clone(),
            _ => return self.reply_key_error(&msgid, iid),
        };
        let iterators = self.iterators.clone();
        self.spawn_call(msgid, async move {
            let mut slot = slot.lock().await;
            match slot.it.next_transaction().await {
                Ok(Some(t)) => {
                    slot.last = Some(t.tid);
                    Ok(Value::Tuple(vec![
                        Value::from(t.tid),
                        Value::Str(String::from_utf8_lossy(&[t.status]).into_owned()),
                        Value::Bytes(Bytes::from(t.user)),
                        Value::Bytes(Bytes::from(t.description)),
                        Value::Dict(zeo_proto::extension_from_bytes(&t.extension)),
                    ]))
                }
                Ok(None) => {
                    // Exhausted: the server forgets it (the client knows).
                    iterators.lock().slots.remove(&iid);
                    Ok(Value::None)
                }
                Err(e) => Err(e),
            }
        });
    }

    fn iterator_record_start(&mut self, msgid: Value, txn_iid: i64, tid: Tid) {
        let (slot, riid) = {
            let mut its = self.iterators.lock();
            match its.slots.get(&txn_iid) {
                Some(IterSlot::Txn(t)) => (t.clone(), its.next_id()),
                _ => return self.reply_key_error(&msgid, txn_iid),
            }
        };
        let iterators = self.iterators.clone();
        let outbox = self.outbox.clone();
        self.pending.push(Box::pin(async move {
            let slot = slot.lock().await;
            let reply = match slot.last {
                Some(last) if last == tid => slot.it.records().map(|records| {
                    iterators.lock().slots.insert(
                        riid,
                        IterSlot::Records(Arc::new(tokio::sync::Mutex::new(records))),
                    );
                    Value::Int(riid)
                }),
                Some(_) => {
                    let text = format!(
                        "Out-of-order request for record iterator for transaction {:?}",
                        Value::from(tid)
                    );
                    send_exception(&outbox, &msgid, "builtins.Exception", text);
                    return;
                }
                None => {
                    send_exception(&outbox, &msgid, "builtins.KeyError", txn_iid.to_string());
                    return;
                }
            };
            match reply {
                Ok(v) => outbox.send(message::reply_frame(outbox.encoding, &msgid, v)),
                Err(e) => send_error(&outbox, &msgid, &e),
            }
        }));
    }

    fn iterator_record_next(&mut self, msgid: Value, riid: i64) {
        let slot = match self.iterators.lock().slots.get(&riid) {
            Some(IterSlot::Records(r)) => r.clone(),
            _ => return self.reply_key_error(&msgid, riid),
        };
        let iterators = self.iterators.clone();
        self.spawn_call(msgid, async move {
            let mut records = slot.lock().await;
            match records.next_record().await? {
                Some(r) => Ok(Value::Tuple(vec![
                    Value::from(r.oid),
                    Value::from(r.tid),
                    r.data.map(Value::Bytes).unwrap_or(Value::None),
                    r.data_txn.map(Value::from).unwrap_or(Value::None),
                ])),
                None => {
                    iterators.lock().slots.remove(&riid);
                    Ok(Value::None)
                }
            }
        });
    }

    /// `pack(t, wait)`: runs as its own task, so it completes (and tells every client the
    /// new size) even if this client goes away; `wait` decides whether the reply waits.
    /// Allowed on read-only connections, as in ZEO.
    fn pack(
        &mut self,
        handle: &Arc<StorageHandle>,
        msgid: Value,
        time: f64,
        wait: bool,
        oneway: bool,
    ) {
        let h = handle.clone();
        let task = tokio::spawn(async move {
            info!(storage = %h.name, time, "pack started");
            let result = h.storage.pack(time).await;
            match &result {
                Ok(()) => {
                    info!(storage = %h.name, "pack finished");
                    let info = h.storage.info();
                    h.hub.broadcast(
                        "info",
                        vec![Value::dict([
                            ("length", Value::Int(info.length as i64)),
                            ("size", Value::Int(info.size as i64)),
                        ])],
                    );
                }
                Err(e) => warn!(storage = %h.name, error = %e, "pack failed"),
            }
            result
        });
        if oneway {
            return;
        }
        if !wait {
            self.reply(&msgid, Value::None);
            return;
        }
        self.spawn_call(msgid, async move {
            match task.await {
                Ok(result) => result.map(|()| Value::None),
                Err(e) => Err(StorageError::Io(std::io::Error::other(format!(
                    "pack task failed: {e}"
                )))),
            }
        });
    }

    fn reply_key_error(&self, msgid: &Value, key: i64) {
        send_exception(&self.outbox, msgid, "builtins.KeyError", key.to_string());
    }

    fn spawn_call<F>(&mut self, msgid: Value, fut: F)
    where
        F: Future<Output = zodb::Result<Value>> + Send + 'static,
    {
        let outbox = self.outbox.clone();
        self.pending.push(Box::pin(async move {
            match fut.await {
                Ok(v) => outbox.send(message::reply_frame(outbox.encoding, &msgid, v)),
                Err(e) => send_error(&outbox, &msgid, &e),
            }
        }));
    }

    fn reply(&self, msgid: &Value, v: Value) {
        self.outbox
            .send(message::reply_frame(self.encoding, msgid, v));
    }

    fn reply_error(&self, msgid: &Value, e: &StorageError) {
        send_error(&self.outbox, msgid, e);
    }

    fn reply_exception(&self, msgid: &Value, class: &str, payload: Value) {
        self.outbox.send(message::exception_frame(
            self.encoding,
            msgid,
            class,
            payload,
        ));
    }
}

use crate::stats::Stats;

fn release_lock(handle: &StorageHandle, key: TxnKey, guard: OwnedMutexGuard<()>) {
    *handle.stats.lock_time.lock() = None;
    handle.hub.end_commit(key);
    drop(guard);
}

fn end_txn_stats(handle: &StorageHandle, aborted: bool) {
    handle.stats.active_txns.fetch_sub(1, Ordering::Relaxed);
    if aborted {
        Stats::incr(&handle.stats.aborts);
    }
}

fn send_error(outbox: &Outbox, msgid: &Value, e: &StorageError) {
    if e.is_expected() {
        debug!(error = %e, "error reply");
    } else {
        warn!(error = %e, "error reply");
    }
    let (class, payload) = exception::exception_for(e);
    outbox.send(message::exception_frame(
        outbox.encoding,
        msgid,
        &class,
        payload,
    ));
}

fn send_exception(outbox: &Outbox, msgid: &Value, class: &str, arg: String) {
    outbox.send(message::exception_frame(
        outbox.encoding,
        msgid,
        class,
        Value::Tuple(vec![Value::Str(arg)]),
    ));
}

/// A connection's iterators. Ids come from one counter per connection, as in ZEO.
#[derive(Default)]
struct Iterators {
    next: i64,
    slots: std::collections::HashMap<i64, IterSlot>,
}

impl Iterators {
    fn next_id(&mut self) -> i64 {
        let id = self.next;
        self.next += 1;
        id
    }
}

/// A transaction iterator and the tid it last returned (record iterators start from it).
struct TxnSlot {
    it: Box<dyn zodb::TransactionIterator>,
    last: Option<Tid>,
}

/// The async mutexes serialise the (sequential) calls a client makes on one iterator
/// while letting them run as background requests.
enum IterSlot {
    Txn(Arc<tokio::sync::Mutex<TxnSlot>>),
    Records(Arc<tokio::sync::Mutex<Box<dyn zodb::RecordIterator>>>),
}

/// The dict `undoLog` returns for one transaction, keys in Python's order, the
/// extension's keys merged in last.
fn undo_dict(e: &zodb::UndoEntry) -> Value {
    let mut items = vec![
        (Value::str("id"), Value::Bytes(Bytes::from(e.id()))),
        (
            Value::str("time"),
            Value::Float(zodb::timestamp::tid_to_unix(e.tid)),
        ),
        (
            Value::str("user_name"),
            Value::Bytes(Bytes::from(e.user.clone())),
        ),
        (Value::str("size"), Value::Int(e.size as i64)),
        (
            Value::str("description"),
            Value::Bytes(Bytes::from(e.description.clone())),
        ),
    ];
    for (k, v) in zeo_proto::extension_from_bytes(&e.extension) {
        match items.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => items.push((k, v)),
        }
    }
    Value::Dict(items)
}

/// `undoInfo`'s specification as a filter: a transaction passes when, for every key of
/// the spec, its undo dict has an equal value (`desc.get(k) == v`). `None` and an empty
/// dict select everything.
///
/// A `ZopeUndo.Prefix` value (Zope's undo screen) matches the path prefix of a text
/// value. Python 3 ZODB stores user and description as bytes and `Prefix` then raises
/// `TypeError`; here bytes are read as UTF-8 so that the filter works as Zope intends.
fn undo_filter(spec: Value) -> Option<zodb::UndoFilter> {
    let items = match spec {
        Value::Dict(items) if !items.is_empty() => items,
        _ => return None,
    };
    Some(Box::new(move |entry: &zodb::UndoEntry| {
        let desc = undo_dict(entry);
        let Value::Dict(desc) = desc else {
            return false;
        };
        items.iter().all(|(k, v)| {
            let found = desc.iter().find(|(dk, _)| py_eq(dk, k)).map(|(_, dv)| dv);
            match v {
                Value::Object {
                    module,
                    name,
                    state,
                } if module == "ZopeUndo.Prefix" && name == "Prefix" => {
                    let text = match found {
                        Some(Value::Str(s)) => s.clone(),
                        Some(Value::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
                        _ => return false,
                    };
                    prefix_matches(state, &text)
                }
                _ => py_eq(found.unwrap_or(&Value::None), v),
            }
        })
    }))
}

/// `ZopeUndo.Prefix.__eq__`: the leading path segments of `other` (its last segment cut
/// at the last space, which separates a logged user name) equal the prefix's path.
fn prefix_matches(state: &Value, other: &str) -> bool {
    let path: Vec<&str> = match state.get("path").and_then(Value::as_seq) {
        Some(p) => p.iter().filter_map(Value::as_str).collect(),
        None => return false,
    };
    let length = state
        .get("length")
        .and_then(Value::as_int)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(path.len());
    let mut segments: Vec<&str> = other.split('/').collect();
    if let Some(last) = segments.last_mut() {
        if let Some(i) = last.rfind(' ') {
            *last = &last[..i];
        }
    }
    segments.truncate(length);
    segments == path
}

/// Python's `==` for the values an undo dict and a spec hold.
fn py_eq(a: &Value, b: &Value) -> bool {
    fn num(v: &Value) -> Option<f64> {
        match v {
            Value::Int(i) => Some(*i as f64),
            Value::Bool(b) => Some(*b as i64 as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => x == y,
        (Value::Tuple(x), Value::Tuple(y))
        | (Value::List(x), Value::List(y))
        | (Value::Set(x), Value::Set(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        (Value::Dict(x), Value::Dict(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, v)| {
                    y.iter()
                        .find(|(k2, _)| py_eq(k, k2))
                        .is_some_and(|(_, v2)| py_eq(v, v2))
                })
        }
        _ => match (num(a), num(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

/// How long a load may keep being overtaken by invalidations before it gives up. Each
/// retry sees a newer snapshot unless the storage is behind what the hub already sent (a
/// proxy between telling its clients of a transaction and publishing it: microseconds),
/// so reaching this means the two disagree for good, and the client gets an error rather
/// than a server thread spinning.
const LOAD_RETRY_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `loadBefore`, retried if an invalidation overtook it (see [`Outbox::send_load_reply`]).
async fn load_before(
    handle: Arc<StorageHandle>,
    outbox: Arc<Outbox>,
    msgid: Value,
    oid: zodb::Oid,
    before: Tid,
) {
    let mut retries = 0u32;
    let started = std::time::Instant::now();
    loop {
        if retries > 0 {
            // Never spin: let the task that publishes the newer state (and every other
            // connection on this thread) run first.
            if retries < 64 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            if started.elapsed() > LOAD_RETRY_LIMIT {
                tracing::error!(%oid, snapshot_behind = true, "load overtaken by invalidations for 10 s: the storage is behind the invalidations sent; failing the load");
                let e = zodb::StorageError::Transaction(format!(
                    "the storage's state stays older than the invalidations sent to this client (oid {oid})"
                ));
                send_error(&outbox, &msgid, &e);
                return;
            }
        }
        retries += 1;
        match handle.storage.load_before(oid, before).await {
            Ok(lb) => {
                let (value, current) = match lb.revision {
                    Some(rev) => (
                        Value::Tuple(vec![
                            Value::Bytes(rev.data),
                            Value::from(rev.start),
                            rev.end.map(Value::from).unwrap_or(Value::None),
                        ]),
                        rev.end.is_none(),
                    ),
                    None => (Value::None, false),
                };
                let f = message::reply_frame(outbox.encoding, &msgid, value);
                if !current {
                    outbox.send(f);
                    return;
                }
                if outbox.send_load_reply(f, lb.snapshot).is_ok() {
                    return;
                }
            }
            Err(e) => {
                send_error(&outbox, &msgid, &e);
                return;
            }
        }
    }
}

fn invalidations_value(answer: Option<(Tid, Vec<zodb::Oid>)>) -> Value {
    match answer {
        Some((tid, oids)) => Value::Tuple(vec![
            Value::from(tid),
            Value::List(oids.into_iter().map(Value::from).collect()),
        ]),
        None => Value::None,
    }
}

fn info_dict(handle: &StorageHandle) -> Value {
    let info = handle.storage.info();
    let mut interfaces: Vec<Value> = info
        .interfaces
        .iter()
        .map(|(m, n)| Value::Tuple(vec![Value::str(*m), Value::str(*n)]))
        .collect();
    interfaces.push(Value::Tuple(vec![
        Value::str("zope.interface"),
        Value::str("Interface"),
    ]));
    Value::dict([
        ("length", Value::Int(info.length as i64)),
        ("size", Value::Int(info.size as i64)),
        ("name", Value::Str(info.name)),
        ("supportsUndo", Value::Bool(info.supports_undo)),
        (
            "supports_record_iternext",
            Value::Bool(info.supports_record_iternext),
        ),
        ("interfaces", Value::Tuple(interfaces)),
        // Our extensions, for zeors clients (proxies); stock clients ignore unknown keys.
        (
            "zeors_extensions",
            Value::Tuple(vec![Value::str("changed_since")]),
        ),
    ])
}

fn history_dict(h: &zodb::HistoryEntry) -> Value {
    let mut items = vec![
        (
            Value::str("time"),
            Value::Float(zodb::timestamp::tid_to_unix(h.tid)),
        ),
        (Value::str("tid"), Value::from(h.tid)),
        (Value::str("serial"), Value::from(h.tid)),
        (
            Value::str("user_name"),
            Value::Bytes(Bytes::from(h.user.clone())),
        ),
        (
            Value::str("description"),
            Value::Bytes(Bytes::from(h.description.clone())),
        ),
        (Value::str("size"), Value::Int(h.size as i64)),
    ];
    items.extend(zeo_proto::extension_from_bytes(&h.extension));
    Value::Dict(items)
}

fn server_status(handle: &StorageHandle, shared: &Shared) -> Value {
    handle.stats.status(
        handle.hub.connections(),
        format!("{:016x}", handle.hub.last_tid().0),
        shared.config.transaction_timeout.is_some(),
    )
}

/// Reads one frame during the handshake.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<Option<Bytes>> {
    loop {
        match frame::decode_frame(buf, max) {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Writes queued frames, coalescing small ones into one write.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    outbox: Weak<Outbox>,
    metrics: Arc<crate::metrics::ServerMetrics>,
) {
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut n = first.len();
        let result = if first.len() >= DIRECT_WRITE {
            wr.write_all(&first).await
        } else {
            batch.extend_from_slice(&first);
            while batch.len() < 256 * 1024 {
                match rx.try_recv() {
                    Ok(f) if f.len() < DIRECT_WRITE => {
                        n += f.len();
                        batch.extend_from_slice(&f);
                    }
                    Ok(f) => {
                        n += f.len();
                        if let Err(e) = wr.write_all(&batch).await {
                            batch.clear();
                            report_write_failure(&outbox, e);
                            return;
                        }
                        batch.clear();
                        batch.extend_from_slice(&f);
                    }
                    Err(_) => break,
                }
            }
            let r = wr.write_all(&batch).await;
            batch.clear();
            r
        };
        if let Err(e) = result {
            report_write_failure(&outbox, e);
            return;
        }
        metrics.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(o) = outbox.upgrade() {
            o.written(n);
        }
    }
    let _ = wr.shutdown().await;
}

fn report_write_failure(outbox: &Weak<Outbox>, e: std::io::Error) {
    debug!(error = %e, "write failed");
    if let Some(o) = outbox.upgrade() {
        o.close();
    }
}
