//! Undo in a history-preserving database, as RelStorage does it.
//!
//! Invariants:
//! - The undo log lists the `transaction` rows that are not packed (tid 0 excepted),
//!   newest first.
//! - Undoing transaction U holds the pack lock (advisory lock -2, here for the rest of
//!   the database transaction, so no pack runs meanwhile) and takes the commit lock
//!   early, choosing the undoing transaction's tid then, as RelStorage does.
//! - U is undoable when it is not packed, did not create the root, and every object it
//!   wrote still has the same state now (same md5), i.e. nothing changed it since
//!   (RelStorage's rule; it resolves no undo conflicts). Several undos in one transaction
//!   are checked and applied one after the other, each against the state the previous
//!   ones left. Changed objects are reported as `MultipleUndoErrors`, one per object.
//! - Each object U wrote gets a new revision with the state it had before U (no state
//!   for an object U created), its blob chunks copied along, and `current_object` moves
//!   to it.

use crate::db::{self, storage_error};
use crate::storage::Inner;
use deadpool_postgres::Object;
use zodb::{Oid, Result, StorageError, Tid, UndoEntry, UndoFilter};

pub(crate) async fn undo_log(
    inner: &Inner,
    first: i64,
    last: i64,
    filter: Option<UndoFilter>,
) -> Result<Vec<UndoEntry>> {
    let last = if last < 0 {
        first.saturating_sub(last)
    } else {
        last
    };
    let conn = inner.pool.get().await.map_err(db::pool_error)?;
    let stmt = conn
        .prepare_cached(
            "SELECT t.tid, t.username, t.description, t.extension,
                    (SELECT COALESCE(sum(state_size), 0)::bigint FROM object_state o
                     WHERE o.tid = t.tid)
             FROM \"transaction\" t
             WHERE NOT t.packed AND t.tid > 0 AND t.tid < $1
             ORDER BY t.tid DESC LIMIT $2",
        )
        .await
        .map_err(storage_error)?;
    let mut out = Vec::new();
    let mut i: i64 = 0;
    let mut below = inner.cache.visible().0 as i64 + 1;
    'pages: while i < last {
        let rows = conn
            .query(&stmt, &[&below, &200i64])
            .await
            .map_err(storage_error)?;
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            let tid: i64 = r.get(0);
            below = tid;
            let entry = UndoEntry {
                tid: Tid(tid as u64),
                user: r.get(1),
                description: r.get(2),
                extension: r.get::<_, Option<Vec<u8>>>(3).unwrap_or_default(),
                size: r.get::<_, i64>(4) as u64,
            };
            if filter.as_ref().is_none_or(|f| f(&entry)) {
                if i >= first {
                    out.push(entry);
                }
                i += 1;
                if i >= last {
                    break 'pages;
                }
            }
        }
    }
    Ok(out)
}

fn undo_error(reason: &str) -> StorageError {
    StorageError::Undo {
        reason: reason.into(),
        oid: None,
    }
}

/// Checks that `undone` can be undone (pack lock held by the caller's transaction).
pub(crate) async fn verify(conn: &Object, undone: Tid) -> Result<()> {
    let u = undone.0 as i64;
    let got: bool = conn
        .query_one("SELECT pg_try_advisory_xact_lock(-2)", &[])
        .await
        .map_err(storage_error)?
        .get(0);
    if !got {
        return Err(undo_error("A pack or undo operation is in progress"));
    }
    let exists = conn
        .query_opt(
            "SELECT 1 FROM \"transaction\" WHERE tid = $1 AND NOT packed AND tid > 0",
            &[&u],
        )
        .await
        .map_err(storage_error)?;
    if exists.is_none() {
        return Err(undo_error("Transaction not found or packed"));
    }
    let changed = conn
        .query(
            "SELECT u.zoid FROM object_state u
             JOIN current_object c ON c.zoid = u.zoid
             JOIN object_state s ON s.zoid = c.zoid AND s.tid = c.tid
             WHERE u.tid = $1 AND s.md5 IS DISTINCT FROM u.md5 ORDER BY u.zoid",
            &[&u],
        )
        .await
        .map_err(storage_error)?;
    if !changed.is_empty() {
        // One failure per record, as FileStorage reports them (MultipleUndoErrors).
        return Err(StorageError::MultipleUndo(
            changed
                .iter()
                .map(|r| {
                    (
                        Oid(r.get::<_, i64>(0) as u64),
                        "Some data were modified by a later transaction".to_string(),
                    )
                })
                .collect(),
        ));
    }
    let root = conn
        .query_opt(
            "SELECT 1 FROM object_state WHERE tid = $1 AND zoid = 0 AND prev_tid = 0",
            &[&u],
        )
        .await
        .map_err(storage_error)?;
    if root.is_some() {
        return Err(undo_error("Can't undo the creation of the root object"));
    }
    Ok(())
}

/// Writes the undo of `undone` under tid `tid` (commit lock held); returns the oids it
/// changed.
pub(crate) async fn apply(conn: &Object, undone: Tid, tid: Tid) -> Result<Vec<Oid>> {
    let (u, t) = (undone.0 as i64, tid.0 as i64);
    // An object undone twice in one transaction: the later undo replaces the earlier.
    conn.execute(
        "UPDATE current_object c SET tid = s.prev_tid
         FROM object_state s
         WHERE s.zoid = c.zoid AND s.tid = $2 AND c.tid = $2
           AND c.zoid IN (SELECT zoid FROM object_state WHERE tid = $1)",
        &[&u, &t],
    )
    .await
    .map_err(storage_error)?;
    conn.execute(
        "DELETE FROM object_state WHERE tid = $2
           AND zoid IN (SELECT zoid FROM object_state WHERE tid = $1)",
        &[&u, &t],
    )
    .await
    .map_err(storage_error)?;
    let rows = conn
        .query(
            "INSERT INTO object_state (zoid, tid, prev_tid, md5, state_size, state)
             SELECT u.zoid, $2, c.tid, b.md5, COALESCE(b.state_size, 0), b.state
             FROM object_state u
             JOIN current_object c ON c.zoid = u.zoid
             LEFT JOIN object_state b ON b.zoid = u.zoid AND b.tid = u.prev_tid
             WHERE u.tid = $1
             ORDER BY u.zoid
             RETURNING zoid",
            &[&u, &t],
        )
        .await
        .map_err(storage_error)?;
    conn.execute(
        "INSERT INTO blob_chunk (zoid, tid, chunk_num, chunk)
         SELECT u.zoid, $2, b.chunk_num, b.chunk
         FROM object_state u
         JOIN blob_chunk b ON b.zoid = u.zoid AND b.tid = u.prev_tid
         WHERE u.tid = $1",
        &[&u, &t],
    )
    .await
    .map_err(storage_error)?;
    conn.execute(
        "INSERT INTO current_object (zoid, tid)
         SELECT zoid, tid FROM object_state WHERE tid = $1
         ON CONFLICT (zoid) DO UPDATE SET tid = excluded.tid",
        &[&t],
    )
    .await
    .map_err(storage_error)?;
    Ok(rows
        .iter()
        .map(|r| Oid(r.get::<_, i64>(0) as u64))
        .collect())
}
