//! ZODB blobs on disk: the directory layouts and file names Python ZODB uses, and the
//! file-system steps that make a blob file durable.
//!
//! A blob revision is one file, `<blob dir>/<oid path>/<tid_repr>.blob`, named after the
//! object and the transaction that wrote it; the file never changes once committed. The
//! `<oid path>` depends on the directory's layout, recorded in `<blob dir>/.layout`
//! (`ZODB.blob.FilesystemHelper`, `ZODB.blob.BushyLayout`, `LawnLayout`, and ZEO's
//! `BlobCacheLayout` for client caches):
//!
//! | layout | oid 0x1234 at tid 0x03f0…01 |
//! |---|---|
//! | `bushy` (default) | `0x00/0x00/0x00/0x00/0x00/0x00/0x12/0x34/0x03f0…01.blob` |
//! | `lawn` (old) | `0x1234/0x03f0…01.blob` |
//! | `zeocache` (ZEO client caches) | `<oid % 997>/<oid / 997>.<16 hex digits of tid>.blob` |
//!
//! Uncommitted files live in `<blob dir>/tmp`, on the same file system, so that a commit is
//! a rename.
//!
//! **Symbolic links are never followed below the blob directory's root** when a blob is
//! committed or served ([`BlobDir::open_blob_file`], [`BlobDir::stage`],
//! [`BlobDir::place`]): every path is walked one component at a time with `O_NOFOLLOW`, and
//! only regular files are accepted. A blob directory shared with clients can be written
//! by them; without this, a client could plant `<oid dir>/x.tmp` as a link to a file it
//! may not read, commit it with `storeBlobShared`, and have the server make the target
//! read-only and serve its contents to anyone. (The root itself may be a link: it comes
//! from the configuration.)
//!
//! The file-system steps go through [`fsio::Fs`] (the host's by default), so that a
//! storage's blob handling can be crash-tested on a simulated disk. On the host's file
//! system the walks above use `openat` and `O_NOFOLLOW`; on another [`Fs`] (a simulated
//! disk, which has no symbolic links) the same steps go through its operations.

use crate::{Oid, Tid};
use fsio::{Fs, Mode};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Suffix of committed blob files.
pub const BLOB_SUFFIX: &str = ".blob";
/// The file naming the layout of a blob directory.
pub const LAYOUT_MARKER: &str = ".layout";
/// The directory of uncommitted blob files inside a blob directory.
pub const TEMP_DIR: &str = "tmp";
/// Prefix of the temporary files zeors creates; only files with it are cleaned up at start
/// (in a shared blob directory, clients keep their own uncommitted files in `tmp` too).
pub const TEMP_PREFIX: &str = "zeors-";

/// How oids map to directories inside a blob directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One directory level per oid byte, most significant first, each `0x%02x`.
    Bushy,
    /// One directory per oid, named with its stripped hex representation (deprecated in
    /// ZODB, still found in old sites).
    Lawn,
    /// ZEO's client blob cache: 997 directories, files named `<oid / 997>.<tid hex>.blob`.
    ZeoCache,
}

impl Layout {
    /// The name written in `.layout`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Bushy => "bushy",
            Layout::Lawn => "lawn",
            Layout::ZeoCache => "zeocache",
        }
    }

    pub fn from_name(name: &str) -> Option<Layout> {
        match name {
            "bushy" => Some(Layout::Bushy),
            "lawn" => Some(Layout::Lawn),
            "zeocache" => Some(Layout::ZeoCache),
            _ => None,
        }
    }

    /// The directory of `oid`'s revisions, relative to the blob directory.
    pub fn oid_path(self, oid: Oid) -> PathBuf {
        match self {
            Layout::Bushy => oid
                .to_bytes()
                .iter()
                .map(|b| format!("0x{b:02x}"))
                .collect(),
            Layout::Lawn => PathBuf::from(oid_repr(oid)),
            Layout::ZeoCache => PathBuf::from((oid.0 % ZEOCACHE_DIRS).to_string()),
        }
    }

    /// The file of revision `tid` of `oid`, relative to the blob directory.
    pub fn blob_path(self, oid: Oid, tid: Tid) -> PathBuf {
        let dir = self.oid_path(oid);
        match self {
            Layout::Bushy | Layout::Lawn => dir.join(format!("{}{BLOB_SUFFIX}", tid_repr(tid))),
            Layout::ZeoCache => dir.join(format!(
                "{}.{:016x}{BLOB_SUFFIX}",
                oid.0 / ZEOCACHE_DIRS,
                tid.0
            )),
        }
    }
}

