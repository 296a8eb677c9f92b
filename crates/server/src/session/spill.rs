//! Where a large transaction's data waits for its vote: on disk, not in memory.
//!
//! A client may store any amount of data between `tpc_begin` and the vote (the stock
//! server writes it to a temporary file as it arrives). Once a transaction has more than
//! the threshold in memory, the data of each further operation is appended to the
//! transaction's spill file, and the operation holds a view of it instead: a [`Bytes`]
//! slice of one shared read-only mapping of the file. Storages then take the data as any
//! other `Bytes` — the vote reads it from the page cache while it writes, and nothing is
//! built again in memory.
//!
//! The file is anonymous (unlinked as it is created, in `TMPDIR` as the stock server's),
//! so nothing is left behind by a crash. It is sized up front (sparse) to the
//! transaction's bound and mapped once, so that every view points into the same mapping:
//! one mapping per spilling transaction, whatever the number of its records. Its pages
//! are written with `pwrite` and only read through the mapping, and the mapping's pages
//! are given back after each vote ([`Spill::release_pages`]), so that they count as
//! reclaimable page cache, not as the server's memory.

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// One transaction's spilling.
#[derive(Debug)]
pub struct Spill {
    /// Data kept in memory before spilling starts.
    threshold: u64,
    /// The transaction's bound: the size of the file and mapping.
    capacity: u64,
    /// Data of this transaction kept in memory so far.
    in_memory: u64,
    file: Option<SpillFile>,
}

#[derive(Debug)]
struct SpillFile {
    file: File,
    map: Arc<Mmap>,
    /// Bytes written so far; the next data goes here.
    len: u64,
}

/// A mapping shared by the views of one spill file (what [`Bytes::from_owner`] owns).
struct View(Arc<Mmap>);

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Spill {
    pub fn new(threshold: u64, capacity: u64) -> Spill {
        Spill {
            threshold,
            capacity,
            in_memory: 0,
            file: None,
        }
    }

    /// Bytes written to the spill file (0 when the transaction has not spilled).
    pub fn spilled(&self) -> u64 {
        self.file.as_ref().map_or(0, |f| f.len)
    }

    /// Takes one operation's data: as it is while the transaction's data in memory stays
    /// within the threshold, else written to the spill file and returned as a view of it.
    /// Data that would not fit within the transaction's bound is returned as it is: the
    /// transaction is refused anyway (see [`super::txn_core`]) and drops it.
    pub fn admit(&mut self, data: Bytes) -> io::Result<Bytes> {
        let len = data.len() as u64;
        if self.file.is_none() && self.in_memory + len <= self.threshold {
            self.in_memory += len;
            return Ok(data);
        }
        if self.spilled().saturating_add(len) > self.capacity || data.is_empty() {
            return Ok(data);
        }
        let f = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(SpillFile::create(self.capacity)?),
        };
        let at = f.len;
        f.file.write_all_at(&data, at)?;
        f.len += len;
        let start = usize::try_from(at).map_err(io::Error::other)?;
        let end = usize::try_from(at + len).map_err(io::Error::other)?;
        Ok(Bytes::from_owner(View(f.map.clone())).slice(start..end))
    }

    /// Gives back the pages the vote read through the mapping: they stay in the page
    /// cache (or are read again from the file by a later vote), but no longer count as
    /// this process's memory.
    pub fn release_pages(&self) {
        if let Some(f) = &self.file {
            // SAFETY: the mapping is a read-only shared mapping of a file, which
            // MADV_DONTNEED only unmaps from this process: a later access reads the
            // same bytes from the file again, so no view can see different data.
            if let Err(e) = unsafe { f.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) } {
                tracing::debug!(error = %e, "madvise on a spill file failed");
            }
        }
    }
}

impl SpillFile {
    fn create(capacity: u64) -> io::Result<SpillFile> {
        let file = tempfile::tempfile()?;
        // Sparse: only what is written takes disk space.
        file.set_len(capacity)?;
        let len = usize::try_from(capacity).map_err(io::Error::other)?;
        // SAFETY: the file is anonymous (unlinked on creation) and owned here, so no
        // other process can truncate or change it under the mapping; this code only
        // appends to it, past every range a view was made of.
        let map = unsafe { MmapOptions::new().len(len).map(&file)? };
        Ok(SpillFile {
            file,
            map: Arc::new(map),
            len: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_data_stays_in_memory_and_the_rest_is_read_back_from_the_file() {
        let mut s = Spill::new(10, 4096);
        let a = Bytes::from_static(b"0123456789");
        let kept = s.admit(a.clone()).unwrap();
        assert_eq!(
            kept.as_ptr(),
            a.as_ptr(),
            "within the threshold: not copied"
        );
        assert_eq!(s.spilled(), 0);
        let mut views = Vec::new();
        for i in 0..50u8 {
            let data = Bytes::from(vec![i; usize::from(i) + 1]);
            let v = s.admit(data.clone()).unwrap();
            assert_ne!(
                v.as_ptr(),
                data.as_ptr(),
                "past the threshold: spilled ({i}, {})",
                s.spilled()
            );
            views.push((data, v));
        }
        assert_eq!(s.spilled(), (1..=50).sum::<u64>());
        s.release_pages();
        for (data, v) in &views {
            assert_eq!(data, v);
        }
        // The views outlive the spill: the mapping goes with the last of them.
        drop(s);
        assert_eq!(views[49].1, Bytes::from(vec![49u8; 50]));
    }

    #[test]
    fn data_past_the_bound_is_not_written() {
        let mut s = Spill::new(0, 16);
        let v = s.admit(Bytes::from(vec![1u8; 10])).unwrap();
        assert_eq!(&v[..], &[1u8; 10]);
        let big = Bytes::from(vec![2u8; 10]);
        let back = s.admit(big.clone()).unwrap();
        assert_eq!(back.as_ptr(), big.as_ptr());
        assert_eq!(s.spilled(), 10);
    }
}
