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

use crate::{Oid, Tid};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
#[derive(Debug, Clone)]
pub struct BlobDir {
    root: PathBuf,
    layout: Layout,
}

impl BlobDir {
    /// Opens the blob directory at `root` the way `FilesystemHelper` does: the layout is
    /// the one `.layout` names; without the marker, `lawn` for a directory that already
    /// holds non-hidden entries and `bushy` otherwise. With `create`, missing directories
    /// (`root`, `root/tmp`) and the marker are created.
    pub fn open(root: &Path, create: bool) -> io::Result<BlobDir> {
        let root = std::path::absolute(root)?;
        let layout = match read_marker(&root)? {
            Some(l) => l,
            None if has_visible_entries(&root)? => {
                tracing::warn!(dir = %root.display(),
                    "blob directory without a .layout marker holds files: using the deprecated lawn layout");
                Layout::Lawn
            }
            None => Layout::Bushy,
        };
        let dir = BlobDir { root, layout };
        if create {
            dir.create()?;
        }
        Ok(dir)
    }

    /// Opens or creates a blob directory that must have `layout`.
    pub fn open_with_layout(root: &Path, layout: Layout, create: bool) -> io::Result<BlobDir> {
        let root = std::path::absolute(root)?;
        if let Some(found) = read_marker(&root)? {
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
        let dir = BlobDir { root, layout };
        if create {
            dir.create()?;
        }
        Ok(dir)
    }

    /// Creates the directory, then the marker, then `tmp`: a crash in between never
    /// leaves a directory whose layout a later open would guess differently.
    fn create(&self) -> io::Result<()> {
        create_dir_all_synced(&self.root)?;
        let marker = self.root.join(LAYOUT_MARKER);
        if !marker.exists() {
            let tmp = self.root.join(format!("{LAYOUT_MARKER}.{TEMP_PREFIX}tmp"));
            fs::write(&tmp, self.layout.name())?;
            File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, &marker)?;
            sync_dir(&self.root)?;
        }
        create_dir_all_synced(&self.temp_dir())
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

    /// Removes the temporary files a previous run of zeors left in `tmp` (a crash, or a
    /// kill during an upload). Other files are left alone: clients sharing the directory
    /// keep their uncommitted blobs there. Returns how many were removed.
    pub fn clean_temp(&self) -> io::Result<usize> {
        let mut n = 0;
        let entries = match fs::read_dir(self.temp_dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(TEMP_PREFIX) && entry.file_type()?.is_file() {
                match fs::remove_file(entry.path()) {
                    Ok(()) => n += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(n)
    }
}

fn read_marker(root: &Path) -> io::Result<Option<Layout>> {
    match fs::read_to_string(root.join(LAYOUT_MARKER)) {
        Ok(text) => {
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

fn has_visible_entries(root: &Path) -> io::Result<bool> {
    match fs::read_dir(root) {
        Ok(entries) => {
            for e in entries {
                if !e?.file_name().to_string_lossy().starts_with('.') {
                    return Ok(true);
                }
            }
            Ok(false)
        }
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

/// fsyncs a directory, so that entries created, renamed or removed in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents, fsyncing the parent of each directory created
/// so that the new entries survive a crash.
pub fn create_dir_all_synced(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_all_synced(parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Lost a race with another creator: fine.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Makes a committed blob file read-only, as `ZODB.blob.set_not_writable` does: no write
/// bits, and the read bits of its directory.
pub fn set_not_writable(path: &Path) -> io::Result<()> {
    let mode = fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    let dir_read = path
        .parent()
        .and_then(|d| fs::symlink_metadata(d).ok())
        .map(|m| m.permissions().mode() & 0o444)
        .unwrap_or(0);
    fs::set_permissions(path, fs::Permissions::from_mode((mode & !0o222) | dir_read))
}

/// A second name for `src` at `dst`: a hard link (blob files never change once written,
/// so sharing the data is safe), or a copy where links are not possible.
pub fn link_or_copy(src: &Path, dst: &Path) -> io::Result<()> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::AlreadyExists =>
        {
            Err(e)
        }
        Err(e) => {
            tracing::debug!(src = %src.display(), dst = %dst.display(), error = %e, "cannot hard-link a blob file; copying it");
            fs::copy(src, dst).map(|_| ())
        }
    }
}

/// Removes a file; a file that is already gone is fine.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
