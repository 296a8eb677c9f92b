//! The file-system steps of pack: swapping `Data.fs.pack` in, and the blob files of the
//! removed revisions (removed, or moved to `<blob dir>.old`).
//!
//! Crash safety (checked on crash images in `tests/crash_files.rs`): `Data.fs.pack` is
//! synced before it is renamed, the stale `.index` is removed before the swap and the
//! directory is synced after it, so a crash leaves the old file or the packed one, each
//! with an index that matches it or none. Blob files are removed only once the swap is
//! durable, so a crash never leaves a record whose file is gone.

use crate::paths;
use crate::storage::FileStorageCore;
use fsio::Fs;
use std::io;
use std::path::Path;
use zodb::{Oid, Tid};

/// Replaces `path` by `pack_path`, keeping the old file as `old_path`, and makes the swap
/// durable. `Data.fs` exists at every moment when the file system supports hard links.
pub(super) fn swap_files(fs: &dyn Fs, path: &Path, pack_path: &Path) -> io::Result<()> {
    let old_path = paths::old(path);
    fsio::remove_if_exists(fs, &old_path)?;
    if let Err(e) = fs.hard_link(path, &old_path) {
        tracing::warn!(error = %e, "cannot hard-link Data.fs to Data.fs.old; renaming instead");
        fs.rename(path, &old_path)?;
    }
    fs.rename(pack_path, path)?;
    fsio::sync_parent(fs, path)
}

/// Hard-links every `.blob` file under `from` (but not in `skip`) to the same place
/// under `to`.
fn link_tree(fs: &dyn Fs, from: &Path, to: &Path, skip: &Path) -> io::Result<()> {
    let mut todo = vec![from.to_path_buf()];
    while let Some(d) = todo.pop() {
        if d == skip {
            continue;
        }
        let entries = match fs.read_dir(&d) {
            Ok(e) => e,
            // Removed meanwhile (another pack step, an empty directory): nothing to link.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = d.join(&entry.name);
            if entry.is_dir {
                todo.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e == &zodb::blob::BLOB_SUFFIX[1..])
            {
                let rel = path.strip_prefix(from).map_err(io::Error::other)?;
                let dest = to.join(rel);
                if let Some(parent) = dest.parent() {
                    fsio::create_dir_all(fs, parent)?;
                }
                match fsio::link_or_copy(fs, &path, &dest) {
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

/// After the swap: removes the blob files of the revisions the pack removed
/// (`_remove_blob_files_tagged_for_removal_during_pack`). An object that is gone from the
/// packed file loses its whole directory; one that still exists loses the files of the
/// removed revisions only (Python removes the whole directory of an object that was
/// unreachable at the pack time even when it was written again after it; zeors keeps such
/// later revisions). Empty directories up to the blob directory are removed.
///
/// With `pack-keep-old` (the default) nothing is deleted: the removed files move to
/// `<blob dir>.old`, and every remaining blob file is hard-linked there too, so that
/// `Data.fs.old` and `<blob dir>.old` are a consistent copy of the storage before the pack,
/// as Python leaves them.
///
/// Each object is handled with commits held, so that no finish can place a file in a
/// directory being removed. A crash part-way leaves unreferenced files behind, never a
/// missing one.
pub(super) fn remove_packed_blobs(
    core: &FileStorageCore,
    mut removed: Vec<(Oid, Tid)>,
) -> io::Result<()> {
    let Some(dir) = core.blob_dir() else {
        return Ok(());
    };
    let fs = &**core.fs();
    let keep_old = core.keeps_old();
    let old = paths::sibling(dir.root(), ".old");
    if keep_old {
        fsio::create_dir_all_synced(fs, &old)?;
        fsio::link_or_copy(
            fs,
            &dir.root().join(zodb::blob::LAYOUT_MARKER),
            &old.join(zodb::blob::LAYOUT_MARKER),
        )?;
    }
    // Moves (keep-old) or deletes a file or a directory.
    let handle = |path: &Path, whole: bool| -> io::Result<()> {
        if !fsio::exists(fs, path) {
            return Ok(());
        }
        if keep_old {
            let rel = path.strip_prefix(dir.root()).map_err(io::Error::other)?;
            let dest = old.join(rel);
            if let Some(parent) = dest.parent() {
                fsio::create_dir_all(fs, parent)?;
            }
            fs.rename(path, &dest)
        } else if whole {
            fs.remove_dir_all(path)
        } else {
            fs.remove_file(path)
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
            let held = core.hold_commits();
            if held.has_object(oid) {
                for (_, tid) in &removed[i..i + n] {
                    handle(&dir.blob_path(oid, *tid), false)?;
                }
            } else {
                handle(&oid_dir, true)?;
            }
            // Empty directories, from the object's up to (not including) the root.
            let mut d = oid_dir.as_path();
            while d != dir.root() && d.starts_with(dir.root()) {
                match fs.remove_dir(d) {
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
        link_tree(fs, dir.root(), &old, &dir.temp_dir())?;
    }
    tracing::info!(
        name = core.name(),
        revisions = files,
        kept_old = keep_old,
        "pack: removed the blob files of removed revisions"
    );
    Ok(())
}
