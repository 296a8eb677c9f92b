//! Learning of commits and announcing them, in tid order, to the server's invalidation
//! sink.
//!
//! Invariants:
//! - [`catch_up`] is the only place that feeds the sink and advances the cache's
//!   `visible` tid, and it runs under one async mutex: announcements are in tid order,
//!   each transaction once, whoever made it (this server, another zeors server, a
//!   RelStorage client, `zodbconvert`).
//! - It reads what is committed in the database (`transaction` rows, or the distinct tids
//!   of `object_state` in a history-free database) after the last announced tid. Commits
//!   take RelStorage's commit lock (advisory lock -1) and pick a tid above every
//!   committed one while holding it, and PostgreSQL releases that lock only after the
//!   commit is visible, so when a tid is visible every smaller one is too: nothing is
//!   skipped.
//! - The watcher task runs `catch_up` when a zeors server NOTIFYs `zeors_commit` (sent in
//!   the committing transaction, delivered at its commit) and every `poll_interval`
//!   otherwise, which is how commits by RelStorage clients are seen. It reconnects on
//!   its own after the database restarts.
//! - A history-free database keeps only the latest tid of each object: a transaction
//!   whose every object was changed again later is never seen, and its objects are
//!   announced with the later one (what RelStorage's poller does too). The exception is
//!   a commit of this server: its committer is told its tid by the `tpc_finish` reply,
//!   and a ZEO client refuses a tid lower than one it was already sent, so that commit
//!   is always announced, at its tid and before anything later, by its finisher (which
//!   knows its oids); the watcher stops below it until then.

use crate::db::{self, storage_error};
use crate::schema::Layout;
use crate::storage::Inner;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{AsyncMessage, NoTls};
use zodb::{Oid, Result, Tid, TxnKey};

/// The channel zeors servers NOTIFY after each commit.
pub const CHANNEL: &str = "zeors_commit";

/// How often the object count and database size `info()` reports are refreshed.
const SIZES_EVERY: Duration = Duration::from_secs(30);

/// Transactions read per round.
const BATCH: i64 = 1000;

/// A local commit being announced by its finisher.
#[derive(Clone, Copy)]
pub(crate) struct Mine<'a> {
    pub tid: Tid,
    pub key: TxnKey,
    /// Every oid it changed: in a history-free database a later transaction may have
    /// replaced all of its rows already.
    pub oids: &'a [Oid],
}

/// Announces every transaction committed after the last announced one. `mine` is the
/// local commit being finished, if any: it is announced at its tid even when a later
/// transaction has already replaced all its rows (its committer learns that tid from its
/// `tpc_finish` reply and must not have been sent a later one first), and its committer
/// is named so that it is not sent its own invalidation. Without `mine` (the watcher, a
/// load), announcing stops below a local commit that is being finished: that one and
/// everything after it are its finisher's to announce.
pub(crate) async fn catch_up(inner: &Inner, mine: Option<Mine<'_>>) -> Result<()> {
    let _turn = inner.announcing.lock().await;
    let conn = inner.pool.get().await.map_err(db::pool_error)?;
    loop {
        let from = inner.cache.visible();
        if mine.is_some_and(|m| m.tid <= from) {
            return Ok(());
        }
        let tids_sql = match inner.layout {
            Layout::HistoryPreserving => {
                "SELECT tid FROM \"transaction\" WHERE tid > $1 ORDER BY tid LIMIT $2"
            }
            Layout::HistoryFree => {
                "SELECT DISTINCT tid FROM object_state WHERE tid > $1 ORDER BY tid LIMIT $2"
            }
        };
        let stmt = conn.prepare_cached(tids_sql).await.map_err(storage_error)?;
        let found: Vec<i64> = conn
            .query(&stmt, &[&(from.0 as i64), &BATCH])
            .await
            .map_err(storage_error)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let complete = (found.len() as i64) < BATCH;
        // Read after the query: a tid found beyond a local commit means that commit's
        // COMMIT has completed, and it was marked before its COMMIT.
        let finishing = match mine {
            Some(_) => None,
            None => inner
                .committing
                .lock()
                .map(|(t, _)| t)
                .filter(|t| *t > from),
        };
        let mut tids: Vec<Tid> = found.iter().map(|t| Tid(*t as u64)).collect();
        if let Some(m) = mine {
            let within = complete || tids.last().is_some_and(|last| m.tid <= *last);
            if within && !tids.contains(&m.tid) {
                tids.push(m.tid);
                tids.sort_unstable();
            }
        }
        if let Some(stop) = finishing {
            tids.retain(|t| *t < stop);
        }
        let stopped = tids.len() < found.len();
        let Some(&upto) = tids.last() else {
            return Ok(());
        };
        let stmt = conn
            .prepare_cached(
                "SELECT tid, zoid FROM object_state WHERE tid > $1 AND tid <= $2 ORDER BY tid, zoid",
            )
            .await
            .map_err(storage_error)?;
        let mut changed: BTreeMap<Tid, Vec<Oid>> = BTreeMap::new();
        for r in conn
            .query(&stmt, &[&(from.0 as i64), &(upto.0 as i64)])
            .await
            .map_err(storage_error)?
        {
            changed
                .entry(Tid(r.get::<_, i64>(0) as u64))
                .or_default()
                .push(Oid(r.get::<_, i64>(1) as u64));
        }
        if let Some(m) = mine.filter(|m| m.tid <= upto) {
            let oids = changed.entry(m.tid).or_default();
            oids.extend_from_slice(m.oids);
            oids.sort_unstable();
            oids.dedup();
        }
        let sink = inner.sink.get();
        for tid in &tids {
            let oids = changed.remove(tid).unwrap_or_default();
            let committer = mine.filter(|m| m.tid == *tid).map(|m| m.key);
            if let Some(sink) = sink {
                sink.invalidate(*tid, &oids, committer);
            }
            inner.cache.announce(*tid, &oids);
        }
        if complete || stopped {
            return Ok(());
        }
    }
}

