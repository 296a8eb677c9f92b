//! The on-disk index in `index.redb`: where each cached revision is, what it is valid for,
//! the cache's position in upstream history and the invalidation log.
//!
//! | table          | key                   | value                                  |
//! |----------------|-----------------------|----------------------------------------|
//! | `current`      | oid                   | start, generation, seg, off, len       |
//! | `noncurrent`   | (oid, start)          | end, seg, off, len                     |
//! | `locations`    | (seg, off)            | (oid, start) — reverse of the above    |
//! | `meta`         | name                  | u64 (format, last tid, generation, …)  |
//! | `epochs`       | generation            | end bound of that generation's entries |
//! | `pack_floors`  | generation            | pack floor of that generation's entries|
//! | `invalidations`| tid                   | packed 8-byte oids                     |
//!
//! `locations` lets eviction find every entry in a segment with a range scan instead of
//! reading the segment file, and it is exact: an index entry exists iff its location row
//! does. Entries keep no "seen" tid; the generation of a current entry says which
//! `drop_current` or `packed` era it belongs to (see `Epochs`).

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use zodb::{Oid, Tid};

use super::segment::Loc;

/// (start, generation, seg, off, len)
type CurrentValue = (u64, u32, u64, u32, u32);
/// (end, seg, off, len)
type NonCurrentValue = (u64, u64, u32, u32);

pub(super) const CURRENT: TableDefinition<u64, CurrentValue> = TableDefinition::new("current");
pub(super) const NONCURRENT: TableDefinition<(u64, u64), NonCurrentValue> =
    TableDefinition::new("noncurrent");
pub(super) const LOCATIONS: TableDefinition<(u64, u32), (u64, u64)> =
    TableDefinition::new("locations");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const EPOCHS: TableDefinition<u32, u64> = TableDefinition::new("epochs");
/// Added after format 1 was released: a cache without it has had no pack (see `Epochs`).
pub(super) const PACK_FLOORS: TableDefinition<u32, u64> = TableDefinition::new("pack_floors");
pub(super) const INVALIDATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("invalidations");

/// Version of this layout (and of the segment format); anything else is started afresh.
pub(super) const FORMAT: u64 = 1;
pub(super) const META_FORMAT: &str = "format";
pub(super) const META_LAST_TID: &str = "last_tid";
pub(super) const META_GENERATION: &str = "generation";
/// Written by a clean close only: the active segment and its length, so the next open may
/// keep appending to it rather than start a new one.
pub(super) const META_CLEAN_SEG: &str = "clean_seg";
pub(super) const META_CLEAN_LEN: &str = "clean_len";
/// Set by `packed` while it deletes the non-current entries a pack may have removed
/// upstream (those starting at or before this tid); until they are gone, reads skip them.
pub(super) const META_PURGE_FLOOR: &str = "purge_floor";
/// How far warming from upstream got (see `warm.rs`); absent: not started.
pub(super) const META_WARM: &str = "warm";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CurrentEntry {
    pub start: Tid,
    pub generation: u32,
    pub loc: Loc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NonCurrentEntry {
    pub end: Tid,
    pub loc: Loc,
}

impl CurrentEntry {
    fn from_value((start, generation, seg, off, len): CurrentValue) -> Self {
        CurrentEntry {
            start: Tid(start),
            generation,
            loc: Loc { seg, off, len },
        }
    }
    fn value(self) -> CurrentValue {
        (
            self.start.0,
            self.generation,
            self.loc.seg,
            self.loc.off,
            self.loc.len,
        )
    }
}

impl NonCurrentEntry {
    fn from_value((end, seg, off, len): NonCurrentValue) -> Self {
        NonCurrentEntry {
            end: Tid(end),
            loc: Loc { seg, off, len },
        }
    }
    fn value(self) -> NonCurrentValue {
        (self.end.0, self.loc.seg, self.loc.off, self.loc.len)
    }
}

pub(super) fn get_current(
    t: &impl ReadableTable<u64, CurrentValue>,
    oid: Oid,
) -> Result<Option<CurrentEntry>, redb::StorageError> {
    Ok(t.get(oid.0)?.map(|g| CurrentEntry::from_value(g.value())))
}

pub(super) fn get_noncurrent(
    t: &impl ReadableTable<(u64, u64), NonCurrentValue>,
    oid: Oid,
    start: Tid,
) -> Result<Option<NonCurrentEntry>, redb::StorageError> {
    Ok(t.get((oid.0, start.0))?
        .map(|g| NonCurrentEntry::from_value(g.value())))
}

/// The non-current entry of `oid` with the greatest start before `before`.
pub(super) fn noncurrent_before(
    t: &impl ReadableTable<(u64, u64), NonCurrentValue>,
    oid: Oid,
    before: Tid,
) -> Result<Option<(Tid, NonCurrentEntry)>, redb::StorageError> {
    let mut range = t.range((oid.0, 0)..(oid.0, before.0))?;
    match range.next_back() {
        Some(item) => {
            let (k, v) = item?;
            Ok(Some((
                Tid(k.value().1),
                NonCurrentEntry::from_value(v.value()),
            )))
        }
        None => Ok(None),
    }
}

/// The end bound of each generation of current entries that `drop_current` retired, and
/// the pack floor of each generation that a pack made suspect.
///
/// `drop_current` does not touch the (possibly millions of) current entries: it starts a new
/// generation and records, for the old one, the bound `last_tid + 1` that every entry of
/// it is known valid up to. A current entry of an old generation is read as non-current
/// `[start, end)` and is rewritten as such whenever a writer touches it.
///
/// `packed(floor)` does the same for a pack: upstream may have removed any revision that
/// started at or before `floor` (an object garbage-collected at the pack time loses every
/// revision up to it; one still referenced keeps the revision current then). It starts a
/// new generation and gives every older one that floor: an entry of an old generation
/// with `start <= floor` is *suspect* — never served as is; a current one is offered for
/// verification with upstream (and moved to the current generation if upstream still
/// has it), a retired one is dead. Entries with `start > floor` are what they were.
#[derive(Clone, Debug, Default)]
pub(super) struct Epochs {
    pub current: u32,
    pub ends: std::collections::HashMap<u32, Tid>,
    pub floors: std::collections::HashMap<u32, Tid>,
}

/// What an entry of the `current` table stands for (see [`Epochs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Standing {
    /// Current as of the cache's `last_tid`.
    Current,
    /// Current unless a pack removed it: upstream must be asked before it is served.
    Suspect,
    /// The revision was valid for `[start, end)` (empty: not usable at all).
    Ended(Tid),
}

