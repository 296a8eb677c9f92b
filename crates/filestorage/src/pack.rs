//! Pack with garbage collection (spec §6), following Python's `fspack`.
//!
//! 1. **Reachability** (no lock; commits go on): scan the transactions up to the pack
//!    time for each object's last revision (`oid2curpos`), then walk the references
//!    (record pickles, [`zodb::refs`]) from the root. Revisions that back pointers after
//!    the pack time depend on (undo) are kept too, with what they reference.
//! 2. **Copy to the pack time** into `Data.fs.pack`: each transaction that still holds a
//!    reachable record is written with status `'p'`, only those records, data inlined,
//!    `prev = 0`.
//! 3. **Copy the rest**: every transaction after the pack time is copied as is, with
//!    `prev` and back pointers rewritten for the new offsets. This runs in rounds without
//!    any lock, each copying what was committed when it started; only the last round,
//!    which copies the few transactions committed meanwhile and swaps the files, holds the
//!    commit mutex (new votes wait a few milliseconds; a voted transaction is let finish
//!    first).
//! 4. **Swap**: `Data.fs.pack` is fsynced, the stale `.index` removed, `Data.fs` kept as
//!    `Data.fs.old` (a hard link, so `Data.fs` never disappears), `Data.fs.pack` renamed
//!    over `Data.fs`, the directory fsynced; the new file, index and end are installed in
//!    one step, and the new `.index` is written. Readers holding the old file keep reading
//!    it consistently.
//!
//! 5. **Blobs** (a storage with a blob directory): phase 2 notes the unreachable blob
//!    revisions; after the swap their files are removed, or moved to `<blob dir>.old` with
//!    `pack-keep-old` (see `remove_packed_blobs`).
//!
//! Differences from Python, all on the safe side: revisions brought back by a back pointer
//! have their references followed even when the object was otherwise unreachable (Python
//! follows them only for objects reachable anyway, and can drop what such a revision
//! refers to); a back pointer whose target was not copied (an undo committed during the
//! pack) gets its data inlined instead of failing the pack; the new file is fsynced.

use crate::error::Error;
use crate::format::{self, status, DataHeader, TxnHeader, DATA_HEADER_LEN, FIRST_TXN_POS};
use crate::index::Index;
use crate::io::FileIo;
use crate::scan::SeqReader;
use crate::storage::{sibling, sync_dir, FileStorageCore, Live};
use crate::view::{FileView, MAX_PICKLE};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use zodb::progress::{NoProgress, Progress, ProgressHandle, Unit};
use zodb::refs::RefScanner;
use zodb::{Oid, StorageError, Tid};

type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What a pack did.
#[derive(Debug, Clone, PartialEq)]
pub enum PackOutcome {
    /// The file was replaced by a packed one.
    Packed(PackStats),
    /// Nothing to do: the reason, as Python logs it.
    Unchanged(&'static str),
}

/// Numbers about a completed pack, for logs and tools.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackStats {
    pub old_size: u64,
    pub new_size: u64,
    /// Objects in the index before and after.
    pub objects_before: u64,
    pub objects_after: u64,
    /// Transactions copied after the pack time (including those committed meanwhile).
    pub copied_after: u64,
    pub seconds: f64,
}

/// Options of one pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Remove objects not reachable from the root (Python's `pack_gc`, default true).
    pub gc: bool,
    /// Told each phase's progress: bytes scanned, objects marked, bytes copied.
    pub progress: ProgressHandle,
}

impl PackOptions {
    /// A pack with or without garbage collection, reporting no progress.
    pub fn gc(gc: bool) -> Self {
        PackOptions {
            gc,
            ..PackOptions::default()
        }
    }
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            gc: true,
            progress: ProgressHandle::default(),
        }
    }
}

/// Clears the packing flag, removes a leftover `.pack` file and wakes waiting votes on
/// any way out of a pack.
struct PackGuard<'a> {
    core: &'a FileStorageCore,
    pack_path: Option<std::path::PathBuf>,
}

impl Drop for PackGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = &self.pack_path {
            let _ = std::fs::remove_file(p);
        }
        {
            let mut c = self.core.commit.lock();
            c.swap_pending = false;
        }
        self.core.commit_cv.notify_all();
        self.core.packing.store(false, Ordering::Release);
    }
}

