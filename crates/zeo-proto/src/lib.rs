//! The ZEO 5 protocol, sans I/O.
//!
//! Bytes in, typed messages out, and back: length-prefixed frames ([`frame`]), the
//! handshake and the `(msgid, flag, name, args)` tuple ([`message`]), both marshallings
//! ([`pickle`], [`msgpack`]) over one [`Value`] type, typed client requests
//! ([`request`]), typed replies and callbacks ([`reply`]), both with encode *and* decode,
//! and the mapping of storage errors to the exception classes the Python
//! client expects ([`exception`]), and zstd between zeors peers ([`compress`]). No
//! sockets and no tokio, so the server, the client and the tests all drive the same code.

// Everything here turns lengths and integers into wire bytes and back: an `as` cast that
// silently truncates, wraps or drops a sign corrupts a message (or reads one wrongly)
// instead of failing. So casts that can lose information are refused in this crate (the
// workspace's `[lints]` cannot add lints per crate); conversions use `try_from` with an
// error, or a helper or a narrow `allow` that says why the value always fits. The
// integration tests under `tests/` repeat these lines.
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(clippy::cast_lossless)]

pub mod compress;
pub mod exception;
pub mod frame;
#[cfg(feature = "io")]
pub mod io;
mod limits;
pub mod message;
pub mod msgpack;
pub mod pickle;
pub mod reply;
pub mod request;
pub mod value;

pub use limits::{DecodeError, Limits};
pub use message::{Encoding, Message};
pub use reply::{Callback, Reply};
pub use request::Request;
pub use value::Value;

/// Pickles a transaction extension dict for storage in a transaction record. An empty
/// dict is stored as zero bytes, as Python ZODB does.
pub fn extension_to_bytes(ext: &Value) -> Vec<u8> {
    match ext {
        Value::Dict(items) if !items.is_empty() => pickle::to_vec(ext),
        _ => Vec::new(),
    }
}

/// Reads a stored extension back as a dict's items; an unreadable one is empty.
pub fn extension_from_bytes(bytes: &[u8]) -> Vec<(Value, Value)> {
    if bytes.is_empty() {
        return Vec::new();
    }
    match pickle::decode(bytes, &Limits::default()) {
        Ok(Value::Dict(items)) => items,
        _ => Vec::new(),
    }
}
