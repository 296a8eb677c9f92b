//! The description of the generated database (`meta.json`, written by
//! `bench/server/gendb.py`).

use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use zodb::Oid;

/// The server a workload runs against and the database it was generated with: the
/// options every workload shares.
#[derive(clap::Args)]
pub struct Target {
    /// Server address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8100")]
    pub address: String,
    /// meta.json of the generated database (`bench/server/gendb.py`).
    #[arg(long)]
    pub meta: PathBuf,
}

impl Target {
    pub fn meta(&self) -> Result<Meta> {
        Meta::load(&self.meta)
    }

    pub fn address(&self) -> zeo_client::Address {
        zeo_client::Address(self.address.clone())
    }
}

#[derive(Debug, Deserialize)]
pub struct Meta {
    /// Every oid in `0..=max_oid` exists.
    pub max_oid: u64,
    /// Inclusive oid ranges of the ~1 KB items (the objects writers may rewrite).
    pub item_ranges: Vec<[u64; 2]>,
    /// `BTrees.Length` counters: the hot set.
    pub counters: Vec<u64>,
    /// One item's record, hex; writers fill its payload to make new revisions.
    item_template: String,
    /// `item_template`, decoded once.
    #[serde(skip)]
    template: Vec<u8>,
    payload_offset: usize,
    payload_len: usize,
}

impl Meta {
    pub fn load(path: &Path) -> Result<Meta> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut meta: Meta = serde_json::from_str(&text).context("parsing meta.json")?;
        meta.template = hex_decode(&meta.item_template);
        if meta.item_ranges.is_empty() || meta.item_ranges.iter().any(|[a, b]| a > b) {
            bail!("meta.json has no usable item ranges");
        }
        if meta.payload_offset + meta.payload_len > meta.template.len() {
            bail!("meta.json: the payload lies outside the template");
        }
        Ok(meta)
    }

    pub fn item_count(&self) -> u64 {
        self.item_ranges.iter().map(|[a, b]| b - a + 1).sum()
    }

    /// A uniformly chosen item.
    pub fn random_item(&self, rng: &mut Rng) -> Oid {
        let mut i = rng.below(self.item_count());
        for [a, b] in &self.item_ranges {
            let n = b - a + 1;
            if i < n {
                return Oid(a + i);
            }
            i -= n;
        }
        unreachable!("index below item_count")
    }

    /// `n` distinct items (fewer if there are not that many).
    pub fn distinct_items(&self, n: usize, rng: &mut Rng) -> Vec<Oid> {
        let n = n.min(self.item_count() as usize);
        let mut picked = std::collections::BTreeSet::new();
        while picked.len() < n {
            picked.insert(self.random_item(rng));
        }
        let mut v: Vec<Oid> = picked.into_iter().collect();
        // Spread the order so that a sample is not read in oid (= file) order.
        for i in (1..v.len()).rev() {
            v.swap(i, rng.below(i as u64 + 1) as usize);
        }
        v
    }

    /// One item's record as generated (the size of every item's).
    pub fn item_record(&self) -> &[u8] {
        &self.template
    }

    /// A new revision of an item: the template with a fresh random payload.
    pub fn new_item_record(&self, rng: &mut Rng) -> Bytes {
        let mut rec = self.template.clone();
        rng.fill(&mut rec[self.payload_offset..self.payload_offset + self.payload_len]);
        Bytes::from(rec)
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    s.as_bytes()
        .chunks(2)
        .map(|p| {
            let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            digit(p[0]) << 4 | digit(p[1])
        })
        .collect()
}

/// The state of a `BTrees.Length` counter record (`class pickle` + `int pickle`):
/// returns the length of the class pickle and the value.
///
/// The state pickle is the record's tail: protocol 2/3 header, one of the int opcodes
/// `K` (1 byte), `M` (2), `J` (4), then `STOP`. Records written by Python (including
/// the ones the stock server writes when it resolves a conflict) and by us all fit.
pub fn parse_counter(rec: &[u8]) -> Option<(usize, i64)> {
    let n = rec.len();
    if n < 6 || rec[n - 1] != b'.' {
        return None;
    }
    for (op, width) in [(b'J', 4), (b'M', 2), (b'K', 1)] {
        let Some(start) = n.checked_sub(4 + width) else {
            continue;
        };
        let head = &rec[start..start + 3];
        if head[0] == 0x80
            && (head[1] == 2 || head[1] == 3)
            && head[2] == op
            && start > 0
            && rec[start - 1] == b'.'
        {
            let b = &rec[start + 3..n - 1];
            let value = match width {
                1 => b[0] as i64,
                2 => u16::from_le_bytes([b[0], b[1]]) as i64,
                _ => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            };
            return Some((start, value));
        }
    }
    None
}

/// A counter record with the class pickle of `rec` and the state `value`.
pub fn counter_record(rec: &[u8], class_len: usize, value: i64) -> Bytes {
    let mut out = Vec::with_capacity(class_len + 8);
    out.extend_from_slice(&rec[..class_len]);
    out.extend_from_slice(&[0x80, 3, b'J']);
    out.extend_from_slice(&(value as i32).to_le_bytes());
    out.push(b'.');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASS: &[u8] = b"\x80\x03cBTrees.Length\nLength\nq\x00.";

    #[test]
    fn counters_round_trip() {
        let rec = [CLASS, b"\x80\x03K\x05."].concat();
        assert_eq!(parse_counter(&rec), Some((CLASS.len(), 5)));
        let next = counter_record(&rec, CLASS.len(), 70_000);
        assert_eq!(parse_counter(&next), Some((CLASS.len(), 70_000)));
        let m = [CLASS, b"\x80\x03M\x00\x01."].concat();
        assert_eq!(parse_counter(&m), Some((CLASS.len(), 256)));
        assert_eq!(parse_counter(b"garbage."), None);
    }

    #[test]
    fn item_picks_stay_in_ranges() {
        let meta = Meta {
            max_oid: 100,
            item_ranges: vec![[10, 12], [50, 50]],
            counters: vec![],
            item_template: String::new(),
            template: vec![0x00, 0x11, 0x22, 0x33],
            payload_offset: 1,
            payload_len: 2,
        };
        let mut rng = Rng::new(3);
        let picked = meta.distinct_items(10, &mut rng);
        assert_eq!(picked.len(), 4);
        assert!(picked.iter().all(|o| (10..=12).contains(&o.0) || o.0 == 50));
        let rec = meta.new_item_record(&mut rng);
        assert_eq!((rec[0], rec[3], rec.len()), (0x00, 0x33, 4));
    }
}
