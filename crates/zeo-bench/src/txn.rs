//! Committing a transaction over the raw ZEO protocol, the way `ClientStorage` does it.
//!
//! `tpc_begin` and `storea` are one-way calls, `vote` and `tpc_finish` wait for replies.
//! `vote` answers with a list that may hold oids (conflicts the *server* resolved, as the
//! stock server does by default) and dicts (conflicts returned to the *client*, as zeors
//! always does): the client resolves those and votes again. We resolve the hot set's
//! `BTrees.Length` counters like `Length._p_resolveConflict` does (committed + ours -
//! old); a conflict on anything else is unresolvable and the transaction is retried.

use crate::meta::{counter_record, parse_counter, Meta};
use crate::rng::Rng;
use anyhow::{anyhow, Result};
use bytes::Bytes;
use futures::future::try_join_all;
use zeo_client::{ClientError, Connection};
use zeo_proto::reply::VoteResult;
use zeo_proto::{Request, Value};
use zodb::{Conflict, Loaded, Oid, StorageError, Tid};

/// How often a client votes again after resolving conflicts (ClientStorage allows 9).
const MAX_VOTES: usize = 9;

/// A connection that commits.
pub struct Writer {
    pub conn: Connection,
    next_txn: i64,
}

/// A transaction that voted successfully and holds the commit lock until finished.
pub struct Voted {
    id: Value,
    pub resolved_by_client: u64,
    pub resolved_by_server: u64,
}

/// How a vote ended.
pub enum VoteOutcome {
    Voted(Voted),
    /// An unresolvable conflict: the transaction was aborted; retry with fresh reads.
    Conflict,
}

impl Writer {
    pub fn new(conn: Connection) -> Writer {
        Writer { conn, next_txn: 1 }
    }

    /// Reads the objects (as an application does before changing them), stores new
    /// revisions of `items` (fresh payloads) and `counters` (incremented), and votes.
    pub async fn store_and_vote(
        &mut self,
        meta: &Meta,
        rng: &mut Rng,
        items: &[Oid],
        counters: &[Oid],
    ) -> Result<VoteOutcome> {
        let oids: Vec<Oid> = items.iter().chain(counters).copied().collect();
        let current =
            try_join_all(oids.iter().map(|&oid| self.conn.load_before(oid, Tid::MAX))).await?;

        let id = Value::Int(self.next_txn);
        self.next_txn += 1;
        self.conn.send(&Request::TpcBegin {
            txn: id.clone(),
            user: Bytes::new(),
            description: Bytes::from_static(b"zeo-bench"),
            extension: Value::Dict(Vec::new()),
            tid: None,
            status: b' ',
        })?;
        for (i, (&oid, loaded)) in oids.iter().zip(current).enumerate() {
            let Loaded {
                data,
                start: serial,
                ..
            } = loaded.0.ok_or_else(|| anyhow!("{oid} does not exist"))?;
            let new = if i < items.len() {
                meta.new_item_record(rng)
            } else {
                let (class_len, value) =
                    parse_counter(&data).ok_or_else(|| anyhow!("{oid} is not a Length counter"))?;
                counter_record(&data, class_len, value + 1)
            };
            self.storea(oid, serial, new, &id)?;
        }

        let mut resolved_by_client = 0;
        let mut resolved_by_server = 0;
        for _ in 0..MAX_VOTES {
            let reply: VoteResult =
                match self.conn.request(&Request::Vote { txn: id.clone() }).await {
                    Ok(v) => v,
                    Err(ClientError::Remote(e)) if is_conflict(&e.to_storage_error()) => {
                        self.abort(&id).await;
                        return Ok(VoteOutcome::Conflict);
                    }
                    Err(e) => return Err(e.into()),
                };
            resolved_by_server += reply.resolved().count() as u64;
            let to_resolve: Vec<Conflict> = reply.conflicts().cloned().collect();
            if to_resolve.is_empty() {
                return Ok(VoteOutcome::Voted(Voted {
                    id,
                    resolved_by_client,
                    resolved_by_server,
                }));
            }
            for c in to_resolve {
                if !counters.contains(&c.oid) {
                    self.abort(&id).await;
                    return Ok(VoteOutcome::Conflict);
                }
                let resolved = self.resolve_counter(&c).await?;
                self.storea(c.oid, c.committed, resolved, &id)?;
                resolved_by_client += 1;
            }
        }
        self.abort(&id).await;
        Ok(VoteOutcome::Conflict)
    }

