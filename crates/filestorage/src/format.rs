//! Record layouts of `Data.fs` (docs/filestorage.md §1): the magic, transaction headers and data record
//! headers, with parsing from and serialisation to their exact byte form, plus the
//! positioned readers the rest of the crate uses.
//!
//! All integers are big-endian. Parsing works on fixed-size arrays, so it cannot fail;
//! the *meaning* of the fields (lengths that run past the end, bad back pointers …) is
//! checked by the callers, which know the context (file size, enclosing transaction).

use crate::error::{Error, Result};
use fsio::FileIo;
use std::io;
use zodb::{Oid, Tid};

/// Magic of files written by Python 3 ZODB (and by us).
pub const MAGIC_FS30: [u8; 4] = *b"FS30";
/// Magic of files written by Python 2 ZODB: same layout, Python 2 pickles. Read only.
pub const MAGIC_FS21: [u8; 4] = *b"FS21";
/// Offset of the first transaction.
pub const FIRST_TXN_POS: u64 = 4;

/// `>8sQcHHH`.
pub const TXN_HEADER_LEN: usize = 23;
/// `>8s8sQQHQ`.
pub const DATA_HEADER_LEN: usize = 42;
/// A data header plus the 8-byte back pointer of a record without data.
pub const DATA_HEADER_WITH_BACK_LEN: usize = DATA_HEADER_LEN + 8;

/// Positions are kept in 48 bits by Python's `fsIndex` and in the `.index` file (§9), so no
/// record may start at or beyond this offset.
pub const POSITION_LIMIT: u64 = 1 << 48;

/// Largest user / description / extension (u16 lengths).
pub const MAX_META_LEN: usize = u16::MAX as usize;

/// Transaction status bytes (§1.2).
pub mod status {
    /// Committed.
    pub const COMMITTED: u8 = b' ';
    /// Committed, rewritten by pack.
    pub const PACKED: u8 = b'p';
    /// Written by vote, not finished yet; only ever at the end of the file.
    pub const CHECKPOINT: u8 = b'c';
    /// Obsolete "undone" status; read, never written.
    pub const UNDONE: u8 = b'u';
}

/// Which magic the file starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    Fs30,
    Fs21,
}

