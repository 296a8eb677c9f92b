//! Two-phase commit against the shared database, with RelStorage's locks.
//!
//! Invariants:
//! - A voted transaction owns one pooled connection inside one database transaction from
//!   `vote` to `finish`/`abort`. Its locks are RelStorage's on PostgreSQL: a shared
//!   advisory try-lock on each read-current oid (`pg_try_advisory_xact_lock_shared`,
//!   failing at once), then an exclusive advisory lock on each oid it writes
//!   (`pg_advisory_xact_lock`), both in ascending oid order, waiting at most the
//!   connection's `lock_timeout`; at `finish`, the commit lock (advisory lock -1) under
//!   which the tid is chosen as `max(clock of the database, last tid + 1)` and the rows
//!   are written. Conflict checks run after the object locks are held, so they cannot be
//!   invalidated by another writer (zeors or RelStorage) before the commit.
//! - When `vote` finds conflicts the database transaction and its locks are kept: the
//!   server keeps its commit lock, and the client's next `vote` of the same transaction
//!   (its resolved stores appended) runs on the same connection, where the objects cannot
//!   have changed again. `abort` rolls it back. A vote of another transaction while one
//!   waits (a server that gave the commit lock up) rolls the waiting one back first.
//! - Rows are written only at `finish`, in one database transaction that also NOTIFYs
//!   the other zeors servers; a crash (of zeors or of the database) before its COMMIT
//!   leaves nothing behind and releases every lock.
//! - History-preserving rows follow RelStorage: `transaction` row, `object_state` with
//!   `prev_tid` (the revision replaced, 0 for a new object) and the `md5` of the state,
//!   `current_object` upserted. History-free rows are upserted in `object_state`, and a
//!   deleted object's row (with its blob chunks) is deleted.

use crate::db::{self, storage_error, TxnConn};
use crate::schema::Layout;
use crate::storage::Inner;
use bytes::Bytes;
use deadpool_postgres::Object;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use tokio::io::AsyncReadExt;
use zodb::{Conflict, Oid, Result, StorageError, Tid, Transaction, TransactionMeta, TxnKey, Vote};

/// Size of the pieces a blob file is sent to a large object in (bounded memory).
pub(crate) const BLOB_PIECE: usize = 1 << 20;

/// A transaction between `vote` and `finish`/`abort`.
pub(crate) struct Pending {
    pub key: TxnKey,
    pub conn: TxnConn,
    /// `None` while the client resolves conflicts.
    pub plan: Option<Plan>,
}

/// What `finish` writes.
pub(crate) struct Plan {
    pub meta: TransactionMeta,
    /// Final operation per oid, in oid order.
    pub writes: BTreeMap<Oid, Write>,
    /// Large objects holding the blobs of this transaction.
    pub blobs: Vec<(Oid, u32)>,
    /// Undo rows copied by `vote` under an early commit lock, with the tid chosen then.
    pub early_tid: Option<Tid>,
    pub changed: Vec<Oid>,
}

pub(crate) enum Write {
    /// A new revision (or, with `None`, no state: a deletion).
    Data(Option<Bytes>),
}

/// The operation `vote` keeps for an oid (the last one the client sent).
enum Op {
    Store {
        serial: Tid,
        data: Bytes,
        blob: Option<PathBuf>,
    },
    Delete {
        serial: Tid,
    },
    Restore {
        data: Option<Bytes>,
    },
}

enum Prepared {
    Ready(Plan),
    Conflicts(Vec<Conflict>),
}

