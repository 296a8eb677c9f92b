//! Typed client requests: the method name and argument tuple of a message, checked.
//!
//! Parsing is strict about types (an oid must be 8 bytes) and lenient where Python
//! clients vary (optional trailing arguments, ints used as booleans).

use crate::Value;
use bytes::Bytes;
use zodb::{Oid, Tid};

/// A transaction as named by the client: `id(txn)`, an arbitrary int that may repeat
/// across transactions. Compared for equality only.
pub type ClientTxnId = Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Register {
        storage: String,
        read_only: bool,
    },
    GetInfo,
    LastTransaction,
    GetInvalidations {
        tid: Tid,
    },
    NewOids {
        count: usize,
    },
    /// Listed by the Python server but never implemented there (AttributeError).
    NewOid,
    Pack {
        time: f64,
        wait: bool,
    },
    LoadBefore {
        oid: Oid,
        before: Tid,
    },
    LoadSerial {
        oid: Oid,
        serial: Tid,
    },
    GetTid {
        oid: Oid,
    },
    /// `history(oid, size)`. Python's server hands both to the storage as they come:
    /// `None` for the oid is a lookup that fails (`POSKeyError`), `None` for the size a
    /// comparison that fails (`TypeError`) once the object is found.
    History {
        oid: Option<Oid>,
        size: Option<usize>,
    },
    TpcBegin {
        txn: ClientTxnId,
        user: Bytes,
        description: Bytes,
        extension: Value,
        tid: Option<Tid>,
        status: u8,
    },
    Storea {
        oid: Oid,
        serial: Tid,
        data: Bytes,
        txn: ClientTxnId,
    },
    CheckCurrentSerialInTransaction {
        oid: Oid,
        serial: Tid,
        txn: ClientTxnId,
    },
    DeleteObject {
        oid: Oid,
        serial: Tid,
        txn: ClientTxnId,
    },
    Restorea {
        oid: Oid,
        serial: Tid,
        data: Option<Bytes>,
        prev_txn: Option<Tid>,
        txn: ClientTxnId,
    },
    Undoa {
        transaction_id: Bytes,
        txn: ClientTxnId,
    },
    StoreBlobStart,
    StoreBlobChunk {
        chunk: Bytes,
    },
    StoreBlobEnd {
        oid: Oid,
        serial: Tid,
        data: Bytes,
        txn: ClientTxnId,
    },
    StoreBlobShared {
        oid: Oid,
        serial: Tid,
        data: Bytes,
        filename: String,
        txn: ClientTxnId,
    },
    SendBlob {
        oid: Oid,
        serial: Tid,
    },
    Vote {
        txn: ClientTxnId,
    },
    TpcFinish {
        txn: ClientTxnId,
    },
    TpcAbort {
        txn: ClientTxnId,
    },
    UndoLog {
        first: i64,
        last: i64,
    },
    UndoInfo {
        first: i64,
        last: i64,
        spec: Value,
    },
    IteratorStart {
        start: Option<Tid>,
        stop: Option<Tid>,
    },
    IteratorNext {
        iid: i64,
    },
    IteratorRecordStart {
        txn_iid: i64,
        tid: Tid,
    },
    IteratorRecordNext {
        riid: i64,
    },
    IteratorGc {
        iids: Vec<i64>,
    },
    RecordIternext {
        next: Option<Bytes>,
    },
    ServerStatus,
    SetClientLabel {
        label: String,
    },
    Ping,
    /// zeors extension (advertised in `get_info` as `zeors_extensions`): every oid changed
    /// after `tid`, without the invalidation queue's window. Lets a zeors proxy catch up
    /// after a long outage without walking the transaction log.
    ChangedSince {
        tid: Tid,
    },
    /// zeors extension (`current_records` in `zeors_extensions`): the current records of
    /// the oids from `first` (inclusive) to `end` (exclusive, `None`: no bound), in oid
    /// order, until about `max_bytes` of data. Lets a zeors proxy fill its cache in bulk
    /// (`--warm`) instead of one `record_iternext` round trip per object.
    CurrentRecords {
        first: Oid,
        end: Option<Oid>,
        max_bytes: u64,
    },
    /// zeors extension (`zstd` in `zeors_extensions`): from the byte after this request,
    /// the client's stream is compressed with `method`; from the byte after the reply, the
    /// server's (see [`crate::compress`]).
    Compress {
        method: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RequestError {
    #[error("invalid method {0:?}")]
    UnknownMethod(String),
    #[error("bad arguments for {method}: {reason}")]
    BadArguments {
        method: &'static str,
        reason: String,
    },
}

struct Args<'a> {
    method: &'static str,
    items: &'a [Value],
}

