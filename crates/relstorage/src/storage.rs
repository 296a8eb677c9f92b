//! [`PgStorage`]: the [`zodb::Storage`] the server drives, over a RelStorage database.
//!
//! Invariants:
//! - Loads read through the pool, one statement each (never inside a transaction), and
//!   never see a transaction before it has been announced to the sink: the requested
//!   `before` is capped at the cache's `visible + 1`. A ZEO client only knows announced
//!   transactions, so this is exactly the snapshot it asked for; the reply's `snapshot`
//!   is that `visible`. Loads never take a lock and never wait for a commit.
//! - History-free databases answer `loadBefore` as RelStorage does: the one state if it
//!   is older than `before`, `None` if it is newer (the client then raises
//!   ReadConflictError). A state newer than `visible` (committed elsewhere, not yet
//!   announced) is waited for by catching up first.
//! - New oids come from RelStorage's `zoid_seq`, 16 per sequence value, as RelStorage
//!   allocates them, so every writer of the database draws from one source.

use crate::cache::{Cache, Lookup};
use crate::commit::{self, Pending};
use crate::db::{self, storage_error, OpenError};
use crate::options::Options;
use crate::schema::{self, Layout};
use crate::watch;
use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Object, Pool};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use zodb::{
    HistoryEntry, InvalidationSink, LoadBefore, Loaded, Oid, Result, StorageError, StorageInfo,
    StorageMetric, Tid, Transaction, TxnKey, Vote,
};

/// Beyond this many changed oids, `invalidations_since` tells the client to drop its
/// cache instead (as the stock server does past its queue).
const MAX_INVALIDATIONS: i64 = 100_000;

pub(crate) struct Inner {
    pub opts: Options,
    pub layout: Layout,
    pub pool: Pool,
    pub cache: Cache,
    pub sink: OnceLock<Arc<dyn InvalidationSink>>,
    /// Serialises announcements (see `watch`).
    pub announcing: tokio::sync::Mutex<()>,
    pub pending: tokio::sync::Mutex<Option<Pending>>,
    /// The local commit being finished (tid, key), set just before its COMMIT and
    /// cleared once its finisher has announced it: until then nobody else announces it
    /// or anything after it (see `watch::catch_up`).
    pub committing: parking_lot::Mutex<Option<(Tid, TxnKey)>>,
    pub oids: tokio::sync::Mutex<OidPool>,
    pub closed: AtomicBool,
    /// Wakes the watcher (after a pack, at close).
    pub wake: tokio::sync::Notify,
    pub objects: AtomicU64,
    pub db_size: AtomicU64,
    pub loads: AtomicU64,
    pub db_loads: AtomicU64,
}

/// Oids drawn from `zoid_seq` and not handed out yet.
#[derive(Default)]
pub(crate) struct OidPool {
    /// Descending, so `pop` gives the smallest.
    free: Vec<u64>,
    /// The largest oid this server has drawn or seen written.
    max: u64,
}

impl Inner {
    /// Makes sure the sequence will never hand out `oid` or below (RelStorage's
    /// `set_min_oid`: the sequence counts blocks of 16).
    pub(crate) async fn oids_seen(&self, conn: &Object, oid: Oid) -> Result<()> {
        let mut pool = self.oids.lock().await;
        if oid.0 <= pool.max {
            return Ok(());
        }
        let block = oid.0.div_ceil(16) as i64;
        let stmt = conn
            .prepare_cached(
                "SELECT CASE WHEN $1 > nextval('zoid_seq') THEN setval('zoid_seq', $1) ELSE 0 END",
            )
            .await
            .map_err(storage_error)?;
        conn.query_one(&stmt, &[&block])
            .await
            .map_err(storage_error)?;
        pool.max = oid.0;
        pool.free.retain(|o| *o > oid.0);
        Ok(())
    }