pub(crate) async fn vote(inner: &Inner, txn: &Transaction) -> Result<Vote> {
    if inner.opts.read_only {
        return Err(StorageError::ReadOnly);
    }
    let mut slot = inner.pending.lock().await;
    let conn = match slot.take() {
        Some(p) if p.key == txn.key && p.plan.is_none() => p.conn,
        Some(p) => {
            p.conn.release().await;
            begin(inner).await?
        }
        None => begin(inner).await?,
    };
    match prepare(inner, &conn, txn).await {
        Ok(Prepared::Ready(plan)) => {
            let changed = plan.changed.clone();
            *slot = Some(Pending {
                key: txn.key,
                conn,
                plan: Some(plan),
            });
            Ok(Vote::Ok { changed })
        }
        Ok(Prepared::Conflicts(c)) => {
            *slot = Some(Pending {
                key: txn.key,
                conn,
                plan: None,
            });
            Ok(Vote::Conflicts(c))
        }
        Err(e) => {
            conn.release().await;
            Err(e)
        }
    }
}

pub(crate) async fn abort(inner: &Inner, key: TxnKey) {
    let mut slot = inner.pending.lock().await;
    if slot.as_ref().is_some_and(|p| p.key == key) {
        let p = slot.take().expect("checked");
        p.conn.release().await;
    }
}

/// A pooled connection inside a new database transaction.
async fn begin(inner: &Inner) -> Result<TxnConn> {
    let conn = TxnConn::new(inner.pool.get().await.map_err(db::pool_error)?);
    conn.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        .await
        .map_err(storage_error)?;
    Ok(conn)
}

fn ids(oids: impl IntoIterator<Item = Oid>) -> Vec<i64> {
    oids.into_iter().map(|o| o.0 as i64).collect()
}

/// Current tids of `oids` as committed now.
async fn current_tids(inner: &Inner, conn: &Object, oids: &[i64]) -> Result<HashMap<Oid, Tid>> {
    let sql = match inner.layout {
        Layout::HistoryPreserving => {
            "SELECT zoid, tid FROM current_object WHERE zoid = ANY($1::bigint[])"
        }
        Layout::HistoryFree => "SELECT zoid, tid FROM object_state WHERE zoid = ANY($1::bigint[])",
    };
    let stmt = conn.prepare_cached(sql).await.map_err(storage_error)?;
    Ok(conn
        .query(&stmt, &[&oids])
        .await
        .map_err(storage_error)?
        .iter()
        .map(|r| {
            (
                Oid(r.get::<_, i64>(0) as u64),
                Tid(r.get::<_, i64>(1) as u64),
            )
        })
        .collect())
}

async fn check_read_current(
    inner: &Inner,
    conn: &Object,
    checks: &BTreeMap<Oid, Tid>,
) -> Result<()> {
    let oids = ids(checks.keys().copied());
    let committed = current_tids(inner, conn, &oids).await?;
    for (oid, serial) in checks {
        let now = committed.get(oid).copied().unwrap_or(Tid::ZERO);
        if now != *serial {
            return Err(StorageError::ReadConflict {
                oid: *oid,
                committed: now,
                read: *serial,
            });
        }
    }
    Ok(())
}