impl<'a> Args<'a> {
    fn bad(&self, reason: impl Into<String>) -> RequestError {
        RequestError::BadArguments {
            method: self.method,
            reason: reason.into(),
        }
    }

    fn get(&self, i: usize) -> Result<&'a Value, RequestError> {
        self.items
            .get(i)
            .ok_or_else(|| self.bad(format!("missing argument {}", i + 1)))
    }

    fn opt(&self, i: usize) -> Option<&'a Value> {
        match self.items.get(i) {
            None | Some(Value::None) => None,
            Some(v) => Some(v),
        }
    }

    fn bytes(&self, i: usize) -> Result<Bytes, RequestError> {
        match self.get(i)? {
            Value::Bytes(b) => Ok(b.clone()),
            other => Err(self.bad(format!(
                "argument {} must be bytes, got {}",
                i + 1,
                kind(other)
            ))),
        }
    }

    /// bytes or text (Python 2 style clients and descriptions may send text).
    fn bytes_or_str(&self, i: usize) -> Result<Bytes, RequestError> {
        match self.get(i)? {
            Value::Bytes(b) => Ok(b.clone()),
            Value::Str(s) => Ok(Bytes::from(s.clone().into_bytes())),
            Value::None => Ok(Bytes::new()),
            other => Err(self.bad(format!(
                "argument {} must be bytes, got {}",
                i + 1,
                kind(other)
            ))),
        }
    }

    /// Bytes of an 8-byte id. Old test code passes ids as 8-character text
    /// (`'\0' * 8`), which the Python server tolerates; so do we, reading it as latin-1.
    fn id_bytes(&self, i: usize) -> Result<Bytes, RequestError> {
        match self.get(i)? {
            Value::Str(s) if s.chars().count() == 8 && s.chars().all(|c| (c as u32) < 256) => {
                Ok(s.chars().map(|c| c as u8).collect::<Vec<u8>>().into())
            }
            _ => self.bytes(i),
        }
    }

    fn oid(&self, i: usize) -> Result<Oid, RequestError> {
        let b = self.id_bytes(i)?;
        Oid::from_slice(&b)
            .ok_or_else(|| self.bad(format!("argument {} must be an 8-byte oid", i + 1)))
    }

    fn tid(&self, i: usize) -> Result<Tid, RequestError> {
        let b = self.id_bytes(i)?;
        Tid::from_slice(&b)
            .ok_or_else(|| self.bad(format!("argument {} must be an 8-byte tid", i + 1)))
    }

    /// A serial where Python storages accept `None` for "no previous revision" (z64).
    fn serial(&self, i: usize) -> Result<Tid, RequestError> {
        Ok(self.opt_tid(i)?.unwrap_or(Tid::ZERO))
    }

    fn opt_tid(&self, i: usize) -> Result<Option<Tid>, RequestError> {
        match self.opt(i) {
            None => Ok(None),
            Some(_) => self.tid(i).map(Some),
        }
    }

    fn int(&self, i: usize) -> Result<i64, RequestError> {
        match self.get(i)? {
            Value::Int(n) => Ok(*n),
            Value::Bool(b) => Ok(i64::from(*b)),
            other => Err(self.bad(format!(
                "argument {} must be an int, got {}",
                i + 1,
                kind(other)
            ))),
        }
    }

    fn opt_int(&self, i: usize, default: i64) -> Result<i64, RequestError> {
        match self.opt(i) {
            None => Ok(default),
            Some(_) => self.int(i),
        }
    }

    fn float(&self, i: usize) -> Result<f64, RequestError> {
        match self.get(i)? {
            Value::Float(f) => Ok(*f),
            Value::Int(n) => Ok(*n as f64),
            other => Err(self.bad(format!(
                "argument {} must be a number, got {}",
                i + 1,
                kind(other)
            ))),
        }
    }

    fn string(&self, i: usize) -> Result<String, RequestError> {
        match self.get(i)? {
            Value::Str(s) => Ok(s.clone()),
            Value::Bytes(b) => Ok(String::from_utf8_lossy(b).into_owned()),
            other => Err(self.bad(format!(
                "argument {} must be text, got {}",
                i + 1,
                kind(other)
            ))),
        }
    }

    /// The transaction argument: any value (the client's `id(txn)`).
    fn txn(&self, i: usize) -> Result<ClientTxnId, RequestError> {
        Ok(self.get(i)?.clone())
    }
}

