//! A session's outgoing queue.
//!
//! Everything a connection sends — replies, callbacks, invalidations — goes through its
//! outbox and reaches the socket in queue order. Three rules live here:
//!
//! * **Who writes.** A writer task per connection writes what is queued, coalescing
//!   small frames. When nothing is queued and that task is idle, a reply is instead
//!   written at once by the task that produced it ([`Outbox::send`]): a load costs one
//!   write from the session's own task rather than a queue push plus a wake-up of the
//!   writer on another thread. The socket's write half lives in the [`Wire`]: parked there
//!   while the writer task is idle (so a sender may borrow it, under the wire's lock, for
//!   one non-blocking write), taken out while that task writes. A sender writes only if
//!   it finds the half parked and no byte queued, so nothing it writes can overtake a
//!   frame queued before it; whatever the socket does not take at once is queued, for
//!   the writer task. Invalidations are always queued: a commit's fan-out to many
//!   clients must not make its own task do all their writes.
//!
//! * **Ordering of loads and invalidations.** A load reply that says "current" must reach
//!   the client before the invalidation of any transaction that makes it stale. Loads run
//!   concurrently and without locks, so instead of holding a lock across the read, the
//!   reply carries the storage snapshot it was computed from; the outbox refuses it if an
//!   invalidation for a later transaction has already been queued, and the session simply
//!   loads again. The check and the push happen under one mutex that the fan-out also
//!   takes, so they are atomic with respect to invalidations. A committer learns its
//!   own transaction's tid from the `tpc_finish` reply, so from the moment that commit
//!   is announced until the reply is queued, later invalidations (and load replies
//!   computed after it) wait behind the reply.
//! * **Bounded memory.** A client that stops reading must not make the server buffer
//!   without limit. Past `max_queued` bytes the outbox marks itself overflowed and the
//!   session closes the connection. Many clients together are bounded by the
//!   server-wide [`QueueBudget`]: while the output queued for all connections exceeds
//!   it, a connection with more than [`PAUSE_FLOOR`] bytes of its own waiting is not read
//!   from and its requests are not started ([`Outbox::admit`]) until either drains. A
//!   request admitted adds at most its one reply, so the queued total stays within the
//!   budget plus one reply per connection; clients that read their replies keep being
//!   served throughout, since their own queues stay below the floor.
//!
//! * **Compression.** A zeors peer may ask for the rest of the stream to be compressed
//!   ([`Outbox::send_then_compress`]): the reply is queued, then a mark after which the
//!   writer task compresses everything. From then on every frame is queued (a sender
//!   writing at once would bypass the compressor).
//!
//! Every byte queued is counted in the outbox's [`Queued`] and in the budget until the
//! writer has written it or the queue is dropped unwritten (the count outlives the
//! outbox while the writer still holds frames).

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::Notify;
use tracing::debug;
use zeo_proto::compress::Compressor;
use zeo_proto::Encoding;
use zodb::Tid;

/// Frames at least this large are written directly instead of being coalesced.
const DIRECT_WRITE: usize = 64 * 1024;
/// The most bytes coalesced into one write.
const BATCH: usize = 256 * 1024;

/// A connection may always have this much output waiting and still be read from, however
/// full the server-wide budget is: a client that reads its replies is never paused.
pub const PAUSE_FLOOR: usize = 1 << 20;

/// The server-wide bound on output queued for clients.
pub struct QueueBudget {
    total: AtomicUsize,
    limit: usize,
    /// Woken when the total falls back to the limit.
    below: Notify,
    /// Connections currently not read from because of the budget (a gauge).
    pub paused: AtomicUsize,
    /// Times a connection was paused (a counter).
    pub pauses: std::sync::atomic::AtomicU64,
}

