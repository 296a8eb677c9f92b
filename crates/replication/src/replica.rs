//! The replica's side: follows a primary and applies its transactions.
//!
//! Invariants:
//! - The replica asks for the transactions after its own last one, so after a crash or
//!   a cut link it resumes exactly where its Data.fs ends: a transaction is either
//!   applied and durable (vote and finish with fsyncs) or not in the file at all.
//! - A transaction is applied only once its `C` message arrived and the stream's
//!   checksum matched; a transaction cut off by a disconnection is dropped (its blob
//!   files removed) and comes again after the reconnect.
//! - Nothing is applied from a primary that refused our history (divergence): the
//!   replica keeps serving what it has, says why in its logs and status, and retries.
//! - With zeors primaries the replica speaks the zeors dialect (hellos, fingerprints,
//!   heartbeats, zstd); a primary that closes the connection on that opening is a stock
//!   zc.zrs primary, and the replica speaks zc.zrs's protocol to it from then on.

use crate::codec::{
    self, CodecError, Dialect, Event, Framer, PrimaryHello, Protocol, ReplicaHello, StreamDecoder,
    MAX_MESSAGE,
};
use crate::compress::{self, Decompressor};
use crate::fingerprint;
use crate::net::Stream;
use crate::node::{Incoming, LinkState, Node};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{error, info, warn};
use zodb::{Oid, StorageError, Tid, TransactionMeta, TxnOp};

/// Transactions of the replica's own history it names to a zeors primary.
const RECENT: usize = 16;
/// How often progress is logged while catching up.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Bytes of the primary's compressed stream decompressed before their messages are
/// applied.
const INFLATE_STEP: usize = 256 * 1024;

/// How a replica follows its primary.
#[derive(Debug, Clone)]
pub struct FollowConfig {
    /// The primary's replication address (its `replicate-to`).
    pub source: String,
    /// Send a keep-alive this often (zc.zrs's `keep-alive-delay`; `None`: never).
    pub keep_alive: Option<Duration>,
    /// Ask a zeors primary for zstd.
    pub compress: bool,
    /// Speak zc.zrs's plain protocol from the start (no zeors dialect).
    pub stock_only: bool,
    /// Delay before reconnecting, doubled after each failure up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl FollowConfig {
    pub fn new(source: impl Into<String>) -> FollowConfig {
        FollowConfig {
            source: source.into(),
            keep_alive: None,
            compress: true,
            stock_only: false,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("applying a transaction failed: {0}")]
    Storage(#[from] StorageError),
    /// The primary closed the connection at our zeors opening: a stock zc.zrs primary.
    #[error("the primary closed the connection at the zeors opening")]
    NotZeors,
    #[error("the primary refuses this replica's history: {0}")]
    Diverged(String),
    #[error("the primary refused the replica: {0}")]
    Refused(String),
    #[error("the primary closed the connection")]
    Closed,
    #[error(
        "the primary closed the connection without sending anything: it may not hold this \
         replica's last transaction {0} (a diverged history), or it refused the protocol; \
         see the primary's log"
    )]
    ClosedAtOnce(Tid),
}

/// Starts following the primary.
pub fn spawn(node: Arc<Node>, config: FollowConfig) {
    let n = node.clone();
    let task = tokio::spawn(async move { run(n, config).await });
    *node.follower.lock() = Some(task);
}

/// Waits until the follower has stopped (after [`Node::promote`] or close asked it to).
pub(crate) async fn wait_stopped(node: &Node) {
    let task = node.follower.lock().take();
    if let Some(t) = task {
        let _ = t.await;
    }
}