/// Number of directories of the `zeocache` layout.
pub const ZEOCACHE_DIRS: u64 = 997;

/// `ZODB.utils.oid_repr` / `tid_repr`: `0x` and the hex digits without leading zeros,
/// padded back to an even count (`0x00` for zero).
pub fn id_repr(v: u64) -> String {
    let hex = format!("{v:x}");
    if hex.len() % 2 == 1 {
        format!("0x0{hex}")
    } else {
        format!("0x{hex}")
    }
}

pub fn oid_repr(oid: Oid) -> String {
    id_repr(oid.0)
}

pub fn tid_repr(tid: Tid) -> String {
    id_repr(tid.0)
}

/// Whether a record's pickle is a `ZODB.blob.Blob` (`ZODB.blob.is_blob_record`): its
/// class pickle names exactly that class.
pub fn is_blob_record(data: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"ZODB.blob";
    data.windows(NEEDLE.len()).any(|w| w == NEEDLE)
        && crate::refs::class_name(data).is_some_and(|(m, n)| m == "ZODB.blob" && n == "Blob")
}

/// A blob directory: its root and layout.
/// A blob directory: its root, its layout and the file system it is on.
#[derive(Debug, Clone)]
pub struct BlobDir {
    root: PathBuf,
    layout: Layout,
    fs: Arc<dyn Fs>,
}

impl BlobDir {
    /// Opens the blob directory at `root` the way `FilesystemHelper` does: the layout is
    /// the one `.layout` names; without the marker, `lawn` for a directory that already
    /// holds non-hidden entries and `bushy` otherwise. With `create`, missing directories
    /// (`root`, `root/tmp`) and the marker are created.
    pub fn open(root: &Path, create: bool) -> io::Result<BlobDir> {
        Self::open_on(fsio::real(), root, create)
    }

    /// [`BlobDir::open`] on the file system `fs`.
    pub fn open_on(fs: Arc<dyn Fs>, root: &Path, create: bool) -> io::Result<BlobDir> {
        let root = std::path::absolute(root)?;
        let layout = match read_marker(&*fs, &root)? {
            Some(l) => l,
            None if has_visible_entries(&*fs, &root)? => {
                tracing::warn!(dir = %root.display(),
                    "blob directory without a .layout marker holds files: using the deprecated lawn layout");
                Layout::Lawn
            }
            None => Layout::Bushy,
        };
        let dir = BlobDir { root, layout, fs };
        if create {
            dir.create()?;
        }
        Ok(dir)
    }