async fn prepare(inner: &Inner, conn: &Object, txn: &Transaction) -> Result<Prepared> {
    let mut ops: BTreeMap<Oid, Op> = BTreeMap::new();
    let mut checks: BTreeMap<Oid, Tid> = BTreeMap::new();
    // Position in the transaction of each oid's kept operation, and the undos with theirs.
    let mut position: HashMap<Oid, usize> = HashMap::new();
    let mut undos: Vec<(usize, Tid)> = Vec::new();
    for (index, op) in txn.ops.iter().enumerate() {
        if let Some(oid) = match op {
            zodb::TxnOp::Store { oid, .. }
            | zodb::TxnOp::StoreBlob { oid, .. }
            | zodb::TxnOp::Delete { oid, .. }
            | zodb::TxnOp::Restore { oid, .. } => Some(*oid),
            _ => None,
        } {
            position.insert(oid, index);
        }
        match op {
            zodb::TxnOp::Store { oid, serial, data }
            | zodb::TxnOp::StoreBlob {
                oid, serial, data, ..
            } => {
                if data.is_empty() {
                    return Err(StorageError::Value(format!(
                        "store of oid {oid} with empty data"
                    )));
                }
                let blob = match op {
                    zodb::TxnOp::StoreBlob { file, .. } => {
                        if inner.opts.blob_dir.is_none() {
                            return Err(StorageError::Unsupported("blobs"));
                        }
                        Some(file.clone())
                    }
                    _ => None,
                };
                ops.insert(
                    *oid,
                    Op::Store {
                        serial: *serial,
                        data: data.clone(),
                        blob,
                    },
                );
            }
            zodb::TxnOp::CheckCurrent { oid, serial } => {
                checks.insert(*oid, *serial);
            }
            zodb::TxnOp::Delete { oid, serial } => {
                ops.insert(*oid, Op::Delete { serial: *serial });
            }
            zodb::TxnOp::Restore {
                oid, serial, data, ..
            } => {
                if data.as_ref().is_some_and(|d| d.is_empty()) {
                    return Err(StorageError::Value(format!(
                        "restore of oid {oid} with empty data (use None for no state)"
                    )));
                }
                let _ = serial;
                ops.insert(*oid, Op::Restore { data: data.clone() });
            }
            zodb::TxnOp::Undo { transaction_id } => {
                if inner.layout != Layout::HistoryPreserving {
                    return Err(StorageError::Undo {
                        reason: "Undo is not supported by this storage".into(),
                        oid: None,
                    });
                }
                let tid =
                    zodb::tid_from_undo_id(transaction_id).ok_or_else(|| StorageError::Undo {
                        reason: "Invalid transaction id".into(),
                        oid: None,
                    })?;
                undos.push((index, tid));
            }
        }
    }

    // Read-current objects: a cheap check first, then shared try-locks in oid order,
    // then the check again under the locks (RelStorage's order).
    if !checks.is_empty() {
        check_read_current(inner, conn, &checks).await?;
        let oids = ids(checks.keys().copied());
        let stmt = conn
            .prepare_cached(
                "SELECT o FROM unnest($1::bigint[]) AS o
                 WHERE NOT pg_try_advisory_xact_lock_shared(o) LIMIT 1",
            )
            .await
            .map_err(storage_error)?;
        if let Some(r) = conn
            .query_opt(&stmt, &[&oids])
            .await
            .map_err(storage_error)?
        {
            let oid = Oid(r.get::<_, i64>(0) as u64);
            return Err(StorageError::ReadConflict {
                oid,
                committed: Tid::ZERO,
                read: checks[&oid],
            });
        }
        check_read_current(inner, conn, &checks).await?;
    }

    // Exclusive locks on every oid written, in oid order (the array is sorted and
    // unnest yields it in order).
    let written = ids(ops.keys().copied());
    if !written.is_empty() {
        let stmt = conn
            .prepare_cached("SELECT pg_advisory_xact_lock(o) FROM unnest($1::bigint[]) AS o")
            .await
            .map_err(storage_error)?;
        conn.execute(&stmt, &[&written])
            .await
            .map_err(storage_error)?;
    }

    let committed = current_tids(inner, conn, &written).await?;
    let mut conflicts = Vec::new();
    for (oid, op) in &ops {
        match op {
            Op::Store { serial, data, .. } => {
                if let Some(c) = committed.get(oid) {
                    if c != serial {
                        conflicts.push(Conflict {
                            oid: *oid,
                            committed: *c,
                            read: *serial,
                            data: data.clone(),
                        });
                    }
                }
            }
            Op::Delete { serial } => {
                let c = committed.get(oid).ok_or(StorageError::PosKey(*oid))?;
                if c != serial {
                    return Err(StorageError::Conflict {
                        oid: *oid,
                        committed: *c,
                        read: *serial,
                        class_name: None,
                    });
                }
            }
            Op::Restore { .. } => {}
        }
    }
    if !conflicts.is_empty() {
        return Ok(Prepared::Conflicts(conflicts));
    }

    // The oid sequence must stay ahead of every oid written (root, restores).
    if let Some(max) = ops.keys().next_back() {
        inner.oids_seen(conn, *max).await?;
    }

    // Undo, as RelStorage does it: pack lock, commit lock and tid now, rows copied now.
    let mut early_tid = None;
    let mut changed = Vec::new();
    if !undos.is_empty() {
        for (index, undone) in &undos {
            // Checked against the state left by the undos before it in this transaction.
            crate::undo::verify(conn, *undone).await?;
            let tid = match early_tid {
                Some(t) => t,
                None => {
                    let t = lock_and_choose_tid(inner, conn, &txn.meta).await?;
                    early_tid = Some(t);
                    t
                }
            };
            for oid in crate::undo::apply(conn, *undone, tid).await? {
                // A store of the oid before the undo is replaced by the undo.
                if position.get(&oid).is_some_and(|p| p < index) {
                    ops.remove(&oid);
                }
                if !changed.contains(&oid) {
                    changed.push(oid);
                }
            }
        }
    }

    let mut blobs = Vec::new();
    let mut writes = BTreeMap::new();
    for (oid, op) in ops {
        let w = match op {
            Op::Store { data, blob, .. } => {
                if let Some(file) = blob {
                    blobs.push((oid, upload_blob(conn, &file).await?));
                }
                Write::Data(Some(data))
            }
            Op::Delete { .. } => Write::Data(None),
            Op::Restore { data } => Write::Data(data),
        };
        writes.insert(oid, w);
    }
    Ok(Prepared::Ready(Plan {
        meta: txn.meta.clone(),
        writes,
        blobs,
        early_tid,
        changed,
    }))
}

