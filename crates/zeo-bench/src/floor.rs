//! `zeo-bench floor`: the least a ZEO server can do per load on this machine, measured
//! beside the real servers so that their figures can be read against it.
//!
//! It speaks the same framing and handshake as zeors (it announces the marshalling,
//! takes the client's echo, answers `register` with a tid), then answers every later
//! call with the `loadBefore` reply of one benchmark item, `(record, serial, None)`,
//! built from memory: the reply's bytes are fixed once at start, only the caller's
//! msgid is copied in. No storage, no decoding beyond the frame and the msgid's bytes,
//! one task per connection doing one read and one write per request (replies to
//! requests that arrived in the same read go out in one write, as zeors coalesces
//! them). The tokio runtime is the multi-threaded one zeors uses, with as many workers
//! as the process may use CPUs.
//!
//! What separates zeors from this is zeors' own work (storage, message decoding, task
//! scheduling); what this costs is the kernel's loopback TCP and the runtime's polling,
//! which no server on this framing avoids. Items are ~97% of the generated database's
//! oids; the other objects (BTree buckets) have larger records, so the floor's replies
//! are slightly smaller on average than the real servers'.

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zeo_proto::message::{self, ClientHello};
use zeo_proto::{frame, Encoding, Limits, Message, Reply, Value};
use zodb::{Loaded, Tid};

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8100")]
    listen: String,
    /// meta.json of the generated database: the replies carry one item's record.
    #[arg(long)]
    meta: PathBuf,
    /// Runtime worker threads (default: the CPUs this process may run on, as zeors).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The marshalling announced: `pickle` (Z5, zeors' default) or `msgpack` (M5).
    #[arg(long, default_value = "pickle", value_parser = ["pickle", "msgpack"])]
    encoding: String,
}

/// A msgid placeholder whose encoding is 4 bytes in both marshallings and occurs nowhere
/// else in a reply: where the template's msgid bytes are.
const PLACEHOLDER: i64 = 0x5A5A_5A5A;

/// The reply to every load, split around its msgid.
#[derive(Debug)]
struct Template {
    encoding: Encoding,
    /// Everything before the msgid (the marshalling's header and the tuple's opening).
    head: Vec<u8>,
    /// Everything after it.
    tail: Vec<u8>,
    /// The reply to `register`, split the same way.
    register_tail: Vec<u8>,
}

impl Template {
    fn new(encoding: Encoding, record: &[u8]) -> Result<Template> {
        // A tid of the present, as a server would report.
        let tid = zodb::timestamp::new_tid(Tid::ZERO).unwrap_or(Tid(1));
        let loaded = Some(Loaded {
            data: bytes::Bytes::copy_from_slice(record),
            start: tid,
            end: None,
        });
        let (head, tail) = split(encoding, loaded.to_value())?;
        let (register_head, register_tail) = split(encoding, tid.to_value())?;
        if register_head != head {
            bail!("replies do not share their header");
        }
        Ok(Template {
            encoding,
            head,
            tail,
            register_tail,
        })
    }

    /// The msgid's bytes in a call, if the call starts as this marshalling's 4-tuples do
    /// and its msgid is an integer; `None` for anything else.
    fn msgid<'a>(&self, call: &'a [u8]) -> Option<&'a [u8]> {
        let rest = call.strip_prefix(&self.head[..])?;
        let len = match (self.encoding, *rest.first()?) {
            (Encoding::Pickle, b'K') => 2,
            (Encoding::Pickle, b'M') => 3,
            (Encoding::Pickle, b'J') => 5,
            (Encoding::Pickle, 0x8a) => 2 + *rest.get(1)? as usize,
            (Encoding::Msgpack, 0x00..=0x7f | 0xe0..=0xff) => 1,
            (Encoding::Msgpack, 0xcc | 0xd0) => 2,
            (Encoding::Msgpack, 0xcd | 0xd1) => 3,
            (Encoding::Msgpack, 0xce | 0xd2) => 5,
            (Encoding::Msgpack, 0xcf | 0xd3) => 9,
            _ => return None,
        };
        rest.get(..len)
    }

    /// Appends the frame of a reply: `head`, the caller's msgid bytes, `tail`.
    fn put(&self, msgid: &[u8], tail: &[u8], out: &mut BytesMut) {
        let len = self.head.len() + msgid.len() + tail.len();
        out.reserve(4 + len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(msgid);
        out.extend_from_slice(tail);
    }
}

/// The reply `(PLACEHOLDER, 0, '.reply', result)`, cut around the placeholder's bytes.
fn split(encoding: Encoding, result: Value) -> Result<(Vec<u8>, Vec<u8>)> {
    let bytes = message::encode_reply(encoding, &Value::Int(PLACEHOLDER), result);
    let mark: &[u8] = match encoding {
        Encoding::Pickle => b"J\x5a\x5a\x5a\x5a",
        Encoding::Msgpack => b"\xce\x5a\x5a\x5a\x5a",
    };
    let at = bytes
        .windows(mark.len())
        .position(|w| w == mark)
        .context("the msgid placeholder is not in the encoded reply")?;
    Ok((bytes[..at].to_vec(), bytes[at + mark.len()..].to_vec()))
}

