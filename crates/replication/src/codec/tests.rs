use super::*;

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Feeds `stream` to a framer in chunks of `chunk` bytes and returns the messages.
fn split(stream: &[u8], chunk: usize) -> Vec<Bytes> {
    let mut f = Framer::new(MAX_MESSAGE);
    let mut out = Vec::new();
    for part in stream.chunks(chunk) {
        f.feed(part);
        while let Some(m) = f.next_message().unwrap() {
            out.push(m);
        }
    }
    assert!(f.next_message().unwrap().is_none());
    out
}

const START: Tid = Tid(0x03f5_9458_1777_7777);

/// A stream made by zc.zrs's own code (see `make_fixture.py`) decodes into the
/// transactions it describes, checksums included, however the bytes are split.
#[test]
fn decodes_a_stream_made_by_zc_zrs() {
    let stream = unhex(include_str!("python_stream.hex"));
    for chunk in [1, 3, 7, 64, stream.len()] {
        let mut d = StreamDecoder::new(START, Dialect::Stock);
        let events: Vec<Event> = split(&stream, chunk)
            .into_iter()
            .map(|m| d.message(m).unwrap())
            .filter(|e| *e != Event::Nothing)
            .collect();
        let tid = Tid(0x03f5_9458_1777_7788);
        let rec = |oid: u64, data_txn| RecordHeader {
            oid: Oid(oid),
            serial: tid,
            data_txn,
        };
        assert_eq!(
            events,
            vec![
                Event::Begin(TxnHeader {
                    tid,
                    status: b' ',
                    user: b"/site admin".to_vec(),
                    description: b"added a file".to_vec(),
                    extension: zeo_proto::extension_to_bytes(&Value::dict([
                        ("x", Value::Int(1)),
                        ("user_name", Value::str("admin")),
                    ])),
                }),
                Event::Record {
                    header: rec(0, None),
                    data: Some(Bytes::from_static(b"root pickle")),
                },
                Event::Record {
                    header: rec(2, Some(START)),
                    data: Some(Bytes::from_static(b"old data")),
                },
                Event::Record {
                    header: rec(3, None),
                    data: None,
                },
                Event::BlobRecord {
                    header: rec(4, None),
                    data: Bytes::from_static(b"blob pickle"),
                    blocks: 2,
                },
                Event::BlobBlock(Bytes::from_static(b"ab")),
                Event::BlobBlock(Bytes::from_static(b"c")),
                Event::Commit { tid },
                Event::Begin(TxnHeader {
                    tid: Tid(0x03f5_9458_1777_7799),
                    status: b'p',
                    user: vec![],
                    description: vec![],
                    extension: vec![],
                }),
                Event::Commit {
                    tid: Tid(0x03f5_9458_1777_7799)
                },
            ]
        );
        assert!(d.between_transactions());
    }
}

