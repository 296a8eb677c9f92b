//! zc.zrs's replication protocol, sans I/O: bytes in, typed messages out, and back.
//!
//! Invariants, as zc.zrs 2.x/3.x's `primary.py`, `secondary.py` and `sizedmessage.py`
//! define the wire:
//!
//! - Every message in either direction is *sized*: a 4-byte big-endian length, then that
//!   many bytes. An empty message is a keep-alive (the replica sends them every
//!   `keep-alive-delay` seconds; the primary ignores them).
//! - The replica opens with two messages: its protocol (`zrs2.0`, or `zrs2.1` when it
//!   keeps blobs; a primary with blobs refuses `zrs2.0`) and its last tid (8 bytes, the
//!   primary streams the transactions after it). Anything else it sends later is an error.
//! - The primary sends, for each transaction, a pickled `('T', (tid, status, user,
//!   description, extension_dict))`; for each data record `('S', (oid, serial, version,
//!   data_txn))` followed by a raw message holding the record's pickle (empty: no state),
//!   or, for a record with a blob file, `('B', (oid, serial, version, data_txn, blocks))`,
//!   the pickle, then `blocks` raw messages of up to 64 KiB of the blob file; and finally
//!   `('C', (md5_digest,))`. The digest is an MD5 over every message body of the stream
//!   so far (lengths excluded), seeded with the start tid; each side updates it with a
//!   message *after* handling it, so `C` carries the digest of everything before it.
//!
//! zeors peers extend this, without stock peers noticing (see [`Dialect::Zeors`]): the
//! replica announces `zrs2.x+zeors1`, which a stock primary refuses (the replica then
//! reconnects with the plain protocol), and sends a [`ReplicaHello`] instead of a bare
//! tid; the primary answers with a [`PrimaryHello`]. In that dialect the `T` message
//! carries the extension as the exact bytes of the Data.fs (so that a replica's file is
//! the primary's byte for byte), and the primary may send `('P', (last_tid, pending))`
//! heartbeats that tell the replica how far behind it is.

use bytes::{BufMut, Bytes, BytesMut};
use md5::{Digest, Md5};
use zeo_proto::{pickle, Limits, Value};
use zodb::{Oid, Tid};

/// Blob files travel in blocks of this size (zc.zrs's `blob_block_size`).
pub const BLOB_BLOCK_SIZE: usize = 1 << 16;

/// The largest message a replica accepts: the sized length is a u32, and a record's
/// pickle is the largest thing sent in one message.
pub const MAX_MESSAGE: usize = u32::MAX as usize;

/// The largest message a primary accepts from a replica: its hello (a few recent tids).
pub const MAX_REPLICA_MESSAGE: usize = 1 << 20;

/// Suffix of the protocol name by which a zeors replica asks for the zeors dialect.
pub const ZEORS_SUFFIX: &str = "+zeors1";

/// The protocol version a replica speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `zrs2.0`: no blobs.
    V20,
    /// `zrs2.1`: with blobs.
    V21,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V20 => "zrs2.0",
            Protocol::V21 => "zrs2.1",
        }
    }
}

/// Which variant of the stream is spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// zc.zrs's own: understood by stock primaries and secondaries.
    Stock,
    /// Between zeors peers: hellos, raw extension bytes, heartbeats, optional zstd.
    Zeors,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message too large: {0} bytes (limit {1})")]
    TooLarge(u64, usize),
    #[error("invalid protocol {0:?}")]
    InvalidProtocol(String),
    #[error("invalid transaction id {0:?}")]
    InvalidTid(Vec<u8>),
    #[error("too many messages from the replica")]
    TooManyMessages,
    #[error("undecodable message: {0}")]
    Pickle(#[from] zeo_proto::DecodeError),
    #[error("malformed {what} message: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("unexpected {got} message while expecting {expected}")]
    Unexpected { got: String, expected: &'static str },
    #[error("bad checksum for transaction {tid}: the stream was damaged or diverged")]
    BadChecksum { tid: Tid },
}

fn malformed(what: &'static str, detail: impl Into<String>) -> CodecError {
    CodecError::Malformed {
        what,
        detail: detail.into(),
    }
}

/// A message with its 4-byte length prefix.
pub fn sized(body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + body.len());
    b.put_u32(body.len() as u32);
    b.extend_from_slice(body);
    b.freeze()
}