impl QueueBudget {
    pub fn new(limit: usize) -> QueueBudget {
        QueueBudget {
            total: AtomicUsize::new(0),
            limit,
            below: Notify::new(),
            paused: AtomicUsize::new(0),
            pauses: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Bytes queued for all connections.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn exceeded(&self) -> bool {
        self.total() > self.limit
    }

    fn take(&self, n: usize) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    fn release(&self, n: usize) {
        let before = self.total.fetch_sub(n, Ordering::AcqRel);
        if before > self.limit && before - n <= self.limit {
            self.below.notify_waiters();
        }
    }
}

/// One connection's queued byte count, shared by its outbox and its writer, and charged
/// to the budget: whatever is still counted when both are gone (frames never written)
/// is given back then.
pub struct Queued {
    bytes: AtomicUsize,
    budget: std::sync::Arc<QueueBudget>,
}

impl Queued {
    fn add(&self, n: usize) -> usize {
        self.budget.take(n);
        self.bytes.fetch_add(n, Ordering::Relaxed) + n
    }

    /// `n` bytes were written (or dropped unwritten).
    pub fn sub(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Release);
        self.budget.release(n);
    }

    pub fn get(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let left = self.bytes.swap(0, Ordering::Relaxed);
        if left > 0 {
            self.budget.release(left);
        }
    }
}

/// The address behind the compression mark: an empty frame is also what a sender queues
/// to hand a pending flush to the writer task, so the mark is told apart by where it
/// points, not by its contents (frames are never empty otherwise: a frame has at least
/// its 4-byte length).
static COMPRESS_MARK: [u8; 1] = [0];

/// The queue entry after which the writer compresses everything (see the module docs).
fn compress_from_here() -> Bytes {
    Bytes::from_static(&COMPRESS_MARK[..0])
}

fn is_compress_mark(frame: &Bytes) -> bool {
    frame.is_empty() && std::ptr::eq(frame.as_ptr(), COMPRESS_MARK.as_ptr())
}

/// A connection's write half, type-erased.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The socket's write half, shared by the writer task and the outbox's senders (see the
/// module's "who writes").
pub struct Wire {
    /// `Some` while parked (the writer task idle), `None` while the writer task writes.
    writer: Mutex<Option<Writer>>,
    /// Where the bytes written to clients are counted.
    metrics: Arc<crate::metrics::ServerMetrics>,
}

impl Wire {
    pub fn new(writer: Writer, metrics: Arc<crate::metrics::ServerMetrics>) -> Arc<Wire> {
        Arc::new(Wire {
            writer: Mutex::new(Some(writer)),
            metrics,
        })
    }