/// What phase 1 decided to keep from before the pack time.
struct Gc {
    /// oid → position of its last revision up to the pack time (`oid2curpos`).
    curpos: Index,
    /// The oids whose `curpos` revision is reachable; `None` without GC (all are).
    marked: Option<HashSet<Oid>>,
    /// More kept revisions: targets of back pointers after the pack time (undo).
    extra: HashMap<Oid, Vec<u64>>,
    /// First transaction after the pack time.
    packpos: u64,
    /// Old positions that back pointers after the pack time refer to: their new
    /// positions are remembered when copied, to rewrite those back pointers.
    back_targets: HashSet<u64>,
}

impl Gc {
    fn is_reachable(&self, oid: Oid, pos: u64) -> bool {
        let current = self.curpos.get(oid) == Some(pos)
            && self.marked.as_ref().is_none_or(|m| m.contains(&oid));
        current || self.extra.get(&oid).is_some_and(|l| l.contains(&pos))
    }
}

fn corrupt(pos: u64, what: impl Into<String>) -> Error {
    Error::corrupted(pos, what)
}

/// Python's `checkTxn`: the rules pack insists on.
fn check_txn(h: &TxnHeader, pos: u64, ltid: &mut Tid, end: u64) -> crate::error::Result<()> {
    if h.tid <= *ltid && *ltid != Tid::ZERO {
        return Err(corrupt(
            pos,
            format!("time-stamp reduction: {} <= {}", h.tid, ltid),
        ));
    }
    *ltid = h.tid;
    if h.status == status::CHECKPOINT {
        return Err(corrupt(pos, "transaction with checkpoint flag set"));
    }
    if !matches!(
        h.status,
        status::COMMITTED | status::PACKED | status::UNDONE
    ) {
        return Err(corrupt(
            pos,
            format!("invalid transaction status {:?}", h.status as char),
        ));
    }
    if h.tlen < h.header_len() || h.end(pos).is_none_or(|e| e > end) {
        return Err(corrupt(
            pos,
            format!("invalid transaction length {}", h.tlen),
        ));
    }
    Ok(())
}

/// Python's `checkData`.
fn check_data(tpos: u64, tend: u64, d: &DataHeader, pos: u64) -> crate::error::Result<u64> {
    if d.tloc != tpos {
        return Err(corrupt(
            pos,
            format!(
                "data record does not point to transaction header: {} != {tpos}",
                d.tloc
            ),
        ));
    }
    let len = d
        .record_len()
        .filter(|&l| pos.checked_add(l).is_some_and(|e| e <= tend))
        .ok_or_else(|| corrupt(pos, "data record size exceeds transaction size"))?;
    if d.prev >= pos {
        return Err(corrupt(
            pos,
            format!("invalid previous pointer: {}", d.prev),
        ));
    }
    if d.back != 0 && d.back >= pos {
        return Err(corrupt(pos, format!("invalid back pointer: {}", d.back)));
    }
    if d.vlen != 0 {
        return Err(corrupt(pos, "data record with a version"));
    }
    Ok(len)
}

/// Calls `f(tpos, header, record position, data header)` for every data record of every
/// transaction in `[from, to)`, running pack's checks; `stop_after` ends the scan at the
/// first transaction later than it. Returns where the scan stopped and whether every
/// transaction seen had status `'p'`.
fn scan_records(
    r: &mut SeqReader<'_>,
    from: u64,
    to: u64,
    stop_after: Option<Tid>,
    ltid: &mut Tid,
    progress: &dyn Progress,
    mut f: impl FnMut(u64, &TxnHeader, u64, &DataHeader) -> crate::error::Result<()>,
) -> crate::error::Result<(u64, bool)> {
    let mut pos = from;
    let mut all_packed = true;
    while pos < to {
        progress.update(pos);
        let h = r.txn_header(pos)?;
        if stop_after.is_some_and(|t| h.tid > t) {
            break;
        }
        check_txn(&h, pos, ltid, to)?;
        if h.status != status::PACKED {
            all_packed = false;
        }
        let tend = pos + h.tlen;
        let mut p = pos + h.header_len();
        while p < tend {
            let d = r
                .data_header(p, tend)?
                .ok_or_else(|| corrupt(p, "data record size exceeds transaction size"))?;
            let len = check_data(pos, tend, &d, p)?;
            f(pos, &h, p, &d)?;
            p += len;
        }
        let tl = r.u64_at(tend)?;
        if tl != h.tlen {
            return Err(corrupt(
                tend,
                format!(
                    "redundant transaction length does not match initial transaction length: {tl} != {}",
                    h.tlen
                ),
            ));
        }
        pos = tend + 8;
    }
    Ok((pos, all_packed))
}

