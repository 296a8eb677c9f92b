//! Where warming the cache from upstream stands (the proxy's `--warm`, see
//! `upstream::warm`), kept in the index's meta table next to `last_tid` so that a restart
//! resumes the warm-up instead of starting it over.
//!
//! The position is only advanced after the records below it were stored, by the same store
//! thread, so a persisted position never claims records the cache does not hold (a crash
//! loses at most what the next flush would have made durable, and those are fetched
//! again). `drop_current` resets it: the warmed entries are then retired as a generation.

use super::*;

/// How far the warm-up got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmPosition {
    /// Every object below this oid has been fetched (`Oid(0)`: nothing yet).
    From(Oid),
    /// Every object upstream held has been fetched.
    Done,
}

/// `META_WARM`'s value for [`WarmPosition::Done`].
const DONE: u64 = u64::MAX;

impl Cache {
    /// The warm-up's position as last recorded.
    pub fn warm_position(&self) -> WarmPosition {
        let read = || -> Result<Option<u64>, CacheError> {
            let txn = self.db.begin_read()?;
            let meta = match txn.open_table(index::META) {
                Ok(m) => m,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            Ok(meta.get(index::META_WARM)?.map(|g| g.value()))
        };
        match read() {
            Ok(Some(DONE)) => WarmPosition::Done,
            Ok(Some(oid)) => WarmPosition::From(Oid(oid)),
            Ok(None) => WarmPosition::From(Oid(0)),
            Err(e) => {
                warn!(error = %e, "reading the warm-up position failed; starting from the first oid");
                WarmPosition::From(Oid(0))
            }
        }
    }

    /// Records the warm-up's position (made durable by the next flush).
    pub fn set_warm_position(&self, position: WarmPosition) {
        if self.is_poisoned() {
            return;
        }
        let value = match position {
            WarmPosition::From(oid) => oid.0.min(DONE - 1),
            WarmPosition::Done => DONE,
        };
        let _w = self.writer.lock();
        let result = self.write_txn(|txn| {
            txn.open_table(index::META)?
                .insert(index::META_WARM, value)?;
            Ok(())
        });
        if let Err(e) = result {
            warn!(error = %e, "recording the warm-up position failed");
        }
    }
}
