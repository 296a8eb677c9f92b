//! [`MappedFile`]: a file read through a shared memory mapping and written through its
//! descriptor, for a file read often and at random (the Data.fs).

use crate::FileIo;
use parking_lot::RwLock;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Address space mapped beyond the file's end, so that a growing file is remapped once per
/// this many bytes of growth rather than at every commit.
const MAP_HEADROOM: u64 = 1 << 30;

/// The Data.fs as the server uses it: reads are copies out of a shared memory mapping,
/// writes go through the file descriptor (the two see the same page cache).
///
/// A load is one positioned read; as a `pread` it was a fifth of the server's CPU time per
/// load (kernel entry, page-cache lookup, copy), measured with perf. From the mapping it is
/// a memcpy. The mapping extends past the end of the file so that appends need no remap;
/// a read is served from it only below the file length this object knows — every write
/// and truncation goes through it, and the storage's flock keeps other writers out — so
/// the pages past the end of the file, which would raise SIGBUS, are never touched.
/// Everything else (past the known end, or when mapping fails) falls back to `pread`.
pub struct MappedFile {
    file: File,
    len: AtomicU64,
    map: RwLock<Option<Arc<memmap2::Mmap>>>,
}

impl MappedFile {
    pub fn new(file: File) -> io::Result<MappedFile> {
        let len = file.metadata()?.len();
        let f = MappedFile {
            file,
            len: AtomicU64::new(len),
            map: RwLock::new(None),
        };
        f.remap(len);
        Ok(f)
    }

    /// Maps the file with headroom past `len`; on failure reads keep using `pread`.
    fn remap(&self, len: u64) {
        let size = len.saturating_add(MAP_HEADROOM);
        let Ok(size) = usize::try_from(size) else {
            return;
        };
        // SAFETY: the mapping is read-only and only read below the file length recorded
        // in `self.len`, which every write and truncation through this object updates
        // (truncations lower it before the file shrinks). Other processes do not write
        // the file: the storage holds its lock file while writing.
        match unsafe { memmap2::MmapOptions::new().len(size).map(&self.file) } {
            Ok(m) => *self.map.write() = Some(Arc::new(m)),
            Err(e) => tracing::debug!(error = %e, "mapping the storage file failed; using pread"),
        }
    }
}

impl FileIo for MappedFile {
    /// Replaces the mapping with a fresh one, so that the pages the old one touched no
    /// longer count in the process's resident set. Opening a file without a usable index
    /// scans all of it through the mapping; those pages stay in the page cache (shared,
    /// reclaimable), but left mapped they make the server look as big as its Data.fs in
    /// `ps` and in RSS-based monitoring until the kernel reclaims them.
    fn release_pages(&self) {
        self.remap(self.len.load(Ordering::Acquire));
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end <= self.len.load(Ordering::Acquire) {
            let map = self.map.read().clone();
            if let Some(m) = map {
                if end <= m.len() as u64 {
                    buf.copy_from_slice(&m[offset as usize..end as usize]);
                    return Ok(());
                }
                // The file outgrew the mapping.
                drop(m);
                self.remap(self.len.load(Ordering::Acquire));
            }
        }
        FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.file, buf, offset)?;
        self.len
            .fetch_max(offset.saturating_add(buf.len() as u64), Ordering::AcqRel);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len < self.len.load(Ordering::Acquire) {
            self.len.store(len, Ordering::Release);
        }
        File::set_len(&self.file, len)?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(&self.file)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_reads_follow_writes_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let f = MappedFile::new(file).unwrap();
        f.write_all_at(b"hello world", 0).unwrap();
        let mut buf = [0u8; 5];
        f.read_exact_at(&mut buf, 6).unwrap();
        assert_eq!(&buf, b"world");
        // Past the end is an error, not a SIGBUS.
        assert!(f.read_exact_at(&mut buf, 10).is_err());
        f.set_len(4).unwrap();
        assert!(f.read_exact_at(&mut buf, 2).is_err());
        f.write_all_at(b"o, again", 4).unwrap();
        let mut all = [0u8; 12];
        f.read_exact_at(&mut all, 0).unwrap();
        assert_eq!(&all, b"hello, again");
        // Growth beyond the mapped headroom is served after a remap (or by pread).
        f.write_all_at(b"tail", MAP_HEADROOM + 100).unwrap();
        let mut tail = [0u8; 4];
        f.read_exact_at(&mut tail, MAP_HEADROOM + 100).unwrap();
        assert_eq!(&tail, b"tail");
    }
}
