//! One client connection.
//!
//! A session performs the handshake, then reads messages and runs them ([`dispatch`]).
//! Cheap requests are answered inline; loads and other storage reads run as futures
//! inside the session (so one client's pipelined loads proceed concurrently). The
//! transaction — buffered operations, `vote`, `tpc_finish`, `tpc_abort`, conflict rounds,
//! timeout — is a state machine without I/O ([`txn_core`]) run by an async shell
//! ([`txn`]) that holds the commit lock and the vote and finish tasks. Iterators
//! ([`iterators`]), undo ([`undo`]) and blobs ([`blobs`]) have modules of their own.
//!
//! Invariant: everything a connection sends goes through its [`Outbox`] and reaches the
//! socket in queue order: written at once by the sender when nothing is queued and the
//! connection's writer task is idle, else by that task (see [`crate::outbox`]).

use crate::hub::SessionId;
use crate::outbox::{write_loop, Outbox, Wire};
use crate::{stats, Shared, StorageHandle};
use bytes::BytesMut;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};
use zeo_proto::exception::{self, ProtocolError};
use zeo_proto::message::{self, ClientHello};
use zeo_proto::{frame, Encoding, Limits, Value};
use zodb::StorageError;

/// The context the transaction shell runs its actions in, borrowing the session's
/// fields one by one (so that the shell itself can be borrowed mutably beside it).
macro_rules! txn_ctx {
    ($session:expr, $handle:expr) => {
        $crate::session::txn::Ctx {
            session: $session.id,
            handle: $handle,
            shared: &$session.shared,
            outbox: &$session.outbox,
        }
    };
}

mod blobs;
mod dispatch;
mod iterators;
mod spill;
mod txn;
mod txn_core;
mod undo;

use dispatch::server_status;
use iterators::Iterators;
use txn::TxnShell;

/// How long a new connection may take to answer the protocol handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long queued output may take to drain when a session ends.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a compressed client stream decompressed before its messages are run: what a
/// few bytes of a hostile stream can make the server hold beyond the frame limit.
const INFLATE_STEP: usize = 256 * 1024;

/// Serves one connection; `encrypted` when it came through TLS (zstd is then neither
/// offered nor accepted: compressing before encrypting lets whoever can put bytes in the
/// stream and watch its length learn what else it holds).
pub(crate) async fn run<S>(stream: S, peer: String, shared: Arc<Shared>, encrypted: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let server_encoding = shared.config.encoding;
    if wr
        .write_all(&frame::frame(server_encoding.server_hello()))
        .await
        .is_err()
    {
        return;
    }
    // Small to start with: a thousand idle connections must not cost a thousand large
    // buffers; a client sending big records makes its own buffer grow.
    let mut buf = BytesMut::with_capacity(4 * 1024);
    let hello = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        zeo_proto::io::read_frame(&mut rd, &mut buf, 64),
    )
    .await
    {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "connection lost during handshake");
            return;
        }
        Err(_) => {
            info!(%peer, "no handshake within {HANDSHAKE_TIMEOUT:?}, closing");
            return;
        }
    };
    let encoding = match message::parse_client_hello(&hello) {
        Ok(ClientHello::Protocol(e)) => e,
        Ok(ClientHello::Ruok) => {
            let status = Value::Dict(
                shared
                    .storages
                    .values()
                    .map(|h| (Value::Str(h.name.clone()), server_status(h, &shared)))
                    .collect(),
            );
            let _ = wr
                .write_all(&frame::frame(stats::to_json(&status).as_bytes()))
                .await;
            let _ = wr.shutdown().await;
            return;
        }
        Err(e) => {
            warn!(%peer, error = %e, "bad handshake, closing");
            return;
        }
    };

    let wire = Wire::new(Box::new(wr), shared.metrics.clone());
    let (outbox, rx, queued) = Outbox::new(
        encoding,
        shared.config.max_queued_bytes,
        shared.budget.clone(),
        Some(wire.clone()),
    );
    let outbox = Arc::new(outbox);
    let mut writer = tokio::spawn(write_loop(wire, rx, queued, Arc::downgrade(&outbox)));
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    debug!(session = id, %peer, ?encoding, "connected");
    let txn = TxnShell::new(&shared.config);
    let iterators = Iterators::new(shared.config.max_iterators, shared.metrics.clone());
    let mut session = Session {
        id,
        peer,
        shared,
        outbox,
        encoding,
        label: String::new(),
        registered: None,
        txn,
        pending: FuturesUnordered::new(),
        limits: Limits::default(),
        iterators: Arc::new(parking_lot::Mutex::new(iterators)),
        upload: None,
        inflate: None,
        inflate_from_here: false,
        encrypted,
    };
    // A panic while serving (a bug: none is known to be reachable from the network) is
    // confined to this connection. Tokio would contain it to this task anyway, but the
    // session must still be cleaned up: without that, a transaction it had voted would
    // stay staged in the storage and wedge every later commit, and the hub would keep
    // queueing invalidations for it.
    let reason = match AssertUnwindSafe(session.serve(&mut rd, buf))
        .catch_unwind()
        .await
    {
        Ok(reason) => reason,
        Err(panic) => Close::Panic(panic_message(panic.as_ref())),
    };
    session.cleanup(&reason).await;
    drop(session);
    // The writer ends when every handle on the outbox is gone and the queue is drained.
    if tokio::time::timeout(FLUSH_TIMEOUT, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Why a session ended.
enum Close {
    PeerClosed,
    Io(std::io::Error),
    Protocol(String),
    Shutdown,
    Stuck,
    Timeout,
    /// Nothing received or sent for the idle timeout.
    Idle,
    /// Serving the connection panicked (the message).
    Panic(String),
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Close::PeerClosed => f.write_str("closed by the client"),
            Close::Io(e) => write!(f, "I/O error: {e}"),
            Close::Protocol(why) => write!(f, "protocol error: {why}"),
            Close::Shutdown => f.write_str("server shutting down"),
            Close::Stuck => f.write_str("client not reading"),
            Close::Timeout => f.write_str("transaction timeout"),
            Close::Idle => f.write_str("idle timeout (nothing received or sent)"),
            Close::Panic(what) => write!(f, "internal error (panic: {what})"),
        }
    }
}

