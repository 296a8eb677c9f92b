//! Typed replies and server-to-client callbacks, in both directions.
//!
//! Every reply shape the protocol uses is written here once: the server encodes it with
//! [`Reply::to_value`], a client (the proxy, the bench tool, tests) reads it back with
//! [`Reply::from_value`]. The shapes are the Python server's (`ZEO.StorageServer`), which
//! `ClientStorage` unpacks positionally or by key; each one round-trips through both
//! marshallings (see the property tests in `tests/replies.rs`).
//!
//! Decoding is lenient where Python servers vary (text where bytes are expected, a list
//! where a tuple is, extra keys) and strict where the value matters (an oid or tid must be
//! 8 bytes).

use crate::message::Encoding;
use crate::Value;
use bytes::Bytes;
use zodb::{CurrentRecord, DataRecord, HistoryEntry, Loaded, Oid, Tid, TransactionInfo, UndoEntry};

/// A reply or callback did not have the shape its method promises.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unexpected {what}: {got:?}")]
pub struct ReplyError {
    pub what: &'static str,
    pub got: Value,
}

fn bad<T>(what: &'static str, got: &Value) -> Result<T, ReplyError> {
    Err(ReplyError {
        what,
        got: got.clone(),
    })
}

/// A value a method returns: encoded by the server, decoded by a client.
pub trait Reply: Sized {
    fn to_value(&self) -> Value;
    fn from_value(v: &Value) -> Result<Self, ReplyError>;
}

/// An 8-byte id, from bytes (or 8 latin-1 characters, as old test code sends).
pub fn id_bytes(v: &Value) -> Option<[u8; 8]> {
    match v {
        Value::Bytes(b) => b.as_ref().try_into().ok(),
        Value::Str(s) if s.chars().count() == 8 && s.chars().all(|c| (c as u32) < 256) => {
            let mut out = [0u8; 8];
            for (o, c) in out.iter_mut().zip(s.chars()) {
                *o = c as u8;
            }
            Some(out)
        }
        _ => None,
    }
}

pub fn tid_of(v: &Value) -> Option<Tid> {
    id_bytes(v).map(|b| Tid(u64::from_be_bytes(b)))
}

pub fn oid_of(v: &Value) -> Option<Oid> {
    id_bytes(v).map(|b| Oid(u64::from_be_bytes(b)))
}

fn opt_tid(v: Option<&Value>) -> Result<Option<Tid>, ()> {
    match v {
        None | Some(Value::None) => Ok(None),
        Some(v) => tid_of(v).map(Some).ok_or(()),
    }
}

/// Text or bytes as bytes (descriptions and user names are bytes on Python 3 clients,
/// text on some others).
fn bytes_of(v: Option<&Value>) -> Vec<u8> {
    match v {
        Some(Value::Bytes(b)) => b.to_vec(),
        Some(Value::Str(s)) => s.as_bytes().to_vec(),
        _ => Vec::new(),
    }
}

fn oid_list(v: &Value) -> Option<Vec<Oid>> {
    v.as_seq()?.iter().map(oid_of).collect()
}

fn oids_value(oids: &[Oid]) -> Value {
    Value::List(oids.iter().copied().map(Value::from).collect())
}

impl Reply for Tid {
    fn to_value(&self) -> Value {
        Value::from(*self)
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        tid_of(v).map_or_else(|| bad("tid", v), Ok)
    }
}

/// Iterator ids (`iterator_start`, `iterator_record_start`).
impl Reply for i64 {
    fn to_value(&self) -> Value {
        Value::Int(*self)
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        v.as_int().map_or_else(|| bad("int", v), Ok)
    }
}

impl Reply for () {
    fn to_value(&self) -> Value {
        Value::None
    }
    fn from_value(_: &Value) -> Result<Self, ReplyError> {
        Ok(())
    }
}

impl Reply for Bytes {
    fn to_value(&self) -> Value {
        Value::Bytes(self.clone())
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        match v {
            Value::Bytes(b) => Ok(b.clone()),
            other => bad("bytes", other),
        }
    }
}