impl Magic {
    pub fn parse(b: [u8; 4]) -> Option<Magic> {
        match b {
            MAGIC_FS30 => Some(Magic::Fs30),
            MAGIC_FS21 => Some(Magic::Fs21),
            _ => None,
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The fixed part of a transaction record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnHeader {
    pub tid: Tid,
    /// Length of the record without the trailing redundant copy of `tlen`.
    pub tlen: u64,
    pub status: u8,
    pub ulen: u16,
    pub dlen: u16,
    pub elen: u16,
}

impl TxnHeader {
    pub fn parse(b: &[u8; TXN_HEADER_LEN]) -> TxnHeader {
        TxnHeader {
            tid: Tid(u64_at(b, 0)),
            tlen: u64_at(b, 8),
            status: b[16],
            ulen: u16_at(b, 17),
            dlen: u16_at(b, 19),
            elen: u16_at(b, 21),
        }
    }

    pub fn to_bytes(&self) -> [u8; TXN_HEADER_LEN] {
        let mut b = [0u8; TXN_HEADER_LEN];
        b[0..8].copy_from_slice(&self.tid.to_bytes());
        b[8..16].copy_from_slice(&self.tlen.to_be_bytes());
        b[16] = self.status;
        b[17..19].copy_from_slice(&self.ulen.to_be_bytes());
        b[19..21].copy_from_slice(&self.dlen.to_be_bytes());
        b[21..23].copy_from_slice(&self.elen.to_be_bytes());
        b
    }

    /// Fixed header plus user, description and extension.
    pub fn header_len(&self) -> u64 {
        TXN_HEADER_LEN as u64 + u64::from(self.ulen) + u64::from(self.dlen) + u64::from(self.elen)
    }

    /// User, description and extension together (at most 3 × 65,535 bytes).
    pub fn meta_len(&self) -> usize {
        usize::from(self.ulen) + usize::from(self.dlen) + usize::from(self.elen)
    }

    /// Offset just after this record's trailer, if it does not overflow.
    pub fn end(&self, pos: u64) -> Option<u64> {
        pos.checked_add(self.tlen)?.checked_add(8)
    }
}

/// The fixed part of a data record; `back` is filled in when `plen == 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub oid: Oid,
    /// The revision's serial (normally the enclosing transaction's tid).
    pub tid: Tid,
    /// Offset of the oid's previous record, 0 for none.
    pub prev: u64,
    /// Offset of the enclosing transaction.
    pub tloc: u64,
    /// Legacy version-name length; must be 0.
    pub vlen: u16,
    pub plen: u64,
    /// For `plen == 0`: offset of the record holding the data, 0 when the object has no
    /// state (deleted / creation undone). Always 0 when `plen > 0`.
    pub back: u64,
}

impl DataHeader {
    /// Parses the 42 fixed bytes; `back` is left 0.
    pub fn parse(b: &[u8; DATA_HEADER_LEN]) -> DataHeader {
        DataHeader {
            oid: Oid(u64_at(b, 0)),
            tid: Tid(u64_at(b, 8)),
            prev: u64_at(b, 16),
            tloc: u64_at(b, 24),
            vlen: u16_at(b, 32),
            plen: u64_at(b, 34),
            back: 0,
        }
    }

    /// Parses the header from a slice of at least 42 bytes, and the back pointer too when
    /// `plen == 0` and the slice holds it. Returns `None` if the slice is too short.
    pub fn parse_slice(b: &[u8]) -> Option<DataHeader> {
        let fixed: &[u8; DATA_HEADER_LEN] = b.get(..DATA_HEADER_LEN)?.try_into().ok()?;
        let mut h = DataHeader::parse(fixed);
        if h.plen == 0 {
            h.back = u64_at(b.get(..DATA_HEADER_WITH_BACK_LEN)?, DATA_HEADER_LEN);
        }
        Some(h)
    }

    /// The 42 fixed bytes (the back pointer is written separately, see [`write_data_record`]).
    pub fn to_bytes(&self) -> [u8; DATA_HEADER_LEN] {
        let mut b = [0u8; DATA_HEADER_LEN];
        b[0..8].copy_from_slice(&self.oid.to_bytes());
        b[8..16].copy_from_slice(&self.tid.to_bytes());
        b[16..24].copy_from_slice(&self.prev.to_be_bytes());
        b[24..32].copy_from_slice(&self.tloc.to_be_bytes());
        b[32..34].copy_from_slice(&self.vlen.to_be_bytes());
        b[34..42].copy_from_slice(&self.plen.to_be_bytes());
        b
    }

    /// Length of the whole record, `None` on overflow (only a damaged `plen` can do that).
    /// Records with `vlen != 0` are refused before this is used.
    pub fn record_len(&self) -> Option<u64> {
        let body = if self.plen == 0 { 8 } else { self.plen };
        (DATA_HEADER_LEN as u64).checked_add(body)
    }
}

/// What follows a data header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// An inline pickle; must not be empty (an empty one would be read as a back pointer).
    Data(&'a [u8]),
    /// `plen = 0` and this back pointer (0 = the object has no state).
    Back(u64),
}

impl Payload<'_> {
    pub fn record_len(&self) -> u64 {
        DATA_HEADER_LEN as u64
            + match self {
                Payload::Data(d) => d.len() as u64,
                Payload::Back(_) => 8,
            }
    }
}

/// Appends the header of a data record with `plen` bytes of data to `out`; the data
/// follows it in the file.
pub fn write_data_header(out: &mut Vec<u8>, oid: Oid, tid: Tid, prev: u64, tloc: u64, plen: u64) {
    debug_assert!(plen > 0);
    push_data_header(out, oid, tid, prev, tloc, plen);
}

/// The header of a data record (`plen` 0: a back pointer follows).
fn push_data_header(out: &mut Vec<u8>, oid: Oid, tid: Tid, prev: u64, tloc: u64, plen: u64) {
    let h = DataHeader {
        oid,
        tid,
        prev,
        tloc,
        vlen: 0,
        plen,
        back: 0,
    };
    out.extend_from_slice(&h.to_bytes());
}

/// Appends a complete data record to `out`.
pub fn write_data_record(
    out: &mut Vec<u8>,
    oid: Oid,
    tid: Tid,
    prev: u64,
    tloc: u64,
    payload: Payload<'_>,
) {
    debug_assert!(!matches!(payload, Payload::Data(d) if d.is_empty()));
    let plen = match payload {
        Payload::Data(d) => d.len() as u64,
        Payload::Back(_) => 0,
    };
    push_data_header(out, oid, tid, prev, tloc, plen);
    match payload {
        Payload::Data(d) => out.extend_from_slice(d),
        Payload::Back(back) => out.extend_from_slice(&back.to_be_bytes()),
    }
}

/// Appends a transaction header with its user, description and extension to `out`.
/// The lengths must already have been checked against [`MAX_META_LEN`].
pub fn write_txn_header(
    out: &mut Vec<u8>,
    tid: Tid,
    tlen: u64,
    status: u8,
    user: &[u8],
    description: &[u8],
    extension: &[u8],
) {
    let h = TxnHeader {
        tid,
        tlen,
        status,
        ulen: u16::try_from(user.len()).expect("user length checked"),
        dlen: u16::try_from(description.len()).expect("description length checked"),
        elen: u16::try_from(extension.len()).expect("extension length checked"),
    };
    out.extend_from_slice(&h.to_bytes());
    out.extend_from_slice(user);
    out.extend_from_slice(description);
    out.extend_from_slice(extension);
}

/// Maps a short read to a corruption error at `pos`.
pub(crate) fn read_at(io: &dyn FileIo, buf: &mut [u8], pos: u64, what: &str) -> Result<()> {
    io.read_exact_at(buf, pos).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::corrupted(pos, format!("{what} runs past the end of the file"))
        } else {
            Error::Io(e)
        }
    })
}