    fn count(&self, n: usize) {
        self.metrics
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

pub struct Outbox {
    pub encoding: Encoding,
    state: Mutex<OutState>,
    tx: mpsc::UnboundedSender<Bytes>,
    /// Where replies may be written at once; `None`: everything is queued.
    wire: Option<Arc<Wire>>,
    /// Frames written at once by their sender (a counter, for tests and profiles).
    written_inline: AtomicU64,
    /// The stream is compressed from a queued mark on: nothing is written at once.
    compressing: AtomicBool,
    queued: std::sync::Arc<Queued>,
    max_queued: usize,
    overflowed: AtomicBool,
    /// Set when the connection can no longer be written to; further frames are dropped.
    closed: AtomicBool,
    /// Woken when the outbox overflows or the writer fails, so the session can close the
    /// connection.
    pub trouble: Notify,
    /// Woken after writes while someone waits for the queue to drain (a blob being
    /// streamed, see [`Outbox::wait_queued_below`]).
    drained: Notify,
    drain_waiters: AtomicUsize,
    /// When the writer last completed a write (for the idle timeout).
    last_written: Mutex<std::time::Instant>,
}

struct OutState {
    /// The tid of the last invalidation queued (or, at registration, the tid the client
    /// was told is current).
    last_invalidation: Tid,
    /// This connection's own commit, announced at this tid, whose `tpc_finish` reply is
    /// not queued yet, and the frames that must follow that reply (see
    /// [`Outbox::own_commit_announced`]).
    owed: Option<(Tid, Vec<Bytes>)>,
}

/// The load reply was computed from a snapshot older than an invalidation already queued.
#[derive(Debug)]
pub struct Stale;

impl Outbox {
    /// An outbox charging `budget`; the writer gets the receiving end of the queue and
    /// the byte count it must decrease as it writes ([`Queued::sub`]). With a `wire`,
    /// replies are written at once when nothing is queued (see [`write_loop`]).
    pub fn new(
        encoding: Encoding,
        max_queued: usize,
        budget: std::sync::Arc<QueueBudget>,
        wire: Option<Arc<Wire>>,
    ) -> (
        Outbox,
        mpsc::UnboundedReceiver<Bytes>,
        std::sync::Arc<Queued>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = std::sync::Arc::new(Queued {
            bytes: AtomicUsize::new(0),
            budget,
        });
        (
            Outbox {
                encoding,
                state: Mutex::new(OutState {
                    last_invalidation: Tid::ZERO,
                    owed: None,
                }),
                tx,
                wire,
                written_inline: AtomicU64::new(0),
                compressing: AtomicBool::new(false),
                queued: queued.clone(),
                max_queued,
                overflowed: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                trouble: Notify::new(),
                drained: Notify::new(),
                drain_waiters: AtomicUsize::new(0),
                last_written: Mutex::new(std::time::Instant::now()),
            },
            rx,
            queued,
        )
    }

    fn push(&self, frame: Bytes) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let n = frame.len();
        let total = self.queued.add(n);
        if total > self.max_queued && !self.overflowed.swap(true, Ordering::Relaxed) {
            self.trouble.notify_one();
        }
        // A closed channel means the connection is going away; dropping the frame is fine.
        if self.tx.send(frame).is_err() {
            self.queued.sub(n);
        }
    }

    /// Writes `frame` at once if nothing is queued before it and the writer task is idle,
    /// else queues it (also the part the socket did not take at once).
    fn push_or_write(&self, frame: Bytes) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let Some(wire) = self
            .wire
            .as_ref()
            .filter(|_| !self.compressing.load(Ordering::Acquire))
        else {
            return self.push(frame);
        };
        // Never wait for the lock: it is held only for a moment, by the writer task
        // parking or taking the half, or by another sender's write; queueing is as good.
        let Some(mut parked) = wire.writer.try_lock() else {
            return self.push(frame);
        };
        // Parked means the writer task is idle; nothing queued means no frame is in the
        // queue or in that task's hands (bytes stay counted until written).
        // Compressing is checked again under the lock: a writer that parked after the
        // switch had seen it set, so no plain frame follows the mark.
        let Some(writer) = parked
            .as_mut()
            .filter(|_| self.queued.get() == 0 && !self.compressing.load(Ordering::Acquire))
        else {
            drop(parked);
            return self.push(frame);
        };
        match write_now(writer, &frame) {
            Ok((n, flushed)) => {
                if n > 0 {
                    wire.count(n);
                    self.written_inline.fetch_add(1, Ordering::Relaxed);
                }
                if !flushed {
                    // The socket is full: the writer task waits for it (woken by the
                    // queue, it takes the half once this lock is released) and writes
                    // the rest. The rest may be empty, when all that is left is a
                    // flush: that frame only hands the flush over to the writer task.
                    self.push(frame.slice(n..));
                }
                drop(parked);
                if n > 0 {
                    self.written();
                }
            }
            Err(e) => {
                drop(parked);
                debug!(error = %e, "write failed");
                self.close();
            }
        }
    }

    /// Sends a frame with no ordering constraint: written at once when nothing is queued
    /// and the writer task is idle, else queued.
    pub fn send(&self, frame: Bytes) {
        self.push_or_write(frame);
    }

    /// Queues a frame for the writer task, never writing it from the caller (for a frame
    /// sent while holding a lock others wait on).
    pub fn queue(&self, frame: Bytes) {
        self.push(frame);
    }

    /// Queues `frame` as the last one written plain: the writer compresses everything
    /// queued after it (see `zeo_proto::compress`). Under the ordering lock, so that no
    /// invalidation slips in between the frame and the switch.
    pub fn send_then_compress(&self, frame: Bytes) {
        let _st = self.state.lock();
        self.compressing.store(true, Ordering::Release);
        self.push(frame);
        self.push(compress_from_here());
    }

    /// Sends a load reply computed from `snapshot` (as [`Outbox::send`]), unless an
    /// invalidation for a later transaction has been queued since.
    pub fn send_load_reply(&self, frame: Bytes, snapshot: Tid) -> Result<(), Stale> {
        let mut st = self.state.lock();
        if st.last_invalidation > snapshot {
            return Err(Stale);
        }
        if let Some((tid, held)) = &mut st.owed {
            if snapshot > *tid {
                // Computed from a transaction after this client's own commit, whose
                // reply is not out yet: it follows the invalidations it depends on.
                held.push(frame);
                return Ok(());
            }
        }
        // Written (or queued) under the state lock, so that no invalidation can be queued
        // between the check and the reply. A commit's fan-out to this connection waits
        // for at most one non-blocking write.
        self.push_or_write(frame);
        drop(st);
        Ok(())
    }

