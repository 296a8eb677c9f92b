//! `Data.fs.lock`: the same `flock(LOCK_EX|LOCK_NB)` that `zc.lockfile` takes for Python
//! ZODB, so a zeors server and a Python process never write one file at the same time.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Held for as long as the storage is open for writing; dropping it releases the lock.
/// The file itself is never deleted (as in Python).
#[derive(Debug)]
pub struct LockFile {
    _file: File,
}

impl LockFile {
    /// Takes the lock or fails at once, naming the holder's pid when the file says it.
    pub fn acquire(path: &Path) -> Result<LockFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // SAFETY: flock on a valid descriptor owned by `file`; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                let holder = std::fs::read_to_string(path).unwrap_or_default();
                let holder = holder.trim();
                return Err(Error::Locked(format!(
                    "{} is locked by another process{}: the storage is already open for writing",
                    path.display(),
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {holder})")
                    }
                )));
            }
            return Err(err.into());
        }
        // zc.lockfile writes " <pid>\n" at the start and truncates after it.
        let content = format!(" {}\n", std::process::id());
        file.write_all_at(content.as_bytes(), 0)?;
        file.set_len(content.len() as u64)?;
        Ok(LockFile { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_with_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("Data.fs.lock");
        let a = LockFile::acquire(&p).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!(" {}\n", std::process::id())
        );
        let e = LockFile::acquire(&p).unwrap_err().to_string();
        assert!(e.contains("locked by another process"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(a);
        LockFile::acquire(&p).unwrap();
    }
}
