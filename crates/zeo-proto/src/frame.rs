//! ZEO framing: every message is a 4-byte big-endian length followed by that many bytes.
//!
//! The decoder is a plain function over a buffer so that any I/O layer (tokio codec, a
//! blocking test client, a fuzzer) can drive it. The length limit is the server's defence
//! against a peer announcing a 4 GiB frame: it is checked before any byte of the body is
//! buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Default limit for one message. Object records of hundreds of MiB exist in the wild,
/// so the limit is generous; blobs travel in 59 KB chunks and are not affected.
pub const DEFAULT_MAX_FRAME: usize = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// Takes one complete frame's payload off the front of `buf`, if there is one.
pub fn decode_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Appends a frame holding `payload` to `out`.
pub fn encode_frame(payload: &[u8], out: &mut BytesMut) {
    out.reserve(4 + payload.len());
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
}

/// A frame as one buffer (length prefix included).
pub fn frame(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + payload.len());
    encode_frame(payload, &mut out);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_across_reads() {
        let mut wire = BytesMut::new();
        encode_frame(b"Z5", &mut wire);
        encode_frame(b"hello", &mut wire);
        let all = wire.freeze();
        // Feed one byte at a time.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in all.iter() {
            buf.put_u8(*b);
            while let Some(f) = decode_frame(&mut buf, 100).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![Bytes::from_static(b"Z5"), Bytes::from_static(b"hello")]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_huge_frames_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2][..]);
        assert_eq!(
            decode_frame(&mut buf, DEFAULT_MAX_FRAME),
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                max: DEFAULT_MAX_FRAME
            })
        );
    }
}
