//! Pack with garbage collection (docs/filestorage.md §6), following Python's `fspack`.
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
mod copy;
mod files;
mod gc;

use crate::index::Index;
use crate::paths;
use crate::storage::FileStorageCore;
use crate::view::FileView;
use copy::{Output, PackWriter};
use fsio::{Fs, Mode};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;
use zodb::progress::{NoProgress, ProgressHandle};
use zodb::{StorageError, Tid};

type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Removes a leftover `Data.fs.pack` on any way out of a pack before the swap.
struct PackFile<'a> {
    fs: &'a dyn Fs,
    path: Option<PathBuf>,
}

impl Drop for PackFile<'_> {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = self.fs.remove_file(p);
        }
    }
}

impl FileStorageCore {
    /// Packs the storage to `pack_time` (docs/filestorage.md §6; see the module docs). Commits and loads
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
        let Some(packing) = self.start_packing() else {
            return Err(StorageError::Value("Already packing".into()));
        };
        let fs = &**self.fs();
        let old_path = paths::old(&path);
        fsio::remove_if_exists(fs, &old_path)?;
        if let Some(blobs) = self.blob_dir() {
            match fs.remove_dir_all(&paths::sibling(blobs.root(), ".old")) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }

        // Undo is refused from now on (see `Policy::undo_disabled`); let a transaction
        // voted before finish, so that the view below holds every back pointer there
        // will be until the swap.
        drop(self.pause_commits());
        let view = self.view();
        let objects_before = self.len();
        tracing::info!(name = self.name(), pack_time = %zodb::timestamp::format_tid(pack_time), "pack: finding reachable objects");
        let progress = &*options.progress;
        let Some(gc) = gc::find_reachable(&view, pack_time, options.gc, self.name(), progress)?
        else {
            tracing::info!(
                name = self.name(),
                "The database has already been packed to a later time or no changes have been made since the last pack"
            );
            return Ok(PackOutcome::Unchanged("already packed to a later time"));
        };

        let pack_path = paths::pack(&path);
        let file = fs.open_mapped(&pack_path, Mode::Truncate)?;
        let mut pack_file = PackFile {
            fs,
            path: Some(pack_path.clone()),
        };
        let mut magic = [0u8; 4];
        view.io.read_exact_at(&mut magic, 0)?;
        let mut out = Output {
            w: PackWriter::new(file),
            index: Index::new(),
            moved: HashMap::new(),
            copied_after: 0,
            removed_blobs: self.blob_dir().map(|_| Vec::new()),
        };
        out.w.append(&magic)?;
        tracing::info!(name = self.name(), "pack: copying to the pack time");
        copy::copy_to_packtime(&view, &gc, &mut out, progress).map_err(|e| self.err(e))?;
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
            let end = self.committed_end();
            if end.saturating_sub(ipos) < (1 << 16) {
                break;
            }
            copy::copy_rest(
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

        // The last round and the swap, with commits held.
        let pause = self.pause_commits();
        if self.is_closed() {
            return Err(StorageError::Transaction(
                "the storage was closed during pack".into(),
            ));
        }
        let end = pause.end();
        copy::copy_rest(
            &FileView::new(io.clone(), end),
            ipos,
            end,
            &mut out,
            &remember,
            &NoProgress,
        )
        .map_err(|e| self.err(e))?;
        let (new_io, new_size) = out.w.finish()?;
        fsio::remove_if_exists(fs, &paths::index(&path))?;
        files::swap_files(fs, &path, &pack_path)?;
        pack_file.path = None;
        let objects_after = out.index.len() as u64;
        pause.install(new_io, out.index, new_size);
        // Still flagged as packing (one pack at a time, undo refused) until the blob
        // files are dealt with, as in Python.
        if let Some(removed) = out.removed_blobs {
            if let Err(e) = files::remove_packed_blobs(self, removed) {
                // The pack itself is done; what is left are files nothing refers to.
                tracing::error!(name = self.name(), error = %e, "pack: removing the blob files of removed revisions failed");
            }
        }
        drop(packing);

        if !self.keeps_old() {
            if let Err(e) = fs.remove_file(&old_path) {
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
