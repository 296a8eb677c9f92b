//! The in-memory index: oid → offset of the oid's current data record (docs/filestorage.md §3.1).
//!
//! Laid out like Python's `fsIndex`, because that is both compact and exactly the shape of
//! the `.index` file: oids are split into a 6-byte prefix and a 2-byte suffix; each prefix
//! owns a bucket of sorted suffixes with 6-byte (48-bit) positions beside them. That costs
//! 8 bytes per object (plus vector slack while growing) instead of the ~32 of a hash map,
//! which matters for databases with tens of millions of objects. Oids are handed out
//! sequentially, so buckets are dense: a lookup first tries `keys[suffix] == suffix`
//! (one comparison), then falls back to a binary search. New oids append at the end of
//! the last bucket.
//!
//! A bucket read from a `.index` file stays in the file's own byte form (as Python's
//! `fsBucket` does) until it is first modified: opening a large storage then costs one
//! read of the file and no per-entry work.

use bytes::Bytes;
use std::collections::BTreeMap;
use zodb::Oid;

/// A position in 6 big-endian bytes, as `fsIndex` stores it.
pub type Pos48 = [u8; 6];

pub fn pos_to_48(pos: u64) -> Pos48 {
    debug_assert!(pos < crate::format::POSITION_LIMIT);
    let b = pos.to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

pub fn pos_from_48(p: &Pos48) -> u64 {
    u64::from_be_bytes([0, 0, p[0], p[1], p[2], p[3], p[4], p[5]])
}

fn pos_from_slice(p: &[u8]) -> u64 {
    u64::from_be_bytes([0, 0, p[0], p[1], p[2], p[3], p[4], p[5]])
}

/// How a bucket holds its entries.
#[derive(Debug, Clone)]
enum Repr {
    /// `keys` strictly ascending, `positions` in step.
    Owned {
        keys: Vec<u16>,
        positions: Vec<Pos48>,
    },
    /// `fsBucket.toString()` form, as in the `.index` file: n big-endian 2-byte keys
    /// (strictly ascending, checked when made) then n 6-byte positions.
    Raw(Bytes),
}

/// The entries of one 6-byte prefix.
#[derive(Debug, Clone)]
pub struct Bucket {
    repr: Repr,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            repr: Repr::Owned {
                keys: Vec::new(),
                positions: Vec::new(),
            },
        }
    }
}

impl PartialEq for Bucket {
    fn eq(&self, other: &Bucket) -> bool {
        self.len() == other.len() && (0..self.len()).all(|i| self.entry(i) == other.entry(i))
    }
}

impl Eq for Bucket {}

impl Bucket {
    /// Builds a bucket from parallel vectors; `None` unless the keys are strictly
    /// ascending and the lengths agree (a damaged `.index` must not break lookups).
    pub fn from_parts(keys: Vec<u16>, positions: Vec<Pos48>) -> Option<Bucket> {
        if keys.len() != positions.len() || keys.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        Some(Bucket {
            repr: Repr::Owned { keys, positions },
        })
    }

    /// A bucket over the `fsBucket.toString()` bytes of the `.index` file, without
    /// copying them; `None` unless the length is a multiple of 8 and the keys are
    /// strictly ascending.
    pub fn from_string_form(data: Bytes) -> Option<Bucket> {
        if !data.len().is_multiple_of(8) {
            return None;
        }
        let n = data.len() / 8;
        let keys = &data[..2 * n];
        let ascending = keys
            .chunks_exact(2)
            .map(|k| u16::from_be_bytes([k[0], k[1]]))
            .try_fold(None, |prev: Option<u16>, k| match prev {
                Some(p) if p >= k => Err(()),
                _ => Ok(Some(k)),
            })
            .is_ok();
        ascending.then_some(Bucket {
            repr: Repr::Raw(data),
        })
    }