async fn run(node: Arc<Node>, config: FollowConfig) {
    let mut stop = node.stop_follow.subscribe();
    let mut stock = config.stock_only;
    let mut delay = config.retry_min;
    let mut connections = 0u64;
    info!(source = %config.source, "following the primary");
    loop {
        if *stop.borrow() {
            return;
        }
        node.stats().set_link(LinkState::Connecting);
        let dialect = if stock {
            Dialect::Stock
        } else {
            Dialect::Zeors
        };
        let started = Instant::now();
        let result = session(&node, &config, dialect, &mut connections, &mut stop).await;
        match result {
            Ok(()) => return,
            Err(FollowError::NotZeors) if !stock => {
                info!(source = %config.source, "the primary speaks zc.zrs's protocol only; using it");
                stock = true;
                continue;
            }
            Err(FollowError::Diverged(msg)) => {
                error!(source = %config.source, "the primary refuses this replica's history: {msg}; nothing is applied, the replica keeps its own data");
                node.stats().set_link(LinkState::Diverged);
                *node.stats().last_error.lock() = Some(msg);
                delay = config.retry_max;
            }
            Err(e) => {
                if matches!(e, FollowError::Refused(_) | FollowError::ClosedAtOnce(_)) {
                    error!(source = %config.source, error = %e, "replication refused");
                    *node.stats().last_error.lock() = Some(e.to_string());
                } else if connections > 0 {
                    warn!(source = %config.source, error = %e, "replication link lost; reconnecting");
                }
                node.stats().set_link(LinkState::Connecting);
                if started.elapsed() > Duration::from_secs(5) {
                    delay = config.retry_min;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        delay = (delay * 2).min(config.retry_max);
    }
}

/// A transaction being received.
struct Pending {
    meta: TransactionMeta,
    ops: Vec<TxnOp>,
    blobs: Vec<(Oid, PathBuf)>,
    /// The blob file being received: its oid, file, path and blocks still to come.
    blob: Option<(Oid, std::fs::File, PathBuf, u64)>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        for (_, p) in &self.blobs {
            let _ = std::fs::remove_file(p);
        }
        if let Some((_, _, p, _)) = &self.blob {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn temp_blob(node: &Node) -> Result<(std::fs::File, PathBuf), FollowError> {
    let dir = node
        .file_storage()
        .core()
        .blob_dir()
        .ok_or(StorageError::Unsupported("blobs"))?;
    let path = dir.new_temp_path("replica");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((f, path))
}

/// One connection to the primary. `Ok` only when asked to stop.
async fn session(
    node: &Arc<Node>,
    config: &FollowConfig,
    dialect: Dialect,
    connections: &mut u64,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), FollowError> {
    let stream = tokio::select! {
        s = Stream::connect(&config.source) => s?,
        _ = stop.wait_for(|s| *s) => return Ok(()),
    };
    *connections += 1;
    if *connections > 1 {
        node.stats().reconnects.fetch_add(1, Ordering::Relaxed);
    }
    let stats = node.stats();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let protocol = if node.has_blobs() {
        Protocol::V21
    } else {
        Protocol::V20
    };
    let last = node.file_storage().core().last_transaction();
    let hello = match dialect {
        Dialect::Stock => None,
        Dialect::Zeors => {
            let core = node.file_storage().core().clone();
            let recent = tokio::task::spawn_blocking(move || fingerprint::recent(&core, RECENT))
                .await
                .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))??;
            Some(ReplicaHello {
                last,
                recent,
                compression: if config.compress {
                    vec![compress::ZSTD.to_string()]
                } else {
                    Vec::new()
                },
            })
        }
    };
    for m in codec::opening(protocol, dialect, last, hello.as_ref()) {
        wr.write_all(&m).await?;
    }
    // Keep-alives, as zc.zrs's secondary sends them.
    let keep_alive = config.keep_alive.map(|every| {
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.tick().await;
            loop {
                t.tick().await;
                if wr.write_all(&codec::keep_alive()).await.is_err() {
                    return;
                }
            }
        })
    });
    let _abort_keep_alive = AbortOnDrop(keep_alive);

    let mut framer = Framer::new(MAX_MESSAGE);
    let mut decompressor: Option<Decompressor> = None;
    if dialect == Dialect::Zeors {
        let reply = loop {
            if let Some(m) = framer.next_message()? {
                break m;
            }
            let n = tokio::select! {
                n = rd.read_buf(framer.buffer()) => n?,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            if n == 0 {
                return Err(FollowError::NotZeors);
            }
            stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        };
        match PrimaryHello::decode(&reply)? {
            PrimaryHello::Ok {
                compression,
                last_tid,
            } => {
                stats.primary_last.store(last_tid.0, Ordering::Relaxed);
                if compression.as_deref() == Some(compress::ZSTD) {
                    let mut d = Decompressor::new()?;
                    // Whatever followed the hello in the same read is compressed.
                    let rest = framer.buffer().split();
                    d.push(&rest);
                    decompressor = Some(d);
                }
            }
            PrimaryHello::Diverged {
                message,
                diverged,
                common,
            } => {
                let tids: Vec<String> = diverged.iter().map(Tid::to_string).collect();
                return Err(FollowError::Diverged(format!(
                    "{message} [diverging tids: {}; last common: {}]",
                    tids.join(", "),
                    common.map_or("unknown".to_string(), |c| c.to_string())
                )));
            }
            PrimaryHello::Refused { message } => return Err(FollowError::Refused(message)),
        }
    }
    info!(source = %config.source, ?dialect, last = %last, "connected to the primary");
    *stats.last_error.lock() = None;
    stats.set_link(if stats.pending.load(Ordering::Relaxed) > 0 {
        LinkState::CatchingUp
    } else {
        LinkState::Following
    });

    let mut dec = StreamDecoder::new(last, dialect);
    let mut pending: Option<Pending> = None;
    let mut progress = Instant::now();
    let mut applied_since = 0u64;
    let mut buf = bytes::BytesMut::with_capacity(1 << 16);
    let mut received = dialect == Dialect::Zeors;
    loop {
        while let Some(msg) = framer.next_message()? {
            stats
                .bytes_in_raw
                .fetch_add(msg.len() as u64 + 4, Ordering::Relaxed);
            match dec.message(msg)? {
                Event::Nothing => {}
                Event::Begin(h) => {
                    pending = Some(Pending {
                        meta: TransactionMeta {
                            user: h.user,
                            description: h.description,
                            extension: h.extension,
                            tid: Some(h.tid),
                            status: h.status,
                        },
                        ops: Vec::new(),
                        blobs: Vec::new(),
                        blob: None,
                    });
                }
                Event::Record { header, data } => {
                    let p = pending.as_mut().expect("the decoder checks the order");
                    p.ops.push(TxnOp::Restore {
                        oid: header.oid,
                        serial: header.serial,
                        data,
                        prev_txn: header.data_txn,
                    });
                }
                Event::BlobRecord {
                    header,
                    data,
                    blocks,
                } => {
                    let p = pending.as_mut().expect("the decoder checks the order");
                    p.ops.push(TxnOp::Restore {
                        oid: header.oid,
                        serial: header.serial,
                        data: Some(data),
                        prev_txn: header.data_txn,
                    });
                    let (f, path) = temp_blob(node)?;
                    if blocks == 0 {
                        drop(f);
                        p.blobs.push((header.oid, path));
                    } else {
                        p.blob = Some((header.oid, f, path, blocks));
                    }
                }
                Event::BlobBlock(b) => {
                    let p = pending.as_mut().expect("the decoder checks the order");
                    let (_, f, _, left) = p.blob.as_mut().expect("the decoder checks the order");
                    f.write_all(&b)?;
                    *left -= 1;
                    if *left == 0 {
                        let (oid, _, path, _) = p.blob.take().expect("present");
                        p.blobs.push((oid, path));
                    }
                }
                Event::BlobEnd => {}
                Event::Commit { tid } => {
                    let mut p = pending.take().expect("the decoder checks the order");
                    let incoming = Incoming {
                        meta: std::mem::take(&mut p.meta),
                        ops: std::mem::take(&mut p.ops),
                        blobs: p.blobs.clone(),
                    };
                    // `p` removes the temporary blob files when dropped, applied or not:
                    // the storage keeps links of its own.
                    let applied = node.apply(incoming).await;
                    drop(p);
                    let applied = applied?;
                    debug_assert_eq!(applied, tid);
                    applied_since += 1;
                    let left = stats
                        .pending
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                            Some(p.saturating_sub(1))
                        })
                        .unwrap_or(0)
                        .saturating_sub(1);
                    if left == 0 {
                        stats.set_link(LinkState::Following);
                    }
                    if progress.elapsed() >= PROGRESS_EVERY {
                        if left > 0 {
                            info!(
                                applied = applied_since,
                                pending = left,
                                at = %tid,
                                at_time = %zodb::timestamp::format_tid(tid),
                                "catching up with the primary"
                            );
                        }
                        progress = Instant::now();
                        applied_since = 0;
                    }
                }
                Event::Heartbeat(hb) => {
                    stats.primary_last.store(hb.last_tid.0, Ordering::Relaxed);
                    stats.pending.store(hb.pending, Ordering::Relaxed);
                    stats.set_link(if hb.pending > 0 {
                        LinkState::CatchingUp
                    } else {
                        LinkState::Following
                    });
                }
            }
        }
        // What was received decompressed a step at a time, its messages handled before
        // the next step: a few bytes of zstd can stand for gigabytes.
        if let Some(d) = &mut decompressor {
            if d.pull(framer.buffer(), INFLATE_STEP)? > 0 {
                continue;
            }
        }
        let n = tokio::select! {
            n = rd.read_buf(&mut buf) => n?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        if n == 0 {
            return Err(if received {
                FollowError::Closed
            } else {
                FollowError::ClosedAtOnce(last)
            });
        }
        received = true;
        stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        let chunk = buf.split();
        match &mut decompressor {
            Some(d) => d.push(&chunk),
            None => framer.feed(&chunk),
        }
    }
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}