/// `n`, a count a client asks for, clamped to `1..=max` as the server serves it. The clamp
/// is what makes the cast exact: the result is positive and at most `u32::MAX`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn clamped_count(n: i64, max: u32) -> usize {
    n.clamp(1, i64::from(max)) as usize
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Bytes(_) => "bytes",
        Value::Str(_) => "str",
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Dict(_) => "dict",
        Value::Set(_) => "set",
        Value::Object { .. } => "object",
    }
}

/// Every method name the request parser knows.
pub const METHODS: &[&str] = &[
    "register",
    "get_info",
    "lastTransaction",
    "getInvalidations",
    "new_oids",
    "new_oid",
    "pack",
    "loadBefore",
    "loadSerial",
    "getTid",
    "history",
    "tpc_begin",
    "storea",
    "checkCurrentSerialInTransaction",
    "deleteObject",
    "restorea",
    "undoa",
    "storeBlobStart",
    "storeBlobChunk",
    "storeBlobEnd",
    "storeBlobShared",
    "sendBlob",
    "vote",
    "tpc_finish",
    "tpc_abort",
    "undoLog",
    "undoInfo",
    "iterator_start",
    "iterator_next",
    "iterator_record_start",
    "iterator_record_next",
    "iterator_gc",
    "record_iternext",
    "server_status",
    "set_client_label",
    "ping",
    "zeors_changed_since",
    "zeors_current_records",
    "zeors_compress",
];

/// Maps a method name to its static name, so errors can carry it without allocating.
fn method_name(name: &str) -> Option<&'static str> {
    METHODS.iter().copied().find(|n| *n == name)
}

