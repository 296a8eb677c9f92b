//! Opening a storage: the lock, the file (created when asked), the saved index or a
//! scan, the recovery of a damaged tail (its bytes kept in `Data.fs.trN`), the blob
//! directory.

use super::*;
use crate::format::MAGIC_FS30;
use crate::scan::{self, Tail};
use fsio::Mode;

/// An I/O error on `path`: std's error text never names the file, and "Permission
/// denied" alone does not tell an operator which of Data.fs, its `.lock`, `.index` or
/// `.trN` files to look at. The kind is kept.
pub(crate) fn io_at(path: &Path, e: io::Error) -> StorageError {
    StorageError::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Names `path` in an I/O error that does not name it yet (other errors already do).
fn naming(path: &Path, e: StorageError) -> StorageError {
    match e {
        StorageError::Io(e) if !e.to_string().contains(&*path.to_string_lossy()) => io_at(path, e),
        e => e,
    }
}

impl FileStorageCore {
    /// Opens (or creates, see [`Options::create`]) the FileStorage at `path`.
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<FileStorageCore> {
        Self::open_on(fsio::real(), path, options)
    }

    /// [`FileStorageCore::open`] on the file system `fs` (a simulated disk in the crash
    /// tests): the `Data.fs`, its neighbours and the blob directory are all on it.
    pub fn open_on(
        fs: Arc<dyn Fs>,
        path: impl AsRef<Path>,
        options: Options,
    ) -> Result<FileStorageCore> {
        let path = path.as_ref();
        if options.read_only && options.create {
            return Err(StorageError::Value(
                "can't create a read-only FileStorage".into(),
            ));
        }
        let lock = if options.read_only {
            None
        } else {
            let lock_path = paths::lock(path);
            Some(fs.lock(&lock_path).map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    StorageError::from(Error::Locked(format!(
                        "{e}: the storage is already open for writing"
                    )))
                } else {
                    io_at(&lock_path, e)
                }
            })?)
        };
        let io = if options.read_only {
            fs.open_mapped(path, Mode::Read)
                .map_err(|e| io_at(path, e))?
        } else {
            match fs.open_mapped(path, Mode::Write) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound && options.create => {
                    Self::create(&*fs, path).map_err(|e| io_at(path, e))?
                }
                Err(e) => return Err(io_at(path, e)),
            }
        };
        let mut core = Self::open_inner(
            fs,
            io.clone(),
            path.display().to_string(),
            Some(path.to_owned()),
            options,
        )
        .map_err(|e| naming(path, e))?;
        io.release_pages();
        *core.lock.get_mut() = lock;
        Ok(core)
    }

    /// Creates a new, empty storage file at `path`.
    fn create(fs: &dyn Fs, path: &Path) -> io::Result<Arc<dyn FileIo>> {
        let f = fs.open_mapped(path, Mode::CreateNew)?;
        // The magic at once, so a crash right after creation leaves a valid, empty
        // storage; then the directory entry.
        f.write_all_at(&MAGIC_FS30, 0)?;
        f.sync_data()?;
        fsio::sync_parent(fs, path)?;
        tracing::info!(path = %path.display(), "created a new FileStorage");
        Ok(f)
    }

    /// The damaged tail this read-only storage left in place (a writable open moves it to
    /// `.trN` instead): `zeors info` tells it.
    pub fn ignored_tail(&self) -> Option<&TornTail> {
        self.ignored_tail.as_ref()
    }

    /// Opens a storage over any [`FileIo`] (e.g. a [`fsio::sim::SimFile`]). There is no
    /// lock file and no `.index`; bytes cut off a torn tail are logged, not kept.
    pub fn open_io(io: Arc<dyn FileIo>, name: &str, options: Options) -> Result<FileStorageCore> {
        Self::open_inner(fsio::real(), io, name.to_owned(), None, options)
    }

    fn open_inner(
        fs: Arc<dyn Fs>,
        io: Arc<dyn FileIo>,
        name: String,
        path: Option<PathBuf>,
        options: Options,
    ) -> Result<FileStorageCore> {
        let (magic, size) = read_magic(&*io, &name, options.read_only)?;
        if magic == Magic::Fs21 && !options.read_only {
            return Err(StorageError::Value(format!(
                "{name} is an FS21 (Python 2) file: open it read-only, or convert it with \
                 zodbupdate --convert-py3 first"
            )));
        }
        let saved = path
            .as_deref()
            .and_then(|p| load_saved_index(&*fs, &*io, p, size));
        let used_index = saved.is_some();
        let (mut index, start, ltid) = saved.unwrap_or((Index::new(), FIRST_TXN_POS, Tid::ZERO));

        let outcome = if size <= FIRST_TXN_POS {
            scan::ScanOutcome {
                end: FIRST_TXN_POS,
                last_tid: ltid,
                transactions: 0,
                tail: None,
            }
        } else {
            scan::scan(&*io, &name, size, start, ltid, &mut index)
                .map_err(|e| e.in_storage(&name))?
        };
        if !used_index {
            index.shrink_to_fit();
        }
        let mut ignored_tail = None;
        if let Some(tail) = outcome.tail {
            let torn = TornTail {
                tail,
                file_size: size,
            };
            if options.read_only {
                tracing::warn!("{name}: {torn}; left in place (opened read-only)");
                ignored_tail = Some(torn);
            } else {
                recover_tail(&*fs, &*io, &name, path.as_deref(), &torn)?;
            }
        }
        let end = outcome.end;
        let last_tid = outcome.last_tid;
        tracing::debug!(
            name,
            end,
            transactions = outcome.transactions,
            used_index,
            "opened"
        );

        let now = zodb::timestamp::tid_from_unix(zodb::timestamp::now_unix());
        if last_tid > now {
            let secs = zodb::timestamp::tid_to_unix(last_tid) - zodb::timestamp::tid_to_unix(now);
            if secs > 30.0 * 60.0 {
                tracing::error!(name, seconds = secs, "database records in the future");
            } else {
                tracing::warn!(name, seconds = secs, "database records in the future");
            }
        }

        let blobs = match &options.blob_dir {
            Some(dir) => Some(open_blob_dir(&fs, dir, options.read_only)?),
            None => None,
        };
        let max_oid = index.max_oid().map_or(0, |o| o.0);
        let core = FileStorageCore {
            name,
            fs,
            path,
            read_only: options.read_only,
            magic,
            quota: options.quota,
            sync_on_vote: options.sync_on_vote,
            used_index,
            ignored_tail,
            undo_resolution: options.undo_resolution,
            pack_discard_old: options.pack_discard_old,
            pack_without_gc: options.pack_without_gc,
            blobs,
            shared_blob_dir: options.shared_blob_dir,
            live: RwLock::new(Live {
                io,
                index,
                data_end: end,
                snap_end: end,
                snap_tid: last_tid,
            }),
            last_tid: AtomicU64::new(last_tid.0),
            max_oid: Mutex::new(max_oid),
            commit: Mutex::new(CommitState {
                append_pos: end,
                last_tid_used: last_tid,
                staged: None,
                swap_pending: false,
            }),
            commit_cv: Condvar::new(),
            packing: AtomicBool::new(false),
            sink: RwLock::new(None),
            lock: Mutex::new(None),
            closed: AtomicBool::new(false),
        };
        if !used_index && !core.read_only {
            // Python saves after a rebuild too; the next open (ours or Python's) is fast.
            if let Err(e) = core.save_index() {
                tracing::warn!(name = core.name, error = %e, "could not save the index");
            }
        }
        Ok(core)
    }
}

