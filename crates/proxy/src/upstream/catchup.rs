//! Catching up with upstream over a fresh connection: from its invalidation queue, from a
//! zeors upstream's change list, or by walking its transaction log; as a last resort,
//! dropping every current cache entry and telling downstream clients to do the same.

use super::link::Gate;
use super::Inner;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{error, info, warn};
use zeo_client::{ClientError, Connection};
use zeo_proto::reply::Invalidations;
use zeo_proto::Request;
use zodb::progress::Unit;
use zodb::{DataRecord, Oid, Tid, TransactionInfo};

impl Inner {
    /// Brings the cache up to date with upstream over a fresh connection.
    pub(super) async fn catch_up(
        self: &Arc<Self>,
        conn: &Connection,
        gate: &Arc<Mutex<Gate>>,
    ) -> Result<(), ClientError> {
        // Asked at connect already when compression was negotiated.
        let info = match &conn.info_at_connect {
            Some(info) => info.clone(),
            None => conn.get_info().await?,
        };
        self.update_info(&info);
        let upstream_tid = conn.registered_tid;
        let ours = self.last_tid();
        if ours > upstream_tid {
            error!(cache = %ours, upstream = %upstream_tid,
                   "upstream is behind the proxy cache (restored from an older backup?); refusing it");
            return Err(ClientError::Disconnected);
        }
        if ours == Tid::ZERO {
            // Nothing cached: just adopt upstream's position.
            self.apply(upstream_tid, &[], None, true);
        } else if ours < upstream_tid {
            self.replay_since(conn, ours, upstream_tid).await?;
        }
        // Now apply what arrived meanwhile, and let callbacks through directly.
        let mut g = gate.lock();
        for (tid, oids) in std::mem::take(&mut g.held) {
            self.apply(tid, &oids, None, false);
        }
        g.open = true;
        Ok(())
    }

