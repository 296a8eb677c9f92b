//! Property-based fuzzing of everything that reads bytes from the network: the frame
//! decoder, both marshallings, the message tuple, the handshake and the request parser.
//!
//! What is proven, for any input the strategies produce:
//! - nothing panics (a panic would be reachable from any client);
//! - the frame decoder finds the same frames however the bytes are split, refuses a
//!   frame over the limit, and holds memory in proportion to the bytes received, never
//!   to the length a peer announces;
//! - whatever either decoder accepts re-encodes to bytes that decode to the same value,
//!   and every value round-trips exactly through its encoder and decoder, within the
//!   item budget [`Limits::for_message`] allows for a message of that size;
//! - under that budget, no input of `n` bytes decodes to more than `4n + 1024` values,
//!   memo references and `DUP` included: the decoders cannot be made to allocate out of
//!   proportion to their input, and nesting stays within `max_depth` (no deep recursion
//!   when the value is later encoded, compared or dropped).
//!
//! `PROPTEST_CASES=N` sets the number of cases per property (default 1,000); for a long
//! run: `PROPTEST_CASES=1000000 cargo test --release -p zeo-proto --test fuzz`.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use proptest::test_runner::Config;
use zeo_proto::frame::{self, FrameError};
use zeo_proto::message::{self, Encoding};
use zeo_proto::request::METHODS;
use zeo_proto::{msgpack, pickle, Limits, Message, Request, Value};

fn cases(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

// -- Values -----------------------------------------------------------------------------

fn leaf(pickle: bool) -> BoxedStrategy<Value> {
    let float = any::<f64>().prop_map(|f| Value::Float(if f.is_nan() { 0.25 } else { f }));
    let text = prop::collection::vec(
        prop::sample::select(vec!['a', 'é', '日', '😀', '\n', '\\', '\0', '"', '\'']),
        0..40,
    )
    .prop_map(|c| Value::Str(c.into_iter().collect()));
    let mut options = vec![
        Just(Value::None).boxed(),
        any::<bool>().prop_map(Value::Bool).boxed(),
        any::<i64>().prop_map(Value::Int).boxed(),
        (-300i64..300).prop_map(Value::Int).boxed(),
        float.boxed(),
        prop::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| Value::Bytes(Bytes::from(b)))
            .boxed(),
        text.boxed(),
    ];
    if pickle {
        options.push(
            prop::collection::btree_set(any::<i32>(), 0..6)
                .prop_map(|s| Value::Set(s.into_iter().map(|i| Value::Int(i.into())).collect()))
                .boxed(),
        );
    }
    prop::strategy::Union::new(options).boxed()
}

/// Values a marshalling carries exactly: for msgpack no sets or instances, and tuples
/// only (lists come back as tuples); dict keys distinct and never equal as Python keys.
fn value(pickle: bool) -> BoxedStrategy<Value> {
    leaf(pickle)
        .prop_recursive(5, 200, 12, move |inner| {
            let seq = prop::collection::vec(inner.clone(), 0..12);
            let mut options = vec![
                seq.clone().prop_map(Value::Tuple).boxed(),
                prop::collection::vec(inner.clone(), 0..8)
                    .prop_map(|vals| {
                        Value::Dict(
                            vals.into_iter()
                                .enumerate()
                                .map(|(i, v)| {
                                    let key = match i % 3 {
                                        0 => Value::Str(format!("k{i}")),
                                        1 => Value::Bytes(Bytes::from(format!("b{i}"))),
                                        _ => Value::Str(format!("s{i}")),
                                    };
                                    (key, v)
                                })
                                .collect(),
                        )
                    })
                    .boxed(),
            ];
            if pickle {
                options.push(seq.prop_map(Value::List).boxed());
                options.push(
                    inner
                        .prop_map(|state| Value::Object {
                            module: "ZopeUndo.Prefix".into(),
                            name: "Prefix".into(),
                            state: Box::new(state),
                        })
                        .boxed(),
                );
            }
            prop::strategy::Union::new(options)
        })
        .boxed()
}

/// Values produced, counted as the budget counts them (every scalar and container).
fn count(v: &Value) -> usize {
    let mut n = 0;
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        n += 1;
        match v {
            Value::Tuple(items) | Value::List(items) | Value::Set(items) => todo.extend(items),
            Value::Dict(items) => {
                for (k, v) in items {
                    todo.push(k);
                    todo.push(v);
                }
            }
            Value::Object { state, .. } => todo.push(state),
            _ => {}
        }
    }
    n
}

fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut todo = vec![(v, 0)];
    while let Some((v, d)) = todo.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Tuple(items) | Value::List(items) | Value::Set(items) => {
                todo.extend(items.iter().map(|i| (i, d + 1)))
            }
            Value::Dict(items) => {
                for (k, v) in items {
                    todo.push((k, d + 1));
                    todo.push((v, d + 1));
                }
            }
            Value::Object { state, .. } => todo.push((state, d + 1)),
            _ => {}
        }
    }
    deepest
}