    /// Appends the `fsBucket.toString()` form (what the `.index` file stores).
    pub fn write_string_form(&self, out: &mut Vec<u8>) {
        match &self.repr {
            Repr::Raw(data) => out.extend_from_slice(data),
            Repr::Owned { keys, positions } => {
                for k in keys {
                    out.extend_from_slice(&k.to_be_bytes());
                }
                for p in positions {
                    out.extend_from_slice(p);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Owned { keys, .. } => keys.len(),
            Repr::Raw(data) => data.len() / 8,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn key(&self, i: usize) -> u16 {
        match &self.repr {
            Repr::Owned { keys, .. } => keys[i],
            Repr::Raw(data) => u16::from_be_bytes([data[2 * i], data[2 * i + 1]]),
        }
    }

    fn position(&self, i: usize) -> u64 {
        match &self.repr {
            Repr::Owned { positions, .. } => pos_from_48(&positions[i]),
            Repr::Raw(data) => {
                let at = 2 * (data.len() / 8) + 6 * i;
                pos_from_slice(&data[at..at + 6])
            }
        }
    }

    /// Entry `i` as `(suffix, position)`.
    fn entry(&self, i: usize) -> (u16, u64) {
        (self.key(i), self.position(i))
    }

    fn find(&self, suffix: u16) -> Result<usize, usize> {
        let direct = suffix as usize;
        if direct < self.len() && self.key(direct) == suffix {
            return Ok(direct);
        }
        match &self.repr {
            Repr::Owned { keys, .. } => keys.binary_search(&suffix),
            Repr::Raw(_) => {
                let (mut lo, mut hi) = (0, self.len());
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    match self.key(mid).cmp(&suffix) {
                        std::cmp::Ordering::Less => lo = mid + 1,
                        std::cmp::Ordering::Greater => hi = mid,
                        std::cmp::Ordering::Equal => return Ok(mid),
                    }
                }
                Err(lo)
            }
        }
    }

    fn get(&self, suffix: u16) -> Option<u64> {
        self.find(suffix).ok().map(|i| self.position(i))
    }

    /// The vectors, converting a bucket still in its file form.
    fn owned(&mut self) -> (&mut Vec<u16>, &mut Vec<Pos48>) {
        if let Repr::Raw(data) = &self.repr {
            let n = data.len() / 8;
            let (ks, ps) = data.split_at(2 * n);
            let keys = ks
                .chunks_exact(2)
                .map(|k| u16::from_be_bytes([k[0], k[1]]))
                .collect();
            let positions = ps
                .chunks_exact(6)
                .map(|p| [p[0], p[1], p[2], p[3], p[4], p[5]])
                .collect();
            self.repr = Repr::Owned { keys, positions };
        }
        match &mut self.repr {
            Repr::Owned { keys, positions } => (keys, positions),
            Repr::Raw(_) => unreachable!("converted above"),
        }
    }

    /// Returns true if the key is new.
    fn insert(&mut self, suffix: u16, pos: Pos48) -> bool {
        let found = self.find(suffix);
        let (keys, positions) = self.owned();
        match found {
            Ok(i) => {
                positions[i] = pos;
                false
            }
            Err(i) if i == keys.len() => {
                keys.push(suffix);
                positions.push(pos);
                true
            }
            Err(i) => {
                keys.insert(i, suffix);
                positions.insert(i, pos);
                true
            }
        }
    }

    fn remove(&mut self, suffix: u16) -> Option<u64> {
        let i = self.find(suffix).ok()?;
        let (keys, positions) = self.owned();
        keys.remove(i);
        Some(pos_from_48(&positions.remove(i)))
    }

    fn shrink_to_fit(&mut self) {
        if let Repr::Owned { keys, positions } = &mut self.repr {
            keys.shrink_to_fit();
            positions.shrink_to_fit();
        }
    }
}

/// oid → current record position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    buckets: BTreeMap<u64, Bucket>,
    len: usize,
}

fn split(oid: Oid) -> (u64, u16) {
    (oid.0 >> 16, (oid.0 & 0xffff) as u16)
}

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    /// Number of oids (deleted objects included, as in Python's `len(storage)`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, oid: Oid) -> Option<u64> {
        let (prefix, suffix) = split(oid);
        self.buckets.get(&prefix)?.get(suffix)
    }

    /// Sets the position of `oid`. `pos` must be below 2^48 (checked by the writer).
    pub fn insert(&mut self, oid: Oid, pos: u64) {
        let (prefix, suffix) = split(oid);
        if self
            .buckets
            .entry(prefix)
            .or_default()
            .insert(suffix, pos_to_48(pos))
        {
            self.len += 1;
        }
    }

    /// Sets the positions of a transaction's records, given in file order (the last
    /// record of an oid wins).
    ///
    /// ZODB writes a transaction's new objects in *descending* oid order, and inserting
    /// them one by one would shift a whole bucket each time (that dominated full scans).
    /// Sorted (stably, so file order decides among records of one oid), new oids arrive
    /// in ascending order and are appended.
    pub fn insert_batch(&mut self, entries: &mut [(Oid, u64)]) {
        entries.sort_by_key(|e| e.0);
        for &(oid, pos) in entries.iter() {
            self.insert(oid, pos);
        }
    }