/// The keep-alive a replica sends: an empty message.
pub fn keep_alive() -> Bytes {
    Bytes::from_static(&[0, 0, 0, 0])
}

/// Splits a byte stream into sized messages.
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    limit: usize,
}

impl Framer {
    pub fn new(limit: usize) -> Framer {
        Framer {
            buf: BytesMut::new(),
            limit,
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The buffer to read into directly (avoids a copy), for `read_buf`.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The next complete message, `None` until one is.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, CodecError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len > self.limit {
            return Err(CodecError::TooLarge(len as u64, self.limit));
        }
        if self.buf.len() < 4 + len {
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        let _ = self.buf.split_to(4);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

/// A transaction header as the stream carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct TxnHeader {
    pub tid: Tid,
    /// `b' '` or `b'p'` (packed).
    pub status: u8,
    pub user: Vec<u8>,
    pub description: Vec<u8>,
    /// The extension as a Data.fs stores it: a pickled dict, empty for an empty dict.
    pub extension: Vec<u8>,
}

/// A data record's header (`S`, or `B` with `blocks`).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordHeader {
    pub oid: Oid,
    pub serial: Tid,
    /// For a back pointer: the transaction of the record it points at.
    pub data_txn: Option<Tid>,
}

/// What the primary says about itself in a heartbeat (zeors dialect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The primary's last committed transaction.
    pub last_tid: Tid,
    /// Transactions committed on the primary that it has not sent yet.
    pub pending: u64,
}

fn tid_value(t: Tid) -> Value {
    Value::from(t)
}

fn as_id(v: &Value, what: &'static str) -> Result<[u8; 8], CodecError> {
    let b = v
        .as_bytes()
        .ok_or_else(|| malformed(what, format!("expected 8 bytes, got {v:?}")))?;
    b.as_ref()
        .try_into()
        .map_err(|_| malformed(what, format!("expected 8 bytes, got {} bytes", b.len())))
}

fn as_opt_tid(v: &Value, what: &'static str) -> Result<Option<Tid>, CodecError> {
    match v {
        Value::None => Ok(None),
        v => Ok(Some(Tid::from_bytes(as_id(v, what)?))),
    }
}

fn as_text_bytes(v: &Value, what: &'static str) -> Result<Vec<u8>, CodecError> {
    match v {
        Value::Bytes(b) => Ok(b.to_vec()),
        Value::Str(s) => Ok(s.as_bytes().to_vec()),
        Value::None => Ok(Vec::new()),
        other => Err(malformed(what, format!("expected bytes, got {other:?}"))),
    }
}

/// Decodes a `(type, data)` pickle.
fn decode_typed(msg: &[u8]) -> Result<(String, Vec<Value>), CodecError> {
    let v = pickle::decode(msg, &Limits::default().for_message(msg.len()))?;
    let Value::Tuple(mut items) = v else {
        return Err(malformed("stream", "not a (type, data) tuple"));
    };
    if items.len() != 2 {
        return Err(malformed("stream", "not a (type, data) tuple"));
    }
    let data = items.pop().expect("two items");
    let kind = match items.pop().expect("two items") {
        Value::Str(s) => s,
        Value::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
        other => return Err(malformed("stream", format!("message type {other:?}"))),
    };
    let data = match data {
        Value::Tuple(d) | Value::List(d) => d,
        other => return Err(malformed("stream", format!("message data {other:?}"))),
    };
    Ok((kind, data))
}

fn encode_typed(kind: &str, data: Vec<Value>) -> Vec<u8> {
    pickle::to_vec(&Value::Tuple(vec![Value::str(kind), Value::Tuple(data)]))
}

/// The running MD5 both sides keep over the stream.
#[derive(Clone)]
struct StreamDigest(Md5);

impl StreamDigest {
    fn new(start: Tid) -> StreamDigest {
        let mut m = Md5::new();
        m.update(start.to_bytes());
        StreamDigest(m)
    }

