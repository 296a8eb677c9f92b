//! Python's `Data.fs.index` format (docs/filestorage.md §3.2): a stream of separate protocol-3 pickles
//! written with `Pickler.fast = True` (no memo):
//!
//! 1. the int `pos` (end of the last transaction the index covers);
//! 2. per 6-byte oid prefix, ascending: the tuple `(prefix, suffixes ‖ positions)` where the
//!    second item is `fsBucket.toString()`: n 2-byte suffixes then n 6-byte positions;
//! 3. `None`.
//!
//! Only this modern form is read; anything else (the legacy dict form, Python 2 pickles,
//! damage) is reported as an error and the caller rebuilds the index from `Data.fs`.
//! The parser reads through zodb's shared, bounds-checked pickle [`Reader`] and the
//! writer emits through its [`Writer`]: it never panics and never allocates more than the
//! input holds.

use crate::index::{Bucket, Index};
use bytes::Bytes;
use fsio::{Fs, Mode};
use std::io;
use std::path::Path;
use zodb::pickle::{self, op, Reader, Truncated, Writer};

/// Why a `.index` file was not usable.
#[derive(Debug, thiserror::Error)]
pub enum IndexFileError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("unsupported or damaged index at byte {at}: {what}")]
    Bad { at: usize, what: &'static str },
}

/// A cursor over the file: the shared pickle [`Reader`], with this format's errors.
struct Cursor<'a> {
    r: Reader<'a>,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { r: Reader::new(b) }
    }

    fn bad(&self, what: &'static str) -> IndexFileError {
        IndexFileError::Bad {
            at: self.r.pos(),
            what,
        }
    }

    fn truncated(t: Truncated) -> IndexFileError {
        IndexFileError::Bad {
            at: t.at,
            what: "truncated",
        }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], IndexFileError> {
        self.r.take(n).map_err(Self::truncated)
    }

    fn byte(&mut self) -> Result<u8, IndexFileError> {
        self.r.byte().map_err(Self::truncated)
    }

    fn le(&mut self, n: usize) -> Result<u64, IndexFileError> {
        self.r.uint_le(n).map_err(Self::truncated)
    }

    /// `PROTO n` (2..=5) and, for protocol ≥ 4, an optional `FRAME`.
    fn start_pickle(&mut self) -> Result<(), IndexFileError> {
        if self.byte()? != op::PROTO {
            return Err(self.bad("expected PROTO"));
        }
        let proto = self.byte()?;
        if !(2..=5).contains(&proto) {
            return Err(self.bad("unsupported pickle protocol"));
        }
        if self.r.peek() == Some(op::FRAME) {
            self.take(9)?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), IndexFileError> {
        if self.byte()? != op::STOP {
            return Err(self.bad("expected STOP"));
        }
        Ok(())
    }

    /// A non-negative int that fits in u64.
    fn uint(&mut self) -> Result<u64, IndexFileError> {
        match self.byte()? {
            op::BININT1 => self.le(1),
            op::BININT2 => self.le(2),
            op::BININT => {
                // BININT is a signed 32-bit int.
                let v = i32::from_le_bytes(self.r.array().map_err(Self::truncated)?);
                u64::try_from(v).map_err(|_| self.bad("negative position"))
            }
            opcode @ (op::LONG1 | op::LONG4) => {
                let n = self.le(if opcode == op::LONG1 { 1 } else { 4 })?;
                let s = self.take(n)?;
                if s.last().is_some_and(|&b| b & 0x80 != 0) {
                    return Err(self.bad("negative position"));
                }
                pickle::decode_long(s)
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| self.bad("position too large"))
            }
            _ => Err(self.bad("expected an int")),
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], IndexFileError> {
        let n = match self.byte()? {
            op::SHORT_BINBYTES => self.le(1)?,
            op::BINBYTES => self.le(4)?,
            op::BINBYTES8 => self.le(8)?,
            _ => return Err(self.bad("expected bytes")),
        };
        self.take(n)
    }
}

/// Parses a whole `.index` file: `(pos, index)`.
pub fn parse(b: &[u8]) -> Result<(u64, Index), IndexFileError> {
    parse_bytes(&Bytes::copy_from_slice(b))
}

