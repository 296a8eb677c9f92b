//! The async shell around [`TxnCore`]: it holds what the core must not (the commit lock's
//! guard, the vote and finish tasks, the deadline timer, the transaction's temporary blob
//! files) and runs the core's actions against the storage and the outbox.
//!
//! `vote` and `tpc_finish` run as tasks of their own, because they must complete or
//! clean up even if the connection drops mid-way; the session loop awaits them
//! ([`TxnShell::next_event`]) and feeds their outcome back to the core.

use super::blobs::TempFiles;
use super::spill::Spill;
use super::txn_core::{Action, Answer, Closing, Event, TxnCore, VoteReport};
use super::{send_error, Close};
use crate::metrics::{HoldPhase, ServerMetrics};
use crate::outbox::Outbox;
use crate::stats::Stats;
use crate::{Shared, StorageHandle};
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, warn};
use zeo_proto::exception::exception_for_protocol;
use zeo_proto::reply::SizeInfo;
use zeo_proto::{message, Callback, Reply, Value};
use zodb::{StorageError, Transaction, TxnKey, TxnOp, Vote};

/// What a vote task hands back.
pub(super) struct VoteDone {
    txn: Transaction,
    report: VoteReport,
    guard: LockHold,
}

/// The commit lock while a transaction holds it, timing the phases of the hold
/// (`zeors_commit_lock_hold_seconds`).
pub(super) struct LockHold {
    _guard: OwnedMutexGuard<()>,
    metrics: Arc<ServerMetrics>,
    /// When the current phase began.
    since: std::time::Instant,
}

impl LockHold {
    fn new(guard: OwnedMutexGuard<()>, metrics: Arc<ServerMetrics>) -> LockHold {
        LockHold {
            _guard: guard,
            metrics,
            since: std::time::Instant::now(),
        }
    }

    /// Ends the current phase, counting its time as `phase`; the next begins now.
    fn phase(&mut self, phase: HoldPhase) {
        let now = std::time::Instant::now();
        self.metrics.commit_lock_hold[phase as usize].observe((now - self.since).as_secs_f64());
        self.since = now;
    }
}

/// What the session loop waits for on behalf of the transaction.
pub(super) enum TxnWait {
    Voted(Box<Result<VoteDone, tokio::task::JoinError>>),
    Finished,
    Timeout,
}

pub(super) struct TxnShell {
    core: TxnCore,
    /// The commit lock, while this connection's transaction holds it between tasks.
    guard: Option<LockHold>,
    vote_task: Option<JoinHandle<VoteDone>>,
    finish_task: Option<JoinHandle<()>>,
    deadline: Option<Instant>,
    /// The blob files the open transaction's operations name, removed when it ends.
    pub blob_files: TempFiles,
    /// Where the open transaction's data waits for its vote once it is large.
    spill: Spill,
    spill_threshold: u64,
    max_size: u64,
}

/// What the shell needs from the session to run actions.
pub(super) struct Ctx<'a> {
    pub session: u64,
    pub handle: &'a Arc<StorageHandle>,
    pub shared: &'a Arc<Shared>,
    pub outbox: &'a Arc<Outbox>,
}

impl TxnShell {
    pub fn new(config: &crate::ServerConfig) -> TxnShell {
        let (threshold, max_size) = (config.spill_threshold, config.max_transaction_size);
        TxnShell {
            core: TxnCore::new(config.transaction_timeout, max_size),
            guard: None,
            vote_task: None,
            finish_task: None,
            deadline: None,
            blob_files: TempFiles::default(),
            spill: Spill::new(threshold, max_size),
            spill_threshold: threshold,
            max_size,
        }
    }

    pub fn core(&self) -> &TxnCore {
        &self.core
    }

    /// A vote or finish is running in the storage.
    pub fn in_progress(&self) -> bool {
        self.vote_task.is_some() || self.finish_task.is_some()
    }

    /// The next thing the transaction needs the session to act on; pending forever when
    /// there is none.
    pub async fn next_event(&mut self) -> TxnWait {
        if let Some(task) = &mut self.vote_task {
            let done = task.await;
            self.vote_task = None;
            return TxnWait::Voted(Box::new(done));
        }
        if let Some(task) = &mut self.finish_task {
            let _ = task.await;
            self.finish_task = None;
            return TxnWait::Finished;
        }
        match self.deadline {
            Some(d) => {
                tokio::time::sleep_until(d).await;
                TxnWait::Timeout
            }
            None => std::future::pending().await,
        }
    }

