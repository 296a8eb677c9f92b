//! Native conflict resolution of the BTrees classes, with exactly the result of their
//! Python `_p_resolveConflict` as ZODB's `tryToResolveConflict` runs it (zeors never runs
//! Python).
//!
//! [`resolve`] takes three full records (class pickle then state pickle, as stored in
//! `Data.fs` and sent by `storea`): the revision the transaction started from (`old`),
//! the one committed since (`committed`) and the transaction's own (`new`). It answers
//! [`Resolution::Resolved`] with the record to store instead of `new`,
//! [`Resolution::Conflict`] where Python refuses, or [`Resolution::NotHandled`] where the
//! answer is not known here; then the conflict goes back to the ZEO client, which
//! resolves it with the real classes. That is always safe, so this crate returns it
//! whenever in doubt, and never a result Python would not produce.
//!
//! # Handled
//!
//! - Buckets and sets of every family BTrees 6.5 ships ([`family::FAMILIES`]: `IO`,
//!   `II`, `IF`, `IU`, `UO`, `UU`, `UF`, `UI`, `LO`, `LL`, `LF`, `LQ`, `QO`, `QQ`, `QF`,
//!   `QL`, `OO`, `OI`, `OU`, `OL`, `OQ` and `fs`), by class name
//!   `BTrees.<F>BTree.<F>{Bucket,Set}` (or the old `BTrees._<F>BTree` module): the C
//!   `bucket_merge` step by step ([`merge`]), same comparisons in the same order, same
//!   refusals with the same `BTreesConflictError` positions and reason codes (the same key
//!   changed on both sides, inserted on both sides, deleted on one side and changed on
//!   the other, deleted on both, the first key deleted, a bucket emptied by a side or by
//!   the merge, a changed next-bucket pointer — a split).
//! - `BTree` and `TreeSet` of every family in the one case Python resolves them: a tree
//!   whose single bucket is inline in its own state (or empty); any other tree state is
//!   refused as Python refuses it (reason 11).
//! - `BTrees.Length.Length`: `committed + new - old`, ints and floats as Python adds
//!   them.
//!
//! Keys and values are modelled as Python objects where the flavour stores objects
//! (`None`, `bool`, `int` up to 128 bits, `float`, `str`, `bytes`, tuples, lists, dicts
//! and persistent references, with Python's comparison rules, including the ones that
//! raise: `'a' < 1`, `None < None`, dicts, references to different objects), and as the
//! C types the other flavours store (ints of the family's width, single-precision
//! floats, the `fs` family's 2- and 6-byte strings).
//!
//! # Not handled, and why
//!
//! - [`NotHandled::Class`]: records of any other class (their `_p_resolveConflict`, if
//!   any, is application code).
//! - [`NotHandled::Pickle`]: a record holding what the model above does not cover —
//!   instances of non-persistent classes (`datetime`, `DateTime`, `Decimal`, sets, ...;
//!   their comparison is their own code), ints beyond 128 bits, strings with lone
//!   surrogates, a list or dict shared by two places of a state (Python's pickler would
//!   keep the sharing), persistent ids in forms ZODB does not write, and pickles
//!   zodbpickle itself refuses (protocol 4 and 5, non-ASCII Python 2 strings) or whose
//!   protocol-0 text forms CPython may parse differently.
//! - [`NotHandled::Undecidable`]: the outcome depends on what only the client knows:
//!   two next-bucket references that differ only in the spelling of their class (Python
//!   compares the imported classes by identity), or a `Length` sum beyond 128 bits.
//!
//! Persistent references are written back exactly as the records spelled them. (The
//! stock server, lacking an application's class, would rewrite `(oid, Class)` as
//! `(oid, ('module', 'Class'))`; both load alike.) The resolved record is the new
//! record's class pickle followed by the resolved state pickled with protocol 3.

pub mod decode;
pub mod encode;
pub mod family;
pub mod merge;
pub mod object;

use decode::Factory;
use family::{Family, FAMILIES};
pub use merge::Refusal;
use merge::Stop;
use object::Object;

/// What [`resolve`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The record to store in place of `new`.
    Resolved(Vec<u8>),
    /// Python refuses: the client gets a `ConflictError`.
    Conflict(Refusal),
    /// Not decided here: the conflict goes back to the client.
    NotHandled(NotHandled),
}

