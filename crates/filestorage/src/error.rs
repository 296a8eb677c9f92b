//! The crate's internal error type. Public entry points convert it to
//! [`zodb::StorageError`], which is what the server understands.

use std::io;
use zodb::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] io::Error),

    /// The file contradicts the format at `pos`. Never produced by a torn tail at open
    /// (that is recovered), only by damage that cannot be explained by an interrupted write.
    #[error("damaged Data.fs at offset {pos}: {what}")]
    Corrupted { pos: u64, what: String },

    /// Not a FileStorage at all (bad magic, too short).
    #[error("not a FileStorage file: {0}")]
    Format(String),

    /// Another process (Python ZODB or zeors) holds the lock file.
    #[error("{0}")]
    Locked(String),

    /// A caller error (bad option combination, oversized transaction metadata, …).
    #[error("{0}")]
    Value(String),
}

impl Error {
    pub(crate) fn corrupted(pos: u64, what: impl Into<String>) -> Self {
        Error::Corrupted {
            pos,
            what: what.into(),
        }
    }

    /// The error as the storage named `name` reports it: damage names the storage.
    pub(crate) fn in_storage(self, name: &str) -> StorageError {
        match self {
            Error::Io(e) => StorageError::Io(e),
            e @ (Error::Corrupted { .. } | Error::Format(_)) => {
                StorageError::Corrupted(format!("{name}: {e}"))
            }
            other => other.into(),
        }
    }
}

impl From<Error> for StorageError {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => StorageError::Io(e),
            e @ (Error::Corrupted { .. } | Error::Format(_)) => {
                StorageError::Corrupted(e.to_string())
            }
            Error::Locked(msg) => StorageError::Io(io::Error::new(io::ErrorKind::WouldBlock, msg)),
            Error::Value(msg) => StorageError::Value(msg),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
