//! Pack with garbage collection, RelStorage's algorithm on RelStorage's own pack tables,
//! so that a pack by zeors leaves the database as `zodbpack` would.
//!
//! Invariants:
//! - The pack lock (session advisory lock -2) is held for the whole pack, so a pack by
//!   zeors, by another zeors server or by `zodbpack`, and undo, never overlap.
//! - References come from the record pickles (`zodb::refs`) and are kept in RelStorage's
//!   `object_ref`/`object_refs_added` tables, filled incrementally (only transactions, or
//!   in a history-free database objects, not analysed before), so a later pack by either
//!   tool reuses them.
//! - History-preserving: the pack point is the last unpacked transaction at or before the
//!   pack time. Objects reachable from the root as of then, changed after it, or
//!   referenced by a state written after it are kept; for kept objects every revision at
//!   or before the pack point except the newest of them is removed, unreachable objects
//!   lose all of those. Transactions at or before the pack point are marked packed; those
//!   left empty are deleted.
//! - History-free: objects not reachable from the root and not written after the pack
//!   time are deleted.
//! - Blob chunks go with their rows (foreign key, ON DELETE CASCADE), and the trigger
//!   unlinks the large objects.
//! - Deletions are committed in batches; commits by clients continue meanwhile, as with
//!   RelStorage. Nothing a pack removes is announced: the object cache is cleared after.

use crate::db::{self, storage_error, TxnConn};
use crate::schema::Layout;
use crate::storage::Inner;
use deadpool_postgres::Object;
use std::collections::{HashMap, HashSet};
use zodb::{Result, StorageError, Tid};

/// Transactions (history-preserving) or objects (history-free) analysed per commit.
const REFS_BATCH: usize = 500;

pub(crate) async fn pack(inner: &Inner, pack_time: f64) -> Result<()> {
    if inner.opts.read_only {
        return Err(StorageError::ReadOnly);
    }
    // Holds a session lock: closed rather than pooled if the pack is cut short.
    let conn = TxnConn::new(inner.pool.get().await.map_err(db::pool_error)?);
    let got: bool = conn
        .query_one("SELECT pg_try_advisory_lock(-2)", &[])
        .await
        .map_err(storage_error)?
        .get(0);
    if !got {
        conn.done();
        return Err(StorageError::Transaction(
            "A pack or undo operation is in progress".into(),
        ));
    }
    let result = match inner.layout {
        Layout::HistoryPreserving => pack_hp(inner, &conn, pack_time).await,
        Layout::HistoryFree => pack_hf(inner, &conn, pack_time).await,
    };
    if result.is_err() {
        let _ = conn.batch_execute("ROLLBACK").await;
    }
    if conn
        .batch_execute("SELECT pg_advisory_unlock(-2)")
        .await
        .is_ok()
        && result.is_ok()
    {
        conn.done();
    }
    inner.cache.clear();
    result
}

/// The tid a pack time stands for, never past what clients were told.
fn requested_tid(inner: &Inner, pack_time: f64) -> Tid {
    let visible = inner.cache.visible();
    if pack_time.is_finite() && pack_time > 0.0 {
        zodb::timestamp::tid_from_unix(pack_time).min(visible)
    } else {
        visible
    }
}

