//! A consistent view of committed data: one file handle and the end of the committed
//! transactions in it.
//!
//! Pack replaces the file under the storage's feet, so everything that follows positions
//! (loads, history, iteration, undo, pack itself) first takes a `FileView` — the handle and
//! the end that go together — and reads only through it. Positions from one view are never
//! used with another file: after a pack the old handle keeps reading the old file
//! (`Data.fs.old`), whose offsets are still the ones it knows.
//!
//! Every read is bounds-checked against `end` and every pointer is checked to point
//! backwards, so damaged or hostile bytes give [`Error::Corrupted`], never a panic or a
//! loop.

use crate::error::{Error, Result};
use crate::format::{self, DataHeader, TxnHeader, DATA_HEADER_LEN, FIRST_TXN_POS, TXN_HEADER_LEN};
use bytes::Bytes;
use fsio::FileIo;
use std::sync::Arc;
use zodb::{Oid, Tid};

/// Refuse to allocate a single pickle larger than this from a length field: a damaged
/// `plen` must not make the server allocate terabytes. Real pickles are far smaller.
pub(crate) const MAX_PICKLE: u64 = 1 << 34;

/// The pickle length `plen` of the record at `pos`, as the size of a buffer to read it
/// into. Damage if over [`MAX_PICKLE`] or (on a 32-bit target) beyond what memory can
/// address.
pub(crate) fn pickle_len(pos: u64, plen: u64) -> Result<usize> {
    usize::try_from(plen)
        .ok()
        .filter(|_| plen <= MAX_PICKLE)
        .ok_or_else(|| Error::corrupted(pos, format!("data length {plen} too large")))
}

/// Bytes read at a record's position in one go: the header and, most of the time, the
/// whole pickle. A read of 512 bytes costs the same as one of 50 from the page cache.
const SPECULATIVE_READ: usize = 512;

/// The file handle and the committed end that belong together.
#[derive(Clone)]
pub struct FileView {
    pub(crate) io: Arc<dyn FileIo>,
    /// End of the last committed transaction: nothing at or beyond it is read.
    pub(crate) end: u64,
}

impl std::fmt::Debug for FileView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileView").field("end", &self.end).finish()
    }
}

/// A transaction header with its position and metadata lengths checked against the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnAt {
    pub pos: u64,
    pub header: TxnHeader,
}

impl TxnAt {
    /// Start of the first data record.
    pub fn records_start(&self) -> u64 {
        self.pos + self.header.header_len()
    }

    /// End of the data records (the position of the trailer).
    pub fn records_end(&self) -> u64 {
        self.pos + self.header.tlen
    }

    /// Start of the next transaction.
    pub fn next(&self) -> u64 {
        self.pos + self.header.tlen + 8
    }
}

impl FileView {
    pub fn new(io: Arc<dyn FileIo>, end: u64) -> FileView {
        FileView { io, end }
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    /// The transaction at `pos`, with its length checked to fit inside the view.
    pub fn txn_at(&self, pos: u64) -> Result<TxnAt> {
        if pos < FIRST_TXN_POS || pos.saturating_add(TXN_HEADER_LEN as u64) > self.end {
            return Err(Error::corrupted(pos, "transaction position out of range"));
        }
        let header = format::read_txn_header(&*self.io, pos)?;
        let end_ok = header.end(pos).is_some_and(|e| e <= self.end);
        if !end_ok || header.tlen < header.header_len() {
            return Err(Error::corrupted(
                pos,
                format!("bad transaction length {}", header.tlen),
            ));
        }
        Ok(TxnAt { pos, header })
    }

    /// The transaction that ends at `end` (a transaction boundary), found through its
    /// trailer and checked against its header.
    pub fn txn_before(&self, end: u64) -> Result<TxnAt> {
        if end <= FIRST_TXN_POS || end > self.end {
            return Err(Error::corrupted(end, "no transaction ends here"));
        }
        let tl = format::read_u64(&*self.io, end - 8)?;
        let pos = (end - 8)
            .checked_sub(tl)
            .filter(|&p| p >= FIRST_TXN_POS)
            .ok_or_else(|| Error::corrupted(end - 8, format!("bad transaction length {tl}")))?;
        let t = self.txn_at(pos)?;
        if t.header.tlen != tl {
            return Err(Error::corrupted(
                pos,
                format!(
                    "transaction length {} differs from its trailer {tl}",
                    t.header.tlen
                ),
            ));
        }
        Ok(t)
    }

    /// User, description and extension of a transaction.
    pub fn txn_meta(&self, t: &TxnAt) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        format::read_txn_meta(&*self.io, t.pos, &t.header)
    }

    /// The data header at `pos`; `limit` is the end of the enclosing transaction when
    /// known (the record must fit before it), else the view's end.
    pub fn data_header(&self, pos: u64, limit: u64) -> Result<DataHeader> {
        let limit = limit.min(self.end);
        if pos < FIRST_TXN_POS || pos.saturating_add(DATA_HEADER_LEN as u64) > limit {
            return Err(Error::corrupted(pos, "data record position out of range"));
        }
        let h = format::read_data_header(&*self.io, pos, limit)?;
        if h.record_len()
            .and_then(|l| pos.checked_add(l))
            .is_none_or(|e| e > limit)
        {
            return Err(Error::corrupted(pos, "data record runs past its end"));
        }
        Ok(h)
    }

    /// The record of `oid` at `pos`: its header, checked to belong to `oid`.
    pub fn record(&self, oid: Oid, pos: u64) -> Result<DataHeader> {
        let h = self.data_header(pos, self.end)?;
        if h.oid != oid {
            return Err(Error::corrupted(
                pos,
                format!("expected a record of oid {oid}, found {}", h.oid),
            ));
        }
        Ok(h)
    }