/// Why a conflict is left to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHandled {
    /// The record's class is not a BTrees bucket, set, tree, tree set or `Length`.
    Class,
    /// A record holds pickle content outside what is modelled.
    Pickle(&'static str),
    /// Python's outcome depends on what is not known here.
    Undecidable(&'static str),
}

/// The classes this crate resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    Bucket(&'static Family),
    Set(&'static Family),
    Tree(&'static Family),
    TreeSet(&'static Family),
    Length,
}

fn handled(module: &str, name: &str) -> Option<Handled> {
    if module == "BTrees.Length" && name == "Length" {
        return Some(Handled::Length);
    }
    let family = module
        .strip_prefix("BTrees.")
        .map(|m| m.strip_prefix('_').unwrap_or(m))
        .and_then(|m| m.strip_suffix("BTree"))?;
    let family = FAMILIES.iter().find(|f| f.prefix == family)?;
    let kind = name.strip_prefix(family.prefix)?;
    Some(match kind {
        "Bucket" => Handled::Bucket(family),
        "Set" => Handled::Set(family),
        "BTree" => Handled::Tree(family),
        "TreeSet" => Handled::TreeSet(family),
        _ => return None,
    })
}

/// Whether [`resolve`] may resolve conflicts of this record's class: a cheap look at the
/// class pickle only, so that a server can skip loading the old and committed records
/// for every other class.
pub fn handles(record: &[u8]) -> bool {
    decode::class_of(record).is_ok_and(|c| handled(&c.module, &c.name).is_some())
}

/// Resolves a conflict on one object as `ZODB.ConflictResolution.tryToResolveConflict`
/// with the real BTrees classes would. See the crate documentation.
pub fn resolve(old: &[u8], committed: &[u8], new: &[u8]) -> Resolution {
    let class = match decode::class_of(new) {
        Ok(class) => class,
        Err(_) => return Resolution::NotHandled(NotHandled::Class),
    };
    let Some(kind) = handled(&class.module, &class.name) else {
        return Resolution::NotHandled(NotHandled::Class);
    };
    // The order in which Python's factory first meets each persistent id: the new
    // state, then the old one, then the committed one.
    let mut factory = Factory::default();
    let mut read = |record: &[u8]| decode::record(record, &mut factory).map(|r| r.state);
    let states = match (|| Ok::<_, NotHandled>([read(new)?, read(old)?, read(committed)?]))() {
        Ok([new, old, committed]) => [old, committed, new],
        Err(why) => return Resolution::NotHandled(why),
    };
    // `None is equivalent to empty, for BTrees`.
    let bucket_states = |states: [Object; 3]| {
        states.map(|s| match s {
            Object::None => None,
            s => Some(s),
        })
    };
    let resolved = match kind {
        Handled::Bucket(f) => merge::resolve_bucket(f, true, bucket_states(states)),
        Handled::Set(f) => merge::resolve_bucket(f, false, bucket_states(states)),
        Handled::Tree(f) => merge::resolve_tree(f, true, states),
        Handled::TreeSet(f) => merge::resolve_tree(f, false, states),
        Handled::Length => merge::resolve_length(states),
    };
    match resolved {
        Ok(state) => Resolution::Resolved(encode::record(&new[..class.end], &state)),
        Err(Stop::Refused(refusal)) => Resolution::Conflict(refusal),
        Err(Stop::Undecidable(why)) => Resolution::NotHandled(NotHandled::Undecidable(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUCKET: &[u8] = b"\x80\x03cBTrees.OIBTree\nOIBucket\nq\x00.";

    fn record(class: &[u8], state: &[u8]) -> Vec<u8> {
        [class, state].concat()
    }

    #[test]
    fn classes() {
        assert_eq!(
            handled("BTrees.OOBTree", "OOBucket"),
            Some(Handled::Bucket(&FAMILIES[16]))
        );
        assert!(matches!(
            handled("BTrees._IIBTree", "IITreeSet"),
            Some(Handled::TreeSet(_))
        ));
        assert!(matches!(
            handled("BTrees.fsBTree", "fsBucket"),
            Some(Handled::Bucket(_))
        ));
        assert_eq!(handled("BTrees.Length", "Length"), Some(Handled::Length));
        assert_eq!(handled("BTrees.OOBTree", "IIBucket"), None);
        assert_eq!(handled("BTrees.OOBTree", "OOBucketPy"), None);
        assert_eq!(handled("persistent.mapping", "PersistentMapping"), None);
        assert!(handles(BUCKET));
        assert!(!handles(
            b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.N."
        ));
        assert!(!handles(b""));
    }

    #[test]
    fn resolves_a_bucket_record() {
        // {'a': 1, 'b': 2}; committed sets b to 3, new inserts c: 4.
        let old = record(
            BUCKET,
            b"\x80\x03(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02t\x85.",
        );
        let committed = record(
            BUCKET,
            b"\x80\x03(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x03t\x85.",
        );
        let new = record(
            BUCKET,
            b"\x80\x03(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02X\x01\x00\x00\x00cK\x04t\x85.",
        );
        let Resolution::Resolved(r) = resolve(&old, &committed, &new) else {
            panic!("{:?}", resolve(&old, &committed, &new))
        };
        assert_eq!(
            r,
            record(
                BUCKET,
                b"\x80\x03(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x03X\x01\x00\x00\x00cK\x04t\x85."
            )
        );
        // Both change b.
        let both = record(
            BUCKET,
            b"\x80\x03(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x05t\x85.",
        );
        assert_eq!(
            resolve(&old, &committed, &both),
            Resolution::Conflict(Refusal::BTrees {
                p1: 2,
                p2: 2,
                p3: 2,
                reason: 1
            })
        );
        assert_eq!(
            resolve(&old, &committed, b"\x80\x03cfoo\nBar\n.N."),
            Resolution::NotHandled(NotHandled::Class)
        );
    }

    /// Records as ZODB writes them: an OOBucket with references (plain, weak), a float,
    /// a list holding a dict, a long int and a next bucket; a one-bucket OOBTree; an IFSet;
    /// a Length.
    const SAMPLES: [&[u8]; 4] = [
        b"\x80\x03cBTrees.OOBTree\nOOBucket\nq\x00.\x80\x03(X\x01\x00\x00\x00aq\x01C\x08\x00\x00\x00\x00\x00\x00\x00\x05q\x02cpersistent.mapping\nPersistentMapping\nq\x03\x86q\x04QX\x01\x00\x00\x00bq\x05K\x02\x86q\x06G?\xf8\x00\x00\x00\x00\x00\x00N\x86q\x07X\x01\x00\x00\x00cq\x08]q\t(K\x01}q\nX\x01\x00\x00\x00xq\x0b]q\x0c(X\x01\x00\x00\x00wq\rC\x08\x00\x00\x00\x00\x00\x00\x00\x06q\x0e\x85q\x0feQseX\x01\x00\x00\x00dq\x10\x8a\t\x00\x00\x00\x00\x00\x00\x00\x00@tq\x11C\x08\x00\x00\x00\x00\x00\x00\x00\tq\x12h\x00\x86q\x13Q\x86q\x14.",
        b"\x80\x03cBTrees.OOBTree\nOOBTree\nq\x00.\x80\x03(X\x01\x00\x00\x00kq\x01K\x01X\x01\x00\x00\x00lq\x02X\x02\x00\x00\x00\xc3\xa9q\x03tq\x04\x85q\x05\x85q\x06\x85q\x07.",
        b"\x80\x03cBTrees.IFBTree\nIFSet\nq\x00.\x80\x03K\x01K\x05J\xfd\xff\xff\xff\x87q\x01\x85q\x02.",
        b"\x80\x03cBTrees.Length\nLength\nq\x00.\x80\x03\x8a\x06\x00\x00\x00\x00\x00\x01.",
    ];

    #[test]
    fn damaged_records_never_panic() {
        // A deterministic fuzz: records a client could send are damaged byte by byte,
        // cut, and spliced with opcodes; whatever comes out must be a clean answer, and a
        // resolved record must read back.
        let mut x: u64 = 0x5eed;
        let mut rand = |n: usize| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize % n
        };
        let alphabet = b"().0NKJMGXCBhqQRbt]}aeus\x80\x85\x86\x87\x88\x89\x8a\x03\x02";
        for _ in 0..10_000 {
            let base = SAMPLES[rand(SAMPLES.len())];
            let mut three: Vec<Vec<u8>> = (0..3).map(|_| base.to_vec()).collect();
            for rec in three.iter_mut() {
                for _ in 0..rand(3) {
                    if rec.is_empty() {
                        break;
                    }
                    let at = rand(rec.len());
                    match rand(4) {
                        0 => rec[at] = alphabet[rand(alphabet.len())],
                        1 => rec[at] = rand(256) as u8,
                        2 => rec.truncate(at),
                        _ => rec.insert(at, alphabet[rand(alphabet.len())]),
                    }
                }
            }
            let r = resolve(&three[0], &three[1], &three[2]);
            assert_eq!(r, resolve(&three[0], &three[1], &three[2]));
            if let Resolution::Resolved(record) = r {
                let mut factory = Factory::default();
                assert!(decode::record(&record, &mut factory).is_ok());
            }
        }
    }

    #[test]
    fn length() {
        let class = b"\x80\x03cBTrees.Length\nLength\nq\x00.";
        let rec = |n: u8| record(class, &[0x80, 3, b'K', n, b'.']);
        assert_eq!(
            resolve(&rec(5), &rec(7), &rec(6)),
            Resolution::Resolved(rec(8))
        );
    }
}