impl Request {
    /// Parses a method call. `args` is the message's argument tuple.
    pub fn parse(name: &str, args: &Value) -> Result<Request, RequestError> {
        let method =
            method_name(name).ok_or_else(|| RequestError::UnknownMethod(name.to_string()))?;
        let empty = [];
        let items = match args {
            Value::Tuple(v) | Value::List(v) => v.as_slice(),
            Value::None => &empty,
            _ => {
                return Err(RequestError::BadArguments {
                    method,
                    reason: "arguments must be a tuple".into(),
                })
            }
        };
        let a = Args { method, items };
        Ok(match method {
            "register" => Request::Register {
                storage: a.string(0)?,
                read_only: a.opt(1).map(Value::truthy).unwrap_or(false),
            },
            "get_info" => Request::GetInfo,
            "lastTransaction" => Request::LastTransaction,
            "getInvalidations" => Request::GetInvalidations { tid: a.tid(0)? },
            "new_oids" => {
                let n = a.opt_int(0, 100)?;
                Request::NewOids {
                    count: clamped_count(n, 100),
                }
            }
            "new_oid" => Request::NewOid,
            "pack" => Request::Pack {
                time: a.float(0)?,
                wait: a.opt(1).map(Value::truthy).unwrap_or(true),
            },
            "loadBefore" => Request::LoadBefore {
                oid: a.oid(0)?,
                before: a.tid(1)?,
            },
            "loadSerial" => Request::LoadSerial {
                oid: a.oid(0)?,
                serial: a.tid(1)?,
            },
            "getTid" => Request::GetTid { oid: a.oid(0)? },
            "history" => {
                let size = match a.items.get(1) {
                    None => Some(1),
                    Some(Value::None) => None,
                    Some(_) => Some(clamped_count(a.int(1)?, 1 << 20)),
                };
                Request::History {
                    oid: a.opt(0).map(|_| a.oid(0)).transpose()?,
                    size,
                }
            }
            "tpc_begin" => {
                let status = match a.opt(5) {
                    None => b' ',
                    Some(Value::Str(s)) if s.len() == 1 => s.as_bytes()[0],
                    Some(Value::Bytes(b)) if b.len() == 1 => b[0],
                    Some(_) => return Err(a.bad("status must be one character")),
                };
                Request::TpcBegin {
                    txn: a.txn(0)?,
                    user: a
                        .opt(1)
                        .map(|_| a.bytes_or_str(1))
                        .transpose()?
                        .unwrap_or_default(),
                    description: a
                        .opt(2)
                        .map(|_| a.bytes_or_str(2))
                        .transpose()?
                        .unwrap_or_default(),
                    extension: a.opt(3).cloned().unwrap_or(Value::Dict(Vec::new())),
                    tid: a.opt_tid(4)?,
                    status,
                }
            }
            "storea" => Request::Storea {
                oid: a.oid(0)?,
                serial: a.serial(1)?,
                data: a.bytes(2)?,
                txn: a.txn(3)?,
            },
            "checkCurrentSerialInTransaction" => Request::CheckCurrentSerialInTransaction {
                oid: a.oid(0)?,
                serial: a.tid(1)?,
                txn: a.txn(2)?,
            },
            "deleteObject" => Request::DeleteObject {
                oid: a.oid(0)?,
                serial: a.tid(1)?,
                txn: a.txn(2)?,
            },
            "restorea" => Request::Restorea {
                oid: a.oid(0)?,
                serial: a.tid(1)?,
                data: a.opt(2).map(|_| a.bytes(2)).transpose()?,
                prev_txn: a.opt_tid(3)?,
                txn: a.txn(4)?,
            },
            "undoa" => Request::Undoa {
                transaction_id: a.bytes_or_str(0)?,
                txn: a.txn(1)?,
            },
            "storeBlobStart" => Request::StoreBlobStart,
            "storeBlobChunk" => Request::StoreBlobChunk { chunk: a.bytes(0)? },
            "storeBlobEnd" => Request::StoreBlobEnd {
                oid: a.oid(0)?,
                serial: a.serial(1)?,
                data: a.bytes(2)?,
                txn: a.txn(3)?,
            },
            "storeBlobShared" => Request::StoreBlobShared {
                oid: a.oid(0)?,
                serial: a.serial(1)?,
                data: a.bytes(2)?,
                filename: a.string(3)?,
                txn: a.txn(4)?,
            },
            "sendBlob" => Request::SendBlob {
                oid: a.oid(0)?,
                serial: a.tid(1)?,
            },
            "vote" => Request::Vote { txn: a.txn(0)? },
            "tpc_finish" => Request::TpcFinish { txn: a.txn(0)? },
            "tpc_abort" => Request::TpcAbort { txn: a.txn(0)? },
            "undoLog" => Request::UndoLog {
                first: a.opt_int(0, 0)?,
                last: a.opt_int(1, -20)?,
            },
            "undoInfo" => Request::UndoInfo {
                first: a.opt_int(0, 0)?,
                last: a.opt_int(1, -20)?,
                spec: a.opt(2).cloned().unwrap_or(Value::None),
            },
            "iterator_start" => Request::IteratorStart {
                start: a.opt_tid(0)?,
                stop: a.opt_tid(1)?,
            },
            "iterator_next" => Request::IteratorNext { iid: a.int(0)? },
            "iterator_record_start" => Request::IteratorRecordStart {
                txn_iid: a.int(0)?,
                tid: a.tid(1)?,
            },
            "iterator_record_next" => Request::IteratorRecordNext { riid: a.int(0)? },
            "iterator_gc" => {
                let list = a.get(0)?;
                let iids = list
                    .as_seq()
                    .ok_or_else(|| a.bad("expected a list of iterator ids"))?
                    .iter()
                    .filter_map(Value::as_int)
                    .collect();
                Request::IteratorGc { iids }
            }
            "record_iternext" => Request::RecordIternext {
                next: a.opt(0).map(|_| a.bytes(0)).transpose()?,
            },
            "server_status" => Request::ServerStatus,
            "set_client_label" => Request::SetClientLabel {
                label: a.string(0)?,
            },
            "ping" => Request::Ping,
            "zeors_changed_since" => Request::ChangedSince { tid: a.tid(0)? },
            "zeors_compress" => Request::Compress {
                method: a.string(0)?,
            },
            "zeors_current_records" => Request::CurrentRecords {
                first: a.oid(0)?,
                end: match a.opt(1) {
                    None => None,
                    Some(_) => Some(a.oid(1)?),
                },
                max_bytes: u64::try_from(a.int(2)?)
                    .map_err(|_| a.bad("max_bytes must not be negative"))?,
            },
            _ => return Err(RequestError::UnknownMethod(name.to_string())),
        })
    }