/// What the watcher starts from: its LISTEN connection, made before the storage is
/// open, so that every commit a zeors server makes after `open` wakes it.
pub(crate) struct Listening {
    client: Option<tokio_postgres::Client>,
    notified: Arc<tokio::sync::Notify>,
}

/// LISTENs on [`CHANNEL`] (if the database lets it; the watcher retries otherwise).
pub(crate) async fn start(cfg: &tokio_postgres::Config) -> Listening {
    let notified = Arc::new(tokio::sync::Notify::new());
    Listening {
        client: listen(cfg, notified.clone()).await,
        notified,
    }
}

/// The watcher: LISTENs for other zeors servers' commits and polls for everyone else's,
/// until the storage closes. Its first round catches up at once (commits made between
/// the storage's reading of its last tid and the LISTEN).
pub(crate) async fn run(inner: Arc<Inner>, cfg: tokio_postgres::Config, start: Listening) {
    let Listening {
        client: mut listener,
        notified,
    } = start;
    let mut last_warning: Option<Instant> = None;
    let mut sizes_refreshed = Instant::now();
    let mut first = true;
    loop {
        if inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if listener.as_ref().is_none_or(|c| c.is_closed()) {
            listener = listen(&cfg, notified.clone()).await;
        }
        if !std::mem::take(&mut first) {
            tokio::select! {
                _ = tokio::time::sleep(inner.opts.poll_interval) => {}
                _ = notified.notified() => {}
                _ = inner.wake.notified() => {}
            }
        }
        if inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if sizes_refreshed.elapsed() > SIZES_EVERY {
            crate::storage::refresh_sizes(&inner).await;
            sizes_refreshed = Instant::now();
        }
        match catch_up(&inner, None).await {
            Ok(()) => {
                if last_warning.take().is_some() {
                    tracing::info!("PostgreSQL reachable again; commits are being followed");
                }
            }
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::warn!(error = %e, "cannot read new commits from PostgreSQL; retrying");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A connection LISTENing on [`CHANNEL`]; notifications wake `notified`.
async fn listen(
    cfg: &tokio_postgres::Config,
    notified: Arc<tokio::sync::Notify>,
) -> Option<tokio_postgres::Client> {
    let (client, mut connection) = match cfg.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "LISTEN connection failed");
            return None;
        }
    };
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => notified.notify_one(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // The connection is gone: wake the watcher so it reconnects and polls.
        notified.notify_one();
    });
    match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
        Ok(()) => Some(client),
        Err(e) => {
            tracing::debug!(error = %e, "LISTEN failed");
            None
        }
    }
}
