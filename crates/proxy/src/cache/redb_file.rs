//! The cache index's redb database on the cache's file system.
//!
//! On the host's file system redb opens the file itself (its own file backend, which also
//! takes the lock that keeps a second process out of the cache). On any other [`Fs`] — a
//! simulated disk in the crash tests — the same file is reached through [`FileIo`], with
//! the same operations redb's file backend makes: positioned reads and writes, length
//! changes and `fdatasync`.

use fsio::{FileIo, Fs, Mode};
use redb::{Database, DatabaseError, StorageBackend};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// Opens (or creates) the database at `path` with `cache_size` bytes of page cache.
pub(super) fn open(
    fs: &Arc<dyn Fs>,
    path: &Path,
    cache_size: u64,
) -> Result<Database, DatabaseError> {
    let mut builder = Database::builder();
    builder.set_cache_size(usize::try_from(cache_size).unwrap_or(16 << 20));
    match fs.host_path(path) {
        Some(p) => builder.create(p),
        None => builder.create_with_backend(IoBackend(fs.open(path, Mode::Create)?)),
    }
}

/// A [`FileIo`] as redb's storage.
struct IoBackend(Arc<dyn FileIo>);

impl std::fmt::Debug for IoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoBackend")
    }
}

impl StorageBackend for IoBackend {
    fn len(&self) -> io::Result<u64> {
        self.0.size()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }
}
