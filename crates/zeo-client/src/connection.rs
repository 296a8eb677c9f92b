//! One connection to a ZEO server.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use zeo_proto::reply::{Info, Invalidations, NewOids, ReplyError, SizeInfo};
use zeo_proto::{
    compress, exception, frame, message, Callback, Encoding, Limits, Message, Reply, Request, Value,
};
use zodb::{Loaded, Oid, StorageError, Tid};

/// Where a server listens: `HOST:PORT`, or a unix socket path (contains `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address(pub String);

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Storage name to register with.
    pub storage: String,
    pub read_only: bool,
    /// Time allowed for TCP connect + handshake + register.
    pub connect_timeout: Duration,
    /// Largest reply accepted.
    pub max_message_size: usize,
    /// Where to count the bytes this connection moves (shared across reconnects).
    pub traffic: Option<Arc<Traffic>>,
    /// TLS on TCP addresses (ZEO's client `<ssl>`); `None`: plain TCP.
    pub tls: Option<zeo_tls::ClientTls>,
    /// Compress the connection with zstd if the server offers it (a zeors server; see
    /// `zeo_proto::compress`). Costs a `get_info` round trip at connect. Ignored with
    /// `tls`: compression is never used under encryption.
    pub compress: bool,
}

/// Bytes moved over a link, for monitoring (e.g. a proxy's upstream link).
#[derive(Debug, Default)]
pub struct Traffic {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            storage: "1".into(),
            read_only: false,
            connect_timeout: Duration::from_secs(10),
            max_message_size: zeo_proto::frame::DEFAULT_MAX_FRAME,
            traffic: None,
            tls: None,
            compress: false,
        }
    }
}

/// An exception the server sent back.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteError {
    pub class_path: String,
    pub payload: Value,
}

impl RemoteError {
    /// The storage error it stands for (conflicts, POSKeyError, … keep their meaning).
    pub fn to_storage_error(&self) -> StorageError {
        exception::error_from_exception(&self.class_path, &self.payload)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection to {0} failed: {1}")]
    Connect(Address, std::io::Error),
    #[error("timed out connecting to {0}")]
    ConnectTimeout(Address),
    #[error("bad handshake from {0}: {1:?}")]
    Handshake(Address, String),
    #[error("disconnected")]
    Disconnected,
    #[error("server error {}: {:?}", .0.class_path, .0.payload)]
    Remote(RemoteError),
    #[error("unexpected reply: {0}")]
    UnexpectedReply(#[from] ReplyError),
}

impl From<ClientError> for StorageError {
    fn from(e: ClientError) -> StorageError {
        match e {
            ClientError::Remote(r) => r.to_storage_error(),
            other => StorageError::Disconnected(other.to_string()),
        }
    }
}

/// The answer to a call, before it is read as a typed reply.
#[derive(Debug)]
pub struct RawReply {
    pub result: Result<Value, RemoteError>,
    /// The tid of the last `invalidateTransaction` handled before this reply arrived
    /// (or the tid `register` returned if none): the reply reflects at least that state.
    pub seen: Tid,
}

/// Server-to-client callbacks. Each is awaited before the next message is read, so an
/// implementation sees callbacks and replies in exactly the order the server sent them.
#[async_trait]
pub trait Callbacks: Send + Sync + 'static {
    async fn invalidate_transaction(&self, _tid: Tid, _oids: Vec<Oid>) {}
    async fn info(&self, _info: SizeInfo) {}
    async fn receive_blob_start(&self, _oid: Oid, _serial: Tid) {}
    async fn receive_blob_chunk(&self, _oid: Oid, _serial: Tid, _chunk: Bytes) {}
    async fn receive_blob_stop(&self, _oid: Oid, _serial: Tid) {}
    /// The connection is gone (called once).
    async fn disconnected(&self) {}
}

/// Callbacks that ignore everything.
pub struct NoCallbacks;

#[async_trait]
impl Callbacks for NoCallbacks {}

/// Runs in the connection's reader when a reply arrives, before any later message is
/// handled: the way to act on a reply in exact order with the callbacks around it.
pub type ReplyHook = Box<dyn FnOnce(&Result<Value, RemoteError>) + Send>;

struct Pending {
    tx: oneshot::Sender<RawReply>,
    hook: Option<ReplyHook>,
}

/// Bytes queued for the writer, so that a sender of much data (a blob upload) can wait
/// for the socket instead of queueing it all in memory.
#[derive(Default)]
struct Backlog {
    queued: AtomicUsize,
    drained: Notify,
}

struct Inner {
    address: Address,
    encoding: Encoding,
    out: mpsc::UnboundedSender<Bytes>,
    backlog: Arc<Backlog>,
    calls: Mutex<HashMap<i64, Pending>>,
    next_msgid: AtomicI64,
    closed: AtomicBool,
    closed_tx: watch::Sender<bool>,
    last_invalidation: AtomicU64,
    /// The msgid of our `zeors_compress` call: the server's stream is compressed from the
    /// byte after its reply (0: none).
    inflate_after: AtomicI64,
    /// The connection is compressed both ways.
    compressed: AtomicBool,
}

/// A registered connection. Cheap to clone; all clones share the socket.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
    /// The last tid the server reported at `register`.
    pub registered_tid: Tid,
    /// What `get_info` said at connect, when it was asked then (to negotiate compression).
    pub info_at_connect: Option<Info>,
}

