//! The files that live beside a `Data.fs`, named as Python's FileStorage names them:
//! `Data.fs.index`, `Data.fs.lock`, `Data.fs.pack`, `Data.fs.old`, `Data.fs.trN`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// `path` with `suffix` appended to its file name (`Data.fs` → `Data.fs.index`).
pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The saved index (Python's `fsIndex.save` format).
pub(crate) fn index(data: &Path) -> PathBuf {
    sibling(data, ".index")
}

/// Where the index is written before it is renamed over [`index`].
pub(crate) fn index_tmp(data: &Path) -> PathBuf {
    sibling(data, ".index.index_tmp")
}

/// The lock file (`zc.lockfile`).
pub(crate) fn lock(data: &Path) -> PathBuf {
    sibling(data, ".lock")
}

/// The packed file while pack writes it.
pub(crate) fn pack(data: &Path) -> PathBuf {
    sibling(data, ".pack")
}

/// The file as it was before the last pack.
pub(crate) fn old(data: &Path) -> PathBuf {
    sibling(data, ".old")
}

/// The `n`th file of bytes cut off a damaged tail.
pub(crate) fn tr(data: &Path, n: u32) -> PathBuf {
    sibling(data, &format!(".tr{n}"))
}
