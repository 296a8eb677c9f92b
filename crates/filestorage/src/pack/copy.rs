//! Phases 2 and 3 of pack: writing `Data.fs.pack` — the transactions before the pack
//! time that hold reachable records (status `'p'`, data inlined), then every transaction
//! after it as it is, with `prev` and back pointers rewritten for the new offsets.

use super::gc::{corrupt, Gc};
use crate::format::{self, status, DataHeader, TxnHeader, DATA_HEADER_LEN, FIRST_TXN_POS};
use crate::index::Index;
use crate::scan::SeqReader;
use crate::view::{pickle_len, FileView};
use fsio::FileIo;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use zodb::progress::{Progress, Unit};
use zodb::{Oid, Tid};

/// Buffered positioned writes to `Data.fs.pack`, with patching of earlier bytes.
pub(super) struct PackWriter {
    file: Arc<dyn FileIo>,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_start: u64,
}

const WRITE_BUF: usize = 1 << 20;

impl PackWriter {
    pub(super) fn new(file: Arc<dyn FileIo>) -> PackWriter {
        PackWriter {
            file,
            buf: Vec::with_capacity(WRITE_BUF + (1 << 16)),
            buf_start: 0,
        }
    }

    pub(super) fn pos(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    /// Writes what is buffered and makes the file durable; returns it with its length.
    pub(super) fn finish(mut self) -> io::Result<(Arc<dyn FileIo>, u64)> {
        self.flush()?;
        self.file.sync_data()?;
        let len = self.pos();
        Ok((self.file, len))
    }

    pub(super) fn append(&mut self, b: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= WRITE_BUF {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.write_all_at(&self.buf, self.buf_start)?;
        self.buf_start += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Overwrites the u64 at `at` (a transaction length written earlier).
    fn patch_u64(&mut self, at: u64, v: u64) -> io::Result<()> {
        let b = v.to_be_bytes();
        if at >= self.buf_start {
            // Everything from `buf_start` on is still in the buffer.
            let off = format::mem_len(at - self.buf_start);
            self.buf[off..off + 8].copy_from_slice(&b);
            Ok(())
        } else {
            self.file.write_all_at(&b, at)
        }
    }
}

/// The state of the new file while it is written.
pub(super) struct Output {
    pub(super) w: PackWriter,
    /// oid → position in the new file.
    pub(super) index: Index,
    /// Old record position → new record position, for back pointer targets.
    pub(super) moved: HashMap<u64, u64>,
    pub(super) copied_after: u64,
    /// Blob revisions the pack removes (`(oid, tid)` of unreachable blob records before
    /// the pack time), collected when the storage has blobs (`None` otherwise).
    pub(super) removed_blobs: Option<Vec<(Oid, Tid)>>,
}

impl Output {
    fn record_header(&mut self, h: &DataHeader, prev: u64, tloc: u64, plen: u64) -> io::Result<()> {
        let d = DataHeader {
            prev,
            tloc,
            vlen: 0,
            plen,
            back: 0,
            ..*h
        };
        self.w.append(&d.to_bytes())
    }

    /// Writes a transaction header (status and metadata as given); returns its position.
    fn txn_header(&mut self, h: &TxnHeader, status: u8, meta: &[u8]) -> io::Result<u64> {
        let tpos = self.w.pos();
        let mut th = *h;
        th.status = status;
        th.tlen = 0; // patched when the transaction is complete
        self.w.append(&th.to_bytes())?;
        self.w.append(meta)?;
        Ok(tpos)
    }

    /// Sets the length of the transaction at `tpos` and writes its trailer.
    fn end_txn(&mut self, tpos: u64) -> io::Result<()> {
        let tlen = self.w.pos() - tpos;
        self.w.patch_u64(tpos + 8, tlen)?;
        self.w.append(&tlen.to_be_bytes())
    }
}

/// The user, description and extension bytes of the transaction at `pos`.
fn txn_meta(view: &FileView, pos: u64, h: &TxnHeader) -> crate::error::Result<Vec<u8>> {
    let mut meta = vec![0u8; h.meta_len()];
    format::read_at(
        &*view.io,
        &mut meta,
        pos + format::TXN_HEADER_LEN as u64,
        "transaction metadata",
    )?;
    Ok(meta)
}

/// The pickle of a record (`data` = inline bytes when `plen > 0`), back pointers
/// resolved; `None` for no state.
fn record_data(
    view: &FileView,
    pos: u64,
    d: &DataHeader,
) -> crate::error::Result<Option<bytes::Bytes>> {
    if d.plen > 0 {
        // `inline_data` refuses a length over MAX_PICKLE as damage.
        return view.inline_data(pos, d).map(Some);
    }
    view.load_back(d.oid, d.back)
}

/// Phase 2: the transactions before `packpos` that hold reachable records.
pub(super) fn copy_to_packtime(
    view: &FileView,
    gc: &Gc,
    out: &mut Output,
    progress: &dyn Progress,
) -> crate::error::Result<()> {
    let mut r = SeqReader::new(&*view.io, gc.packpos);
    let mut batch = Vec::new();
    let mut pos = FIRST_TXN_POS;
    progress.start("packing: copying to the pack time", Unit::Bytes, gc.packpos);
    while pos < gc.packpos {
        progress.update(pos);
        let h = r.txn_header(pos)?;
        let tend = pos + h.tlen;
        let mut tpos_new: Option<u64> = None;
        batch.clear();
        let mut p = pos + h.header_len();
        if h.status == status::UNDONE {
            p = tend;
        }
        while p < tend {
            let d = r
                .data_header(p, tend)?
                .ok_or_else(|| corrupt(p, "data record exceeds its transaction"))?;
            let len = d
                .record_len()
                .ok_or_else(|| corrupt(p, "data record exceeds its transaction"))?;
            if !gc.is_reachable(d.oid, p) {
                if let Some(removed) = out.removed_blobs.as_mut() {
                    if let Some(tid) = removed_blob(view, gc, &mut r, p, &d) {
                        removed.push((d.oid, tid));
                    }
                }
            } else {
                let tpos = match tpos_new {
                    Some(t) => t,
                    None => {
                        let meta = txn_meta(view, pos, &h)?;
                        let t = out.txn_header(&h, status::PACKED, &meta)?;
                        tpos_new = Some(t);
                        t
                    }
                };
                let here = out.w.pos();
                if d.plen > 0 {
                    let plen = pickle_len(p, d.plen)?;
                    out.record_header(&d, 0, tpos, d.plen)?;
                    out.w.append(r.get(p + DATA_HEADER_LEN as u64, plen)?)?;
                } else {
                    match view.load_back(d.oid, d.back)? {
                        Some(data) => {
                            out.record_header(&d, 0, tpos, data.len() as u64)?;
                            out.w.append(&data)?;
                        }
                        None => {
                            out.record_header(&d, 0, tpos, 0)?;
                            out.w.append(&0u64.to_be_bytes())?;
                        }
                    }
                }
                batch.push((d.oid, here));
                if gc.back_targets.contains(&p) {
                    out.moved.insert(p, here);
                }
            }
            p += len;
        }
        if let Some(t) = tpos_new {
            out.end_txn(t)?;
            out.index.insert_batch(&mut batch);
        }
        pos = tend + 8;
    }
    progress.finish();
    Ok(())
}

/// The tid of the blob revision an unreachable record at `p` (header `d`) holds, if it is
/// a blob record (fspack's `copyDataRecords`). A duplicate of the kept revision (ZEO wrote
/// two records for one blob store in the same transaction) keeps its file. Records whose
/// data cannot be read are reported and skipped: pack must not fail over them.
fn removed_blob(
    view: &FileView,
    gc: &Gc,
    r: &mut SeqReader<'_>,
    p: u64,
    d: &DataHeader,
) -> Option<Tid> {
    let data = if d.plen > 0 {
        let plen = pickle_len(p, d.plen).ok()?;
        r.get(p + DATA_HEADER_LEN as u64, plen)
            .map(bytes::Bytes::copy_from_slice)
            .map(Some)
    } else {
        view.load_back(d.oid, d.back)
    };
    let data = match data {
        Ok(Some(data)) => data,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(oid = %d.oid, pos = p, error = %e, "pack: cannot read a removed record to check for a blob");
            return None;
        }
    };
    if !zodb::blob::is_blob_record(&data) {
        return None;
    }
    let kept = gc
        .curpos
        .get(d.oid)
        .filter(|&cp| gc.is_reachable(d.oid, cp))
        .and_then(|cp| view.record(d.oid, cp).ok());
    if kept.is_some_and(|k| k.tid == d.tid) {
        return None;
    }
    Some(d.tid)
}

/// Phase 3: copies the transactions in `[from, to)` of `view` unchanged but for the
/// offsets (`copyRest`/`copyOne`). The new position of each record for which `remember`
/// says so is kept, to rewrite back pointers to it.
pub(super) fn copy_rest(
    view: &FileView,
    from: u64,
    to: u64,
    out: &mut Output,
    remember: &dyn Fn(u64) -> bool,
    progress: &dyn Progress,
) -> crate::error::Result<()> {
    let view = FileView::new(view.io.clone(), to);
    let mut pos = from;
    progress.start("packing: copying after the pack time", Unit::Bytes, to);
    while pos < to {
        progress.update(pos);
        let t = view.txn_at(pos)?;
        let meta = txn_meta(&view, pos, &t.header)?;
        let tpos = out.txn_header(&t.header, t.header.status, &meta)?;
        // Records of this transaction, indexed only when it is complete (their `prev`
        // is the position before the transaction, as the writer does).
        let mut tindex: Vec<(Oid, u64)> = Vec::new();
        if t.header.status != status::UNDONE {
            for rec in view.records(&t) {
                let (p, d) = rec?;
                let data = record_data(&view, p, &d)?;
                let prev = out.index.get(d.oid).unwrap_or(0);
                let here = out.w.pos();
                let back = if d.plen == 0 && d.back != 0 {
                    out.moved.get(&d.back).copied()
                } else {
                    None
                };
                match (back, &data) {
                    (Some(b), _) => {
                        out.record_header(&d, prev, tpos, 0)?;
                        out.w.append(&b.to_be_bytes())?;
                    }
                    (None, Some(data)) => {
                        out.record_header(&d, prev, tpos, data.len() as u64)?;
                        out.w.append(data)?;
                    }
                    (None, None) => {
                        out.record_header(&d, prev, tpos, 0)?;
                        out.w.append(&0u64.to_be_bytes())?;
                    }
                }
                if remember(p) {
                    out.moved.insert(p, here);
                }
                tindex.push((d.oid, here));
            }
        }
        out.index.insert_batch(&mut tindex);
        out.end_txn(tpos)?;
        out.copied_after += 1;
        pos = t.next();
    }
    progress.finish();
    Ok(())
}