    /// The inline pickle of the record at `pos` (header `h`, `plen > 0`).
    pub fn inline_data(&self, pos: u64, h: &DataHeader) -> Result<Bytes> {
        let mut buf = vec![0u8; pickle_len(pos, h.plen)?];
        format::read_at(&*self.io, &mut buf, pos + DATA_HEADER_LEN as u64, "data")?;
        Ok(Bytes::from(buf))
    }

    /// The record of `oid` at `pos` with its inline pickle (`None` for a record without
    /// data), read speculatively in one `pread` when the pickle is small, as most are.
    pub fn record_with_data(&self, oid: Oid, pos: u64) -> Result<(DataHeader, Option<Bytes>)> {
        if pos < FIRST_TXN_POS || pos.saturating_add(DATA_HEADER_LEN as u64) > self.end {
            return Err(Error::corrupted(pos, "data record position out of range"));
        }
        let n = format::mem_len((self.end - pos).min(SPECULATIVE_READ as u64));
        let mut buf = vec![0u8; n];
        format::read_at(&*self.io, &mut buf, pos, "data record")?;
        let h = match DataHeader::parse_slice(&buf) {
            Some(h) => h,
            // A record without data whose back pointer lies beyond the view.
            None => return Err(Error::corrupted(pos, "data record runs past its end")),
        };
        if h.vlen != 0 {
            return Err(Error::corrupted(
                pos,
                format!(
                    "data record with a version (vlen {}), not supported",
                    h.vlen
                ),
            ));
        }
        if h.oid != oid {
            return Err(Error::corrupted(
                pos,
                format!("expected a record of oid {oid}, found {}", h.oid),
            ));
        }
        let len = h
            .record_len()
            .filter(|&l| pos.checked_add(l).is_some_and(|e| e <= self.end))
            .ok_or_else(|| Error::corrupted(pos, "data record runs past its end"))?;
        if h.plen == 0 {
            return Ok((h, None));
        }
        if let Some(len) = usize::try_from(len).ok().filter(|&l| l <= n) {
            return Ok((h, Some(Bytes::from(buf).slice(DATA_HEADER_LEN..len))));
        }
        let mut data = vec![0u8; pickle_len(pos, h.plen)?];
        let have = n - DATA_HEADER_LEN;
        data[..have].copy_from_slice(&buf[DATA_HEADER_LEN..]);
        format::read_at(&*self.io, &mut data[have..], pos + n as u64, "data")?;
        Ok((h, Some(Bytes::from(data))))
    }

    /// Follows back pointers from the record of `oid` at `pos` to its pickle: `(data,
    /// position of the record holding it)`, or `None` when the chain ends in 0 (no state).
    pub fn resolve(&self, oid: Oid, pos: u64) -> Result<Option<(Bytes, u64)>> {
        let mut pos = pos;
        loop {
            let (h, data) = self.record_with_data(oid, pos)?;
            if let Some(data) = data {
                return Ok(Some((data, pos)));
            }
            if h.back == 0 {
                return Ok(None);
            }
            if h.back >= pos {
                return Err(Error::corrupted(
                    pos,
                    format!("back pointer {} does not point backwards", h.back),
                ));
            }
            pos = h.back;
        }
    }

    /// `_loadBack_impl`: the data reached from a back pointer value (0 = no state).
    pub fn load_back(&self, oid: Oid, back: u64) -> Result<Option<Bytes>> {
        if back == 0 {
            return Ok(None);
        }
        Ok(self.resolve(oid, back)?.map(|(d, _)| d))
    }

    /// The record's previous pointer, checked to point backwards (0 = none).
    pub fn prev_of(&self, pos: u64, h: &DataHeader) -> Result<u64> {
        if h.prev != 0 && h.prev >= pos {
            return Err(Error::corrupted(
                pos,
                format!("previous pointer {} does not point backwards", h.prev),
            ));
        }
        Ok(h.prev)
    }

    /// Walks back from the end to the transaction with `tid`; `None` if no transaction
    /// has it. Stops early once tids drop below `tid` (they increase through the file).
    pub fn find_txn(&self, tid: Tid) -> Result<Option<TxnAt>> {
        let mut end = self.end;
        while end > FIRST_TXN_POS {
            let t = self.txn_before(end)?;
            if t.header.tid == tid {
                return Ok(Some(t));
            }
            if t.header.tid < tid {
                return Ok(None);
            }
            end = t.pos;
        }
        Ok(None)
    }

    /// The data records of `t`: `(position, header)` in file order.
    pub fn records(&self, t: &TxnAt) -> RecordsIn<'_> {
        RecordsIn {
            view: self,
            pos: t.records_start(),
            end: t.records_end(),
            tpos: t.pos,
        }
    }
}

/// Iterator over the data records of one transaction; stops with an error at the first
/// record that does not fit or does not point back to its transaction.
pub struct RecordsIn<'a> {
    view: &'a FileView,
    pos: u64,
    end: u64,
    tpos: u64,
}

impl Iterator for RecordsIn<'_> {
    type Item = Result<(u64, DataHeader)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let pos = self.pos;
        let r = self.view.data_header(pos, self.end).and_then(|h| {
            if h.tloc != self.tpos {
                return Err(Error::corrupted(
                    pos,
                    format!(
                        "data record points to transaction {} instead of {}",
                        h.tloc, self.tpos
                    ),
                ));
            }
            Ok(h)
        });
        match r {
            Ok(h) => {
                // record_len was checked by data_header.
                self.pos = pos.saturating_add(h.record_len().unwrap_or(u64::MAX));
                Some(Ok((pos, h)))
            }
            Err(e) => {
                self.pos = self.end;
                Some(Err(e))
            }
        }
    }
}