    /// The one-way request that sends a buffered transaction operation as part of
    /// transaction `txn` (what a proxy forwards upstream). `None` for a blob store, which
    /// takes an upload of several messages (`storeBlobStart`, chunks, `storeBlobEnd`).
    pub fn for_op(op: &zodb::TxnOp, txn: &ClientTxnId) -> Option<Request> {
        use zodb::TxnOp;
        let txn = txn.clone();
        Some(match op {
            TxnOp::Store { oid, serial, data } => Request::Storea {
                oid: *oid,
                serial: *serial,
                data: data.clone(),
                txn,
            },
            TxnOp::CheckCurrent { oid, serial } => Request::CheckCurrentSerialInTransaction {
                oid: *oid,
                serial: *serial,
                txn,
            },
            TxnOp::Delete { oid, serial } => Request::DeleteObject {
                oid: *oid,
                serial: *serial,
                txn,
            },
            TxnOp::Restore {
                oid,
                serial,
                data,
                prev_txn,
            } => Request::Restorea {
                oid: *oid,
                serial: *serial,
                data: data.clone(),
                prev_txn: *prev_txn,
                txn,
            },
            TxnOp::Undo { transaction_id } => Request::Undoa {
                transaction_id: Bytes::from(transaction_id.clone()),
                txn,
            },
            TxnOp::StoreBlob { .. } => return None,
        })
    }

