//! The ZEO 5 protocol, sans I/O.
pub mod value;
pub use value::Value;
