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

/// The least a partial frame's buffer grows by (see [`decode_frame`]).
const GROW_STEP: usize = 64 * 1024;

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
        // Make room for the rest of the frame as it arrives, at most doubling what is
        // buffered each time: a peer that announces a huge frame gets memory in
        // proportion to the bytes it actually sends, not to the length it claims (an
        // allocation the size of the claim fails outright under strict overcommit, and
        // a failed allocation aborts the whole process).
        buf.reserve((4 + len - buf.len()).min(buf.len().max(GROW_STEP)));
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Appends a frame holding `payload` to `out`.
///
/// # Panics
/// If `payload` is 4 GiB or more, which the 4-byte length cannot say (as Python's
/// `struct.pack(">I", ...)` refuses it): a truncated length would desynchronise the
/// stream, so this fails loudly, as the msgpack encoder does for such lengths.
pub fn encode_frame(payload: &[u8], out: &mut BytesMut) {
    out.reserve(4 + payload.len());
    out.put_u32(frame_len(payload.len()));
    out.put_slice(payload);
}

/// `len` as a frame's length prefix; panics if it does not fit (see [`encode_frame`]).
pub(crate) fn frame_len(len: usize) -> u32 {
    u32::try_from(len).expect("a ZEO frame cannot hold 2^32 bytes or more")
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
    fn memory_follows_the_bytes_received_not_the_length_announced() {
        let mut buf = BytesMut::new();
        buf.put_u32(400 * 1024 * 1024);
        buf.put_slice(b"abc");
        assert_eq!(decode_frame(&mut buf, DEFAULT_MAX_FRAME), Ok(None));
        assert!(buf.capacity() <= 2 * GROW_STEP, "{}", buf.capacity());
        // Growing with what arrives, never more than about twice of it.
        let chunk = vec![7u8; 100_000];
        for _ in 0..20 {
            buf.put_slice(&chunk);
            assert_eq!(decode_frame(&mut buf, DEFAULT_MAX_FRAME), Ok(None));
            assert!(buf.capacity() <= 4 * buf.len() + 2 * GROW_STEP);
        }
        // A frame that arrives whole is still taken in one piece.
        let mut buf = BytesMut::new();
        encode_frame(&vec![1u8; 3_000_000], &mut buf);
        assert_eq!(
            decode_frame(&mut buf, DEFAULT_MAX_FRAME)
                .unwrap()
                .unwrap()
                .len(),
            3_000_000
        );
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