    /// The method name and argument tuple that make this request, as `ClientStorage`
    /// sends it: the inverse of [`Request::parse`] (`parse(to_call(r)) == r`).
    pub fn to_call(&self) -> (&'static str, Vec<Value>) {
        let id = |i: &Oid| Value::from(*i);
        let t = |t: &Tid| Value::from(*t);
        let opt_t = |o: &Option<Tid>| o.map(Value::from).unwrap_or(Value::None);
        match self {
            Request::Register { storage, read_only } => (
                "register",
                vec![Value::str(storage.as_str()), Value::Bool(*read_only)],
            ),
            Request::GetInfo => ("get_info", vec![]),
            Request::LastTransaction => ("lastTransaction", vec![]),
            Request::GetInvalidations { tid } => ("getInvalidations", vec![t(tid)]),
            Request::NewOids { count } => ("new_oids", vec![Value::uint(*count)]),
            Request::NewOid => ("new_oid", vec![]),
            Request::Pack { time, wait } => ("pack", vec![Value::Float(*time), Value::Bool(*wait)]),
            Request::LoadBefore { oid, before } => ("loadBefore", vec![id(oid), t(before)]),
            Request::LoadSerial { oid, serial } => ("loadSerial", vec![id(oid), t(serial)]),
            Request::GetTid { oid } => ("getTid", vec![id(oid)]),
            Request::History { oid, size } => (
                "history",
                vec![
                    oid.map(|o| id(&o)).unwrap_or(Value::None),
                    size.map(Value::uint).unwrap_or(Value::None),
                ],
            ),
            Request::TpcBegin {
                txn,
                user,
                description,
                extension,
                tid,
                status,
            } => (
                "tpc_begin",
                vec![
                    txn.clone(),
                    Value::Bytes(user.clone()),
                    Value::Bytes(description.clone()),
                    extension.clone(),
                    opt_t(tid),
                    Value::Str((*status as char).to_string()),
                ],
            ),
            Request::Storea {
                oid,
                serial,
                data,
                txn,
            } => (
                "storea",
                vec![id(oid), t(serial), Value::Bytes(data.clone()), txn.clone()],
            ),
            Request::CheckCurrentSerialInTransaction { oid, serial, txn } => (
                "checkCurrentSerialInTransaction",
                vec![id(oid), t(serial), txn.clone()],
            ),
            Request::DeleteObject { oid, serial, txn } => {
                ("deleteObject", vec![id(oid), t(serial), txn.clone()])
            }
            Request::Restorea {
                oid,
                serial,
                data,
                prev_txn,
                txn,
            } => (
                "restorea",
                vec![
                    id(oid),
                    t(serial),
                    data.clone().map(Value::Bytes).unwrap_or(Value::None),
                    opt_t(prev_txn),
                    txn.clone(),
                ],
            ),
            Request::Undoa {
                transaction_id,
                txn,
            } => (
                "undoa",
                vec![Value::Bytes(transaction_id.clone()), txn.clone()],
            ),
            Request::StoreBlobStart => ("storeBlobStart", vec![]),
            Request::StoreBlobChunk { chunk } => {
                ("storeBlobChunk", vec![Value::Bytes(chunk.clone())])
            }
            Request::StoreBlobEnd {
                oid,
                serial,
                data,
                txn,
            } => (
                "storeBlobEnd",
                vec![id(oid), t(serial), Value::Bytes(data.clone()), txn.clone()],
            ),
            Request::StoreBlobShared {
                oid,
                serial,
                data,
                filename,
                txn,
            } => (
                "storeBlobShared",
                vec![
                    id(oid),
                    t(serial),
                    Value::Bytes(data.clone()),
                    Value::str(filename.as_str()),
                    txn.clone(),
                ],
            ),
            Request::SendBlob { oid, serial } => ("sendBlob", vec![id(oid), t(serial)]),
            Request::Vote { txn } => ("vote", vec![txn.clone()]),
            Request::TpcFinish { txn } => ("tpc_finish", vec![txn.clone()]),
            Request::TpcAbort { txn } => ("tpc_abort", vec![txn.clone()]),
            Request::UndoLog { first, last } => {
                ("undoLog", vec![Value::Int(*first), Value::Int(*last)])
            }
            Request::UndoInfo { first, last, spec } => (
                "undoInfo",
                vec![Value::Int(*first), Value::Int(*last), spec.clone()],
            ),
            Request::IteratorStart { start, stop } => {
                ("iterator_start", vec![opt_t(start), opt_t(stop)])
            }
            Request::IteratorNext { iid } => ("iterator_next", vec![Value::Int(*iid)]),
            Request::IteratorRecordStart { txn_iid, tid } => {
                ("iterator_record_start", vec![Value::Int(*txn_iid), t(tid)])
            }
            Request::IteratorRecordNext { riid } => {
                ("iterator_record_next", vec![Value::Int(*riid)])
            }
            Request::IteratorGc { iids } => (
                "iterator_gc",
                vec![Value::List(iids.iter().map(|i| Value::Int(*i)).collect())],
            ),
            Request::RecordIternext { next } => (
                "record_iternext",
                vec![next.clone().map(Value::Bytes).unwrap_or(Value::None)],
            ),
            Request::ServerStatus => ("server_status", vec![]),
            Request::SetClientLabel { label } => {
                ("set_client_label", vec![Value::str(label.as_str())])
            }
            Request::Ping => ("ping", vec![]),
            Request::ChangedSince { tid } => ("zeors_changed_since", vec![t(tid)]),
            Request::Compress { method } => ("zeors_compress", vec![Value::str(method.as_str())]),
            Request::CurrentRecords {
                first,
                end,
                max_bytes,
            } => (
                "zeors_current_records",
                vec![
                    Value::from(*first),
                    end.map(Value::from).unwrap_or(Value::None),
                    Value::Int(i64::try_from(*max_bytes).unwrap_or(i64::MAX)),
                ],
            ),
        }
    }

