//! A connection's transaction and record iterators (`iterator_start`, `iterator_next`,
//! `iterator_record_start`, `iterator_record_next`, `iterator_gc`), as ZEO 5 serves them:
//! ids from one counter per connection, an iterator forgotten once exhausted.
//!
//! A connection may have at most `max_iterators` open (counting those being opened): each
//! holds a view of the storage, and ZEO clients only tell the server to forget abandoned
//! ones at their next transaction's end. More are refused with a `StorageError` naming
//! the limit.

use super::{send_error, send_protocol_error, Session};
use crate::metrics::ServerMetrics;
use crate::StorageHandle;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use zeo_proto::exception::ProtocolError;
use zeo_proto::{message, Reply, Value};
use zodb::{StorageError, Tid};

/// A connection's iterators. Ids come from one counter per connection, as in ZEO.
pub(super) struct Iterators {
    next: i64,
    slots: std::collections::HashMap<i64, IterSlot>,
    /// Ids handed out whose iterator is still being opened.
    opening: usize,
    max: usize,
    /// Keeps the server-wide gauge of open iterators.
    metrics: Arc<ServerMetrics>,
}

impl Iterators {
    pub(super) fn new(max: usize, metrics: Arc<ServerMetrics>) -> Iterators {
        Iterators {
            next: 0,
            slots: Default::default(),
            opening: 0,
            max,
            metrics,
        }
    }

    /// An id for an iterator about to be opened, unless the connection has as many
    /// open as it may.
    fn reserve(&mut self) -> Result<i64, StorageError> {
        if self.slots.len() + self.opening >= self.max {
            self.metrics
                .iterators_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(StorageError::Limit(format!(
                "too many open iterators on this connection (max-iterators is {}); \
                 exhaust them or let them be garbage-collected",
                self.max
            )));
        }
        self.opening += 1;
        self.metrics.iterators_open.fetch_add(1, Ordering::Relaxed);
        let id = self.next;
        self.next += 1;
        Ok(id)
    }

    /// The iterator reserved as `iid` is open.
    fn opened(&mut self, iid: i64, slot: IterSlot) {
        self.opening -= 1;
        self.slots.insert(iid, slot);
    }

    /// The iterator reserved could not be opened.
    fn failed(&mut self) {
        self.opening -= 1;
        self.metrics.iterators_open.fetch_sub(1, Ordering::Relaxed);
    }

    fn remove(&mut self, iid: i64) {
        if self.slots.remove(&iid).is_some() {
            self.metrics.iterators_open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Iterators {
    fn drop(&mut self) {
        let n = (self.slots.len() + self.opening) as u64;
        self.metrics.iterators_open.fetch_sub(n, Ordering::Relaxed);
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

impl Session {
    pub(super) fn iterator_start(
        &mut self,
        handle: &Arc<StorageHandle>,
        msgid: Value,
        start: Option<Tid>,
        stop: Option<Tid>,
    ) {
        let storage = handle.storage.clone();
        let iterators = self.iterators.clone();
        let reserved = iterators.lock().reserve();
        let iid = match reserved {
            Ok(iid) => iid,
            Err(e) => return self.reply_error(&msgid, &e),
        };
        self.spawn_call(msgid, async move {
            let it = match storage.iterator(start, stop).await {
                Ok(it) => it,
                Err(e) => {
                    iterators.lock().failed();
                    return Err(e);
                }
            };
            iterators.lock().opened(
                iid,
                IterSlot::Txn(Arc::new(tokio::sync::Mutex::new(TxnSlot {
                    it,
                    last: None,
                }))),
            );
            Ok(iid.to_value())
        });
    }

    pub(super) fn iterator_next(&mut self, msgid: Value, iid: i64) {
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
                    Ok(Some(t).to_value())
                }
                Ok(None) => {
                    // Exhausted: the server forgets it (the client knows).
                    iterators.lock().remove(iid);
                    Ok(Value::None)
                }
                Err(e) => Err(e),
            }
        });
    }

    pub(super) fn iterator_record_start(&mut self, msgid: Value, txn_iid: i64, tid: Tid) {
        let (slot, riid) = {
            let mut its = self.iterators.lock();
            let slot = match its.slots.get(&txn_iid) {
                Some(IterSlot::Txn(t)) => t.clone(),
                _ => {
                    drop(its);
                    return self.reply_key_error(&msgid, txn_iid);
                }
            };
            match its.reserve() {
                Ok(riid) => (slot, riid),
                Err(e) => {
                    drop(its);
                    return self.reply_error(&msgid, &e);
                }
            }
        };
        let iterators = self.iterators.clone();
        let outbox = self.outbox.clone();
        self.push_request(async move {
            let slot = slot.lock().await;
            let reply = match slot.last {
                Some(last) if last == tid => match slot.it.records().await {
                    Ok(records) => {
                        iterators.lock().opened(
                            riid,
                            IterSlot::Records(Arc::new(tokio::sync::Mutex::new(records))),
                        );
                        Ok(Value::Int(riid))
                    }
                    Err(e) => {
                        iterators.lock().failed();
                        Err(e)
                    }
                },
                Some(_) => {
                    iterators.lock().failed();
                    let e = ProtocolError::OutOfOrderRecordIterator(Value::from(tid));
                    send_protocol_error(&outbox, &msgid, &e);
                    return;
                }
                None => {
                    iterators.lock().failed();
                    send_protocol_error(&outbox, &msgid, &ProtocolError::UnknownIterator(txn_iid));
                    return;
                }
            };
            match reply {
                Ok(v) => outbox.send(message::reply_frame(outbox.encoding, &msgid, v)),
                Err(e) => send_error(&outbox, &msgid, &e),
            }
        });
    }

    pub(super) fn iterator_record_next(&mut self, msgid: Value, riid: i64) {
        let slot = match self.iterators.lock().slots.get(&riid) {
            Some(IterSlot::Records(r)) => r.clone(),
            _ => return self.reply_key_error(&msgid, riid),
        };
        let iterators = self.iterators.clone();
        self.spawn_call(msgid, async move {
            let mut records = slot.lock().await;
            match records.next_record().await? {
                Some(r) => Ok(Some(r).to_value()),
                None => {
                    iterators.lock().remove(riid);
                    Ok(Value::None)
                }
            }
        });
    }

    pub(super) fn reply_key_error(&self, msgid: &Value, key: i64) {
        send_protocol_error(&self.outbox, msgid, &ProtocolError::UnknownIterator(key));
    }

    /// `iterator_gc(iids)`: forgets those iterators.
    pub(super) fn iterator_gc(&mut self, iids: Vec<i64>) {
        let mut its = self.iterators.lock();
        for iid in iids {
            its.remove(iid);
        }
    }
}
