//! Property tests ("fuzzing") of everything that reads untrusted bytes: the record-pickle
//! reference scanner and the Data.fs reader (open, loads, history, iteration, undo log,
//! the strict checker). Arbitrary and mutated inputs must give errors, never a panic or a
//! hang. And what must hold of a damaged Data.fs beyond "no panic":
//! - **cut anywhere** (a torn tail): it opens, read-only or writable (which truncates), and
//!   serves exactly the transactions completed before the cut;
//! - **damaged lengths and pointers** (a transaction's length, its trailer, its metadata
//!   lengths; a data record's `prev`, `tloc`, version and pickle lengths, back pointer):
//!   it is refused (at open or at each read), or what it serves is what the undamaged file,
//!   or a prefix of it, serves — never another object's data, another revision, or a
//!   revision that was not there. The rest of the bytes are data the format cannot check,
//!   having no checksums (Python's neither): a pickle, a transaction's user, description
//!   and extension, but also the ids and status in the headers — an oid changed in the
//!   first record of an object reads as a record of another object, a status `' '`
//!   changed to `'u'` as an undone transaction; those bytes are out of this property.
//!   So is damage that makes another well-formed transaction: a
//!   pickle or metadata length grown by exactly the size of the records after it in its
//!   transaction reads, as in Python, as a longer pickle (or user name) and fewer records,
//!   which nothing in the format can tell from the original (random seeds drew such a fit
//!   in one run of three); a `prev` pointer damaged to 0, which reads as the object's
//!   first revision, and a back pointer damaged to 0, as an undone creation. A case whose flips make a transaction read as another well-formed
//!   one is only read for panics, and counted.

use super::history::{obj, record, undo};
use super::*;
use crate::iter::RecordIter;
use crate::scan;
use proptest::prelude::*;
use zodb::refs;

/// Bytes biased towards pickle opcodes, so the VM gets past the first byte.
fn pickle_like() -> impl Strategy<Value = Vec<u8>> {
    let op = prop_oneof![
        3 => prop::sample::select(
            b"().0123NabcdeghjlpqrstuQPCKJMBXUTV]}\x80\x85\x86\x87\x88\x89\x8a\x8c\x8f\x90\x91\x93\x94\x95\x81\x92\x82".to_vec()
        ),
        1 => any::<u8>(),
    ];
    prop::collection::vec(op, 0..200)
}

/// A small valid Data.fs with the record kinds that matter: data, back pointers (undo),
/// an undone creation, several revisions, references between objects.
fn sample_file() -> Vec<u8> {
    let (sim, core) = sim_storage(writable());
    let t1 = commit(
        &core,
        &txn(
            1,
            vec![
                store(0, Tid::ZERO, &obj(&[1, 2], "root")),
                store(
                    1,
                    Tid::ZERO,
                    &record("BTrees.OOBTree", "OOBucket", &[], "b"),
                ),
                store(2, Tid::ZERO, &obj(&[1], "two")),
            ],
        ),
    );
    let t2 = commit(
        &core,
        &txn(
            2,
            vec![store(
                1,
                t1,
                &record("BTrees.OOBTree", "OOBucket", &[2], "b2"),
            )],
        ),
    );
    core.vote(&txn(3, vec![undo(t2)])).unwrap();
    core.finish(3).unwrap();
    let t4 = commit(&core, &txn(4, vec![store(3, Tid::ZERO, &obj(&[], "new"))]));
    core.vote(&txn(5, vec![undo(t4)])).unwrap();
    core.finish(5).unwrap();
    sim.contents()
}