/// Runs the floor server until the process is killed. Prints `{"listening": ADDRESS}`
/// once it accepts connections.
pub async fn run(args: Args) -> Result<()> {
    let meta = crate::meta::Meta::load(&args.meta)?;
    let encoding = match args.encoding.as_str() {
        "msgpack" => Encoding::Msgpack,
        _ => Encoding::Pickle,
    };
    let template = Arc::new(Template::new(encoding, meta.item_record())?);
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "{}",
        serde_json::json!({"listening": listener.local_addr()?.to_string()})
    );
    let odd = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (template, odd) = (template.clone(), odd.clone());
        tokio::spawn(async move {
            // A connection that breaks the protocol is dropped; the client reports it.
            let _ = serve(stream, &template, &odd).await;
        });
    }
}

/// One connection: the handshake, `register`, then a load reply per call.
async fn serve(mut s: TcpStream, t: &Template, odd: &AtomicU64) -> Result<()> {
    s.write_all(&frame::frame(t.encoding.server_hello()))
        .await?;
    let mut buf = BytesMut::with_capacity(4 * 1024);
    let Some(hello) = zeo_proto::io::read_frame(&mut s, &mut buf, 64).await? else {
        return Ok(());
    };
    match message::parse_client_hello(&hello)? {
        ClientHello::Protocol(e) if e == t.encoding => {}
        other => bail!("unexpected hello {other:?}"),
    }
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut registered = false;
    loop {
        while let Some(call) = frame::decode_frame(&mut buf, frame::DEFAULT_MAX_FRAME)? {
            let Some(msgid) = t.msgid(&call) else {
                // Not a call of zeo-bench's: say so once in a while, answer nothing.
                if (odd.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two() {
                    eprintln!("floor: ignoring a message it cannot answer");
                }
                continue;
            };
            if !registered {
                // The one call decoded whole: it must be `register`.
                let m = Message::decode(t.encoding, &call, &Limits::default())?;
                if m.name != "register" {
                    bail!("{} before register", m.name);
                }
                t.put(msgid, &t.register_tail, &mut out);
                registered = true;
            } else if msgid != heartbeat(t.encoding) {
                t.put(msgid, &t.tail, &mut out);
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// The msgid bytes of the heartbeat `(-1, 0, '.reply', None)` clients send, which has
/// no answer.
fn heartbeat(encoding: Encoding) -> &'static [u8] {
    match encoding {
        Encoding::Pickle => b"J\xff\xff\xff\xff",
        Encoding::Msgpack => b"\xff",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor's replies are read by the real client code as what zeors sends.
    #[test]
    fn replies_decode_as_load_and_register_replies_with_the_callers_msgid() {
        let record = vec![7u8; 1054];
        for enc in [Encoding::Pickle, Encoding::Msgpack] {
            let t = Template::new(enc, &record).unwrap();
            for id in [1i64, 200, 70_000, 3_000_000_000, -1] {
                let call = message::encode_call(
                    enc,
                    &Value::Int(id),
                    false,
                    "loadBefore",
                    vec![Value::bytes(vec![0u8; 8]), Value::bytes(vec![0xffu8; 8])],
                );
                let msgid = t.msgid(&call).expect("an int msgid is found");
                assert_eq!(msgid == heartbeat(enc), id == -1, "{enc:?} {id}");
                let mut out = BytesMut::new();
                t.put(msgid, &t.tail, &mut out);
                let payload = frame::decode_frame(&mut out, 1 << 20).unwrap().unwrap();
                let m = Message::decode(enc, &payload, &Limits::default()).unwrap();
                assert_eq!(m.msgid, Value::Int(id));
                assert_eq!(m.name, message::REPLY);
                let loaded = Option::<Loaded>::from_value(&m.args).unwrap().unwrap();
                assert_eq!((loaded.data.len(), loaded.end), (record.len(), None));
                // Byte for byte what zeors' encoder makes of the same reply.
                let real = message::reply_frame(enc, &Value::Int(id), Some(loaded).to_value());
                let mut again = BytesMut::new();
                t.put(msgid, &t.tail, &mut again);
                assert_eq!(&again[..], &real[..], "{enc:?} {id}");

                let mut out = BytesMut::new();
                t.put(msgid, &t.register_tail, &mut out);
                let payload = frame::decode_frame(&mut out, 1 << 20).unwrap().unwrap();
                let m = Message::decode(enc, &payload, &Limits::default()).unwrap();
                assert!(Tid::from_value(&m.args).is_ok());
            }
            assert_eq!(t.msgid(b"\x80\x03N."), None);
        }
    }
}