/// `loadBefore`: `(data, start, end)`, or `None` when there is no revision before the tid.
impl Reply for Option<Loaded> {
    fn to_value(&self) -> Value {
        match self {
            None => Value::None,
            Some(l) => Value::Tuple(vec![
                Value::Bytes(l.data.clone()),
                Value::from(l.start),
                l.end.map(Value::from).unwrap_or(Value::None),
            ]),
        }
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        if *v == Value::None {
            return Ok(None);
        }
        let parsed = (|| {
            let s = v.as_seq()?;
            if s.len() != 3 {
                return None;
            }
            Some(Loaded {
                data: s[0].as_bytes()?.clone(),
                start: tid_of(&s[1])?,
                end: opt_tid(s.get(2)).ok()?,
            })
        })();
        parsed.map_or_else(|| bad("loadBefore reply", v), |l| Ok(Some(l)))
    }
}

/// `new_oids`: a list of fresh oids.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOids(pub Vec<Oid>);

impl Reply for NewOids {
    fn to_value(&self) -> Value {
        oids_value(&self.0)
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        match oid_list(v) {
            Some(o) if !o.is_empty() => Ok(NewOids(o)),
            _ => bad("new_oids reply", v),
        }
    }
}

/// `getInvalidations` (and zeors' `zeors_changed_since`): `(latest tid, oids)`, or
/// `None` when the server cannot tell (the client must then drop its cache).
#[derive(Debug, Clone, PartialEq)]
pub struct Invalidations(pub Option<(Tid, Vec<Oid>)>);

impl Reply for Invalidations {
    fn to_value(&self) -> Value {
        match &self.0 {
            None => Value::None,
            Some((tid, oids)) => Value::Tuple(vec![Value::from(*tid), oids_value(oids)]),
        }
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        if *v == Value::None {
            return Ok(Invalidations(None));
        }
        let parsed = (|| {
            let s = v.as_seq()?;
            Some((tid_of(s.first()?)?, oid_list(s.get(1)?)?))
        })();
        parsed.map_or_else(
            || bad("getInvalidations reply", v),
            |p| Ok(Invalidations(Some(p))),
        )
    }
}

/// One item of a `vote` reply: an oid the server resolved itself (the client must not
/// cache its own copy), or a conflict for the client to resolve (ZEO 5's client-side
/// conflict resolution), as the dict `ClientStorage.tpc_vote` reads.
#[derive(Debug, Clone, PartialEq)]
pub enum VoteItem {
    Resolved(Oid),
    Conflict(zodb::Conflict),
}

/// The `vote` reply: empty when the transaction is ready and nothing changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VoteResult(pub Vec<VoteItem>);

impl VoteResult {
    pub fn conflicts(&self) -> impl Iterator<Item = &zodb::Conflict> {
        self.0.iter().filter_map(|i| match i {
            VoteItem::Conflict(c) => Some(c),
            VoteItem::Resolved(_) => None,
        })
    }

    pub fn resolved(&self) -> impl Iterator<Item = Oid> + '_ {
        self.0.iter().filter_map(|i| match i {
            VoteItem::Resolved(o) => Some(*o),
            VoteItem::Conflict(_) => None,
        })
    }
}

impl Reply for VoteResult {
    fn to_value(&self) -> Value {
        Value::List(
            self.0
                .iter()
                .map(|item| match item {
                    VoteItem::Resolved(oid) => Value::from(*oid),
                    VoteItem::Conflict(c) => Value::dict([
                        ("oid", Value::from(c.oid)),
                        ("serials", serials(c.committed, c.read)),
                        ("data", Value::Bytes(c.data.clone())),
                    ]),
                })
                .collect(),
        )
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        if *v == Value::None {
            return Ok(VoteResult::default());
        }
        let Some(items) = v.as_seq() else {
            return bad("vote reply", v);
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Value::Dict(_) => {
                    let parsed = (|| {
                        let (committed, read) = serials_of(item.get("serials")?)?;
                        Some(zodb::Conflict {
                            oid: oid_of(item.get("oid")?)?,
                            committed,
                            read,
                            data: item.get("data")?.as_bytes()?.clone(),
                        })
                    })();
                    match parsed {
                        Some(c) => out.push(VoteItem::Conflict(c)),
                        None => return bad("conflict in a vote reply", item),
                    }
                }
                other => match oid_of(other) {
                    Some(oid) => out.push(VoteItem::Resolved(oid)),
                    None => return bad("oid in a vote reply", other),
                },
            }
        }
        Ok(VoteResult(out))
    }
}

