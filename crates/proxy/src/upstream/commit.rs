//! Forwarding downstream commits upstream.
//!
//! A transaction is sent upstream at its vote: `tpc_begin`, its operations, `vote`, on
//! the link's connection. The server holds its commit lock from the first vote until
//! finish or abort, conflict rounds included, so at most one forwarded transaction is
//! open at a time, and it stays open upstream while the downstream client resolves its
//! conflicts: the re-vote sends only the client's new stores, and upstream (which keeps
//! its own lock across the rounds, if it is zeors) cannot meet a new conflict. The tid of
//! our own commit reaches the cache through the `tpc_finish` reply, in order with
//! upstream's callbacks (upstream sends the committer no invalidation).
//!
//! What is decided here without I/O — which operations are still to be sent, what a
//! vote reply means downstream, which stored revisions may be cached once committed — is
//! in plain functions, unit-tested below.

use super::Inner;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::debug;
use zeo_client::Connection;
use zeo_proto::reply::VoteResult;
use zeo_proto::{Reply, Request, Value};
use zodb::{Oid, StorageError, Tid, Transaction, TxnKey, TxnOp, Vote};

/// Forwarded commits, and the oids fetched upstream ahead of need.
pub(super) struct Commits {
    /// The transaction open upstream, from its first vote to finish or abort.
    pub slot: Mutex<Option<Forwarded>>,
    pub oids: tokio::sync::Mutex<VecDeque<Oid>>,
}

/// A downstream transaction forwarded upstream.
pub(super) struct Forwarded {
    key: TxnKey,
    conn: Connection,
    /// Operations already sent upstream (a re-vote after conflicts sends only the new ones).
    sent: usize,
    /// Oids stored, deleted or restored, in order, with the data stored (for the
    /// invalidation and the cache).
    stored: Vec<(Oid, Option<Bytes>)>,
    /// Oids whose committed data differs from what was sent (resolved upstream, undone),
    /// over every vote round.
    changed: Vec<Oid>,
    /// The blob files sent, to keep in the blob cache once committed.
    blobs: Vec<(Oid, PathBuf)>,
}

/// The client transaction id we use upstream for downstream transaction `key`.
fn client_txn_id(key: TxnKey) -> Value {
    Value::Int((key & 0x3fff_ffff_ffff_ffff) as i64)
}

/// What a vote reply from upstream means for the downstream client: the conflicts to
/// resolve, or ready with the oids whose committed data will not be what was sent (all
/// rounds' server-resolved oids: the client must not cache its own copy of those).
fn outcome(reply: &VoteResult, changed_so_far: &[Oid]) -> Vote {
    let conflicts: Vec<zodb::Conflict> = reply.conflicts().cloned().collect();
    if conflicts.is_empty() {
        Vote::Ok {
            changed: changed_so_far.to_vec(),
        }
    } else {
        Vote::Conflicts(conflicts)
    }
}

/// The revisions a committed transaction leaves current, to keep in the cache: the last
/// store of each oid (a transaction voted again after conflicts holds the unresolved and
/// the resolved state; upstream commits the last), except those whose committed data is
/// not what was sent.
fn committed_revisions(stored: Vec<(Oid, Option<Bytes>)>, changed: &[Oid]) -> Vec<(Oid, Bytes)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (oid, data) in stored.into_iter().rev() {
        if !seen.insert(oid) {
            continue;
        }
        if let Some(data) = data {
            if !changed.contains(&oid) {
                out.push((oid, data));
            }
        }
    }
    out
}

/// The oids a committed transaction changed, each once: those it stored, and those whose
/// data upstream changed for it (undone objects, which it did not store).
fn invalidated_oids(stored: &[(Oid, Option<Bytes>)], changed: &[Oid]) -> Vec<Oid> {
    let mut seen = HashSet::new();
    stored
        .iter()
        .map(|(o, _)| *o)
        .chain(changed.iter().copied())
        .filter(|o| seen.insert(*o))
        .collect()
}

impl Commits {
    /// The forwarded transaction `key`, if it is the one open upstream and its connection
    /// is still up. Anything else in the slot is stale and dropped. `Err`: it was `key`'s,
    /// but the link went down after its vote, and upstream dropped its side with it.
    fn take(&self, key: TxnKey) -> zodb::Result<Option<Forwarded>> {
        match self.slot.lock().take() {
            Some(f) if f.key == key && f.conn.is_connected() => Ok(Some(f)),
            Some(f) if f.key == key => Err(StorageError::Disconnected(
                "the link to the upstream server was lost after the vote; nothing was committed"
                    .into(),
            )),
            _ => Ok(None),
        }
    }
}

