//! Forward iteration over transactions and their data records (docs/filestorage.md §3.6), the way
//! Python's `FileIterator` reports them: `start`/`stop` are inclusive tids, a back pointer
//! record yields the resolved data and `data_txn` (the tid of the record it points at, one
//! level), a record without state yields `data = None`.
//!
//! Iteration streams: a [`TxnIter`] holds a position, never the file, and reads one
//! transaction at a time through its [`FileView`], so it sees the storage as it was when it
//! was made (later commits lie beyond the view's end; a pack leaves it reading the old
//! file) and runs in bounded memory on files of any size.

use crate::error::{Error, Result};
use crate::format::{
    status, DataHeader, DATA_HEADER_LEN, DATA_HEADER_WITH_BACK_LEN, FIRST_TXN_POS,
};
use crate::view::{FileView, TxnAt};
use bytes::Bytes;
use zodb::{DataRecord, Tid, TransactionInfo};

/// Iterator over the transactions of a view, oldest first.
#[derive(Debug)]
pub struct TxnIter {
    view: FileView,
    pos: u64,
    stop: Option<Tid>,
    done: bool,
}

impl TxnIter {
    /// Positions the iterator at the first transaction with `tid >= start`.
    ///
    /// Like Python, it decides from the timestamps whether `start` is closer to the first
    /// or the last transaction and walks from that end (headers only).
    pub fn new(view: FileView, start: Option<Tid>, stop: Option<Tid>) -> Result<TxnIter> {
        let mut it = TxnIter {
            pos: FIRST_TXN_POS,
            view,
            stop,
            done: false,
        };
        if let Some(start) = start {
            it.pos = it.seek(start)?;
        }
        Ok(it)
    }

    /// The view this iterator reads.
    pub fn view(&self) -> &FileView {
        &self.view
    }

    fn seek(&self, start: Tid) -> Result<u64> {
        let v = &self.view;
        if v.end() <= FIRST_TXN_POS {
            return Ok(v.end());
        }
        let first = v.txn_at(FIRST_TXN_POS)?;
        if start <= first.header.tid {
            return Ok(FIRST_TXN_POS);
        }
        let last = v.txn_before(v.end())?;
        if start > last.header.tid {
            return Ok(v.end());
        }
        if start == last.header.tid {
            return Ok(last.pos);
        }
        let t1 = zodb::timestamp::tid_to_unix(first.header.tid);
        let t2 = zodb::timestamp::tid_to_unix(last.header.tid);
        let ts = zodb::timestamp::tid_to_unix(start);
        if ts - t1 < t2 - ts {
            let mut pos = first.pos;
            loop {
                let t = v.txn_at(pos)?;
                if t.header.tid >= start {
                    return Ok(pos);
                }
                pos = t.next();
            }
        } else {
            let mut end = v.end();
            loop {
                let t = v.txn_before(end)?;
                if t.header.tid < start {
                    return Ok(end);
                }
                if t.pos <= FIRST_TXN_POS {
                    return Ok(t.pos);
                }
                end = t.pos;
            }
        }
    }

    /// The next transaction with its position, or `None` at the end (or past `stop`).
    pub fn next_txn(&mut self) -> Result<Option<(TxnAt, TransactionInfo)>> {
        if self.done || self.pos >= self.view.end() {
            self.done = true;
            return Ok(None);
        }
        let t = self.view.txn_at(self.pos)?;
        if self.stop.is_some_and(|stop| t.header.tid > stop) {
            self.done = true;
            return Ok(None);
        }
        let trailer = crate::format::read_u64(&*self.view.io, t.records_end())?;
        if trailer != t.header.tlen {
            return Err(Error::corrupted(
                t.records_end(),
                format!(
                    "redundant transaction length {trailer} differs from {}",
                    t.header.tlen
                ),
            ));
        }
        let (user, description, extension) = self.view.txn_meta(&t)?;
        self.pos = t.next();
        let info = TransactionInfo {
            tid: t.header.tid,
            status: t.header.status,
            user,
            description,
            extension,
        };
        Ok(Some((t, info)))
    }
}

/// Iterator over the data records of one transaction.
///
/// Records are read through a window of up to [`WINDOW`] bytes of the transaction, so
/// iterating a file costs about one read per megabyte, whatever the transaction sizes.
#[derive(Debug)]
pub struct RecordIter {
    view: FileView,
    txn: TxnAt,
    pos: u64,
    window: Bytes,
    window_start: u64,
}