/// Reads the transaction header at `pos`.
pub(crate) fn read_txn_header(io: &dyn FileIo, pos: u64) -> Result<TxnHeader> {
    let mut b = [0u8; TXN_HEADER_LEN];
    read_at(io, &mut b, pos, "transaction header")?;
    Ok(TxnHeader::parse(&b))
}

/// Reads the u64 at `pos` (a trailer or a back pointer).
pub(crate) fn read_u64(io: &dyn FileIo, pos: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    read_at(io, &mut b, pos, "length field")?;
    Ok(u64::from_be_bytes(b))
}

/// Reads the data header at `pos`, including the back pointer for records without data,
/// in one positioned read when `limit` (an offset known to be inside the file) allows.
/// Refuses version records.
pub(crate) fn read_data_header(io: &dyn FileIo, pos: u64, limit: u64) -> Result<DataHeader> {
    let mut b = [0u8; DATA_HEADER_WITH_BACK_LEN];
    let speculative = pos.saturating_add(DATA_HEADER_WITH_BACK_LEN as u64) <= limit;
    let n = if speculative {
        DATA_HEADER_WITH_BACK_LEN
    } else {
        DATA_HEADER_LEN
    };
    read_at(io, &mut b[..n], pos, "data record header")?;
    let fixed: &[u8; DATA_HEADER_LEN] = b[..DATA_HEADER_LEN].try_into().expect("42 bytes");
    let mut h = DataHeader::parse(fixed);
    if h.vlen != 0 {
        return Err(Error::corrupted(
            pos,
            format!(
                "data record with a version (vlen {}), not supported",
                h.vlen
            ),
        ));
    }
    if h.plen == 0 {
        if !speculative {
            read_at(
                io,
                &mut b[DATA_HEADER_LEN..],
                pos + DATA_HEADER_LEN as u64,
                "back pointer",
            )?;
        }
        h.back = u64_at(&b, DATA_HEADER_LEN);
    }
    Ok(h)
}