    /// Finishes a voted transaction; returns its tid.
    pub async fn finish(&mut self, voted: &Voted) -> Result<Tid> {
        Ok(self
            .conn
            .request(&Request::TpcFinish {
                txn: voted.id.clone(),
            })
            .await?)
    }

    /// Commits one transaction, retrying after unresolvable conflicts with fresh reads.
    /// Returns the tid and counts of conflicts.
    pub async fn commit(
        &mut self,
        meta: &Meta,
        rng: &mut Rng,
        items: &[Oid],
        counters: &[Oid],
        tally: &mut ConflictTally,
    ) -> Result<Tid> {
        loop {
            tally.attempts += 1;
            match self.store_and_vote(meta, rng, items, counters).await? {
                VoteOutcome::Voted(voted) => {
                    let tid = self.finish(&voted).await?;
                    tally.resolved_by_client += voted.resolved_by_client;
                    tally.resolved_by_server += voted.resolved_by_server;
                    if voted.resolved_by_client + voted.resolved_by_server > 0 {
                        tally.conflicted_attempts += 1;
                    }
                    return Ok(tid);
                }
                VoteOutcome::Conflict => {
                    tally.unresolved += 1;
                    tally.conflicted_attempts += 1;
                }
            }
        }
    }

    fn storea(&self, oid: Oid, serial: Tid, data: Bytes, id: &Value) -> Result<()> {
        self.conn.send(&Request::Storea {
            oid,
            serial,
            data,
            txn: id.clone(),
        })?;
        Ok(())
    }

    /// What `Length._p_resolveConflict(old, committed, ours)` computes, from the two
    /// revisions ClientStorage's `tryToResolveConflict` loads.
    async fn resolve_counter(&self, c: &Conflict) -> Result<Bytes> {
        let (committed, old) = futures::try_join!(
            self.conn.load_serial(c.oid, c.committed),
            self.conn.load_serial(c.oid, c.read)
        )?;
        let value = |rec: &[u8]| {
            parse_counter(rec).ok_or_else(|| anyhow!("{} is not a Length counter", c.oid))
        };
        let (class_len, committed_value) = value(&committed)?;
        let (_, old_value) = value(&old)?;
        let (_, ours) = value(&c.data)?;
        Ok(counter_record(
            &committed,
            class_len,
            committed_value + ours - old_value,
        ))
    }

    async fn abort(&self, id: &Value) {
        // The server may already have ended the transaction (a vote that raised); the
        // abort is then a no-op on either server, and its outcome does not matter.
        let _ = self.conn.call(&Request::TpcAbort { txn: id.clone() }).await;
    }
}

fn is_conflict(e: &StorageError) -> bool {
    matches!(
        e,
        StorageError::Conflict { .. } | StorageError::ReadConflict { .. }
    )
}

/// Conflict counts of a writer.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ConflictTally {
    /// Transactions attempted (a retried transaction counts once per attempt).
    pub attempts: u64,
    /// Attempts that met at least one conflict, resolved or not.
    pub conflicted_attempts: u64,
    /// Conflicts the server returned and this client resolved (zeors' way).
    pub resolved_by_client: u64,
    /// Conflicts the server resolved itself (the stock server's default).
    pub resolved_by_server: u64,
    /// Unresolvable conflicts: the attempt was aborted and retried.
    pub unresolved: u64,
}

impl ConflictTally {
    pub fn add(&mut self, o: &ConflictTally) {
        self.attempts += o.attempts;
        self.conflicted_attempts += o.conflicted_attempts;
        self.resolved_by_client += o.resolved_by_client;
        self.resolved_by_server += o.resolved_by_server;
        self.unresolved += o.unresolved;
    }
}