    fn update(&mut self, body: &[u8]) {
        self.0.update(body);
    }

    fn digest(&self) -> [u8; 16] {
        self.0.clone().finalize().into()
    }
}

/// The primary's side of the stream: turns transactions into sized messages and keeps
/// the checksum.
pub struct StreamEncoder {
    digest: StreamDigest,
    dialect: Dialect,
}

impl StreamEncoder {
    /// `start` is the tid the replica said it has (the checksum's seed).
    pub fn new(start: Tid, dialect: Dialect) -> StreamEncoder {
        StreamEncoder {
            digest: StreamDigest::new(start),
            dialect,
        }
    }

    fn message(&mut self, body: &[u8]) -> Bytes {
        self.digest.update(body);
        sized(body)
    }

    /// The `T` message that opens a transaction.
    pub fn transaction(&mut self, h: &TxnHeader) -> Bytes {
        let extension = match self.dialect {
            Dialect::Zeors => Value::bytes(h.extension.clone()),
            // zc.zrs sends the unpickled dict; the secondary pickles it again.
            Dialect::Stock => Value::Dict(zeo_proto::extension_from_bytes(&h.extension)),
        };
        let body = encode_typed(
            "T",
            vec![
                tid_value(h.tid),
                Value::Str((h.status as char).to_string()),
                Value::bytes(h.user.clone()),
                Value::bytes(h.description.clone()),
                extension,
            ],
        );
        self.message(&body)
    }

    /// An `S` message and the record's pickle (`None`: no state).
    pub fn record(&mut self, r: &RecordHeader, data: Option<&[u8]>) -> [Bytes; 2] {
        let body = encode_typed(
            "S",
            vec![
                Value::from(r.oid),
                tid_value(r.serial),
                Value::str(""),
                r.data_txn.map(tid_value).unwrap_or(Value::None),
            ],
        );
        [self.message(&body), self.message(data.unwrap_or(&[]))]
    }

    /// A `B` message and the record's pickle; `blocks` blob blocks must follow.
    pub fn blob_record(&mut self, r: &RecordHeader, data: &[u8], blocks: u64) -> [Bytes; 2] {
        let body = encode_typed(
            "B",
            vec![
                Value::from(r.oid),
                tid_value(r.serial),
                Value::str(""),
                r.data_txn.map(tid_value).unwrap_or(Value::None),
                Value::Int(blocks as i64),
            ],
        );
        [self.message(&body), self.message(data)]
    }

    /// One block (at most [`BLOB_BLOCK_SIZE`] bytes) of a blob file.
    pub fn blob_block(&mut self, block: &[u8]) -> Bytes {
        self.message(block)
    }

    /// The `C` message that ends a transaction.
    pub fn checksum(&mut self) -> Bytes {
        let d = self.digest.digest();
        let body = encode_typed("C", vec![Value::bytes(d.to_vec())]);
        self.message(&body)
    }

    /// A heartbeat (zeors dialect only; stock secondaries would fail on it).
    pub fn heartbeat(&mut self, hb: Heartbeat) -> Option<Bytes> {
        if self.dialect != Dialect::Zeors {
            return None;
        }
        let body = encode_typed(
            "P",
            vec![tid_value(hb.last_tid), Value::Int(hb.pending as i64)],
        );
        Some(self.message(&body))
    }
}

/// What the replica learns from one message of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A transaction starts.
    Begin(TxnHeader),
    /// A data record (`data = None`: no state).
    Record {
        header: RecordHeader,
        data: Option<Bytes>,
    },
    /// A record with a blob file of `blocks` blocks, which follow as [`Event::BlobBlock`]s
    /// and end with [`Event::BlobEnd`] (at once when `blocks` is 0).
    BlobRecord {
        header: RecordHeader,
        data: Bytes,
        blocks: u64,
    },
    BlobBlock(Bytes),
    BlobEnd,
    /// The transaction is complete and its checksum verified.
    Commit {
        tid: Tid,
    },
    Heartbeat(Heartbeat),
    /// A message that completes nothing by itself (the header of a record whose data
    /// comes next).
    Nothing,
}