impl Connection {
    /// Connects, performs the handshake and registers with `opts.storage`.
    pub async fn connect(
        address: &Address,
        opts: &ConnectOptions,
        callbacks: Arc<dyn Callbacks>,
    ) -> Result<Connection, ClientError> {
        let fut = async {
            if address.0.contains('/') {
                let s = tokio::net::UnixStream::connect(&address.0)
                    .await
                    .map_err(|e| ClientError::Connect(address.clone(), e))?;
                Self::start(s, address, opts, callbacks).await
            } else {
                let s = tokio::net::TcpStream::connect(&address.0)
                    .await
                    .map_err(|e| ClientError::Connect(address.clone(), e))?;
                let _ = s.set_nodelay(true);
                match &opts.tls {
                    Some(tls) => {
                        let host = address.0.rsplit_once(':').map_or("", |(h, _)| h);
                        let s = tls
                            .connect(host, s)
                            .await
                            .map_err(|e| ClientError::Connect(address.clone(), e))?;
                        Self::start(s, address, opts, callbacks).await
                    }
                    None => Self::start(s, address, opts, callbacks).await,
                }
            }
        };
        tokio::time::timeout(opts.connect_timeout, fut)
            .await
            .map_err(|_| ClientError::ConnectTimeout(address.clone()))?
    }

    /// Runs the protocol over an established stream (TCP, unix, TLS...).
    pub async fn start<S>(
        stream: S,
        address: &Address,
        opts: &ConnectOptions,
        callbacks: Arc<dyn Callbacks>,
    ) -> Result<Connection, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let hello = zeo_proto::io::read_frame(&mut rd, &mut buf, 64)
            .await
            .map_err(|e| ClientError::Connect(address.clone(), e))?
            .ok_or(ClientError::Disconnected)?;
        let encoding = match &hello[..] {
            b"Z5" => Encoding::Pickle,
            b"M5" => Encoding::Msgpack,
            other => {
                return Err(ClientError::Handshake(
                    address.clone(),
                    String::from_utf8_lossy(other).into(),
                ))
            }
        };
        wr.write_all(&frame::frame(encoding.server_hello()))
            .await
            .map_err(|e| ClientError::Connect(address.clone(), e))?;

        let (out, rx) = mpsc::unbounded_channel();
        let (closed_tx, _) = watch::channel(false);
        let backlog = Arc::new(Backlog::default());
        let inner = Arc::new(Inner {
            address: address.clone(),
            encoding,
            out,
            backlog: backlog.clone(),
            calls: Mutex::new(HashMap::new()),
            next_msgid: AtomicI64::new(1),
            closed: AtomicBool::new(false),
            closed_tx,
            last_invalidation: AtomicU64::new(0),
            inflate_after: AtomicI64::new(0),
            compressed: AtomicBool::new(false),
        });
        let traffic = opts.traffic.clone().unwrap_or_default();
        tokio::spawn(write_loop(wr, rx, traffic.clone(), backlog, encoding));
        tokio::spawn(read_loop(
            rd,
            buf,
            inner.clone(),
            callbacks,
            opts.max_message_size,
            traffic,
        ));

