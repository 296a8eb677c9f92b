//! A connection's transaction and record iterators (`iterator_start`, `iterator_next`,
//! `iterator_record_start`, `iterator_record_next`, `iterator_gc`), as ZEO 5 serves them:
//! ids from one counter per connection, an iterator forgotten once exhausted.

use super::{send_error, send_protocol_error, Session};
use crate::StorageHandle;
use std::sync::Arc;
use zeo_proto::exception::ProtocolError;
use zeo_proto::{message, Reply, Value};
use zodb::Tid;

/// A connection's iterators. Ids come from one counter per connection, as in ZEO.
#[derive(Default)]
pub(super) struct Iterators {
    next: i64,
    slots: std::collections::HashMap<i64, IterSlot>,
}

impl Iterators {
    pub(super) fn next_id(&mut self) -> i64 {
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
                    iterators.lock().slots.remove(&iid);
                    Ok(Value::None)
                }
                Err(e) => Err(e),
            }
        });
    }

    pub(super) fn iterator_record_start(&mut self, msgid: Value, txn_iid: i64, tid: Tid) {
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
                Some(last) if last == tid => slot.it.records().await.map(|records| {
                    iterators.lock().slots.insert(
                        riid,
                        IterSlot::Records(Arc::new(tokio::sync::Mutex::new(records))),
                    );
                    Value::Int(riid)
                }),
                Some(_) => {
                    let e = ProtocolError::OutOfOrderRecordIterator(Value::from(tid));
                    send_protocol_error(&outbox, &msgid, &e);
                    return;
                }
                None => {
                    send_protocol_error(&outbox, &msgid, &ProtocolError::UnknownIterator(txn_iid));
                    return;
                }
            };
            match reply {
                Ok(v) => outbox.send(message::reply_frame(outbox.encoding, &msgid, v)),
                Err(e) => send_error(&outbox, &msgid, &e),
            }
        }));
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
                    iterators.lock().slots.remove(&riid);
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
            its.slots.remove(&iid);
        }
    }
}