    /// A pooled connection for one statement; retried once on a fresh connection when
    /// the first one turns out dead (the database restarted).
    async fn with_conn<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'a> Fn(
            &'a Object,
        ) -> futures::future::BoxFuture<'a, Result<T, tokio_postgres::Error>>,
    {
        let mut attempt = 0;
        loop {
            let conn = self.pool.get().await.map_err(db::pool_error)?;
            match f(&conn).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && db::is_connection_error(&e) => {
                    drop(Object::take(conn));
                    attempt += 1;
                }
                Err(e) => return Err(storage_error(e)),
            }
        }
    }
}

/// A cache miss on a history-preserving database: the newest revision of `$1` before
/// tid `$2`, with the tid that replaced it (NULL while current). Public so that the
/// benchmark's PostgreSQL floor (`zeo-bench pgfloor`) times exactly this statement.
pub const LOAD_BEFORE_SQL: &str = "SELECT o.tid, o.state,
        (SELECT min(n.tid) FROM object_state n WHERE n.zoid = o.zoid AND n.tid > o.tid)
    FROM object_state o
    WHERE o.zoid = $1 AND o.tid < $2
    ORDER BY o.tid DESC LIMIT 1";

/// A ZODB storage in a RelStorage database on PostgreSQL.
pub struct PgStorage {
    inner: Arc<Inner>,
    watcher: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl PgStorage {
    /// Connects, checks (or creates) the schema and starts following commits.
    pub async fn open(opts: Options) -> std::result::Result<PgStorage, OpenError> {
        let cfg = db::config(&opts)?;
        let target = db::target(&cfg);
        let (mut client, connection) =
            cfg.connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| OpenError::Unreachable {
                    target: target.clone(),
                    message: db::describe(&e),
                })?;
        let driver = tokio::spawn(connection);
        // A read-only server never changes the database, not even to add the schema.
        let create = opts.create_schema && !opts.read_only;
        let created = schema::prepare(&mut client, opts.layout, create).await?;
        if created {
            tracing::info!(%target, layout = ?opts.layout, "created the RelStorage schema");
        }
        let last = last_tid(&client, opts.layout).await?;
        drop(client);
        let _ = driver.await;
        if let Some(dir) = &opts.blob_dir {
            std::fs::create_dir_all(dir.join("tmp")).map_err(OpenError::BlobDir)?;
            std::fs::create_dir_all(dir.join("cache")).map_err(OpenError::BlobDir)?;
        }
        let inner = Arc::new(Inner {
            layout: opts.layout,
            pool: db::pool(cfg.clone(), opts.pool_size),
            cache: Cache::new(opts.cache_bytes, last),
            sink: OnceLock::new(),
            announcing: tokio::sync::Mutex::new(()),
            pending: tokio::sync::Mutex::new(None),
            committing: parking_lot::Mutex::new(None),
            oids: tokio::sync::Mutex::new(OidPool::default()),
            closed: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            objects: AtomicU64::new(0),
            db_size: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            db_loads: AtomicU64::new(0),
            opts,
        });
        refresh_sizes(&inner).await;
        let listening = watch::start(&cfg).await;
        let watcher = tokio::spawn(watch::run(inner.clone(), cfg, listening));
        tracing::info!(%target, last_tid = %last, layout = ?inner.layout, "PostgreSQL storage open");
        Ok(PgStorage {
            inner,
            watcher: parking_lot::Mutex::new(Some(watcher)),
        })
    }

    pub fn layout(&self) -> Layout {
        self.inner.layout
    }

    /// Announces every commit made so far (tests and tools).
    pub async fn sync(&self) -> Result<()> {
        watch::catch_up(&self.inner, None).await
    }
}

async fn last_tid(client: &tokio_postgres::Client, layout: Layout) -> Result<Tid, OpenError> {
    let sql = match layout {
        Layout::HistoryPreserving => "SELECT COALESCE(MAX(tid), 0) FROM \"transaction\"",
        Layout::HistoryFree => "SELECT COALESCE(MAX(tid), 0) FROM object_state",
    };
    Ok(Tid(
        client.query_one(sql, &[]).await?.get::<_, i64>(0) as u64
    ))
}