    /// Feeds what [`TxnShell::next_event`] returned.
    pub async fn on_wait(&mut self, ctx: &Ctx<'_>, wait: TxnWait) -> Result<(), Close> {
        let event = match wait {
            TxnWait::Voted(joined) => match *joined {
                Ok(done) => {
                    // The storage has read the spilled data; let its pages go.
                    self.spill.release_pages();
                    count_conflicts(ctx.handle, &done.report);
                    self.guard = Some(done.guard);
                    Event::Voted {
                        txn: done.txn,
                        report: done.report,
                        now: std::time::Instant::now(),
                    }
                }
                Err(e) => {
                    // The vote task panicked; its lock guard was dropped with it.
                    error!(session = ctx.session, error = %e, "vote failed unexpectedly");
                    Event::VoteLost
                }
            },
            TxnWait::Finished => Event::Finished,
            TxnWait::Timeout => {
                warn!(
                    session = ctx.session,
                    "transaction timeout: commit lock held too long; aborting and disconnecting"
                );
                Event::Timeout
            }
        };
        self.feed(ctx, event).await
    }

    /// A client may start its next transaction as soon as it has the `tpc_finish` reply,
    /// which the finish task queues just before it ends: wait for that task here rather
    /// than mistaking the new `tpc_begin` for a second concurrent transaction.
    pub async fn settle_finish(&mut self, ctx: &Ctx<'_>) -> Result<(), Close> {
        if let Some(task) = self.finish_task.take() {
            let _ = task.await;
            return self.feed(ctx, Event::Finished).await;
        }
        Ok(())
    }

    /// The connection is gone: let a vote or finish in progress complete, then drop what
    /// the transaction holds.
    pub async fn disconnected(&mut self, ctx: &Ctx<'_>) {
        if self.vote_task.is_some() {
            let wait = self.next_event().await;
            let _ = self.on_wait(ctx, wait).await;
        }
        if self.finish_task.is_some() {
            let _ = self.settle_finish(ctx).await;
        }
        let _ = self.feed(ctx, Event::Disconnected).await;
    }

    /// Runs one event through the core and carries out its actions, all of them, before
    /// reporting a close it asked for.
    pub async fn feed(&mut self, ctx: &Ctx<'_>, event: Event) -> Result<(), Close> {
        let event = self.spill_op(ctx, event);
        let mut close = None;
        for action in self.core.handle(event) {
            match action {
                Action::Reply { msgid, answer } => reply(ctx.outbox, &msgid, answer),
                Action::Vote { txn, lock_held } => {
                    let mut guard = if lock_held { self.guard.take() } else { None };
                    if let Some(g) = &mut guard {
                        g.phase(HoldPhase::Client);
                    }
                    self.vote_task = Some(spawn_vote(ctx, txn, guard));
                }
                Action::Finish { key, msgid } => {
                    let mut guard = self.guard.take();
                    if let Some(g) = &mut guard {
                        g.phase(HoldPhase::Client);
                    }
                    // The files stay until the storage is done with them (a proxy keeps
                    // its uploads in its blob cache once upstream has committed them).
                    let files = std::mem::take(&mut self.blob_files);
                    self.finish_task = Some(spawn_finish(ctx, key, msgid, guard, files));
                }
                Action::AbortInStorage { key } => ctx.handle.storage.abort(key).await,
                Action::ReleaseLock { key } => {
                    release_lock(ctx.handle, key, self.guard.take(), HoldPhase::Abort)
                }
                Action::Deadline(d) => self.deadline = d.map(Instant::from_std),
                Action::Began => {
                    ctx.handle.stats.active_txns.fetch_add(1, Ordering::Relaxed);
                }
                Action::Ended { aborted } => {
                    end_txn_stats(ctx.handle, aborted);
                    self.blob_files = TempFiles::default();
                    self.spill = Spill::new(self.spill_threshold, self.max_size);
                }
                Action::Close(Closing::Timeout) => close = Some(Close::Timeout),
                Action::Close(Closing::Protocol(why)) => {
                    warn!(session = ctx.session, "{why}, closing");
                    close = Some(Close::Protocol(why));
                }
            }
        }
        close.map_or(Ok(()), Err)
    }
}

