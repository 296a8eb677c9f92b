//! Replication with zc.zrs's protocol.
//!
//! A primary feeds replicas from its Data.fs; a replica keeps a Data.fs whose
//! transactions are the primary's (same tids, same records, blobs too), applying each
//! durably before its own clients can see it, and serves ZEO clients like any FileStorage
//! server. zc.zrs primaries and secondaries interoperate with zeors ones; between zeors
//! peers the stream can be compressed and histories are checked for divergence.
//!
//! - [`codec`]: the wire protocol, sans I/O.

pub mod codec;
