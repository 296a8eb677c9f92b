//! Blobs in proxy mode: how the upstream storage reads and writes them.
//!
//! Two set-ups, as with Python's `ClientStorage`:
//! - **A blob cache** (the default): blob files are fetched from upstream with `sendBlob`
//!   on first use and kept in a size-bounded [`BlobCache`]; downstream uploads are
//!   forwarded upstream with `storeBlobStart` / `storeBlobChunk` / `storeBlobEnd`, read
//!   from the uploaded file chunk by chunk and sent at the speed of the upstream link
//!   (at most [`UPLOAD_WINDOW`] bytes queued), and, once committed, kept in the cache too.
//! - **A shared blob directory** (`shared-blob-dir`): the proxy sees upstream's own blob
//!   directory (a network file system). Blobs are read there directly, and an upload is
//!   linked into it and announced with `storeBlobShared`.

use crate::blobcache::{BlobCache, BlobCacheConfig};
use bytes::{Bytes, BytesMut};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tracing::debug;
use zeo_client::Connection;
use zeo_proto::reply::Info;
use zeo_proto::{Request, Value};
use zodb::blob::BlobDir;
use zodb::{Oid, StorageError, StorageMetric, Tid};

/// Bytes of blob data per `storeBlobChunk` sent upstream.
const UPLOAD_CHUNK: usize = 1 << 20;
/// Bytes an upload may have queued for the upstream socket before it reads more.
pub const UPLOAD_WINDOW: usize = 8 << 20;

/// Blob settings of the proxy.
#[derive(Debug, Clone)]
pub struct BlobConfig {
    /// The blob cache directory, or with `shared` upstream's blob directory.
    pub dir: PathBuf,
    /// Bound of the blob cache (ignored when shared).
    pub max_bytes: u64,
    /// `dir` is upstream's blob directory, shared with it.
    pub shared: bool,
}

/// The proxy's blobs: a cache, or the directory shared with upstream.
pub enum ProxyBlobs {
    Cache(Arc<BlobCache>),
    Shared(BlobDir),
}