#[derive(Debug)]
enum Expect {
    /// `T` (or a heartbeat).
    Transaction,
    /// `S`, `B` or `C` of the transaction `tid`.
    RecordOrEnd { tid: Tid },
    /// The pickle of the record just announced.
    RecordData {
        tid: Tid,
        header: RecordHeader,
        blob_blocks: Option<u64>,
    },
    /// Blob blocks still to come.
    BlobBlocks { tid: Tid, left: u64 },
}

/// The replica's side of the stream: checks the order of messages and the checksum.
pub struct StreamDecoder {
    digest: StreamDigest,
    dialect: Dialect,
    expect: Expect,
}

impl StreamDecoder {
    /// `start` is the tid the replica sent (the checksum's seed).
    pub fn new(start: Tid, dialect: Dialect) -> StreamDecoder {
        StreamDecoder {
            digest: StreamDigest::new(start),
            dialect,
            expect: Expect::Transaction,
        }
    }

    /// Whether the stream is between transactions.
    pub fn between_transactions(&self) -> bool {
        matches!(self.expect, Expect::Transaction)
    }

    /// Handles one message.
    pub fn message(&mut self, msg: Bytes) -> Result<Event, CodecError> {
        let event = self.handle(&msg)?;
        self.digest.update(&msg);
        Ok(event)
    }

    fn handle(&mut self, msg: &Bytes) -> Result<Event, CodecError> {
        match std::mem::replace(&mut self.expect, Expect::Transaction) {
            Expect::RecordData {
                tid,
                header,
                blob_blocks,
            } => {
                match blob_blocks {
                    None => {
                        self.expect = Expect::RecordOrEnd { tid };
                        Ok(Event::Record {
                            header,
                            data: (!msg.is_empty()).then(|| msg.clone()),
                        })
                    }
                    Some(blocks) => {
                        self.expect = if blocks == 0 {
                            // Reported with the record: the caller ends it at once.
                            Expect::RecordOrEnd { tid }
                        } else {
                            Expect::BlobBlocks { tid, left: blocks }
                        };
                        Ok(Event::BlobRecord {
                            header,
                            data: msg.clone(),
                            blocks,
                        })
                    }
                }
            }
            Expect::BlobBlocks { tid, left } => {
                if msg.len() > BLOB_BLOCK_SIZE {
                    return Err(malformed(
                        "blob block",
                        format!("{} bytes, more than a block", msg.len()),
                    ));
                }
                self.expect = if left > 1 {
                    Expect::BlobBlocks {
                        tid,
                        left: left - 1,
                    }
                } else {
                    Expect::RecordOrEnd { tid }
                };
                Ok(Event::BlobBlock(msg.clone()))
            }
            Expect::Transaction => {
                let (kind, data) = decode_typed(msg)?;
                match kind.as_str() {
                    "T" => {
                        let h = self.txn_header(&data)?;
                        self.expect = Expect::RecordOrEnd { tid: h.tid };
                        Ok(Event::Begin(h))
                    }
                    "P" if self.dialect == Dialect::Zeors => {
                        Ok(Event::Heartbeat(heartbeat(&data)?))
                    }
                    other => Err(CodecError::Unexpected {
                        got: format!("{other:?}"),
                        expected: "a transaction (T)",
                    }),
                }
            }
            Expect::RecordOrEnd { tid } => {
                let (kind, data) = decode_typed(msg)?;
                match kind.as_str() {
                    "S" => {
                        let header = record_header(&data, 4, "S")?;
                        self.expect = Expect::RecordData {
                            tid,
                            header,
                            blob_blocks: None,
                        };
                        Ok(Event::Nothing)
                    }
                    "B" => {
                        let header = record_header(&data, 5, "B")?;
                        let blocks = data[4]
                            .as_int()
                            .filter(|b| *b >= 0)
                            .ok_or_else(|| malformed("B", "block count"))?
                            as u64;
                        self.expect = Expect::RecordData {
                            tid,
                            header,
                            blob_blocks: Some(blocks),
                        };
                        Ok(Event::Nothing)
                    }
                    "C" => {
                        let got = data
                            .first()
                            .and_then(Value::as_bytes)
                            .ok_or_else(|| malformed("C", "no digest"))?;
                        if got.as_ref() != self.digest.digest() {
                            return Err(CodecError::BadChecksum { tid });
                        }
                        Ok(Event::Commit { tid })
                    }
                    other => Err(CodecError::Unexpected {
                        got: format!("{other:?}"),
                        expected: "a record (S, B) or the checksum (C)",
                    }),
                }
            }
        }
    }

