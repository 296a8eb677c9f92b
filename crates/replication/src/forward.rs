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
//! - The server's per-storage commit lock is held from vote to finish, so one forwarded
//!   transaction at a time uses the connection.

use crate::node::Node;
use bytes::{Bytes, BytesMut};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};
use zeo_client::{Address, ConnectOptions, Connection, NoCallbacks};
use zeo_proto::Value;
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

struct Voted {
    key: TxnKey,
    conn: Connection,
}

pub struct Forwarder {
    config: ForwardConfig,
    conn: tokio::sync::Mutex<Option<Connection>>,
    voted: parking_lot::Mutex<Option<Voted>>,
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
            voted: parking_lot::Mutex::new(None),
        })
    }

    /// Whether `key` is a transaction voted on the primary.
    pub fn has(&self, key: TxnKey) -> bool {
        self.voted.lock().as_ref().is_some_and(|v| v.key == key)
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

    /// Sends the transaction to the primary and votes it there.
    pub async fn vote(&self, node: &Node, txn: &Transaction) -> Result<Vote> {
        // A re-vote after conflicts sends the whole transaction again (the primary's side
        // was aborted when the conflicts came back).
        if let Some(old) = self.voted.lock().take() {
            let _ = old.conn.send_oneway("tpc_abort", vec![txn_id(old.key)]);
        }
        let conn = self.connection().await?;
        let id = txn_id(txn.key);
        conn.send_oneway(
            "tpc_begin",
            vec![
                id.clone(),
                Value::Bytes(Bytes::from(txn.meta.user.clone())),
                Value::Bytes(Bytes::from(txn.meta.description.clone())),
                Value::Dict(zeo_proto::extension_from_bytes(&txn.meta.extension)),
                txn.meta.tid.map(Value::from).unwrap_or(Value::None),
                Value::Str(
                    (if txn.meta.status == 0 {
                        ' '
                    } else {
                        txn.meta.status as char
                    })
                    .to_string(),
                ),
            ],
        )?;
        for op in &txn.ops {
            let (name, args) = match op {
                TxnOp::Store { oid, serial, data } => (
                    "storea",
                    vec![
                        Value::from(*oid),
                        Value::from(*serial),
                        Value::Bytes(data.clone()),
                        id.clone(),
                    ],
                ),
                TxnOp::CheckCurrent { oid, serial } => (
                    "checkCurrentSerialInTransaction",
                    vec![Value::from(*oid), Value::from(*serial), id.clone()],
                ),
                TxnOp::Delete { oid, serial } => (
                    "deleteObject",
                    vec![Value::from(*oid), Value::from(*serial), id.clone()],
                ),
                TxnOp::Restore {
                    oid,
                    serial,
                    data,
                    prev_txn,
                } => (
                    "restorea",
                    vec![
                        Value::from(*oid),
                        Value::from(*serial),
                        data.clone().map(Value::Bytes).unwrap_or(Value::None),
                        prev_txn.map(Value::from).unwrap_or(Value::None),
                        id.clone(),
                    ],
                ),
                TxnOp::Undo { transaction_id } => (
                    "undoa",
                    vec![
                        Value::Bytes(Bytes::from(transaction_id.clone())),
                        id.clone(),
                    ],
                ),
                TxnOp::StoreBlob {
                    oid,
                    serial,
                    data,
                    file,
                } => {
                    if let Err(e) = upload_blob(&conn, *oid, *serial, data, file, &id).await {
                        let _ = conn.send_oneway("tpc_abort", vec![id.clone()]);
                        return Err(e);
                    }
                    continue;
                }
            };
            conn.send_oneway(name, args)?;
        }
        let items = conn.call("vote", vec![id.clone()]).await?;
        let mut conflicts = Vec::new();
        let mut changed = Vec::new();
        for item in items.as_seq().unwrap_or(&[]) {
            match item {
                Value::Bytes(b) => changed.extend(Oid::from_slice(b)),
                Value::Dict(_) => {
                    let oid = item
                        .get("oid")
                        .and_then(Value::as_bytes)
                        .and_then(|b| Oid::from_slice(b));
                    let serials = item.get("serials").and_then(Value::as_seq);
                    let tid_at = |i: usize| {
                        serials
                            .and_then(|s| s.get(i))
                            .and_then(Value::as_bytes)
                            .and_then(|b| Tid::from_slice(b))
                    };
                    let data = item
                        .get("data")
                        .and_then(Value::as_bytes)
                        .cloned()
                        .unwrap_or_default();
                    if let (Some(oid), Some(committed), Some(read)) = (oid, tid_at(0), tid_at(1)) {
                        conflicts.push(Conflict {
                            oid,
                            committed,
                            read,
                            data,
                        });
                    }
                }
                _ => {}
            }
        }
        if !conflicts.is_empty() {
            // The client resolves and votes again: the primary keeps no half transaction.
            if let Err(e) = conn.call("tpc_abort", vec![id.clone()]).await {
                debug!(error = %e, "tpc_abort after conflicts failed");
            }
            // The client resolves by loading the committed revisions from this replica:
            // let them arrive first.
            if let Some(newest) = conflicts.iter().map(|c| c.committed).max() {
                let _ = tokio::time::timeout(APPLY_WAIT, node.signal().wait_for(newest)).await;
            }
            return Ok(Vote::Conflicts(conflicts));
        }
        *self.voted.lock() = Some(Voted { key: txn.key, conn });
        Ok(Vote::Ok { changed })
    }

    /// Commits on the primary, then waits until the replica has applied the transaction.
    pub async fn finish(&self, node: &Node, key: TxnKey) -> Result<Tid> {
        let voted = match self.voted.lock().take() {
            Some(v) if v.key == key => v,
            other => {
                *self.voted.lock() = other;
                return Err(StorageError::Transaction(
                    "finish without a voted transaction".into(),
                ));
            }
        };
        node.forward_started(key);
        let reply = voted.conn.call("tpc_finish", vec![txn_id(key)]).await;
        let tid = match reply.map_err(StorageError::from).and_then(|v| {
            v.as_bytes()
                .and_then(|b| Tid::from_slice(b))
                .ok_or_else(|| {
                    StorageError::Disconnected(format!(
                        "unexpected tpc_finish reply from the primary: {v:?}"
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

    pub async fn abort(&self, node: &Node, key: TxnKey) {
        let _ = node;
        let voted = {
            let mut v = self.voted.lock();
            match v.take() {
                Some(x) if x.key == key => Some(x),
                other => {
                    *v = other;
                    None
                }
            }
        };
        if let Some(v) = voted {
            if let Err(e) = v.conn.call("tpc_abort", vec![txn_id(key)]).await {
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
    conn.send_oneway("storeBlobStart", vec![])?;
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
            conn.send_oneway("storeBlobChunk", vec![Value::Bytes(buf.freeze())])?;
        }
    }
    .await;
    conn.send_oneway(
        "storeBlobEnd",
        vec![
            Value::from(oid),
            Value::from(serial),
            Value::Bytes(data.clone()),
            id.clone(),
        ],
    )?;
    sent
}