struct Registered {
    handle: Arc<StorageHandle>,
    read_only: bool,
}

struct Session {
    id: SessionId,
    peer: String,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    encoding: Encoding,
    label: String,
    registered: Option<Registered>,
    txn: TxnShell,
    /// Requests in progress (loads and other reads).
    pending: FuturesUnordered<BoxFuture<'static, ()>>,
    limits: Limits,
    /// This connection's transaction and record iterators (`iterator_start`…).
    iterators: Arc<parking_lot::Mutex<Iterators>>,
    /// A blob upload between `storeBlobStart` and `storeBlobEnd`.
    upload: Option<blobs::Upload>,
    /// The client's stream is compressed (it sent `zeors_compress`): what is read goes
    /// through this before the frames are looked for.
    inflate: Option<zeo_proto::compress::Decompressor>,
    /// Set by `zeors_compress`: the bytes after its frame are compressed.
    inflate_from_here: bool,
    /// The connection is TLS: no compression (see [`run`]).
    encrypted: bool,
}

enum Event {
    Shutdown,
    Trouble,
    RequestDone,
    /// The budget let this connection go on (it was paused).
    Unpaused,
    /// The idle deadline passed.
    IdleCheck,
    Txn(txn::TxnWait),
    Read(std::io::Result<usize>),
}