    fn txn_header(&self, data: &[Value]) -> Result<TxnHeader, CodecError> {
        if data.len() != 5 {
            return Err(malformed(
                "T",
                format!("{} fields instead of 5", data.len()),
            ));
        }
        let status = match &data[1] {
            Value::Str(s) if s.len() == 1 => s.as_bytes()[0],
            Value::Bytes(b) if b.len() == 1 => b[0],
            other => return Err(malformed("T", format!("status {other:?}"))),
        };
        let extension = match (&data[4], self.dialect) {
            (Value::Bytes(b), Dialect::Zeors) => b.to_vec(),
            (ext @ Value::Dict(_), _) => zeo_proto::extension_to_bytes(ext),
            (Value::None, _) => Vec::new(),
            (other, _) => return Err(malformed("T", format!("extension {other:?}"))),
        };
        Ok(TxnHeader {
            tid: Tid::from_bytes(as_id(&data[0], "T")?),
            status,
            user: as_text_bytes(&data[2], "T")?,
            description: as_text_bytes(&data[3], "T")?,
            extension,
        })
    }
}

fn record_header(data: &[Value], n: usize, what: &'static str) -> Result<RecordHeader, CodecError> {
    if data.len() != n {
        return Err(malformed(
            what,
            format!("{} fields instead of {n}", data.len()),
        ));
    }
    if data[2].truthy() {
        return Err(malformed(what, "versions are not supported"));
    }
    Ok(RecordHeader {
        oid: Oid::from_bytes(as_id(&data[0], what)?),
        serial: Tid::from_bytes(as_id(&data[1], what)?),
        data_txn: as_opt_tid(&data[3], what)?,
    })
}

fn heartbeat(data: &[Value]) -> Result<Heartbeat, CodecError> {
    if data.len() != 2 {
        return Err(malformed("P", "fields"));
    }
    Ok(Heartbeat {
        last_tid: Tid::from_bytes(as_id(&data[0], "P")?),
        pending: data[1]
            .as_int()
            .filter(|p| *p >= 0)
            .ok_or_else(|| malformed("P", "pending count"))? as u64,
    })
}

/// A transaction a replica holds, as it tells the primary (zeors dialect): the tid and a
/// fingerprint of its content, so that the primary can check that it holds the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub tid: Tid,
    /// Fingerprint of the transaction's metadata (tid, user, description, extension).
    pub meta: [u8; 16],
    /// Fingerprint of the metadata and every record; `None` when this copy is packed
    /// (pack rewrites and drops records, so only the metadata can be compared).
    pub records: Option<[u8; 16]>,
}