/// Size of the read-ahead window.
const WINDOW: u64 = 1 << 20;

impl RecordIter {
    pub fn new(view: FileView, txn: TxnAt) -> RecordIter {
        let pos = if txn.header.status == status::UNDONE {
            txn.records_end()
        } else {
            txn.records_start()
        };
        RecordIter {
            view,
            txn,
            pos,
            window: Bytes::new(),
            window_start: 0,
        }
    }

    /// `len` bytes at `pos` (inside the records region) from the window, refilled from
    /// `pos` when needed; `None` when they are more than a window holds.
    fn bytes(&mut self, pos: u64, len: u64) -> Result<Option<Bytes>> {
        let end = self.txn.records_end();
        if pos.checked_add(len).is_none_or(|e| e > end) {
            return Err(Error::corrupted(pos, "data record exceeds its transaction"));
        }
        let in_window =
            pos >= self.window_start && pos + len <= self.window_start + self.window.len() as u64;
        if !in_window {
            if len > WINDOW {
                return Ok(None);
            }
            let n = crate::format::mem_len((end - pos).min(WINDOW));
            let mut buf = vec![0u8; n];
            crate::format::read_at(&*self.view.io, &mut buf, pos, "transaction records")?;
            self.window = Bytes::from(buf);
            self.window_start = pos;
        }
        // Both inside the window, which is in memory.
        let off = crate::format::mem_len(pos - self.window_start);
        let len = crate::format::mem_len(len);
        Ok(Some(self.window.slice(off..off + len)))
    }

    /// The data header at `pos`, the record's length and its inline pickle.
    fn header(&mut self, pos: u64) -> Result<(DataHeader, u64, Option<Bytes>)> {
        let avail = (self.txn.records_end() - pos).min(DATA_HEADER_WITH_BACK_LEN as u64);
        let head = self
            .bytes(pos, avail)?
            .ok_or_else(|| Error::corrupted(pos, "data record exceeds its transaction"))?;
        let h = DataHeader::parse_slice(&head)
            .ok_or_else(|| Error::corrupted(pos, "data record exceeds its transaction"))?;
        if h.vlen != 0 {
            return Err(Error::corrupted(pos, "data record with a version"));
        }
        let len = h
            .record_len()
            .filter(|&l| {
                pos.checked_add(l)
                    .is_some_and(|e| e <= self.txn.records_end())
            })
            .ok_or_else(|| Error::corrupted(pos, "data record exceeds its transaction"))?;
        if h.plen == 0 {
            return Ok((h, len, None));
        }
        let data = match self.bytes(pos + DATA_HEADER_LEN as u64, h.plen)? {
            Some(d) => d,
            None => self.view.inline_data(pos, &h)?,
        };
        Ok((h, len, Some(data)))
    }

    /// The next record, `None` after the last.
    pub fn next_record(&mut self) -> Result<Option<DataRecord>> {
        Ok(self.next_raw()?.map(|(_, r)| r))
    }

    /// The next record with its position.
    pub fn next_raw(&mut self) -> Result<Option<(u64, DataRecord)>> {
        if self.pos >= self.txn.records_end() {
            return Ok(None);
        }
        let pos = self.pos;
        let (h, len, inline) = match self.header(pos) {
            Ok(r) => r,
            Err(e) => {
                self.pos = self.txn.records_end();
                return Err(e);
            }
        };
        if h.tloc != self.txn.pos {
            self.pos = self.txn.records_end();
            return Err(Error::corrupted(
                pos,
                format!(
                    "data record points to transaction {} instead of {}",
                    h.tloc, self.txn.pos
                ),
            ));
        }
        self.pos = pos + len;
        let (data, data_txn) = match inline {
            Some(d) => (Some(d), None),
            None if h.back == 0 => (None, None),
            None => {
                if h.back >= pos {
                    return Err(Error::corrupted(
                        pos,
                        format!("back pointer {} does not point backwards", h.back),
                    ));
                }
                let target = self.view.record(h.oid, h.back)?;
                (self.view.load_back(h.oid, h.back)?, Some(target.tid))
            }
        };
        Ok(Some((
            pos,
            DataRecord {
                oid: h.oid,
                tid: h.tid,
                data,
                data_txn,
            },
        )))
    }
}
