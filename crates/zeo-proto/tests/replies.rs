//! Every request, reply and callback round-trips through its encoder and decoder, in both
//! marshallings: what the server writes, a client reads back as the same typed value
//! (and the other way round for requests). A shape written differently on the two sides
//! fails here, not against a proxy in production.

// The crate's cast lints (see src/lib.rs).
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(clippy::cast_lossless)]

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::Config;
use zeo_proto::message::{self, Encoding};
use zeo_proto::reply::{
    Callback, CurrentRecords, History, Info, Invalidations, NewOids, SizeInfo, UndoLog, VoteItem,
    VoteResult,
};
use zeo_proto::{Limits, Message, Reply, Request, Value};
use zodb::{
    Conflict, CurrentRecord, DataRecord, HistoryEntry, Loaded, Oid, Tid, TransactionInfo, UndoEntry,
};

fn cases() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(300);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn encodings() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Pickle), Just(Encoding::Msgpack)]
}

fn oid() -> impl Strategy<Value = Oid> {
    any::<u64>().prop_map(Oid)
}

fn tid() -> impl Strategy<Value = Tid> {
    any::<u64>().prop_map(Tid)
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!['a', 'Z', 'é', '日', ' ', '/']),
        0..12,
    )
    .prop_map(|c| c.into_iter().collect())
}

/// A pickled extension dict, as stored in a transaction record; its keys never collide
/// with the keys a description dict has of its own.
fn extension() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        (
            prop::sample::select(vec!["x_note", "x_path", "x_user", "x_n"]),
            prop_oneof![
                any::<i32>().prop_map(|i| Value::Int(i.into())),
                text().prop_map(Value::Str)
            ],
        ),
        0..3,
    )
    .prop_map(|items| {
        let mut seen = Vec::new();
        let items: Vec<(Value, Value)> = items
            .into_iter()
            .filter(|(k, _)| {
                let new = !seen.contains(k);
                seen.push(*k);
                new
            })
            .map(|(k, v)| (Value::str(k), v))
            .collect();
        zeo_proto::extension_to_bytes(&Value::Dict(items))
    })
}

fn status() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![b' ', b'p', b'c', b'u'])
}

fn round_trip<R: Reply + PartialEq + std::fmt::Debug>(enc: Encoding, r: &R) {
    let wire = enc.encode(&r.to_value());
    let decoded = enc
        .decode(&wire, &Limits::default().for_message(wire.len()))
        .expect("decodes");
    let back = R::from_value(&decoded).expect("reads back");
    assert_eq!(&back, r, "{enc:?}");
}

fn loaded() -> impl Strategy<Value = Option<Loaded>> {
    prop::option::of(
        (bytes(200), tid(), prop::option::of(tid())).prop_map(|(data, start, end)| Loaded {
            data,
            start,
            end,
        }),
    )
}

fn vote() -> impl Strategy<Value = VoteResult> {
    prop::collection::vec(
        prop_oneof![
            oid().prop_map(VoteItem::Resolved),
            (oid(), tid(), tid(), bytes(100)).prop_map(|(oid, committed, read, data)| {
                VoteItem::Conflict(Conflict {
                    oid,
                    committed,
                    read,
                    data,
                })
            })
        ],
        0..5,
    )
    .prop_map(VoteResult)
}

fn history() -> impl Strategy<Value = History> {
    prop::collection::vec(
        (tid(), bytes(20), bytes(40), extension(), 0u64..1 << 40).prop_map(
            |(tid, user, description, extension, size)| HistoryEntry {
                tid,
                user: user.to_vec(),
                description: description.to_vec(),
                extension,
                size,
            },
        ),
        0..4,
    )
    .prop_map(History)
}