/// Flips, inserts, deletes and truncates bytes.
fn mutate(mut msg: Vec<u8>, edits: &[(u16, u8, u8)]) -> Vec<u8> {
    for &(pos, kind, byte) in edits {
        let pos = if msg.is_empty() {
            0
        } else {
            pos as usize % msg.len()
        };
        match kind % 5 {
            0 if !msg.is_empty() => msg[pos] = byte,
            1 if !msg.is_empty() => msg[pos] ^= 1 << (byte % 8),
            2 => msg.insert(pos, byte),
            3 if !msg.is_empty() => {
                msg.remove(pos);
            }
            _ => msg.truncate(pos),
        }
    }
    msg
}

type Decode = fn(&[u8], &Limits) -> Result<Value, zeo_proto::DecodeError>;
type Encode = fn(&Value) -> Vec<u8>;

/// The checks every decoded input must pass, whatever it was.
fn check_decoded(input: &[u8], decode: Decode, encode: Encode) -> Result<(), TestCaseError> {
    let limits = Limits::default().for_message(input.len());
    if let Ok(v) = decode(input, &limits) {
        prop_assert!(
            count(&v) <= 4 * input.len() + 1024,
            "{} values from {} bytes",
            count(&v),
            input.len()
        );
        prop_assert!(depth(&v) <= limits.max_depth);
        let bytes = encode(&v);
        let again = decode(&bytes, &Limits::default()).expect("a re-encoded value decodes");
        prop_assert_eq!(encode(&again), bytes);
    }
    Ok(())
}

/// A pickle opcode stream from an alphabet biased towards memo references, `DUP` and
/// containers: the shapes that amplify input into values.
fn pickle_program() -> impl Strategy<Value = Vec<u8>> {
    let ops: Vec<&'static [u8]> = vec![
        b"]",
        b"(",
        b")",
        b"}",
        b"e",
        b"a",
        b"t",
        b"l",
        b"d",
        b"s",
        b"u",
        b"2",
        b"0",
        b"1",
        b"q\x00",
        b"q\x01",
        b"q\x02",
        b"h\x00",
        b"h\x01",
        b"h\x02",
        b"\x94",
        b"K\x07",
        b"N",
        b"\x85",
        b"\x86",
        b"\x87",
        b"C\x03abc",
        b"X\x01\x00\x00\x00z",
        b"\x88",
        b"\x8f",
        b"\x90",
        b"\x91",
    ];
    prop::collection::vec(prop::sample::select(ops), 0..400).prop_map(|ops| {
        let mut out = vec![0x80, 3];
        for op in ops {
            out.extend_from_slice(op);
        }
        out.push(b'.');
        out
    })
}