impl Epochs {
    /// `None` if entries of `generation` are current; else the end they are valid up to.
    /// An unknown old generation (cannot happen) gets an empty interval. Suspect entries
    /// get an empty interval too: writers drop them when they touch them.
    pub fn end_of(&self, generation: u32, start: Tid) -> Option<Tid> {
        match self.standing(generation, start) {
            Standing::Current => None,
            Standing::Suspect => Some(start),
            Standing::Ended(end) => Some(end),
        }
    }

    /// What a current-table entry of `generation` starting at `start` stands for.
    pub fn standing(&self, generation: u32, start: Tid) -> Standing {
        if generation == self.current {
            return Standing::Current;
        }
        let packed_away = self.floors.get(&generation).is_some_and(|f| start <= *f);
        match self.ends.get(&generation) {
            Some(_) if packed_away => Standing::Ended(start),
            Some(end) => Standing::Ended(*end),
            None if packed_away => Standing::Suspect,
            None if self.floors.contains_key(&generation) => Standing::Current,
            None => Standing::Ended(start),
        }
    }

    /// The greatest pack floor of any generation: non-current revisions that start at or
    /// before it may be gone upstream.
    pub fn max_floor(&self) -> Tid {
        self.floors.values().copied().max().unwrap_or(Tid::ZERO)
    }
}

/// The entry tables, open in one write transaction, with the operations that keep
/// `locations` exactly in step with `current` and `noncurrent`.
pub(super) struct EntryTables<'txn> {
    pub current: Table<'txn, u64, CurrentValue>,
    pub noncurrent: Table<'txn, (u64, u64), NonCurrentValue>,
    pub locations: Table<'txn, (u64, u32), (u64, u64)>,
}