/// Runs every reader over `bytes`; only panics count as failures.
fn exercise(bytes: Vec<u8>) {
    let _ = scan::verify(&fsio::sim::SimFile::with_contents(bytes.clone()));
    let sim = Arc::new(fsio::sim::SimFile::with_contents(bytes));
    let Ok(core) = FileStorageCore::open_io(sim, "fuzz", read_only()) else {
        return;
    };
    let oids: Vec<Oid> = core.oids().into_iter().take(50).collect();
    for oid in oids {
        let _ = core.load(oid);
        let _ = core.load_before(oid, Tid::MAX);
        let _ = core.load_before(oid, Tid(1 << 60));
        if let Ok(h) = core.history(oid, 100) {
            for e in h {
                let _ = core.load_serial(oid, e.tid);
            }
        }
        let _ = core.record_iternext(Some(oid));
    }
    let _ = core.undo_log(0, 100, None);
    let _ = core.recent_transactions(100);
    let _ = core.invalidations_since(Tid(1));
    for (start, stop) in [
        (None, None),
        (Some(Tid(1 << 58)), None),
        (Some(Tid::MAX), None),
    ] {
        let Ok(mut it) = core.iterator(start, stop) else {
            continue;
        };
        for _ in 0..100 {
            match it.next_txn() {
                Ok(Some((t, _))) => {
                    let mut recs = RecordIter::new(it.view().clone(), t);
                    for _ in 0..100 {
                        match recs.next_record() {
                            Ok(Some(r)) => {
                                if let Some(d) = r.data {
                                    let _ = refs::references(&d);
                                }
                            }
                            _ => break,
                        }
                    }
                }
                _ => break,
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    #[test]
    fn reference_scanner_never_panics(p in pickle_like()) {
        let _ = refs::references(&p);
        let _ = refs::class_name(&p);
    }

    #[test]
    fn reference_scanner_on_arbitrary_bytes(p in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = refs::references(&p);
        let _ = refs::class_name(&p);
    }

    #[test]
    fn reader_survives_mutated_files(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = sample_file();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        if truncate {
            let n = cut.index(bytes.len());
            bytes.truncate(n.max(4));
        }
        exercise(bytes);
    }

    #[test]
    fn reader_survives_arbitrary_files(tail in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = b"FS30".to_vec();
        bytes.extend(tail);
        exercise(bytes);
    }
}

/// Every question a client can ask about the sample file's objects, with its answer
/// (`Err` for any error): loads, history, every revision by serial and by `loadBefore`
/// around each tid, the undo log, and iteration with every record.
fn answers(
    core: &FileStorageCore,
    tids: &[Tid],
) -> std::collections::BTreeMap<String, Result<String, ()>> {
    let mut a = std::collections::BTreeMap::new();
    let mut put = |q: String, r: Result<String, ()>| {
        a.insert(q, r);
    };
    for o in 0..5u64 {
        let oid = Oid(o);
        put(
            format!("load {o}"),
            core.load(oid).map(|r| format!("{r:?}")).map_err(|_| ()),
        );
        put(
            format!("history {o}"),
            core.history(oid, 100)
                .map(|h| {
                    format!(
                        "{:?}",
                        h.iter().map(|e| (e.tid, e.size)).collect::<Vec<_>>()
                    )
                })
                .map_err(|_| ()),
        );
        for &t in tids.iter().chain([Tid::MAX].iter()) {
            put(
                format!("serial {o} {t:?}"),
                core.load_serial(oid, t)
                    .map(|r| format!("{r:?}"))
                    .map_err(|_| ()),
            );
            for before in [t, Tid(t.0.saturating_add(1))] {
                put(
                    format!("before {o} {before:?}"),
                    core.load_before(oid, before)
                        .map(|r| format!("{:?}", r.revision))
                        .map_err(|_| ()),
                );
            }
        }
    }
    put(
        "undo log".into(),
        core.undo_log(0, 100, None)
            .map(|l| format!("{:?}", l.iter().map(|e| e.id()).collect::<Vec<_>>()))
            .map_err(|_| ()),
    );
    let iteration = core
        .iterator(None, None)
        .map_err(|_| ())
        .and_then(|mut it| {
            let mut out = String::new();
            while let Some((t, info)) = it.next_txn().map_err(|_| ())? {
                out += &format!("{:?} {:?}:", info.tid, info.status);
                let mut recs = RecordIter::new(it.view().clone(), t);
                while let Some(r) = recs.next_record().map_err(|_| ())? {
                    out += &format!(" {:?}={:?}", r.oid, r.data);
                }
                out += "\n";
            }
            Ok(out)
        });
    put("iteration".into(), iteration);
    a
}

/// The sample file after each of its transactions (`[0]`: empty), with their tids.
fn sample_prefixes() -> (Vec<Vec<u8>>, Vec<Tid>) {
    let bytes = sample_file();
    let mut ends = vec![4usize];
    let mut tids = Vec::new();
    let mut pos = 4usize;
    while pos < bytes.len() {
        let h = crate::format::TxnHeader::parse(
            bytes[pos..pos + crate::format::TXN_HEADER_LEN]
                .try_into()
                .unwrap(),
        );
        tids.push(h.tid);
        pos += usize::try_from(h.tlen).unwrap() + 8;
        ends.push(pos);
    }
    (ends.iter().map(|&e| bytes[..e].to_vec()).collect(), tids)
}

/// The positions of the sample file's lengths and pointers: a transaction's length (and
/// its trailer) and metadata lengths, a data record's `prev`, `tloc`, version length,
/// pickle length and back pointer (see the module docs for what is left out).
fn structure_bytes(bytes: &[u8]) -> Vec<usize> {
    use crate::format::{DataHeader, TxnHeader, DATA_HEADER_LEN, TXN_HEADER_LEN};
    let mut out = Vec::new();
    let mut pos = 4usize;
    while pos < bytes.len() {
        let h = TxnHeader::parse(bytes[pos..pos + TXN_HEADER_LEN].try_into().unwrap());
        // tid 0..8, tlen 8..16, status 16, ulen/dlen/elen 17..23
        out.extend(pos + 8..pos + 16);
        out.extend(pos + 17..pos + TXN_HEADER_LEN);
        let tend = pos + usize::try_from(h.tlen).unwrap();
        let mut p = pos + TXN_HEADER_LEN + h.meta_len();
        while p < tend {
            let d = DataHeader::parse(bytes[p..p + DATA_HEADER_LEN].try_into().unwrap());
            // oid 0..8, tid 8..16, prev 16..24, tloc 24..32, vlen 32..34, plen 34..42
            out.extend(p + 16..p + DATA_HEADER_LEN);
            if d.plen == 0 {
                out.extend(p + DATA_HEADER_LEN..p + DATA_HEADER_LEN + 8); // back pointer
            }
            p += usize::try_from(d.record_len().unwrap()).unwrap();
        }
        out.extend(tend..tend + 8);
        pos = tend + 8;
    }
    out
}

/// `bytes` with each `(position, value)` of `flips` written.
fn with_flips(bytes: &[u8], flips: &[(usize, u8)]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(i, v) in flips {
        out[i] = v;
    }
    out
}

/// How the transaction at `tpos` of `bytes` reads, if it reads as a well-formed one: its
/// metadata length and its records' `(start, pickle length)` (a record without data and
/// one with an 8-byte pickle are the same size), tiling it exactly up to a trailer
/// that repeats its length, each naming this transaction.
fn tiling(bytes: &[u8], tpos: usize) -> Option<(usize, Vec<(usize, u64)>)> {
    use crate::format::{DataHeader, TxnHeader, DATA_HEADER_LEN, TXN_HEADER_LEN};
    let h = TxnHeader::parse(bytes.get(tpos..tpos + TXN_HEADER_LEN)?.try_into().ok()?);
    let tend = tpos.checked_add(usize::try_from(h.tlen).ok()?)?;
    let trailer = bytes.get(tend..tend.checked_add(8)?)?;
    if u64::from_be_bytes(trailer.try_into().ok()?) != h.tlen {
        return None;
    }
    let mut p = tpos + TXN_HEADER_LEN + h.meta_len();
    let mut records = Vec::new();
    while p < tend {
        let d = DataHeader::parse(bytes.get(p..p + DATA_HEADER_LEN)?.try_into().ok()?);
        let len = d.record_len()?;
        let next = p.checked_add(usize::try_from(len).ok()?)?;
        if d.vlen != 0 || d.tloc != tpos as u64 || d.tid != h.tid || next > tend {
            return None;
        }
        records.push((p, d.plen));
        p = next;
    }
    (p == tend).then_some((h.meta_len(), records))
}

/// A transaction's position, its end (after the trailer) and its records' `(start,
/// pickle length)`.
type TxnLayout = (usize, usize, Vec<(usize, u64)>);

/// The well-formed transactions of `bytes` from the start, as [`tiling`] reads them.
fn transactions(bytes: &[u8]) -> Vec<TxnLayout> {
    let mut out = Vec::new();
    let mut tpos = 4usize;
    while let Some((_, records)) = tiling(bytes, tpos) {
        let h = crate::format::TxnHeader::parse(
            bytes[tpos..tpos + crate::format::TXN_HEADER_LEN]
                .try_into()
                .unwrap(),
        );
        let next = tpos + usize::try_from(h.tlen).unwrap() + 8;
        out.push((tpos, next, records));
        tpos = next;
    }
    out
}

/// What the undamaged file cut after each transaction answers (see [`answers`]).
fn prefix_answers(
    prefixes: &[Vec<u8>],
    tids: &[Tid],
) -> Vec<std::collections::BTreeMap<String, Result<String, ()>>> {
    prefixes
        .iter()
        .map(|p| answers(&reopen(p.clone(), read_only()).1, tids))
        .collect()
}

/// Whether `flips` make a transaction of `bytes` read as another well-formed transaction:
/// a pickle or metadata length grown by exactly the records after it, or a `prev` or back
/// pointer made 0. The format has no checksum to tell such a transaction from the original (see
/// the module docs).
fn makes_another_transaction(bytes: &[u8], flips: &[(usize, u8)]) -> bool {
    let damaged = with_flips(bytes, flips);
    for (tpos, next, records) in transactions(bytes) {
        let touched = flips.iter().any(|&(i, _)| (tpos..next).contains(&i));
        if touched
            && tiling(&damaged, tpos) != tiling(bytes, tpos)
            && tiling(&damaged, tpos).is_some()
        {
            return true;
        }
        // A `prev` pointer damaged to 0 reads as the object's first revision, a back
        // pointer damaged to 0 as an undone creation.
        let u64_at = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        let zeroed = |at: usize| u64_at(bytes, at) != 0 && u64_at(&damaged, at) == 0;
        if records
            .iter()
            .any(|&(p, plen)| zeroed(p + 16) || (plen == 0 && zeroed(p + 42)))
        {
            return true;
        }
    }
    false
}

/// Whether every answer `damaged` gives is the answer of one prefix of the file.
fn consistent_with_a_prefix(
    damaged: &std::collections::BTreeMap<String, Result<String, ()>>,
    prefixes: &[std::collections::BTreeMap<String, Result<String, ()>>],
) -> Result<(), String> {
    let fits = |p: &std::collections::BTreeMap<String, Result<String, ()>>| {
        damaged
            .iter()
            .all(|(q, a)| a.is_err() || p.get(q) == Some(a))
    };
    if prefixes.iter().any(fits) {
        return Ok(());
    }
    let full = prefixes.last().unwrap();
    let wrong: Vec<String> = damaged
        .iter()
        .filter(|(q, a)| a.is_ok() && full.get(*q) != Some(*a))
        .take(5)
        .map(|(q, a)| format!("{q}: {a:?} (undamaged: {:?})", full.get(q)))
        .collect();
    Err(format!("answers no prefix of the file gives: {wrong:#?}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    #[test]
    fn a_file_cut_anywhere_serves_the_transactions_before_the_cut(cut in any::<prop::sample::Index>()) {
        let (prefixes, tids) = sample_prefixes();
        let full = prefixes.last().unwrap().clone();
        let cut = 4 + cut.index(full.len() - 4 + 1);
        let complete = prefixes.iter().rposition(|p| p.len() <= cut).unwrap();
        let want = answers(&reopen(prefixes[complete].clone(), read_only()).1, &tids);
        let bytes = full[..cut].to_vec();
        let (_, ro) = reopen(bytes.clone(), read_only());
        prop_assert_eq!(&answers(&ro, &tids), &want, "read-only, cut at {}", cut);
        let (sim, rw) = reopen(bytes, writable());
        prop_assert_eq!(&answers(&rw, &tids), &want, "writable, cut at {}", cut);
        prop_assert_eq!(sim.contents(), prefixes[complete].clone(), "the tail was not cut");
    }

}

/// Damaged lengths and pointers: refused, or read as before (see the module docs). The
/// share of damaged files that open and answer is stated, and must not fall (the property
/// would then hold of refusals only).
#[test]
fn damaged_lengths_and_pointers_are_refused_or_read_as_before() {
    use proptest::test_runner::{Config, TestRunner};
    let (prefixes, tids) = sample_prefixes();
    let clean = prefix_answers(&prefixes, &tids);
    let full = prefixes.last().unwrap().clone();
    let structure = structure_bytes(&full);
    let (opened, answered) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let valid = std::cell::Cell::new(0);
    let cases = 1000;
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
    .run(
        &prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        |flips| {
            let flips: Vec<(usize, u8)> = flips
                .into_iter()
                .map(|(at, v)| (structure[at.index(structure.len())], v))
                .collect();
            let bytes = with_flips(&full, &flips);
            if makes_another_transaction(&full, &flips) {
                valid.set(valid.get() + 1);
                exercise(bytes);
                return Ok(());
            }
            let sim = Arc::new(fsio::sim::SimFile::with_contents(bytes));
            if let Ok(core) = FileStorageCore::open_io(sim, "fuzz", read_only()) {
                opened.set(opened.get() + 1);
                let damaged = answers(&core, &tids);
                if damaged.values().filter(|a| a.is_ok()).count() > damaged.len() / 4 {
                    answered.set(answered.get() + 1);
                }
                consistent_with_a_prefix(&damaged, &clean).map_err(TestCaseError::fail)?;
            }
            Ok(())
        },
    )
    .unwrap();
    eprintln!(
        "damaged lengths and pointers: {} of {cases} files open, {} answer most questions, \
         {} make another well-formed transaction",
        opened.get(),
        answered.get(),
        valid.get()
    );
    // An exact fit is a rare draw; if it were common the property would test little.
    assert!(valid.get() <= cases / 20, "{} valid", valid.get());
    assert!(answered.get() >= cases / 10, "{} answered", answered.get());
}

/// Every growth of every record's pickle length (its low byte), exhaustively: refused, or
/// read as before, unless the record then swallows exactly the records after it (another
/// well-formed transaction, see the module docs), which is counted.
#[test]
fn every_grown_pickle_length_is_refused_or_an_exact_fit() {
    let (prefixes, tids) = sample_prefixes();
    let clean = prefix_answers(&prefixes, &tids);
    let full = prefixes.last().unwrap().clone();
    // The last byte of each pickle length (records without data have none to grow).
    let plens: Vec<(usize, u64)> = transactions(&full)
        .into_iter()
        .flat_map(|(_, _, records)| records)
        .filter(|&(_, plen)| plen > 0)
        .map(|(p, plen)| (p + crate::format::DATA_HEADER_LEN - 1, plen))
        .collect();
    assert!(plens.len() >= 5, "{plens:?}");
    let (mut opened, mut fits) = (0, 0);
    for &(at, plen) in &plens {
        for grow in 1..=255u64 {
            let Ok(v) = u8::try_from((plen & 0xff) + grow) else {
                break;
            };
            if makes_another_transaction(&full, &[(at, v)]) {
                fits += 1;
                continue;
            }
            let sim = Arc::new(fsio::sim::SimFile::with_contents(with_flips(
                &full,
                &[(at, v)],
            )));
            if let Ok(core) = FileStorageCore::open_io(sim, "fuzz", read_only()) {
                opened += 1;
                let damaged = answers(&core, &tids);
                if let Err(e) = consistent_with_a_prefix(&damaged, &clean) {
                    panic!("plen at {at} grown by {grow}: {e}");
                }
            }
        }
    }
    eprintln!("grown pickle lengths: {opened} damaged files opened, {fits} exact fits");
    // The sample has records followed by others in their transaction: fits exist.
    assert!(fits >= 1, "no exact fit among the growths");
}

#[test]
fn the_sample_file_is_valid() {
    let bytes = sample_file();
    scan::verify(&fsio::sim::SimFile::with_contents(bytes.clone())).unwrap();
    exercise(bytes);
}