/// The replica's opening in the zeors dialect (instead of a bare tid).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaHello {
    /// Its last transaction (the stream starts after it).
    pub last: Tid,
    /// Its most recent transactions, newest first, starting with `last` (empty when the
    /// replica is empty): the primary must hold the first one identically.
    pub recent: Vec<Held>,
    /// Compressions it can decode, preferred first (`"zstd"`).
    pub compression: Vec<String>,
}

impl ReplicaHello {
    pub fn encode(&self) -> Vec<u8> {
        let recent = self
            .recent
            .iter()
            .map(|h| {
                Value::Tuple(vec![
                    tid_value(h.tid),
                    Value::bytes(h.meta.to_vec()),
                    h.records
                        .map(|r| Value::bytes(r.to_vec()))
                        .unwrap_or(Value::None),
                ])
            })
            .collect();
        pickle::to_vec(&Value::dict([
            ("last", tid_value(self.last)),
            ("recent", Value::List(recent)),
            (
                "compression",
                Value::List(
                    self.compression
                        .iter()
                        .map(|c| Value::str(c.as_str()))
                        .collect(),
                ),
            ),
        ]))
    }

    pub fn decode(msg: &[u8]) -> Result<ReplicaHello, CodecError> {
        let v = pickle::decode(msg, &Limits::default().for_message(msg.len()))?;
        let last = Tid::from_bytes(as_id(
            v.get("last").ok_or_else(|| malformed("hello", "no last"))?,
            "hello",
        )?);
        let mut recent = Vec::new();
        for item in v.get("recent").and_then(Value::as_seq).unwrap_or(&[]) {
            let pair = item
                .as_seq()
                .filter(|p| p.len() == 3)
                .ok_or_else(|| malformed("hello", "recent entry"))?;
            let fingerprint = |v: &Value| {
                v.as_bytes()
                    .and_then(|b| <[u8; 16]>::try_from(b.as_ref()).ok())
                    .ok_or_else(|| malformed("hello", "fingerprint"))
            };
            recent.push(Held {
                tid: Tid::from_bytes(as_id(&pair[0], "hello")?),
                meta: fingerprint(&pair[1])?,
                records: match &pair[2] {
                    Value::None => None,
                    v => Some(fingerprint(v)?),
                },
            });
        }
        let compression = v
            .get("compression")
            .and_then(Value::as_seq)
            .unwrap_or(&[])
            .iter()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        Ok(ReplicaHello {
            last,
            recent,
            compression,
        })
    }
}

/// The primary's answer to a [`ReplicaHello`].
#[derive(Debug, Clone, PartialEq)]
pub enum PrimaryHello {
    /// The stream follows, compressed with `compression` when set.
    Ok {
        compression: Option<String>,
        last_tid: Tid,
    },
    /// The replica's history is not the primary's: nothing follows. `diverged` lists the
    /// replica's tids the primary does not hold (from the replica's own list), `common` is
    /// the newest transaction both hold, when the list reached back to one.
    Diverged {
        message: String,
        diverged: Vec<Tid>,
        common: Option<Tid>,
    },
    /// Any other refusal (e.g. `zrs2.0` from a replica of a primary with blobs).
    Refused { message: String },
}

impl PrimaryHello {
    pub fn encode(&self) -> Vec<u8> {
        let v = match self {
            PrimaryHello::Ok {
                compression,
                last_tid,
            } => Value::dict([
                ("ok", Value::Bool(true)),
                (
                    "compression",
                    compression
                        .as_deref()
                        .map(Value::str)
                        .unwrap_or(Value::None),
                ),
                ("last", tid_value(*last_tid)),
            ]),
            PrimaryHello::Diverged {
                message,
                diverged,
                common,
            } => Value::dict([
                ("ok", Value::Bool(false)),
                ("error", Value::str(message.as_str())),
                (
                    "diverged",
                    Value::List(diverged.iter().map(|t| tid_value(*t)).collect()),
                ),
                ("common", common.map(tid_value).unwrap_or(Value::None)),
            ]),
            PrimaryHello::Refused { message } => Value::dict([
                ("ok", Value::Bool(false)),
                ("error", Value::str(message.as_str())),
            ]),
        };
        pickle::to_vec(&v)
    }

