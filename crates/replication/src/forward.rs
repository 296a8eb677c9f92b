//! Forwarded writes (`--forward-writes`): a replica's clients commit through it to the
//! primary, over one ZEO connection to the primary's ZEO port.
//!
//! Invariants:
//! - The transaction is sent to the primary as its client sent it (the same operations,
//!   blobs uploaded as `storeBlob*`), and conflicts come back to that client to resolve,
//!   exactly as if it talked to the primary.
//! - `tpc_finish` returns to the client only once the replica has applied the
//!   transaction from the replication stream (read-your-writes): the client's next load
//!   on the replica sees its own write.
//! - The client is not sent an invalidation for its own transaction: the node reports
//!   the applied transaction with the client's key as committer (see
//!   [`crate::node::Node`]); it knows the tid from the primary's `tpc_finish` reply, and an
//!   apply that arrives first waits for that reply.
//! - The server's per-storage commit lock is held from the first vote to finish or
//!   abort, conflict rounds included, so one forwarded transaction at a time uses the
//!   connection; it stays open on the primary while the client resolves, and a re-vote
//!   sends only the client's new operations (as the proxy forwards commits).

use crate::node::Node;
use bytes::{Bytes, BytesMut};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};
use zeo_client::{Address, ConnectOptions, Connection, NoCallbacks};
use zeo_proto::reply::VoteResult;
use zeo_proto::{Reply, Request, Value};
use zodb::{Conflict, Oid, Result, StorageError, Tid, Transaction, TxnKey, TxnOp, Vote};

/// Bytes of blob data per `storeBlobChunk`.
const UPLOAD_CHUNK: usize = 1 << 20;
/// Bytes of chunks queued on the connection before sending waits.
const UPLOAD_WINDOW: usize = 8 << 20;
/// How long a forwarded commit waits for its transaction to arrive through the stream
/// before answering the client anyway (the commit is durable on the primary).
const APPLY_WAIT: Duration = Duration::from_secs(60);

/// Where and how to forward.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// The primary's ZEO address(es).
    pub servers: Vec<String>,
    /// The storage name on the primary.
    pub storage: String,
}

/// The transaction open on the primary, from its first vote to finish or abort
/// (conflict rounds included: the server keeps its commit lock until the client votes
/// again, and so does the primary).
struct Open {
    key: TxnKey,
    conn: Connection,
    /// Operations already sent (a re-vote after conflicts sends only the new ones).
    sent: usize,
    /// Oids resolved on the primary, over every round.
    changed: Vec<Oid>,
}

pub struct Forwarder {
    config: ForwardConfig,
    conn: tokio::sync::Mutex<Option<Connection>>,
    open: parking_lot::Mutex<Option<Open>>,
}

/// The transaction id used on the primary's connection.
fn txn_id(key: TxnKey) -> Value {
    Value::Int((key & 0x3fff_ffff_ffff_ffff) as i64)
}