/// Memo bombs of random shape: a list of `leaves` ints memoized as 0, then rounds that
/// each build a list of `fanout` references to the previous round's list (by `BINGET` or
/// `DUP`) and memoize it, then the last one. Each round multiplies the values the copy
/// produces by its fanout, for a few bytes of input.
fn memo_bomb() -> impl Strategy<Value = Vec<u8>> {
    (
        1usize..60,
        prop::collection::vec((1usize..6, any::<bool>()), 1..14),
    )
        .prop_map(|(leaves, rounds)| {
            let mut out = vec![0x80, 3, b']', b'('];
            out.extend([b'K', 1].repeat(leaves));
            out.extend([b'e', b'q', 0, b'0']);
            for (i, &(fanout, dup)) in rounds.iter().enumerate() {
                out.extend([b']', b'(', b'h', i as u8]);
                for _ in 1..fanout {
                    if dup {
                        out.push(b'2');
                    } else {
                        out.extend([b'h', i as u8]);
                    }
                }
                out.extend([b'e', b'q', i as u8 + 1, b'0']);
            }
            out.extend([b'h', rounds.len() as u8, b'.']);
            out
        })
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn memo_bombs_stay_within_the_message_budget(bomb in memo_bomb()) {
        check_decoded(&bomb, pickle::decode, pickle::to_vec)?;
    }

    // -- Frames ---------------------------------------------------------------------------

    #[test]
    fn frames_are_found_however_the_bytes_are_split(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..3000), 0..8),
        cuts in prop::collection::vec(any::<u16>(), 0..20),
    ) {
        let mut wire = BytesMut::new();
        for p in &payloads {
            frame::encode_frame(p, &mut wire);
        }
        let wire = wire.freeze();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c as usize % (wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        for cut in cuts {
            buf.put_slice(&wire[at..cut]);
            at = cut;
            while let Some(f) = frame::decode_frame(&mut buf, 4000).unwrap() {
                got.push(f.to_vec());
            }
        }
        prop_assert_eq!(got, payloads);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_make_frames_or_a_clean_refusal(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..32),
        max in 0usize..5000,
    ) {
        let mut buf = BytesMut::new();
        'feed: for c in chunks {
            buf.put_slice(&c);
            loop {
                match frame::decode_frame(&mut buf, max) {
                    Ok(Some(f)) => prop_assert!(f.len() <= max),
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max: m }) => {
                        prop_assert!(len > m);
                        break 'feed;
                    }
                }
            }
            // Held memory follows what arrived, whatever the announced length.
            prop_assert!(buf.capacity() <= 4 * buf.len() + 256 * 1024, "{} for {}", buf.capacity(), buf.len());
        }
    }

    #[test]
    fn announced_lengths_do_not_allocate(len in 1_000_000u32..u32::MAX, body in 0usize..10_000) {
        let mut buf = BytesMut::new();
        buf.put_u32(len);
        buf.put_slice(&vec![0u8; body]);
        let r = frame::decode_frame(&mut buf, frame::DEFAULT_MAX_FRAME);
        let clean = matches!(r, Ok(None) | Err(FrameError::TooLarge { .. }));
        prop_assert!(clean, "{:?}", r);
        prop_assert!(buf.capacity() <= 4 * buf.len() + 256 * 1024);
    }

    // -- Handshake and messages ----------------------------------------------------------

    #[test]
    fn handshakes_never_panic(hello in prop::collection::vec(any::<u8>(), 0..8)) {
        let _ = message::parse_client_hello(&hello);
    }

    #[test]
    fn requests_never_panic(
        name in prop::sample::select(METHODS.to_vec()),
        other in "[a-zA-Z_.]{0,20}",
        args in prop::collection::vec(value(true), 0..7),
        as_list in any::<bool>(),
        use_other in 0u8..10,
    ) {
        let name = if use_other == 0 { other.as_str() } else { name };
        let args = if as_list { Value::List(args) } else { Value::Tuple(args) };
        let _ = Request::parse(name, &args);
        // And as a whole message in both marshallings.
        let msg = Value::Tuple(vec![Value::Int(1), Value::Bool(false), Value::str(name), args]);
        for enc in [Encoding::Pickle, Encoding::Msgpack] {
            let bytes = enc.encode(&msg);
            if let Ok(m) = Message::decode(enc, &bytes, &Limits::default().for_message(bytes.len())) {
                let _ = Request::parse(&m.name, &m.args);
            }
        }
    }

    #[test]
    fn arbitrary_messages_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        msgpack in any::<bool>(),
    ) {
        let enc = if msgpack { Encoding::Msgpack } else { Encoding::Pickle };
        if let Ok(m) = Message::decode(enc, &bytes, &Limits::default().for_message(bytes.len())) {
            let _ = Request::parse(&m.name, &m.args);
        }
    }

    // -- Pickle ---------------------------------------------------------------------------

    #[test]
    fn pickle_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        check_decoded(&bytes, pickle::decode, pickle::to_vec)?;
    }

    #[test]
    fn pickle_opcode_programs(program in pickle_program()) {
        check_decoded(&program, pickle::decode, pickle::to_vec)?;
    }

    #[test]
    fn pickle_mutated_messages(
        v in value(true),
        edits in prop::collection::vec((any::<u16>(), any::<u8>(), any::<u8>()), 1..6),
    ) {
        check_decoded(&mutate(pickle::to_vec(&v), &edits), pickle::decode, pickle::to_vec)?;
    }

    #[test]
    fn pickle_round_trips_within_the_message_budget(v in value(true)) {
        let bytes = pickle::to_vec(&v);
        let back = pickle::decode(&bytes, &Limits::default().for_message(bytes.len()));
        prop_assert_eq!(back, Ok(v));
    }

    // -- msgpack --------------------------------------------------------------------------

    #[test]
    fn msgpack_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        check_decoded(&bytes, msgpack::decode, msgpack::to_vec)?;
    }

    #[test]
    fn msgpack_mutated_messages(
        v in value(false),
        edits in prop::collection::vec((any::<u16>(), any::<u8>(), any::<u8>()), 1..6),
    ) {
        check_decoded(&mutate(msgpack::to_vec(&v), &edits), msgpack::decode, msgpack::to_vec)?;
    }

    #[test]
    fn msgpack_round_trips_within_the_message_budget(v in value(false)) {
        let bytes = msgpack::to_vec(&v);
        let back = msgpack::decode(&bytes, &Limits::default().for_message(bytes.len()));
        prop_assert_eq!(back, Ok(v));
    }
}

/// The memo bomb of the issue, concretely: 200 KB that used to decode into ten million
/// values (over 600 MB) now fails within a budget proportional to its size.
#[test]
fn a_memo_bomb_is_refused_within_the_message_budget() {
    let mut bomb = vec![0x80, 3, b']', b'(', b']', b'q', 0, b'('];
    bomb.extend([b'K', 1].repeat(100));
    bomb.push(b'e');
    bomb.extend([b'h', 0].repeat(95_000));
    bomb.extend(b"e.");
    let limits = Limits::default().for_message(bomb.len());
    assert!(limits.max_items < 1_000_000);
    assert!(matches!(
        pickle::decode(&bomb, &limits),
        Err(zeo_proto::DecodeError::SizeLimit(_))
    ));
    // The same shape, small enough, still decodes.
    let mut small = vec![0x80, 3, b']', b'(', b']', b'q', 0, b'('];
    small.extend([b'K', 1].repeat(10));
    small.push(b'e');
    small.extend([b'h', 0].repeat(10));
    small.extend(b"e.");
    assert!(pickle::decode(&small, &Limits::default().for_message(small.len())).is_ok());
}