    /// Frames written at once by their sender so far.
    pub fn written_inline(&self) -> u64 {
        self.written_inline.load(Ordering::Relaxed)
    }

    /// Queues an invalidation (`frame` is `None` for the committer, who is not sent one
    /// but whose ordering point still advances).
    pub fn send_invalidation(&self, tid: Tid, frame: Option<Bytes>) {
        let mut st = self.state.lock();
        if tid > st.last_invalidation {
            st.last_invalidation = tid;
        }
        if let Some(f) = frame {
            match &mut st.owed {
                Some((_, held)) => held.push(f),
                None => self.push(f),
            }
        }
    }

    /// This connection's own commit has been announced at `tid`: it is not sent that
    /// invalidation, and until its `tpc_finish` reply is queued
    /// ([`Outbox::own_commit_replied`]) later invalidations, and load replies computed
    /// after `tid`, wait. A client's last tid must only increase, and it learns `tid`
    /// from that reply; a later transaction can be announced before the reply is queued
    /// when it does not pass through this server's commit lock (a PostgreSQL database
    /// shared with other writers, a proxy's upstream).
    pub fn own_commit_announced(&self, tid: Tid) {
        let mut st = self.state.lock();
        if tid > st.last_invalidation {
            st.last_invalidation = tid;
        }
        st.owed.get_or_insert_with(|| (tid, Vec::new()));
    }

    /// The reply to this connection's `tpc_finish` (or its error) has been sent: what
    /// waited behind it follows, in order.
    pub fn own_commit_replied(&self) {
        let mut st = self.state.lock();
        if let Some((_, held)) = st.owed.take() {
            for f in held {
                self.push(f);
            }
        }
    }

    /// Sets the ordering point at registration: the client has been told `tid` is current.
    pub fn set_registered_tid(&self, tid: Tid) {
        self.state.lock().last_invalidation = tid;
    }

    /// Called by the writer after bytes have been written (and counted off with
    /// [`Queued::sub`]): wakes those waiting for the queue to drain.
    pub fn written(&self) {
        *self.last_written.lock() = std::time::Instant::now();
        if self.drain_waiters.load(Ordering::Acquire) > 0 {
            self.drained.notify_waiters();
        }
    }

    /// Whether this connection must wait for the server-wide budget: the total is over
    /// it and this connection has more than [`PAUSE_FLOOR`] bytes of its own waiting.
    pub fn over_budget(&self) -> bool {
        self.queued.budget.exceeded() && self.queued_bytes() > PAUSE_FLOOR
    }

    /// Waits until this connection may start a request: at once unless it is
    /// [over budget](Outbox::over_budget), else until the budget or its own queue has
    /// drained (or the connection is closed).
    pub async fn admit(&self) {
        if !self.over_budget() {
            return;
        }
        self.wait_for(|| !self.over_budget(), true).await
    }

    /// Waits until at most `limit` bytes are queued, or the connection is closed. Lets a
    /// large response (a blob) be produced only as fast as the client reads it, with a
    /// bounded amount of it in memory.
    pub async fn wait_queued_below(&self, limit: usize) {
        self.wait_for(|| self.queued_bytes() <= limit, false).await
    }

    /// Waits until `done()` holds or the connection is closed, re-checking after every
    /// write (and, with `budget`, whenever the server-wide total falls back to its
    /// limit).
    async fn wait_for(&self, done: impl Fn() -> bool, budget: bool) {
        /// Counts the waiter for as long as it waits, even if its future is dropped.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.drain_waiters.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.drain_waiters);
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            let below = self.queued.budget.below.notified();
            tokio::pin!(below);
            // Registered before the check, so a write in between is not missed.
            notified.as_mut().enable();
            if budget {
                below.as_mut().enable();
            }
            if done() || self.is_closed() {
                return;
            }
            if budget {
                tokio::select! {
                    _ = notified => {}
                    _ = below => {}
                }
            } else {
                notified.await;
            }
        }
    }

    /// When the writer last completed a write (the outbox's creation before any).
    pub fn last_written(&self) -> std::time::Instant {
        *self.last_written.lock()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.get()
    }

    /// The writer lost the connection: drop whatever is queued from now on.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            self.trouble.notify_one();
            self.drained.notify_waiters();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }
}

