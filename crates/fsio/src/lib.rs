//! The file-system seam of zeors' on-disk formats (the Data.fs and its neighbours, the blob
//! directory, the proxy's cache): every file and directory operation they make goes through
//! two traits, so that tests can run the same code on a simulated disk and look at what a
//! power loss would leave of it.
//!
//! - [`FileIo`]: one open file — positioned reads and writes, length, `fdatasync`. All I/O
//!   is positioned: readers never share a cursor, so any number of them can read while one
//!   writer appends.
//! - [`Fs`]: opening files by path and the directory entries — create, rename, hard link,
//!   remove, list — and the `fsync` of a directory.
//! - [`Real`]: the host's file system; [`MappedFile`]: a [`FileIo`] that reads through a
//!   memory mapping.
//! - [`sim`]: [`sim::SimFile`], one simulated file, and [`simfs::SimFs`], a simulated
//!   directory tree. Both log every operation and compute *crash images*: what the disk
//!   may hold if power fails after any prefix of the log.
//!
//! ## The durability rules this seam encodes
//! What survives a power loss is what the code made durable, by these rules (the ones of
//! POSIX and of Linux file systems, which [`simfs::SimFs`] enforces):
//! 1. A file's bytes and length are durable after [`FileIo::sync_data`] of that file; until
//!    then each write may be lost, complete, or torn.
//! 2. A directory entry (a created file or directory, a rename, a link, a removal) is
//!    durable after [`Fs::sync_dir`] of the directory that holds it; syncing a file does not
//!    make its name durable.
//! 3. Entry operations not yet made durable reach the disk in the order they were made, or
//!    not at all (as a journaling file system commits them); file data does not wait for
//!    entries, nor entries for file data: a renamed file whose data was not synced may
//!    come back with its new name and no content.

pub mod forgetful;
pub mod mapped;
mod real;
pub mod sim;
pub mod simfs;

pub use mapped::MappedFile;
pub use real::{check_regular, chmod_not_writable, not_followed, open_regular_nofollow, Real};

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A random-access file.
pub trait FileIo: Send + Sync {
    /// Fills `buf` from `offset`; a read past the end is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes every completed write (and the file length) durable.
    fn sync_data(&self) -> io::Result<()>;

    /// The current length of the file in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Lets go of cached pages after reading much of the file once (see
    /// [`MappedFile::release_pages`]); nothing to do for plain files.
    fn release_pages(&self) {}
}

impl FileIo for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

/// How [`Fs::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An existing file, for reading only.
    Read,
    /// An existing file, for reading and writing.
    Write,
    /// Reading and writing; created (empty) when missing, never truncated.
    Create,
    /// Reading and writing; the file must not exist yet.
    CreateNew,
    /// Reading and writing; created when missing, emptied when it exists.
    Truncate,
}

/// What [`Fs::metadata`] tells about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub is_dir: bool,
    /// The length of a file (0 for a directory).
    pub len: u64,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: OsString,
    pub is_dir: bool,
    /// A regular file (not a directory, a symbolic link, a device...).
    pub is_file: bool,
}

/// An exclusive lock on a file, held until dropped (see [`Fs::lock`]).
pub struct Lock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lock")
    }
}

/// A file system: files by path, directory entries and their durability. See the crate
/// docs for what survives a crash.
pub trait Fs: Send + Sync + std::fmt::Debug {
    /// Opens the file at `path`.
    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn FileIo>>;