impl Session {
    pub(super) async fn serve<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        mut buf: BytesMut,
    ) -> Close {
        let mut shutdown = self.shared.shutdown.clone();
        if *shutdown.borrow() {
            return Close::Shutdown;
        }
        let max_frame = self.shared.config.max_message_size;
        // The client pipelines its first requests behind the handshake.
        if let Err(close) = self.handle_buffered(&mut buf, max_frame).await {
            return close;
        }
        // Made once, not on every turn of the loop: each new one would register (and drop
        // one unregister) a waiter under a lock, for every request. Both end the session
        // when they fire, so neither is polled after completing.
        let outbox = self.outbox.clone();
        let trouble = outbox.trouble.notified();
        tokio::pin!(trouble);
        let shutdown_changed = shutdown.changed();
        tokio::pin!(shutdown_changed);
        let idle_timeout = self.shared.config.idle_timeout;
        let idle = tokio::time::sleep(idle_timeout.unwrap_or(Duration::MAX / 4));
        tokio::pin!(idle);
        let budget = self.shared.budget.clone();
        let mut paused = Paused::new(&budget);
        let mut last_read = std::time::Instant::now();
        // What is read of a compressed stream, before it is decompressed into `buf`.
        let mut raw = BytesMut::new();
        loop {
            paused.set(self.outbox.over_budget());
            let can_read = self.pending.len() < self.shared.config.max_pipelined && !paused.is();
            if can_read && self.inflate.as_ref().is_some_and(|d| d.has_more()) {
                // Decompressed requests left over from the last read, held back while
                // the client had enough in flight.
                if let Err(close) = self.handle_buffered(&mut buf, max_frame).await {
                    return close;
                }
                continue;
            }
            let into = if self.inflate.is_some() {
                if raw.capacity() == 0 {
                    raw.reserve(16 * 1024);
                }
                &mut raw
            } else {
                &mut buf
            };
            let event = tokio::select! {
                _ = &mut shutdown_changed => Event::Shutdown,
                _ = &mut trouble => Event::Trouble,
                Some(()) = self.pending.next(), if !self.pending.is_empty() => Event::RequestDone,
                ev = self.txn.next_event() => Event::Txn(ev),
                r = rd.read_buf(into), if can_read => Event::Read(r),
                _ = outbox.admit(), if paused.is() => Event::Unpaused,
                _ = &mut idle, if idle_timeout.is_some() => Event::IdleCheck,
            };
            match event {
                Event::Shutdown => return Close::Shutdown,
                Event::Unpaused => {}
                Event::IdleCheck => {
                    // Idle: nothing read from the client and nothing written to it for the
                    // whole timeout (a client that does not read its replies is idle too),
                    // and no vote or finish of its own running.
                    let timeout = idle_timeout.unwrap_or_default();
                    let active = last_read.max(self.outbox.last_written());
                    if active.elapsed() >= timeout && !self.txn.in_progress() {
                        info!(session = self.id, peer = %self.peer,
                              "nothing received or sent for {timeout:?}; closing the connection");
                        self.shared
                            .metrics
                            .idle_closed
                            .fetch_add(1, Ordering::Relaxed);
                        return Close::Idle;
                    }
                    let next = if active.elapsed() >= timeout {
                        tokio::time::Instant::now()
                    } else {
                        active.into()
                    };
                    idle.as_mut().reset(next + timeout);
                }
                Event::Trouble => {
                    if self.outbox.is_overflowed() {
                        warn!(session = self.id, peer = %self.peer, queued = self.outbox.queued_bytes(),
                              "client is not reading its replies; disconnecting it");
                        return Close::Stuck;
                    }
                    return Close::PeerClosed;
                }
                Event::RequestDone => {}
                Event::Txn(ev) => {
                    let Some(reg) = &self.registered else {
                        continue;
                    };
                    let ctx = txn_ctx!(self, &reg.handle);
                    if let Err(close) = self.txn.on_wait(&ctx, ev).await {
                        return close;
                    }
                }
                Event::Read(Ok(0)) => return Close::PeerClosed,
                Event::Read(Err(e)) => return Close::Io(e),
                Event::Read(Ok(n)) => {
                    self.shared
                        .metrics
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                    last_read = std::time::Instant::now();
                    if let Some(d) = &mut self.inflate {
                        d.push(&raw);
                        raw.clear();
                    }
                    if let Err(close) = self.handle_buffered(&mut buf, max_frame).await {
                        return close;
                    }
                }
            }
        }
    }

    /// Runs every complete message in `buf`, and with a compressed stream the messages of
    /// what the decompressor holds, [`INFLATE_STEP`] bytes at a time, as long as the
    /// client may have more requests in flight and its replies fit the budget: a few
    /// compressed bytes can stand for any number of requests, which must meet the same
    /// limits as those read plain (the loop resumes on [`Decompressor::has_more`]).
    ///
    /// [`Decompressor::has_more`]: zeo_proto::compress::Decompressor::has_more
    pub(super) async fn handle_buffered(
        &mut self,
        buf: &mut BytesMut,
        max_frame: usize,
    ) -> Result<(), Close> {
        if self.inflate.is_none() {
            self.handle_frames(buf, max_frame).await?;
            if !std::mem::take(&mut self.inflate_from_here) {
                return Ok(());
            }
            // `zeors_compress`: what follows its frame is compressed.
            let rest = buf.split();
            buf.reserve(INFLATE_STEP);
            let mut d = zeo_proto::compress::Decompressor::new().map_err(Close::Io)?;
            d.push(&rest);
            self.inflate = Some(d);
        }
        loop {
            let Some(d) = &mut self.inflate else {
                return Ok(());
            };
            if self.pending.len() >= self.shared.config.max_pipelined || self.outbox.over_budget() {
                return Ok(());
            }
            match d.pull(buf, INFLATE_STEP) {
                Ok(0) => return Ok(()),
                Ok(_) => self.handle_frames(buf, max_frame).await?,
                Err(e) => {
                    warn!(session = self.id, peer = %self.peer, error = %e, "undecodable compressed stream, closing");
                    return Err(Close::Protocol(format!("compressed stream: {e}")));
                }
            }
        }
    }

    /// Runs every complete message in `buf`, up to a `zeors_compress` (the bytes after it
    /// are compressed, see [`Session::handle_buffered`]).
    async fn handle_frames(&mut self, buf: &mut BytesMut, max_frame: usize) -> Result<(), Close> {
        loop {
            match frame::decode_frame(buf, max_frame) {
                Ok(Some(payload)) => {
                    self.handle_frame(&payload).await?;
                    if self.inflate_from_here {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    warn!(session = self.id, peer = %self.peer, error = %e, "bad frame, closing");
                    return Err(Close::Protocol(e.to_string()));
                }
            }
        }
    }

    /// Ends the session: stop receiving invalidations, abort what the client left
    /// unfinished and wait for a finish in progress.
    pub(super) async fn cleanup(&mut self, reason: &Close) {
        match reason {
            Close::PeerClosed | Close::Shutdown => {
                debug!(session = self.id, peer = %self.peer, %reason, "disconnected")
            }
            Close::Panic(_) => {
                tracing::error!(session = self.id, peer = %self.peer, label = %self.label, %reason,
                                "closing connection; aborting its transaction")
            }
            // The stock server logs this as CRITICAL: a client held the commit lock too long.
            Close::Timeout => {
                tracing::warn!(session = self.id, peer = %self.peer, label = %self.label, %reason,
                               "closing connection; aborting its transaction")
            }
            _ => {
                info!(session = self.id, peer = %self.peer, label = %self.label, %reason, "closing connection")
            }
        }
        let Some(reg) = &self.registered else { return };
        reg.handle.hub.unregister(self.id);
        // An unfinished blob upload belongs to the transaction: its file goes too.
        self.upload = None;
        let ctx = txn_ctx!(self, &reg.handle);
        self.txn.disconnected(&ctx).await;
    }

    /// Runs a request as a future of the session, once the server-wide output budget
    /// admits it (see [`Outbox::admit`]): it may queue a reply of any size.
    pub(super) fn push_request<F>(&mut self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let outbox = self.outbox.clone();
        self.pending.push(Box::pin(async move {
            outbox.admit().await;
            fut.await
        }));
    }

    pub(super) fn spawn_call<F>(&mut self, msgid: Value, fut: F)
    where
        F: Future<Output = zodb::Result<Value>> + Send + 'static,
    {
        let outbox = self.outbox.clone();
        self.push_request(async move {
            match fut.await {
                Ok(v) => outbox.send(message::reply_frame(outbox.encoding, &msgid, v)),
                Err(e) => send_error(&outbox, &msgid, &e),
            }
        });
    }

    pub(super) fn reply(&self, msgid: &Value, v: Value) {
        self.outbox
            .send(message::reply_frame(self.encoding, msgid, v));
    }

    pub(super) fn reply_error(&self, msgid: &Value, e: &StorageError) {
        send_error(&self.outbox, msgid, e);
    }

    pub(super) fn reply_protocol_error(&self, msgid: &Value, e: &ProtocolError) {
        send_protocol_error(&self.outbox, msgid, e);
    }
}