/// Writes as much of `buf` as the socket takes without waiting, then flushes without
/// waiting; the bytes written and whether they are all out of the writer's own buffers
/// (a TLS stream may accept bytes it cannot yet send).
fn write_now(writer: &mut Writer, buf: &[u8]) -> io::Result<(usize, bool)> {
    // Nobody is to be woken: if the socket is full, the writer task takes over and polls
    // with its own waker (readiness is kept by the runtime, so no wake-up is lost).
    let mut cx = Context::from_waker(Waker::noop());
    let mut done = 0;
    while done < buf.len() {
        match Pin::new(&mut **writer).poll_write(&mut cx, &buf[done..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => done += n,
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok((done, false)),
        }
    }
    match Pin::new(&mut **writer).poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Ok((done, true)),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok((done, false)),
    }
}

/// The writer task: writes queued frames, coalescing small ones into one write, and
/// parks the write half in the wire whenever the queue is empty. Ends when the outbox is
/// gone and its queue drained (shutting the write half down), or on a write error.
pub async fn write_loop(
    wire: Arc<Wire>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<Queued>,
    outbox: Weak<Outbox>,
) {
    let mut batch = BytesMut::new();
    let mut compressor: Option<Compressor> = None;
    'idle: while let Some(mut first) = rx.recv().await {
        // Parked: a sender borrows it only under the lock, and only this task takes it.
        let Some(mut wr) = wire.writer.lock().take() else {
            return;
        };
        loop {
            let (n, sent) =
                match write_batch(&mut wr, first, &mut rx, &mut batch, &mut compressor).await {
                    Ok(counts) => counts,
                    Err(e) => {
                        debug!(error = %e, "write failed");
                        if let Some(o) = outbox.upgrade() {
                            o.close();
                        }
                        return;
                    }
                };
            wire.count(sent);
            queued.sub(n);
            if let Some(o) = outbox.upgrade() {
                o.written();
            }
            // Park unless more is queued; under the lock, so that a sender finds either
            // the half parked or this task about to write what it queued.
            let next = {
                let mut parked = wire.writer.lock();
                match rx.try_recv() {
                    Ok(f) => Some(f),
                    Err(TryRecvError::Empty) => {
                        *parked = Some(wr);
                        continue 'idle;
                    }
                    Err(TryRecvError::Disconnected) => None,
                }
            };
            match next {
                Some(f) => first = f,
                None => {
                    let _ = wr.shutdown().await;
                    return;
                }
            }
        }
    }
    let parked = wire.writer.lock().take();
    if let Some(mut wr) = parked {
        let _ = wr.shutdown().await;
    }
}

