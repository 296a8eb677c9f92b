//! The file operations the storage needs, behind a trait so that tests can substitute a
//! file that simulates power loss (see [`crate::sim`]).
//!
//! Everything is positioned I/O: readers never share a file cursor, so any number of
//! loads can run at once, and concurrently with the single committer appending at the end.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