/// `(committed, read)`: the serials a conflict names, in the order ZODB's
/// `ConflictError(serials=...)` and ZEO's vote reply use.
pub fn serials(committed: Tid, read: Tid) -> Value {
    Value::Tuple(vec![Value::from(committed), Value::from(read)])
}

pub fn serials_of(v: &Value) -> Option<(Tid, Tid)> {
    let s = v.as_seq()?;
    Some((tid_of(s.first()?)?, tid_of(s.get(1)?)?))
}

/// The keys of a transaction description dict (`history`, `undoLog`); anything else in
/// such a dict came from the transaction's extension.
fn split_extension(items: &[(Value, Value)], known: &[&str]) -> Vec<u8> {
    let ext: Vec<(Value, Value)> = items
        .iter()
        .filter(|(k, _)| !k.as_str().is_some_and(|k| known.contains(&k)))
        .cloned()
        .collect();
    crate::extension_to_bytes(&Value::Dict(ext))
}

/// Merges a stored extension into a description dict: its keys last, replacing a key of
/// the same name (Python does `d.update(ext)`).
fn merge_extension(mut items: Vec<(Value, Value)>, extension: &[u8]) -> Value {
    for (k, v) in crate::extension_from_bytes(extension) {
        match items.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => items.push((k, v)),
        }
    }
    Value::Dict(items)
}

const HISTORY_KEYS: [&str; 6] = ["time", "tid", "serial", "user_name", "description", "size"];

/// `history(oid, size)`: one dict per revision, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct History(pub Vec<HistoryEntry>);

impl Reply for History {
    fn to_value(&self) -> Value {
        Value::List(
            self.0
                .iter()
                .map(|h| {
                    // As FileStorage.history builds it: the extension's dict, updated
                    // with the standard keys (which win over extension keys of the
                    // same name).
                    let mut items = crate::extension_from_bytes(&h.extension);
                    for (k, v) in [
                        ("time", Value::Float(zodb::timestamp::tid_to_unix(h.tid))),
                        ("tid", Value::from(h.tid)),
                        ("serial", Value::from(h.tid)),
                        ("user_name", Value::Bytes(Bytes::from(h.user.clone()))),
                        (
                            "description",
                            Value::Bytes(Bytes::from(h.description.clone())),
                        ),
                        ("size", Value::uint(h.size)),
                    ] {
                        let k = Value::str(k);
                        match items.iter_mut().find(|(key, _)| *key == k) {
                            Some(slot) => slot.1 = v,
                            None => items.push((k, v)),
                        }
                    }
                    Value::Dict(items)
                })
                .collect(),
        )
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        let Some(items) = v.as_seq() else {
            return bad("history reply", v);
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Value::Dict(d) = item else {
                return bad("history entry", item);
            };
            let Some(tid) = item.get("tid").and_then(tid_of) else {
                return bad("history entry", item);
            };
            out.push(HistoryEntry {
                tid,
                user: bytes_of(item.get("user_name")),
                description: bytes_of(item.get("description")),
                extension: split_extension(d, &HISTORY_KEYS),
                size: item.get("size").map_or(0, Value::as_uint),
            });
        }
        Ok(History(out))
    }
}

const UNDO_KEYS: [&str; 5] = ["id", "time", "user_name", "size", "description"];

/// `undoLog` / `undoInfo`: one dict per undoable transaction, newest first, keys in
/// Python's order with the extension's merged in last.
#[derive(Debug, Clone, PartialEq)]
pub struct UndoLog(pub Vec<UndoEntry>);

/// The dict `undoLog` returns for one transaction.
pub fn undo_dict(e: &UndoEntry) -> Value {
    let items = vec![
        (Value::str("id"), Value::Bytes(Bytes::from(e.id()))),
        (
            Value::str("time"),
            Value::Float(zodb::timestamp::tid_to_unix(e.tid)),
        ),
        (
            Value::str("user_name"),
            Value::Bytes(Bytes::from(e.user.clone())),
        ),
        (Value::str("size"), Value::uint(e.size)),
        (
            Value::str("description"),
            Value::Bytes(Bytes::from(e.description.clone())),
        ),
    ];
    merge_extension(items, &e.extension)
}