    /// [`Fs::open`] for a file that is read often and at random: where the file system
    /// can, reads are served from a memory mapping ([`MappedFile`]).
    fn open_mapped(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn FileIo>> {
        self.open(path, mode)
    }

    /// Whether `path` is a file or a directory, and a file's length; `NotFound` when it
    /// does not exist.
    fn metadata(&self, path: &Path) -> io::Result<Meta>;

    /// Creates the directory `path` (its parent must exist).
    fn create_dir(&self, path: &Path) -> io::Result<()>;

    /// Renames `from` to `to`, replacing a file at `to`. Atomic.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Gives the file `from` a second name `to` (which must not exist).
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Removes the name `path` of a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Removes the empty directory `path`.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;

    /// Makes the entries of directory `path` durable (rule 2 of the crate docs).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;

    /// The entries of directory `path`, in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;

    /// Takes the permission to write away from a file that must never change again (a
    /// committed blob), as ZODB's `set_not_writable` does.
    fn set_not_writable(&self, path: &Path) -> io::Result<()>;

    /// Takes an exclusive lock on the file `path` (created if missing) or fails at once
    /// with `WouldBlock`: a second process must not write the same files.
    fn lock(&self, path: &Path) -> io::Result<Lock>;

    /// Where `path` is on the host's file system, for a library that opens its files
    /// itself (redb); `None` when this file system is not the host's.
    fn host_path(&self, path: &Path) -> Option<PathBuf>;

    /// Copies the file `from` to a new file `to` (not synced).
    fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        let src = self.open(from, Mode::Read)?;
        let dst = self.open(to, Mode::CreateNew)?;
        let len = src.size()?;
        let mut buf = vec![0u8; (1 << 20).min(len as usize)];
        let mut at = 0;
        while at < len {
            let n = ((len - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Removes the directory `path` and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        for e in self.read_dir(path)? {
            let p = path.join(&e.name);
            if e.is_dir {
                self.remove_dir_all(&p)?;
            } else {
                self.remove_file(&p)?;
            }
        }
        self.remove_dir(path)
    }
}

/// Whether anything exists at `path`.
pub fn exists(fs: &dyn Fs, path: &Path) -> bool {
    fs.metadata(path).is_ok()
}

/// Whether `path` is a directory.
pub fn is_dir(fs: &dyn Fs, path: &Path) -> bool {
    fs.metadata(path).is_ok_and(|m| m.is_dir)
}

/// The whole content of the file at `path`.
pub fn read(fs: &dyn Fs, path: &Path) -> io::Result<Vec<u8>> {
    let f = fs.open(path, Mode::Read)?;
    let len = usize::try_from(f.size()?).map_err(io::Error::other)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// The directory that holds `path` (`.` for a bare name).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes the entry of `path` in its directory durable.
pub fn sync_parent(fs: &dyn Fs, path: &Path) -> io::Result<()> {
    fs.sync_dir(parent(path))
}

/// Creates `dir` and its missing parents, syncing the parent of each directory created
/// so that the new entries survive a crash.
pub fn create_dir_all_synced(fs: &dyn Fs, dir: &Path) -> io::Result<()> {
    if is_dir(fs, dir) {
        return Ok(());
    }
    if let Some(p) = dir.parent() {
        if !p.as_os_str().is_empty() {
            create_dir_all_synced(fs, p)?;
        }
    }
    match fs.create_dir(dir) {
        Ok(()) => {}
        // Lost a race with another creator: fine.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && is_dir(fs, dir) => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_parent(fs, dir)
}

/// Creates `dir` and its missing parents (without syncing anything).
pub fn create_dir_all(fs: &dyn Fs, dir: &Path) -> io::Result<()> {
    if is_dir(fs, dir) {
        return Ok(());
    }
    if let Some(p) = dir.parent() {
        if !p.as_os_str().is_empty() {
            create_dir_all(fs, p)?;
        }
    }
    match fs.create_dir(dir) {
        Err(e) if !(e.kind() == io::ErrorKind::AlreadyExists && is_dir(fs, dir)) => Err(e),
        _ => Ok(()),
    }
}

/// A second name for `src` at `dst`: a hard link (for files that never change once
/// written, sharing the data is safe), or a copy where links are not possible.
pub fn link_or_copy(fs: &dyn Fs, src: &Path, dst: &Path) -> io::Result<()> {
    match fs.hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::AlreadyExists =>
        {
            Err(e)
        }
        Err(e) => {
            tracing::debug!(src = %src.display(), dst = %dst.display(), error = %e, "cannot hard-link a file; copying it");
            fs.copy(src, dst)
        }
    }
}

/// Removes a file; a file that is already gone is fine.
pub fn remove_if_exists(fs: &dyn Fs, path: &Path) -> io::Result<()> {
    match fs.remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The host's file system as an `Arc<dyn Fs>`.
pub fn real() -> Arc<dyn Fs> {
    Arc::new(Real)
}