impl TxnShell {
    /// Passes an operation's data through the transaction's [`Spill`], so that a large
    /// transaction waits for its vote on disk; an operation whose data cannot be written
    /// there becomes [`Event::OpLost`] (the vote fails with the reason).
    fn spill_op(&mut self, ctx: &Ctx<'_>, event: Event) -> Event {
        let Event::Op { id, op, what } = event else {
            return event;
        };
        if !self.core.accepts_ops(Some(&id)) {
            return Event::Op { id, op, what };
        }
        let spilled = self.spill.spilled();
        let spill = &mut self.spill;
        let mut admit = |data: Bytes| spill.admit(data);
        let kept = match op {
            TxnOp::Store { oid, serial, data } => {
                admit(data).map(|data| TxnOp::Store { oid, serial, data })
            }
            TxnOp::StoreBlob {
                oid,
                serial,
                data,
                file,
            } => admit(data).map(|data| TxnOp::StoreBlob {
                oid,
                serial,
                data,
                file,
            }),
            TxnOp::Restore {
                oid,
                serial,
                data: Some(data),
                prev_txn,
            } => admit(data).map(|data| TxnOp::Restore {
                oid,
                serial,
                data: Some(data),
                prev_txn,
            }),
            other => Ok(other),
        };
        if spilled == 0 && self.spill.spilled() > 0 {
            debug!(
                session = ctx.session,
                "transaction data past {} bytes: spilling to a temporary file",
                self.spill_threshold
            );
        }
        match kept {
            Ok(op) => Event::Op { id, op, what },
            Err(e) => {
                error!(session = ctx.session, error = %e, "could not write transaction data to a temporary file");
                Event::OpLost {
                    id,
                    error: StorageError::Io(std::io::Error::new(
                        e.kind(),
                        format!("could not keep the transaction's data in a temporary file: {e}"),
                    )),
                }
            }
        }
    }
}

fn reply(outbox: &Outbox, msgid: &Value, answer: Answer) {
    let frame = |v: Value| message::reply_frame(outbox.encoding, msgid, v);
    match answer {
        Answer::None => outbox.send(frame(Value::None)),
        Answer::Vote(v) => outbox.send(frame(v.to_value())),
        Answer::Error(e) => send_error(outbox, msgid, &e),
        Answer::Protocol(p) => {
            let (class, payload) = exception_for_protocol(&p);
            outbox.send(message::exception_frame(
                outbox.encoding,
                msgid,
                &class,
                payload,
            ));
        }
    }
}

fn count_conflicts(handle: &StorageHandle, report: &VoteReport) {
    let n = match &report.result {
        Ok(Vote::Conflicts(c)) => c.len() as u64,
        Err(StorageError::Conflict { .. } | StorageError::ReadConflict { .. }) => 1,
        _ => 0,
    };
    handle.stats.conflicts.fetch_add(n, Ordering::Relaxed);
    handle
        .stats
        .conflicts_resolved
        .fetch_add(report.resolved.len() as u64, Ordering::Relaxed);
}

/// Takes the commit lock (unless `guard` holds it already: a conflict round), then votes.
fn spawn_vote(ctx: &Ctx<'_>, txn: Transaction, guard: Option<LockHold>) -> JoinHandle<VoteDone> {
    let handle = ctx.handle.clone();
    let metrics = ctx.shared.metrics.clone();
    let session = ctx.session;
    tokio::spawn(async move {
        let guard = match guard {
            Some(g) => g,
            None => {
                handle.stats.waiting.fetch_add(1, Ordering::Relaxed);
                let waiting_since = std::time::Instant::now();
                let guard = handle.commit_lock.clone().lock_owned().await;
                metrics
                    .commit_lock_wait
                    .observe(waiting_since.elapsed().as_secs_f64());
                handle.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                *handle.stats.lock_time.lock() = Some(zodb::timestamp::now_unix());
                handle.hub.begin_commit(txn.key, session);
                LockHold::new(guard, metrics)
            }
        };
        let mut txn = txn;
        let report = vote_resolving(&handle, &mut txn).await;
        let mut guard = guard;
        guard.phase(HoldPhase::Vote);
        VoteDone { txn, report, guard }
    })
}