        let mut conn = Connection {
            inner,
            registered_tid: Tid::ZERO,
            info_at_connect: None,
        };
        let tid: Tid = conn
            .request(&Request::Register {
                storage: opts.storage.clone(),
                read_only: opts.read_only,
            })
            .await?;
        conn.registered_tid = tid;
        // Invalidations before this point are older than the tid register returned.
        conn.inner
            .last_invalidation
            .fetch_max(tid.0, Ordering::AcqRel);
        // Never over TLS (the server does not offer it there either): compressing before
        // encrypting leaks the stream's contents to whoever can add to it and watch it.
        if opts.compress && opts.tls.is_none() {
            let info = conn.get_info().await?;
            if info.extensions.iter().any(|e| e == compress::ZSTD) {
                conn.start_compression().await?;
            }
            conn.info_at_connect = Some(info);
        }
        Ok(conn)
    }

    /// Switches both directions to zstd (the server offered it). Nothing else may be
    /// sent meanwhile: the connection is not handed out yet.
    async fn start_compression(&self) -> Result<(), ClientError> {
        let inner = &self.inner;
        let msgid = inner.next_msgid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        inner.calls.lock().insert(msgid, Pending { tx, hook: None });
        inner.inflate_after.store(msgid, Ordering::Release);
        let (name, args) = Request::Compress {
            method: compress::ZSTD.into(),
        }
        .to_call();
        let payload = message::encode_call(inner.encoding, &Value::Int(msgid), false, name, args);
        // Our stream is compressed from the byte after the request.
        if !inner.push(frame::frame(&payload)) || !inner.push(COMPRESS_FROM_HERE) {
            return Err(ClientError::Disconnected);
        }
        let reply = rx.await.map_err(|_| ClientError::Disconnected)?;
        reply.result.map_err(ClientError::Remote)?;
        inner.compressed.store(true, Ordering::Release);
        tracing::debug!(address = %inner.address, "connection compressed (zstd)");
        Ok(())
    }

    /// Whether the connection is compressed (both ways).
    pub fn is_compressed(&self) -> bool {
        self.inner.compressed.load(Ordering::Acquire)
    }

    pub fn address(&self) -> &Address {
        &self.inner.address
    }

    pub fn encoding(&self) -> Encoding {
        self.inner.encoding
    }

    pub fn is_connected(&self) -> bool {
        !self.inner.closed.load(Ordering::Acquire)
    }

    /// Resolves when the connection is closed.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed_tx.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Closes the connection; calls in flight fail with [`ClientError::Disconnected`].
    pub fn close(&self) {
        self.inner.shut();
    }

    // The calls below send their request at once, when called, and return a future of
    // the reply that borrows nothing: requests made one after the other go out in that
    // order however their futures are then awaited (pipelining relies on it).

    /// A two-way call; returns the reply and what it reflects.
    pub fn call_with_seen(
        &self,
        request: &Request,
    ) -> impl Future<Output = Result<RawReply, ClientError>> + Send + 'static {
        self.call_inner(request, None)
    }

    /// A two-way call whose `hook` runs in the reader, in order with callbacks, as soon
    /// as the reply arrives (see [`ReplyHook`]).
    pub fn call_with_hook(
        &self,
        request: &Request,
        hook: ReplyHook,
    ) -> impl Future<Output = Result<Value, ClientError>> + Send + 'static {
        let reply = self.call_inner(request, Some(hook));
        async move { reply.await?.result.map_err(ClientError::Remote) }
    }

    fn call_inner(
        &self,
        request: &Request,
        hook: Option<ReplyHook>,
    ) -> impl Future<Output = Result<RawReply, ClientError>> + Send + 'static {
        let sent = (|| {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(ClientError::Disconnected);
            }
            let msgid = self.inner.next_msgid.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.inner.calls.lock().insert(msgid, Pending { tx, hook });
            let (name, args) = request.to_call();
            let payload =
                message::encode_call(self.inner.encoding, &Value::Int(msgid), false, name, args);
            if !self.inner.push(frame::frame(&payload)) || self.inner.closed.load(Ordering::Acquire)
            {
                self.inner.calls.lock().remove(&msgid);
                return Err(ClientError::Disconnected);
            }
            Ok(rx)
        })();
        async move { sent?.await.map_err(|_| ClientError::Disconnected) }
    }

    /// A two-way call; a server exception becomes [`ClientError::Remote`].
    pub fn call(
        &self,
        request: &Request,
    ) -> impl Future<Output = Result<Value, ClientError>> + Send + 'static {
        let reply = self.call_with_seen(request);
        async move { reply.await?.result.map_err(ClientError::Remote) }
    }

    /// A two-way call whose reply is read as `R`.
    pub fn request<R: Reply + Send + 'static>(
        &self,
        request: &Request,
    ) -> impl Future<Output = Result<R, ClientError>> + Send + 'static {
        let reply = self.call(request);
        async move { Ok(R::from_value(&reply.await?)?) }
    }

    /// [`Connection::request`], with the tid the reply reflects (see [`RawReply::seen`]).
    pub fn request_with_seen<R: Reply + Send + 'static>(
        &self,
        request: &Request,
    ) -> impl Future<Output = Result<(R, Tid), ClientError>> + Send + 'static {
        let reply = self.call_with_seen(request);
        async move {
            let reply = reply.await?;
            let v = reply.result.map_err(ClientError::Remote)?;
            Ok((R::from_value(&v)?, reply.seen))
        }
    }

    /// A one-way call (no reply).
    pub fn send(&self, request: &Request) -> Result<(), ClientError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(ClientError::Disconnected);
        }
        let (name, args) = request.to_call();
        let payload = message::encode_call(self.inner.encoding, &Value::Int(0), true, name, args);
        if self.inner.push(frame::frame(&payload)) {
            Ok(())
        } else {
            Err(ClientError::Disconnected)
        }
    }

    /// Bytes sent but not yet written to the socket.
    pub fn queued_bytes(&self) -> usize {
        self.inner.backlog.queued.load(Ordering::Acquire)
    }

    /// Waits until at most `limit` bytes wait to be written, or the connection is closed:
    /// lets a long stream of one-way calls (a blob upload) go at the speed of the link
    /// with a bounded amount of it in memory.
    pub async fn wait_queued_below(&self, limit: usize) {
        loop {
            let drained = self.inner.backlog.drained.notified();
            tokio::pin!(drained);
            // Registered before the check, so a write in between is not missed.
            drained.as_mut().enable();
            if self.queued_bytes() <= limit || self.inner.closed.load(Ordering::Acquire) {
                return;
            }
            drained.await;
        }
    }

    // Shorthands for the calls the proxy, the bench tool and tests make most.

    pub async fn last_transaction(&self) -> Result<Tid, ClientError> {
        self.request(&Request::LastTransaction).await
    }

    /// `loadBefore(oid, before)` (`None` if there is no revision before `before`), and the
    /// tid the answer reflects.
    pub async fn load_before(
        &self,
        oid: Oid,
        before: Tid,
    ) -> Result<(Option<Loaded>, Tid), ClientError> {
        self.request_with_seen(&Request::LoadBefore { oid, before })
            .await
    }

    pub async fn load_serial(&self, oid: Oid, serial: Tid) -> Result<Bytes, ClientError> {
        self.request(&Request::LoadSerial { oid, serial }).await
    }

    pub async fn new_oids(&self, count: usize) -> Result<Vec<Oid>, ClientError> {
        let oids: NewOids = self.request(&Request::NewOids { count }).await?;
        Ok(oids.0)
    }

    /// `getInvalidations(tid)`: `None` if the server cannot tell.
    pub async fn get_invalidations(
        &self,
        tid: Tid,
    ) -> Result<Option<(Tid, Vec<Oid>)>, ClientError> {
        let i: Invalidations = self.request(&Request::GetInvalidations { tid }).await?;
        Ok(i.0)
    }

    pub async fn get_info(&self) -> Result<Info, ClientError> {
        self.request(&Request::GetInfo).await
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.request(&Request::Ping).await
    }

    /// The tid of the last invalidation handled so far.
    pub fn last_invalidation(&self) -> Tid {
        Tid(self.inner.last_invalidation.load(Ordering::Acquire))
    }
}

