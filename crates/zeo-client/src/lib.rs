//! An async ZEO 5 client on tokio.
//!
//! [`Connection`] is one registered connection to a ZEO server (stock Python or zeors):
//! it pipelines calls (any number in flight, matched by msgid), sends one-way calls, and
//! hands server callbacks to a [`Callbacks`] implementation **in arrival order**, awaiting
//! each before reading further. That ordering is what a caching client relies on: a reply
//! carries the tid of the last invalidation processed before it ([`RawReply::seen`]), so the
//! caller knows exactly which transactions its data already reflects.
//!
//! Used by the proxy storage (upstream link), the benchmark load generator and tests.

mod connection;

pub use connection::{
    connect_any, Address, Backoff, Callbacks, ClientError, ConnectOptions, Connection, NoCallbacks,
    RawReply, RemoteError, ReplyHook, Traffic,
};
