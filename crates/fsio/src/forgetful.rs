//! [`Forgetful`]: a [`SimFs`] that forgets some syncs, for the negative controls of crash
//! tests. A crash test must be able to fail: run on a disk that drops the syncs of one
//! file or of some directories, its checks must see the data or entries lost.

use crate::simfs::SimFs;
use crate::{DirEntry, FileIo, Fs, Lock, Meta, Mode};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A [`SimFs`] that forgets some syncs, for the negative controls of crash tests (a test
/// must be able to see a missing sync): the syncs of files whose name ends with
/// `file_suffix`, and of the directories under `dirs_under`.
#[derive(Debug)]
pub struct Forgetful {
    pub inner: SimFs,
    pub file_suffix: Option<&'static str>,
    pub dirs_under: Option<&'static str>,
}

struct NoSync(Arc<dyn FileIo>);

impl FileIo for NoSync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        self.0.size()
    }
}

impl Fs for Forgetful {
    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn FileIo>> {
        let f = self.inner.open(path, mode)?;
        let forget = self
            .file_suffix
            .is_some_and(|s| path.to_string_lossy().ends_with(s));
        Ok(if forget { Arc::new(NoSync(f)) } else { f })
    }
    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        self.inner.metadata(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.hard_link(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        if self.dirs_under.is_some_and(|d| path.starts_with(d)) {
            Ok(())
        } else {
            self.inner.sync_dir(path)
        }
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        self.inner.read_dir(path)
    }
    fn set_not_writable(&self, path: &Path) -> io::Result<()> {
        self.inner.set_not_writable(path)
    }
    fn lock(&self, path: &Path) -> io::Result<Lock> {
        self.inner.lock(path)
    }
    fn host_path(&self, _: &Path) -> Option<PathBuf> {
        None
    }
}
