//! Packing through the proxy, and keeping the cache true to a packed upstream.
//!
//! `pack(t)` is forwarded upstream as `pack(t, wait=True)` (what `zeopack`, `db.pack()`
//! and Zope's Pack button send: the time is `now - days`, garbage collection is upstream's
//! configuration). What a pack removes that the proxy may hold:
//! - revisions that were no longer current at the pack time (history): a cached
//!   non-current revision, `loadBefore` of an old snapshot, `loadSerial`;
//! - objects not reachable from the root at the pack time, every revision of them up to
//!   it, including their current one: a cached *current* revision of a garbage-collected
//!   object would be served as if the object existed, and no invalidation ever says
//!   otherwise (a pack commits no transaction);
//! - the blob files of all those revisions.
//!
//! Revisions written after the pack time are never removed.
//!
//! So after a pack at time `t` the cache is told the floor `t` ([`Cache::packed`]):
//! cached history that starts by then is dropped, and cached current revisions that
//! start by then become *suspect*: a load that finds one asks upstream for the object's
//! current serial (`getTid`, a few bytes) before serving it, then keeps it (still there)
//! or drops it (gone: the load goes upstream and gets upstream's `POSKeyError`). Blob
//! files of revisions older than the floor are served only once upstream confirms the
//! revision (`loadSerial`). The cost of a pack is one small round trip per cached object
//! on its first use afterwards, not a cold cache.
//!
//! A pack run on upstream by someone else (a `zeopack` aimed at upstream) is seen the same
//! way: upstream tells every connected client the storage's new size after a pack (the
//! `info` callback), and otherwise sends `info` only to a committer, just before its
//! `tpc_finish` reply (the stock server and zeors alike). The proxy counts the `info`
//! callbacks its own finishes and packs will bring (a call that fails brings none; the
//! count restarts with each connection); one more than that is a pack whose time it does
//! not know: the floor is then everything the proxy has applied. Callbacks and reply
//! hooks run in the order upstream sent them, so the count is exact.
//!
//! Ordering: an answer to a load sent before the pack finished may describe an object the
//! pack then removed. Stores into the cache carry the pack epoch of the moment their
//! request was sent and are dropped if a pack completed since ([`PackState::epoch`]); the
//! cache is told of the pack through the same queue the stores go through, so a store
//! that gets in before it is marked suspect with the rest.

use super::Inner;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tracing::info;
use zeo_proto::Request;
use zodb::{Oid, StorageError, Tid};

/// Margin added to a pack time converted to a tid: the pack's own conversion of the
/// time may round differently; a larger floor only costs verifications.
const FLOOR_MARGIN_SECONDS: f64 = 1.0;

/// Pack bookkeeping of the proxy.
#[derive(Default)]
pub(super) struct PackState {
    /// Packs completed since start: a store whose request went out under another epoch
    /// may describe a state a pack has since removed, and is not cached.
    epoch: Arc<AtomicU64>,
    /// `info` callbacks that calls of ours (`tpc_finish`, `pack`) will bring.
    awaiting_info: AtomicUsize,
}

impl PackState {
    /// A call whose success brings an `info` callback is about to be sent.
    pub fn expect_info(&self) {
        self.awaiting_info.fetch_add(1, Ordering::AcqRel);
    }

    /// That call failed: its `info` callback will not come.
    pub fn no_info_coming(&self) {
        self.take_info();
    }

    /// A new connection: nothing is awaited on it.
    pub fn reset_infos(&self) {
        self.awaiting_info.store(0, Ordering::Release);
    }

    /// Counts an `info` callback against those awaited; false if none was.
    fn take_info(&self) -> bool {
        self.awaiting_info
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// The epoch to tag a store with, read before its request is sent.
    pub fn epoch(&self) -> StoreEpoch {
        StoreEpoch {
            at: self.epoch.load(Ordering::Acquire),
            now: self.epoch.clone(),
        }
    }
}

/// The pack epoch a store's request went out under.
pub(super) struct StoreEpoch {
    at: u64,
    now: Arc<AtomicU64>,
}

impl StoreEpoch {
    /// No pack completed since the request was sent: its answer may be cached.
    pub fn still_valid(&self) -> bool {
        self.now.load(Ordering::Acquire) == self.at
    }
}

/// The floor of a pack at POSIX time `pack_time`, given the last tid the proxy applied:
/// revisions starting after it survive the pack.
pub(super) fn pack_floor(pack_time: f64, last: Tid) -> Tid {
    let t = zodb::timestamp::tid_from_unix(pack_time + FLOOR_MARGIN_SECONDS);
    t.min(last)
}

impl Inner {
    /// `pack(t)` through the proxy: upstream packs, then the cache learns what may be gone.
    pub(super) async fn pack(self: &Arc<Self>, pack_time: f64) -> zodb::Result<()> {
        let conn = self.link().await?;
        let weak = Arc::downgrade(self);
        let hook: zeo_client::ReplyHook = Box::new(move |result| {
            if let (Some(inner), Err(_)) = (weak.upgrade(), result) {
                inner.packs.no_info_coming();
            }
        });
        // Upstream tells every client the new size just before this reply.
        self.packs.expect_info();
        conn.call_with_hook(
            &Request::Pack {
                time: pack_time,
                wait: true,
            },
            hook,
        )
        .await?;
        self.packed(pack_floor(pack_time, self.last_tid())).await;
        Ok(())
    }