impl Reply for UndoLog {
    fn to_value(&self) -> Value {
        Value::List(self.0.iter().map(undo_dict).collect())
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        let Some(items) = v.as_seq() else {
            return bad("undo log reply", v);
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Value::Dict(d) = item else {
                return bad("undo log entry", item);
            };
            let id = bytes_of(item.get("id"));
            let Some(tid) = zodb::tid_from_undo_id(&id) else {
                return bad("undo id", item);
            };
            out.push(UndoEntry {
                tid,
                user: bytes_of(item.get("user_name")),
                description: bytes_of(item.get("description")),
                extension: split_extension(d, &UNDO_KEYS),
                size: item.get("size").map_or(0, Value::as_uint),
            });
        }
        Ok(UndoLog(out))
    }
}

/// `iterator_next`: `(tid, status, user, description, extension)`, `None` at the end.
impl Reply for Option<TransactionInfo> {
    fn to_value(&self) -> Value {
        match self {
            None => Value::None,
            Some(t) => Value::Tuple(vec![
                Value::from(t.tid),
                Value::Str(String::from_utf8_lossy(&[t.status]).into_owned()),
                Value::Bytes(Bytes::from(t.user.clone())),
                Value::Bytes(Bytes::from(t.description.clone())),
                Value::Dict(crate::extension_from_bytes(&t.extension)),
            ]),
        }
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        if *v == Value::None {
            return Ok(None);
        }
        let parsed = (|| {
            let s = v.as_seq()?;
            let status = match s.get(1)? {
                Value::Str(st) if st.len() == 1 => st.as_bytes()[0],
                Value::Bytes(b) if b.len() == 1 => b[0],
                _ => return None,
            };
            Some(TransactionInfo {
                tid: tid_of(s.first()?)?,
                status,
                user: bytes_of(s.get(2)),
                description: bytes_of(s.get(3)),
                extension: crate::extension_to_bytes(s.get(4)?),
            })
        })();
        parsed.map_or_else(|| bad("iterator_next reply", v), |t| Ok(Some(t)))
    }
}

/// `iterator_record_next`: `(oid, tid, data, data_txn)`, `None` at the end.
impl Reply for Option<DataRecord> {
    fn to_value(&self) -> Value {
        match self {
            None => Value::None,
            Some(r) => Value::Tuple(vec![
                Value::from(r.oid),
                Value::from(r.tid),
                r.data.clone().map(Value::Bytes).unwrap_or(Value::None),
                r.data_txn.map(Value::from).unwrap_or(Value::None),
            ]),
        }
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        if *v == Value::None {
            return Ok(None);
        }
        let parsed = (|| {
            let s = v.as_seq()?;
            let data = match s.get(2)? {
                Value::None => None,
                Value::Bytes(b) => Some(b.clone()),
                _ => return None,
            };
            Some(DataRecord {
                oid: oid_of(s.first()?)?,
                tid: tid_of(s.get(1)?)?,
                data,
                data_txn: opt_tid(s.get(3)).ok()?,
            })
        })();
        parsed.map_or_else(|| bad("iterator_record_next reply", v), |r| Ok(Some(r)))
    }
}

/// `record_iternext`: `(oid, tid, data, next oid or None)`.
impl Reply for CurrentRecord {
    fn to_value(&self) -> Value {
        Value::Tuple(vec![
            Value::from(self.oid),
            Value::from(self.tid),
            Value::Bytes(self.data.clone()),
            self.next.map(Value::from).unwrap_or(Value::None),
        ])
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        let parsed = (|| {
            let s = v.as_seq()?;
            let next = match s.get(3) {
                None | Some(Value::None) => None,
                Some(o) => Some(oid_of(o)?),
            };
            Some(CurrentRecord {
                oid: oid_of(s.first()?)?,
                tid: tid_of(s.get(1)?)?,
                data: s.get(2)?.as_bytes()?.clone(),
                next,
            })
        })();
        parsed.map_or_else(|| bad("record_iternext reply", v), Ok)
    }
}

