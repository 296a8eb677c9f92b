//! Shared by the server's integration tests: an in-process server on a real FileStorage
//! and a deliberately low-level blocking client that can send anything.

#![allow(dead_code)]

use bytes::BytesMut;
use server::{Listener, Server, ServerConfig};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use zeo_proto::message::Encoding;
use zeo_proto::{frame, Limits, Message, Value};
use zodb::Storage;

/// One runtime for every server of a test binary (proptest cases are synchronous).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// A writable FileStorage in `dir`, opened as `zeors serve` opens one.
pub fn file_storage(dir: &std::path::Path) -> Arc<filestorage::FileStorage> {
    Arc::new(
        filestorage::FileStorage::open(
            dir.join("Data.fs"),
            filestorage::Options {
                create: true,
                sync_on_vote: true,
                ..Default::default()
            },
        )
        .expect("open Data.fs"),
    )
}

/// Serves `storage` as storage "1" on a free port; returns the server and its address.
pub fn serve(storage: Arc<dyn Storage>, config: ServerConfig) -> (Arc<Server>, String) {
    runtime().block_on(async move {
        let server = Arc::new(
            Server::new(config, vec![("1".to_string(), storage)])
                .await
                .expect("server"),
        );
        let listener = Listener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr();
        server.serve(listener);
        (server, addr)
    })
}

/// A blocking ZEO client that sends whatever it is told to.
pub struct Client {
    pub stream: TcpStream,
    pub encoding: Encoding,
    buf: BytesMut,
    next: i64,
    /// After [`Client::start_compression`]: what is sent is compressed...
    deflate: Option<zeo_proto::compress::Compressor>,
    /// ...and what is received.
    inflate: Option<zeo_proto::compress::Decompressor>,
    /// Bytes read from the socket, as they came (compressed or not).
    pub wire_in: usize,
    /// Messages read while looking for a reply that came first, in order.
    early: Vec<Message>,
}