/// The checksum covers every message: one changed byte anywhere before a `C` fails it,
/// and so does a stream seeded with another start tid.
#[test]
fn a_damaged_stream_fails_its_checksum() {
    let stream = unhex(include_str!("python_stream.hex"));
    let messages = split(&stream, stream.len());
    let mut wrong_start = StreamDecoder::new(Tid(1), Dialect::Stock);
    let err = messages
        .iter()
        .map(|m| wrong_start.message(m.clone()))
        .find_map(Result::err)
        .unwrap();
    assert!(matches!(err, CodecError::BadChecksum { .. }), "{err}");
    // Change the record data "root pickle" (message 2) into "ROOT pickle".
    let mut d = StreamDecoder::new(START, Dialect::Stock);
    let mut failed = false;
    for (i, m) in messages.into_iter().enumerate() {
        let m = if i == 2 {
            let mut v = m.to_vec();
            v[0] = b'R';
            Bytes::from(v)
        } else {
            m
        };
        match d.message(m) {
            Ok(_) => {}
            Err(CodecError::BadChecksum { .. }) => {
                failed = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(failed);
}

fn sample_txn(ext: Vec<u8>) -> TxnHeader {
    TxnHeader {
        tid: Tid(0x03f5_9458_2000_0000),
        status: b' ',
        user: b"admin".to_vec(),
        description: b"edit".to_vec(),
        extension: ext,
    }
}

/// What the encoder writes, the decoder reads back, in both dialects.
#[test]
fn encoder_and_decoder_agree() {
    // A pickle of {'a': 1} as Python's ZODB writes it (protocol 3 with memo).
    let python_ext = unhex("80037d710058010000006171014b01732e");
    for dialect in [Dialect::Stock, Dialect::Zeors] {
        let mut e = StreamEncoder::new(START, dialect);
        let t = sample_txn(python_ext.clone());
        let r = RecordHeader {
            oid: Oid(7),
            serial: t.tid,
            data_txn: Some(START),
        };
        let mut wire = Vec::new();
        wire.extend_from_slice(&e.transaction(&t));
        for m in e.record(&r, Some(b"data")) {
            wire.extend_from_slice(&m);
        }
        for m in e.record(&r, None) {
            wire.extend_from_slice(&m);
        }
        for m in e.blob_record(&r, b"blob", 1) {
            wire.extend_from_slice(&m);
        }
        wire.extend_from_slice(&e.blob_block(b"x"));
        for m in e.blob_record(&r, b"empty blob", 0) {
            wire.extend_from_slice(&m);
        }
        wire.extend_from_slice(&e.checksum());
        let hb = e.heartbeat(Heartbeat {
            last_tid: t.tid,
            pending: 3,
        });
        assert_eq!(hb.is_some(), dialect == Dialect::Zeors);
        if let Some(hb) = hb {
            wire.extend_from_slice(&hb);
        }
        let mut d = StreamDecoder::new(START, dialect);
        let events: Vec<Event> = split(&wire, 5)
            .into_iter()
            .map(|m| d.message(m).unwrap())
            .filter(|e| *e != Event::Nothing)
            .collect();
        let Event::Begin(got) = &events[0] else {
            panic!("{events:?}")
        };
        if dialect == Dialect::Zeors {
            // The exact bytes of the Data.fs travel.
            assert_eq!(got, &t);
        } else {
            // The dict travels and is pickled again, as zc.zrs's secondary does.
            assert_eq!(
                zeo_proto::extension_from_bytes(&got.extension),
                vec![(Value::str("a"), Value::Int(1))]
            );
        }
        assert_eq!(
            events[1..7],
            [
                Event::Record {
                    header: r.clone(),
                    data: Some(Bytes::from_static(b"data"))
                },
                Event::Record {
                    header: r.clone(),
                    data: None
                },
                Event::BlobRecord {
                    header: r.clone(),
                    data: Bytes::from_static(b"blob"),
                    blocks: 1
                },
                Event::BlobBlock(Bytes::from_static(b"x")),
                Event::BlobRecord {
                    header: r.clone(),
                    data: Bytes::from_static(b"empty blob"),
                    blocks: 0
                },
                Event::Commit { tid: t.tid },
            ]
        );
        if dialect == Dialect::Zeors {
            assert_eq!(
                events[7],
                Event::Heartbeat(Heartbeat {
                    last_tid: t.tid,
                    pending: 3
                })
            );
        }
    }
}

#[test]
fn messages_out_of_order_are_errors() {
    let mut e = StreamEncoder::new(START, Dialect::Stock);
    let r = RecordHeader {
        oid: Oid(1),
        serial: Tid(5),
        data_txn: None,
    };
    // A record before any transaction.
    let mut d = StreamDecoder::new(START, Dialect::Stock);
    let [s, _] = e.record(&r, Some(b"x"));
    let err = d.message(s.slice(4..)).unwrap_err();
    assert!(matches!(err, CodecError::Unexpected { .. }), "{err}");
    // A heartbeat in the stock dialect.
    let mut z = StreamEncoder::new(START, Dialect::Zeors);
    let hb = z
        .heartbeat(Heartbeat {
            last_tid: Tid(1),
            pending: 0,
        })
        .unwrap();
    let mut d = StreamDecoder::new(START, Dialect::Stock);
    assert!(d.message(hb.slice(4..)).is_err());
    // Garbage.
    let mut d = StreamDecoder::new(START, Dialect::Stock);
    assert!(d.message(Bytes::from_static(b"not a pickle")).is_err());
    // A blob block longer than a block.
    let mut e = StreamEncoder::new(START, Dialect::Stock);
    let mut d = StreamDecoder::new(START, Dialect::Stock);
    let mut msgs = vec![e.transaction(&sample_txn(vec![]))];
    msgs.extend(e.blob_record(&r, b"b", 1));
    msgs.push(e.blob_block(&vec![0; BLOB_BLOCK_SIZE + 1]));
    let results: Vec<_> = msgs.into_iter().map(|m| d.message(m.slice(4..))).collect();
    assert!(results[..3].iter().all(Result::is_ok));
    assert!(results[3].is_err());
}

#[test]
fn framer_limits_message_size() {
    let mut f = Framer::new(10);
    f.feed(&sized(b"0123456789"));
    assert_eq!(f.next_message().unwrap().unwrap(), &b"0123456789"[..]);
    f.feed(&sized(b"01234567890"));
    assert!(matches!(
        f.next_message(),
        Err(CodecError::TooLarge(11, 10))
    ));
    let mut f = Framer::new(10);
    f.feed(&keep_alive());
    assert_eq!(f.next_message().unwrap().unwrap(), Bytes::new());
}

#[test]
fn the_primary_reads_stock_and_zeors_openings() {
    let last = Tid(0x03f5_9458_1777_7777);
    let messages = |ms: Vec<Bytes>| -> Vec<Bytes> {
        let wire: Vec<u8> = ms.iter().flat_map(|m| m.to_vec()).collect();
        split(&wire, 3)
    };
    for protocol in [Protocol::V20, Protocol::V21] {
        let mut o = OpeningDecoder::new();
        let ms = messages(opening(protocol, Dialect::Stock, last, None));
        assert_eq!(ms[0], protocol.name().as_bytes());
        assert_eq!(o.message(&ms[0]).unwrap(), None);
        assert_eq!(
            o.message(&ms[1]).unwrap(),
            Some(Opening::Stock { protocol, last })
        );
        // Keep-alives are fine afterwards; anything else is not.
        assert_eq!(o.message(b"").unwrap(), None);
        assert!(matches!(
            o.message(b"more"),
            Err(CodecError::TooManyMessages)
        ));
    }
    let hello = ReplicaHello {
        last,
        recent: vec![
            Held {
                tid: last,
                meta: [1; 16],
                records: Some([3; 16]),
            },
            Held {
                tid: Tid(5),
                meta: [2; 16],
                records: None,
            },
        ],
        compression: vec!["zstd".into()],
    };
    let mut o = OpeningDecoder::new();
    let ms = messages(opening(Protocol::V21, Dialect::Zeors, last, Some(&hello)));
    assert_eq!(ms[0], &b"zrs2.1+zeors1"[..]);
    assert_eq!(o.message(&ms[0]).unwrap(), None);
    assert_eq!(
        o.message(&ms[1]).unwrap(),
        Some(Opening::Zeors {
            protocol: Protocol::V21,
            hello
        })
    );
    // Bad openings.
    let mut o = OpeningDecoder::new();
    assert!(matches!(
        o.message(b"zrs3.0"),
        Err(CodecError::InvalidProtocol(_))
    ));
    let mut o = OpeningDecoder::new();
    o.message(b"zrs2.0").unwrap();
    assert!(matches!(
        o.message(b"1234567"),
        Err(CodecError::InvalidTid(_))
    ));
}

#[test]
fn primary_hellos_round_trip() {
    for h in [
        PrimaryHello::Ok {
            compression: Some("zstd".into()),
            last_tid: Tid(9),
        },
        PrimaryHello::Ok {
            compression: None,
            last_tid: Tid(0),
        },
        PrimaryHello::Diverged {
            message: "diverged".into(),
            diverged: vec![Tid(7), Tid(8)],
            common: Some(Tid(6)),
        },
        PrimaryHello::Diverged {
            message: "diverged".into(),
            diverged: vec![Tid(7)],
            common: None,
        },
        PrimaryHello::Refused {
            message: "no".into(),
        },
    ] {
        assert_eq!(PrimaryHello::decode(&h.encode()).unwrap(), h);
    }
}