/// Opens the blob directory; a writable storage creates it and removes the temporary
/// files an earlier run left behind.
fn open_blob_dir(fs: &Arc<dyn Fs>, dir: &Path, read_only: bool) -> Result<BlobDir> {
    let context = |e: io::Error| {
        StorageError::Io(io::Error::new(
            e.kind(),
            format!("blob directory {}: {e}", dir.display()),
        ))
    };
    let blobs = BlobDir::open_on(fs.clone(), dir, !read_only).map_err(context)?;
    if !read_only {
        let n = blobs.clean_temp().map_err(context)?;
        if n > 0 {
            tracing::info!(dir = %blobs.temp_dir().display(), files = n, "removed temporary blob files left by an earlier run");
        }
    }
    tracing::info!(dir = %blobs.root().display(), layout = blobs.layout().name(), "blob directory");
    Ok(blobs)
}

/// Reads the magic, initialising an empty file (writable). Returns it with the file size.
fn read_magic(io: &dyn FileIo, name: &str, read_only: bool) -> Result<(Magic, u64)> {
    let size = io.size()?;
    if size == 0 {
        if read_only {
            return Ok((Magic::Fs30, 0));
        }
        io.write_all_at(&MAGIC_FS30, 0)?;
        io.sync_data()?;
        return Ok((Magic::Fs30, 4));
    }
    if size < 4 {
        return Err(Error::Format(format!("{name} is {size} bytes, too short for a magic")).into());
    }
    let mut m = [0u8; 4];
    io.read_exact_at(&mut m, 0)?;
    let magic = Magic::parse(m)
        .ok_or_else(|| Error::Format(format!("{name} starts with {m:02x?}, not FS30 or FS21")))?;
    Ok((magic, size))
}