/// zeors' `zeors_current_records`: current records in oid order, as of at least
/// `snapshot` (the server's last transaction when it began reading: each record is the
/// object's current one at some moment after it), and where to continue: the first oid
/// after the last record that exists (it may lie past the range asked for), `None` when
/// there is none.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CurrentRecords {
    pub snapshot: Tid,
    /// (oid, serial, data)
    pub records: Vec<(Oid, Tid, Bytes)>,
    pub next: Option<Oid>,
}

impl Reply for CurrentRecords {
    fn to_value(&self) -> Value {
        Value::Tuple(vec![
            Value::from(self.snapshot),
            Value::List(
                self.records
                    .iter()
                    .map(|(oid, tid, data)| {
                        Value::Tuple(vec![
                            Value::from(*oid),
                            Value::from(*tid),
                            Value::Bytes(data.clone()),
                        ])
                    })
                    .collect(),
            ),
            self.next.map(Value::from).unwrap_or(Value::None),
        ])
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        let parsed = (|| {
            let s = v.as_seq()?;
            let records = s
                .get(1)?
                .as_seq()?
                .iter()
                .map(|r| {
                    let r = r.as_seq()?;
                    Some((
                        oid_of(r.first()?)?,
                        tid_of(r.get(1)?)?,
                        r.get(2)?.as_bytes()?.clone(),
                    ))
                })
                .collect::<Option<Vec<_>>>()?;
            let next = match s.get(2) {
                None | Some(Value::None) => None,
                Some(o) => Some(oid_of(o)?),
            };
            Some(CurrentRecords {
                snapshot: tid_of(s.first()?)?,
                records,
                next,
            })
        })();
        parsed.map_or_else(|| bad("zeors_current_records reply", v), Ok)
    }
}

/// `get_info`: what the storage is and what it implements.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Info {
    pub length: u64,
    pub size: u64,
    pub name: String,
    pub supports_undo: bool,
    pub supports_record_iternext: bool,
    /// `(module, name)` of each interface, as `zope.interface` names them.
    pub interfaces: Vec<(String, String)>,
    /// zeors extensions the server offers (`changed_since`, `current_records`); empty for
    /// stock servers.
    pub extensions: Vec<String>,
}

impl Info {
    /// Whether the storage provides `ZODB.interfaces.<name>`.
    pub fn provides(&self, name: &str) -> bool {
        self.interfaces
            .iter()
            .any(|(m, n)| m == "ZODB.interfaces" && n == name)
    }
}

impl Reply for Info {
    fn to_value(&self) -> Value {
        Value::dict([
            ("length", Value::uint(self.length)),
            ("size", Value::uint(self.size)),
            ("name", Value::Str(self.name.clone())),
            ("supportsUndo", Value::Bool(self.supports_undo)),
            (
                "supports_record_iternext",
                Value::Bool(self.supports_record_iternext),
            ),
            (
                "interfaces",
                Value::Tuple(
                    self.interfaces
                        .iter()
                        .map(|(m, n)| Value::Tuple(vec![Value::str(m), Value::str(n)]))
                        .collect(),
                ),
            ),
            // Stock clients ignore keys they do not know.
            (
                "zeors_extensions",
                Value::Tuple(self.extensions.iter().map(Value::str).collect()),
            ),
        ])
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        if !matches!(v, Value::Dict(_)) {
            return bad("get_info reply", v);
        }
        let int = |k: &str| v.get(k).map_or(0, Value::as_uint);
        let names = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(Value::as_seq)
                .unwrap_or(&[])
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        };
        Ok(Info {
            length: int("length"),
            size: int("size"),
            name: v
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            supports_undo: v.get("supportsUndo").is_some_and(Value::truthy),
            supports_record_iternext: v.get("supports_record_iternext").is_some_and(Value::truthy),
            interfaces: v
                .get("interfaces")
                .and_then(Value::as_seq)
                .unwrap_or(&[])
                .iter()
                .filter_map(|pair| {
                    let p = pair.as_seq()?;
                    Some((
                        p.first()?.as_str()?.to_string(),
                        p.get(1)?.as_str()?.to_string(),
                    ))
                })
                .collect(),
            extensions: names("zeors_extensions"),
        })
    }
}

