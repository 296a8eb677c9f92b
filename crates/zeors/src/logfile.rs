//! A log file that can be reopened (after logrotate moved it away) without restarting.

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The writer handed to `tracing_subscriber`; clones share the file.
#[derive(Clone)]
pub struct LogFile {
    inner: Arc<Mutex<(PathBuf, File)>>,
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    pub fn open(path: &Path) -> io::Result<LogFile> {
        let file = open_append(path)?;
        Ok(LogFile {
            inner: Arc::new(Mutex::new((path.to_path_buf(), file))),
        })
    }

    /// Opens the path again, so writes go to a new file once the old one was rotated.
    pub fn reopen(&self) -> io::Result<()> {
        let mut guard = self.inner.lock();
        let file = open_append(&guard.0)?;
        guard.1 = file;
        Ok(())
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.lock().1.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.lock().1.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = LogFile;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