/// [`parse`] over shared bytes: the buckets keep their file form, slices of `file`,
/// until they are modified (see [`crate::index`]).
pub fn parse_bytes(file: &Bytes) -> Result<(u64, Index), IndexFileError> {
    let b: &[u8] = file;
    let mut c = Cursor::new(b);
    c.start_pickle()?;
    let pos = c.uint()?;
    c.stop()?;
    let mut index = Index::new();
    loop {
        c.start_pickle()?;
        if c.r.peek() == Some(op::NONE) {
            c.take(1)?;
            c.stop()?;
            break;
        }
        let prefix = c.bytes()?;
        let prefix: [u8; 6] = prefix
            .try_into()
            .map_err(|_| c.bad("oid prefix is not 6 bytes"))?;
        let data = c.bytes()?;
        if c.byte()? != op::TUPLE2 {
            return Err(c.bad("expected TUPLE2"));
        }
        c.stop()?;
        if !data.len().is_multiple_of(8) {
            return Err(c.bad("bucket length is not a multiple of 8"));
        }
        let bucket = Bucket::from_string_form(file.slice_ref(data))
            .ok_or_else(|| c.bad("bucket keys not sorted"))?;
        let prefix = u64::from_be_bytes([
            0, 0, prefix[0], prefix[1], prefix[2], prefix[3], prefix[4], prefix[5],
        ]);
        if !index.push_bucket(prefix, bucket) {
            return Err(c.bad("oid prefixes not ascending"));
        }
    }
    Ok((pos, index))
}

/// Reads and parses `path`.
pub fn load(fs: &dyn Fs, path: &Path) -> Result<(u64, Index), IndexFileError> {
    let b = Bytes::from(fsio::read(fs, path)?);
    parse_bytes(&b)
}

/// Serialises `index` covering the file up to `pos`, byte-identical to `fsIndex.save`.
pub fn serialize(index: &Index, pos: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + index.len() * 8 + index.buckets().count() * 24);
    let mut w = Writer::new(&mut out);
    w.proto(pickle::ZODB_PROTOCOL);
    w.int(pos.into());
    w.op(op::STOP);
    let mut data = Vec::new();
    for (prefix, bucket) in index.buckets() {
        w.proto(pickle::ZODB_PROTOCOL);
        w.bytes(&prefix.to_be_bytes()[2..]);
        data.clear();
        bucket.write_string_form(&mut data);
        w.bytes(&data);
        w.op(op::TUPLE2);
        w.op(op::STOP);
    }
    w.proto(pickle::ZODB_PROTOCOL);
    w.none();
    w.op(op::STOP);
    out
}

/// Writes `path` via `path.index_tmp`-style temporary `tmp` and a rename, so a reader
/// never sees a half-written index. The temporary file is fsynced first: a crash must not
/// leave a renamed but empty index (it would merely be rebuilt, but slowly).
pub fn save(fs: &dyn Fs, index: &Index, pos: u64, path: &Path, tmp: &Path) -> io::Result<()> {
    let bytes = serialize(index, pos);
    let f = fs.open(tmp, Mode::Truncate)?;
    f.write_all_at(&bytes, 0)?;
    f.sync_data()?;
    drop(f);
    fs.rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zodb::Oid;

    const SPEC_INDEX: &[u8] = include_bytes!("../testdata/spec_example.fs.index");

    #[test]
    fn spec_example_round_trip() {
        let (pos, index) = parse(SPEC_INDEX).unwrap();
        assert_eq!(pos, 474);
        assert_eq!(index.len(), 2);
        assert_eq!(index.get(Oid(0)), Some(222));
        assert_eq!(index.get(Oid(1)), Some(350));
        assert_eq!(serialize(&index, pos), SPEC_INDEX);
    }

    #[test]
    fn ints_like_python() {
        let cases: &[(u64, &[u8])] = &[
            (4, b"K\x04"),
            (474, b"M\xda\x01"),
            (70_000, b"J\x70\x11\x01\x00"),
            (0x7fff_ffff, b"J\xff\xff\xff\x7f"),
            (0x8000_0000, b"\x8a\x05\x00\x00\x00\x80\x00"),
            (1 << 40, b"\x8a\x06\x00\x00\x00\x00\x00\x01"),
            (u64::MAX, b"\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\x00"),
        ];
        for &(n, enc) in cases {
            let mut out = Vec::new();
            Writer::new(&mut out).int(n.into());
            assert_eq!(out, enc, "{n}");
            let mut c = Cursor::new(&out);
            assert_eq!(c.uint().unwrap(), n);
        }
    }

    #[test]
    fn large_buckets_use_binbytes() {
        let mut index = Index::new();
        for i in 0..100u64 {
            index.insert(Oid(i), 1000 + i);
        }
        index.insert(Oid(1 << 20), 5);
        let b = serialize(&index, 123_456);
        let (pos, back) = parse(&b).unwrap();
        assert_eq!(pos, 123_456);
        assert_eq!(back, index);
    }

    #[test]
    fn damage_is_an_error_never_a_panic() {
        for cut in 0..SPEC_INDEX.len() {
            assert!(parse(&SPEC_INDEX[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..SPEC_INDEX.len() {
            for v in [0u8, 0xff, b'N', b'.', 0x86] {
                let mut b = SPEC_INDEX.to_vec();
                b[i] = v;
                let _ = parse(&b);
            }
        }
        // A legacy dict-form index is not read.
        assert!(parse(b"\x80\x03}q\x00.").is_err());
    }
}