    /// Whether the request belongs to a transaction (begin, buffered operations, blob
    /// uploads, vote, finish, abort).
    pub fn is_transactional(&self) -> bool {
        matches!(
            self,
            Request::TpcBegin { .. }
                | Request::Storea { .. }
                | Request::CheckCurrentSerialInTransaction { .. }
                | Request::DeleteObject { .. }
                | Request::Restorea { .. }
                | Request::Undoa { .. }
                | Request::StoreBlobStart
                | Request::StoreBlobChunk { .. }
                | Request::StoreBlobEnd { .. }
                | Request::StoreBlobShared { .. }
                | Request::Vote { .. }
                | Request::TpcFinish { .. }
                | Request::TpcAbort { .. }
        )
    }

    /// Methods that only a registered connection may call all parse; this tells whether
    /// a request modifies the storage (refused on read-only connections).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::NewOids { .. }
                | Request::TpcBegin { .. }
                | Request::Storea { .. }
                | Request::CheckCurrentSerialInTransaction { .. }
                | Request::DeleteObject { .. }
                | Request::Restorea { .. }
                | Request::Undoa { .. }
                | Request::StoreBlobStart
                | Request::StoreBlobChunk { .. }
                | Request::StoreBlobEnd { .. }
                | Request::StoreBlobShared { .. }
                | Request::Vote { .. }
                | Request::TpcFinish { .. }
                | Request::TpcAbort { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(n: u64) -> Value {
        Value::from(Oid(n))
    }

    #[test]
    fn parses_load_before_and_rejects_bad_oids() {
        let r = Request::parse(
            "loadBefore",
            &Value::Tuple(vec![oid(1), Value::from(Tid::MAX)]),
        )
        .unwrap();
        assert_eq!(
            r,
            Request::LoadBefore {
                oid: Oid(1),
                before: Tid::MAX
            }
        );
        let e = Request::parse(
            "loadBefore",
            &Value::Tuple(vec![Value::bytes(&b"abc"[..]), oid(1)]),
        );
        assert!(matches!(
            e,
            Err(RequestError::BadArguments {
                method: "loadBefore",
                ..
            })
        ));
        let e = Request::parse("loadBefore", &Value::Tuple(vec![oid(1)]));
        assert!(e.is_err());
    }

    #[test]
    fn unknown_methods_are_refused() {
        assert_eq!(
            Request::parse("os.system", &Value::Tuple(vec![])),
            Err(RequestError::UnknownMethod("os.system".into()))
        );
    }

    #[test]
    fn tpc_begin_as_clientstorage_sends_it() {
        let args = Value::Tuple(vec![
            Value::Int(140_000_000_000_000),
            Value::bytes(&b"alice"[..]),
            Value::bytes(&b"first"[..]),
            Value::dict([("note", Value::str("hello"))]),
            Value::None,
            Value::str(" "),
        ]);
        match Request::parse("tpc_begin", &args).unwrap() {
            Request::TpcBegin {
                txn,
                user,
                status,
                tid,
                ..
            } => {
                assert_eq!(txn, Value::Int(140_000_000_000_000));
                assert_eq!(&user[..], b"alice");
                assert_eq!(status, b' ');
                assert_eq!(tid, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn new_oids_defaults_and_clamps() {
        assert_eq!(
            Request::parse("new_oids", &Value::Tuple(vec![])).unwrap(),
            Request::NewOids { count: 100 }
        );
        assert_eq!(
            Request::parse("new_oids", &Value::Tuple(vec![Value::Int(100_000)])).unwrap(),
            Request::NewOids { count: 100 }
        );
    }
}