/// Copies a blob file into a new large object, piece by piece; returns its oid. The
/// large object belongs to the open transaction: a rollback removes it.
pub(crate) async fn upload_blob(conn: &Object, file: &std::path::Path) -> Result<u32> {
    let lo: u32 = conn
        .query_one("SELECT lo_create(0)", &[])
        .await
        .map_err(storage_error)?
        .get(0);
    let put = conn
        .prepare_cached("SELECT lo_put($1::oid, $2, $3)")
        .await
        .map_err(storage_error)?;
    let mut f = tokio::fs::File::open(file).await?;
    let mut buf = vec![0u8; BLOB_PIECE];
    let mut offset: i64 = 0;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        conn.execute(&put, &[&lo, &offset, &&buf[..filled]])
            .await
            .map_err(storage_error)?;
        offset += filled as i64;
        if filled < buf.len() {
            break;
        }
    }
    Ok(lo)
}

/// A committed transaction, for its finisher to announce.
pub(crate) struct Finished {
    pub tid: Tid,
    /// Every oid it changed.
    pub oids: Vec<Oid>,
    /// The states it stored (for the cache).
    pub written: Vec<(Oid, Bytes)>,
}

/// Writes the voted transaction and commits it. The caller announces it.
pub(crate) async fn finish(inner: &Inner, key: TxnKey) -> Result<Finished> {
    let mut slot = inner.pending.lock().await;
    let pending = match slot.take() {
        Some(p) if p.key == key && p.plan.is_some() => p,
        other => {
            *slot = other;
            return Err(StorageError::Transaction(
                "finish of a transaction that was not voted".into(),
            ));
        }
    };
    drop(slot);
    let Pending { conn, plan, .. } = pending;
    let plan = plan.expect("checked");
    match write(inner, &conn, &plan, key).await {
        Ok(tid) => {
            conn.done();
            let mut oids: Vec<Oid> = plan.writes.keys().copied().collect();
            oids.extend(plan.changed.iter().filter(|o| !plan.writes.contains_key(o)));
            oids.sort_unstable();
            let written = plan
                .writes
                .into_iter()
                .filter_map(|(oid, w)| match w {
                    Write::Data(Some(d)) if !plan.changed.contains(&oid) => Some((oid, d)),
                    _ => None,
                })
                .collect();
            Ok(Finished { tid, oids, written })
        }
        Err(e) => {
            conn.release().await;
            Err(e)
        }
    }
}

