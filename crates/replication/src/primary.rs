//! The primary's side: accepts replicas and feeds each from the Data.fs.
//!
//! Invariants:
//! - A replica is fed the transactions after the tid it names, in file order, each
//!   complete (`T`, records, `C`) and only once committed (a feeder reads through a
//!   [`filestorage::view::FileView`], which ends at the last published transaction).
//! - A replica whose history is not this node's is refused before anything is sent:
//!   in the zeors dialect by the fingerprints of its recent transactions (the refusal
//!   names its transactions this node lacks); in zc.zrs's dialect when its last tid is
//!   not in this Data.fs (zc.zrs itself would silently stream from the next tid).
//! - Each replica has its own feeder thread that reads the file (blocking I/O, like
//!   zc.zrs's producer threads) and a bounded queue to the connection's writer, so a
//!   slow replica slows only its own feeder and memory stays bounded.
//! - At close, feeders send what is committed, then stop (zc.zrs's "catch up then
//!   stop"), giving replicas the last transactions before the primary goes away.

use crate::codec::{
    self, Dialect, Heartbeat, Opening, OpeningDecoder, PrimaryHello, Protocol, RecordHeader,
    StreamEncoder, TxnHeader, BLOB_BLOCK_SIZE, MAX_REPLICA_MESSAGE,
};
use crate::compress::{self, Compressor};
use crate::fingerprint::{self, Verdict};
use crate::net::{Listener, Stream};
use crate::node::Node;
use bytes::Bytes;
use filestorage::format::{status, FIRST_TXN_POS};
use filestorage::iter::RecordIter;
use filestorage::FileStorageCore;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};
use zodb::{StorageError, Tid};

/// How long a replica has to send its opening.
const OPENING_TIMEOUT: Duration = Duration::from_secs(60);
/// Messages queued between a feeder and its connection.
const QUEUE: usize = 256;
/// How often an idle feeder checks whether its replica or the node went away.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// Heartbeats while catching up a replica (zeors dialect).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("{0}")]
    Codec(#[from] codec::CodecError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("the replica sent no opening within {0:?}")]
    Timeout(Duration),
    #[error("the replica closed the connection during its opening")]
    Closed,
    #[error("{0}")]
    Refused(String),
}