/// The size figures of the `info` callback (sent after commits and packs).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SizeInfo {
    pub length: u64,
    pub size: u64,
}

impl Reply for SizeInfo {
    fn to_value(&self) -> Value {
        Value::dict([
            ("length", Value::uint(self.length)),
            ("size", Value::uint(self.size)),
        ])
    }
    fn from_value(v: &Value) -> Result<Self, ReplyError> {
        if !matches!(v, Value::Dict(_)) {
            return bad("info", v);
        }
        let int = |k: &str| v.get(k).map_or(0, Value::as_uint);
        Ok(SizeInfo {
            length: int("length"),
            size: int("size"),
        })
    }
}

/// Server-to-client callbacks.
#[derive(Debug, Clone, PartialEq)]
pub enum Callback {
    InvalidateTransaction { tid: Tid, oids: Vec<Oid> },
    Info(SizeInfo),
    ReceiveBlobStart { oid: Oid, serial: Tid },
    ReceiveBlobChunk { oid: Oid, serial: Tid, chunk: Bytes },
    ReceiveBlobStop { oid: Oid, serial: Tid },
}

impl Callback {
    pub fn name(&self) -> &'static str {
        match self {
            Callback::InvalidateTransaction { .. } => "invalidateTransaction",
            Callback::Info(_) => "info",
            Callback::ReceiveBlobStart { .. } => "receiveBlobStart",
            Callback::ReceiveBlobChunk { .. } => "receiveBlobChunk",
            Callback::ReceiveBlobStop { .. } => "receiveBlobStop",
        }
    }

    pub fn args(&self) -> Vec<Value> {
        match self {
            Callback::InvalidateTransaction { tid, oids } => {
                vec![Value::from(*tid), oids_value(oids)]
            }
            Callback::Info(i) => vec![i.to_value()],
            Callback::ReceiveBlobStart { oid, serial }
            | Callback::ReceiveBlobStop { oid, serial } => {
                vec![Value::from(*oid), Value::from(*serial)]
            }
            Callback::ReceiveBlobChunk { oid, serial, chunk } => vec![
                Value::from(*oid),
                Value::from(*serial),
                Value::Bytes(chunk.clone()),
            ],
        }
    }

    /// The callback as a ready-to-send frame.
    pub fn frame(&self, encoding: Encoding) -> Bytes {
        crate::message::callback_frame(encoding, self.name(), self.args())
    }

    /// Reads a callback; `Ok(None)` for a name this side does not know (ignored, as
    /// Python ignores nothing but we may meet newer servers).
    pub fn parse(name: &str, args: &Value) -> Result<Option<Callback>, ReplyError> {
        let empty = [];
        let a = match args {
            Value::Tuple(v) | Value::List(v) => v.as_slice(),
            Value::None => &empty,
            other => return bad("callback arguments", other),
        };
        let oid_serial =
            || -> Option<(Oid, Tid)> { Some((oid_of(a.first()?)?, tid_of(a.get(1)?)?)) };
        let parsed = match name {
            "invalidateTransaction" => (|| {
                Some(Callback::InvalidateTransaction {
                    tid: tid_of(a.first()?)?,
                    oids: oid_list(a.get(1)?)?,
                })
            })(),
            "info" => a
                .first()
                .and_then(|v| SizeInfo::from_value(v).ok())
                .map(Callback::Info),
            "receiveBlobStart" => {
                oid_serial().map(|(oid, serial)| Callback::ReceiveBlobStart { oid, serial })
            }
            "receiveBlobStop" => {
                oid_serial().map(|(oid, serial)| Callback::ReceiveBlobStop { oid, serial })
            }
            "receiveBlobChunk" => (|| {
                let (oid, serial) = oid_serial()?;
                Some(Callback::ReceiveBlobChunk {
                    oid,
                    serial,
                    chunk: a.get(2)?.as_bytes()?.clone(),
                })
            })(),
            _ => return Ok(None),
        };
        parsed.map_or_else(|| bad("callback", args), |c| Ok(Some(c)))
    }
}
