//! Reading the file as a whole: the open-time scan that builds (or extends) the index and
//! finds a torn tail (docs/filestorage.md §3.4), the sanity check of a saved `.index` (§3.3), and a strict
//! checker of the §1.6 rules used by tests and tools.
//!
//! ## Torn tails
//! Python truncates the tail of the file at the first transaction that is unfinished
//! (status `'c'`) or runs past the end of the file, and refuses to open on any other
//! damage. A write interrupted by power loss can also leave a last transaction whose header
//! was written but whose records or trailer were not (the OS may persist pages out of
//! order). So any damaged transaction is treated as a torn tail *if nothing valid follows
//! it*, and as corruption otherwise. "Something valid follows" means: the file's last 8
//! bytes, read as a trailer, point at a transaction after the damaged one that passes every
//! check and ends exactly at the end of the file. That is the only way a later, intact
//! transaction can be found without trusting the damaged lengths.

use crate::error::{Error, Result};
use crate::format::{
    status, DataHeader, TxnHeader, DATA_HEADER_LEN, DATA_HEADER_WITH_BACK_LEN, FIRST_TXN_POS,
    TXN_HEADER_LEN,
};
use crate::index::Index;
use fsio::FileIo;
use zodb::{Oid, Tid};

/// Sequential reads through a large buffer: the scan touches every header of the file,
/// and a syscall per header would dominate a full rebuild.
pub(crate) struct SeqReader<'a> {
    io: &'a dyn FileIo,
    size: u64,
    buf: Vec<u8>,
    buf_pos: u64,
}

const SEQ_BUF: usize = 1 << 20;

impl<'a> SeqReader<'a> {
    pub(crate) fn new(io: &'a dyn FileIo, size: u64) -> Self {
        SeqReader {
            io,
            size,
            buf: Vec::new(),
            buf_pos: 0,
        }
    }

    /// `len` bytes at `pos`; callers check bounds first, but a read past the file size is
    /// still just an error.
    pub(crate) fn get(&mut self, pos: u64, len: usize) -> Result<&[u8]> {
        let end = pos
            .checked_add(len as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::corrupted(pos, "record runs past the end of the file"))?;
        if pos < self.buf_pos || end > self.buf_pos + self.buf.len() as u64 {
            let want = crate::format::mem_len((len.max(SEQ_BUF) as u64).min(self.size - pos));
            self.buf.resize(want, 0);
            crate::format::read_at(self.io, &mut self.buf, pos, "record")?;
            self.buf_pos = pos;
        }
        // Inside the buffer: checked above, or the buffer was just read at `pos`.
        let off = crate::format::mem_len(pos - self.buf_pos);
        Ok(&self.buf[off..off + len])
    }

    pub(crate) fn txn_header(&mut self, pos: u64) -> Result<TxnHeader> {
        let b = self.get(pos, TXN_HEADER_LEN)?;
        Ok(TxnHeader::parse(b.try_into().expect("23 bytes")))
    }

    /// The data header at `pos`; `limit` is the end of the enclosing transaction.
    /// `Ok(None)` if it does not fit.
    pub(crate) fn data_header(&mut self, pos: u64, limit: u64) -> Result<Option<DataHeader>> {
        let avail = limit.saturating_sub(pos);
        if avail < DATA_HEADER_LEN as u64 {
            return Ok(None);
        }
        let n = crate::format::mem_len(avail.min(DATA_HEADER_WITH_BACK_LEN as u64));
        let b = self.get(pos, n)?;
        let fixed: &[u8; DATA_HEADER_LEN] = b[..DATA_HEADER_LEN].try_into().expect("42");
        let mut h = DataHeader::parse(fixed);
        if h.plen == 0 {
            match b.get(DATA_HEADER_LEN..DATA_HEADER_WITH_BACK_LEN) {
                Some(back) => h.back = u64::from_be_bytes(back.try_into().expect("8")),
                None => return Ok(None),
            }
        }
        Ok(Some(h))
    }