/// Refreshes the object count and database size `info()` reports.
pub(crate) async fn refresh_sizes(inner: &Inner) {
    let table = inner.layout.current_table();
    let sql =
        format!("SELECT (SELECT count(*) FROM {table}), pg_database_size(current_database())");
    let r = inner
        .with_conn(|c| {
            let sql = sql.clone();
            Box::pin(async move { c.query_one(&sql, &[]).await })
        })
        .await;
    if let Ok(row) = r {
        inner
            .objects
            .store(row.get::<_, i64>(0) as u64, Ordering::Relaxed);
        inner
            .db_size
            .store(row.get::<_, i64>(1) as u64, Ordering::Relaxed);
    }
}

fn oid_param(oid: Oid) -> i64 {
    oid.0 as i64
}

#[async_trait]
impl zodb::Storage for PgStorage {
    fn info(&self) -> StorageInfo {
        let inner = &self.inner;
        let blobs = inner.opts.blob_dir.is_some();
        let hp = inner.layout.keeps_history();
        let mut interfaces = Vec::new();
        if blobs {
            interfaces.push(("ZODB.interfaces", "IBlobStorage"));
        }
        interfaces.extend([
            ("ZODB.interfaces", "IStorageIteration"),
            ("ZODB.interfaces", "IStorageCurrentRecordIteration"),
            ("ZODB.interfaces", "IExternalGC"),
            ("ZODB.interfaces", "IStorageRestoreable"),
            ("ZODB.interfaces", "IStorage"),
        ]);
        if hp {
            interfaces.push(("ZODB.interfaces", "IStorageUndoable"));
        }
        StorageInfo {
            length: inner.objects.load(Ordering::Relaxed),
            size: inner.db_size.load(Ordering::Relaxed),
            name: if inner.opts.name.is_empty() {
                "RelStorage on PostgreSQL".into()
            } else {
                inner.opts.name.clone()
            },
            supports_undo: hp,
            supports_record_iternext: true,
            interfaces: interfaces
                .into_iter()
                .map(|(m, n)| (m.to_string(), n.to_string()))
                .collect(),
        }
    }

    fn is_read_only(&self) -> bool {
        self.inner.opts.read_only
    }

    fn last_transaction(&self) -> Tid {
        self.inner.cache.visible()
    }

    fn attach(&self, sink: Arc<dyn InvalidationSink>) {
        let _ = self.inner.sink.set(sink);
    }