impl Client {
    /// Connects and answers the server's protocol frame with `encoding`'s.
    pub fn connect(addr: &str, encoding: Encoding) -> io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Client {
            stream,
            encoding,
            buf: BytesMut::new(),
            next: 0,
            deflate: None,
            inflate: None,
            wire_in: 0,
            early: Vec::new(),
        };
        c.read_frame()?;
        c.send_payload(encoding.server_hello())?;
        Ok(c)
    }

    pub fn send_payload(&mut self, payload: &[u8]) -> io::Result<()> {
        let f = frame::frame(payload);
        self.send_raw(&f)
    }

    /// Sends stream bytes (through the compressor once there is one).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.deflate {
            Some(c) => {
                c.write(bytes)?;
                let z = c.flush()?;
                self.stream.write_all(&z)
            }
            None => self.stream.write_all(bytes),
        }
    }

    /// `zeors_compress("zstd")` as a zeors client does it: compressed from the byte after
    /// the request, decompressing from the byte after its reply.
    pub fn start_compression(&mut self) -> io::Result<()> {
        self.compress_in_one_write(vec![], vec![]).map(|_| ())
    }

    /// Sends `before` (plain), `zeors_compress` and `after` (compressed) in one write, as
    /// a client that does not wait for the switch's reply; then reads up to that reply
    /// and decompresses from there. Returns the msgids of `before` and `after`, whose
    /// replies are left to read.
    pub fn compress_in_one_write(
        &mut self,
        before: Vec<(&str, Vec<Value>)>,
        after: Vec<(&str, Vec<Value>)>,
    ) -> io::Result<(Vec<i64>, Vec<i64>)> {
        let mut wire = Vec::new();
        let mut ids = (vec![], vec![]);
        for (name, args) in before {
            let (id, payload) = self.encode(name, args, false);
            ids.0.push(id);
            wire.extend_from_slice(&frame::frame(&payload));
        }
        let (switch, payload) = self.encode("zeors_compress", vec![Value::str("zstd")], false);
        wire.extend_from_slice(&frame::frame(&payload));
        let mut c = zeo_proto::compress::Compressor::new()?;
        for (name, args) in after {
            let (id, payload) = self.encode(name, args, false);
            ids.1.push(id);
            c.write(&frame::frame(&payload))?;
        }
        wire.extend(c.flush()?);
        self.deflate = Some(c);
        self.stream.write_all(&wire)?;
        loop {
            let f = self.read_frame()?;
            let m = Message::decode(self.encoding, &f, &Limits::default())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if m.name == zeo_proto::message::REPLY && m.msgid == Value::Int(switch) {
                if m.is_exception() {
                    return Err(io::Error::other(format!("zeors_compress: {:?}", m.args)));
                }
                let mut d = zeo_proto::compress::Decompressor::new()?;
                d.push(&self.buf.split());
                self.inflate = Some(d);
                return Ok(ids);
            }
            // A reply to `before`, read before the switch: kept for `recv`.
            self.early.push(m);
        }
    }

    /// The encoded message `(msgid, oneway, name, args)`.
    pub fn encode(&mut self, name: &str, args: Vec<Value>, oneway: bool) -> (i64, Vec<u8>) {
        self.next += 1;
        let msg = Value::Tuple(vec![
            Value::Int(self.next),
            Value::Bool(oneway),
            Value::str(name),
            Value::Tuple(args),
        ]);
        (self.next, self.encoding.encode(&msg))
    }

    pub fn send(&mut self, name: &str, args: Vec<Value>, oneway: bool) -> io::Result<i64> {
        let (id, payload) = self.encode(name, args, oneway);
        self.send_payload(&payload)?;
        Ok(id)
    }

    fn read_frame(&mut self) -> io::Result<bytes::Bytes> {
        loop {
            if let Some(f) = frame::decode_frame(&mut self.buf, frame::DEFAULT_MAX_FRAME)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                return Ok(f);
            }
            if let Some(d) = &mut self.inflate {
                if d.pull(&mut self.buf, 65536)? > 0 {
                    continue;
                }
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.wire_in += n;
            match &mut self.inflate {
                Some(d) => d.push(&chunk[..n]),
                None => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next message from the server (reply or callback).
    pub fn recv(&mut self) -> io::Result<Message> {
        if !self.early.is_empty() {
            return Ok(self.early.remove(0));
        }
        let f = self.read_frame()?;
        Message::decode(self.encoding, &f, &Limits::default())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    /// Calls `name` and waits for its reply; an exception reply is an error.
    pub fn call(&mut self, name: &str, args: Vec<Value>) -> io::Result<Value> {
        let id = self.send(name, args, false)?;
        loop {
            let m = self.recv()?;
            if m.name == zeo_proto::message::REPLY && m.msgid == Value::Int(id) {
                if m.is_exception() {
                    return Err(io::Error::other(format!("{name}: {:?}", m.args)));
                }
                return Ok(m.args);
            }
        }
    }

    /// Reads until the server closes the connection or `timeout` passes; true if closed.
    pub fn drain_until_closed(&mut self, timeout: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(timeout));
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// A minimal valid object record: an empty `PersistentMapping`.
pub const RECORD: &[u8] = b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.\x80\x03}q\x01.";

/// Registers, commits one new object and returns the committed tid: proof that the
/// server accepts connections and that its commit lock and storage are not wedged.
pub fn commit_one(addr: &str) -> io::Result<Value> {
    let mut c = Client::connect(addr, Encoding::Pickle)?;
    c.call("register", vec![Value::str("1"), Value::Bool(false)])?;
    commit_new(&mut c, RECORD).map(|(_, tid)| tid)
}

/// Commits `data` as a new object on a registered client: `(oid, tid)`.
pub fn commit_new(c: &mut Client, data: &[u8]) -> io::Result<(Value, Value)> {
    let oids = c.call("new_oids", vec![Value::Int(1)])?;
    let oid = oids
        .as_seq()
        .and_then(|s| s.first().cloned())
        .ok_or_else(|| io::Error::other("no oid"))?;
    let txn = Value::Int(7);
    c.send(
        "tpc_begin",
        vec![
            txn.clone(),
            Value::bytes(&b""[..]),
            Value::bytes(&b""[..]),
            Value::Dict(vec![]),
            Value::None,
            Value::str(" "),
        ],
        true,
    )?;
    c.send(
        "storea",
        vec![
            oid.clone(),
            Value::bytes(vec![0u8; 8]),
            Value::bytes(data.to_vec()),
            txn.clone(),
        ],
        true,
    )?;
    c.call("vote", vec![txn.clone()])?;
    let tid = c.call("tpc_finish", vec![txn])?;
    Ok((oid, tid))
}