    pub(crate) fn u64_at(&mut self, pos: u64) -> Result<u64> {
        let b = self.get(pos, 8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8")))
    }
}

/// A transaction that passed every structural check.
#[derive(Debug)]
pub(crate) struct GoodTxn {
    /// `(oid, record position, prev)` of each data record, in file order.
    pub records: Vec<(Oid, u64, u64)>,
}

/// Checks the transaction at `pos` whose header has been read: lengths, data records that
/// exactly fill it with the right `tloc`, no version records, the trailer. Returns
/// `Err(reason)` on damage (I/O errors are returned separately through the outer result).
fn check_txn(
    r: &mut SeqReader<'_>,
    pos: u64,
    h: &TxnHeader,
) -> Result<std::result::Result<GoodTxn, String>> {
    let bad = |s: String| Ok(Err(s));
    if h.status == status::CHECKPOINT {
        return bad("unfinished transaction (status 'c')".into());
    }
    let Some(end) = h.end(pos).filter(|&e| e <= r.size) else {
        return bad(format!(
            "transaction length {} runs past the end of the file",
            h.tlen
        ));
    };
    if h.tlen < h.header_len() {
        return bad(format!(
            "transaction length {} shorter than its header ({})",
            h.tlen,
            h.header_len()
        ));
    }
    let tend = pos + h.tlen;
    let mut records = Vec::new();
    if h.status != status::UNDONE {
        let mut p = pos + h.header_len();
        while p < tend {
            let Some(d) = r.data_header(p, tend)? else {
                return bad(format!("data record at {p} exceeds the transaction"));
            };
            if d.vlen != 0 {
                return bad(format!(
                    "data record at {p} has a version (vlen {})",
                    d.vlen
                ));
            }
            let len = d.record_len().unwrap_or(u64::MAX);
            if p.checked_add(len).is_none_or(|e| e > tend) {
                return bad(format!("data record at {p} exceeds the transaction"));
            }
            if d.tloc != pos {
                return bad(format!(
                    "data record at {p} points to transaction {} instead of {pos}",
                    d.tloc
                ));
            }
            records.push((d.oid, p, d.prev));
            p += len;
        }
    }
    let trailer = r.u64_at(tend)?;
    if trailer != h.tlen {
        return bad(format!(
            "redundant transaction length {trailer} differs from {}",
            h.tlen
        ));
    }
    debug_assert_eq!(end, tend + 8);
    Ok(Ok(GoodTxn { records }))
}

/// Whether the file's last 8 bytes identify a valid transaction starting after `pos`.
fn valid_txn_after(r: &mut SeqReader<'_>, pos: u64) -> Result<bool> {
    let size = r.size;
    if size < pos + 8 + TXN_HEADER_LEN as u64 + 8 {
        return Ok(false);
    }
    let rtl = r.u64_at(size - 8)?;
    let Some(start) = (size - 8).checked_sub(rtl) else {
        return Ok(false);
    };
    if start <= pos || start + (TXN_HEADER_LEN as u64) > size {
        return Ok(false);
    }
    let h = r.txn_header(start)?;
    if h.tlen != rtl || !matches!(h.status, status::COMMITTED | status::PACKED) {
        return Ok(false);
    }
    Ok(check_txn(r, start, &h)?.is_ok())
}

/// How the scan ended, when it did not end exactly at the end of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Fewer than a header's bytes after the last transaction (Python truncates these
    /// without keeping a copy).
    Short { pos: u64 },
    /// A damaged last transaction: everything from `pos` is to be moved into a `.trN` file.
    Torn { pos: u64, reason: String },
}

impl Tail {
    pub fn pos(&self) -> u64 {
        match self {
            Tail::Short { pos } | Tail::Torn { pos, .. } => *pos,
        }
    }
}