fn send_protocol_error(outbox: &Outbox, msgid: &Value, e: &ProtocolError) {
    let (class, payload) = exception::exception_for_protocol(e);
    outbox.send(message::exception_frame(
        outbox.encoding,
        msgid,
        &class,
        payload,
    ));
}

fn send_error(outbox: &Outbox, msgid: &Value, e: &StorageError) {
    if e.is_expected() {
        debug!(error = %e, "error reply");
    } else {
        warn!(error = %e, "error reply");
    }
    let (class, payload) = exception::exception_for(e);
    outbox.send(message::exception_frame(
        outbox.encoding,
        msgid,
        &class,
        payload,
    ));
}

/// Whether the session is paused by the server-wide budget, kept in the budget's gauge
/// (and given back when the session ends).
struct Paused<'a> {
    budget: &'a crate::outbox::QueueBudget,
    on: bool,
}

impl<'a> Paused<'a> {
    fn new(budget: &'a crate::outbox::QueueBudget) -> Self {
        Paused { budget, on: false }
    }

    fn is(&self) -> bool {
        self.on
    }

    fn set(&mut self, on: bool) {
        if on == self.on {
            return;
        }
        self.on = on;
        if on {
            self.budget.paused.fetch_add(1, Ordering::Relaxed);
            self.budget.pauses.fetch_add(1, Ordering::Relaxed);
        } else {
            self.budget.paused.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}
