//! Iteration through the proxy: `iterator` / `record_iternext`, passed through to
//! upstream's iterator calls.
//!
//! Invariants:
//! - **A snapshot.** An iterator made by the proxy stops at the proxy's last applied tid
//!   when it was made (`stop` is lowered to it): it sees the storage as the proxy's
//!   clients did at that moment, as a FileStorage iterator sees its file when made, never
//!   an upstream transaction the proxy has not applied yet.
//! - **Bounded memory.** One transaction or record is held at a time; each step is one
//!   upstream call.
//! - **Surviving a reconnect.** Upstream forgets a connection's iterators when the link
//!   drops. The history an iterator walks does not change (its bounds are fixed), so after
//!   a reconnect it is reopened where it was: the transaction iterator from the tid after
//!   the last one it returned, a record iterator at its transaction, skipping the records
//!   already returned. A downstream client therefore sees an uninterrupted iteration (or,
//!   while upstream is away, an error for that one call, after which it may go on).
//! - **No leak upstream.** An upstream iterator not run to its end is released with
//!   `iterator_gc` when the proxy's iterator is dropped (the downstream client's
//!   `iterator_gc`, exhaustion, or its disconnect).

use super::Inner;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use zeo_client::{ClientError, Connection};
use zeo_proto::Request;
use zodb::{
    CurrentRecord, DataRecord, Oid, RecordIterator, StorageError, Tid, TransactionInfo,
    TransactionIterator,
};

/// How many times a step is retried on a fresh connection after the link dropped under it.
const RECONNECT_ATTEMPTS: usize = 2;

/// An upstream iterator id on one connection.
struct Open {
    conn: Connection,
    iid: i64,
}

impl Open {
    /// Usable: the connection it belongs to is still the live one.
    fn alive(&self) -> bool {
        self.conn.is_connected()
    }

    fn release(self) {
        if self.conn.is_connected() {
            let _ = self.conn.send(&Request::IteratorGc {
                iids: vec![self.iid],
            });
        }
    }
}

/// Whether an error means the upstream connection went away (the step may be redone on a
/// new one), as opposed to an answer of upstream's.
fn is_link_error(e: &ClientError) -> bool {
    !matches!(e, ClientError::Remote(_) | ClientError::UnexpectedReply(_))
}

/// The proxy's transaction iterator over upstream's `[start, stop]`.
pub(super) struct UpstreamIterator {
    inner: Arc<Inner>,
    /// The next transaction wanted is the first with a tid at least this.
    from: Tid,
    /// The snapshot bound (inclusive).
    stop: Tid,
    open: Option<Open>,
    /// The transaction last returned, for [`TransactionIterator::records`].
    current: Option<Tid>,
    exhausted: bool,
}

impl Inner {
    /// An iterator over `[start, stop]` as of now, opened upstream at once (so that
    /// `iterator_start` fails, as direct, when upstream cannot iterate or is away).
    pub(super) async fn iterator(
        self: &Arc<Self>,
        start: Option<Tid>,
        stop: Option<Tid>,
    ) -> zodb::Result<UpstreamIterator> {
        let snapshot = self.last_tid();
        let stop = stop.map_or(snapshot, |s| s.min(snapshot));
        let from = start.unwrap_or(Tid::ZERO);
        let mut it = UpstreamIterator {
            inner: self.clone(),
            from,
            stop,
            open: None,
            current: None,
            exhausted: from > stop,
        };
        if !it.exhausted {
            it.open().await?;
        }
        Ok(it)
    }

    /// `record_iternext`, from upstream.
    pub(super) async fn record_iternext(&self, next: Option<Oid>) -> zodb::Result<CurrentRecord> {
        let conn = self.link().await?;
        Ok(conn
            .request(&Request::RecordIternext {
                next: next.map(|o| Bytes::copy_from_slice(&o.to_bytes())),
            })
            .await?)
    }
}

impl UpstreamIterator {
    /// An upstream iterator positioned before `self.from`, on the live connection.
    async fn open(&mut self) -> zodb::Result<()> {
        if self.open.as_ref().is_some_and(Open::alive) {
            return Ok(());
        }
        if let Some(stale) = self.open.take() {
            stale.release();
        }
        let conn = self.inner.link().await?;
        let iid: i64 = conn
            .request(&Request::IteratorStart {
                start: Some(self.from),
                stop: Some(self.stop),
            })
            .await?;
        self.open = Some(Open { conn, iid });
        Ok(())
    }
}