    pub fn decode(msg: &[u8]) -> Result<PrimaryHello, CodecError> {
        let v = pickle::decode(msg, &Limits::default().for_message(msg.len()))?;
        if v.get("ok").is_some_and(Value::truthy) {
            return Ok(PrimaryHello::Ok {
                compression: v
                    .get("compression")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                last_tid: Tid::from_bytes(as_id(
                    v.get("last").ok_or_else(|| malformed("hello", "no last"))?,
                    "hello",
                )?),
            });
        }
        let message = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("refused")
            .to_owned();
        match v.get("diverged").and_then(Value::as_seq) {
            Some(list) => Ok(PrimaryHello::Diverged {
                message,
                diverged: list
                    .iter()
                    .map(|t| as_id(t, "hello").map(Tid::from_bytes))
                    .collect::<Result<_, _>>()?,
                common: as_opt_tid(v.get("common").unwrap_or(&Value::None), "hello")?,
            }),
            None => Ok(PrimaryHello::Refused { message }),
        }
    }
}

/// How a replica opened its connection, as the primary reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Opening {
    /// zc.zrs's opening: protocol and the last tid.
    Stock { protocol: Protocol, last: Tid },
    /// The zeors dialect.
    Zeors {
        protocol: Protocol,
        hello: ReplicaHello,
    },
}

/// The primary's side of the replica's opening and of everything it sends afterwards.
#[derive(Debug, Default)]
pub struct OpeningDecoder {
    protocol: Option<(Protocol, Dialect)>,
    done: bool,
}

impl OpeningDecoder {
    pub fn new() -> OpeningDecoder {
        OpeningDecoder::default()
    }

    /// Handles one message from the replica: `Some` once the opening is complete;
    /// keep-alives afterwards give `None`, anything else an error (as zc.zrs does).
    pub fn message(&mut self, msg: &[u8]) -> Result<Option<Opening>, CodecError> {
        if self.done {
            if msg.is_empty() {
                return Ok(None);
            }
            return Err(CodecError::TooManyMessages);
        }
        let Some((protocol, dialect)) = self.protocol else {
            let text = String::from_utf8_lossy(msg).into_owned();
            let (base, dialect) = match text.strip_suffix(ZEORS_SUFFIX) {
                Some(base) => (base, Dialect::Zeors),
                None => (text.as_str(), Dialect::Stock),
            };
            let protocol = match base {
                "zrs2.0" => Protocol::V20,
                "zrs2.1" => Protocol::V21,
                _ => return Err(CodecError::InvalidProtocol(text)),
            };
            self.protocol = Some((protocol, dialect));
            return Ok(None);
        };
        self.done = true;
        match dialect {
            Dialect::Stock => {
                let last =
                    Tid::from_slice(msg).ok_or_else(|| CodecError::InvalidTid(msg.to_vec()))?;
                Ok(Some(Opening::Stock { protocol, last }))
            }
            Dialect::Zeors => Ok(Some(Opening::Zeors {
                protocol,
                hello: ReplicaHello::decode(msg)?,
            })),
        }
    }
}

/// The replica's opening messages.
pub fn opening(
    protocol: Protocol,
    dialect: Dialect,
    last: Tid,
    hello: Option<&ReplicaHello>,
) -> Vec<Bytes> {
    match dialect {
        Dialect::Stock => vec![sized(protocol.name().as_bytes()), sized(&last.to_bytes())],
        Dialect::Zeors => {
            let name = format!("{}{ZEORS_SUFFIX}", protocol.name());
            let hello = hello.cloned().unwrap_or(ReplicaHello {
                last,
                recent: Vec::new(),
                compression: Vec::new(),
            });
            vec![sized(name.as_bytes()), sized(&hello.encode())]
        }
    }
}

#[cfg(test)]
mod tests;