async fn write(inner: &Inner, conn: &Object, plan: &Plan, key: TxnKey) -> Result<Tid> {
    let hp = inner.layout == Layout::HistoryPreserving;
    let tid = match plan.early_tid {
        Some(t) => t,
        None => lock_and_choose_tid(inner, conn, &plan.meta).await?,
    };
    let t = tid.0 as i64;

    let mut oids = Vec::new();
    let mut states: Vec<Option<&[u8]>> = Vec::new();
    let mut deleted = Vec::new();
    for (oid, w) in &plan.writes {
        let Write::Data(d) = w;
        if !hp && d.is_none() {
            deleted.push(oid.0 as i64);
            continue;
        }
        oids.push(oid.0 as i64);
        states.push(d.as_deref());
    }
    if hp {
        if !oids.is_empty() {
            let stmt = conn
                .prepare_cached(
                    "INSERT INTO object_state (zoid, tid, prev_tid, md5, state_size, state)
                     SELECT n.zoid, $1, COALESCE(c.tid, 0), md5(n.state),
                            COALESCE(length(n.state), 0), n.state
                     FROM unnest($2::bigint[], $3::bytea[]) AS n(zoid, state)
                     LEFT JOIN current_object c ON c.zoid = n.zoid
                     ON CONFLICT (zoid, tid) DO UPDATE SET md5 = excluded.md5,
                         state_size = excluded.state_size, state = excluded.state",
                )
                .await
                .map_err(storage_error)?;
            conn.execute(&stmt, &[&t, &oids, &states])
                .await
                .map_err(storage_error)?;
        }
        insert_blob_chunks(conn, t, &plan.blobs).await?;
        let stmt = conn
            .prepare_cached(
                "INSERT INTO current_object (zoid, tid)
                 SELECT zoid, tid FROM object_state WHERE tid = $1
                 ON CONFLICT (zoid) DO UPDATE SET tid = excluded.tid",
            )
            .await
            .map_err(storage_error)?;
        conn.execute(&stmt, &[&t]).await.map_err(storage_error)?;
    } else {
        if !deleted.is_empty() {
            // Blob chunks go with the row (ON DELETE CASCADE, and the trigger unlinks).
            let stmt = conn
                .prepare_cached("DELETE FROM object_state WHERE zoid = ANY($1::bigint[])")
                .await
                .map_err(storage_error)?;
            conn.execute(&stmt, &[&deleted])
                .await
                .map_err(storage_error)?;
        }
        if !oids.is_empty() {
            let stmt = conn
                .prepare_cached(
                    "INSERT INTO object_state (zoid, tid, state_size, state)
                     SELECT zoid, $1, COALESCE(length(state), 0), state
                     FROM unnest($2::bigint[], $3::bytea[]) AS n(zoid, state)
                     ON CONFLICT (zoid) DO UPDATE SET tid = excluded.tid,
                         state_size = excluded.state_size, state = excluded.state",
                )
                .await
                .map_err(storage_error)?;
            conn.execute(&stmt, &[&t, &oids, &states])
                .await
                .map_err(storage_error)?;
        }
        if !plan.blobs.is_empty() {
            let blob_oids: Vec<i64> = plan.blobs.iter().map(|(o, _)| o.0 as i64).collect();
            let stmt = conn
                .prepare_cached("DELETE FROM blob_chunk WHERE zoid = ANY($1::bigint[])")
                .await
                .map_err(storage_error)?;
            conn.execute(&stmt, &[&blob_oids])
                .await
                .map_err(storage_error)?;
            insert_blob_chunks(conn, t, &plan.blobs).await?;
        }
    }
    conn.execute(
        "SELECT pg_notify($1, $2)",
        &[&crate::watch::CHANNEL, &t.to_string()],
    )
    .await
    .map_err(storage_error)?;
    *inner.committing.lock() = Some((tid, key));
    conn.batch_execute("COMMIT").await.map_err(|e| {
        *inner.committing.lock() = None;
        // The outcome of a COMMIT whose answer was lost is unknown; the watcher will
        // announce the transaction if it did commit.
        let e = storage_error(e);
        tracing::warn!(%tid, error = %e, "COMMIT failed");
        e
    })?;
    Ok(tid)
}

