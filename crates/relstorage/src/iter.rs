//! Iteration: over transactions and their records (`IStorageIteration`), and over the
//! current records oid by oid (`record_iternext`).
//!
//! Invariants:
//! - An iterator sees the database as announced when it was made: it never goes past the
//!   `visible` tid of that moment, so it agrees with what clients were told.
//! - Transactions are read in batches of [`BATCH`] and each transaction's records with one
//!   query: memory is bounded by the batch and by the largest transaction.
//! - A history-preserving database lists its `transaction` rows (tid 0, RelStorage's
//!   marker for "no previous revision", excepted), packed ones with status `p`; a
//!   history-free one lists the distinct tids still present in `object_state`, with empty
//!   metadata (RelStorage keeps none there).

use crate::db::{self, storage_error};
use crate::schema::Layout;
use crate::storage::Inner;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;
use zodb::{
    DataRecord, Oid, RecordIterator, Result, StorageError, Tid, TransactionInfo,
    TransactionIterator,
};

const BATCH: i64 = 100;

pub(crate) struct TxnIter {
    inner: Arc<Inner>,
    /// The next transaction to read is the first with tid >= `next`.
    next: Tid,
    stop: Tid,
    buffered: VecDeque<TransactionInfo>,
    done: bool,
    current: Option<Tid>,
}

impl TxnIter {
    pub(crate) fn new(inner: Arc<Inner>, start: Option<Tid>, stop: Option<Tid>) -> TxnIter {
        let visible = inner.cache.visible();
        let stop = stop.map_or(visible, |s| s.min(visible));
        TxnIter {
            inner,
            next: start.unwrap_or(Tid(1)).max(Tid(1)),
            stop,
            buffered: VecDeque::new(),
            done: false,
            current: None,
        }
    }

    async fn fill(&mut self) -> Result<()> {
        let conn = self.inner.pool.get().await.map_err(db::pool_error)?;
        let sql = match self.inner.layout {
            Layout::HistoryPreserving => {
                "SELECT tid, packed, username, description, extension FROM \"transaction\"
                 WHERE tid >= $1 AND tid <= $2 AND tid > 0 ORDER BY tid LIMIT $3"
            }
            Layout::HistoryFree => {
                "SELECT DISTINCT tid, false, ''::bytea, ''::bytea, ''::bytea FROM object_state
                 WHERE tid >= $1 AND tid <= $2 ORDER BY tid LIMIT $3"
            }
        };
        let stmt = conn.prepare_cached(sql).await.map_err(storage_error)?;
        let rows = conn
            .query(
                &stmt,
                &[&(self.next.0 as i64), &(self.stop.0 as i64), &BATCH],
            )
            .await
            .map_err(storage_error)?;
        if (rows.len() as i64) < BATCH {
            self.done = true;
        }
        for r in rows {
            let tid = Tid(r.get::<_, i64>(0) as u64);
            self.next = Tid(tid.0 + 1);
            self.buffered.push_back(TransactionInfo {
                tid,
                status: if r.get::<_, bool>(1) { b'p' } else { b' ' },
                user: r.get(2),
                description: r.get(3),
                extension: r.get::<_, Option<Vec<u8>>>(4).unwrap_or_default(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl TransactionIterator for TxnIter {
    async fn next_transaction(&mut self) -> Result<Option<TransactionInfo>> {
        if self.buffered.is_empty() && !self.done {
            self.fill().await?;
        }
        let t = self.buffered.pop_front();
        self.current = t.as_ref().map(|t| t.tid);
        Ok(t)
    }

    async fn records(&self) -> Result<Box<dyn RecordIterator>> {
        let tid = self
            .current
            .ok_or_else(|| StorageError::Value("no current transaction".into()))?;
        Ok(Box::new(RecIter {
            inner: self.inner.clone(),
            tid,
            rows: None,
        }))
    }
}

struct RecIter {
    inner: Arc<Inner>,
    tid: Tid,
    rows: Option<VecDeque<DataRecord>>,
}

#[async_trait]
impl RecordIterator for RecIter {
    async fn next_record(&mut self) -> Result<Option<DataRecord>> {
        if self.rows.is_none() {
            let conn = self.inner.pool.get().await.map_err(db::pool_error)?;
            let stmt = conn
                .prepare_cached("SELECT zoid, state FROM object_state WHERE tid = $1 ORDER BY zoid")
                .await
                .map_err(storage_error)?;
            let rows = conn
                .query(&stmt, &[&(self.tid.0 as i64)])
                .await
                .map_err(storage_error)?;
            let tid = self.tid;
            self.rows = Some(
                rows.iter()
                    .map(|r| DataRecord {
                        oid: Oid(r.get::<_, i64>(0) as u64),
                        tid,
                        data: r.get::<_, Option<Vec<u8>>>(1).map(Bytes::from),
                        data_txn: None,
                    })
                    .collect(),
            );
        }
        Ok(self.rows.as_mut().expect("filled").pop_front())
    }
}

/// The current record of the first oid `>= next`, and the oid after it.
pub(crate) async fn record_iternext(
    inner: &Inner,
    next: Option<Oid>,
) -> Result<zodb::CurrentRecord> {
    let from = next.map_or(0, |o| o.0 as i64);
    let visible = inner.cache.visible().0 as i64;
    let conn = inner.pool.get().await.map_err(db::pool_error)?;
    let sql = match inner.layout {
        Layout::HistoryPreserving => {
            "SELECT c.zoid, c.tid, s.state FROM current_object c
             JOIN object_state s ON s.zoid = c.zoid AND s.tid = c.tid
             WHERE c.zoid >= $1 AND c.tid <= $2 ORDER BY c.zoid LIMIT 2"
        }
        Layout::HistoryFree => {
            "SELECT zoid, tid, state FROM object_state
             WHERE zoid >= $1 AND tid <= $2 ORDER BY zoid LIMIT 2"
        }
    };
    let stmt = conn.prepare_cached(sql).await.map_err(storage_error)?;
    let rows = conn
        .query(&stmt, &[&from, &visible])
        .await
        .map_err(storage_error)?;
    let Some(first) = rows.first() else {
        return Err(StorageError::Value(format!(
            "no object at or after oid {}",
            Oid(from as u64)
        )));
    };
    let oid = Oid(first.get::<_, i64>(0) as u64);
    let data = first
        .get::<_, Option<Vec<u8>>>(2)
        .ok_or(StorageError::PosKey(oid))?;
    Ok(zodb::CurrentRecord {
        oid,
        tid: Tid(first.get::<_, i64>(1) as u64),
        data: Bytes::from(data),
        next: rows.get(1).map(|r| Oid(r.get::<_, i64>(0) as u64)),
    })
}