#[async_trait]
impl TransactionIterator for UpstreamIterator {
    async fn next_transaction(&mut self) -> zodb::Result<Option<TransactionInfo>> {
        if self.exhausted {
            return Ok(None);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.open().await?;
            let open = self.open.as_ref().expect("opened above");
            let reply = open
                .conn
                .request::<Option<TransactionInfo>>(&Request::IteratorNext { iid: open.iid })
                .await;
            match reply {
                Ok(Some(t)) => {
                    self.current = Some(t.tid);
                    self.from = Tid(t.tid.0.saturating_add(1));
                    return Ok(Some(t));
                }
                Ok(None) => {
                    // Upstream forgets an exhausted iterator by itself.
                    self.open = None;
                    self.exhausted = true;
                    return Ok(None);
                }
                Err(e) if is_link_error(&e) && attempt < RECONNECT_ATTEMPTS => {
                    self.open = None;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn records(&self) -> zodb::Result<Box<dyn RecordIterator>> {
        let tid = self.current.ok_or_else(|| {
            StorageError::Value("no current transaction for a record iterator".into())
        })?;
        // Started upstream now, while upstream's iterator is at this transaction; if the
        // link is down, the record iterator opens its own when first used.
        let mut records = UpstreamRecords {
            inner: self.inner.clone(),
            tid,
            open: None,
            helper: None,
            returned: 0,
            done: false,
        };
        if let Some(open) = self.open.as_ref().filter(|o| o.alive()) {
            match open
                .conn
                .request::<i64>(&Request::IteratorRecordStart {
                    txn_iid: open.iid,
                    tid,
                })
                .await
            {
                Ok(riid) => {
                    records.open = Some(Open {
                        conn: open.conn.clone(),
                        iid: riid,
                    })
                }
                Err(e) if is_link_error(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Box::new(records))
    }
}

impl Drop for UpstreamIterator {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            open.release();
        }
    }
}

/// The records of transaction `tid`, from upstream.
struct UpstreamRecords {
    inner: Arc<Inner>,
    tid: Tid,
    open: Option<Open>,
    /// The transaction iterator a reopened record iterator was started from.
    helper: Option<Open>,
    /// Records already returned (skipped when reopened).
    returned: usize,
    done: bool,
}

impl UpstreamRecords {
    /// Opens a record iterator for `self.tid` on the live connection, positioned after
    /// the records already returned.
    async fn reopen(&mut self) -> zodb::Result<()> {
        for stale in [self.open.take(), self.helper.take()].into_iter().flatten() {
            stale.release();
        }
        let conn = self.inner.link().await?;
        let iid: i64 = conn
            .request(&Request::IteratorStart {
                start: Some(self.tid),
                stop: Some(self.tid),
            })
            .await?;
        let helper = Open {
            conn: conn.clone(),
            iid,
        };
        match conn
            .request::<Option<TransactionInfo>>(&Request::IteratorNext { iid })
            .await?
        {
            Some(t) if t.tid == self.tid => {}
            _ => {
                helper.release();
                return Err(StorageError::Transaction(format!(
                    "transaction {} is no longer in upstream's history (packed?)",
                    self.tid
                )));
            }
        }
        let riid: i64 = conn
            .request(&Request::IteratorRecordStart {
                txn_iid: iid,
                tid: self.tid,
            })
            .await?;
        self.helper = Some(helper);
        self.open = Some(Open { conn, iid: riid });
        for _ in 0..self.returned {
            let open = self.open.as_ref().expect("opened above");
            if open
                .conn
                .request::<Option<DataRecord>>(&Request::IteratorRecordNext { riid: open.iid })
                .await?
                .is_none()
            {
                self.open = None;
                self.done = true;
                break;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl RecordIterator for UpstreamRecords {
    async fn next_record(&mut self) -> zodb::Result<Option<DataRecord>> {
        if self.done {
            return Ok(None);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            if !self.open.as_ref().is_some_and(Open::alive) {
                self.reopen().await?;
                if self.done {
                    return Ok(None);
                }
            }
            let open = self.open.as_ref().expect("opened above");
            match open
                .conn
                .request::<Option<DataRecord>>(&Request::IteratorRecordNext { riid: open.iid })
                .await
            {
                Ok(Some(r)) => {
                    self.returned += 1;
                    return Ok(Some(r));
                }
                Ok(None) => {
                    self.open = None;
                    self.done = true;
                    if let Some(h) = self.helper.take() {
                        h.release();
                    }
                    return Ok(None);
                }
                Err(e) if is_link_error(&e) && attempt < RECONNECT_ATTEMPTS => {
                    self.open = None;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for UpstreamRecords {
    fn drop(&mut self) {
        for open in [self.open.take(), self.helper.take()].into_iter().flatten() {
            open.release();
        }
    }
}