fn undo_log() -> impl Strategy<Value = UndoLog> {
    prop::collection::vec(
        (tid(), bytes(20), bytes(40), extension(), 0u64..1 << 40).prop_map(
            |(tid, user, description, extension, size)| UndoEntry {
                tid,
                user: user.to_vec(),
                description: description.to_vec(),
                extension,
                size,
            },
        ),
        0..4,
    )
    .prop_map(UndoLog)
}

fn txn_info() -> impl Strategy<Value = Option<TransactionInfo>> {
    prop::option::of(
        (tid(), status(), bytes(20), bytes(40), extension()).prop_map(
            |(tid, status, user, description, extension)| TransactionInfo {
                tid,
                status,
                user: user.to_vec(),
                description: description.to_vec(),
                extension,
            },
        ),
    )
}

fn data_record() -> impl Strategy<Value = Option<DataRecord>> {
    prop::option::of(
        (
            oid(),
            tid(),
            prop::option::of(bytes(100)),
            prop::option::of(tid()),
        )
            .prop_map(|(oid, tid, data, data_txn)| DataRecord {
                oid,
                tid,
                data,
                data_txn,
            }),
    )
}

fn current_record() -> impl Strategy<Value = CurrentRecord> {
    (oid(), tid(), bytes(100), prop::option::of(oid())).prop_map(|(oid, tid, data, next)| {
        CurrentRecord {
            oid,
            tid,
            data,
            next,
        }
    })
}

fn current_records() -> impl Strategy<Value = CurrentRecords> {
    (
        tid(),
        prop::collection::vec((oid(), tid(), bytes(100)), 0..5),
        prop::option::of(oid()),
    )
        .prop_map(|(snapshot, records, next)| CurrentRecords {
            snapshot,
            records,
            next,
        })
}

fn info() -> impl Strategy<Value = Info> {
    (
        0u64..1 << 50,
        0u64..1 << 50,
        text(),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(
            prop::sample::select(vec!["IStorage", "IBlobStorage", "IStorageUndoable"]),
            0..3,
        ),
        prop::collection::vec(
            prop::sample::select(vec!["changed_since", "current_records"]).prop_map(String::from),
            0..2,
        ),
    )
        .prop_map(
            |(length, size, name, undo, iternext, ifaces, extensions)| Info {
                length,
                size,
                name,
                supports_undo: undo,
                supports_record_iternext: iternext,
                interfaces: ifaces
                    .into_iter()
                    .map(|n| ("ZODB.interfaces".to_string(), n.to_string()))
                    .collect(),
                extensions,
            },
        )
}

fn callback() -> impl Strategy<Value = Callback> {
    prop_oneof![
        (tid(), prop::collection::vec(oid(), 0..5))
            .prop_map(|(tid, oids)| Callback::InvalidateTransaction { tid, oids }),
        (0u64..1 << 50, 0u64..1 << 50)
            .prop_map(|(length, size)| Callback::Info(SizeInfo { length, size })),
        (oid(), tid()).prop_map(|(oid, serial)| Callback::ReceiveBlobStart { oid, serial }),
        (oid(), tid(), bytes(300)).prop_map(|(oid, serial, chunk)| Callback::ReceiveBlobChunk {
            oid,
            serial,
            chunk
        }),
        (oid(), tid()).prop_map(|(oid, serial)| Callback::ReceiveBlobStop { oid, serial }),
    ]
}

fn txn_id() -> impl Strategy<Value = Value> {
    any::<i64>().prop_map(Value::Int)
}

