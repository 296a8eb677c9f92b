//! A session's blob requests (zeo-wire.md §3.5).
//!
//! **Uploads.** `storeBlobStart`, `storeBlobChunk`…, `storeBlobEnd(oid, serial, data, txn)`
//! stream a file into the storage's [`blob_temp_dir`](zodb::Storage::blob_temp_dir) as
//! the chunks arrive: nothing but the chunk being written is held in memory, and a disk
//! slower than the network slows the reading of this connection (the chunk write is
//! awaited before the next message is read). `storeBlobEnd` fsyncs the file outside the
//! commit lock and buffers a [`TxnOp::StoreBlob`]. An upload the server cannot write (a
//! full disk, an I/O error) does not close the connection: its partial file is removed at
//! once, the rest of its chunks are read and dropped, and the transaction's vote fails
//! with the reason ([`Event::OpLost`]), as a store that cannot be kept does. The client
//! gets a clear error and its connection (and everyone else's) stays up.
//!
//! `storeBlobShared` names a file the client wrote into the storage's own blob
//! directory. Either way the file belongs to the transaction ([`TempFiles`]) and is
//! removed when it ends, committed or not: a storage keeps its own link to what it
//! commits.
//!
//! **Downloads.** `sendBlob(oid, serial)` streams `receiveBlobStart`,
//! `receiveBlobChunk`… and `receiveBlobStop` callbacks, then the reply, through the
//! session's outbox. Each chunk is read from the file only when at most [`SEND_WINDOW`]
//! bytes wait in the outbox, so a blob of any size costs a few MiB of memory per
//! download and the client's reading speed paces the disk reads.

use super::txn_core::Event;
use super::{send_error, Close, Session};
use crate::StorageHandle;
use bytes::{Bytes, BytesMut};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, error, warn};
use zeo_proto::{message, Callback, Value};
use zodb::{Oid, StorageError, Tid, TxnOp};

/// Bytes of blob data per `receiveBlobChunk` (Python sends 59 000; larger chunks mean
/// fewer messages for the client to handle, which matters for a Python client that
/// reopens the file for every chunk).
pub(super) const SEND_CHUNK: usize = 1 << 20;
/// Bytes a download may have waiting in the outbox before the next chunk is read.
pub(super) const SEND_WINDOW: usize = 4 << 20;

/// Files removed when dropped: a transaction's blob files, or an unfinished upload.
/// Removal runs on the blocking pool when there is a runtime (unlinking a file of
/// several GiB takes a while on some file systems).
#[derive(Default)]
pub(super) struct TempFiles(Vec<PathBuf>);

impl TempFiles {
    pub(super) fn push(&mut self, path: PathBuf) {
        self.0.push(path);
    }

    fn take(&mut self) -> TempFiles {
        TempFiles(std::mem::take(&mut self.0))
    }

