//! Running one request: decoding, the checks every request passes (registered, not
//! read-only), then the storage call, answered inline or as a future of the session.

use super::txn_core::Event as TxnEvent;
use super::{send_error, Close, Registered, Session};
use crate::outbox::Outbox;
use crate::stats::Stats;
use crate::{Shared, StorageHandle};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{debug, info, warn};
use zeo_proto::exception::ProtocolError;
use zeo_proto::reply::{CurrentRecords, History, Info, Invalidations, NewOids, SizeInfo};
use zeo_proto::request::{Request, RequestError};
use zeo_proto::{message, Callback, Message, Reply, Value};
use zodb::{StorageError, Tid, TransactionMeta, TxnOp};

impl Session {
    pub(super) async fn handle_frame(&mut self, payload: &[u8]) -> Result<(), Close> {
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
                self.reply_protocol_error(&msg.msgid, &ProtocolError::BadArguments(e.to_string()));
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
        if request.is_transactional() {
            return self.transactional(&handle, read_only, msgid, request).await;
        }
        match request {
            Request::Register { .. } => {
                warn!(session = self.id, peer = %self.peer, "duplicate register, closing");
                return Err(Close::Protocol("duplicate register".into()));
            }
            Request::GetInfo => self.reply(&msgid, info(&handle, !self.encrypted).to_value()),
            Request::LastTransaction => self.reply(&msgid, handle.hub.last_tid().to_value()),
            Request::Ping => self.reply(&msgid, Value::None),
            Request::SetClientLabel { label } => self.label = label,
            Request::ServerStatus => self.reply(&msgid, server_status(&handle, &self.shared)),
            Request::NewOid => {
                self.reply_protocol_error(&msgid, &ProtocolError::NoSuchAttribute("new_oid"))
            }
            Request::GetInvalidations { tid } => match handle.hub.invalidations_since(tid) {
                Some(answer) => self.reply(&msgid, Invalidations(Some(answer)).to_value()),
                None => {
                    let storage = handle.storage.clone();
                    self.spawn_call(msgid, async move {
                        Ok(Invalidations(storage.invalidations_since(tid).await?).to_value())
                    });
                }
            },
            Request::ChangedSince { tid } => {
                let storage = handle.storage.clone();
                self.spawn_call(msgid, async move {
                    Ok(Invalidations(storage.invalidations_since(tid).await?).to_value())
                });
            }
            Request::NewOids { count } => {
                if read_only {
                    self.reply_error(&msgid, &StorageError::ReadOnly);
                } else {
                    let storage = handle.storage.clone();
                    self.spawn_call(msgid, async move {
                        Ok(NewOids(storage.new_oids(count).await?).to_value())
                    });
                }
            }
            Request::LoadBefore { oid, before } => {
                Stats::incr(&handle.stats.loads);
                let outbox = self.outbox.clone();
                self.push_request(load_before(handle, outbox, msgid, oid, before));
            }
            Request::LoadSerial { oid, serial } => {
                Stats::incr(&handle.stats.loads);
                let storage = handle.storage.clone();
                self.spawn_call(msgid, async move {
                    Ok(storage.load_serial(oid, serial).await?.to_value())
                });
            }
            Request::GetTid { oid } => {
                let storage = handle.storage.clone();
                self.spawn_call(msgid, async move {
                    match storage.load_before(oid, Tid::MAX).await?.revision {
                        Some(rev) => Ok(rev.start.to_value()),
                        None => Err(StorageError::PosKey(oid)),
                    }
                });
            }
            Request::History { oid, size } => {
                let storage = handle.storage.clone();
                self.spawn_call(msgid, async move {
                    // As Python's FileStorage: the object is looked up first.
                    let Some(oid) = oid else {
                        return Err(StorageError::Remote {
                            class_path: "ZODB.POSException.POSKeyError".into(),
                            message: "None".into(),
                        });
                    };
                    let Some(size) = size else {
                        storage.history(oid, 1).await?;
                        return Err(StorageError::Remote {
                            class_path: "builtins.TypeError".into(),
                            message: "'>=' not supported between instances of 'int' and 'NoneType'"
                                .into(),
                        });
                    };
                    Ok(History(storage.history(oid, size).await?).to_value())
                });
            }
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
                self.iterator_gc(iids);
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
                    Ok(storage.record_iternext(next).await?.to_value())
                });
            }
            Request::Compress { method } => {
                // The client compresses from the byte after this request: refusing cannot
                // leave the stream readable, so anything but a first "zstd" ends it.
                if self.encrypted {
                    warn!(session = self.id, peer = %self.peer, "compression asked for over TLS, closing");
                    return Err(Close::Protocol(
                        "zeors_compress is refused over TLS (compressing before encrypting leaks the stream's contents)".into(),
                    ));
                }
                if method != zeo_proto::compress::ZSTD || self.inflate.is_some() {
                    warn!(session = self.id, peer = %self.peer, %method, "unsupported compression request, closing");
                    return Err(Close::Protocol(format!(
                        "zeors_compress({method:?}) is not supported here"
                    )));
                }
                debug!(session = self.id, peer = %self.peer, "compressing the connection (zstd)");
                self.outbox.send_then_compress(message::reply_frame(
                    self.encoding,
                    &msgid,
                    Value::None,
                ));
                self.inflate_from_here = true;
            }
            Request::CurrentRecords {
                first,
                end,
                max_bytes,
            } => {
                let storage = handle.storage.clone();
                self.spawn_call(msgid, async move {
                    Ok(current_records(&*storage, first, end, max_bytes)
                        .await?
                        .to_value())
                });
            }
            Request::Pack { time, wait } => self.pack(&handle, msgid, time, wait, oneway),
            Request::SendBlob { oid, serial } => {
                if oneway {
                    return Err(Close::Protocol("sendBlob sent one-way".into()));
                }
                self.send_blob(&handle, msgid, oid, serial);
            }
            // Every transactional request went to `transactional` above.
            _ => {}
        }
        Ok(())
    }

    /// The requests that belong to a transaction: checked here (read-only connections),
    /// then run by the transaction's state machine.
    pub(super) async fn transactional(
        &mut self,
        handle: &Arc<StorageHandle>,
        read_only: bool,
        msgid: Value,
        request: Request,
    ) -> Result<(), Close> {
        let event = match request {
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
                let ctx = txn_ctx!(self, handle);
                self.txn.settle_finish(&ctx).await?;
                TxnEvent::Begin {
                    id: txn,
                    key: self.shared.next_txn.fetch_add(1, Ordering::Relaxed),
                    meta: TransactionMeta {
                        user: user.to_vec(),
                        description: description.to_vec(),
                        extension: zeo_proto::extension_to_bytes(&extension),
                        tid,
                        status,
                    },
                }
            }
            Request::Storea {
                oid,
                serial,
                data,
                txn,
            } => {
                Stats::incr(&handle.stats.stores);
                self.op(read_only, txn, "storea", TxnOp::Store { oid, serial, data })?
            }
            Request::CheckCurrentSerialInTransaction { oid, serial, txn } => self.op(
                read_only,
                txn,
                "checkCurrentSerialInTransaction",
                TxnOp::CheckCurrent { oid, serial },
            )?,
            Request::DeleteObject { oid, serial, txn } => self.op(
                read_only,
                txn,
                "deleteObject",
                TxnOp::Delete { oid, serial },
            )?,
            Request::Restorea {
                oid,
                serial,
                data,
                prev_txn,
                txn,
            } => {
                Stats::incr(&handle.stats.stores);
                self.op(
                    read_only,
                    txn,
                    "restorea",
                    TxnOp::Restore {
                        oid,
                        serial,
                        data,
                        prev_txn,
                    },
                )?
            }
            Request::Undoa {
                transaction_id,
                txn,
            } => self.op(
                read_only,
                txn,
                "undoa",
                TxnOp::Undo {
                    transaction_id: transaction_id.to_vec(),
                },
            )?,
            Request::Vote { txn } | Request::TpcFinish { txn } | Request::TpcAbort { txn }
                if read_only =>
            {
                let _ = txn;
                self.reply_error(&msgid, &StorageError::ReadOnly);
                return Ok(());
            }
            Request::Vote { txn } => TxnEvent::Vote { msgid, id: txn },
            Request::TpcFinish { txn } => TxnEvent::Finish { msgid, id: txn },
            Request::TpcAbort { txn } => {
                // An unfinished blob upload belongs to the transaction: its file goes too.
                self.upload = None;
                TxnEvent::Abort { msgid, id: txn }
            }
            Request::StoreBlobStart => return self.store_blob_start(handle, read_only).await,
            Request::StoreBlobChunk { chunk } => return self.store_blob_chunk(chunk).await,
            Request::StoreBlobEnd {
                oid,
                serial,
                data,
                txn,
            } => return self.store_blob_end(handle, oid, serial, data, txn).await,
            Request::StoreBlobShared {
                oid,
                serial,
                data,
                filename,
                txn,
            } => {
                return self
                    .store_blob_shared(handle, read_only, oid, serial, data, filename, txn)
                    .await
            }
            _ => return Ok(()),
        };
        let ctx = txn_ctx!(self, handle);
        self.txn.feed(&ctx, event).await
    }

    /// A buffered operation, refused on a read-only connection (closing it, as a failing
    /// one-way call does in ZEO: there is no way to report it).
    pub(super) fn op(
        &self,
        read_only: bool,
        id: Value,
        what: &'static str,
        op: TxnOp,
    ) -> Result<TxnEvent, Close> {
        if read_only {
            warn!(session = self.id, peer = %self.peer, "{what} on a read-only connection, closing");
            return Err(Close::Protocol("read-only".into()));
        }
        Ok(TxnEvent::Op { id, op, what })
    }

    pub(super) fn register(&mut self, msgid: &Value, storage: String, read_only: bool) {
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

    /// `pack(t, wait)`: runs as its own task, so it completes (and tells every client the
    /// new size) even if this client goes away; `wait` decides whether the reply waits.
    /// Allowed on read-only connections, as in ZEO.
    pub(super) fn pack(
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
                    h.hub.broadcast(&Callback::Info(SizeInfo {
                        length: info.length,
                        size: info.size,
                    }));
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
                let current = lb.revision.as_ref().is_some_and(|r| r.end.is_none());
                let f = message::reply_frame(outbox.encoding, &msgid, lb.revision.to_value());
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

/// The largest `zeors_current_records` reply, whatever the client asks for.
const CURRENT_RECORDS_MAX_BYTES: u64 = 8 << 20;

/// `zeors_current_records`: current records from `first` up to `end`, until about
/// `max_bytes` of data, walked with `record_iternext`. The snapshot is the storage's last
/// transaction read before the walk: the storage publishes a transaction's records
/// before its last tid, so every record returned is current as of the snapshot or later
/// (its serial then tells when). The reply is not held back for invalidations queued
/// meanwhile: the client takes the older of the snapshot and what its connection has
/// seen, and its cache refuses records an applied invalidation overtook.
async fn current_records(
    storage: &dyn zodb::Storage,
    first: zodb::Oid,
    end: Option<zodb::Oid>,
    max_bytes: u64,
) -> Result<CurrentRecords, StorageError> {
    let limit = max_bytes.clamp(1, CURRENT_RECORDS_MAX_BYTES);
    let snapshot = storage.last_transaction();
    let mut records = Vec::new();
    let mut bytes = 0u64;
    let mut cursor = Some(first);
    while let Some(at) = cursor {
        if end.is_some_and(|e| at >= e) || bytes >= limit {
            break;
        }
        match storage.record_iternext(Some(at)).await {
            Ok(r) if end.is_some_and(|e| r.oid >= e) => {
                cursor = Some(r.oid);
                break;
            }
            Ok(r) => {
                bytes += r.data.len() as u64;
                cursor = r.next;
                records.push((r.oid, r.tid, r.data));
            }
            // An object without current data (deleted, or undone creation): skip it.
            Err(StorageError::PosKey(oid)) if oid >= at => {
                cursor = oid.0.checked_add(1).map(zodb::Oid)
            }
            // No oid at or after `at`.
            Err(StorageError::Value(_)) => cursor = None,
            Err(e) => return Err(e),
        }
    }
    Ok(CurrentRecords {
        snapshot,
        records,
        next: cursor,
    })
}

/// `get_info`: the storage's figures and interfaces, and zeors' protocol extensions (zstd
/// only when `compress` is offered: not over TLS).
fn info(handle: &StorageHandle, compress: bool) -> Info {
    let info = handle.storage.info();
    let mut interfaces = info.interfaces;
    interfaces.push(("zope.interface".into(), "Interface".into()));
    Info {
        length: info.length,
        size: info.size,
        name: info.name,
        supports_undo: info.supports_undo,
        supports_record_iternext: info.supports_record_iternext,
        interfaces,
        // For zeors clients (proxies); stock clients ignore unknown keys.
        extensions: ["changed_since"]
            .into_iter()
            .chain(compress.then_some(zeo_proto::compress::ZSTD))
            .chain(info.supports_record_iternext.then_some("current_records"))
            .map(String::from)
            .collect(),
    }
}

pub(super) fn server_status(handle: &StorageHandle, shared: &Shared) -> Value {
    handle.stats.status(
        handle.hub.connections(),
        format!("{:016x}", handle.hub.last_tid().0),
        shared.config.transaction_timeout.is_some(),
    )
}