/// The references of the revision at `pos` (back pointers chased to the pickle).
fn refs_at(
    view: &FileView,
    scanner: &mut RefScanner,
    oid: Oid,
    pos: u64,
    out: &mut Vec<Oid>,
) -> Result<(), String> {
    let data = view.resolve(oid, pos).map_err(|e| e.to_string())?;
    if let Some((data, at)) = data {
        scanner
            .references(&data, out)
            .map_err(|e| format!("reading the references of oid {oid} at {at}: {e}"))?;
    }
    Ok(())
}

/// `findReachableAtPacktime`: marks everything reachable from `todo` (oids) at the pack
/// time. A reference to an object that does not exist then fails the pack, as in Python.
fn mark_from(
    view: &FileView,
    scanner: &mut RefScanner,
    curpos: &Index,
    extra: &HashMap<Oid, Vec<u64>>,
    marked: &mut HashSet<Oid>,
    mut todo: Vec<Oid>,
    progress: &dyn Progress,
) -> Result<()> {
    let mut refs = Vec::new();
    while let Some(oid) = todo.pop() {
        if marked.contains(&oid) {
            continue;
        }
        if marked.len().is_multiple_of(1024) {
            progress.update(marked.len() as u64);
        }
        let Some(pos) = curpos.get(oid) else {
            if oid == Oid::ROOT && curpos.is_empty() {
                // Packing to a time before the root existed.
                continue;
            }
            if extra.contains_key(&oid) {
                // No state at the pack time, but revisions that undo after it brings
                // back are kept (their references are followed as extra roots).
                continue;
            }
            tracing::error!(%oid, "pack: a reachable object references {oid}, which does not exist at the pack time");
            return Err(StorageError::PosKey(oid));
        };
        marked.insert(oid);
        refs.clear();
        refs_at(view, scanner, oid, pos, &mut refs).map_err(StorageError::Corrupted)?;
        todo.extend(refs.iter().filter(|o| !marked.contains(o)));
    }
    Ok(())
}

