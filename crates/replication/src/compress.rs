//! zstd for the stream between zeors peers (negotiated in the hellos; stock peers never
//! see it). The primary compresses the bytes of the sized messages as one zstd stream,
//! flushing whenever its queue runs empty, so that the replica can decode everything
//! sent so far without waiting for more; the replica decompresses a step at a time and
//! frames as usual. The same stream as between a zeors proxy and its zeors upstream.

pub use zeo_proto::compress::{Compressor, Decompressor, ZSTD};