/// `n`, an offset or length that is already bounded by the size of a buffer in memory (a
/// `.min()` with a buffer's length or a constant buffer size, or a check that it lies
/// inside a buffer), as a `usize`. Such a value always fits; a length read from the file
/// must not come here unchecked (it goes through `usize::try_from` and is damage if it
/// does not fit). Should a caller's bound ever be wrong, this panics rather than
/// truncating: on 64-bit targets it cannot fail at all.
pub(crate) fn mem_len(n: u64) -> usize {
    usize::try_from(n).expect("a length bounded by a buffer in memory fits in usize")
}

/// Reads the user, description and extension that follow the header at `pos`.
pub(crate) fn read_txn_meta(
    io: &dyn FileIo,
    pos: u64,
    h: &TxnHeader,
) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let mut b = vec![0u8; h.meta_len()];
    read_at(
        io,
        &mut b,
        pos + TXN_HEADER_LEN as u64,
        "transaction metadata",
    )?;
    let e = b.split_off(h.ulen as usize + h.dlen as usize);
    let d = b.split_off(h.ulen as usize);
    Ok((b, d, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_header_round_trip() {
        let h = TxnHeader {
            tid: Tid(0x03f5_9458_1777_7778),
            tlen: 300,
            status: b' ',
            ulen: 5,
            dlen: 5,
            elen: 23,
        };
        let b = h.to_bytes();
        assert_eq!(
            &b[..],
            &[
                0x03, 0xf5, 0x94, 0x58, 0x17, 0x77, 0x77, 0x78, 0, 0, 0, 0, 0, 0, 0x01, 0x2c, 0x20,
                0, 5, 0, 5, 0, 0x17
            ]
        );
        assert_eq!(TxnHeader::parse(&b), h);
        assert_eq!(h.header_len(), 23 + 33);
        assert_eq!(h.end(166), Some(474));
        let huge = TxnHeader {
            tlen: u64::MAX,
            ..h
        };
        assert_eq!(huge.end(4), None);
    }

    #[test]
    fn data_record_round_trip() {
        let mut out = Vec::new();
        write_data_record(&mut out, Oid(1), Tid(7), 52, 4, Payload::Data(b"abc"));
        assert_eq!(out.len(), 45);
        let h = DataHeader::parse_slice(&out).unwrap();
        assert_eq!(
            h,
            DataHeader {
                oid: Oid(1),
                tid: Tid(7),
                prev: 52,
                tloc: 4,
                vlen: 0,
                plen: 3,
                back: 0
            }
        );
        assert_eq!(h.record_len(), Some(45));
        assert_eq!(&out[42..], b"abc");

        let mut out = Vec::new();
        write_data_record(&mut out, Oid(2), Tid(8), 0, 99, Payload::Back(52));
        assert_eq!(out.len(), 50);
        let h = DataHeader::parse_slice(&out).unwrap();
        assert_eq!((h.plen, h.back, h.record_len()), (0, 52, Some(50)));
        assert_eq!(DataHeader::parse_slice(&out[..45]), None);
        let fixed: [u8; 42] = out[..42].try_into().unwrap();
        assert_eq!(DataHeader::parse(&fixed).to_bytes(), fixed);
    }

    #[test]
    fn txn_header_serialisation_matches_layout() {
        let mut out = Vec::new();
        write_txn_header(&mut out, Tid(1), 40, b'c', b"u", b"dd", b"eee");
        assert_eq!(out.len(), 23 + 6);
        let h = TxnHeader::parse(out[..23].try_into().unwrap());
        assert_eq!((h.status, h.ulen, h.dlen, h.elen), (b'c', 1, 2, 3));
        assert_eq!(&out[23..], b"uddeee");
    }

    #[test]
    fn magic() {
        assert_eq!(Magic::parse(*b"FS30"), Some(Magic::Fs30));
        assert_eq!(Magic::parse(*b"FS21"), Some(Magic::Fs21));
        assert_eq!(Magic::parse(*b"FS31"), None);
    }
}