/// Phase 1: what to keep from before the pack time. `None` for a redundant pack.
fn find_reachable(
    view: &FileView,
    pack_time: Tid,
    gc: bool,
    name: &str,
    progress: &dyn Progress,
) -> Result<Option<Gc>> {
    let err = |e: Error| crate::storage::corrupted(name, e);
    progress.start("packing: reading to the pack time", Unit::Bytes, view.end());
    let mut r = SeqReader::new(&*view.io, view.end());
    let mut curpos = Index::new();
    let mut ltid = Tid::ZERO;
    // A transaction's records are applied together, sorted by oid (see
    // `Index::insert_batch`); `None` removes the oid (a record without state).
    let mut txn: Vec<(Oid, Option<u64>)> = Vec::new();
    let mut txn_pos = 0;
    let apply = |txn: &mut Vec<(Oid, Option<u64>)>, curpos: &mut Index| {
        txn.sort_by_key(|e| e.0);
        for &(oid, pos) in txn.iter() {
            match pos {
                Some(p) => curpos.insert(oid, p),
                None => {
                    curpos.remove(oid);
                }
            }
        }
        txn.clear();
    };
    let (packpos, all_packed) = scan_records(
        &mut r,
        FIRST_TXN_POS,
        view.end(),
        Some(pack_time),
        &mut ltid,
        progress,
        |tpos, _, pos, d| {
            if tpos != txn_pos {
                apply(&mut txn, &mut curpos);
                txn_pos = tpos;
            }
            txn.push((d.oid, (d.plen > 0 || d.back != 0).then_some(pos)));
            Ok(())
        },
    )
    .map_err(err)?;
    apply(&mut txn, &mut curpos);
    if all_packed && packpos < view.end() {
        let next = r.txn_header(packpos).map_err(err)?;
        if next.status == status::PACKED {
            return Ok(None);
        }
    }
    progress.finish();
    let mut scanner = RefScanner::new();
    let mut marked = gc.then(HashSet::new);
    if let Some(m) = &mut marked {
        // At most every object is reachable: the total is an upper bound.
        progress.start(
            "packing: finding reachable objects",
            Unit::Objects,
            curpos.len() as u64,
        );
        mark_from(
            view,
            &mut scanner,
            &curpos,
            &HashMap::new(),
            m,
            vec![Oid::ROOT],
            progress,
        )?;
        progress.finish();
    }
    // findReachableFromFuture: revisions before the pack time that back pointers after it
    // bring back are kept, with what they reference.
    let mut extra: HashMap<Oid, Vec<u64>> = HashMap::new();
    let mut extra_roots: Vec<(Oid, u64)> = Vec::new();
    let mut back_targets = HashSet::new();
    progress.start(
        "packing: reading after the pack time",
        Unit::Bytes,
        view.end(),
    );
    progress.update(packpos);
    scan_records(
        &mut r,
        packpos,
        view.end(),
        None,
        &mut ltid,
        progress,
        |_, _, _, d| {
            if d.back != 0 {
                back_targets.insert(d.back);
            }
            if d.back != 0 && d.back < packpos {
                let kept = curpos.get(d.oid) == Some(d.back)
                    && marked.as_ref().is_none_or(|m| m.contains(&d.oid));
                let l = extra.entry(d.oid).or_default();
                if !kept && !l.contains(&d.back) {
                    l.push(d.back);
                    extra_roots.push((d.oid, d.back));
                }
            }
            Ok(())
        },
    )
    .map_err(err)?;
    progress.finish();
    if let Some(m) = &mut marked {
        let mut refs = Vec::new();
        for (oid, pos) in extra_roots {
            refs.clear();
            refs_at(view, &mut scanner, oid, pos, &mut refs).map_err(StorageError::Corrupted)?;
            mark_from(
                view,
                &mut scanner,
                &curpos,
                &extra,
                m,
                refs.clone(),
                &NoProgress,
            )?;
        }
    }
    Ok(Some(Gc {
        curpos,
        marked,
        extra,
        packpos,
        back_targets,
    }))
}

/// Buffered positioned writes to `Data.fs.pack`, with patching of earlier bytes.
struct PackWriter {
    file: File,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_start: u64,
}

const WRITE_BUF: usize = 1 << 20;

