//! [`Real`]: the host's file system, through `std::fs`.

use crate::{DirEntry, FileIo, Fs, Lock, MappedFile, Meta, Mode};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Opens `path` for reading if it is a regular file; a symbolic link (as the last
/// component), a FIFO, a device or a directory is refused with an error naming it
/// (`O_NONBLOCK`, so that a FIFO planted there cannot block the open).
pub fn open_regular_nofollow(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| not_followed(e, path))?;
    check_regular(&file, path)?;
    Ok(file)
}

/// Refuses anything but a regular file.
pub fn check_regular(file: &File, path: &Path) -> io::Result<()> {
    if file.metadata()?.file_type().is_file() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ))
    }
}

/// `O_NOFOLLOW` met a symbolic link: say so instead of "too many levels of links".
pub fn not_followed(e: io::Error, path: &Path) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link (or below one), which blob files never are",
                path.display()
            ),
        ),
        _ => e,
    }
}

/// No write bits, and `dir_read` (the read bits of the file's directory), set on the open
/// `file` (fchmod: the file opened, whatever its name points to by now).
pub fn chmod_not_writable(file: &File, dir_read: u32) -> io::Result<()> {
    let mode = file.metadata()?.permissions().mode() & 0o7777;
    file.set_permissions(fs::Permissions::from_mode((mode & !0o222) | dir_read))
}

/// The host's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Real;

impl Real {
    /// Opens `path` as a `std::fs::File`.
    pub fn open_file(path: &Path, mode: Mode) -> io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true);
        match mode {
            Mode::Read => {}
            Mode::Write => {
                o.write(true);
            }
            Mode::Create => {
                o.write(true).create(true).truncate(false);
            }
            Mode::CreateNew => {
                o.write(true).create_new(true);
            }
            Mode::Truncate => {
                o.write(true).create(true).truncate(true);
            }
        }
        o.open(path)
    }
}

impl Fs for Real {
    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn FileIo>> {
        Ok(Arc::new(Self::open_file(path, mode)?))
    }

    fn open_mapped(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn FileIo>> {
        Ok(Arc::new(MappedFile::new(Self::open_file(path, mode)?)?))
    }

    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        let m = fs::metadata(path)?;
        Ok(Meta {
            is_dir: m.is_dir(),
            len: if m.is_dir() { 0 } else { m.len() },
        })
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::hard_link(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for e in fs::read_dir(path)? {
            let e = e?;
            let t = e.file_type()?;
            out.push(DirEntry {
                name: e.file_name(),
                is_dir: t.is_dir(),
                is_file: t.is_file(),
            });
        }
        Ok(out)
    }

    /// No write bits, and the read bits of its directory (`ZODB.blob.set_not_writable`).
    /// A symbolic link is refused, never followed (the mode of its target is not ours to
    /// change).
    fn set_not_writable(&self, path: &Path) -> io::Result<()> {
        let file = open_regular_nofollow(path)?;
        let dir_read = path
            .parent()
            .and_then(|d| fs::symlink_metadata(d).ok())
            .map(|m| m.permissions().mode() & 0o444)
            .unwrap_or(0);
        chmod_not_writable(&file, dir_read)
    }

    /// The `flock(LOCK_EX|LOCK_NB)` that `zc.lockfile` takes for Python ZODB, so that zeors
    /// and a Python process never write one file at the same time; the file says
    /// `" <pid>\n"`, as zc.lockfile writes it, and is never deleted.
    fn lock(&self, path: &Path) -> io::Result<Lock> {
        let file = Self::open_file(path, Mode::Create)?;
        // SAFETY: flock on a valid descriptor owned by `file`; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                let holder = fs::read_to_string(path).unwrap_or_default();
                let holder = holder.trim();
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is locked by another process{}",
                        path.display(),
                        if holder.is_empty() {
                            String::new()
                        } else {
                            format!(" (pid {holder})")
                        }
                    ),
                ));
            }
            return Err(err);
        }
        let content = format!(" {}\n", std::process::id());
        FileExt::write_all_at(&file, content.as_bytes(), 0)?;
        File::set_len(&file, content.len() as u64)?;
        Ok(Lock(Box::new(file)))
    }

    fn host_path(&self, path: &Path) -> Option<PathBuf> {
        Some(path.to_owned())
    }

    /// Copies a regular file, never through a symbolic link, to a new file.
    fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        let src = open_regular_nofollow(from)?;
        let mut dst = OpenOptions::new().write(true).create_new(true).open(to)?;
        io::copy(&mut &src, &mut dst).map(|_| ())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails_with_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("Data.fs.lock");
        let a = Real.lock(&p).unwrap();
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            format!(" {}\n", std::process::id())
        );
        let e = Real.lock(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let e = e.to_string();
        assert!(e.contains("locked by another process"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(a);
        Real.lock(&p).unwrap();
    }
}