/// Votes `txn` in the storage (the commit lock held). Conflicts on the classes that
/// carry most contention in Zope and Plone — every BTrees bucket and set, one-bucket
/// trees, `BTrees.Length` — are resolved here, natively, with exactly the result of
/// their Python `_p_resolveConflict` (the `btrees` crate): the resolution is added to the
/// transaction as a store on the committed serial and the transaction voted again, so
/// that it commits without a round trip to the client. Every other conflict (and one
/// Python would refuse) goes back to the client, which resolves it with its own classes
/// or raises `ConflictError`, as with ZEO's client-side conflict resolution.
///
/// The lock is held throughout, so the second vote cannot meet a new conflict; it is
/// bounded to one extra vote all the same.
async fn vote_resolving(handle: &StorageHandle, txn: &mut Transaction) -> VoteReport {
    let mut resolved = Vec::new();
    let mut result = handle.storage.vote(txn).await;
    if let Ok(Vote::Conflicts(conflicts)) = &result {
        let mut remaining = Vec::new();
        for c in conflicts {
            match resolve_natively(handle, c).await {
                Some(data) => {
                    txn.ops.push(TxnOp::Store {
                        oid: c.oid,
                        serial: c.committed,
                        data,
                    });
                    resolved.push(c.oid);
                }
                None => remaining.push(c.clone()),
            }
        }
        if !resolved.is_empty() {
            result = if remaining.is_empty() {
                handle.storage.vote(txn).await
            } else {
                // The client resolves the rest; its re-vote carries ours too.
                Ok(Vote::Conflicts(remaining))
            };
        }
    }
    VoteReport { result, resolved }
}

/// The resolved record for conflict `c`, when its class is one resolved natively and
/// Python would resolve it.
async fn resolve_natively(handle: &StorageHandle, c: &zodb::Conflict) -> Option<Bytes> {
    // A conflict on an object the transaction created has no old state to merge from.
    if c.read == zodb::Tid::ZERO || !btrees::handles(&c.data) {
        return None;
    }
    let (committed, old) = futures::join!(
        handle.storage.load_serial(c.oid, c.committed),
        handle.storage.load_serial(c.oid, c.read)
    );
    let (committed, old) = (committed.ok()?, old.ok()?);
    match btrees::resolve(&old, &committed, &c.data) {
        btrees::Resolution::Resolved(data) => Some(Bytes::from(data)),
        btrees::Resolution::Conflict(why) => {
            debug!(oid = %c.oid, %why, "conflict Python would refuse; the client decides");
            None
        }
        btrees::Resolution::NotHandled(why) => {
            debug!(oid = %c.oid, ?why, "conflict not resolved natively");
            None
        }
    }
}

/// Finishes `key`: the reply (after the `info` callback), then the lock.
fn spawn_finish(
    ctx: &Ctx<'_>,
    key: TxnKey,
    msgid: Value,
    mut guard: Option<LockHold>,
    files: TempFiles,
) -> JoinHandle<()> {
    let handle = ctx.handle.clone();
    let outbox = ctx.outbox.clone();
    tokio::spawn(async move {
        let finished = handle.storage.finish(key).await;
        if let Some(g) = &mut guard {
            g.phase(HoldPhase::Finish);
        }
        match finished {
            Ok(tid) => {
                Stats::incr(&handle.stats.commits);
                let info = handle.storage.info();
                outbox.send(
                    Callback::Info(SizeInfo {
                        length: info.length,
                        size: info.size,
                    })
                    .frame(outbox.encoding),
                );
                outbox.send(message::reply_frame(
                    outbox.encoding,
                    &msgid,
                    tid.to_value(),
                ));
            }
            Err(e) => {
                error!(storage = %handle.name, error = %e, "tpc_finish failed; transaction aborted");
                handle.storage.abort(key).await;
                send_error(&outbox, &msgid, &e);
            }
        }
        outbox.own_commit_replied();
        // Only now, after the reply is queued, may the next transaction commit.
        release_lock(&handle, key, guard, HoldPhase::Reply);
        drop(files);
        debug!(storage = %handle.name, key, "transaction finished");
    })
}

/// Releases the commit lock, if held, counting the time since the last phase as `last`.
fn release_lock(handle: &StorageHandle, key: TxnKey, guard: Option<LockHold>, last: HoldPhase) {
    *handle.stats.lock_time.lock() = None;
    handle.hub.end_commit(key);
    if let Some(mut g) = guard {
        g.phase(last);
    }
}

fn end_txn_stats(handle: &StorageHandle, aborted: bool) {
    handle.stats.active_txns.fetch_sub(1, Ordering::Relaxed);
    if aborted {
        Stats::incr(&handle.stats.aborts);
    }
}