    /// Applies every upstream transaction after `since`.
    async fn replay_since(
        self: &Arc<Self>,
        conn: &Connection,
        since: Tid,
        upstream_tid: Tid,
    ) -> Result<(), ClientError> {
        if let Some((tid, oids)) = conn.get_invalidations(since).await? {
            info!(since = %since, to = %tid, oids = oids.len(), "caught up from upstream's invalidation queue");
            self.apply(tid, &oids, None, true);
            return Ok(());
        }
        let lists_changes = self.link.lists_changes.load(Ordering::Relaxed);
        if lists_changes {
            let changed: Invalidations =
                conn.request(&Request::ChangedSince { tid: since }).await?;
            if let Some((tid, oids)) = changed.0 {
                info!(since = %since, to = %tid, oids = oids.len(), "caught up with upstream's change list");
                self.apply(tid, &oids, None, true);
                return Ok(());
            }
        }
        let walked = if lists_changes {
            // A zeors upstream runs iterator calls concurrently, so walk it one call at
            // a time (only reached when its change list is not enough).
            self.replay_by_iteration(conn, since).await
        } else {
            match self.replay_by_iteration_pipelined(conn, since).await {
                Err(ClientError::Remote(e)) => {
                    warn!(error = ?e, "pipelined walk of upstream's log refused; walking it call by call");
                    self.replay_by_iteration(conn, self.last_tid()).await
                }
                other => other,
            }
        };
        match walked {
            Ok(n) => {
                info!(since = %since, transactions = n, "caught up by walking upstream's transaction log");
                if self.last_tid() < upstream_tid {
                    self.apply(upstream_tid, &[], None, true);
                }
                Ok(())
            }
            Err(ClientError::Remote(e)) => {
                warn!(error = ?e, "upstream cannot list what changed; dropping every current cache entry");
                let _guard = self.apply_lock.lock();
                self.cache.drop_current(upstream_tid);
                if let Some(sink) = self.sink.get() {
                    // Downstream clients cannot be told which objects changed either:
                    // they must reconnect and drop their caches.
                    sink.reset(upstream_tid);
                }
                self.last_tid.store(upstream_tid.0, Ordering::Release);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Walks upstream's transactions after `since` with the iterator calls and applies
    /// each. Only oids are kept; the records' data is dropped (upstream sends it anyway).
    async fn replay_by_iteration(
        self: &Arc<Self>,
        conn: &Connection,
        since: Tid,
    ) -> Result<usize, ClientError> {
        let iid: i64 = conn
            .request(&Request::IteratorStart {
                start: Some(Tid(since.0 + 1)),
                stop: None,
            })
            .await?;
        let mut count = 0;
        let progress = &*self.config.progress;
        progress.start("catching up with upstream", Unit::Transactions, 0);
        while let Some(txn) = conn
            .request::<Option<TransactionInfo>>(&Request::IteratorNext { iid })
            .await?
        {
            let riid: i64 = conn
                .request(&Request::IteratorRecordStart {
                    txn_iid: iid,
                    tid: txn.tid,
                })
                .await?;
            let mut oids = Vec::new();
            while let Some(rec) = conn
                .request::<Option<DataRecord>>(&Request::IteratorRecordNext { riid })
                .await?
            {
                oids.push(rec.oid);
            }
            self.apply(txn.tid, &oids, None, false);
            count += 1;
            progress.update(count as u64);
        }
        progress.finish();
        let _ = conn.send(&Request::IteratorGc { iids: vec![iid] });
        Ok(count)
    }

    /// Walks upstream's transactions after `since` with the iterator calls of a stock
    /// server, pipelined so that a long gap costs a few round trips per hundred
    /// transactions instead of several per transaction (over a 20 ms link, 1,000
    /// transactions one call at a time take a minute). The stock server handles a
    /// connection's requests in order, which the pipelining relies on:
    ///
    /// 1. list the tids with a window of `iterator_next` calls on one iterator;
    /// 2. per batch of transactions, open one iterator bounded to each (`start = stop =
    ///    tid`), position it and open its record iterator in one burst, then drain the
    ///    record iterators with bursts of `iterator_record_next`.
    ///
    /// The records' data comes along anyway; each object's latest revision is kept in
    /// the cache as current, so the objects that changed do not have to be fetched again.
    async fn replay_by_iteration_pipelined(
        self: &Arc<Self>,
        conn: &Connection,
        since: Tid,
    ) -> Result<usize, ClientError> {
        use futures::future::join_all;
        const WINDOW: usize = 100;
        let iid: i64 = conn
            .request(&Request::IteratorStart {
                start: Some(Tid(since.0 + 1)),
                stop: None,
            })
            .await?;
        let next_txn =
            |iid| conn.request::<Option<TransactionInfo>>(&Request::IteratorNext { iid });
        let mut tids = Vec::new();
        'list: loop {
            let replies = join_all((0..WINDOW).map(|_| next_txn(iid))).await;
            for r in replies {
                match r {
                    Ok(Some(t)) => tids.push(t.tid),
                    Ok(None) => break 'list,
                    // Calls after the end find the iterator gone.
                    Err(ClientError::Remote(_)) => break 'list,
                    Err(e) => return Err(e),
                }
            }
        }
        let epoch = self.packs.epoch();
        let mut latest: HashMap<Oid, (Tid, Bytes)> = HashMap::new();
        let progress = &*self.config.progress;
        progress.start(
            "catching up with upstream",
            Unit::Transactions,
            tids.len() as u64,
        );
        for (n, chunk) in tids.chunks(WINDOW).enumerate() {
            let iids: Vec<i64> = join_all(chunk.iter().map(|t| {
                conn.request::<i64>(&Request::IteratorStart {
                    start: Some(*t),
                    stop: Some(*t),
                })
            }))
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
            let mut positioned = Vec::with_capacity(chunk.len());
            let mut starts = Vec::with_capacity(chunk.len());
            for (t, iid) in chunk.iter().zip(&iids) {
                positioned.push(next_txn(*iid));
                starts.push(conn.request::<i64>(&Request::IteratorRecordStart {
                    txn_iid: *iid,
                    tid: *t,
                }));
            }
            let (_, starts) = futures::join!(join_all(positioned), join_all(starts));
            let mut riids: Vec<Option<i64>> = Vec::with_capacity(chunk.len());
            for r in starts {
                match r {
                    Ok(riid) => riids.push(Some(riid)),
                    Err(ClientError::Remote(e)) => return Err(ClientError::Remote(e)),
                    Err(_) => return Err(ClientError::Disconnected),
                }
            }
            let mut oids: Vec<Vec<Oid>> = vec![Vec::new(); chunk.len()];
            // Most transactions touch a few objects: ask for a few records first and
            // more for the transactions that have more, since every call past a record
            // iterator's end costs an error reply.
            let mut burst = 2;
            loop {
                let open: Vec<(usize, i64)> = riids
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.map(|r| (i, r)))
                    .collect();
                if open.is_empty() {
                    break;
                }
                let calls = open.iter().flat_map(|(_, riid)| {
                    (0..burst).map(move |_| {
                        conn.request::<Option<DataRecord>>(&Request::IteratorRecordNext {
                            riid: *riid,
                        })
                    })
                });
                let replies = join_all(calls).await;
                let per = burst;
                burst = (burst * 4).min(256);
                for ((i, _), batch) in open.iter().zip(replies.chunks(per)) {
                    for r in batch {
                        let rec = match r {
                            Ok(Some(rec)) => rec,
                            Ok(None) | Err(ClientError::Remote(_)) => {
                                riids[*i] = None;
                                break;
                            }
                            Err(_) => return Err(ClientError::Disconnected),
                        };
                        oids[*i].push(rec.oid);
                        match &rec.data {
                            Some(data) => {
                                latest.insert(rec.oid, (chunk[*i], data.clone()));
                            }
                            None => {
                                latest.remove(&rec.oid);
                            }
                        }
                    }
                }
            }
            for (t, o) in chunk.iter().zip(&oids) {
                self.apply(*t, o, None, false);
            }
            progress.update((n * WINDOW + chunk.len()) as u64);
            let _ = conn.send(&Request::IteratorGc { iids });
        }
        progress.finish();
        let _ = conn.send(&Request::IteratorGc { iids: vec![iid] });
        let seen = self.last_tid();
        let bytes = latest.values().map(|(_, d)| d.len()).sum();
        self.stores.submit(bytes, move |cache| {
            if !epoch.still_valid() {
                return; // a pack completed meanwhile (see `pack`)
            }
            for (oid, (start, data)) in latest {
                cache.store(oid, start, None, data, seen);
            }
        });
        Ok(tids.len())
    }
}
