//! What upstream tells the cache: invalidations (with the durable log of them that answers
//! `getInvalidations`), a history it could not list, packs, and confirmations of suspect entries.

use super::*;

impl Cache {
    /// Applies an upstream transaction, in tid order (`tid > last_tid`, else ignored with a
    /// warning): each oid's current entry with `start < tid` becomes non-current
    /// `[start, tid)`; entries with `start >= tid` stay. Appends `(tid, oids)` to the
    /// invalidation log and sets `last_tid = tid`, all in one transaction (not durable
    /// until the next flush). No `fsync`.
    pub fn invalidate(&self, tid: Tid, oids: &[Oid]) {
        self.apply_changes(tid, oids, Changes::Transaction);
    }

    /// Catch-up when only the set of oids changed in `(last_tid, tid]` is known (e.g. from
    /// `getInvalidations`): current entries of these oids that may be stale are ended at
    /// `last_tid + 1` (the last point they are known valid) or dropped; those starting at or
    /// after `tid` stay. Logs `(tid, oids)` and sets `last_tid = tid`. No `fsync`.
    ///
    /// (Ending them at `tid`, as the first sketch of this API said, would be wrong: the
    /// revision may have been replaced anywhere in `(last_tid, tid]`.)
    pub fn invalidate_many(&self, tid: Tid, oids: &[Oid]) {
        self.apply_changes(tid, oids, Changes::Summary);
    }

    pub(super) fn apply_changes(&self, tid: Tid, oids: &[Oid], changes: Changes) {
        if self.is_poisoned() {
            return;
        }
        let mut w = self.writer.lock();
        let last = w.last_tid;
        if tid <= last {
            warn!(%tid, last_tid = %last, "ignoring an invalidation not after the cache's last tid");
            return;
        }
        let epochs = self.epochs.read().clone();
        let result = self.write_txn(|txn| {
            let mut t = EntryTables::open(txn)?;
            for &oid in oids {
                let Some(c) = t.current(oid)? else { continue };
                let end = match epochs.standing(c.generation, c.start) {
                    Standing::Current if c.start >= tid => continue, // reflects the change
                    Standing::Current => match changes {
                        Changes::Transaction => Some(tid),
                        // Changed somewhere in (last, tid]. An entry with start <= last
                        // was current at `last`: valid up to last + 1. One with
                        // last < start < tid may be stale: the empty interval drops it.
                        Changes::Summary => Some(after(last)),
                    },
                    // Perhaps packed away: not worth keeping as history.
                    Standing::Suspect => None,
                    Standing::Ended(end) => Some(end),
                };
                t.retire_current(oid, c, end)?;
            }
            let entries = t.len()?;
            drop(t);
            self.log_append(txn, tid, oids)?;
            txn.open_table(index::META)?
                .insert(index::META_LAST_TID, tid.0)?;
            Ok(entries)
        });
        match result {
            Ok(entries) => {
                self.counters.entries.store(entries, Ordering::Relaxed);
                if last == Tid::ZERO {
                    w.recent.reset(tid); // the first position: the window starts here
                }
                w.recent.record(tid, oids);
                w.last_tid = tid;
                self.last_tid.store(tid.0, Ordering::Release);
            }
            Err(e) => self.poison("apply an invalidation", &e),
        }
    }

    pub(super) fn log_append(
        &self,
        txn: &WriteTransaction,
        tid: Tid,
        oids: &[Oid],
    ) -> Result<(), CacheError> {
        if self.log_size == 0 {
            return Ok(());
        }
        let mut log = txn.open_table(index::INVALIDATIONS)?;
        log.insert(tid.0, index::pack_oids(oids).as_slice())?;
        while log.len()? > self.log_size as u64 {
            log.pop_first()?;
        }
        Ok(())
    }