    /// The largest oid, `None` when empty (`fsIndex.maxKey()`).
    pub fn max_oid(&self) -> Option<Oid> {
        let (prefix, bucket) = self.buckets.iter().next_back()?;
        let last = bucket.len().checked_sub(1)?;
        Some(Oid((prefix << 16) | u64::from(bucket.key(last))))
    }

    /// The first entry with an oid `>= from` (`fsIndex.minKey(from)`), for
    /// `record_iternext`.
    pub fn first_at_or_after(&self, from: Oid) -> Option<(Oid, u64)> {
        let (prefix, suffix) = split(from);
        for (p, b) in self.buckets.range(prefix..) {
            let i = if *p == prefix {
                match b.find(suffix) {
                    Ok(i) | Err(i) => i,
                }
            } else {
                0
            };
            if i < b.len() {
                let (k, pos) = b.entry(i);
                return Some((Oid((p << 16) | u64::from(k)), pos));
            }
        }
        None
    }

    /// Removes `oid`; returns its position if it was present.
    pub fn remove(&mut self, oid: Oid) -> Option<u64> {
        let (prefix, suffix) = split(oid);
        let b = self.buckets.get_mut(&prefix)?;
        let pos = b.remove(suffix)?;
        if b.is_empty() {
            self.buckets.remove(&prefix);
        }
        self.len -= 1;
        Some(pos)
    }

    /// Adds a whole bucket, as read from a `.index` file. Prefixes must arrive in
    /// ascending order and be below 2^48; returns false otherwise (a damaged file).
    pub fn push_bucket(&mut self, prefix: u64, bucket: Bucket) -> bool {
        if prefix >= 1 << 48 {
            return false;
        }
        if let Some((&last, _)) = self.buckets.iter().next_back() {
            if last >= prefix {
                return false;
            }
        }
        if bucket.is_empty() {
            return true;
        }
        self.len += bucket.len();
        self.buckets.insert(prefix, bucket);
        true
    }

    /// Buckets in ascending prefix order (what the `.index` file stores).
    pub fn buckets(&self) -> impl Iterator<Item = (u64, &Bucket)> {
        self.buckets.iter().map(|(p, b)| (*p, b))
    }