impl Inner {
    /// Queues a frame for the writer; false when the connection is gone.
    fn push(&self, frame: Bytes) -> bool {
        let n = frame.len();
        self.backlog.queued.fetch_add(n, Ordering::AcqRel);
        if self.out.send(frame).is_err() {
            self.backlog.queued.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn shut(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.backlog.drained.notify_waiters();
        // Dropping the senders fails every waiting call with Disconnected.
        self.calls.lock().clear();
        let _ = self.closed_tx.send(true);
    }
}

/// After this long without sending anything, the writer sends a heartbeat, as ZEO's
/// client does: servers may close connections that stay silent (zeors' idle timeout).
const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The queue entry that tells the writer to compress what follows: empty, unlike every
/// frame.
const COMPRESS_FROM_HERE: Bytes = Bytes::new();

/// Bytes of the server's compressed stream decompressed before their messages are
/// handled.
const INFLATE_STEP: usize = 256 * 1024;

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    traffic: Arc<Traffic>,
    backlog: Arc<Backlog>,
    encoding: Encoding,
) {
    let mut batch = BytesMut::with_capacity(64 * 1024);
    let mut compressor: Option<compress::Compressor> = None;
    loop {
        let first = match tokio::time::timeout(HEARTBEAT_INTERVAL, rx.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => break,
            Err(_) => {
                // `(-1, 0, '.reply', None)`: servers ignore it; it is not in the backlog.
                let beat = zeo_proto::message::reply_frame(encoding, &Value::Int(-1), Value::None);
                let wire = match &mut compressor {
                    Some(c) => match c.write(&beat).and_then(|()| c.flush()) {
                        Ok(z) => Bytes::from(z),
                        Err(_) => return,
                    },
                    None => beat,
                };
                if wr.write_all(&wire).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let mut raw = 0;
        let mut switch = first.is_empty();
        if !switch {
            raw += first.len();
            batch.extend_from_slice(&first);
        }
        while !switch && batch.len() < 256 * 1024 {
            match rx.try_recv() {
                // What follows must not go out plain: end the batch here.
                Ok(f) if f.is_empty() => switch = true,
                Ok(f) => {
                    raw += f.len();
                    batch.extend_from_slice(&f);
                }
                Err(_) => break,
            }
        }
        if let Some(c) = &mut compressor {
            match c.write(&batch).and_then(|()| c.flush()) {
                Ok(z) => {
                    batch.clear();
                    batch.extend_from_slice(&z);
                }
                Err(_) => return,
            }
        }
        if !batch.is_empty() && wr.write_all(&batch).await.is_err() {
            return;
        }
        traffic
            .bytes_out
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        backlog.queued.fetch_sub(raw, Ordering::AcqRel);
        backlog.drained.notify_waiters();
        batch.clear();
        if switch {
            match compress::Compressor::new() {
                Ok(c) => compressor = Some(c),
                Err(_) => return,
            }
        }
    }
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    mut buf: BytesMut,
    inner: Arc<Inner>,
    callbacks: Arc<dyn Callbacks>,
    max: usize,
    traffic: Arc<Traffic>,
) {
    let limits = Limits::default();
    let mut closed_rx = inner.closed_tx.subscribe();
    // Once the server compresses: what is read, before it is decompressed into `buf`.
    let mut inflate: Option<compress::Decompressor> = None;
    let mut raw = BytesMut::with_capacity(64 * 1024);
    'outer: loop {
        loop {
            let payload = match frame::decode_frame(&mut buf, max) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // With a compressed stream, more may be waiting in the decompressor.
                    let Some(d) = &mut inflate else { break };
                    match d.pull(&mut buf, INFLATE_STEP) {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::warn!(address = %inner.address, error = %e, "undecodable compressed stream from server");
                            break 'outer;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(address = %inner.address, error = %e, "bad frame from server");
                    break 'outer;
                }
            };
            let msg = match Message::decode(inner.encoding, &payload, &limits) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(address = %inner.address, error = %e, "undecodable message from server");
                    break 'outer;
                }
            };
            let switch = inflate.is_none()
                && msg.name == message::REPLY
                && msg
                    .msgid
                    .as_int()
                    .is_some_and(|id| id != 0 && id == inner.inflate_after.load(Ordering::Acquire));
            dispatch(&inner, &*callbacks, msg).await;
            if switch {
                // The server's stream is compressed from the byte after this reply.
                let mut d = match compress::Decompressor::new() {
                    Ok(d) => d,
                    Err(_) => break 'outer,
                };
                d.push(&buf.split());
                inflate = Some(d);
            }
        }
        let into = if inflate.is_some() {
            &mut raw
        } else {
            &mut buf
        };
        tokio::select! {
            r = rd.read_buf(into) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    traffic.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    if let Some(d) = &mut inflate {
                        d.push(&raw);
                        raw.clear();
                    }
                }
            },
            _ = closed_rx.changed() => break,
        }
    }
    inner.shut();
    callbacks.disconnected().await;
}