async fn exec(
    conn: &Object,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64> {
    conn.execute(sql, params).await.map_err(storage_error)
}

/// Breadth-first from the kept objects over `refs`; returns every object reached.
fn reachable(refs: &HashMap<i64, Vec<i64>>, roots: Vec<i64>) -> HashSet<i64> {
    let mut seen: HashSet<i64> = roots.iter().copied().collect();
    let mut queue = roots;
    while let Some(z) = queue.pop() {
        if let Some(to) = refs.get(&z) {
            for t in to {
                if seen.insert(*t) {
                    queue.push(*t);
                }
            }
        }
    }
    seen
}

/// Marks the objects reachable from the kept ones as kept too.
async fn traverse(conn: &Object, refs_sql: &str) -> Result<()> {
    let mut refs: HashMap<i64, Vec<i64>> = HashMap::new();
    for r in conn.query(refs_sql, &[]).await.map_err(storage_error)? {
        refs.entry(r.get(0)).or_default().push(r.get(1));
    }
    let roots: Vec<i64> = conn
        .query("SELECT zoid FROM pack_object WHERE keep", &[])
        .await
        .map_err(storage_error)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let keep: Vec<i64> = reachable(&refs, roots).into_iter().collect();
    drop(refs);
    for chunk in keep.chunks(10_000) {
        exec(
            conn,
            "UPDATE pack_object SET keep = true, visited = true
             WHERE zoid = ANY($1::bigint[]) AND NOT keep",
            &[&chunk.to_vec()],
        )
        .await?;
    }
    Ok(())
}

/// References of the given states as (from, to) pairs.
fn state_refs(zoid: i64, state: Option<&[u8]>) -> Result<Vec<i64>> {
    let Some(state) = state else {
        return Ok(Vec::new());
    };
    let refs = zodb::refs::references(state).map_err(|e| {
        StorageError::Corrupted(format!(
            "cannot read the references of object {}: {e}",
            zodb::Oid(zoid as u64)
        ))
    })?;
    Ok(refs.into_iter().map(|o| o.0 as i64).collect())
}

async fn pack_hp(inner: &Inner, conn: &Object, pack_time: f64) -> Result<()> {
    let requested = requested_tid(inner, pack_time).0 as i64;
    let Some(row) = conn
        .query_opt(
            "SELECT tid FROM \"transaction\" WHERE tid > 0 AND tid <= $1 AND NOT packed
             ORDER BY tid DESC LIMIT 1",
            &[&requested],
        )
        .await
        .map_err(storage_error)?
    else {
        tracing::info!("pack: nothing to pack");
        return Ok(());
    };
    let pack_tid: i64 = row.get(0);

    // References of every transaction not analysed yet.
    let todo: Vec<i64> = conn
        .query(
            "SELECT t.tid FROM \"transaction\" t
             LEFT JOIN object_refs_added a ON a.tid = t.tid
             WHERE a.tid IS NULL AND t.tid > 0 ORDER BY t.tid",
            &[],
        )
        .await
        .map_err(storage_error)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tracing::info!(transactions = todo.len(), "pack: analysing references");
    for batch in todo.chunks(REFS_BATCH) {
        conn.batch_execute("BEGIN").await.map_err(storage_error)?;
        for tid in batch {
            let rows = conn
                .query(
                    "SELECT zoid, state FROM object_state WHERE tid = $1 ORDER BY zoid",
                    &[tid],
                )
                .await
                .map_err(storage_error)?;
            let (mut from, mut to) = (Vec::new(), Vec::new());
            for r in &rows {
                let z: i64 = r.get(0);
                for t in state_refs(z, r.get::<_, Option<&[u8]>>(1))? {
                    from.push(z);
                    to.push(t);
                }
            }
            exec(conn, "DELETE FROM object_ref WHERE tid = $1", &[tid]).await?;
            exec(
                conn,
                "INSERT INTO object_ref (zoid, tid, to_zoid)
                 SELECT DISTINCT f, $1::bigint, t FROM unnest($2::bigint[], $3::bigint[]) AS r(f, t)",
                &[tid, &from, &to],
            )
            .await?;
            exec(
                conn,
                "INSERT INTO object_refs_added (tid) VALUES ($1) ON CONFLICT DO NOTHING",
                &[tid],
            )
            .await?;
        }
        conn.batch_execute("COMMIT").await.map_err(storage_error)?;
    }

    conn.batch_execute("BEGIN").await.map_err(storage_error)?;
    conn.batch_execute("TRUNCATE pack_object")
        .await
        .map_err(storage_error)?;
    exec(
        conn,
        "INSERT INTO pack_object (zoid, keep, keep_tid)
         SELECT zoid, false, max(tid) FROM object_state
         WHERE tid > 0 AND tid <= $1 GROUP BY zoid",
        &[&pack_tid],
    )
    .await?;
    exec(
        conn,
        "UPDATE pack_object SET keep = true WHERE zoid = 0",
        &[],
    )
    .await?;
    // Changed after the pack point, or referenced by a state written after it.
    exec(
        conn,
        "UPDATE pack_object SET keep = true
         WHERE zoid IN (SELECT zoid FROM current_object WHERE tid > $1)",
        &[&pack_tid],
    )
    .await?;
    exec(
        conn,
        "UPDATE pack_object SET keep = true
         WHERE zoid IN (SELECT DISTINCT to_zoid FROM object_ref WHERE tid > $1)",
        &[&pack_tid],
    )
    .await?;
    traverse(
        conn,
        "SELECT r.zoid, r.to_zoid FROM object_ref r JOIN pack_object p ON p.zoid = r.zoid
         WHERE r.tid >= p.keep_tid",
    )
    .await?;
    conn.batch_execute("TRUNCATE pack_state, pack_state_tid")
        .await
        .map_err(storage_error)?;
    exec(
        conn,
        "INSERT INTO pack_state (tid, zoid)
         SELECT s.tid, s.zoid FROM object_state s JOIN pack_object p ON p.zoid = s.zoid
         WHERE s.tid > 0 AND s.tid <= $1 AND (NOT p.keep OR s.tid <> p.keep_tid)",
        &[&pack_tid],
    )
    .await?;
    exec(
        conn,
        "INSERT INTO pack_state_tid (tid) SELECT DISTINCT tid FROM pack_state",
        &[],
    )
    .await?;
    conn.batch_execute("COMMIT").await.map_err(storage_error)?;

    let tids = conn
        .query(
            "SELECT t.tid, s.tid IS NOT NULL FROM \"transaction\" t
             LEFT JOIN pack_state_tid s ON s.tid = t.tid
             WHERE t.tid > 0 AND t.tid <= $1 AND (NOT t.packed OR s.tid IS NOT NULL)
             ORDER BY t.tid",
            &[&pack_tid],
        )
        .await
        .map_err(storage_error)?;
    tracing::info!(transactions = tids.len(), pack_tid = %Tid(pack_tid as u64), "pack: packing");
    for batch in tids.chunks(REFS_BATCH) {
        conn.batch_execute("BEGIN").await.map_err(storage_error)?;
        for r in batch {
            let tid: i64 = r.get(0);
            let removable: bool = r.get(1);
            if removable {
                exec(
                    conn,
                    "DELETE FROM current_object WHERE tid = $1
                     AND zoid IN (SELECT zoid FROM pack_state WHERE tid = $1)",
                    &[&tid],
                )
                .await?;
                exec(
                    conn,
                    "DELETE FROM object_state WHERE tid = $1
                     AND zoid IN (SELECT zoid FROM pack_state WHERE tid = $1)",
                    &[&tid],
                )
                .await?;
                exec(
                    conn,
                    "UPDATE object_state SET prev_tid = 0 WHERE prev_tid = $1 AND tid <= $2",
                    &[&tid, &pack_tid],
                )
                .await?;
            }
            exec(
                conn,
                "UPDATE \"transaction\" SET packed = true,
                     is_empty = NOT EXISTS (SELECT 1 FROM object_state WHERE tid = $1)
                 WHERE tid = $1",
                &[&tid],
            )
            .await?;
        }
        conn.batch_execute("COMMIT").await.map_err(storage_error)?;
    }

    conn.batch_execute(
        "BEGIN;
         DELETE FROM object_refs_added
           WHERE tid IN (SELECT tid FROM \"transaction\" WHERE is_empty);
         DELETE FROM object_ref WHERE tid IN (SELECT tid FROM \"transaction\" WHERE is_empty);
         DELETE FROM \"transaction\" WHERE packed AND is_empty;
         TRUNCATE pack_object, pack_state, pack_state_tid;
         COMMIT;",
    )
    .await
    .map_err(storage_error)?;
    tracing::info!("pack: finished");
    Ok(())
}

async fn pack_hf(inner: &Inner, conn: &Object, pack_time: f64) -> Result<()> {
    let pack_tid = requested_tid(inner, pack_time).0 as i64;
    conn.batch_execute("BEGIN").await.map_err(storage_error)?;
    conn.batch_execute("TRUNCATE pack_object")
        .await
        .map_err(storage_error)?;
    exec(
        conn,
        "INSERT INTO pack_object (zoid, keep, keep_tid)
         SELECT zoid, tid > $1, tid FROM object_state",
        &[&pack_tid],
    )
    .await?;
    exec(
        conn,
        "UPDATE pack_object SET keep = true WHERE zoid = 0",
        &[],
    )
    .await?;
    conn.batch_execute("COMMIT").await.map_err(storage_error)?;

    // References of the objects whose current state was not analysed yet.
    let todo: Vec<i64> = conn
        .query(
            "SELECT s.zoid FROM pack_object p JOIN object_state s ON s.zoid = p.zoid
             LEFT JOIN object_refs_added a ON a.zoid = s.zoid
             WHERE a.tid IS NULL OR a.tid <> s.tid ORDER BY s.zoid",
            &[],
        )
        .await
        .map_err(storage_error)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tracing::info!(objects = todo.len(), "pack: analysing references");
    for batch in todo.chunks(REFS_BATCH) {
        let batch = batch.to_vec();
        conn.batch_execute("BEGIN").await.map_err(storage_error)?;
        let rows = conn
            .query(
                "SELECT zoid, tid, state FROM object_state WHERE zoid = ANY($1::bigint[])",
                &[&batch],
            )
            .await
            .map_err(storage_error)?;
        let (mut zoids, mut tids, mut from, mut to, mut ref_tids) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in &rows {
            let z: i64 = r.get(0);
            let t: i64 = r.get(1);
            zoids.push(z);
            tids.push(t);
            for target in state_refs(z, r.get::<_, Option<&[u8]>>(2))? {
                from.push(z);
                to.push(target);
                ref_tids.push(t);
            }
        }
        exec(
            conn,
            "DELETE FROM object_ref WHERE zoid = ANY($1::bigint[])",
            &[&zoids],
        )
        .await?;
        exec(
            conn,
            "DELETE FROM object_refs_added WHERE zoid = ANY($1::bigint[])",
            &[&zoids],
        )
        .await?;
        exec(
            conn,
            "INSERT INTO object_ref (zoid, to_zoid, tid)
             SELECT DISTINCT ON (f, t) f, t, x
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS r(f, t, x)",
            &[&from, &to, &ref_tids],
        )
        .await?;
        exec(
            conn,
            "INSERT INTO object_refs_added (zoid, tid)
             SELECT * FROM unnest($1::bigint[], $2::bigint[])",
            &[&zoids, &tids],
        )
        .await?;
        conn.batch_execute("COMMIT").await.map_err(storage_error)?;
    }

    conn.batch_execute("BEGIN").await.map_err(storage_error)?;
    traverse(conn, "SELECT zoid, to_zoid FROM object_ref").await?;
    conn.batch_execute("COMMIT").await.map_err(storage_error)?;
    let doomed: Vec<i64> = conn
        .query(
            "SELECT zoid FROM pack_object WHERE NOT keep ORDER BY zoid",
            &[],
        )
        .await
        .map_err(storage_error)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tracing::info!(objects = doomed.len(), "pack: removing unreachable objects");
    for chunk in doomed.chunks(1000) {
        let chunk = chunk.to_vec();
        conn.batch_execute("BEGIN").await.map_err(storage_error)?;
        // Only states not written since the pack began (a commit may have revived one).
        exec(
            conn,
            "DELETE FROM object_state WHERE zoid = ANY($1::bigint[]) AND tid <= $2",
            &[&chunk, &pack_tid],
        )
        .await?;
        conn.batch_execute("COMMIT").await.map_err(storage_error)?;
    }
    conn.batch_execute(
        "BEGIN;
         DELETE FROM object_refs_added
           WHERE zoid IN (SELECT zoid FROM pack_object WHERE NOT keep);
         DELETE FROM object_ref WHERE zoid IN (SELECT zoid FROM pack_object WHERE NOT keep);
         TRUNCATE pack_object;
         COMMIT;",
    )
    .await
    .map_err(storage_error)?;
    tracing::info!("pack: finished");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reachability_follows_references_transitively() {
        let refs: HashMap<i64, Vec<i64>> =
            [(0, vec![1, 2]), (2, vec![3]), (3, vec![0]), (5, vec![6])]
                .into_iter()
                .collect();
        let got = reachable(&refs, vec![0]);
        assert_eq!(got, [0, 1, 2, 3].into_iter().collect());
    }
}