    /// All entries in oid order.
    pub fn iter(&self) -> impl Iterator<Item = (Oid, u64)> + '_ {
        self.buckets.iter().flat_map(|(prefix, b)| {
            (0..b.len()).map(move |i| {
                let (k, pos) = b.entry(i);
                (Oid((prefix << 16) | u64::from(k)), pos)
            })
        })
    }

    /// Releases growth slack (after a full scan).
    pub fn shrink_to_fit(&mut self) {
        for b in self.buckets.values_mut() {
            b.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_len_max() {
        let mut ix = Index::new();
        assert_eq!(ix.max_oid(), None);
        assert_eq!(ix.get(Oid(0)), None);
        ix.insert(Oid(5), 100);
        ix.insert(Oid(0), 4);
        ix.insert(Oid(0x1_0003), 200);
        ix.insert(Oid(3), 300);
        ix.insert(Oid(5), 500); // update
        assert_eq!(ix.len(), 4);
        assert_eq!(ix.get(Oid(0)), Some(4));
        assert_eq!(ix.get(Oid(3)), Some(300));
        assert_eq!(ix.get(Oid(5)), Some(500));
        assert_eq!(ix.get(Oid(4)), None);
        assert_eq!(ix.get(Oid(0x1_0003)), Some(200));
        assert_eq!(ix.get(Oid(0x2_0003)), None);
        assert_eq!(ix.max_oid(), Some(Oid(0x1_0003)));
        let all: Vec<_> = ix.iter().collect();
        assert_eq!(
            all,
            vec![
                (Oid(0), 4),
                (Oid(3), 300),
                (Oid(5), 500),
                (Oid(0x1_0003), 200)
            ]
        );
    }

    #[test]
    fn dense_and_sparse_lookups_agree_with_a_map() {
        use std::collections::HashMap;
        let mut ix = Index::new();
        let mut m = HashMap::new();
        // Dense run, then a sparse region inserted out of order.
        for i in 0..70_000u64 {
            ix.insert(Oid(i), i * 10 + 4);
            m.insert(i, i * 10 + 4);
        }
        let mut x: u64 = 12345;
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let oid = (x >> 20) % 300_000;
            ix.insert(Oid(oid), oid + 7);
            m.insert(oid, oid + 7);
        }
        assert_eq!(ix.len(), m.len());
        for i in 0..300_000u64 {
            assert_eq!(ix.get(Oid(i)), m.get(&i).copied(), "oid {i}");
        }
        let keys: Vec<u64> = ix.iter().map(|(o, _)| o.0).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn batches_keep_the_last_record_of_an_oid() {
        let mut ix = Index::new();
        let mut batch = vec![(Oid(9), 1), (Oid(3), 2), (Oid(9), 3), (Oid(1), 4)];
        ix.insert_batch(&mut batch);
        assert_eq!(
            ix.iter().collect::<Vec<_>>(),
            vec![(Oid(1), 4), (Oid(3), 2), (Oid(9), 3)]
        );
    }

    #[test]
    fn first_at_or_after_and_remove() {
        let mut ix = Index::new();
        assert_eq!(ix.first_at_or_after(Oid(0)), None);
        for o in [3u64, 5, 0x2_0001, 0x2_0004] {
            ix.insert(Oid(o), o + 100);
        }
        assert_eq!(ix.first_at_or_after(Oid(0)), Some((Oid(3), 103)));
        assert_eq!(ix.first_at_or_after(Oid(4)), Some((Oid(5), 105)));
        assert_eq!(
            ix.first_at_or_after(Oid(6)),
            Some((Oid(0x2_0001), 0x2_0001 + 100))
        );
        assert_eq!(
            ix.first_at_or_after(Oid(0x2_0002)),
            Some((Oid(0x2_0004), 0x2_0004 + 100))
        );
        assert_eq!(ix.first_at_or_after(Oid(0x2_0005)), None);
        assert_eq!(ix.remove(Oid(5)), Some(105));
        assert_eq!(ix.remove(Oid(5)), None);
        assert_eq!(ix.remove(Oid(0x2_0001)), Some(0x2_0001 + 100));
        assert_eq!(ix.remove(Oid(0x2_0004)), Some(0x2_0004 + 100));
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.first_at_or_after(Oid(4)), None);
        assert_eq!(ix.max_oid(), Some(Oid(3)));
    }

    #[test]
    fn bucket_validation() {
        assert!(Bucket::from_parts(vec![1, 2], vec![[0; 6]; 2]).is_some());
        assert!(Bucket::from_parts(vec![2, 1], vec![[0; 6]; 2]).is_none());
        assert!(Bucket::from_parts(vec![1, 1], vec![[0; 6]; 2]).is_none());
        assert!(Bucket::from_parts(vec![1], vec![[0; 6]; 2]).is_none());
        let mut ix = Index::new();
        assert!(ix.push_bucket(2, Bucket::from_parts(vec![1], vec![[0; 6]]).unwrap()));
        assert!(!ix.push_bucket(1, Bucket::default()));
        assert!(!ix.push_bucket(1 << 48, Bucket::default()));
    }

    #[test]
    fn string_form_buckets_read_and_convert_on_write() {
        let mut raw = Vec::new();
        for k in [1u16, 5, 9] {
            raw.extend_from_slice(&k.to_be_bytes());
        }
        for p in [100u64, 500, 900] {
            raw.extend_from_slice(&pos_to_48(p));
        }
        let b = Bucket::from_string_form(Bytes::from(raw.clone())).unwrap();
        let mut ix = Index::new();
        assert!(ix.push_bucket(0, b));
        assert_eq!(ix.get(Oid(5)), Some(500));
        assert_eq!(ix.get(Oid(4)), None);
        assert_eq!(ix.max_oid(), Some(Oid(9)));
        assert_eq!(ix.first_at_or_after(Oid(6)), Some((Oid(9), 900)));
        let mut out = Vec::new();
        ix.buckets().next().unwrap().1.write_string_form(&mut out);
        assert_eq!(out, raw);
        let owned = {
            let mut o = Index::new();
            for (k, p) in [(1u64, 100u64), (5, 500), (9, 900)] {
                o.insert(Oid(k), p);
            }
            o
        };
        assert_eq!(ix, owned);
        ix.insert(Oid(7), 700);
        ix.insert(Oid(5), 501);
        assert_eq!(ix.remove(Oid(1)), Some(100));
        assert_eq!(
            ix.iter().collect::<Vec<_>>(),
            vec![(Oid(5), 501), (Oid(7), 700), (Oid(9), 900)]
        );
        // Unsorted or odd-sized forms are refused.
        assert!(Bucket::from_string_form(Bytes::from_static(&[
            0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
        ]))
        .is_none());
        assert!(Bucket::from_string_form(Bytes::from_static(&[0, 1, 0])).is_none());
    }

    #[test]
    fn pos48() {
        for p in [0u64, 4, 474, (1 << 48) - 1] {
            assert_eq!(pos_from_48(&pos_to_48(p)), p);
        }
    }
}
