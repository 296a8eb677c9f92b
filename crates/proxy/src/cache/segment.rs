//! Segment files: the append-only logs that hold cached object data.
//!
//! A segment is `segments/NNNNNNNN.seg` (its number in decimal, zero-padded to 8 digits):
//!
//! ```text
//! header  (16 bytes)  b"ZEORSSEG"  segment number (u64 BE)
//! record  (28 + n)    b"ZRC1"  n (u32 BE)  crc32 (u32 BE)  oid (u64 BE)  start tid (u64 BE)  data (n bytes)
//! record  ...
//! ```
//!
//! The crc covers `n`, the oid, the start tid and the data, so every record checks itself:
//! a torn write, a lost unsynced write, a flipped bit or a stale index entry that points at
//! the wrong bytes all fail the check (or the oid/start comparison) and become a miss.
//! The index (see `index.rs`) stores where a record is; a record never moves. Segments are
//! never modified after the fact, only appended to and, when evicted, deleted whole.

use bytes::Bytes;
use fsio::{FileIo, Fs, Mode};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zodb::{Oid, Tid};

/// First bytes of every segment file.
pub(super) const SEGMENT_MAGIC: [u8; 8] = *b"ZEORSSEG";
/// Segment header: magic + segment number.
pub(super) const SEGMENT_HEADER_LEN: u64 = 16;
/// First bytes of every record.
const RECORD_MAGIC: [u8; 4] = *b"ZRC1";
/// Record header: magic, data length, crc, oid, start.
pub(super) const RECORD_HEADER_LEN: u64 = 28;

/// Where a record lives: segment number, byte offset of its header, length of its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Loc {
    pub seg: u64,
    pub off: u32,
    pub len: u32,
}

impl Loc {
    /// Bytes the record takes on disk, header included.
    pub fn record_len(self) -> u64 {
        RECORD_HEADER_LEN + u64::from(self.len)
    }
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecordError {
    #[error("segment {0} is gone")]
    MissingSegment(u64),
    #[error("reading the record: {0}")]
    Io(#[from] io::Error),
    #[error("record fails its check: {0}")]
    Corrupt(&'static str),
}

pub(super) fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:08}.seg"))
}

/// The segment number of a file name, if it is a segment's name.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Creates segment `seg` (it must not exist) with its header written (not synced).
pub(super) fn create_segment(fs: &dyn Fs, dir: &Path, seg: u64) -> io::Result<Arc<dyn FileIo>> {
    let file = fs.open(&segment_path(dir, seg), Mode::CreateNew)?;
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..].copy_from_slice(&seg.to_be_bytes());
    file.write_all_at(&header, 0)?;
    Ok(file)
}

/// Whether `file` starts with the header of segment `seg`.
pub(super) fn check_segment_header(file: &dyn FileIo, seg: u64) -> io::Result<bool> {
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    match file.read_exact_at(&mut header, 0) {
        Ok(()) => Ok(header[..8] == SEGMENT_MAGIC && header[8..] == seg.to_be_bytes()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn record_crc(len: &[u8], oid: Oid, start: Tid, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(&oid.to_bytes());
    h.update(&start.to_bytes());
    h.update(data);
    h.finalize()
}

/// The bytes of one record. The caller checked that `data` fits a `u32`.
pub(super) fn encode_record(oid: Oid, start: Tid, data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u32).to_be_bytes();
    let mut rec = Vec::with_capacity(RECORD_HEADER_LEN as usize + data.len());
    rec.extend_from_slice(&RECORD_MAGIC);
    rec.extend_from_slice(&len);
    rec.extend_from_slice(&record_crc(&len, oid, start, data).to_be_bytes());
    rec.extend_from_slice(&oid.to_bytes());
    rec.extend_from_slice(&start.to_bytes());
    rec.extend_from_slice(data);
    rec
}

/// Checks a whole record read from `loc` against what the index says it is, and returns
/// its data (sharing `buf`'s allocation).
pub(super) fn decode_record(
    buf: Vec<u8>,
    loc: Loc,
    oid: Oid,
    start: Tid,
) -> Result<Bytes, RecordError> {
    let h = RECORD_HEADER_LEN as usize;
    if buf.len() != h + loc.len as usize {
        return Err(RecordError::Corrupt("short record"));
    }
    if buf[0..4] != RECORD_MAGIC {
        return Err(RecordError::Corrupt("bad magic"));
    }
    if buf[4..8] != loc.len.to_be_bytes() {
        return Err(RecordError::Corrupt("length differs from the index"));
    }
    if buf[12..20] != oid.to_bytes() || buf[20..28] != start.to_bytes() {
        return Err(RecordError::Corrupt("oid or tid differs from the index"));
    }
    let crc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if crc != record_crc(&buf[4..8], oid, start, &buf[h..]) {
        return Err(RecordError::Corrupt("checksum mismatch"));
    }
    Ok(Bytes::from(buf).slice(h..))
}

/// Reads and checks the record at `loc` with one positioned read.
pub(super) fn read_record(
    file: &dyn FileIo,
    loc: Loc,
    oid: Oid,
    start: Tid,
) -> Result<Bytes, RecordError> {
    let mut buf = vec![0u8; loc.record_len() as usize];
    match file.read_exact_at(&mut buf, u64::from(loc.off)) {
        Ok(()) => decode_record(buf, loc, oid, start),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(RecordError::Corrupt(
            "record extends past the end of its segment",
        )),
        Err(e) => Err(RecordError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(len: usize) -> Loc {
        Loc {
            seg: 1,
            off: 16,
            len: len as u32,
        }
    }

    #[test]
    fn record_round_trip() {
        let rec = encode_record(Oid(7), Tid(9), b"hello");
        let data = decode_record(rec, loc(5), Oid(7), Tid(9)).unwrap();
        assert_eq!(&data[..], b"hello");
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let rec = encode_record(Oid(7), Tid(9), b"some object state");
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x40;
            assert!(
                decode_record(bad, loc(17), Oid(7), Tid(9)).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn record_of_another_revision_is_rejected() {
        let rec = encode_record(Oid(7), Tid(9), b"x");
        assert!(decode_record(rec.clone(), loc(1), Oid(7), Tid(10)).is_err());
        assert!(decode_record(rec.clone(), loc(1), Oid(8), Tid(9)).is_err());
        assert!(decode_record(rec, loc(2), Oid(7), Tid(9)).is_err());
    }

    #[test]
    fn segment_names() {
        assert_eq!(parse_segment_name("00000012.seg"), Some(12));
        assert_eq!(parse_segment_name("123456789.seg"), Some(123_456_789));
        assert_eq!(parse_segment_name("12.seg.tmp"), None);
        assert_eq!(parse_segment_name(".seg"), None);
        assert_eq!(parse_segment_name("+1.seg"), None);
        let p = segment_path(Path::new("/x"), 3);
        assert_eq!(p, Path::new("/x/00000003.seg"));
    }
}