impl Inner {
    pub(super) async fn vote(self: &Arc<Self>, txn: &Transaction) -> zodb::Result<Vote> {
        if self.config.read_only {
            return Err(StorageError::ReadOnly);
        }
        // A re-vote whose first vote's link went down starts over on the new one.
        let mut fwd = match self.commits.take(txn.key).ok().flatten() {
            Some(f) => f,
            None => self.begin_forward(txn).await?,
        };
        let id = client_txn_id(txn.key);
        if let Err(e) = self.send_ops(&mut fwd, &txn.ops, &id).await {
            // Upstream holds part of the transaction: drop it there.
            let _ = fwd.conn.call(&Request::TpcAbort { txn: id }).await;
            return Err(e);
        }
        let reply: VoteResult = match fwd.conn.request(&Request::Vote { txn: id.clone() }).await {
            Ok(reply) => reply,
            Err(e) => {
                // The stock server drops its side of a transaction whose vote failed; a
                // zeors upstream keeps it until aborted. Either way none is left open on
                // the connection the next forwarded transaction uses.
                let _ = fwd.conn.call(&Request::TpcAbort { txn: id }).await;
                return Err(e.into());
            }
        };
        fwd.changed.extend(reply.resolved());
        let vote = outcome(&reply, &fwd.changed);
        // Kept across conflict rounds too: the server holds its commit lock until this
        // transaction votes again, finishes or aborts.
        *self.commits.slot.lock() = Some(fwd);
        Ok(vote)
    }

    /// Starts forwarding `txn`: its `tpc_begin` upstream.
    async fn begin_forward(&self, txn: &Transaction) -> zodb::Result<Forwarded> {
        if let Some(tid) = txn.meta.tid {
            // Checked here too, whatever upstream would accept: a stock upstream takes
            // any tid, and one far ahead would stamp every later upstream transaction
            // after it.
            zodb::timestamp::check_explicit_tid(tid, self.last_tid(), zodb::timestamp::now_unix())
                .map_err(StorageError::Value)?;
        }
        let conn = self.link().await?;
        conn.send(&Request::TpcBegin {
            txn: client_txn_id(txn.key),
            user: Bytes::from(txn.meta.user.clone()),
            description: Bytes::from(txn.meta.description.clone()),
            extension: Value::Dict(zeo_proto::extension_from_bytes(&txn.meta.extension)),
            tid: txn.meta.tid,
            status: txn.meta.status,
        })?;
        Ok(Forwarded {
            key: txn.key,
            conn,
            sent: 0,
            stored: Vec::new(),
            changed: Vec::new(),
            blobs: Vec::new(),
        })
    }

    /// Sends the operations not sent yet.
    async fn send_ops(&self, fwd: &mut Forwarded, ops: &[TxnOp], id: &Value) -> zodb::Result<()> {
        for op in &ops[fwd.sent.min(ops.len())..] {
            match op {
                TxnOp::StoreBlob {
                    oid,
                    serial,
                    data,
                    file,
                } => {
                    let upstream_blobs = self.link.info.lock().blobs;
                    match self.blobs.as_ref().filter(|_| upstream_blobs) {
                        Some(blobs) => {
                            blobs
                                .forward(&fwd.conn, *oid, *serial, data, file, id)
                                .await?
                        }
                        None => return Err(StorageError::Unsupported("blobs")),
                    }
                    fwd.stored.push((*oid, Some(data.clone())));
                    fwd.blobs.push((*oid, file.clone()));
                }
                other => {
                    match other {
                        TxnOp::Store { oid, data, .. } => {
                            fwd.stored.push((*oid, Some(data.clone())))
                        }
                        // They change the object too: invalidated, not cached.
                        TxnOp::Delete { oid, .. } | TxnOp::Restore { oid, .. } => {
                            fwd.stored.push((*oid, None))
                        }
                        _ => {}
                    }
                    if let Some(request) = Request::for_op(other, id) {
                        fwd.conn.send(&request)?;
                    }
                }
            }
        }
        fwd.sent = ops.len();
        Ok(())
    }

