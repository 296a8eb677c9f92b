//! The one async frame reader, for the server's and the client's handshakes (feature
//! `io`). Everything else in this crate stays free of I/O: this is the thin loop that
//! feeds [`crate::frame::decode_frame`] from a socket.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads until one complete frame of at most `max` bytes is in `buf` and returns it;
/// `Ok(None)` when the peer closed the connection first. Bytes after the frame stay in
/// `buf` (a peer may pipeline its next messages behind the handshake).
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<Option<Bytes>> {
    loop {
        match crate::frame::decode_frame(buf, max) {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}