impl Forwarder {
    pub fn new(config: ForwardConfig) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            config,
            conn: tokio::sync::Mutex::new(None),
            open: parking_lot::Mutex::new(None),
        })
    }

    /// Whether `key` is a transaction open on the primary.
    pub fn has(&self, key: TxnKey) -> bool {
        self.open.lock().as_ref().is_some_and(|v| v.key == key)
    }

    /// Drops the connection (promotion: commits are local from now on).
    pub fn close(&self) {
        if let Ok(mut c) = self.conn.try_lock() {
            if let Some(c) = c.take() {
                c.close();
            }
        }
    }

    async fn connection(&self) -> Result<Connection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.is_connected()) {
            return Ok(c.clone());
        }
        let opts = ConnectOptions {
            storage: self.config.storage.clone(),
            // The commits' records cross the link: zstd when the primary is zeors.
            compress: true,
            ..ConnectOptions::default()
        };
        let addresses: Vec<Address> = self.config.servers.iter().cloned().map(Address).collect();
        let c = zeo_client::connect_any(&addresses, &opts, || Arc::new(NoCallbacks))
            .await
            .map_err(|e| {
                StorageError::Disconnected(format!(
                    "the primary ({}) cannot take the commit: {e}",
                    self.config.servers.join(", ")
                ))
            })?;
        *slot = Some(c.clone());
        Ok(c)
    }

    pub async fn new_oids(&self, count: usize) -> Result<Vec<Oid>> {
        let c = self.connection().await?;
        Ok(c.new_oids(count).await?)
    }

    /// The transaction `key` if it is open on a live connection; anything else in the
    /// slot is stale and dropped. `Err`: it was `key`'s, but the link to the primary went
    /// down after its vote, and the primary dropped its side with it.
    fn take(&self, key: TxnKey) -> Result<Option<Open>> {
        match self.open.lock().take() {
            Some(o) if o.key == key && o.conn.is_connected() => Ok(Some(o)),
            Some(o) if o.key == key => Err(StorageError::Disconnected(
                "the link to the primary was lost after the vote; nothing was committed".into(),
            )),
            _ => Ok(None),
        }
    }

    /// Sends the transaction's operations not sent yet to the primary and votes there.
    pub async fn vote(&self, node: &Node, txn: &Transaction) -> Result<Vote> {
        let id = txn_id(txn.key);
        let mut open = match self.take(txn.key).ok().flatten() {
            Some(o) => o,
            None => {
                let conn = self.connection().await?;
                conn.send(&Request::TpcBegin {
                    txn: id.clone(),
                    user: Bytes::from(txn.meta.user.clone()),
                    description: Bytes::from(txn.meta.description.clone()),
                    extension: Value::Dict(zeo_proto::extension_from_bytes(&txn.meta.extension)),
                    tid: txn.meta.tid,
                    status: txn.meta.status,
                })?;
                Open {
                    key: txn.key,
                    conn,
                    sent: 0,
                    changed: Vec::new(),
                }
            }
        };
        for op in &txn.ops[open.sent.min(txn.ops.len())..] {
            let sent = match op {
                TxnOp::StoreBlob {
                    oid,
                    serial,
                    data,
                    file,
                } => upload_blob(&open.conn, *oid, *serial, data, file, &id).await,
                other => match Request::for_op(other, &id) {
                    Some(r) => open.conn.send(&r).map_err(StorageError::from),
                    None => Ok(()),
                },
            };
            if let Err(e) = sent {
                // The primary holds part of the transaction: drop it there.
                let _ = open.conn.call(&Request::TpcAbort { txn: id.clone() }).await;
                return Err(e);
            }
        }
        open.sent = txn.ops.len();
        // An error means the primary has dropped its side of the transaction already.
        let reply: VoteResult = open.conn.request(&Request::Vote { txn: id }).await?;
        open.changed.extend(reply.resolved());
        let conflicts: Vec<Conflict> = reply.conflicts().cloned().collect();
        let changed = open.changed.clone();
        *self.open.lock() = Some(open);
        if conflicts.is_empty() {
            return Ok(Vote::Ok { changed });
        }
        // The client resolves by loading the committed revisions from this replica: let
        // them arrive first.
        if let Some(newest) = conflicts.iter().map(|c| c.committed).max() {
            let _ = tokio::time::timeout(APPLY_WAIT, node.signal().wait_for(newest)).await;
        }
        Ok(Vote::Conflicts(conflicts))
    }

    /// Commits on the primary, then waits until the replica has applied the transaction.
    pub async fn finish(&self, node: &Node, key: TxnKey) -> Result<Tid> {
        let Some(open) = self.take(key)? else {
            return Err(StorageError::Transaction(
                "finish without a voted transaction".into(),
            ));
        };
        node.forward_started(key);
        let reply = open
            .conn
            .call(&Request::TpcFinish { txn: txn_id(key) })
            .await;
        let tid = match reply.map_err(StorageError::from).and_then(|v| {
            Tid::from_value(&v).map_err(|e| {
                StorageError::Disconnected(format!(
                    "unexpected tpc_finish reply from the primary: {e}"
                ))
            })
        }) {
            Ok(t) => t,
            Err(e) => {
                node.forward_finished(key, None);
                return Err(e);
            }
        };
        node.forward_finished(key, Some(tid));
        node.stats()
            .forwarded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if tokio::time::timeout(APPLY_WAIT, node.signal().wait_for(tid))
            .await
            .is_err()
        {
            warn!(%tid, "a forwarded commit has not come back through replication yet; answering the client anyway");
        }
        node.forward_done(key);
        Ok(tid)
    }

    pub async fn abort(&self, key: TxnKey) {
        let open = {
            let mut slot = self.open.lock();
            match slot.take() {
                Some(x) if x.key == key => Some(x),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        if let Some(o) = open {
            if let Err(e) = o.conn.call(&Request::TpcAbort { txn: txn_id(key) }).await {
                debug!(error = %e, "forwarded tpc_abort failed");
            }
        }
    }
}

/// `storeBlobStart`, the file in `storeBlobChunk`s, `storeBlobEnd`, as a ZEO client
/// uploads a blob.
async fn upload_blob(
    conn: &Connection,
    oid: Oid,
    serial: Tid,
    data: &Bytes,
    file: &Path,
    id: &Value,
) -> Result<()> {
    conn.send(&Request::StoreBlobStart)?;
    // Once started, the upload is always ended, so that the primary is never left with
    // an upload in progress; a failure to read aborts the transaction afterwards.
    let sent = async {
        let mut f = tokio::fs::File::open(file).await?;
        loop {
            conn.wait_queued_below(UPLOAD_WINDOW).await;
            let mut buf = BytesMut::with_capacity(UPLOAD_CHUNK);
            while buf.len() < UPLOAD_CHUNK {
                if f.read_buf(&mut buf).await? == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                return Ok::<(), StorageError>(());
            }
            conn.send(&Request::StoreBlobChunk {
                chunk: buf.freeze(),
            })?;
        }
    }
    .await;
    conn.send(&Request::StoreBlobEnd {
        oid,
        serial,
        data: data.clone(),
        txn: id.clone(),
    })?;
    sent
}