    pub(super) fn append(&mut self, mut other: TempFiles) {
        self.0.append(&mut other.0);
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let files = std::mem::take(&mut self.0);
        let remove = move || {
            for f in files {
                if let Err(e) = zodb::blob::remove_if_exists(&f) {
                    warn!(file = %f.display(), error = %e, "could not remove a temporary blob file");
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

/// A blob being uploaded.
pub(super) struct Upload {
    /// `None` once the upload has failed.
    file: Option<tokio::fs::File>,
    path: PathBuf,
    /// Removes the file unless the upload completes into a transaction.
    guard: TempFiles,
    size: u64,
    /// Why the file could not be written; the chunks that follow are dropped and the
    /// transaction's vote fails with this.
    failed: Option<std::io::Error>,
}

impl Upload {
    /// Records the first failure and removes the partial file now, not at the end of the
    /// transaction: on a full disk, its space is what everyone else needs.
    fn fail(&mut self, error: std::io::Error) {
        self.file = None;
        self.guard = TempFiles::default();
        self.failed.get_or_insert(error);
    }
}

impl Session {
    /// Refuses a blob request the connection or its state does not allow; the client is
    /// disconnected, as a failing one-way call does with ZEO.
    fn blob_misuse(&self, what: &str) -> Close {
        warn!(session = self.id, peer = %self.peer, "{what}, closing");
        Close::Protocol(what.to_string())
    }

    /// `storeBlobStart()`: creates the file the chunks go to.
    pub(super) async fn store_blob_start(
        &mut self,
        handle: &Arc<StorageHandle>,
        read_only: bool,
    ) -> Result<(), Close> {
        if read_only {
            return Err(self.blob_misuse("storeBlobStart on a read-only connection"));
        }
        if !self.txn.core().accepts_ops(None) {
            return Err(self.blob_misuse("storeBlobStart outside a transaction"));
        }
        if self.upload.is_some() {
            return Err(self.blob_misuse("storeBlobStart during another upload"));
        }
        let Some(dir) = handle.storage.blob_temp_dir() else {
            return Err(self.blob_misuse("blob upload to a storage without blobs"));
        };
        let path = dir.join(zodb::blob::unique_name("upload", ".tmp"));
        let mut guard = TempFiles::default();
        guard.push(path.clone());
        let opened = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await;
        let mut upload = Upload {
            file: None,
            path,
            guard,
            size: 0,
            failed: None,
        };
        match opened {
            Ok(file) => upload.file = Some(file),
            Err(e) => {
                error!(session = self.id, file = %upload.path.display(), error = %e,
                       "cannot create a blob upload file; the transaction will fail");
                upload.fail(e);
            }
        }
        self.upload = Some(upload);
        Ok(())
    }

    /// `storeBlobChunk(chunk)`: appends to the upload's file.
    pub(super) async fn store_blob_chunk(&mut self, chunk: Bytes) -> Result<(), Close> {
        let Some(upload) = &mut self.upload else {
            return Err(self.blob_misuse("storeBlobChunk without storeBlobStart"));
        };
        let Some(file) = &mut upload.file else {
            return Ok(()); // failed earlier: dropped
        };
        if let Err(e) = file.write_all(&chunk).await {
            error!(session = self.id, error = %e, bytes = upload.size,
                   "writing a blob upload failed; the transaction will fail");
            upload.fail(e);
            return Ok(());
        }
        upload.size += chunk.len() as u64;
        Ok(())
    }

    /// `storeBlobEnd(oid, serial, data, txn)`: the file is complete; makes it durable and
    /// buffers the store.
    pub(super) async fn store_blob_end(
        &mut self,
        handle: &Arc<StorageHandle>,
        oid: Oid,
        serial: Tid,
        data: Bytes,
        txn: Value,
    ) -> Result<(), Close> {
        let Some(mut upload) = self.upload.take() else {
            return Err(self.blob_misuse("storeBlobEnd without storeBlobStart"));
        };
        if !self.txn.core().accepts_ops(Some(&txn)) {
            return Err(self.blob_misuse("storeBlobEnd outside its transaction"));
        }
        if let Some(mut file) = upload.file.take() {
            let synced = async {
                file.flush().await?;
                file.sync_data().await
            };
            if let Err(e) = synced.await {
                error!(session = self.id, error = %e, "finishing a blob upload failed; the transaction will fail");
                upload.fail(e);
            }
        }
        if let Some(e) = upload.failed.take() {
            drop(upload);
            let lost = Event::OpLost {
                id: txn,
                error: StorageError::Io(std::io::Error::new(
                    e.kind(),
                    format!("could not write the uploaded blob of oid {oid}: {e}"),
                )),
            };
            let ctx = txn_ctx!(self, handle);
            return self.txn.feed(&ctx, lost).await;
        }
        debug!(session = self.id, %oid, bytes = upload.size, "blob uploaded");
        self.txn.blob_files.append(upload.guard.take());
        let op = Event::Op {
            id: txn,
            op: TxnOp::StoreBlob {
                oid,
                serial,
                data,
                file: upload.path,
            },
            what: "storeBlobEnd",
        };
        let ctx = txn_ctx!(self, handle);
        self.txn.feed(&ctx, op).await
    }

    /// `storeBlobShared(oid, serial, data, filename, txn)`: the client wrote the file
    /// into the oid's directory of the blob directory it shares with us.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store_blob_shared(
        &mut self,
        handle: &Arc<StorageHandle>,
        read_only: bool,
        oid: Oid,
        serial: Tid,
        data: Bytes,
        filename: String,
        txn: Value,
    ) -> Result<(), Close> {
        if read_only {
            return Err(self.blob_misuse("storeBlobShared on a read-only connection"));
        }
        if !shared_name_ok(&filename) {
            // Python: "We're under attack! (bad filename to storeBlobShared, ...)".
            error!(session = self.id, peer = %self.peer, ?filename, "bad file name in storeBlobShared");
            return Err(Close::Protocol("bad file name in storeBlobShared".into()));
        }
        if !self.txn.core().accepts_ops(Some(&txn)) {
            return Err(self.blob_misuse("storeBlobShared outside its transaction"));
        }
        let dir = match handle.storage.blob_shared_dir(oid) {
            Ok(d) => d,
            Err(e) => {
                warn!(session = self.id, error = %e, "storeBlobShared to a storage without a shared blob directory");
                return Err(Close::Protocol(e.to_string()));
            }
        };
        let file = dir.join(&filename);
        self.txn.blob_files.push(file.clone());
        let op = Event::Op {
            id: txn,
            op: TxnOp::StoreBlob {
                oid,
                serial,
                data,
                file,
            },
            what: "storeBlobShared",
        };
        let ctx = txn_ctx!(self, handle);
        self.txn.feed(&ctx, op).await
    }

    /// `sendBlob(oid, serial)`: streams the file back through callbacks, then replies.
    pub(super) fn send_blob(
        &mut self,
        handle: &Arc<StorageHandle>,
        msgid: Value,
        oid: Oid,
        serial: Tid,
    ) {
        let storage = handle.storage.clone();
        let outbox = self.outbox.clone();
        self.push_request(async move {
            let file = match storage.open_blob(oid, serial).await {
                Ok(f) => f,
                Err(e) => return send_error(&outbox, &msgid, &e),
            };
            outbox.send(Callback::ReceiveBlobStart { oid, serial }.frame(outbox.encoding));
            let mut file = tokio::fs::File::from_std(file);
            let mut sent = 0u64;
            loop {
                outbox.wait_queued_below(SEND_WINDOW).await;
                if outbox.is_closed() {
                    return;
                }
                let chunk = match read_chunk(&mut file).await {
                    Ok(c) => c,
                    Err(e) => {
                        // No receiveBlobStop: the client must not take a partial file for
                        // the blob. It gets the error instead and can ask again.
                        error!(%oid, %serial, error = %e, "reading a blob failed while sending it");
                        return send_error(&outbox, &msgid, &e.into());
                    }
                };
                if chunk.is_empty() {
                    break;
                }
                sent += chunk.len() as u64;
                outbox
                    .send(Callback::ReceiveBlobChunk { oid, serial, chunk }.frame(outbox.encoding));
            }
            outbox.send(Callback::ReceiveBlobStop { oid, serial }.frame(outbox.encoding));
            outbox.send(message::reply_frame(outbox.encoding, &msgid, Value::None));
            debug!(%oid, %serial, bytes = sent, "blob sent");
        });
    }
}

/// Reads up to [`SEND_CHUNK`] bytes; empty at the end of the file.
async fn read_chunk(file: &mut tokio::fs::File) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(SEND_CHUNK);
    while buf.len() < SEND_CHUNK {
        if file.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

/// The names `storeBlobShared` accepts, as the Python server does: a bare file name (no
/// directory part) ending in `.tmp` or `.tmp` plus one character (the client appends `-`).
fn shared_name_ok(name: &str) -> bool {
    let bare = !name.is_empty()
        && !name.contains('/')
        && !name.contains('\0')
        && name != "."
        && name != "..";
    let mut chars = name.chars();
    chars.next_back();
    bare && (name.ends_with(".tmp") || chars.as_str().ends_with(".tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_file_names() {
        assert!(shared_name_ok("0x03f0abcdxyz.tmp-"));
        assert!(shared_name_ok("a.tmp"));
        assert!(!shared_name_ok("../a.tmp"));
        assert!(!shared_name_ok("a/b.tmp"));
        assert!(!shared_name_ok("a.blob"));
        assert!(!shared_name_ok("a.tmp--"));
        assert!(!shared_name_ok(""));
    }
}