    /// Forgets which entries are current (upstream could not tell what changed) and sets
    /// `last_tid = tid`. O(1): the current entries are not touched but retired as a
    /// generation; they stay usable as non-current `[start, old last_tid + 1)` for older
    /// snapshots and for `load_serial`. The invalidation log restarts at `tid` (nothing
    /// before it can be answered any more). No `fsync`.
    pub fn drop_current(&self, tid: Tid) {
        if self.is_poisoned() {
            return;
        }
        let mut w = self.writer.lock();
        let last = w.last_tid;
        if tid < last {
            warn!(%tid, last_tid = %last, "ignoring drop_current before the cache's last tid");
            return;
        }
        let old = self.epochs.read().current;
        let Some(new) = old.checked_add(1) else {
            self.poison(
                "drop current entries",
                &CacheError::Corrupt("generations exhausted".into()),
            );
            return;
        };
        let end = after(last);
        // Generations made suspect by a pack are current too, until now.
        let suspect: Vec<u32> = {
            let epochs = self.epochs.read();
            epochs
                .floors
                .keys()
                .copied()
                .filter(|g| !epochs.ends.contains_key(g))
                .collect()
        };
        let result = self.write_txn(|txn| {
            let mut ends = txn.open_table(index::EPOCHS)?;
            ends.insert(old, end.0)?;
            for &g in &suspect {
                ends.insert(g, end.0)?;
            }
            drop(ends);
            let mut meta = txn.open_table(index::META)?;
            meta.insert(index::META_GENERATION, u64::from(new))?;
            meta.insert(index::META_LAST_TID, tid.0)?;
            // What the warm-up fetched is retired with the generation.
            meta.remove(index::META_WARM)?;
            drop(meta);
            txn.delete_table(index::INVALIDATIONS)?;
            // The oldest entry bounds what the log can answer: nothing before `tid`.
            self.log_append(txn, tid, &[])?;
            Ok(())
        });
        match result {
            Ok(()) => {
                // Readers look at the epochs after taking their snapshot, and new-generation
                // entries are only written after this, so no reader ever takes an entry of
                // the new generation for one of the old or the other way round.
                let mut epochs = self.epochs.write();
                epochs.ends.insert(old, end);
                for g in suspect {
                    epochs.ends.insert(g, end);
                }
                epochs.current = new;
                drop(epochs);
                w.recent.reset(tid);
                w.last_tid = tid;
                self.last_tid.store(tid.0, Ordering::Release);
            }
            Err(e) => self.poison("drop current entries", &e),
        }
    }

    /// Upstream was packed: any revision that started at or before `floor` may be gone
    /// (see [`index::Epochs`]). Non-current entries starting by then are deleted (they
    /// are unreadable at once, before the deletion finishes, and a purge cut short by a
    /// crash is finished at the next open); current entries become suspect: loads miss
    /// them, [`Cache::load_suspect`] offers them for verification. O(non-current entries);
    /// current entries are not touched. No `fsync`.
    pub fn packed(&self, floor: Tid) {
        if self.is_poisoned() || floor == Tid::ZERO {
            return;
        }
        let mut w = self.writer.lock();
        let (old, floors) = {
            let epochs = self.epochs.read();
            let mut floors = epochs.floors.clone();
            for g in epochs
                .ends
                .keys()
                .copied()
                .chain(std::iter::once(epochs.current))
            {
                let f = floors.entry(g).or_insert(floor);
                *f = (*f).max(floor);
            }
            for f in floors.values_mut() {
                *f = (*f).max(floor);
            }
            (epochs.current, floors)
        };
        let Some(new) = old.checked_add(1) else {
            self.poison(
                "mark entries a pack may have removed",
                &CacheError::Corrupt("generations exhausted".into()),
            );
            return;
        };
        let purge = floor.max(Tid(self.purge_floor.load(Ordering::Acquire)));
        let result = self.write_txn(|txn| {
            let mut t = txn.open_table(index::PACK_FLOORS)?;
            for (&g, &f) in &floors {
                t.insert(g, f.0)?;
            }
            drop(t);
            let mut meta = txn.open_table(index::META)?;
            meta.insert(index::META_GENERATION, u64::from(new))?;
            meta.insert(index::META_PURGE_FLOOR, purge.0)?;
            Ok(())
        });
        match result {
            Ok(()) => {
                // As in `drop_current`: new-generation entries are written only after this.
                self.purge_floor.store(purge.0, Ordering::Release);
                let mut epochs = self.epochs.write();
                epochs.floors = floors;
                epochs.current = new;
            }
            Err(e) => return self.poison("mark entries a pack may have removed", &e),
        }
        if let Err(e) = self.purge_noncurrent(&mut w, purge) {
            self.poison("drop entries a pack removed", &e);
        }
    }

    /// Deletes the non-current entries starting at or before `floor`, a batch per write
    /// transaction, then clears the pending purge.
    pub(super) fn purge_noncurrent(&self, _w: &mut Writer, floor: Tid) -> Result<(), CacheError> {
        let mut from = (0u64, 0u64);
        loop {
            let (batch, entries) = self.write_txn(|txn| {
                let mut t = EntryTables::open(txn)?;
                let rows: Vec<(u64, u64, Loc)> = t
                    .noncurrent
                    .range(from..)?
                    .filter_map(Result::ok)
                    .map(|(k, v)| {
                        let (oid, start) = k.value();
                        let (_, seg, off, len) = v.value();
                        (oid, start, Loc { seg, off, len })
                    })
                    .filter(|(_, start, _)| *start <= floor.0)
                    .take(EVICT_BATCH)
                    .collect();
                for (oid, start, loc) in &rows {
                    t.remove_at(Oid(*oid), Tid(*start), *loc)?;
                }
                Ok((rows, t.len()?))
            })?;
            self.counters.entries.store(entries, Ordering::Relaxed);
            match batch.last() {
                Some(&(oid, start, _)) if batch.len() == EVICT_BATCH => {
                    from = (oid, start.saturating_add(1));
                }
                _ => break,
            }
        }
        self.write_txn(|txn| {
            txn.open_table(index::META)?
                .insert(index::META_PURGE_FLOOR, 0)?;
            Ok(())
        })?;
        self.purge_floor.store(0, Ordering::Release);
        Ok(())
    }