async fn dispatch(inner: &Inner, callbacks: &dyn Callbacks, msg: Message) {
    if msg.name == message::REPLY {
        let Some(msgid) = msg.msgid.as_int() else {
            return;
        };
        let Some(pending) = inner.calls.lock().remove(&msgid) else {
            return;
        };
        let result = if msg.is_exception() {
            let (class_path, payload) = match msg.args {
                Value::Tuple(mut v) | Value::List(mut v) if v.len() == 2 => {
                    let payload = v.pop().unwrap_or(Value::None);
                    let class = v
                        .pop()
                        .and_then(|c| c.as_str().map(str::to_string))
                        .unwrap_or_default();
                    (class, payload)
                }
                other => ("builtins.Exception".to_string(), other),
            };
            Err(RemoteError {
                class_path,
                payload,
            })
        } else {
            Ok(msg.args)
        };
        if let Some(hook) = pending.hook {
            hook(&result);
        }
        let seen = Tid(inner.last_invalidation.load(Ordering::Acquire));
        let _ = pending.tx.send(RawReply { result, seen });
        return;
    }
    match Callback::parse(&msg.name, &msg.args) {
        Ok(Some(Callback::InvalidateTransaction { tid, oids })) => {
            callbacks.invalidate_transaction(tid, oids).await;
            inner.last_invalidation.fetch_max(tid.0, Ordering::AcqRel);
        }
        Ok(Some(Callback::Info(info))) => callbacks.info(info).await,
        Ok(Some(Callback::ReceiveBlobStart { oid, serial })) => {
            callbacks.receive_blob_start(oid, serial).await
        }
        Ok(Some(Callback::ReceiveBlobChunk { oid, serial, chunk })) => {
            callbacks.receive_blob_chunk(oid, serial, chunk).await
        }
        Ok(Some(Callback::ReceiveBlobStop { oid, serial })) => {
            callbacks.receive_blob_stop(oid, serial).await
        }
        Ok(None) => tracing::debug!(callback = %msg.name, "ignoring unknown callback"),
        Err(e) => {
            tracing::warn!(address = %inner.address, error = %e, "malformed callback ignored")
        }
    }
}

/// Exponential backoff between reconnection attempts, with jitter so that many proxies
/// do not hammer a recovering server in lock step.
#[derive(Debug, Clone)]
pub struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            current: min,
            min,
            max,
        }
    }

    /// The delay before the next attempt; doubles each time up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 % (base.as_millis() as u64 / 4 + 1))
            .unwrap_or(0);
        base + Duration::from_millis(jitter)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Tries each address in turn (failover) and returns the first registered connection.
pub async fn connect_any(
    addresses: &[Address],
    opts: &ConnectOptions,
    callbacks: impl Fn() -> Arc<dyn Callbacks>,
) -> Result<Connection, ClientError> {
    let mut last = ClientError::Disconnected;
    for address in addresses {
        match Connection::connect(address, opts, callbacks()).await {
            Ok(conn) => return Ok(conn),
            Err(e) => {
                tracing::debug!(%address, error = %e, "connection attempt failed");
                last = e;
            }
        }
    }
    Err(last)
}