async fn insert_blob_chunks(conn: &Object, tid: i64, blobs: &[(Oid, u32)]) -> Result<()> {
    if blobs.is_empty() {
        return Ok(());
    }
    let oids: Vec<i64> = blobs.iter().map(|(o, _)| o.0 as i64).collect();
    let los: Vec<u32> = blobs.iter().map(|(_, l)| *l).collect();
    let stmt = conn
        .prepare_cached(
            "INSERT INTO blob_chunk (zoid, tid, chunk_num, chunk)
             SELECT zoid, $1, 0, chunk FROM unnest($2::bigint[], $3::oid[]) AS n(zoid, chunk)",
        )
        .await
        .map_err(storage_error)?;
    conn.execute(&stmt, &[&tid, &oids, &los])
        .await
        .map_err(storage_error)?;
    Ok(())
}

/// Takes RelStorage's commit lock (advisory lock -1, held to the end of the transaction)
/// and picks the tid: the given one if it is later than every committed tid, or the
/// database's clock, made later than the last tid if needed. In a history-preserving
/// database the `transaction` row is inserted too.
pub(crate) async fn lock_and_choose_tid(
    inner: &Inner,
    conn: &Object,
    meta: &TransactionMeta,
) -> Result<Tid> {
    let hp = inner.layout == Layout::HistoryPreserving;
    conn.batch_execute("SELECT pg_advisory_xact_lock(-1)")
        .await
        .map_err(storage_error)?;
    if meta.tid.is_some() {
        // RelStorage commits a transaction with a given tid (zodbconvert, restore) under
        // the row lock of `commit_row_lock` rather than the advisory lock: hold both.
        conn.batch_execute("SELECT tid FROM commit_row_lock FOR UPDATE")
            .await
            .map_err(storage_error)?;
    }
    let sql = if hp {
        "SELECT COALESCE(MAX(tid), 0), EXTRACT(EPOCH FROM clock_timestamp())::float8 FROM \"transaction\""
    } else {
        "SELECT COALESCE(MAX(tid), 0), EXTRACT(EPOCH FROM clock_timestamp())::float8 FROM object_state"
    };
    let stmt = conn.prepare_cached(sql).await.map_err(storage_error)?;
    let row = conn.query_one(&stmt, &[]).await.map_err(storage_error)?;
    let last = Tid(row.get::<_, i64>(0) as u64);
    let now: f64 = row.get(1);
    let tid = match meta.tid {
        Some(t) => {
            zodb::timestamp::check_explicit_tid(t, last, now).map_err(StorageError::Transaction)?;
            t
        }
        None => zodb::timestamp::later_than(zodb::timestamp::tid_from_unix(now), last)
            .ok_or_else(|| StorageError::Transaction("no tid left after the last one".into()))?,
    };
    if hp {
        let stmt = conn
            .prepare_cached(
                "INSERT INTO \"transaction\" (tid, packed, username, description, extension)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await
            .map_err(storage_error)?;
        let packed = meta.status == b'p';
        conn.execute(
            &stmt,
            &[
                &(tid.0 as i64),
                &packed,
                &meta.user,
                &meta.description,
                &meta.extension,
            ],
        )
        .await
        .map_err(storage_error)?;
    }
    Ok(tid)
}
