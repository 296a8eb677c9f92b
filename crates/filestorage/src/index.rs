//! The in-memory index: oid → offset of the oid's current data record (spec §3.1).
//!
//! Laid out like Python's `fsIndex`, because that is both compact and exactly the shape of
//! the `.index` file: oids are split into a 6-byte prefix and a 2-byte suffix; each prefix
//! owns a bucket of sorted suffixes with 6-byte (48-bit) positions beside them. That costs
//! 8 bytes per object (plus vector slack while growing) instead of the ~32 of a hash map,
//! which matters for databases with tens of millions of objects. Oids are handed out
//! sequentially, so buckets are dense: a lookup first tries `keys[suffix] == suffix`
//! (one comparison), then falls back to a binary search. New oids append at the end of
//! the last bucket.

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

/// The entries of one 6-byte prefix: `keys` strictly ascending, `positions` in step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    keys: Vec<u16>,
    positions: Vec<Pos48>,
}

impl Bucket {
    /// Builds a bucket from parallel vectors; `None` unless the keys are strictly
    /// ascending and the lengths agree (a damaged `.index` must not break lookups).
    pub fn from_parts(keys: Vec<u16>, positions: Vec<Pos48>) -> Option<Bucket> {
        if keys.len() != positions.len() || keys.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        Some(Bucket { keys, positions })
    }

    pub fn keys(&self) -> &[u16] {
        &self.keys
    }

    pub fn positions(&self) -> &[Pos48] {
        &self.positions
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn find(&self, suffix: u16) -> Result<usize, usize> {
        let direct = suffix as usize;
        if self.keys.get(direct) == Some(&suffix) {
            return Ok(direct);
        }
        self.keys.binary_search(&suffix)
    }

    fn get(&self, suffix: u16) -> Option<u64> {
        self.find(suffix)
            .ok()
            .map(|i| pos_from_48(&self.positions[i]))
    }

    /// Returns true if the key is new.
    fn insert(&mut self, suffix: u16, pos: Pos48) -> bool {
        match self.keys.last() {
            Some(&last) if last < suffix => {
                self.keys.push(suffix);
                self.positions.push(pos);
                return true;
            }
            None => {
                self.keys.push(suffix);
                self.positions.push(pos);
                return true;
            }
            _ => {}
        }
        match self.find(suffix) {
            Ok(i) => {
                self.positions[i] = pos;
                false
            }
            Err(i) => {
                self.keys.insert(i, suffix);
                self.positions.insert(i, pos);
                true
            }
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
        let suffix = *bucket.keys.last()?;
        Some(Oid((prefix << 16) | suffix as u64))
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
            if let (Some(k), Some(pos)) = (b.keys.get(i), b.positions.get(i)) {
                return Some((Oid((p << 16) | *k as u64), pos_from_48(pos)));
            }
        }
        None
    }

    /// Removes `oid`; returns its position if it was present.
    pub fn remove(&mut self, oid: Oid) -> Option<u64> {
        let (prefix, suffix) = split(oid);
        let b = self.buckets.get_mut(&prefix)?;
        let i = b.find(suffix).ok()?;
        b.keys.remove(i);
        let pos = b.positions.remove(i);
        if b.keys.is_empty() {
            self.buckets.remove(&prefix);
        }
        self.len -= 1;
        Some(pos_from_48(&pos))
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
            b.keys
                .iter()
                .zip(&b.positions)
                .map(move |(k, p)| (Oid((prefix << 16) | *k as u64), pos_from_48(p)))
        })
    }

    /// Releases growth slack (after a full scan).
    pub fn shrink_to_fit(&mut self) {
        for b in self.buckets.values_mut() {
            b.keys.shrink_to_fit();
            b.positions.shrink_to_fit();
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
    fn pos48() {
        for p in [0u64, 4, 474, (1 << 48) - 1] {
            assert_eq!(pos_from_48(&pos_to_48(p)), p);
        }
    }
}