    /// Opens or creates a blob directory that must have `layout`.
    pub fn open_with_layout(root: &Path, layout: Layout, create: bool) -> io::Result<BlobDir> {
        let fs = fsio::real();
        let root = std::path::absolute(root)?;
        if let Some(found) = read_marker(&*fs, &root)? {
            if found != layout {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "blob directory {} has layout `{}`, `{}` was expected",
                        root.display(),
                        found.name(),
                        layout.name()
                    ),
                ));
            }
        }
        let dir = BlobDir { root, layout, fs };
        if create {
            dir.create()?;
        }
        Ok(dir)
    }

    /// Creates the directory, then the marker, then `tmp`: a crash in between never
    /// leaves a directory whose layout a later open would guess differently.
    fn create(&self) -> io::Result<()> {
        let fs = &*self.fs;
        fsio::create_dir_all_synced(fs, &self.root)?;
        let marker = self.root.join(LAYOUT_MARKER);
        if !fsio::exists(fs, &marker) {
            let tmp = self.root.join(format!("{LAYOUT_MARKER}.{TEMP_PREFIX}tmp"));
            let f = fs.open(&tmp, Mode::Truncate)?;
            f.write_all_at(self.layout.name().as_bytes(), 0)?;
            f.sync_data()?;
            fs.rename(&tmp, &marker)?;
            fs.sync_dir(&self.root)?;
        }
        fsio::create_dir_all_synced(fs, &self.temp_dir())
    }

    /// The file system the directory is on.
    pub fn fs(&self) -> &Arc<dyn Fs> {
        &self.fs
    }

    /// Whether the directory is on the host's file system (where the walks that follow
    /// no symbolic link apply).
    fn on_host(&self) -> bool {
        self.fs.host_path(&self.root).is_some()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// `<root>/tmp`.
    pub fn temp_dir(&self) -> PathBuf {
        self.root.join(TEMP_DIR)
    }

    /// The directory of `oid`'s revisions.
    pub fn oid_dir(&self, oid: Oid) -> PathBuf {
        self.root.join(self.layout.oid_path(oid))
    }

    /// The committed file of revision `tid` of `oid`.
    pub fn blob_path(&self, oid: Oid, tid: Tid) -> PathBuf {
        self.root.join(self.layout.blob_path(oid, tid))
    }

    /// A new, unused path in `tmp` (the file is not created).
    pub fn new_temp_path(&self, what: &str) -> PathBuf {
        self.temp_dir().join(unique_name(what, ".tmp"))
    }

    /// Opens the committed file of revision `tid` of `oid` for reading, following no
    /// symbolic link below the root; anything but a regular file is refused.
    pub fn open_blob_file(&self, oid: Oid, tid: Tid) -> io::Result<File> {
        if !self.on_host() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a blob file of a simulated disk is not a host file (read it through the Fs)",
            ));
        }
        let (_, file) = open_beneath(&self.root, &self.layout.blob_path(oid, tid))?;
        Ok(file)
    }

    /// Gives `source` (a file below the root: an upload in `tmp`, a client's file in an
    /// oid directory, a committed revision) a second name of our own in `tmp`, fsynced,
    /// and returns it. `source` is opened without following links and must be a regular
    /// file; the new name is a hard link to exactly that file (checked after linking, so
    /// a swap of `source` in between is caught), or a copy of it where linking is not
    /// possible.
    pub fn stage(&self, source: &Path, what: &str) -> io::Result<PathBuf> {
        let _rel = source.strip_prefix(&self.root).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not inside the blob directory {}",
                    source.display(),
                    self.root.display()
                ),
            )
        })?;
        if !self.on_host() {
            return self.stage_on_fs(source, what);
        }
        let rel = _rel;
        let (src_dir, file) = open_beneath(&self.root, rel)?;
        let src_name = last_component(rel)?;
        let tmp = open_dir_beneath(&self.root, Path::new(TEMP_DIR))?;
        let name = unique_name(what, ".tmp");
        let cname = cstring(Path::new(&name))?;
        // linkat without AT_SYMLINK_FOLLOW links the name itself, never a link's target.
        let linked = unsafe {
            libc::linkat(
                src_dir.as_raw_fd(),
                src_name.as_ptr(),
                tmp.as_raw_fd(),
                cname.as_ptr(),
                0,
            )
        };
        let staged = if linked == 0 {
            let want = file.metadata()?;
            let got = stat_at(&tmp, &cname)?;
            if (got.st_dev as u64, got.st_ino as u64) != (want.dev(), want.ino()) {
                unsafe { libc::unlinkat(tmp.as_raw_fd(), cname.as_ptr(), 0) };
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} was replaced while being committed", source.display()),
                ));
            }
            file
        } else {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EXDEV | libc::EPERM | libc::EMLINK | libc::ENOTSUP) => {
                    tracing::debug!(src = %source.display(), error = %e, "cannot hard-link a blob file; copying it");
                    copy_into(&file, &tmp, &cname)?
                }
                _ => return Err(e),
            }
        };
        if let Err(e) = staged.sync_all() {
            unsafe { libc::unlinkat(tmp.as_raw_fd(), cname.as_ptr(), 0) };
            return Err(e);
        }
        Ok(self.temp_dir().join(name))
    }

    /// Moves a file [staged](BlobDir::stage) in `tmp` to its committed name as revision
    /// `tid` of `oid` and makes it read-only ([`set_not_writable`]), creating the oid's
    /// directories as needed; no symbolic link below the root is followed. Does not
    /// fsync the oid directory: the caller syncs each directory once.
    pub fn place(&self, staged: &Path, oid: Oid, tid: Tid) -> io::Result<PathBuf> {
        if !self.on_host() {
            return self.place_on_fs(staged, oid, tid);
        }
        let staged_name = staged
            .strip_prefix(self.temp_dir())
            .ok()
            .filter(|n| n.components().count() == 1)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a staged blob file", staged.display()),
                )
            })?;
        let oid_rel = self.layout.oid_path(oid);
        fsio::create_dir_all_synced(&fsio::Real, &self.root.join(&oid_rel))?;
        let oid_dir = open_dir_beneath(&self.root, &oid_rel)?;
        let tmp = open_dir_beneath(&self.root, Path::new(TEMP_DIR))?;
        let target = self.layout.blob_path(oid, tid);
        let from = cstring(staged_name)?;
        let to = last_component(&target)?;
        let renamed = unsafe {
            libc::renameat(
                tmp.as_raw_fd(),
                from.as_ptr(),
                oid_dir.as_raw_fd(),
                to.as_ptr(),
            )
        };
        if renamed != 0 {
            return Err(io::Error::last_os_error());
        }
        let made_read_only = open_at(&oid_dir, &to, libc::O_RDONLY).and_then(|file| {
            let dir_read = fstat_mode(&oid_dir)? & 0o444;
            chmod_not_writable(&file, dir_read)
        });
        if let Err(e) = made_read_only {
            // Not placed after all: the caller takes back only what was.
            unsafe { libc::unlinkat(oid_dir.as_raw_fd(), to.as_ptr(), 0) };
            return Err(e);
        }
        Ok(self.root.join(target))
    }

    /// Removes the temporary files a previous run of zeors left in `tmp` (a crash, or a
    /// kill during an upload). Other files are left alone: clients sharing the directory
    /// keep their uncommitted blobs there. Returns how many were removed.
    pub fn clean_temp(&self) -> io::Result<usize> {
        let mut n = 0;
        let entries = match self.fs.read_dir(&self.temp_dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        for entry in entries {
            if entry.name.to_string_lossy().starts_with(TEMP_PREFIX) && entry.is_file {
                match self.fs.remove_file(&self.temp_dir().join(&entry.name)) {
                    Ok(()) => n += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(n)
    }
}

impl BlobDir {
    /// [`BlobDir::stage`] on a file system other than the host's: a hard link (or a copy)
    /// of `source` in `tmp`, synced.
    fn stage_on_fs(&self, source: &Path, what: &str) -> io::Result<PathBuf> {
        let fs = &*self.fs;
        if fs.metadata(source)?.is_dir {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", source.display()),
            ));
        }
        let tmp = self.temp_dir().join(unique_name(what, ".tmp"));
        fsio::link_or_copy(fs, source, &tmp)?;
        if let Err(e) = fs.open(&tmp, Mode::Read).and_then(|f| f.sync_data()) {
            let _ = fs.remove_file(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    /// [`BlobDir::place`] on a file system other than the host's.
    fn place_on_fs(&self, staged: &Path, oid: Oid, tid: Tid) -> io::Result<PathBuf> {
        let fs = &*self.fs;
        fsio::create_dir_all_synced(fs, &self.oid_dir(oid))?;
        let target = self.blob_path(oid, tid);
        fs.rename(staged, &target)?;
        if let Err(e) = fs.set_not_writable(&target) {
            let _ = fs.remove_file(&target);
            return Err(e);
        }
        Ok(target)
    }
}

fn read_marker(fs: &dyn Fs, root: &Path) -> io::Result<Option<Layout>> {
    match fsio::read(fs, &root.join(LAYOUT_MARKER)) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let name = text.trim();
            Layout::from_name(name).map(Some).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "unknown blob directory layout `{name}` in {}",
                        root.join(LAYOUT_MARKER).display()
                    ),
                )
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn has_visible_entries(fs: &dyn Fs, root: &Path) -> io::Result<bool> {
    match fs.read_dir(root) {
        Ok(entries) => Ok(entries
            .iter()
            .any(|e| !e.name.to_string_lossy().starts_with('.'))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// A file name no other call in any process returns: `zeors-<what>-<pid>-<n>-<nanos><suffix>`.
pub fn unique_name(what: &str, suffix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{TEMP_PREFIX}{what}-{}-{n}-{nanos:09}{suffix}",
        std::process::id()
    )
}

/// Makes a committed blob file read-only, as `ZODB.blob.set_not_writable` does: no write
/// bits, and the read bits of its directory. A symbolic link is refused, never followed
/// (the mode of its target is not ours to change). See [`fsio::Real`].
pub fn set_not_writable(path: &Path) -> io::Result<()> {
    fsio::Real.set_not_writable(path)
}

fn chmod_not_writable(file: &File, dir_read: u32) -> io::Result<()> {
    fsio::chmod_not_writable(file, dir_read)
}

/// A second name for `src` at `dst` on the host's file system: a hard link (blob files
/// never change once written, so sharing the data is safe), or a copy where links are not
/// possible. A symbolic link at `src` is linked as the link itself (Linux's `link` does
/// not follow it), and never copied through ([`fsio::link_or_copy`]).
pub fn link_or_copy(src: &Path, dst: &Path) -> io::Result<()> {
    fsio::link_or_copy(&fsio::Real, src, dst)
}

/// Opens `path` for reading if it is a regular file; a symbolic link (as the last
/// component), a FIFO, a device or a directory is refused with an error naming it.
pub fn open_regular_nofollow(path: &Path) -> io::Result<File> {
    fsio::open_regular_nofollow(path)
}

/// Opens `rel` below `root` for reading, one component at a time without following
/// symbolic links; the last must be a regular file. Returns the file and its directory.
fn open_beneath(root: &Path, rel: &Path) -> io::Result<(OwnedFd, File)> {
    let parent = rel.parent().unwrap_or(Path::new(""));
    let dir = open_dir_beneath(root, parent)?;
    let name = last_component(rel)?;
    let file =
        open_at(&dir, &name, libc::O_RDONLY).map_err(|e| not_followed(e, &root.join(rel)))?;
    Ok((dir, file))
}

/// Opens the directory `rel` below `root` (the root itself when `rel` is empty) without
/// following symbolic links below the root.
fn open_dir_beneath(root: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let mut dir: OwnedFd = File::open(root)?.into();
    let mut at = root.to_path_buf();
    for c in rel.components() {
        let std::path::Component::Normal(part) = c else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a plain path below the blob directory",
                    rel.display()
                ),
            ));
        };
        at.push(part);
        let cpart = cstring(Path::new(part))?;
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                cpart.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(not_followed(io::Error::last_os_error(), &at));
        }
        dir = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    Ok(dir)
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_NONBLOCK)`, which must be a regular file
/// (`O_NONBLOCK` so that a FIFO planted there cannot block the open).
fn open_at(dir: &OwnedFd, name: &std::ffi::CStr, flags: libc::c_int) -> io::Result<File> {
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let file = unsafe { File::from_raw_fd(fd) };
    check_regular(
        &file,
        Path::new(&std::ffi::OsStr::from_bytes(name.to_bytes())),
    )?;
    Ok(file)
}

/// Copies `from` into a new file `name` of `dir` (created exclusively, never through a
/// link) and returns it.
fn copy_into(from: &File, dir: &OwnedFd, name: &std::ffi::CStr) -> io::Result<File> {
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut to = unsafe { File::from_raw_fd(fd) };
    let copied = io::copy(&mut &*from, &mut to);
    if let Err(e) = copied {
        unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
        return Err(e);
    }
    Ok(to)
}

fn fstat_mode(fd: &OwnedFd) -> io::Result<u32> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_mode)
}

fn stat_at(dir: &OwnedFd, name: &std::ffi::CStr) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn check_regular(file: &File, path: &Path) -> io::Result<()> {
    fsio::check_regular(file, path)
}

fn not_followed(e: io::Error, path: &Path) -> io::Error {
    fsio::not_followed(e, path)
}

fn last_component(rel: &Path) -> io::Result<std::ffi::CString> {
    match rel.components().next_back() {
        Some(std::path::Component::Normal(name)) => cstring(Path::new(name)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", rel.display()),
        )),
    }
}

fn cstring(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// Removes a file of the host's file system; a file that is already gone is fine.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    fsio::remove_if_exists(&fsio::Real, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn reprs_are_pythons() {
        assert_eq!(id_repr(0), "0x00");
        assert_eq!(id_repr(1), "0x01");
        assert_eq!(id_repr(0x123), "0x0123");
        assert_eq!(id_repr(0x040d_40d4_3101_96bb), "0x040d40d4310196bb");
        assert_eq!(id_repr(u64::MAX), "0xffffffffffffffff");
    }

    #[test]
    fn layouts() {
        let oid = Oid(0x1234);
        let tid = Tid(0x040d_40d4_3101_96bb);
        assert_eq!(
            Layout::Bushy.blob_path(oid, tid),
            PathBuf::from("0x00/0x00/0x00/0x00/0x00/0x00/0x12/0x34/0x040d40d4310196bb.blob")
        );
        assert_eq!(
            Layout::Lawn.blob_path(oid, tid),
            PathBuf::from("0x1234/0x040d40d4310196bb.blob")
        );
        assert_eq!(Layout::Lawn.oid_path(Oid(0)), PathBuf::from("0x00"));
        // 0x1234 = 4660 = 4 * 997 + 672
        assert_eq!(
            Layout::ZeoCache.blob_path(oid, tid),
            PathBuf::from("672/4.040d40d4310196bb.blob")
        );
        for l in [Layout::Bushy, Layout::Lawn, Layout::ZeoCache] {
            assert_eq!(Layout::from_name(l.name()), Some(l));
        }
    }

    #[test]
    fn blob_records() {
        // The record ZODB writes for a Blob: class pickle, then state None.
        let rec = b"\x80\x03cZODB.blob\nBlob\nq\x00.\x80\x03N.";
        assert!(is_blob_record(rec));
        assert!(!is_blob_record(
            b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.\x80\x03}q\x01."
        ));
        assert!(!is_blob_record(b"ZODB.blob garbage"));
        assert!(!is_blob_record(b""));
    }

    #[test]
    fn directory_layout_selection_and_creation() {
        let tmp = std::env::temp_dir().join(unique_name("blobdir-test", ""));
        let d = BlobDir::open(&tmp, true).unwrap();
        assert_eq!(d.layout(), Layout::Bushy);
        assert_eq!(
            fs::read_to_string(tmp.join(LAYOUT_MARKER)).unwrap(),
            "bushy"
        );
        assert!(d.temp_dir().is_dir());
        // Our temporary files are cleaned, others are kept.
        fs::write(d.new_temp_path("upload"), b"x").unwrap();
        fs::write(d.temp_dir().join("client.tmp"), b"y").unwrap();
        assert_eq!(d.clean_temp().unwrap(), 1);
        assert!(d.temp_dir().join("client.tmp").exists());
        assert!(BlobDir::open_with_layout(&tmp, Layout::ZeoCache, false).is_err());
        fs::remove_dir_all(&tmp).unwrap();

        // An old directory with files and no marker is a lawn.
        fs::create_dir_all(tmp.join("0x01")).unwrap();
        let d = BlobDir::open(&tmp, true).unwrap();
        assert_eq!(d.layout(), Layout::Lawn);
        assert_eq!(fs::read_to_string(tmp.join(LAYOUT_MARKER)).unwrap(), "lawn");
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn links_are_never_followed_when_staging_placing_or_opening() {
        let tmp = std::env::temp_dir().join(unique_name("blobdir-links", ""));
        let d = BlobDir::open(&tmp, true).unwrap();
        let secret = tmp.join("secret");
        fs::write(&secret, b"private").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let oid = Oid(7);
        let oid_dir = d.oid_dir(oid);
        fsio::create_dir_all_synced(&fsio::Real, &oid_dir).unwrap();

        // A client's "file" that is a link to a private one is refused.
        let planted = oid_dir.join("x.tmp");
        std::os::unix::fs::symlink(&secret, &planted).unwrap();
        let e = d.stage(&planted, "staged").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(
            fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // So is a FIFO (it would block a plain open).
        let fifo = oid_dir.join("f.tmp");
        let cf = cstring(&fifo).unwrap();
        assert_eq!(unsafe { libc::mkfifo(cf.as_ptr(), 0o600) }, 0);
        assert!(d.stage(&fifo, "staged").is_err());
        // A regular file is staged and placed read-only.
        let good = oid_dir.join("g.tmp");
        fs::write(&good, b"data").unwrap();
        let staged = d.stage(&good, "staged").unwrap();
        let placed = d.place(&staged, oid, Tid(5)).unwrap();
        assert_eq!(fs::read(&placed).unwrap(), b"data");
        assert_eq!(
            fs::metadata(&placed).unwrap().permissions().mode() & 0o222,
            0
        );
        let mut served = Vec::new();
        io::Read::read_to_end(&mut d.open_blob_file(oid, Tid(5)).unwrap(), &mut served).unwrap();
        assert_eq!(served, b"data");
        // A committed revision replaced by a link is not served, and chmod does not follow.
        fs::remove_file(&placed).unwrap();
        std::os::unix::fs::symlink(&secret, &placed).unwrap();
        assert!(d.open_blob_file(oid, Tid(5)).is_err());
        assert!(set_not_writable(&placed).is_err());
        assert_eq!(
            fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A directory on the way replaced by a link is not followed either.
        let real = tmp.join("elsewhere");
        fs::create_dir_all(&real).unwrap();
        fs::write(
            real.join(format!("{}{BLOB_SUFFIX}", tid_repr(Tid(6)))),
            b"x",
        )
        .unwrap();
        fs::remove_dir_all(&oid_dir).unwrap();
        std::os::unix::fs::symlink(&real, &oid_dir).unwrap();
        let e = d.open_blob_file(oid, Tid(6)).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        fs::remove_dir_all(&tmp).unwrap();
    }
}