    async fn load_before(&self, oid: Oid, before: Tid) -> Result<LoadBefore> {
        let inner = &self.inner;
        inner.loads.fetch_add(1, Ordering::Relaxed);
        let mut caught_up = false;
        loop {
            let (found, seen) = inner.cache.lookup(oid, before);
            let visible = seen.visible;
            if let Lookup::Hit { tid, data } = found {
                return Ok(LoadBefore {
                    revision: Some(Loaded {
                        data,
                        start: tid,
                        end: None,
                    }),
                    snapshot: visible,
                });
            }
            inner.db_loads.fetch_add(1, Ordering::Relaxed);
            let capped = Tid(before.0.min(visible.0.saturating_add(1)));
            match inner.layout {
                Layout::HistoryPreserving => {
                    let row = inner
                        .with_conn(|c| {
                            Box::pin(async move {
                                let stmt = c.prepare_cached(LOAD_BEFORE_SQL).await?;
                                c.query_opt(&stmt, &[&oid_param(oid), &(capped.0 as i64)])
                                    .await
                            })
                        })
                        .await?;
                    let Some(row) = row else {
                        // No revision before: created later, or no such object.
                        let exists = inner
                            .with_conn(|c| {
                                Box::pin(async move {
                                    let stmt = c
                                        .prepare_cached(
                                            "SELECT 1 FROM object_state WHERE zoid = $1 LIMIT 1",
                                        )
                                        .await?;
                                    c.query_opt(&stmt, &[&oid_param(oid)]).await
                                })
                            })
                            .await?;
                        if exists.is_none() {
                            return Err(StorageError::PosKey(oid));
                        }
                        return Ok(LoadBefore {
                            revision: None,
                            snapshot: visible,
                        });
                    };
                    let start = Tid(row.get::<_, i64>(0) as u64);
                    let Some(data) = row.get::<_, Option<Vec<u8>>>(1) else {
                        return Err(StorageError::PosKey(oid));
                    };
                    let data = Bytes::from(data);
                    let end = row.get::<_, Option<i64>>(2).map(|t| Tid(t as u64));
                    if end.is_none() {
                        inner.cache.insert(oid, start, data.clone(), seen);
                    }
                    return Ok(LoadBefore {
                        revision: Some(Loaded { data, start, end }),
                        snapshot: visible,
                    });
                }
                Layout::HistoryFree => {
                    let row = inner
                        .with_conn(|c| {
                            Box::pin(async move {
                                let stmt = c
                                    .prepare_cached(
                                        "SELECT tid, state FROM object_state WHERE zoid = $1",
                                    )
                                    .await?;
                                c.query_opt(&stmt, &[&oid_param(oid)]).await
                            })
                        })
                        .await?;
                    let Some(row) = row else {
                        return Err(StorageError::PosKey(oid));
                    };
                    let start = Tid(row.get::<_, i64>(0) as u64);
                    let Some(data) = row.get::<_, Option<Vec<u8>>>(1) else {
                        return Err(StorageError::PosKey(oid));
                    };
                    if start > visible && !caught_up {
                        // Committed elsewhere and not announced yet: announce, then look
                        // again (the client may be entitled to it).
                        watch::catch_up(inner, None).await?;
                        caught_up = true;
                        continue;
                    }
                    if start >= capped {
                        // Replaced since: a recently replaced state may still be in
                        // memory; otherwise RelStorage's answer, none.
                        let revision =
                            inner
                                .cache
                                .previous_before(oid, capped)
                                .map(|(start, end, data)| Loaded {
                                    data,
                                    start,
                                    end: Some(end),
                                });
                        return Ok(LoadBefore {
                            revision,
                            snapshot: visible,
                        });
                    }
                    let data = Bytes::from(data);
                    inner.cache.insert(oid, start, data.clone(), seen);
                    return Ok(LoadBefore {
                        revision: Some(Loaded {
                            data,
                            start,
                            end: None,
                        }),
                        snapshot: visible,
                    });
                }
            }
        }
    }

    async fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Bytes> {
        if let Some(d) = self.inner.cache.serial(oid, serial) {
            return Ok(d);
        }
        let row = self
            .inner
            .with_conn(|c| {
                Box::pin(async move {
                    let stmt = c
                        .prepare_cached(
                            "SELECT state FROM object_state WHERE zoid = $1 AND tid = $2",
                        )
                        .await?;
                    c.query_opt(&stmt, &[&oid_param(oid), &(serial.0 as i64)])
                        .await
                })
            })
            .await?;
        match row.and_then(|r| r.get::<_, Option<Vec<u8>>>(0)) {
            Some(d) => Ok(Bytes::from(d)),
            None => Err(StorageError::PosKey(oid)),
        }
    }

    async fn history(&self, oid: Oid, size: usize) -> Result<Vec<HistoryEntry>> {
        let inner = &self.inner;
        let visible = inner.cache.visible().0 as i64;
        let limit = size.max(1) as i64;
        let hp = inner.layout.keeps_history();
        let rows = inner
            .with_conn(|c| {
                Box::pin(async move {
                    let sql = if hp {
                        "SELECT o.tid, t.username, t.description, t.extension, o.state_size
                         FROM object_state o JOIN \"transaction\" t ON t.tid = o.tid
                         WHERE o.zoid = $1 AND o.tid <= $2
                         ORDER BY o.tid DESC LIMIT $3"
                    } else {
                        "SELECT tid, ''::bytea, ''::bytea, ''::bytea, state_size
                         FROM object_state WHERE zoid = $1 AND tid <= $2 LIMIT $3"
                    };
                    let stmt = c.prepare_cached(sql).await?;
                    c.query(&stmt, &[&oid_param(oid), &visible, &limit]).await
                })
            })
            .await?;
        if rows.is_empty() {
            return Err(StorageError::PosKey(oid));
        }
        Ok(rows
            .iter()
            .map(|r| HistoryEntry {
                tid: Tid(r.get::<_, i64>(0) as u64),
                user: r.get(1),
                description: r.get(2),
                extension: r.get::<_, Option<Vec<u8>>>(3).unwrap_or_default(),
                size: r.get::<_, i64>(4) as u64,
            })
            .collect())
    }