/// A torn tail in a file of `file_size` bytes. Its `Display` is the one sentence every
/// reader of the file uses for it — the server when it moves the tail away, `zeors check`
/// and `zeors info` — so an operator sees the same words for the same damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub tail: Tail,
    pub file_size: u64,
}

impl TornTail {
    /// Bytes from the tail's start to the end of the file.
    pub fn len(&self) -> u64 {
        self.file_size.saturating_sub(self.tail.pos())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for TornTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (pos, len) = (self.tail.pos(), self.len());
        match &self.tail {
            Tail::Short { .. } => write!(
                f,
                "torn tail at offset {pos} ({len} bytes): shorter than a transaction header"
            ),
            Tail::Torn { reason, .. } => {
                write!(f, "torn tail at offset {pos} ({len} bytes): {reason}")
            }
        }
    }
}

/// The words for a status byte that is none of `' '`, `'p'`, `'u'`, `'c'`: the server
/// warns with them (it serves such a file, as Python does) and `zeors check` fails with
/// them.
pub fn invalid_status(status: u8) -> String {
    format!(
        "invalid transaction status {:?} (0x{status:02x})",
        status as char
    )
}

/// Result of [`scan`].
#[derive(Debug)]
pub struct ScanOutcome {
    /// End of the last good transaction: the append position.
    pub end: u64,
    /// Tid of the last good transaction (the `ltid` passed in if none was scanned).
    pub last_tid: Tid,
    /// Number of transactions scanned.
    pub transactions: u64,
    /// Set when the file continues after `end` with a torn transaction or a fragment.
    pub tail: Option<Tail>,
}

/// Scans transactions from `start` to the end of the file (`size`), adding every data
/// record to `index`. `ltid` is the tid of the transaction before `start`; `name` (the
/// file) prefixes the warnings.
/// Damage followed by a valid transaction is an error; a damaged tail is reported in
/// [`ScanOutcome::tail`] and left for the caller to truncate (or ignore, read-only).
pub fn scan(
    io: &dyn FileIo,
    name: &str,
    size: u64,
    start: u64,
    ltid: Tid,
    index: &mut Index,
) -> Result<ScanOutcome> {
    let mut r = SeqReader::new(io, size);
    let mut pos = start;
    let mut last_tid = ltid;
    let mut transactions = 0;
    let mut batch = Vec::new();
    let tail = loop {
        if pos == size {
            break None;
        }
        if size - pos < TXN_HEADER_LEN as u64 {
            break Some(Tail::Short { pos });
        }
        let h = r.txn_header(pos)?;
        let good = match check_txn(&mut r, pos, &h)? {
            Ok(good) => good,
            Err(reason) => {
                if valid_txn_after(&mut r, pos)? {
                    return Err(Error::corrupted(pos, reason));
                }
                break Some(Tail::Torn { pos, reason });
            }
        };
        if h.tid <= last_tid {
            tracing::warn!(
                "{name}: at offset {pos}: time-stamp reduction {} <= {last_tid}",
                h.tid
            );
        }
        if !matches!(
            h.status,
            status::COMMITTED | status::PACKED | status::UNDONE
        ) {
            // Served anyway, as Python's FileStorage does; `zeors check` fails on it.
            tracing::warn!(
                "{name}: {}; served anyway, as Python's FileStorage does",
                Error::corrupted(pos, invalid_status(h.status))
            );
        }
        for &(oid, rpos, prev) in &good.records {
            // Python's read_index compares against the index as of the transaction start.
            let expected = index.get(oid).unwrap_or(0);
            if expected != prev {
                if prev != 0 {
                    tracing::error!("{name}: at offset {rpos}: oid {oid}: incorrect previous pointer {prev}, expected {expected}");
                } else {
                    tracing::warn!("{name}: at offset {rpos}: oid {oid}: incorrect previous pointer {prev}, expected {expected}");
                }
            }
        }
        batch.clear();
        batch.extend(good.records.iter().map(|&(oid, rpos, _)| (oid, rpos)));
        index.insert_batch(&mut batch);
        last_tid = h.tid;
        transactions += 1;
        pos += h.tlen + 8;
    };
    Ok(ScanOutcome {
        end: pos,
        last_tid,
        transactions,
        tail,
    })
}