impl PackWriter {
    fn pos(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    fn append(&mut self, b: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= WRITE_BUF {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        FileExt::write_all_at(&self.file, &self.buf, self.buf_start)?;
        self.buf_start += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Overwrites the u64 at `at` (a transaction length written earlier).
    fn patch_u64(&mut self, at: u64, v: u64) -> io::Result<()> {
        let b = v.to_be_bytes();
        if at >= self.buf_start {
            let off = (at - self.buf_start) as usize;
            self.buf[off..off + 8].copy_from_slice(&b);
            Ok(())
        } else {
            FileExt::write_all_at(&self.file, &b, at)
        }
    }
}

/// The state of the new file while it is written.
struct Output {
    w: PackWriter,
    /// oid → position in the new file.
    index: Index,
    /// Old record position → new record position, for back pointer targets.
    moved: HashMap<u64, u64>,
    copied_after: u64,
    /// Blob revisions the pack removes (`(oid, tid)` of unreachable blob records before
    /// the pack time), collected when the storage has blobs (`None` otherwise).
    removed_blobs: Option<Vec<(Oid, Tid)>>,
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

fn io_err(e: io::Error) -> StorageError {
    StorageError::Io(e)
}

/// The user, description and extension bytes of the transaction at `pos`.
fn txn_meta(view: &FileView, pos: u64, h: &TxnHeader) -> crate::error::Result<Vec<u8>> {
    let mut meta = vec![0u8; (h.header_len() - format::TXN_HEADER_LEN as u64) as usize];
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
        if d.plen > MAX_PICKLE {
            return Err(corrupt(pos, format!("data length {} too large", d.plen)));
        }
        return view.inline_data(pos, d).map(Some);
    }
    view.load_back(d.oid, d.back)
}

/// Phase 2: the transactions before `packpos` that hold reachable records.
fn copy_to_packtime(
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
                    if d.plen > MAX_PICKLE {
                        return Err(corrupt(p, format!("data length {} too large", d.plen)));
                    }
                    out.record_header(&d, 0, tpos, d.plen)?;
                    out.w
                        .append(r.get(p + DATA_HEADER_LEN as u64, d.plen as usize)?)?;
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
        if d.plen > MAX_PICKLE {
            return None;
        }
        r.get(p + DATA_HEADER_LEN as u64, d.plen as usize)
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
fn copy_rest(
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

/// Replaces `path` by `pack_path`, keeping the old file as `old_path`. `Data.fs` exists
/// at every moment when the filesystem supports hard links.
fn swap_files(path: &Path, pack_path: &Path, old_path: &Path) -> io::Result<()> {
    match std::fs::remove_file(old_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    if let Err(e) = std::fs::hard_link(path, old_path) {
        tracing::warn!(error = %e, "cannot hard-link Data.fs to Data.fs.old; renaming instead");
        std::fs::rename(path, old_path)?;
    }
    std::fs::rename(pack_path, path)?;
    sync_dir(path)
}

/// Hard-links every `.blob` file under `from` (but not in `skip`) to the same place
/// under `to`.
fn link_tree(from: &Path, to: &Path, skip: &Path) -> io::Result<()> {
    let mut todo = vec![from.to_path_buf()];
    while let Some(d) = todo.pop() {
        if d == skip {
            continue;
        }
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            // Removed meanwhile (another pack step, an empty directory): nothing to link.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let ty = entry.file_type()?;
            if ty.is_dir() {
                todo.push(path);
            } else if ty.is_file()
                && path
                    .extension()
                    .is_some_and(|e| e == &zodb::blob::BLOB_SUFFIX[1..])
            {
                let rel = path.strip_prefix(from).map_err(io::Error::other)?;
                let dest = to.join(rel);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                match zodb::blob::link_or_copy(&path, &dest) {
                    Ok(()) => {}
                    Err(e)
                        if e.kind() == io::ErrorKind::NotFound
                            || e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// How long pack waits for a gap between commits before it holds new votes back.
const GAP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl FileStorageCore {
    /// After the swap: removes the blob files of the revisions the pack removed
    /// (`_remove_blob_files_tagged_for_removal_during_pack`). An object that is gone from
    /// the packed file loses its whole directory; one that still exists loses the files of
    /// the removed revisions only (Python removes the whole directory of an object that was
    /// unreachable at the pack time even when it was written again after it; zeors keeps
    /// such later revisions). Empty directories up to the blob directory are removed.
    ///
    /// With `pack-keep-old` (the default) nothing is deleted: the removed files move to
    /// `<blob dir>.old`, and every remaining blob file is hard-linked there too, so that
    /// `Data.fs.old` and `<blob dir>.old` are a consistent copy of the storage before the
    /// pack, as Python leaves them.
    ///
    /// Each object is handled under the commit mutex, so that no finish can place a file
    /// in a directory being removed. A crash part-way leaves unreferenced files behind,
    /// never a missing one.
    fn remove_packed_blobs(&self, mut removed: Vec<(Oid, Tid)>) -> io::Result<()> {
        let Some(dir) = &self.blobs else {
            return Ok(());
        };
        let keep_old = !self.pack_discard_old;
        let old = sibling(dir.root(), ".old");
        if keep_old {
            zodb::blob::create_dir_all_synced(&old)?;
            zodb::blob::link_or_copy(
                &dir.root().join(zodb::blob::LAYOUT_MARKER),
                &old.join(zodb::blob::LAYOUT_MARKER),
            )?;
        }
        // Moves (keep-old) or deletes a file or a directory.
        let handle = |path: &Path, whole: bool| -> io::Result<()> {
            if !path.exists() {
                return Ok(());
            }
            if keep_old {
                let rel = path.strip_prefix(dir.root()).map_err(io::Error::other)?;
                let dest = old.join(rel);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::rename(path, dest)
            } else if whole {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            }
        };
        removed.sort();
        removed.dedup();
        let mut files = 0usize;
        let mut i = 0;
        while i < removed.len() {
            let oid = removed[i].0;
            let n = removed[i..].iter().take_while(|(o, _)| *o == oid).count();
            let oid_dir = dir.oid_dir(oid);
            {
                let _commit = self.commit.lock();
                let gone = self.live.read().index.get(oid).is_none();
                if gone {
                    handle(&oid_dir, true)?;
                } else {
                    for (_, tid) in &removed[i..i + n] {
                        handle(&dir.blob_path(oid, *tid), false)?;
                    }
                }
                // Empty directories, from the object's up to (not including) the root.
                let mut d = oid_dir.as_path();
                while d != dir.root() && d.starts_with(dir.root()) {
                    match std::fs::remove_dir(d) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        // Not empty: neither is anything above it.
                        Err(_) => break,
                    }
                    match d.parent() {
                        Some(p) => d = p,
                        None => break,
                    }
                }
            }
            files += n;
            i += n;
        }
        if keep_old {
            link_tree(dir.root(), &old, &dir.temp_dir())?;
        }
        tracing::info!(
            name = self.name(),
            revisions = files,
            kept_old = keep_old,
            "pack: removed the blob files of removed revisions"
        );
        Ok(())
    }

    /// The commit state at a moment when no transaction is voted and unfinished, with the
    /// commit mutex held (so none can be voted until it is released).
    ///
    /// It first waits for a natural gap between commits, without delaying anyone; under
    /// a steady stream of commits it then sets `swap_pending`, which holds new votes back,
    /// and waits for the voted transaction to finish (as long as its client takes, like
    /// Python's commit lock; the server's transaction timeout bounds that).
    fn quiet_commit_state(&self) -> parking_lot::MutexGuard<'_, crate::storage::CommitState> {
        let mut c = self.commit.lock();
        let deadline = Instant::now() + GAP_WAIT;
        while c.has_staged() {
            let now = Instant::now();
            if now >= deadline {
                c.swap_pending = true;
                self.commit_cv.wait(&mut c);
            } else {
                self.commit_cv.wait_for(&mut c, deadline - now);
            }
        }
        c
    }

    /// Packs the storage to `pack_time` (spec §6; see the module docs). Commits and loads
    /// continue meanwhile. Only one pack runs at a time.
    pub fn pack(&self, pack_time: Tid, options: PackOptions) -> Result<PackOutcome> {
        let started = Instant::now();
        if self.is_read_only() {
            return Err(StorageError::ReadOnly);
        }
        let Some(path) = self.path().map(Path::to_owned) else {
            return Err(StorageError::Unsupported(
                "pack of a storage without a file path",
            ));
        };
        if pack_time == Tid::ZERO {
            return Err(StorageError::Value("Invalid pack time".into()));
        }
        if self.is_empty() {
            return Ok(PackOutcome::Unchanged("the storage is empty"));
        }
        if self
            .packing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(StorageError::Value("Already packing".into()));
        }
        let mut guard = PackGuard {
            core: self,
            pack_path: None,
        };
        let old_path = sibling(&path, ".old");
        match std::fs::remove_file(&old_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        if let Some(blobs) = &self.blobs {
            let old_blobs = sibling(blobs.root(), ".old");
            match std::fs::remove_dir_all(&old_blobs) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }

        // Undo is refused from now on (see `Policy::undo_disabled`); let a transaction
        // voted before finish, so that the view below holds every back pointer there
        // will be until the swap.
        {
            let mut c = self.quiet_commit_state();
            c.swap_pending = false;
        }
        self.commit_cv.notify_all();
        let view = self.view();
        let objects_before = self.len();
        tracing::info!(name = self.name(), pack_time = %zodb::timestamp::format_tid(pack_time), "pack: finding reachable objects");
        let progress = &*options.progress;
        let Some(gc) = find_reachable(&view, pack_time, options.gc, self.name(), progress)? else {
            tracing::info!(
                name = self.name(),
                "The database has already been packed to a later time or no changes have been made since the last pack"
            );
            return Ok(PackOutcome::Unchanged("already packed to a later time"));
        };

        let pack_path = sibling(&path, ".pack");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&pack_path)?;
        guard.pack_path = Some(pack_path.clone());
        let mut magic = [0u8; 4];
        view.io.read_exact_at(&mut magic, 0)?;
        let mut out = Output {
            w: PackWriter {
                file,
                buf: Vec::with_capacity(WRITE_BUF + (1 << 16)),
                buf_start: 0,
            },
            index: Index::new(),
            moved: HashMap::new(),
            copied_after: 0,
            removed_blobs: self.blobs.as_ref().map(|_| Vec::new()),
        };
        out.w.append(&magic).map_err(io_err)?;
        tracing::info!(name = self.name(), "pack: copying to the pack time");
        copy_to_packtime(&view, &gc, &mut out, progress).map_err(|e| self.err(e))?;
        if out.w.pos() == gc.packpos {
            tracing::info!(name = self.name(), "pack: nothing to remove");
            return Ok(PackOutcome::Unchanged("no space would be freed"));
        }

        // Phase 3, in rounds without the lock while commits keep coming. Back pointer
        // targets are known for what phase 1 scanned; for transactions committed since,
        // every new position is remembered (there are few).
        let scanned_end = view.end();
        let remember = |p: u64| p >= scanned_end || gc.back_targets.contains(&p);
        let io = view.io.clone();
        let mut ipos = gc.packpos;
        for _ in 0..1000 {
            let end = self.commit.lock().append_pos;
            if end.saturating_sub(ipos) < (1 << 16) {
                break;
            }
            copy_rest(
                &FileView::new(io.clone(), end),
                ipos,
                end,
                &mut out,
                &remember,
                progress,
            )
            .map_err(|e| self.err(e))?;
            ipos = end;
        }

        // The last round and the swap, under the commit mutex.
        let mut c = self.quiet_commit_state();
        if self.is_closed() {
            return Err(StorageError::Transaction(
                "the storage was closed during pack".into(),
            ));
        }
        let end = c.append_pos;
        copy_rest(
            &FileView::new(io.clone(), end),
            ipos,
            end,
            &mut out,
            &remember,
            &NoProgress,
        )
        .map_err(|e| self.err(e))?;
        out.w.flush()?;
        let new_size = out.w.pos();
        out.w.file.sync_all()?;
        let new_io: Arc<dyn FileIo> = Arc::new(crate::io::MappedFile::new(out.w.file)?);
        match std::fs::remove_file(sibling(&path, ".index")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        swap_files(&path, &pack_path, &old_path)?;
        guard.pack_path = None;
        let objects_after = out.index.len() as u64;
        {
            let mut live = self.live.write();
            let tid = live.snap_tid;
            *live = Live {
                io: new_io,
                index: out.index,
                data_end: new_size,
                snap_end: new_size,
                snap_tid: tid,
            };
        }
        c.append_pos = new_size;
        c.swap_pending = false;
        drop(c);
        self.commit_cv.notify_all();
        // Still flagged as packing (one pack at a time, undo refused) until the blob
        // files are dealt with, as in Python.
        if let Some(removed) = out.removed_blobs {
            if let Err(e) = self.remove_packed_blobs(removed) {
                // The pack itself is done; what is left are files nothing refers to.
                tracing::error!(name = self.name(), error = %e, "pack: removing the blob files of removed revisions failed");
            }
        }
        drop(guard);

        if self.pack_discard_old {
            if let Err(e) = std::fs::remove_file(&old_path) {
                tracing::warn!(error = %e, "could not remove Data.fs.old");
            }
        }
        if let Err(e) = self.save_index() {
            tracing::warn!(name = self.name(), error = %e, "could not save the index after pack");
        }
        let stats = PackStats {
            old_size: end,
            new_size,
            objects_before,
            objects_after,
            copied_after: out.copied_after,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(name = self.name(), ?stats, "packed");
        Ok(PackOutcome::Packed(stats))
    }
}