    /// Upstream was packed with floor `floor`: the stores in flight are void, and the
    /// cache marks what may be gone.
    pub(super) async fn packed(self: &Arc<Self>, floor: Tid) {
        info!(%floor, "upstream packed; cached revisions up to the floor are checked before use");
        self.packs.epoch.fetch_add(1, Ordering::AcqRel);
        self.stores
            .run_in_order(move |cache| cache.packed(floor))
            .await;
    }

    /// An `info` callback from upstream (see the module docs).
    pub(super) fn size_info_received(self: &Arc<Self>) {
        if self.packs.take_info() {
            return;
        }
        let inner = self.clone();
        let floor = self.last_tid();
        tokio::spawn(async move { inner.packed(floor).await });
    }

    /// Settles a suspect cached revision with upstream: `Ok(true)` if it is still
    /// current there (now served again), `Ok(false)` if not (dropped).
    pub(super) async fn verify_suspect(&self, oid: Oid, start: Tid) -> zodb::Result<bool> {
        let conn = self.link().await?;
        let current = match conn.request::<Tid>(&Request::GetTid { oid }).await {
            Ok(tid) => Some(tid),
            Err(zeo_client::ClientError::Remote(e)) => match e.to_storage_error() {
                StorageError::PosKey(_) => None,
                other => return Err(other),
            },
            Err(e) => return Err(e.into()),
        };
        let cache = self.cache.clone();
        let keep = current == Some(start);
        tokio::task::spawn_blocking(move || {
            if keep {
                cache.confirm(oid, start)
            } else {
                cache.forget(oid, start)
            }
        })
        .await
        .map_err(|e| StorageError::Io(std::io::Error::other(e)))?;
        Ok(keep)
    }

    /// Whether upstream still has revision `serial` of `oid` after a pack, for blob files
    /// cached before it: the object cache vouches for it, or upstream does.
    pub(super) async fn revision_exists(&self, oid: Oid, serial: Tid) -> zodb::Result<bool> {
        if serial > self.cache.pack_floor() || self.cache.load_serial(oid, serial).is_some() {
            return Ok(true);
        }
        let conn = self.link().await?;
        match conn.load_serial(oid, serial).await {
            Ok(_) => Ok(true),
            Err(zeo_client::ClientError::Remote(e)) => match e.to_storage_error() {
                StorageError::PosKey(_) => Ok(false),
                other => Err(other),
            },
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_pack_time_with_a_margin_but_never_past_what_was_applied() {
        let t = 1_700_000_000.0;
        let at = zodb::timestamp::tid_from_unix(t);
        let floor = pack_floor(t, Tid::MAX);
        assert!(floor > at);
        assert!(floor <= zodb::timestamp::tid_from_unix(t + 2.0));
        assert_eq!(pack_floor(t, Tid(5)), Tid(5));
    }

    #[test]
    fn info_callbacks_beyond_those_awaited_are_packs() {
        let state = PackState::default();
        assert!(!state.take_info());
        state.expect_info();
        state.expect_info();
        state.no_info_coming();
        assert!(state.take_info());
        assert!(!state.take_info());
        state.no_info_coming(); // never below zero
        state.expect_info();
        state.reset_infos();
        assert!(!state.take_info());
    }

    #[test]
    fn a_store_is_void_once_a_pack_completed() {
        let state = PackState::default();
        let before = state.epoch();
        assert!(before.still_valid());
        state.epoch.fetch_add(1, Ordering::AcqRel);
        assert!(!before.still_valid());
        assert!(state.epoch().still_valid());
    }
}