/// Python's `_check_sanity` (§3.3): may a `.index` saved at `pos` be trusted for a file of
/// `size` bytes? Walks back from `pos` to the last non-empty, non-`'u'` transaction and
/// checks that its first (up to) five data records are where `index` says. Returns the tid
/// of the transaction just before `pos` when the index is sane.
pub fn check_index_sanity(io: &dyn FileIo, size: u64, index: &Index, pos: u64) -> Option<Tid> {
    if pos < 100 || size < pos {
        return None;
    }
    let mut r = SeqReader::new(io, size);
    let mut ltid = None;
    let mut end = pos;
    loop {
        let tl = r.u64_at(end.checked_sub(8)?).ok()?;
        let tpos = end.checked_sub(8)?.checked_sub(tl)?;
        if tpos < FIRST_TXN_POS || tpos + (TXN_HEADER_LEN as u64) > size {
            return None;
        }
        let h = r.txn_header(tpos).ok()?;
        ltid.get_or_insert(h.tid);
        if h.tlen != tl {
            return None;
        }
        end = tpos;
        if h.status == status::UNDONE {
            continue;
        }
        if !matches!(h.status, status::COMMITTED | status::PACKED) || tl < h.header_len() {
            return None;
        }
        let tend = tpos + tl;
        let mut p = tpos + h.header_len();
        if p == tend {
            continue;
        }
        let mut checked = 0;
        while p < tend && checked < 5 {
            let d = r.data_header(p, tend).ok()??;
            let len = d.record_len()?;
            if d.vlen != 0 || p.checked_add(len)? > tend || d.tloc != tpos {
                return None;
            }
            if index.get(d.oid) != Some(p) {
                return None;
            }
            checked += 1;
            p += len;
        }
        return ltid;
    }
}

/// What [`verify`] found in a valid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    pub transactions: u64,
    pub data_records: u64,
    pub last_tid: Tid,
    pub end: u64,
    pub index: Index,
}

/// Why [`verify`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Damage (or an I/O error) that an interrupted write cannot explain; the file is not
    /// checked past it. Its text is the one the server's open reports for the same damage.
    #[error(transparent)]
    Damaged(#[from] Error),
    /// Only the last transaction is damaged, as a write cut short by a crash or power
    /// loss leaves it: the transactions before it (`intact`) passed every check, and
    /// opening the file for writing (zeors or Python) moves the tail away.
    #[error("{tail}")]
    TornTail {
        tail: TornTail,
        intact: Box<VerifySummary>,
    },
}

impl From<std::io::Error> for VerifyError {
    fn from(e: std::io::Error) -> Self {
        VerifyError::Damaged(Error::Io(e))
    }
}

/// Checks a whole file against every rule of docs/filestorage.md §1.6 as strictly as `fstest` and pack do:
/// magic, strictly increasing tids, status `' '`/`'p'`, lengths, records that exactly fill
/// their transaction with the right `tloc`, `prev` equal to the oid's position before the
/// transaction (or 0 in a packed transaction), `prev`/`back` pointing backwards to a record
/// of the same oid, no data-plus-back records, trailers, and the end of the file at a
/// transaction boundary. A damaged last transaction is told apart from other damage
/// exactly as the open-time [`scan`] does.
pub fn verify(io: &dyn FileIo) -> std::result::Result<VerifySummary, VerifyError> {
    verify_with(io, &zodb::progress::NoProgress)
}