    pub(super) async fn finish(self: &Arc<Self>, key: TxnKey) -> zodb::Result<Tid> {
        let Some(mut fwd) = self.commits.take(key)? else {
            return Err(StorageError::Transaction(
                "finish without a voted transaction".into(),
            ));
        };
        let oids = invalidated_oids(&fwd.stored, &fwd.changed);
        let blob_files = std::mem::take(&mut fwd.blobs);
        let blobs_changed = fwd.changed.clone();
        let weak = Arc::downgrade(self);
        let epoch = self.packs.epoch();
        let stored = std::mem::take(&mut fwd.stored);
        let changed = std::mem::take(&mut fwd.changed);
        // Applied in the reader, in order with upstream's callbacks: upstream does not
        // send us an invalidation for our own commit, this reply is its place in the order.
        let hook: zeo_client::ReplyHook = Box::new(move |result| {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let Ok(v) = result else {
                // No `info` callback comes for a failed finish (see `pack`).
                inner.packs.no_info_coming();
                return;
            };
            let Ok(tid) = Tid::from_value(v) else {
                return;
            };
            inner.apply(tid, &oids, Some(key), false);
            // Keep what was committed as the new current revisions, off the reader (a
            // store may have to evict). If a later invalidation overtakes it, the cache
            // refuses it, since it was seen at `tid`.
            let keep = committed_revisions(stored, &changed);
            let bytes = keep.iter().map(|(_, d)| d.len()).sum();
            inner.stores.submit(bytes, move |cache| {
                if !epoch.still_valid() {
                    return; // a pack completed meanwhile (see `pack`)
                }
                for (oid, data) in keep {
                    cache.store(oid, tid, None, data, tid);
                }
            });
        });
        // Upstream's `info` callback just before the reply belongs to this commit.
        self.packs.expect_info();
        let v = fwd
            .conn
            .call_with_hook(
                &Request::TpcFinish {
                    txn: client_txn_id(key),
                },
                hook,
            )
            .await?;
        let tid = Tid::from_value(&v).map_err(|e| {
            StorageError::Disconnected(format!("unexpected tpc_finish reply from upstream: {e}"))
        })?;
        if let (Some(blobs), false) = (&self.blobs, blob_files.is_empty()) {
            blobs.committed(tid, blob_files, &blobs_changed).await;
        }
        Ok(tid)
    }

    pub(super) async fn abort(&self, key: TxnKey) {
        let fwd = {
            let mut slot = self.commits.slot.lock();
            match slot.take() {
                Some(f) if f.key == key => Some(f),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        if let Some(f) = fwd {
            if let Err(e) = f
                .conn
                .call(&Request::TpcAbort {
                    txn: client_txn_id(key),
                })
                .await
            {
                debug!(error = %e, "upstream tpc_abort failed");
            }
        }
    }

    /// The oids fetched ahead, refilled from upstream in batches.
    pub(super) async fn new_oids(&self, count: usize) -> zodb::Result<Vec<Oid>> {
        let mut pool = self.commits.oids.lock().await;
        while pool.len() < count {
            let conn = self.link().await?;
            pool.extend(conn.new_oids(self.config.oid_batch.max(count)).await?);
        }
        Ok(pool.drain(..count).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeo_proto::reply::VoteItem;
    use zodb::Conflict;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    #[test]
    fn only_the_last_store_of_an_oid_is_cached_and_never_a_changed_one() {
        let stored = vec![
            (Oid(1), Some(b("unresolved"))),
            (Oid(2), Some(b("two"))),
            (Oid(3), Some(b("resolved upstream"))),
            (Oid(1), Some(b("resolved by the client"))),
            (Oid(4), None),
        ];
        let mut keep = committed_revisions(stored, &[Oid(3)]);
        keep.sort_by_key(|(o, _)| *o);
        assert_eq!(
            keep,
            vec![(Oid(1), b("resolved by the client")), (Oid(2), b("two"))]
        );
    }

    #[test]
    fn undone_oids_are_invalidated_with_the_stored_ones() {
        let stored = vec![
            (Oid(1), Some(b("a"))),
            (Oid(2), None),
            (Oid(1), Some(b("again"))),
        ];
        assert_eq!(
            invalidated_oids(&stored, &[Oid(7), Oid(2), Oid(9)]),
            vec![Oid(1), Oid(2), Oid(7), Oid(9)]
        );
        assert_eq!(invalidated_oids(&[], &[Oid(3)]), vec![Oid(3)]);
    }

    #[test]
    fn a_vote_reply_with_conflicts_asks_the_client_and_resolved_oids_accumulate() {
        let c = Conflict {
            oid: Oid(5),
            committed: Tid(9),
            read: Tid(7),
            data: b("mine"),
        };
        let first = VoteResult(vec![
            VoteItem::Resolved(Oid(2)),
            VoteItem::Conflict(c.clone()),
        ]);
        let mut changed = Vec::new();
        changed.extend(first.resolved());
        assert_eq!(outcome(&first, &changed), Vote::Conflicts(vec![c]));
        let second = VoteResult(vec![VoteItem::Resolved(Oid(8))]);
        changed.extend(second.resolved());
        assert_eq!(
            outcome(&second, &changed),
            Vote::Ok {
                changed: vec![Oid(2), Oid(8)]
            }
        );
    }
}
