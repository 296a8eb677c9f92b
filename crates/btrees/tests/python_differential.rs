//! Differential test against the real `BTrees` package from PyPI: thousands of generated
//! three-way states per run (every family's buckets, sets, trees and tree sets, and
//! `Length`), resolved by ZODB's own `tryToResolveConflict` with the C BTrees classes and
//! by [`btrees::resolve`]; the outcomes must agree (see `python/btrees_cases.py` for what
//! agreeing means). A negative control then feeds the same checker deliberately wrong
//! answers and requires each of them, and nothing else, to be caught.
//!
//! Needs a Python with ZODB and BTrees: `$ZEORS_PYTHON`, else `<workspace>/.venv/bin/python`
//! (which `scripts/test.sh` creates). `BTREES_DIFF_SEED` and `BTREES_DIFF_SCALE` draw
//! another or a larger set of cases, for a long run:
//! `BTREES_DIFF_SEED=7 BTREES_DIFF_SCALE=100 cargo test -p btrees --test python_differential`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use btrees::object::Object;
use btrees::{NotHandled, Refusal, Resolution};

/// Cases per family and class kind (times 14, 9, 5 and 4 for buckets, sets, trees and
/// tree sets), and a fixed seed: the run is the same every time.
const SCALE: u32 = 12;
const SEED: u32 = 20;

fn setting(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ZEORS_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!(
        "this test needs Python with ZODB and BTrees: run scripts/test.sh (it creates .venv \
         with the test dependencies), or set ZEORS_PYTHON to a python that has them"
    );
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/btrees_cases.py")
}

/// Runs the script; returns whether it succeeded and its stdout. Panics with stderr if
/// Python failed other than by exiting with 1 (the checker's "disagreement").
fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (bool, String) {
    let mut cmd = Command::new(python());
    // The cases do not depend on it, but error texts and any set's order then do not
    // vary from run to run either.
    cmd.env("PYTHONHASHSEED", "0");
    cmd.arg(script());
    for a in args {
        cmd.arg(a);
    }
    let out = cmd.output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || (out.status.code() == Some(1) && stderr.is_empty()),
        "python failed: {stderr}\n{stdout}"
    );
    (out.status.success(), stdout)
}

struct Case {
    id: usize,
    label: String,
    old: Vec<u8>,
    committed: Vec<u8>,
    new: Vec<u8>,
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for byte in b {
        write!(s, "{byte:02x}").unwrap();
    }
    s
}

fn read_cases(dir: &Path) -> Vec<Case> {
    std::fs::read_to_string(dir.join("cases.tsv"))
        .expect("cases.tsv")
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            Case {
                id: f[0].parse().unwrap(),
                label: f[1].to_owned(),
                old: hex(f[3]),
                committed: hex(f[4]),
                new: hex(f[5]),
            }
        })
        .collect()
}

/// One line of the results file the checker reads.
fn result_line(id: usize, r: &Resolution) -> String {
    match r {
        Resolution::Resolved(record) => format!("{id}\tresolved\t{}", to_hex(record)),
        Resolution::Conflict(Refusal::BTrees { p1, p2, p3, reason }) => {
            format!("{id}\tbtrees\t{p1} {p2} {p3} {reason}")
        }
        Resolution::Conflict(Refusal::Error(e)) => format!("{id}\terror\t{e}"),
        Resolution::NotHandled(n) => {
            let (category, why) = match n {
                NotHandled::Class => ("class", ""),
                NotHandled::Pickle(why) => ("pickle", *why),
                NotHandled::Undecidable(why) => ("undecidable", *why),
            };
            format!("{id}\tnothandled\t{category}\t{why}")
        }
    }
}

fn write_results(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write results");
}