impl ProxyBlobs {
    pub fn open(config: &BlobConfig) -> io::Result<ProxyBlobs> {
        if config.shared {
            // Upstream created it; its layout is whatever `.layout` says.
            let dir = BlobDir::open(&config.dir, false)?;
            if !dir.temp_dir().is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{} is not a blob directory (no tmp/): is it upstream's, and mounted?",
                        config.dir.display()
                    ),
                ));
            }
            Ok(ProxyBlobs::Shared(dir))
        } else {
            Ok(ProxyBlobs::Cache(Arc::new(BlobCache::open(
                &BlobCacheConfig {
                    dir: config.dir.clone(),
                    max_bytes: config.max_bytes,
                },
            )?)))
        }
    }

    /// Where downstream uploads are written.
    pub fn temp_dir(&self) -> PathBuf {
        match self {
            ProxyBlobs::Cache(c) => c.temp_dir(),
            ProxyBlobs::Shared(d) => d.temp_dir(),
        }
    }

    /// `storeBlobShared` from downstream clients is possible only when they share the
    /// directory that upstream uses too.
    pub fn shared_dir(&self, oid: Oid) -> Result<PathBuf, StorageError> {
        match self {
            ProxyBlobs::Shared(d) => Ok(d.oid_dir(oid)),
            ProxyBlobs::Cache(_) => Err(StorageError::Unsupported(
                "storeBlobShared (this proxy has a blob cache, not a shared blob directory)",
            )),
        }
    }

    /// The cache, if that is the set-up (for the download callbacks).
    pub fn cache(&self) -> Option<&Arc<BlobCache>> {
        match self {
            ProxyBlobs::Cache(c) => Some(c),
            ProxyBlobs::Shared(_) => None,
        }
    }

    /// Opens the blob file of revision `serial` of `oid`: cached, fetched over `link`
    /// (used only on a miss: with upstream away, cached blobs are still served), or in
    /// the shared directory.
    pub async fn open_blob(
        &self,
        oid: Oid,
        serial: Tid,
        link: Result<Connection, StorageError>,
    ) -> Result<File, StorageError> {
        match self {
            ProxyBlobs::Cache(cache) => {
                cache
                    .open_blob(oid, serial, move || async move {
                        let conn = link?;
                        conn.call(&Request::SendBlob { oid, serial }).await?;
                        Ok(())
                    })
                    .await
            }
            // Never through a symbolic link planted in the shared directory.
            ProxyBlobs::Shared(dir) => match dir.open_blob_file(oid, serial) {
                Ok(f) => Ok(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::PosKey(oid)),
                Err(e) => Err(e.into()),
            },
        }
    }

    /// Upstream invalidated these objects (see [`BlobCache::invalidated`]).
    pub fn invalidated(&self, oids: &[Oid]) {
        if let ProxyBlobs::Cache(c) = self {
            c.invalidated(oids);
        }
    }

    /// Sends a downstream blob store upstream, as part of transaction `txn` (the client
    /// has sent the matching `storea` already, as `ClientStorage.storeBlob` does).
    pub async fn forward(
        &self,
        conn: &Connection,
        oid: Oid,
        serial: Tid,
        data: &Bytes,
        file: &Path,
        txn: &Value,
    ) -> Result<(), StorageError> {
        match self {
            ProxyBlobs::Shared(dir) => {
                // A name of ours in the object's directory, as a client would write it;
                // upstream moves it into place at its vote, or removes it on abort.
                let oid_dir = dir.oid_dir(oid);
                let name = zodb::blob::unique_name(&zodb::blob::tid_repr(serial), ".tmp-");
                let (oid_dir2, file2, name2) = (oid_dir.clone(), file.to_owned(), name.clone());
                tokio::task::spawn_blocking(move || {
                    // Only a regular file: a link planted by a downstream client sharing
                    // the directory is refused here, not handed to upstream.
                    zodb::blob::open_regular_nofollow(&file2)?;
                    std::fs::create_dir_all(&oid_dir2)?;
                    zodb::blob::link_or_copy(&file2, &oid_dir2.join(&name2))
                })
                .await
                .map_err(io::Error::other)??;
                conn.send(&Request::StoreBlobShared {
                    oid,
                    serial,
                    data: data.clone(),
                    filename: name,
                    txn: txn.clone(),
                })?;
                Ok(())
            }
            ProxyBlobs::Cache(_) => {
                conn.send(&Request::StoreBlobStart)?;
                // Once started, the upload is always ended, even if reading fails: the
                // upstream server must not be left with an upload in progress (its next
                // `storeBlobStart` would fail and drop the connection). The caller then
                // aborts the transaction.
                let sent = send_chunks(conn, file).await;
                conn.send(&Request::StoreBlobEnd {
                    oid,
                    serial,
                    data: data.clone(),
                    txn: txn.clone(),
                })?;
                let bytes = sent?;
                debug!(%oid, bytes, "blob forwarded upstream");
                Ok(())
            }
        }
    }

    /// A downstream transaction with blobs was committed upstream as `tid`: keep its
    /// files (those whose committed data is what was sent) so that reading them back
    /// does not go upstream. Must run before the uploads are removed.
    pub async fn committed(&self, tid: Tid, blobs: Vec<(Oid, PathBuf)>, changed: &[Oid]) {
        let ProxyBlobs::Cache(cache) = self else {
            return;
        };
        let keep: Vec<(Oid, PathBuf)> = blobs
            .into_iter()
            .rev()
            .filter(|(oid, _)| !changed.contains(oid))
            .collect();
        if keep.is_empty() {
            return;
        }
        let cache = cache.clone();
        // Hard links and renames: quick, but file-system calls all the same.
        let kept = tokio::task::spawn_blocking(move || {
            let mut done = std::collections::HashSet::new();
            for (oid, file) in keep {
                // The last upload of an oid is the one committed.
                if done.insert(oid) {
                    if let Err(e) = cache.keep_copy(oid, tid, &file) {
                        debug!(%oid, %tid, error = %e, "could not keep an uploaded blob in the cache");
                    }
                }
            }
        });
        let _ = kept.await;
    }

    /// Figures for the metrics endpoint.
    pub fn metrics(&self) -> Vec<StorageMetric> {
        let ProxyBlobs::Cache(cache) = self else {
            return Vec::new();
        };
        let s = cache.stats();
        let m = |name, help, counter, value: u64| StorageMetric {
            name,
            help,
            counter,
            value: value as f64,
        };
        vec![
            m(
                "blob_cache_hits",
                "Blobs sent from the proxy's blob cache.",
                true,
                s.hits,
            ),
            m(
                "blob_cache_misses",
                "Blobs fetched from upstream.",
                true,
                s.misses,
            ),
            m(
                "blob_cache_evictions",
                "Blob files evicted from the blob cache.",
                true,
                s.evictions,
            ),
            m(
                "blob_cache_bytes",
                "Bytes of blob files in the blob cache.",
                false,
                s.bytes,
            ),
            m(
                "blob_cache_files",
                "Blob files in the blob cache.",
                false,
                s.files,
            ),
        ]
    }
}

/// Whether a `get_info` answer lists `IBlobStorage`: without it, a server drops a
/// connection that uploads a blob.
pub fn advertises_blobs(info: &Info) -> bool {
    info.provides("IBlobStorage")
}

/// Streams `file` upstream as `storeBlobChunk`s, pacing on the connection's queue.
async fn send_chunks(conn: &Connection, file: &Path) -> Result<u64, StorageError> {
    let mut f = tokio::fs::File::open(file).await?;
    let mut total = 0u64;
    loop {
        conn.wait_queued_below(UPLOAD_WINDOW).await;
        let mut buf = BytesMut::with_capacity(UPLOAD_CHUNK);
        while buf.len() < UPLOAD_CHUNK {
            if f.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        if buf.is_empty() {
            return Ok(total);
        }
        total += buf.len() as u64;
        conn.send(&Request::StoreBlobChunk {
            chunk: buf.freeze(),
        })?;
    }
}