/// [`verify`], reporting the bytes checked so far to `progress`.
pub fn verify_with(
    io: &dyn FileIo,
    progress: &dyn zodb::progress::Progress,
) -> std::result::Result<VerifySummary, VerifyError> {
    let size = io.size()?;
    if size < 4 {
        return Err(Error::Format(format!("{size} bytes, shorter than the magic")).into());
    }
    let mut magic = [0u8; 4];
    io.read_exact_at(&mut magic, 0)?;
    if crate::format::Magic::parse(magic).is_none() {
        return Err(Error::Format(format!("starts with {magic:02x?}, not FS30 or FS21")).into());
    }
    progress.start("checking the format", zodb::progress::Unit::Bytes, size);
    let mut r = SeqReader::new(io, size);
    let mut index = Index::new();
    let mut pos = FIRST_TXN_POS;
    let mut last_tid = Tid::ZERO;
    let mut transactions = 0;
    let mut data_records = 0;
    let err = |pos: u64, s: String| VerifyError::Damaged(Error::corrupted(pos, s));
    while pos < size {
        progress.update(pos);
        let damage = if size - pos < TXN_HEADER_LEN as u64 {
            Some(Tail::Short { pos })
        } else {
            None
        };
        let (h, good) = match damage {
            Some(tail) => (None, Err(tail)),
            None => {
                let h = r.txn_header(pos)?;
                match check_txn(&mut r, pos, &h)? {
                    Ok(good) => (Some(h), Ok(good)),
                    Err(reason) => (Some(h), Err(Tail::Torn { pos, reason })),
                }
            }
        };
        let good = match good {
            Ok(good) => good,
            Err(tail) => {
                // The open-time scan's rule: a torn tail if nothing valid follows.
                if matches!(tail, Tail::Torn { .. }) && valid_txn_after(&mut r, pos)? {
                    let Tail::Torn { reason, .. } = tail else {
                        unreachable!()
                    };
                    return Err(err(pos, reason));
                }
                return Err(VerifyError::TornTail {
                    tail: TornTail {
                        tail,
                        file_size: size,
                    },
                    intact: Box::new(VerifySummary {
                        transactions,
                        data_records,
                        last_tid,
                        end: pos,
                        index,
                    }),
                });
            }
        };
        let h = h.expect("a checked transaction has a header");
        if transactions > 0 && h.tid <= last_tid {
            return Err(err(
                pos,
                format!("time-stamp reduction {} <= {last_tid}", h.tid),
            ));
        }
        if !matches!(h.status, status::COMMITTED | status::PACKED) {
            return Err(err(pos, invalid_status(h.status)));
        }
        for &(oid, rpos, prev) in &good.records {
            let expected = index.get(oid).unwrap_or(0);
            // Pack writes every record before the pack time without a previous pointer,
            // even when it keeps two revisions of an object (one that an undo after the
            // pack time points back to): Python's pack does the same.
            let packed_record = prev == 0 && h.status == status::PACKED;
            if prev != expected && !packed_record {
                return Err(err(rpos, format!("prev {prev}, expected {expected}")));
            }
            let d = r
                .data_header(rpos, pos + h.tlen)?
                .ok_or_else(|| err(rpos, "short record".into()))?;
            if d.back != 0 {
                if d.back >= rpos {
                    return Err(err(rpos, format!("back pointer {} not backwards", d.back)));
                }
                let b = r
                    .data_header(d.back, size)?
                    .ok_or_else(|| err(rpos, "back pointer past the end".into()))?;
                if b.oid != oid {
                    return Err(err(rpos, format!("back pointer to oid {}", b.oid)));
                }
            }
            data_records += 1;
        }
        let mut batch: Vec<(Oid, u64)> = good.records.iter().map(|&(o, p, _)| (o, p)).collect();
        index.insert_batch(&mut batch);
        last_tid = h.tid;
        transactions += 1;
        pos += h.tlen + 8;
    }
    progress.finish();
    Ok(VerifySummary {
        transactions,
        data_records,
        last_tid,
        end: pos,
        index,
    })
}