/// The checker's `mismatch <id> ...` lines, by id.
fn mismatched(stdout: &str) -> BTreeSet<usize> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("mismatch "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// A resolved state with its last item replaced or dropped: a wrong answer that still
/// loads, so only the comparison of states can catch it.
fn tampered_record(record: &[u8], drop_last: bool) -> Option<Vec<u8>> {
    let mut factory = btrees::decode::Factory::default();
    let decoded = btrees::decode::record(record, &mut factory).ok()?;
    let mut state = decoded.state;
    // The items tuple: the state's first element (buckets and sets), inside two more
    // tuples for trees.
    let items = match &mut state {
        Object::Tuple(parts) => match parts.first_mut()? {
            Object::Tuple(t) if t.len() == 1 && matches!(t[0], Object::Tuple(_)) => {
                match &mut t[0] {
                    Object::Tuple(b) => match b.first_mut()? {
                        Object::Tuple(items) => items,
                        _ => return None,
                    },
                    _ => return None,
                }
            }
            Object::Tuple(items) => items,
            _ => return None,
        },
        _ => return None,
    };
    if items.len() < 2 {
        return None;
    }
    if drop_last {
        // A mapping loses its last pair, a set its last two keys.
        items.truncate(items.len() - 2);
    } else {
        let last = items.last_mut()?;
        *last = match last {
            Object::Int(i) => Object::Int(*i ^ 1),
            _ => Object::Str("tampered".into()),
        };
    }
    Some(btrees::encode::record(&record[..decoded.class.end], &state))
}

#[test]
fn resolutions_match_python_btrees() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (seed, scale) = (
        setting("BTREES_DIFF_SEED", SEED),
        setting("BTREES_DIFF_SCALE", SCALE),
    );
    let (ok, out) = run(&[
        &"generate",
        &seed.to_string(),
        &scale.to_string(),
        &dir.path(),
    ]);
    assert!(ok, "generation failed: {out}");
    let generated = started.elapsed();
    let cases = read_cases(dir.path());

    let rust_started = Instant::now();
    let results: Vec<Resolution> = cases
        .iter()
        .map(|c| btrees::resolve(&c.old, &c.committed, &c.new))
        .collect();
    let rust_time = rust_started.elapsed();
    let lines: Vec<String> = cases
        .iter()
        .zip(&results)
        .map(|(c, r)| result_line(c.id, r))
        .collect();
    let results_path = dir.path().join("rust.tsv");
    write_results(&results_path, &lines);
    let (ok, report) = run(&[&"check", &dir.path(), &results_path]);
    println!("{report}");
    println!(
        "{} cases: Python generation and resolution {:.2?}, Rust resolution {:.2?}, total {:.2?}",
        cases.len(),
        generated,
        rust_time,
        started.elapsed()
    );
    assert!(ok, "Rust and Python disagree:\n{report}");
    assert!(mismatched(&report).is_empty());

    // Every family and class kind must have been both resolved and refused, and every
    // reason Python gives must have occurred, so that agreement means something.
    let mut counts: BTreeMap<String, [u32; 3]> = BTreeMap::new();
    for line in report.lines() {
        if let Some(rest) = line.strip_prefix("count ") {
            let f: Vec<&str> = rest.split(' ').collect();
            counts.insert(
                f[0].to_owned(),
                [
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                ],
            );
        }
    }
    let families = [
        "IO", "II", "IF", "IU", "UO", "UU", "UF", "UI", "LO", "LL", "LF", "LQ", "QO", "QQ", "QF",
        "QL", "OO", "OI", "OU", "OL", "OQ", "fs",
    ];
    for family in families {
        for kind in ["Bucket", "Set", "BTree", "TreeSet"] {
            let label = format!("{family}{kind}");
            let [resolved, refused, _] = counts[&label];
            assert!(resolved > 0 && refused > 0, "{label}: {:?}", counts[&label]);
        }
    }
    let [resolved, refused, _] = counts["Length"];
    assert!(resolved > 0 && refused > 0);
    let reasons: BTreeSet<u8> = report
        .lines()
        .find_map(|l| l.strip_prefix("reasons "))
        .unwrap()
        .split(' ')
        .map(|kv| kv.split(':').next().unwrap().parse().unwrap())
        .collect();
    // 10 (the merge emptied the bucket) cannot happen: BTrees' own code says so.
    let every: BTreeSet<u8> = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13].into();
    assert_eq!(reasons, every);
    // The not-handled cases are exactly the ones made outside the model, each in its
    // documented category (the checker enforces it case by case); all three occur.
    let categories: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[1] == "nothandled").then_some(f[2])
        })
        .collect();
    assert_eq!(categories, ["class", "pickle", "undecidable"].into());

    // Negative control: wrong answers of every kind must be caught, and only those.
    let mut tampered = lines.clone();
    let mut expected = BTreeSet::new();
    let mut want = |pred: &dyn Fn(&Case, &Resolution) -> bool, n: usize| -> Vec<usize> {
        let ids: Vec<usize> = cases
            .iter()
            .zip(&results)
            .filter(|(c, r)| pred(c, r) && !expected.contains(&c.id))
            .map(|(c, _)| c.id)
            .take(n)
            .collect();
        assert_eq!(ids.len(), n, "not enough cases for the negative control");
        expected.extend(&ids);
        ids
    };
    let resolved_bucket = |c: &Case, r: &Resolution| {
        c.label.ends_with("Bucket")
            && matches!(r, Resolution::Resolved(rec) if tampered_record(rec, true).is_some())
    };
    for id in want(&resolved_bucket, 4) {
        let Resolution::Resolved(rec) = &results[id] else {
            unreachable!()
        };
        tampered[id] = result_line(
            id,
            &Resolution::Resolved(tampered_record(rec, true).unwrap()),
        );
    }
    for id in want(&resolved_bucket, 4) {
        let Resolution::Resolved(rec) = &results[id] else {
            unreachable!()
        };
        tampered[id] = result_line(
            id,
            &Resolution::Resolved(tampered_record(rec, false).unwrap()),
        );
    }
    let btrees_refusal =
        |_: &Case, r: &Resolution| matches!(r, Resolution::Conflict(Refusal::BTrees { .. }));
    for id in want(&btrees_refusal, 3) {
        let Resolution::Conflict(Refusal::BTrees { p1, p2, p3, reason }) = results[id].clone()
        else {
            unreachable!()
        };
        let wrong = Refusal::BTrees {
            p1,
            p2,
            p3,
            reason: (reason + 1) % 14,
        };
        tampered[id] = result_line(id, &Resolution::Conflict(wrong));
    }
    for id in want(&btrees_refusal, 2) {
        // Refused, but "resolved" to the new record.
        tampered[id] = result_line(id, &Resolution::Resolved(cases[id].new.clone()));
    }
    let resolved = |_: &Case, r: &Resolution| matches!(r, Resolution::Resolved(_));
    for id in want(&resolved, 2) {
        tampered[id] = result_line(id, &Resolution::Conflict(Refusal::Error("wrong".into())));
    }
    for id in want(&resolved, 2) {
        tampered[id] = result_line(id, &Resolution::NotHandled(NotHandled::Pickle("wrong")));
    }
    let not_handled = |_: &Case, r: &Resolution| matches!(r, Resolution::NotHandled(_));
    for id in want(&not_handled, 2) {
        tampered[id] = result_line(id, &Resolution::Conflict(Refusal::Error("wrong".into())));
    }
    let tampered_path = dir.path().join("tampered.tsv");
    write_results(&tampered_path, &tampered);
    let (ok, report) = run(&[&"check", &dir.path(), &tampered_path]);
    assert!(!ok, "the checker accepted wrong answers:\n{report}");
    assert_eq!(mismatched(&report), expected, "{report}");
}