impl<'txn> EntryTables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(EntryTables {
            current: txn.open_table(CURRENT)?,
            noncurrent: txn.open_table(NONCURRENT)?,
            locations: txn.open_table(LOCATIONS)?,
        })
    }

    /// Number of entries (current and non-current).
    pub fn len(&self) -> Result<u64, redb::StorageError> {
        Ok(self.current.len()? + self.noncurrent.len()?)
    }

    pub fn current(&self, oid: Oid) -> Result<Option<CurrentEntry>, redb::StorageError> {
        get_current(&self.current, oid)
    }

    pub fn noncurrent(
        &self,
        oid: Oid,
        start: Tid,
    ) -> Result<Option<NonCurrentEntry>, redb::StorageError> {
        get_noncurrent(&self.noncurrent, oid, start)
    }

    /// Makes `e` the current entry of `oid`. The caller has removed the previous one.
    pub fn put_current(&mut self, oid: Oid, e: CurrentEntry) -> Result<(), redb::StorageError> {
        self.current.insert(oid.0, e.value())?;
        self.locations
            .insert((e.loc.seg, e.loc.off), (oid.0, e.start.0))?;
        Ok(())
    }

    /// Adds non-current revision `[start, end)` at `loc`. An entry already there for the same
    /// revision is replaced; the larger end is kept (both are known to be valid bounds).
    pub fn put_noncurrent(
        &mut self,
        oid: Oid,
        start: Tid,
        mut end: Tid,
        loc: Loc,
    ) -> Result<(), redb::StorageError> {
        if let Some(old) = self.noncurrent(oid, start)? {
            end = end.max(old.end);
            if old.loc != loc {
                self.forget_location(old.loc, oid, start)?;
            }
        }
        self.noncurrent
            .insert((oid.0, start.0), NonCurrentEntry { end, loc }.value())?;
        self.locations
            .insert((loc.seg, loc.off), (oid.0, start.0))?;
        Ok(())
    }

    /// Removes the location row of `loc` if it belongs to revision (oid, start).
    fn forget_location(
        &mut self,
        loc: Loc,
        oid: Oid,
        start: Tid,
    ) -> Result<(), redb::StorageError> {
        let owned = self
            .locations
            .get((loc.seg, loc.off))?
            .is_some_and(|g| g.value() == (oid.0, start.0));
        if owned {
            self.locations.remove((loc.seg, loc.off))?;
        }
        Ok(())
    }

    /// Ends the current entry `e` of `oid`: it becomes non-current `[start, end)` if that
    /// interval is not empty, and is forgotten otherwise.
    pub fn retire_current(
        &mut self,
        oid: Oid,
        e: CurrentEntry,
        end: Option<Tid>,
    ) -> Result<(), redb::StorageError> {
        self.current.remove(oid.0)?;
        match end {
            Some(end) if end > e.start => self.put_noncurrent(oid, e.start, end, e.loc),
            _ => self.forget_location(e.loc, oid, e.start),
        }
    }

    /// Removes whichever entry of revision (oid, start) lives at `loc`, if any.
    pub fn remove_at(
        &mut self,
        oid: Oid,
        start: Tid,
        loc: Loc,
    ) -> Result<bool, redb::StorageError> {
        let mut removed = false;
        if self
            .current(oid)?
            .is_some_and(|c| c.start == start && c.loc == loc)
        {
            self.current.remove(oid.0)?;
            removed = true;
        }
        if self.noncurrent(oid, start)?.is_some_and(|n| n.loc == loc) {
            self.noncurrent.remove((oid.0, start.0))?;
            removed = true;
        }
        self.forget_location(loc, oid, start)?;
        Ok(removed)
    }

    /// Points the entry of revision (oid, start) at `from` to its copy at `to`.
    /// Returns false (and changes nothing) if no entry lives at `from`.
    pub fn relocate(
        &mut self,
        oid: Oid,
        start: Tid,
        from: Loc,
        to: Loc,
    ) -> Result<bool, redb::StorageError> {
        let mut moved = false;
        if let Some(mut c) = self
            .current(oid)?
            .filter(|c| c.start == start && c.loc == from)
        {
            c.loc = to;
            self.current.insert(oid.0, c.value())?;
            moved = true;
        } else if let Some(mut n) = self.noncurrent(oid, start)?.filter(|n| n.loc == from) {
            n.loc = to;
            self.noncurrent.insert((oid.0, start.0), n.value())?;
            moved = true;
        }
        if moved {
            self.forget_location(from, oid, start)?;
            self.locations.insert((to.seg, to.off), (oid.0, start.0))?;
        }
        Ok(moved)
    }

    /// Up to `limit` location rows of segment `seg` at offsets from `from` on.
    pub fn segment_rows(
        &self,
        seg: u64,
        from: u32,
        limit: usize,
    ) -> Result<Vec<(u32, Oid, Tid)>, redb::StorageError> {
        let mut rows = Vec::new();
        for item in self
            .locations
            .range((seg, from)..=(seg, u32::MAX))?
            .take(limit)
        {
            let (k, v) = item?;
            let (oid, start) = v.value();
            rows.push((k.value().1, Oid(oid), Tid(start)));
        }
        Ok(rows)
    }
}

/// The oids of a log entry, packed as consecutive 8-byte big-endian values.
pub(super) fn pack_oids(oids: &[Oid]) -> Vec<u8> {
    oids.iter().flat_map(|o| o.to_bytes()).collect()
}

pub(super) fn unpack_oids(packed: &[u8]) -> impl Iterator<Item = Oid> + '_ {
    packed.chunks_exact(8).filter_map(Oid::from_slice)
}

/// The distinct segments that `locations` mentions, found by skipping from one segment's
/// rows to the next (one lookup per segment, not per row).
pub(super) fn referenced_segments(
    t: &impl ReadableTable<(u64, u32), (u64, u64)>,
) -> Result<Vec<u64>, redb::StorageError> {
    let mut segs = Vec::new();
    let mut from = 0u64;
    loop {
        let next = match t.range((from, 0)..)?.next() {
            Some(item) => item?.0.value().0,
            None => break,
        };
        segs.push(next);
        match next.checked_add(1) {
            Some(n) => from = n,
            None => break,
        }
    }
    Ok(segs)
}
