//! Micro-benchmarks of the codec work on a load's path, in both marshallings.
//!
//! A load costs the server one request decode (`Message::decode` + `Request::parse`) and
//! one reply encode (a ~1 KB record, its serial and `None`); the client does the reverse.
//! Timing these in isolation tells how much of the per-load CPU the profile attributes to
//! the codec is inherent. A plain timing loop (median of batches) is precise enough at
//! these magnitudes and keeps the crate free of a benchmarking framework.

use bytes::Bytes;
use serde::Serialize;
use std::hint::black_box;
use std::time::{Duration, Instant};
use zeo_proto::{frame, message, Encoding, Limits, Message, Request, Value};
use zodb::{Oid, Tid};

#[derive(clap::Args)]
pub struct Args {
    /// Time spent on each case, milliseconds.
    #[arg(long, default_value_t = 300)]
    millis: u64,
}

#[derive(Serialize)]
pub struct Case {
    name: String,
    ns_per_op: f64,
}

pub fn run(args: Args) -> Vec<Case> {
    let budget = Duration::from_millis(args.millis);
    let limits = Limits::default();
    let mut cases = Vec::new();
    for (enc, label) in [(Encoding::Pickle, "pickle"), (Encoding::Msgpack, "msgpack")] {
        let args_of = |oid: u64| vec![Value::from(Oid(oid)), Value::from(Tid::MAX)];
        let call = message::encode_call(enc, &Value::Int(7), false, "loadBefore", args_of(42));
        let record = Bytes::from(vec![0x5a; 1024]);
        let result = || {
            Value::Tuple(vec![
                Value::Bytes(record.clone()),
                Value::from(Tid(0x03f5_9458_1777_7777)),
                Value::None,
            ])
        };
        let reply = message::encode_reply(enc, &Value::Int(7), result());
        let inval = || {
            vec![
                Value::from(Tid(0x03f5_9458_1777_7777)),
                Value::List((0..5).map(|i| Value::from(Oid(i))).collect()),
            ]
        };

        cases.push(time(
            format!("{label}: client encodes loadBefore call"),
            budget,
            || {
                frame::frame(&message::encode_call(
                    enc,
                    &Value::Int(7),
                    false,
                    "loadBefore",
                    args_of(42),
                ))
            },
        ));
        cases.push(time(
            format!("{label}: server decodes + parses loadBefore"),
            budget,
            || {
                let m = Message::decode(enc, &call, &limits).expect("decodes");
                Request::parse(&m.name, &m.args).expect("parses")
            },
        ));
        cases.push(time(
            format!("{label}: server encodes 1 KB loadBefore reply"),
            budget,
            || frame::frame(&message::encode_reply(enc, &Value::Int(7), result())),
        ));
        cases.push(time(
            format!("{label}: client decodes 1 KB loadBefore reply"),
            budget,
            || Message::decode(enc, &reply, &limits).expect("decodes"),
        ));
        cases.push(time(
            format!("{label}: server encodes invalidateTransaction (5 oids)"),
            budget,
            || message::encode_callback(enc, "invalidateTransaction", inval()),
        ));
    }
    cases
}

/// Median time per call over batches of calls, for about `budget`.
fn time<T>(name: String, budget: Duration, mut f: impl FnMut() -> T) -> Case {
    // Size a batch to ~1 ms so that timer overhead does not count.
    let mut batch = 1u32;
    loop {
        let t = Instant::now();
        for _ in 0..batch {
            black_box(f());
        }
        if t.elapsed() >= Duration::from_millis(1) || batch >= 1 << 24 {
            break;
        }
        batch *= 2;
    }
    let mut per_op = Vec::new();
    let started = Instant::now();
    while started.elapsed() < budget || per_op.len() < 5 {
        let t = Instant::now();
        for _ in 0..batch {
            black_box(f());
        }
        per_op.push(t.elapsed().as_nanos() as f64 / batch as f64);
    }
    per_op.sort_by(f64::total_cmp);
    Case {
        name,
        ns_per_op: per_op[per_op.len() / 2],
    }
}