/// Writes `first` and whatever else is queued (up to [`BATCH`] bytes at a time, large
/// frames on their own), then flushes: compressed once `compressor` is set, which the
/// queue's compression mark does. Returns the bytes taken from the queue and the bytes
/// sent.
async fn write_batch(
    wr: &mut Writer,
    first: Bytes,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    batch: &mut BytesMut,
    compressor: &mut Option<Compressor>,
) -> io::Result<(usize, usize)> {
    if is_compress_mark(&first) {
        *compressor = Some(Compressor::new()?);
        return Ok((0, 0));
    }
    let mut n = first.len();
    if let Some(c) = compressor {
        // One flush per batch: the client decodes each batch as it arrives.
        c.write(&first)?;
        while n < BATCH {
            match rx.try_recv() {
                Ok(f) => {
                    debug_assert!(!is_compress_mark(&f), "compression is switched on once");
                    n += f.len();
                    c.write(&f)?;
                }
                Err(_) => break,
            }
        }
        let z = c.flush()?;
        wr.write_all(&z).await?;
        wr.flush().await?;
        return Ok((n, z.len()));
    }
    if first.len() >= DIRECT_WRITE {
        wr.write_all(&first).await?;
        wr.flush().await?;
        return Ok((n, n));
    }
    batch.extend_from_slice(&first);
    let mut switch = false;
    while batch.len() < BATCH {
        match rx.try_recv() {
            // Nothing after the mark may be written plain: the batch ends there.
            Ok(f) if is_compress_mark(&f) => {
                switch = true;
                break;
            }
            Ok(f) if f.len() < DIRECT_WRITE => {
                n += f.len();
                batch.extend_from_slice(&f);
            }
            Ok(f) => {
                n += f.len();
                let r = wr.write_all(batch).await;
                batch.clear();
                r?;
                batch.extend_from_slice(&f);
            }
            Err(_) => break,
        }
    }
    let r = wr.write_all(batch).await;
    batch.clear();
    r?;
    // A TLS stream may keep bytes it accepted until flushed (nothing else would send them
    // while the connection is quiet); a plain socket's flush returns at once.
    wr.flush().await?;
    if switch {
        *compressor = Some(Compressor::new()?);
    }
    Ok((n, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn budget(limit: usize) -> Arc<QueueBudget> {
        Arc::new(QueueBudget::new(limit))
    }

    #[test]
    fn stale_load_replies_are_refused_after_a_newer_invalidation() {
        let (out, mut rx, _) = Outbox::new(Encoding::Pickle, 1 << 20, budget(1 << 30), None);
        out.set_registered_tid(Tid(10));
        assert!(out
            .send_load_reply(Bytes::from_static(b"a"), Tid(10))
            .is_ok());
        out.send_invalidation(Tid(11), Some(Bytes::from_static(b"inv")));
        assert!(out
            .send_load_reply(Bytes::from_static(b"b"), Tid(10))
            .is_err());
        assert!(out
            .send_load_reply(Bytes::from_static(b"c"), Tid(11))
            .is_ok());
        let got: Vec<Bytes> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            vec![
                Bytes::from_static(b"a"),
                Bytes::from_static(b"inv"),
                Bytes::from_static(b"c")
            ]
        );
    }

    #[test]
    fn a_committers_reply_precedes_what_was_announced_after_its_commit() {
        let (out, mut rx, _) = Outbox::new(Encoding::Pickle, 1 << 20, budget(1 << 30), None);
        out.set_registered_tid(Tid(10));
        out.own_commit_announced(Tid(11));
        // A transaction committed elsewhere right after, announced before the reply.
        out.send_invalidation(Tid(12), Some(Bytes::from_static(b"inv12")));
        // A load computed at 11 is stale now (the session loads again); one computed at
        // 12 waits behind the reply with the invalidation it depends on.
        assert!(out
            .send_load_reply(Bytes::from_static(b"load11"), Tid(11))
            .is_err());
        assert!(out
            .send_load_reply(Bytes::from_static(b"load12"), Tid(12))
            .is_ok());
        out.send(Bytes::from_static(b"finish11"));
        out.own_commit_replied();
        out.send_invalidation(Tid(13), Some(Bytes::from_static(b"inv13")));
        let got: Vec<Bytes> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            ["finish11", "inv12", "load12", "inv13"]
                .map(|s| Bytes::from_static(s.as_bytes()))
                .to_vec()
        );
    }

    #[test]
    fn overflow_is_flagged() {
        let (out, _rx, _) = Outbox::new(Encoding::Pickle, 10, budget(1 << 30), None);
        out.send(Bytes::from_static(b"12345"));
        assert!(!out.is_overflowed());
        out.send(Bytes::from_static(b"123456"));
        assert!(out.is_overflowed());
    }

    #[tokio::test]
    async fn the_budget_pauses_only_connections_with_output_waiting_and_is_given_back() {
        let b = budget(3 << 20);
        let (big, rx_big, q_big) = Outbox::new(Encoding::Pickle, 1 << 30, b.clone(), None);
        let (small, _rx_small, _q_small) = Outbox::new(Encoding::Pickle, 1 << 30, b.clone(), None);
        for _ in 0..4 {
            big.send(Bytes::from(vec![0u8; 1 << 20]));
        }
        small.send(Bytes::from_static(b"reply"));
        assert_eq!(b.total(), (4 << 20) + 5);
        assert!(big.over_budget(), "4 MiB waiting with the budget exceeded");
        assert!(
            !small.over_budget(),
            "a connection below the floor is always served"
        );
        // The writer writes two frames: the total falls to the limit and admits again.
        let admitted = tokio::spawn({
            let big = Arc::new(big);
            let waiter = big.clone();
            async move {
                waiter.admit().await;
                big
            }
        });
        tokio::task::yield_now().await;
        assert!(!admitted.is_finished());
        q_big.sub(1 << 20);
        q_big.sub(1 << 20);
        let big = tokio::time::timeout(std::time::Duration::from_secs(5), admitted)
            .await
            .expect("admitted once the budget has room")
            .unwrap();
        assert!(!big.over_budget());
        // What was never written is given back when the queue goes away.
        drop(rx_big);
        drop(big);
        drop(q_big);
        assert_eq!(b.total(), 5);
    }

    /// A connection whose writer task runs over an in-memory pipe of `capacity` bytes.
    fn wired(
        capacity: usize,
    ) -> (
        Arc<Outbox>,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
    ) {
        let (ours, theirs) = tokio::io::duplex(capacity);
        wired_over(Box::new(ours), theirs)
    }

    fn wired_over(
        writer: Writer,
        theirs: tokio::io::DuplexStream,
    ) -> (
        Arc<Outbox>,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
    ) {
        let wire = Wire::new(writer, Arc::default());
        let (out, rx, queued) = Outbox::new(
            Encoding::Pickle,
            1 << 30,
            budget(1 << 30),
            Some(wire.clone()),
        );
        let out = Arc::new(out);
        let writer = tokio::spawn(write_loop(wire, rx, queued, Arc::downgrade(&out)));
        (out, theirs, writer)
    }

    async fn read_exactly(peer: &mut tokio::io::DuplexStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0u8; n];
        tokio::time::timeout(std::time::Duration::from_secs(5), peer.read_exact(&mut got))
            .await
            .expect("the bytes arrive")
            .unwrap();
        got
    }

    #[tokio::test]
    async fn an_idle_connection_is_written_by_the_sender_and_a_busy_one_in_queue_order() {
        let (out, mut peer, writer) = wired(1 << 16);
        // Idle: written by this task, nothing queued.
        out.send(Bytes::from_static(b"one"));
        assert_eq!(out.written_inline(), 1);
        assert_eq!(out.queued_bytes(), 0);
        assert_eq!(read_exactly(&mut peer, 3).await, b"one");
        // An invalidation is always queued; what follows it waits behind it even though
        // the writer task has not run yet.
        out.send_invalidation(Tid(5), Some(Bytes::from_static(b"inv")));
        out.send(Bytes::from_static(b"two"));
        assert_eq!(out.written_inline(), 1, "queued behind the invalidation");
        assert!(out
            .send_load_reply(Bytes::from_static(b"3"), Tid(5))
            .is_ok());
        assert_eq!(read_exactly(&mut peer, 7).await, b"invtwo3");
        // The writer task parks again once the queue is empty: the next one is inline.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while out.queued_bytes() > 0 || out.wire.as_ref().unwrap().writer.lock().is_none() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the writer parks");
        out.send(Bytes::from_static(b"four"));
        assert_eq!(out.written_inline(), 2);
        assert_eq!(read_exactly(&mut peer, 4).await, b"four");
        drop(out);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn what_a_full_socket_does_not_take_is_written_by_the_writer_task_in_order() {
        let (out, mut peer, writer) = wired(100);
        let frames: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 37]).collect();
        for f in &frames {
            out.send(Bytes::from(f.clone()));
        }
        // The pipe took 100 bytes at once; the rest was queued.
        assert!(out.written_inline() >= 1);
        assert!(out.queued_bytes() > 0);
        assert_eq!(read_exactly(&mut peer, 37 * 50).await, frames.concat());
        drop(out);
        writer.await.unwrap();
        // The write half was shut down when the outbox went away.
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut peer, &mut rest)
            .await
            .unwrap();
        assert!(rest.is_empty());
    }

    /// A writer that keeps what it accepts until flushed (as a TLS stream does) must not
    /// leave a reply unsent when the socket was full at the sender's flush: the writer
    /// task finishes it.
    #[tokio::test]
    async fn bytes_a_writer_holds_back_are_flushed_by_the_writer_task() {
        let (ours, theirs) = tokio::io::duplex(16);
        let (out, mut peer, writer) = wired_over(Box::new(tokio::io::BufWriter::new(ours)), theirs);
        let reply = vec![7u8; 100];
        out.send(Bytes::from(reply.clone()));
        // Accepted whole, but only 16 bytes could leave: the flush was handed over.
        assert_eq!(out.written_inline(), 1);
        assert_eq!(read_exactly(&mut peer, 100).await, reply);
        drop(out);
        writer.await.unwrap();
    }
}
