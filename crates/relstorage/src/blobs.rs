//! Blobs, stored in the database as RelStorage stores them: one PostgreSQL large object
//! per revision, referenced from `blob_chunk` (chunk 0; older RelStorage versions split a
//! blob over several chunks, which are read in `chunk_num` order).
//!
//! Invariants:
//! - Blob data never passes through memory whole: uploads go to the large object and
//!   downloads come from it in pieces of [`BLOB_PIECE`](crate::commit::BLOB_PIECE).
//! - The local blob directory (`blob-dir`) only stages uploads (`tmp/`) and caches
//!   downloaded revisions (`cache/`), bounded by `blob-cache-size`; a cached file is
//!   complete (written under a temporary name, then renamed) and never changes, since a
//!   revision never does. Removing a cached file never disturbs a reader that has it open.
//! - A download reads every piece in one repeatable-read snapshot, so a concurrent pack
//!   cannot cut a blob in half.

use crate::commit::BLOB_PIECE;
use crate::db::{self, storage_error, TxnConn};
use crate::storage::Inner;
use std::io::Write;
use std::path::PathBuf;
use zodb::{Oid, Result, StorageError, Tid};

pub(crate) fn cache_dir(inner: &Inner) -> Result<PathBuf> {
    let dir = inner
        .opts
        .blob_dir
        .as_ref()
        .ok_or(StorageError::Unsupported("blobs"))?;
    Ok(dir.join("cache"))
}

pub(crate) async fn open_blob(inner: &Inner, oid: Oid, serial: Tid) -> Result<std::fs::File> {
    let dir = cache_dir(inner)?;
    let path = dir.join(format!("{:016x}-{:016x}.blob", oid.0, serial.0));
    if let Ok(f) = std::fs::File::open(&path) {
        return Ok(f);
    }
    let tmp = dir.join(zodb::blob::unique_name("download", ".tmp"));
    let result = download(inner, oid, serial, &tmp).await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path)?;
    let f = std::fs::File::open(&path)?;
    trim(&dir, inner.opts.blob_cache_bytes, &path);
    Ok(f)
}

async fn download(inner: &Inner, oid: Oid, serial: Tid, to: &std::path::Path) -> Result<()> {
    let conn = TxnConn::new(inner.pool.get().await.map_err(db::pool_error)?);
    conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(storage_error)?;
    let result: Result<()> = async {
        let chunks: Vec<u32> = conn
            .query(
                "SELECT chunk FROM blob_chunk WHERE zoid = $1 AND tid = $2 ORDER BY chunk_num",
                &[&(oid.0 as i64), &(serial.0 as i64)],
            )
            .await
            .map_err(storage_error)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if chunks.is_empty() {
            return Err(StorageError::PosKey(oid));
        }
        let get = conn
            .prepare_cached("SELECT lo_get($1::oid, $2, $3)")
            .await
            .map_err(storage_error)?;
        let mut out = std::fs::File::create(to)?;
        let piece = BLOB_PIECE as i32;
        for lo in chunks {
            let mut offset: i64 = 0;
            loop {
                let data: Vec<u8> = conn
                    .query_one(&get, &[&lo, &offset, &piece])
                    .await
                    .map_err(storage_error)?
                    .get(0);
                if data.is_empty() {
                    break;
                }
                out.write_all(&data)?;
                offset += data.len() as i64;
                if data.len() < BLOB_PIECE {
                    break;
                }
            }
        }
        out.flush()?;
        Ok(())
    }
    .await;
    conn.release().await;
    result
}

/// Removes the oldest cached blobs until the cache fits `max` bytes (`keep` stays).
fn trim(dir: &std::path::Path, max: Option<u64>, keep: &std::path::Path) {
    let Some(max) = max else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "blob"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    if total <= max {
        return;
    }
    files.sort();
    for (_, len, path) in files {
        if total <= max {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}
