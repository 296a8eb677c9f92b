//! Proxy mode: a [`zodb::Storage`] whose data lives on an upstream ZEO server.
//!
//! Loads are answered from a persistent, size-bounded cache ([`cache`]) or fetched
//! upstream; commits are forwarded; upstream invalidations update the cache and fan out
//! to downstream clients through the server's hub. The cache survives restarts and is
//! caught up from upstream rather than dropped ([`upstream`]).

pub mod blobcache;
pub mod blobs;
pub mod cache;
mod store_queue;
pub mod upstream;

pub use upstream::{LinkState, ProxyConfig, UpstreamStorage};