fn request() -> impl Strategy<Value = Request> {
    let a = prop_oneof![
        (text(), any::<bool>())
            .prop_map(|(storage, read_only)| Request::Register { storage, read_only }),
        Just(Request::GetInfo),
        Just(Request::LastTransaction),
        tid().prop_map(|tid| Request::GetInvalidations { tid }),
        (1usize..=100).prop_map(|count| Request::NewOids { count }),
        Just(Request::NewOid),
        (-1e12f64..1e12, any::<bool>()).prop_map(|(time, wait)| Request::Pack { time, wait }),
        (oid(), tid()).prop_map(|(oid, before)| Request::LoadBefore { oid, before }),
        (oid(), tid()).prop_map(|(oid, serial)| Request::LoadSerial { oid, serial }),
        oid().prop_map(|oid| Request::GetTid { oid }),
        (
            proptest::option::of(oid()),
            proptest::option::of(1usize..1000)
        )
            .prop_map(|(oid, size)| Request::History { oid, size }),
        (
            txn_id(),
            bytes(20),
            bytes(40),
            extension(),
            prop::option::of(tid()),
            status()
        )
            .prop_map(|(txn, user, description, ext, tid, status)| {
                Request::TpcBegin {
                    txn,
                    user,
                    description,
                    extension: Value::Dict(zeo_proto::extension_from_bytes(&ext)),
                    tid,
                    status,
                }
            }),
    ];
    let b = prop_oneof![
        (oid(), tid(), bytes(100), txn_id()).prop_map(|(oid, serial, data, txn)| {
            Request::Storea {
                oid,
                serial,
                data,
                txn,
            }
        }),
        (oid(), tid(), txn_id()).prop_map(|(oid, serial, txn)| {
            Request::CheckCurrentSerialInTransaction { oid, serial, txn }
        }),
        (oid(), tid(), txn_id()).prop_map(|(oid, serial, txn)| Request::DeleteObject {
            oid,
            serial,
            txn
        }),
        (
            oid(),
            tid(),
            prop::option::of(bytes(100)),
            prop::option::of(tid()),
            txn_id()
        )
            .prop_map(|(oid, serial, data, prev_txn, txn)| Request::Restorea {
                oid,
                serial,
                data,
                prev_txn,
                txn
            }),
        (bytes(12), txn_id()).prop_map(|(transaction_id, txn)| Request::Undoa {
            transaction_id,
            txn
        }),
        Just(Request::StoreBlobStart),
        bytes(300).prop_map(|chunk| Request::StoreBlobChunk { chunk }),
        (oid(), tid(), bytes(50), txn_id()).prop_map(|(oid, serial, data, txn)| {
            Request::StoreBlobEnd {
                oid,
                serial,
                data,
                txn,
            }
        }),
        (oid(), tid(), bytes(50), text(), txn_id()).prop_map(
            |(oid, serial, data, filename, txn)| Request::StoreBlobShared {
                oid,
                serial,
                data,
                filename,
                txn
            }
        ),
        (oid(), tid()).prop_map(|(oid, serial)| Request::SendBlob { oid, serial }),
        txn_id().prop_map(|txn| Request::Vote { txn }),
        txn_id().prop_map(|txn| Request::TpcFinish { txn }),
        txn_id().prop_map(|txn| Request::TpcAbort { txn }),
    ];
    let c = prop_oneof![
        (any::<i32>(), any::<i32>()).prop_map(|(f, l)| Request::UndoLog {
            first: f.into(),
            last: l.into()
        }),
        (
            any::<i32>(),
            any::<i32>(),
            prop_oneof![
                Just(Value::None),
                extension().prop_map(|e| Value::Dict(zeo_proto::extension_from_bytes(&e)))
            ]
        )
            .prop_map(|(f, l, spec)| Request::UndoInfo {
                first: f.into(),
                last: l.into(),
                spec
            }),
        (prop::option::of(tid()), prop::option::of(tid()))
            .prop_map(|(start, stop)| Request::IteratorStart { start, stop }),
        any::<i64>().prop_map(|iid| Request::IteratorNext { iid }),
        (any::<i64>(), tid())
            .prop_map(|(txn_iid, tid)| Request::IteratorRecordStart { txn_iid, tid }),
        any::<i64>().prop_map(|riid| Request::IteratorRecordNext { riid }),
        prop::collection::vec(any::<i64>(), 0..5).prop_map(|iids| Request::IteratorGc { iids }),
        prop::option::of(bytes(8)).prop_map(|next| Request::RecordIternext { next }),
        Just(Request::ServerStatus),
        text().prop_map(|label| Request::SetClientLabel { label }),
        Just(Request::Ping),
        tid().prop_map(|tid| Request::ChangedSince { tid }),
        text().prop_map(|method| Request::Compress { method }),
        (oid(), prop::option::of(oid()), 0u64..1 << 40).prop_map(|(first, end, max_bytes)| {
            Request::CurrentRecords {
                first,
                end,
                max_bytes,
            }
        }),
    ];
    prop_oneof![a, b, c]
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn requests_round_trip(enc in encodings(), r in request()) {
        let (name, args) = r.to_call();
        let wire = message::encode_call(enc, &Value::Int(7), false, name, args);
        let m = Message::decode(enc, &wire, &Limits::default()).unwrap();
        prop_assert_eq!(Request::parse(&m.name, &m.args).unwrap(), r);
    }

    #[test]
    fn load_replies_round_trip(enc in encodings(), r in loaded()) { round_trip(enc, &r) }

    #[test]
    fn tid_replies_round_trip(enc in encodings(), t in tid()) { round_trip(enc, &t) }

    #[test]
    fn new_oids_round_trip(enc in encodings(), o in prop::collection::vec(oid(), 1..100)) {
        round_trip(enc, &NewOids(o))
    }

    #[test]
    fn invalidations_round_trip(enc in encodings(), i in prop::option::of((tid(), prop::collection::vec(oid(), 0..20)))) {
        round_trip(enc, &Invalidations(i))
    }

    #[test]
    fn vote_replies_round_trip(enc in encodings(), v in vote()) { round_trip(enc, &v) }

    #[test]
    fn history_round_trips(enc in encodings(), h in history()) { round_trip(enc, &h) }

    #[test]
    fn undo_logs_round_trip(enc in encodings(), u in undo_log()) { round_trip(enc, &u) }

    #[test]
    fn iterator_transactions_round_trip(enc in encodings(), t in txn_info()) { round_trip(enc, &t) }

    #[test]
    fn iterator_records_round_trip(enc in encodings(), r in data_record()) { round_trip(enc, &r) }

    #[test]
    fn current_records_round_trip(enc in encodings(), r in current_record()) { round_trip(enc, &r) }

    #[test]
    fn bulk_current_records_round_trip(enc in encodings(), r in current_records()) { round_trip(enc, &r) }

    #[test]
    fn info_round_trips(enc in encodings(), i in info()) { round_trip(enc, &i) }

    #[test]
    fn callbacks_round_trip(enc in encodings(), c in callback()) {
        let frame = c.frame(enc);
        let m = Message::decode(enc, &frame[4..], &Limits::default()).unwrap();
        prop_assert_eq!(Callback::parse(&m.name, &m.args).unwrap(), Some(c));
    }
}

/// The decoders are not so lenient that anything passes: wrong shapes are refused.
#[test]
fn wrong_shapes_are_refused() {
    assert!(<Option<Loaded>>::from_value(&Value::Tuple(vec![Value::Int(1)])).is_err());
    assert!(Tid::from_value(&Value::bytes(&b"short"[..])).is_err());
    assert!(NewOids::from_value(&Value::List(vec![])).is_err());
    assert!(VoteResult::from_value(&Value::List(vec![Value::Int(3)])).is_err());
    assert!(VoteResult::from_value(&Value::List(vec![Value::dict([(
        "oid",
        Value::from(Oid(1))
    )])]))
    .is_err());
    assert!(
        History::from_value(&Value::List(vec![Value::dict([("size", Value::Int(1))])])).is_err()
    );
    assert!(Callback::parse("invalidateTransaction", &Value::Tuple(vec![Value::Int(1)])).is_err());
    assert_eq!(
        Callback::parse("somethingNew", &Value::Tuple(vec![])),
        Ok(None)
    );
}
