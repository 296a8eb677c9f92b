//! The blob files of a commit: staged (hard-linked into the blob directory's `tmp` and
//! synced) at vote, moved into place with a directory sync at finish before the status
//! byte, removed on abort; and reads of committed blob files. The steps on files are
//! [`BlobDir::stage`] and [`BlobDir::place`], which never follow a symbolic link.

use super::*;
use crate::commit::BlobSource;
use std::fs::File;

impl FileStorageCore {
    /// Gives each blob file of a transaction about to be written a name of the storage's
    /// own in the blob directory's `tmp` (a hard link to the client's file, or to the
    /// committed file an undo copies), fsynced. Nothing is visible yet; finish moves them
    /// into place, abort removes them.
    pub(super) fn stage_blobs(&self, blobs: &[(Oid, BlobSource)]) -> Result<Vec<(Oid, PathBuf)>> {
        if blobs.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self
            .blobs
            .as_ref()
            .ok_or(StorageError::Unsupported("blobs"))?;
        let mut staged = Vec::with_capacity(blobs.len());
        for (oid, src) in blobs {
            let source = match src {
                BlobSource::File(p) => p.clone(),
                BlobSource::Revision(t) => dir.blob_path(*oid, *t),
            };
            // Never through a symbolic link, and only a regular file (see zodb::blob).
            let tmp = match dir.stage(&source, "staged") {
                Ok(tmp) => tmp,
                Err(e) => {
                    remove_files(
                        &*self.fs,
                        staged.iter().map(|(_, f): &(Oid, PathBuf)| f.as_path()),
                    );
                    return Err(match (src, e.kind()) {
                        // Python's undo: "No blob file" (POSKeyError).
                        (BlobSource::Revision(_), io::ErrorKind::NotFound) => {
                            StorageError::PosKey(*oid)
                        }
                        (BlobSource::File(p), io::ErrorKind::NotFound) => StorageError::Value(
                            format!("the blob file {} for oid {oid} does not exist", p.display()),
                        ),
                        (BlobSource::File(p), io::ErrorKind::InvalidInput) => {
                            tracing::warn!(file = %p.display(), %oid, error = %e, "refusing a blob file");
                            StorageError::Value(format!(
                                "the blob file for oid {oid} was refused: {e}"
                            ))
                        }
                        _ => e.into(),
                    });
                }
            };
            staged.push((*oid, tmp));
        }
        Ok(staged)
    }

    /// Moves the staged blob files of transaction `tid` to their final names, read-only,
    /// and fsyncs their directories. Each file placed is added to `placed`, so that a
    /// failure can take them back.
    pub(super) fn place_blobs(
        &self,
        tid: Tid,
        staged: &[(Oid, PathBuf)],
        placed: &mut Vec<PathBuf>,
    ) -> io::Result<()> {
        let Some(dir) = &self.blobs else {
            return Ok(());
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (oid, tmp) in staged {
            let oid_dir = dir.oid_dir(*oid);
            let target = dir.place(tmp, *oid, tid)?;
            placed.push(target);
            if !dirs.contains(&oid_dir) {
                dirs.push(oid_dir);
            }
        }
        for d in &dirs {
            self.fs.sync_dir(d)?;
        }
        Ok(())
    }

    /// The blob directory, when the storage has blobs.
    pub fn blob_dir(&self) -> Option<&BlobDir> {
        self.blobs.as_ref()
    }

    /// The blob directory if clients share it (`storeBlobShared` is accepted).
    pub fn shared_blob_dir(&self) -> Option<&BlobDir> {
        self.blobs.as_ref().filter(|_| self.shared_blob_dir)
    }

    /// Opens the blob file of revision `serial` of `oid` (`loadBlob`). Only revisions the
    /// storage has committed are served: a file left behind by a crash between placing
    /// blobs and committing is never visible. Errors: `PosKey` when there is no such
    /// revision or no file.
    pub fn open_blob(&self, oid: Oid, serial: Tid) -> Result<File> {
        let dir = self
            .blobs
            .as_ref()
            .ok_or(StorageError::Unsupported("blobs"))?;
        if !self.has_revision(oid, serial)? {
            return Err(StorageError::PosKey(oid));
        }
        match dir.open_blob_file(oid, serial) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::PosKey(oid)),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `oid` has a committed record written by transaction `serial`.
    pub fn has_revision(&self, oid: Oid, serial: Tid) -> Result<bool> {
        let (v, mut pos) = match self.lookup(oid) {
            Ok(found) => found,
            Err(StorageError::PosKey(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        loop {
            let h = v.record(oid, pos).map_err(|e| self.err(e))?;
            if h.tid == serial {
                return Ok(true);
            }
            if h.tid < serial {
                return Ok(false);
            }
            pos = v.prev_of(pos, &h).map_err(|e| self.err(e))?;
            if pos == 0 {
                return Ok(false);
            }
        }
    }
}

/// Removes files that nothing refers to any more; failures are logged.
pub(crate) fn remove_files<'a>(fs: &dyn Fs, paths: impl IntoIterator<Item = &'a Path>) {
    for p in paths {
        if let Err(e) = fsio::remove_if_exists(fs, p) {
            tracing::warn!(file = %p.display(), error = %e, "could not remove a blob file");
        }
    }
}