    /// The greatest pack floor the cache has been told of ([`Cache::packed`]).
    pub fn pack_floor(&self) -> Tid {
        self.epochs.read().max_floor()
    }

    /// Upstream confirmed that the suspect current revision `(oid, start)` still exists
    /// and is current: it is served again.
    pub fn confirm(&self, oid: Oid, start: Tid) {
        self.settle_suspect(oid, start, true);
    }

    /// Upstream no longer has the suspect revision `(oid, start)` as current: dropped.
    pub fn forget(&self, oid: Oid, start: Tid) {
        self.settle_suspect(oid, start, false);
    }

    pub(super) fn settle_suspect(&self, oid: Oid, start: Tid, keep: bool) {
        if self.is_poisoned() {
            return;
        }
        let _w = self.writer.lock();
        let epochs = self.epochs.read().clone();
        let result = self.write_txn(|txn| {
            let mut t = EntryTables::open(txn)?;
            if let Some(c) = t.current(oid)?.filter(|c| {
                c.start == start && epochs.standing(c.generation, c.start) == Standing::Suspect
            }) {
                if keep {
                    t.put_current(
                        oid,
                        CurrentEntry {
                            generation: epochs.current,
                            ..c
                        },
                    )?;
                } else {
                    t.retire_current(oid, c, None)?;
                }
            }
            Ok(t.len()?)
        });
        match result {
            Ok(entries) => self.counters.entries.store(entries, Ordering::Relaxed),
            Err(e) => warn!(error = %e, %oid, "updating a cache entry after a pack failed"),
        }
    }

    /// For downstream `getInvalidations` across restarts: every oid changed after `tid`,
    /// with the latest tid, if the log reaches back that far; `None` otherwise.
    /// `Some((last_tid, []))` if `tid >= last_tid`.
    pub fn invalidations_since(&self, tid: Tid) -> Option<(Tid, Vec<Oid>)> {
        if self.is_poisoned() {
            return None;
        }
        self.read_invalidations_since(tid).unwrap_or_else(|e| {
            warn!(error = %e, "reading the invalidation log failed");
            None
        })
    }

    pub(super) fn read_invalidations_since(
        &self,
        tid: Tid,
    ) -> Result<Option<(Tid, Vec<Oid>)>, CacheError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(index::META)?;
        let last = Tid(meta.get(index::META_LAST_TID)?.map_or(0, |g| g.value()));
        if tid >= last {
            return Ok(Some((last, Vec::new())));
        }
        let log = txn.open_table(index::INVALIDATIONS)?;
        // The log describes every change after its oldest entry, no earlier ones (that
        // entry may summarise changes since a tid the log no longer knows).
        match log.first()? {
            Some((oldest, _)) if oldest.value() <= tid.0 => {}
            _ => return Ok(None),
        }
        let mut oids = Vec::new();
        for item in log.range(tid.0 + 1..)? {
            let (_, packed) = item?;
            oids.extend(index::unpack_oids(packed.value()));
        }
        oids.sort_unstable();
        oids.dedup();
        Ok(Some((last, oids)))
    }

    /// The newest `n` log entries, oldest first (to seed the server's in-memory queue).
    pub fn recent_transactions(&self, n: usize) -> Vec<(Tid, Vec<Oid>)> {
        if self.is_poisoned() {
            return Vec::new();
        }
        self.read_recent_transactions(n).unwrap_or_else(|e| {
            warn!(error = %e, "reading the invalidation log failed");
            Vec::new()
        })
    }

    pub(super) fn read_recent_transactions(
        &self,
        n: usize,
    ) -> Result<Vec<(Tid, Vec<Oid>)>, CacheError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(index::INVALIDATIONS)?;
        let mut out = Vec::new();
        for item in log.range::<u64>(..)?.rev().take(n) {
            let (tid, packed) = item?;
            out.push((
                Tid(tid.value()),
                index::unpack_oids(packed.value()).collect(),
            ));
        }
        out.reverse();
        Ok(out)
    }
}
