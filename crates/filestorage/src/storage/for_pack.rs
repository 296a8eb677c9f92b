//! What pack may do to the storage, and nothing more: the narrow API between
//! [`crate::pack`] and the core.
//!
//! Pack reads committed data through [`FileView`]s like every reader. Beyond that it
//! needs to: run alone and keep undo away while it runs ([`FileStorageCore::start_packing`]);
//! learn where committed data ends ([`FileStorageCore::committed_end`]); hold commits back
//! for its last copy round and the swap, once no transaction is voted and unfinished
//! ([`FileStorageCore::pause_commits`]), or just keep finish away while it removes a blob
//! directory ([`FileStorageCore::hold_commits`]); and install the packed file
//! ([`CommitPause::install`]). Invariants kept here: the packing flag and `swap_pending`
//! are cleared and waiting votes woken on every way out; the file handle, index and ends
//! are replaced together, under the commit mutex, so no reader sees a mixture.

use super::*;
use parking_lot::MutexGuard;
use std::time::{Duration, Instant};

/// How long pack waits for a gap between commits before it holds new votes back.
const GAP_WAIT: Duration = Duration::from_secs(2);

/// A pack in progress (one at a time; undo is refused meanwhile). Dropping it ends the
/// pack: commits held back resume.
pub(crate) struct Packing<'a> {
    core: &'a FileStorageCore,
}

impl Drop for Packing<'_> {
    fn drop(&mut self) {
        self.core.commit.lock().swap_pending = false;
        self.core.commit_cv.notify_all();
        self.core.packing.store(false, Ordering::Release);
    }
}

/// The commit mutex held by pack. Dropping it lets commits go on.
pub(crate) struct CommitPause<'a> {
    core: &'a FileStorageCore,
    c: MutexGuard<'a, CommitState>,
}

impl CommitPause<'_> {
    /// The end of the committed data: where the next transaction will go.
    pub(crate) fn end(&self) -> u64 {
        self.c.append_pos
    }

    /// Whether `oid` is in the index.
    pub(crate) fn has_object(&self, oid: Oid) -> bool {
        self.core.live.read().index.get(oid).is_some()
    }

    /// Replaces the file by the packed one: its handle, its index and its end, in one step.
    /// Readers holding views of the old file keep reading it.
    pub(crate) fn install(mut self, io: Arc<dyn FileIo>, index: Index, end: u64) {
        let mut live = self.core.live.write();
        let tid = live.snap_tid;
        *live = Live {
            io,
            index,
            data_end: end,
            snap_end: end,
            snap_tid: tid,
        };
        drop(live);
        self.c.append_pos = end;
    }
}

impl Drop for CommitPause<'_> {
    fn drop(&mut self) {
        self.c.swap_pending = false;
        self.core.commit_cv.notify_all();
    }
}

impl FileStorageCore {
    /// Marks a pack as running; `None` when one already runs. From now on undo is refused
    /// (see [`commit::Policy::undo_disabled`]).
    pub(crate) fn start_packing(&self) -> Option<Packing<'_>> {
        self.packing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Packing { core: self })
    }

    /// The end of the committed data now.
    pub(crate) fn committed_end(&self) -> u64 {
        self.commit.lock().append_pos
    }

    /// The commit mutex at a moment when no transaction is voted and unfinished (so none
    /// can be voted until the pause ends).
    ///
    /// It first waits for a natural gap between commits, without delaying anyone; under a
    /// steady stream of commits it then holds new votes back and waits for the voted
    /// transaction to finish (as long as its client takes, like Python's commit lock; the
    /// server's transaction timeout bounds that).
    pub(crate) fn pause_commits(&self) -> CommitPause<'_> {
        let mut c = self.commit.lock();
        let deadline = Instant::now() + GAP_WAIT;
        while c.staged.is_some() {
            let now = Instant::now();
            if now >= deadline {
                c.swap_pending = true;
                self.commit_cv.wait(&mut c);
            } else {
                self.commit_cv.wait_for(&mut c, deadline - now);
            }
        }
        CommitPause { core: self, c }
    }

    /// The commit mutex as it is (a voted transaction may be waiting for its finish): no
    /// finish places blob files meanwhile.
    pub(crate) fn hold_commits(&self) -> CommitPause<'_> {
        CommitPause {
            core: self,
            c: self.commit.lock(),
        }
    }

    /// Whether pack keeps `Data.fs.old` and `<blob dir>.old` (Python's `pack_keep_old`).
    pub(crate) fn keeps_old(&self) -> bool {
        !self.pack_discard_old
    }
}