    async fn new_oids(&self, count: usize) -> Result<Vec<Oid>> {
        let inner = &self.inner;
        if inner.opts.read_only {
            return Err(StorageError::ReadOnly);
        }
        let mut pool = inner.oids.lock().await;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if let Some(o) = pool.free.pop() {
                out.push(Oid(o));
                continue;
            }
            let n: i64 = inner
                .with_conn(|c| {
                    Box::pin(async move {
                        let stmt = c.prepare_cached("SELECT nextval('zoid_seq')").await?;
                        Ok(c.query_one(&stmt, &[]).await?.get(0))
                    })
                })
                .await?;
            let top = n as u64 * 16;
            pool.free = (top - 15..=top).rev().filter(|o| *o > pool.max).collect();
            pool.max = pool.max.max(top);
        }
        Ok(out)
    }

    async fn vote(&self, txn: &Transaction) -> Result<Vote> {
        commit::vote(&self.inner, txn).await
    }

    async fn finish(&self, key: TxnKey) -> Result<Tid> {
        let commit::Finished { tid, oids, written } = commit::finish(&self.inner, key).await?;
        // Announce it (and anything committed before it) before loads can see it. The
        // commit is durable already: if this fails, the watcher announces it later.
        let mine = watch::Mine {
            tid,
            key,
            oids: &oids,
        };
        let announced = watch::catch_up(&self.inner, Some(mine)).await;
        *self.inner.committing.lock() = None;
        match announced {
            Ok(()) => {
                // What it wrote is the current state of those objects (unless a later
                // transaction, already announced, changed them: the cache checks).
                let seen = self.inner.cache.seen_at(tid);
                for (oid, data) in written {
                    self.inner.cache.insert(oid, tid, data, seen);
                }
            }
            Err(e) => {
                tracing::warn!(%tid, error = %e, "committed, but could not announce yet");
                self.inner.wake.notify_one();
            }
        }
        Ok(tid)
    }

    async fn abort(&self, key: TxnKey) {
        commit::abort(&self.inner, key).await
    }

    async fn recent_transactions(&self, count: usize) -> Result<Vec<(Tid, Vec<Oid>)>> {
        let inner = &self.inner;
        let visible = inner.cache.visible().0 as i64;
        let limit = count as i64;
        let hp = inner.layout.keeps_history();
        let rows = inner
            .with_conn(|c| {
                Box::pin(async move {
                    let sql = if hp {
                        "WITH t AS (SELECT tid FROM \"transaction\" WHERE tid > 0 AND tid <= $1
                                    ORDER BY tid DESC LIMIT $2)
                         SELECT t.tid, o.zoid FROM t LEFT JOIN object_state o ON o.tid = t.tid
                         ORDER BY t.tid, o.zoid"
                    } else {
                        "WITH t AS (SELECT DISTINCT tid FROM object_state WHERE tid <= $1
                                    ORDER BY tid DESC LIMIT $2)
                         SELECT t.tid, o.zoid FROM t JOIN object_state o ON o.tid = t.tid
                         ORDER BY t.tid, o.zoid"
                    };
                    let stmt = c.prepare_cached(sql).await?;
                    c.query(&stmt, &[&visible, &limit]).await
                })
            })
            .await?;
        let mut out: Vec<(Tid, Vec<Oid>)> = Vec::new();
        for r in rows {
            let tid = Tid(r.get::<_, i64>(0) as u64);
            if out.last().is_none_or(|(t, _)| *t != tid) {
                out.push((tid, Vec::new()));
            }
            if let Some(z) = r.get::<_, Option<i64>>(1) {
                out.last_mut().expect("pushed").1.push(Oid(z as u64));
            }
        }
        Ok(out)
    }

    async fn invalidations_since(&self, tid: Tid) -> Result<Option<(Tid, Vec<Oid>)>> {
        let inner = &self.inner;
        let visible = inner.cache.visible();
        if tid >= visible {
            return Ok(Some((visible, Vec::new())));
        }
        let (from, to) = (tid.0 as i64, visible.0 as i64);
        let rows = inner
            .with_conn(|c| {
                Box::pin(async move {
                    let stmt = c
                        .prepare_cached(
                            "SELECT DISTINCT zoid FROM object_state
                             WHERE tid > $1 AND tid <= $2 LIMIT $3",
                        )
                        .await?;
                    c.query(&stmt, &[&from, &to, &(MAX_INVALIDATIONS + 1)])
                        .await
                })
            })
            .await?;
        if rows.len() as i64 > MAX_INVALIDATIONS {
            return Ok(None);
        }
        Ok(Some((
            visible,
            rows.iter()
                .map(|r| Oid(r.get::<_, i64>(0) as u64))
                .collect(),
        )))
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        if let Some(p) = self.inner.pending.lock().await.take() {
            p.conn.release().await;
        }
        let watcher = self.watcher.lock().take();
        if let Some(w) = watcher {
            let _ = w.await;
        }
        self.inner.pool.close();
        Ok(())
    }

    async fn undo_log(
        &self,
        first: i64,
        last: i64,
        filter: Option<zodb::UndoFilter>,
    ) -> Result<Vec<zodb::UndoEntry>> {
        if !self.inner.layout.keeps_history() {
            return Err(StorageError::Unsupported("undo"));
        }
        crate::undo::undo_log(&self.inner, first, last, filter).await
    }

    async fn iterator(
        &self,
        start: Option<Tid>,
        stop: Option<Tid>,
    ) -> Result<Box<dyn zodb::TransactionIterator>> {
        Ok(Box::new(crate::iter::TxnIter::new(
            self.inner.clone(),
            start,
            stop,
        )))
    }

    async fn pack(&self, pack_time: f64) -> Result<()> {
        crate::pack::pack(&self.inner, pack_time).await?;
        refresh_sizes(&self.inner).await;
        Ok(())
    }

    fn blob_temp_dir(&self) -> Option<std::path::PathBuf> {
        self.inner.opts.blob_dir.as_ref().map(|d| d.join("tmp"))
    }

    async fn open_blob(&self, oid: Oid, serial: Tid) -> Result<std::fs::File> {
        crate::blobs::open_blob(&self.inner, oid, serial).await
    }

    async fn record_iternext(&self, next: Option<Oid>) -> Result<zodb::CurrentRecord> {
        crate::iter::record_iternext(&self.inner, next).await
    }

    fn metrics(&self) -> Vec<StorageMetric> {
        let inner = &self.inner;
        let (hits, misses, entries, bytes) = inner.cache.stats();
        let status = inner.pool.status();
        let m = |name, help, counter, value: u64| StorageMetric {
            name,
            help,
            counter,
            value: value as f64,
        };
        vec![
            m(
                "cache_hits",
                "Loads answered from the in-memory object cache.",
                true,
                hits,
            ),
            m("cache_misses", "Loads that read PostgreSQL.", true, misses),
            m(
                "cache_entries",
                "Objects in the in-memory cache.",
                false,
                entries as u64,
            ),
            m(
                "cache_bytes",
                "Bytes in the in-memory cache.",
                false,
                bytes as u64,
            ),
            m(
                "pg_connections",
                "Connections to PostgreSQL held by the pool.",
                false,
                status.size as u64,
            ),
            m(
                "pg_connections_idle",
                "Idle connections in the pool.",
                false,
                status.available as u64,
            ),
        ]
    }
}
