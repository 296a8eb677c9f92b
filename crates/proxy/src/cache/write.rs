//! Writing: appending records to segments, rolling to a new segment, evicting the oldest to
//! stay within the bound, and making it all durable together with the index.

use super::*;

impl Cache {
    /// Runs `f` in a write transaction committed without durability.
    pub(super) fn write_txn<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, CacheError>,
    ) -> Result<T, CacheError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        let out = f(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    /// Syncs the segments this commit may reference, then commits durably.
    pub(super) fn commit_durable(
        &self,
        w: &mut Writer,
        mut txn: WriteTransaction,
    ) -> Result<(), CacheError> {
        for file in self.unsynced_files(w) {
            file.sync_data()?;
        }
        w.unsynced.clear();
        if w.dir_unsynced {
            self.fs.sync_dir(&self.segments_dir)?;
            w.dir_unsynced = false;
        }
        txn.set_durability(Durability::Immediate)?;
        txn.set_quick_repair(true);
        txn.commit()?;
        Ok(())
    }

    pub(super) fn unsynced_files(&self, w: &Writer) -> Vec<Arc<dyn FileIo>> {
        let files = self.files.read();
        w.unsynced
            .iter()
            .filter_map(|seg| files.get(seg).cloned())
            .collect()
    }

    /// Syncs the segments written so far *without* holding the writer lock, so that the
    /// durable commit that follows (under the lock) only has to sync what was appended in
    /// the meantime: writers wait for that little, not for the whole dirty data. `unsynced`
    /// is left alone: `commit_durable` syncs all of it again, cheaply where nothing is dirty.
    pub(super) fn presync(&self, w: &mut MutexGuard<'_, Writer>) -> Result<(), CacheError> {
        let files = self.unsynced_files(w);
        if files.is_empty() {
            return Ok(());
        }
        MutexGuard::unlocked(w, || files.iter().try_for_each(|f| f.sync_data()))?;
        Ok(())
    }

    /// Appends a record to the active segment (starting a new one if it is full).
    pub(super) fn append(
        &self,
        w: &mut Writer,
        oid: Oid,
        start: Tid,
        data: &[u8],
    ) -> Result<Loc, CacheError> {
        let record = segment::encode_record(oid, start, data);
        let len = record.len() as u64;
        if w.active
            .as_ref()
            .is_none_or(|a| a.len + len > self.segment_size)
        {
            self.roll(w)?;
        }
        let Some(a) = w.active.as_mut() else {
            return Err(CacheError::Corrupt("no active segment".into()));
        };
        a.file.write_all_at(&record, a.len)?;
        let loc = Loc {
            seg: a.seg,
            off: a.len as u32,
            len: data.len() as u32,
        };
        a.len += len;
        let seg = a.seg;
        *w.sizes.entry(seg).or_default() += len;
        w.total_bytes += len;
        w.unsynced.insert(seg);
        self.counters.bytes.store(w.total_bytes, Ordering::Relaxed);
        Ok(loc)
    }

    pub(super) fn roll(&self, w: &mut Writer) -> Result<(), CacheError> {
        let seg = w.next_seg;
        w.next_seg += 1;
        let file = segment::create_segment(&*self.fs, &self.segments_dir, seg)?;
        self.files.write().insert(seg, file.clone());
        w.sizes.insert(seg, SEGMENT_HEADER_LEN);
        w.total_bytes += SEGMENT_HEADER_LEN;
        w.unsynced.insert(seg);
        w.dir_unsynced = true;
        w.active = Some(Active {
            seg,
            file,
            len: SEGMENT_HEADER_LEN,
        });
        Ok(())
    }

    /// Evicts the oldest segments until `need` more bytes (and a new segment's header) fit.
    /// Segments another writer is evicting (see `evict_segment`) are skipped; if only those
    /// are left, the cache exceeds its bound by a record or two until that eviction ends.
    pub(super) fn make_room(
        &self,
        w: &mut MutexGuard<'_, Writer>,
        need: u64,
    ) -> Result<(), CacheError> {
        while w.total_bytes + need + SEGMENT_HEADER_LEN > self.max_bytes {
            let active = w.active.as_ref().map(|a| a.seg);
            let victim = w
                .sizes
                .keys()
                .copied()
                .find(|&s| Some(s) != active && !w.evicting.contains(&s));
            let Some(victim) = victim else { break };
            self.evict_segment(w, victim, true)?;
        }
        Ok(())
    }

    /// Removes segment `seg` and its entries, copying forward (with `second_chance`) the
    /// records read since they were written, then deletes the file after a durable commit.
    ///
    /// A big segment holds up to hundreds of thousands of entries. They are removed in
    /// batches of `EVICT_BATCH`, each its own (non-durable) transaction, and the writer lock
    /// is offered to waiting writers between batches, so an invalidation never waits for a
    /// whole eviction. Every batch leaves a consistent index (entries gone or moved).
    pub(super) fn evict_segment(
        &self,
        w: &mut MutexGuard<'_, Writer>,
        seg: u64,
        second_chance: bool,
    ) -> Result<(), CacheError> {
        w.evicting.insert(seg);
        let result = self
            .evict_segment_batches(w, seg, second_chance)
            .and_then(|counts| {
                // Nothing refers to the victim's records any more: no need to sync them.
                w.unsynced.remove(&seg);
                self.presync(w)?;
                let txn = self.db.begin_write()?;
                self.commit_durable(w, txn)?;
                Ok(counts)
            });
        w.evicting.remove(&seg);
        let (evicted, copied) = result?;
        // No durable state mentions the segment any more: its file can go.
        self.files.write().remove(&seg);
        w.unsynced.remove(&seg);
        if let Some(size) = w.sizes.remove(&seg) {
            w.total_bytes -= size;
        }
        let path = segment::segment_path(&self.segments_dir, seg);
        if let Err(e) = self.fs.remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(error = %e, path = %path.display(), "deleting an evicted cache segment failed");
            }
        }
        debug!(seg, evicted, copied, "evicted a cache segment");
        self.counters.bytes.store(w.total_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The batches of `evict_segment`; returns (dropped, copied) entry counts.
    pub(super) fn evict_segment_batches(
        &self,
        w: &mut MutexGuard<'_, Writer>,
        seg: u64,
        second_chance: bool,
    ) -> Result<(u64, u64), CacheError> {
        let file = self.files.read().get(&seg).cloned();
        let mut hot = HashSet::new();
        let (mut evicted, mut copied) = (0u64, 0u64);
        let mut from = 0u32;
        loop {
            // Marks made by readers since the last batch count too.
            hot.extend(self.accessed.lock().take(seg));
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::None)?;
            let (next, dropped, entries) = {
                let mut t = EntryTables::open(&txn)?;
                let rows = t.segment_rows(seg, from, EVICT_BATCH)?;
                let next = rows.last().and_then(|&(off, _, _)| off.checked_add(1));
                let mut dropped = 0;
                for (off, oid, start) in rows {
                    let at = |l: Loc| l.seg == seg && l.off == off;
                    let loc = match t.current(oid)?.filter(|c| c.start == start && at(c.loc)) {
                        Some(c) => Some(c.loc),
                        None => t
                            .noncurrent(oid, start)?
                            .filter(|n| at(n.loc))
                            .map(|n| n.loc),
                    };
                    let Some(loc) = loc else {
                        t.locations.remove((seg, off))?; // a stray row; cannot happen
                        continue;
                    };
                    if second_chance && hot.contains(&off) {
                        let data = file
                            .as_ref()
                            .and_then(|f| segment::read_record(&**f, loc, oid, start).ok());
                        if let Some(data) = data {
                            let to = self.append(w, oid, start, &data)?;
                            t.relocate(oid, start, loc, to)?;
                            copied += 1;
                            continue;
                        }
                    }
                    t.remove_at(oid, start, loc)?;
                    dropped += 1;
                }
                (next, dropped, t.len()?)
            };
            txn.commit()?;
            evicted += dropped;
            self.counters
                .evictions
                .fetch_add(dropped, Ordering::Relaxed);
            self.counters.entries.store(entries, Ordering::Relaxed);
            let Some(next) = next else { break };
            from = next;
            MutexGuard::bump(w);
        }
        Ok((evicted, copied))
    }
}
