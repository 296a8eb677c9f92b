//! zstd on a ZEO connection between zeors peers (a proxy and its zeors upstream).
//!
//! Negotiated, never assumed: a zeors server offers it in `get_info`'s zeors extensions
//! ([`ZSTD`]); a client that wants it sends `zeors_compress("zstd")` and from the byte after
//! that request on writes one zstd stream; the server reads one from the byte after that
//! request's frame, answers it uncompressed and writes one zstd stream from the byte after
//! the answer. Stock peers never see any of it.
//!
//! Each side flushes its stream whenever its queue runs empty, so the other can decode
//! everything sent so far at once. The reading side decompresses in bounded steps
//! ([`Decompressor::pull`]): a few bytes of a hostile zstd stream can stand for gigabytes,
//! which must meet the frame limits as they arrive rather than all be inflated first.

use bytes::{Buf, BytesMut};
use std::io::Write;

/// The name negotiated (the zeors extension and the argument of `zeors_compress`).
pub const ZSTD: &str = "zstd";

/// Level 3, zstd's default: several hundred MB/s per core and a good ratio on pickles.
const LEVEL: i32 = 3;

/// The compressor's window, 2^17 = 128 KiB (level 3 would take 2 MiB). A link stays up for
/// days, and the window is memory it keeps per connection, touched page by page as the
/// stream goes on: with the default, a proxy's and its upstream's memory crept up for the
/// first minutes of a soak. Records repeat within a few messages; a longer reach gains
/// little on pickles.
const WINDOW_LOG: u32 = 17;

/// The largest window the reading side accepts from a peer, 2^21 (zstd accepts 2^27 by
/// default): a peer must not make this side hold 128 MiB for one connection.
const WINDOW_LOG_MAX: u32 = 21;

/// The writing side: one zstd stream over everything written.
pub struct Compressor(zstd::stream::write::Encoder<'static, Vec<u8>>);

impl Compressor {
    pub fn new() -> std::io::Result<Compressor> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), LEVEL)?;
        encoder.window_log(WINDOW_LOG)?;
        Ok(Compressor(encoder))
    }

    /// Adds bytes of the stream.
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all(data)
    }

    /// Flushes and returns the compressed bytes produced so far: the other side can
    /// decode everything written before this call from them.
    pub fn flush(&mut self) -> std::io::Result<Vec<u8>> {
        self.0.flush()?;
        Ok(std::mem::take(self.0.get_mut()))
    }
}

/// The reading side.
pub struct Decompressor {
    decoder: zstd::stream::raw::Decoder<'static>,
    /// Compressed bytes received and not yet decoded.
    input: BytesMut,
    /// Bytes were pushed since the last [`Decompressor::pull`], or it filled its step (the
    /// decoder may hold more output).
    more: bool,
    /// Where a step is decoded before it is appended to the caller's buffer. Decoding
    /// straight into that buffer made it reserve a whole step each time: while frames
    /// split off it were alive, each reserve was a new allocation of the step's size, and
    /// a server's memory crept up by ~100 kB/s under a proxy's load (the soak test).
    scratch: Vec<u8>,
}

impl Decompressor {
    pub fn new() -> std::io::Result<Decompressor> {
        let mut decoder = zstd::stream::raw::Decoder::new()?;
        decoder.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
        Ok(Decompressor {
            decoder,
            input: BytesMut::new(),
            more: false,
            scratch: Vec::new(),
        })
    }

    /// Adds compressed bytes as received.
    pub fn push(&mut self, data: &[u8]) {
        self.input.extend_from_slice(data);
        self.more |= !data.is_empty();
    }

