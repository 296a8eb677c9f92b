//! Pickle knowledge shared by every decoder and encoder in zeors.
//!
//! ZODB records and ZEO messages are pickles. Four parts of zeors read or write them, each
//! with its own idea of what a value is: the protocol value codec (`zeo-proto`), the
//! persistent-reference scanner ([`crate::refs`]), the `Data.fs.index` reader and writer
//! (`filestorage`) and the BTrees conflict resolver (`btrees`). What they share lives
//! here, in the lowest crate that needs it:
//!
//! - [`op`]: the opcode bytes, named once;
//! - [`Reader`]: the one bounds-checked cursor (no read past the end, no length trusted
//!   before it is checked against the bytes left);
//! - [`Writer`]: protocol-3 output as zodbpickle's C pickler writes it;
//! - the integer codec of LONG1/LONG4 ([`decode_long`]) and Python's exact comparison of
//!   an int with a float ([`int_float_cmp`]), which decoders that model Python values
//!   need.

pub mod op;
mod reader;
mod writer;

pub use reader::{Reader, Truncated};
pub use writer::Writer;

use std::cmp::Ordering;

/// The highest protocol ZODB and ZEO write (zodbpickle's highest).
pub const ZODB_PROTOCOL: u8 = 3;

/// A LONG1/LONG4 payload (little-endian two's complement of any length) as an `i128`;
/// `None` when the value does not fit. Beyond 16 bytes only sign extension is allowed.
pub fn decode_long(bytes: &[u8]) -> Option<i128> {
    let Some(&last) = bytes.last() else {
        return Some(0);
    };
    let fill = if last & 0x80 != 0 { 0xff } else { 0x00 };
    const WIDTH: usize = 16;
    if bytes.len() > WIDTH {
        let fits = bytes[WIDTH..].iter().all(|&b| b == fill)
            && (bytes[WIDTH - 1] & 0x80 != 0) == (fill == 0xff);
        if !fits {
            return None;
        }
    }
    let mut buf = [fill; WIDTH];
    let n = bytes.len().min(WIDTH);
    buf[..n].copy_from_slice(&bytes[..n]);
    Some(i128::from_le_bytes(buf))
}

/// Python's comparison of an int with a float: exact (`2**53 + 1 > 2.0**53`), not by
/// converting the int to a float. `None` when `f` is NaN (every comparison is false).
pub fn int_float_cmp(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // 2^127: every float at or beyond it (or infinite) is beyond every i128.
    const LIMIT: f64 = 170_141_183_460_469_231_731_687_303_715_884_105_728.0;
    if f >= LIMIT {
        return Some(Ordering::Less);
    }
    if f < -LIMIT {
        return Some(Ordering::Greater);
    }
    let whole = f.trunc();
    // In range and integral, so the conversion is exact.
    let w = whole as i128;
    Some(i.cmp(&w).then_with(|| {
        let frac = f - whole;
        if frac > 0.0 {
            Ordering::Less
        } else if frac < 0.0 {
            Ordering::Greater
        } else {
            Ordering::Equal
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longs() {
        assert_eq!(decode_long(&[]), Some(0));
        assert_eq!(decode_long(&[0xff]), Some(-1));
        assert_eq!(decode_long(&[0x00, 0x80]), Some(-32768));
        assert_eq!(
            decode_long(&[0x00, 0x00, 0x00, 0x80, 0x00]),
            Some(0x8000_0000)
        );
        let max = [&[0xff; 15][..], &[0x7f]].concat();
        assert_eq!(decode_long(&max), Some(i128::MAX));
        assert_eq!(decode_long(&[&max[..], &[0x00]].concat()), Some(i128::MAX));
        assert_eq!(decode_long(&[&[0xff; 16][..], &[0x00]].concat()), None);
        assert_eq!(
            decode_long(&[&[0x00; 15][..], &[0x80, 0xff]].concat()),
            Some(i128::MIN)
        );
        assert_eq!(
            decode_long(&[&[0x00; 15][..], &[0x80, 0x00]].concat()),
            None
        );
    }

    #[test]
    fn int_against_float_is_exact() {
        use Ordering::*;
        let two53 = 9_007_199_254_740_992.0f64;
        assert_eq!(int_float_cmp(1 << 53, two53), Some(Equal));
        assert_eq!(int_float_cmp((1 << 53) + 1, two53), Some(Greater));
        assert_eq!(int_float_cmp(1, 1.5), Some(Less));
        assert_eq!(int_float_cmp(-1, -1.5), Some(Greater));
        assert_eq!(int_float_cmp(-2, -1.5), Some(Less));
        assert_eq!(int_float_cmp(0, -0.0), Some(Equal));
        assert_eq!(int_float_cmp(i128::MAX, f64::INFINITY), Some(Less));
        assert_eq!(int_float_cmp(i128::MIN, f64::NEG_INFINITY), Some(Greater));
        assert_eq!(int_float_cmp(i128::MIN, -1.7e38), Some(Less));
        assert_eq!(int_float_cmp(i128::MAX, 1e39), Some(Less));
        assert_eq!(int_float_cmp(0, f64::NAN), None);
    }
}