/// Accepts replicas on `listener` until the node closes.
pub fn spawn(node: Arc<Node>, listener: Listener) {
    info!(address = %listener.local(), "accepting replicas");
    let n = node.clone();
    let task = tokio::spawn(async move {
        let mut closing = n.closing_rx();
        loop {
            let stream = tokio::select! {
                r = listener.accept() => r,
                _ = closing.wait_for(|c| *c) => return,
            };
            match stream {
                Ok(s) => {
                    let node = n.clone();
                    let peer = s.peer();
                    let task = tokio::spawn(async move {
                        node.stats().replicas.fetch_add(1, Ordering::Relaxed);
                        match feed(&node, s, &peer).await {
                            Ok(()) => info!(%peer, "replica disconnected"),
                            Err(e) => error!(%peer, error = %e, "replica connection ended"),
                        }
                        node.stats().replicas.fetch_sub(1, Ordering::Relaxed);
                    });
                    n.tasks.lock().push(task);
                }
                Err(e) => {
                    warn!(error = %e, "accepting a replica failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    node.tasks.lock().push(task);
}

async fn read_opening(
    rd: &mut (impl AsyncReadExt + Unpin),
    framer: &mut codec::Framer,
) -> Result<Opening, FeedError> {
    let mut dec = OpeningDecoder::new();
    loop {
        while let Some(m) = framer.next_message()? {
            if let Some(o) = dec.message(&m)? {
                return Ok(o);
            }
        }
        if rd.read_buf(framer.buffer()).await? == 0 {
            return Err(FeedError::Closed);
        }
    }
}

/// Serves one replica until it or the node goes away.
async fn feed(node: &Arc<Node>, stream: Stream, peer: &str) -> Result<(), FeedError> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut framer = codec::Framer::new(MAX_REPLICA_MESSAGE);
    let opening = tokio::time::timeout(OPENING_TIMEOUT, read_opening(&mut rd, &mut framer))
        .await
        .map_err(|_| FeedError::Timeout(OPENING_TIMEOUT))??;
    let core = node.file_storage().core().clone();
    let (protocol, dialect, start) = match &opening {
        Opening::Stock { protocol, last } => (*protocol, Dialect::Stock, *last),
        Opening::Zeors { protocol, hello } => (*protocol, Dialect::Zeors, hello.last),
    };
    info!(%peer, protocol = protocol.name(), ?dialect, start = %start, "replica connected");
    if protocol == Protocol::V20 && node.has_blobs() {
        let message =
            "Invalid protocol zrs2.0: this storage has blobs, the replica must speak zrs2.1 (give it a blob directory)"
                .to_string();
        if dialect == Dialect::Zeors {
            let reply = PrimaryHello::Refused {
                message: message.clone(),
            };
            wr.write_all(&codec::sized(&reply.encode())).await?;
        }
        return Err(FeedError::Refused(message));
    }
    let mut compressor = None;
    match &opening {
        Opening::Stock { last, .. } => {
            let last = *last;
            let c = core.clone();
            let found = tokio::task::spawn_blocking(move || {
                c.view()
                    .find_txn(last)
                    .map(|t| t.is_some())
                    .map_err(|e| StorageError::Corrupted(format!("{}: {e}", c.name())))
            })
            .await
            .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))??;
            if last != Tid::ZERO && !found {
                let ours = core.last_transaction();
                return Err(FeedError::Refused(if last > ours {
                    format!(
                        "the replica's last transaction {last} is later than this storage's last, {ours}: it has transactions this primary lacks"
                    )
                } else {
                    format!(
                        "the replica's last transaction {last} is not in this storage: its history diverged from this primary's"
                    )
                }));
            }
        }
        Opening::Zeors { hello, .. } => {
            let c = core.clone();
            let recent = hello.recent.clone();
            let verdict = tokio::task::spawn_blocking(move || fingerprint::check(&c, &recent))
                .await
                .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))??;
            if let Verdict::Diverged { diverged, common } = verdict {
                let message = format!(
                    "the replica holds {}{} transaction(s) this primary does not: {}{}",
                    diverged.len(),
                    if common.is_none() { " or more" } else { "" },
                    diverged
                        .iter()
                        .take(10)
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    match common {
                        Some(c) => format!(" (the last transaction both hold is {c})"),
                        None => String::new(),
                    }
                );
                let reply = PrimaryHello::Diverged {
                    message: message.clone(),
                    diverged,
                    common,
                };
                wr.write_all(&codec::sized(&reply.encode())).await?;
                return Err(FeedError::Refused(message));
            }
            let zstd = hello.compression.iter().any(|c| c == compress::ZSTD);
            let reply = PrimaryHello::Ok {
                compression: zstd.then(|| compress::ZSTD.to_string()),
                last_tid: core.last_transaction(),
            };
            wr.write_all(&codec::sized(&reply.encode())).await?;
            if zstd {
                compressor = Some(Compressor::new()?);
            }
        }
    }

    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let feeder = {
        let node = node.clone();
        let peer = peer.to_string();
        std::thread::Builder::new()
            .name("zrs-feeder".into())
            .spawn(move || {
                let r = produce(&node, &core, start, dialect, &tx);
                if let Err(e) = &r {
                    error!(%peer, error = %e, "feeding the replica failed");
                }
            })?
    };
    let stats = node.clone();
    let writer = async move {
        while let Some(first) = rx.recv().await {
            let mut raw = first.len();
            let mut out = Vec::with_capacity(first.len());
            match &mut compressor {
                Some(c) => c.write(&first)?,
                None => out.extend_from_slice(&first),
            }
            while out.len() < 1 << 20 {
                match rx.try_recv() {
                    Ok(m) => {
                        raw += m.len();
                        match &mut compressor {
                            Some(c) => c.write(&m)?,
                            None => out.extend_from_slice(&m),
                        }
                    }
                    Err(_) => break,
                }
            }
            if let Some(c) = &mut compressor {
                out = c.flush()?;
            }
            wr.write_all(&out).await?;
            let s = stats.stats();
            s.bytes_out.fetch_add(out.len() as u64, Ordering::Relaxed);
            s.bytes_out_raw.fetch_add(raw as u64, Ordering::Relaxed);
        }
        wr.shutdown().await?;
        Ok::<(), std::io::Error>(())
    };
    // The replica sends only keep-alives from now on.
    let reader = async move {
        loop {
            while let Some(m) = framer.next_message()? {
                if !m.is_empty() {
                    return Err(codec::CodecError::TooManyMessages.into());
                }
                debug!("keep-alive");
            }
            if rd.read_buf(framer.buffer()).await? == 0 {
                return Ok::<(), FeedError>(());
            }
        }
    };
    let result = tokio::select! {
        r = writer => r.map_err(FeedError::from),
        r = reader => r,
    };
    // Dropping the queue's receiver (with the writer) ends the feeder.
    node.signal.poke();
    let _ = tokio::task::spawn_blocking(move || feeder.join()).await;
    result
}

/// Counts the transactions after `after` in the committed file (headers only).
fn count_after(core: &FileStorageCore, after: Tid) -> Result<u64, StorageError> {
    let view = core.view();
    let mut end = view.end();
    let mut n = 0;
    while end > FIRST_TXN_POS {
        let t = view
            .txn_before(end)
            .map_err(|e| StorageError::Corrupted(format!("{}: {e}", core.name())))?;
        if t.header.tid <= after {
            break;
        }
        n += 1;
        end = t.pos;
    }
    Ok(n)
}

/// The feeder thread: streams transactions after `start`, then follows new commits,
/// until the replica goes away or the node closes (after sending what is committed).
fn produce(
    node: &Node,
    core: &FileStorageCore,
    start: Tid,
    dialect: Dialect,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), FeedError> {
    let send = |b: Bytes| tx.blocking_send(b).map_err(|_| FeedError::Closed);
    let corrupted =
        |e: filestorage::Error| StorageError::Corrupted(format!("{}: {e}", core.name()));
    let mut enc = StreamEncoder::new(start, dialect);
    let mut last = start;
    let mut block = vec![0u8; BLOB_BLOCK_SIZE];
    let mut beat = Instant::now() - HEARTBEAT_EVERY;
    loop {
        let mut it = core.iterator(Some(Tid(last.0 + 1)), None)?;
        let mut pending = if dialect == Dialect::Zeors {
            count_after(core, last)?
        } else {
            0
        };
        // Heartbeats tell a catching-up replica how far it has to go; a replica that
        // follows commit by commit counts them down itself.
        if pending > 1 || beat.elapsed() >= HEARTBEAT_EVERY {
            beat = Instant::now();
            if let Some(hb) = enc.heartbeat(Heartbeat {
                last_tid: core.last_transaction(),
                pending,
            }) {
                send(hb)?;
            }
        }
        while let Some((at, info)) = it.next_txn().map_err(corrupted)? {
            pending = pending.saturating_sub(1);
            last = info.tid;
            if info.status == status::UNDONE {
                continue;
            }
            send(enc.transaction(&TxnHeader {
                tid: info.tid,
                status: info.status,
                user: info.user,
                description: info.description,
                extension: info.extension,
            }))?;
            let mut records = RecordIter::new(it.view().clone(), at);
            while let Some(r) = records.next_record().map_err(corrupted)? {
                let header = RecordHeader {
                    oid: r.oid,
                    serial: r.tid,
                    data_txn: r.data_txn,
                };
                let blob = match &r.data {
                    Some(d) if core.blob_dir().is_some() && zodb::blob::is_blob_record(d) => {
                        match core.open_blob(r.oid, r.tid) {
                            Ok(f) => Some(f),
                            Err(StorageError::PosKey(_)) => None,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    _ => None,
                };
                match (blob, &r.data) {
                    (Some(mut f), Some(data)) => {
                        let size = f.metadata()?.len();
                        let blocks = size.div_ceil(BLOB_BLOCK_SIZE as u64);
                        for m in enc.blob_record(&header, data, blocks) {
                            send(m)?;
                        }
                        let mut left = size;
                        while left > 0 {
                            let n = (left as usize).min(BLOB_BLOCK_SIZE);
                            f.read_exact(&mut block[..n])?;
                            send(enc.blob_block(&block[..n]))?;
                            left -= n as u64;
                        }
                    }
                    _ => {
                        for m in enc.record(&header, r.data.as_deref()) {
                            send(m)?;
                        }
                    }
                }
            }
            send(enc.checksum())?;
            if beat.elapsed() >= HEARTBEAT_EVERY {
                beat = Instant::now();
                if let Some(hb) = enc.heartbeat(Heartbeat {
                    last_tid: core.last_transaction(),
                    pending,
                }) {
                    send(hb)?;
                }
            }
        }
        // Caught up with the file as of the iterator: wait for the next commit.
        loop {
            if core.last_transaction() > last {
                break;
            }
            if node.is_closing() || tx.is_closed() {
                return Ok(());
            }
            node.signal.wait_blocking(last, IDLE_CHECK);
        }
    }
}