    /// Decodes into `out` at most `max` bytes of what was pushed; returns how many. Zero
    /// means everything pushed so far is out: call it until it returns zero.
    pub fn pull(&mut self, out: &mut BytesMut, max: usize) -> std::io::Result<usize> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        if self.scratch.len() < max {
            self.scratch.resize(max, 0);
        }
        let mut produced = 0;
        // Again while input is left, room is left and the last run moved something: zstd
        // stops at the end of each of its frames (a peer may send several).
        let result = loop {
            let mut inb = InBuffer::around(&self.input[..]);
            let mut outb = OutBuffer::around(&mut self.scratch[produced..max]);
            let result = self.decoder.run(&mut inb, &mut outb);
            let (consumed, made) = (inb.pos(), outb.pos());
            self.input.advance(consumed);
            produced += made;
            if result.is_err()
                || self.input.is_empty()
                || produced == max
                || (consumed == 0 && made == 0)
            {
                break result;
            }
        };
        out.extend_from_slice(&self.scratch[..produced]);
        result?;
        self.more = produced == max;
        Ok(produced)
    }

    /// Whether [`Decompressor::pull`] may produce more without anything new pushed: a
    /// reader that stopped pulling (its peer has enough requests in flight) resumes on
    /// this rather than on the socket. A step not filled means the decoder took all the
    /// input it was given, so this is then false until more is pushed.
    pub fn has_more(&self) -> bool {
        self.more
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, DEFAULT_MAX_FRAME};
    use crate::message::{encode_call, Message};
    use crate::{Encoding, Request, Value};

    fn pull_all(d: &mut Decompressor, step: usize) -> Vec<u8> {
        let mut out = BytesMut::new();
        while d.pull(&mut out, step).unwrap() > 0 {}
        out.to_vec()
    }

    /// Each flush lets the other side decode everything written before it, whatever the
    /// split of the compressed bytes and the size of the steps.
    #[test]
    fn flushed_data_decodes_at_once() {
        let mut c = Compressor::new().unwrap();
        let mut d = Decompressor::new().unwrap();
        let mut got = Vec::new();
        let mut sent = Vec::new();
        let mut wire = 0;
        for i in 0..50u32 {
            let msg: Vec<u8> = format!("message {i} ").repeat(i as usize + 1).into_bytes();
            c.write(&msg).unwrap();
            sent.extend_from_slice(&msg);
            let z = c.flush().unwrap();
            wire += z.len();
            for part in z.chunks(7) {
                d.push(part);
                got.extend(pull_all(&mut d, 13));
            }
            assert_eq!(got, sent);
        }
        assert!(wire * 4 < sent.len(), "{wire} of {}", sent.len());
    }

    /// A small input that stands for a lot comes out no faster than asked for.
    #[test]
    fn a_bomb_is_decoded_in_bounded_steps() {
        let mut c = Compressor::new().unwrap();
        c.write(&vec![0u8; 64 << 20]).unwrap();
        let z = c.flush().unwrap();
        assert!(z.len() < 64 << 10, "{}", z.len());
        let mut d = Decompressor::new().unwrap();
        assert!(!d.has_more());
        d.push(&z);
        // Pushed, not pulled yet: a reader that could not pull then must come back.
        assert!(d.has_more());
        let mut out = BytesMut::new();
        assert_eq!(d.pull(&mut out, 1 << 20).unwrap(), 1 << 20);
        assert_eq!(out.len(), 1 << 20);
        // All the input is taken, yet more is to come out: a reader resumes on this.
        assert!(d.has_more());
        out.clear();
        let mut total = 1 << 20;
        loop {
            let n = d.pull(&mut out, 1 << 20).unwrap();
            assert!(out.len() <= 1 << 20);
            out.clear();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 64 << 20);
        assert!(!d.has_more());
    }

    /// The client's side of the switch: its calls as framed on the wire, plain up to and
    /// including `zeors_compress`, one zstd stream (flushed per call) after it.
    fn client_wire(calls: &[(&str, Vec<Value>)]) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut c: Option<Compressor> = None;
        for (i, (name, args)) in calls.iter().enumerate() {
            let payload = encode_call(
                Encoding::Pickle,
                &Value::Int(i64::try_from(i).expect("a few calls") + 1),
                false,
                name,
                args.clone(),
            );
            let f = frame::frame(&payload);
            match &mut c {
                Some(c) => {
                    c.write(&f).unwrap();
                    wire.extend(c.flush().unwrap());
                }
                None => wire.extend_from_slice(&f),
            }
            if *name == "zeors_compress" {
                c = Some(Compressor::new().unwrap());
            }
        }
        wire
    }

    /// The server's side, as the session reads: plain frames until a `zeors_compress`,
    /// whatever followed it in the same read into the decompressor, then frames out of
    /// [`Decompressor::pull`] steps. Returns the calls' names and the most ever buffered.
    fn server_read(
        wire: &[u8],
        chunk: usize,
        step: usize,
        max_frame: usize,
    ) -> Result<(Vec<String>, usize), String> {
        let limits = crate::Limits::default();
        let mut buf = BytesMut::new();
        let mut d: Option<Decompressor> = None;
        let mut names = Vec::new();
        let mut most = 0;
        for part in wire.chunks(chunk) {
            match &mut d {
                Some(d) => d.push(part),
                None => buf.extend_from_slice(part),
            }
            loop {
                most = most.max(buf.len());
                match frame::decode_frame(&mut buf, max_frame).map_err(|e| e.to_string())? {
                    Some(payload) => {
                        let m = Message::decode(Encoding::Pickle, &payload, &limits)
                            .map_err(|e| e.to_string())?;
                        let req = Request::parse(&m.name, &m.args).map_err(|e| e.to_string())?;
                        names.push(m.name.clone());
                        if let Request::Compress { method } = req {
                            assert_eq!(method, ZSTD);
                            assert!(d.is_none(), "switched twice");
                            let mut new = Decompressor::new().unwrap();
                            new.push(&buf.split());
                            d = Some(new);
                        }
                    }
                    None => match &mut d {
                        Some(d) => {
                            if d.pull(&mut buf, step).map_err(|e| e.to_string())? == 0 {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        }
        Ok((names, most))
    }

    /// Calls before the switch are read plain, those after it decompressed, however the
    /// wire is cut into reads (the switch may fall in the middle of one).
    #[test]
    fn negotiation_switches_at_the_byte_after_the_request() {
        let big = Value::Bytes(vec![b'x'; 300_000].into());
        let calls = vec![
            ("register", vec![Value::str("1"), Value::Bool(false)]),
            ("get_info", vec![]),
            ("zeors_compress", vec![Value::str(ZSTD)]),
            ("ping", vec![]),
            ("lastTransaction", vec![]),
            ("ping", vec![big]),
            ("ping", vec![]),
        ];
        let wire = client_wire(&calls);
        let plain: usize = calls.iter().map(|(n, _)| n.len()).sum::<usize>() + 300_000;
        assert!(wire.len() < plain / 10, "{} bytes on the wire", wire.len());
        let expected: Vec<String> = calls.iter().map(|(n, _)| n.to_string()).collect();
        for chunk in [1, 7, 100, 4096, wire.len()] {
            let (names, _) = server_read(&wire, chunk, 1024, DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(names, expected, "reads of {chunk} bytes");
        }
    }

    /// A frame whose length is over the limit is refused as soon as its 4 bytes come out
    /// of the decompressor, with no more than a step decompressed: the same error as
    /// plain, whatever the compressed bytes stand for.
    #[test]
    fn a_bomb_is_a_frame_error_after_one_step() {
        let max = 1 << 20;
        let mut wire = client_wire(&[("zeors_compress", vec![Value::str(ZSTD)])]);
        let mut c = Compressor::new().unwrap();
        // A frame of 256 MB of zeros (which zstd sends in a few KB), over the 1 MB limit.
        c.write(&(256u32 << 20).to_be_bytes()).unwrap();
        for _ in 0..256 {
            c.write(&[0u8; 1 << 20]).unwrap();
        }
        let z = c.flush().unwrap();
        assert!(z.len() < 64 << 10, "{}", z.len());
        wire.extend(z);
        let err = server_read(&wire, 16 << 10, 64 << 10, max).unwrap_err();
        assert!(err.contains("exceeds the limit"), "{err}");
    }

    /// Frames within the limit but large come out whole, with no more buffered than the
    /// frame and a step; frames of nothing but a length are refused by the message
    /// decoder, not by an allocation.
    #[test]
    fn large_frames_are_buffered_no_more_than_a_step_beyond() {
        let big = Value::Bytes(vec![7u8; 3 << 20].into());
        let calls = vec![
            ("zeors_compress", vec![Value::str(ZSTD)]),
            ("ping", vec![big]),
            ("ping", vec![]),
        ];
        let wire = client_wire(&calls);
        let (names, most) = server_read(&wire, 1 << 10, 64 << 10, 4 << 20).unwrap();
        assert_eq!(names.len(), 3);
        assert!(most <= (3 << 20) + 100 + (64 << 10), "{most}");

        let mut wire = client_wire(&calls[..1]);
        let mut c = Compressor::new().unwrap();
        c.write(&[0u8; 1 << 20]).unwrap();
        wire.extend(c.flush().unwrap());
        let err = server_read(&wire, 1 << 10, 64 << 10, 4 << 20).unwrap_err();
        assert!(err.contains("undecodable"), "{err}");
    }

    #[test]
    fn a_window_larger_than_accepted_is_an_error() {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), LEVEL).unwrap();
        e.window_log(WINDOW_LOG_MAX + 4).unwrap();
        e.write_all(&[1u8; 1 << 10]).unwrap();
        e.flush().unwrap();
        let mut d = Decompressor::new().unwrap();
        d.push(e.get_ref());
        assert!(d.pull(&mut BytesMut::new(), 1 << 20).is_err());
        // Ours is within the bound.
        let mut c = Compressor::new().unwrap();
        c.write(&[1u8; 1 << 10]).unwrap();
        let mut d = Decompressor::new().unwrap();
        d.push(&c.flush().unwrap());
        assert_eq!(d.pull(&mut BytesMut::new(), 1 << 20).unwrap(), 1 << 10);
    }

    #[test]
    fn garbage_is_an_error() {
        let mut d = Decompressor::new().unwrap();
        d.push(b"this is not zstd at all");
        assert!(d.pull(&mut BytesMut::new(), 1024).is_err());
    }
}