/// `<path>.index` when it parses and passes the sanity check: `(index, pos, tid at pos)`.
/// Any problem just means "no index" (the file is scanned instead).
fn load_saved_index(
    fs: &dyn Fs,
    io: &dyn FileIo,
    path: &Path,
    size: u64,
) -> Option<(Index, u64, Tid)> {
    let ipath = paths::index(path);
    if !fsio::exists(fs, &ipath) {
        return None;
    }
    match crate::index_file::load(fs, &ipath) {
        Ok((pos, index)) => match scan::check_index_sanity(io, size, &index, pos) {
            Some(tid) => Some((index, pos, tid)),
            None => {
                tracing::warn!(index = %ipath.display(), "ignoring index: it does not match the data file");
                None
            }
        },
        Err(e) => {
            tracing::warn!(index = %ipath.display(), error = %e, "ignoring index");
            None
        }
    }
}

/// Removes a damaged tail at open (writable): the cut bytes go to the first free
/// `<path>.trN` (not for a fragment shorter than a header, as in Python).
fn recover_tail(
    fs: &dyn Fs,
    io: &dyn FileIo,
    name: &str,
    path: Option<&Path>,
    torn: &TornTail,
) -> Result<()> {
    let pos = torn.tail.pos();
    let size = torn.file_size;
    match (&torn.tail, path) {
        // Python truncates a fragment without keeping a copy.
        (Tail::Short { .. }, _) => tracing::warn!("{name}: {torn}; truncating it"),
        (Tail::Torn { .. }, Some(path)) => {
            let kept = save_cut_bytes(fs, io, path, pos, size)?;
            tracing::warn!(
                "{name}: {torn}; moved to {} and cut off (the transactions before it are intact)",
                kept.display()
            );
        }
        (Tail::Torn { .. }, None) => tracing::warn!("{name}: {torn}; discarding it"),
    }
    io.set_len(pos)?;
    io.sync_data()?;
    Ok(())
}

/// Copies `[pos, size)` into the first `<path>.trN` that does not exist yet.
fn save_cut_bytes(
    fs: &dyn Fs,
    io: &dyn FileIo,
    path: &Path,
    pos: u64,
    size: u64,
) -> Result<PathBuf> {
    for i in 0u32.. {
        let tr = paths::tr(path, i);
        let f = match fs.open(&tr, Mode::CreateNew) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_at(&tr, e)),
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut p = pos;
        while p < size {
            let n = crate::format::mem_len((size - p).min(buf.len() as u64));
            io.read_exact_at(&mut buf[..n], p)?;
            f.write_all_at(&buf[..n], p - pos)
                .map_err(|e| io_at(&tr, e))?;
            p += n as u64;
        }
        f.sync_data().map_err(|e| io_at(&tr, e))?;
        // The copy must survive a crash before the truncation does.
        fsio::sync_parent(fs, &tr).map_err(|e| io_at(&tr, e))?;
        return Ok(tr);
    }
    Err(Error::Value(format!("no free .trN name for {}", path.display())).into())
}
