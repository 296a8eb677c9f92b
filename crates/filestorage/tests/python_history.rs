//! Cross-checks of iteration, the undo log, the reference scanner and pack with the real
//! Python ZODB, on a database Python wrote (`tests/python/build_history_db.py`).
//!
//! Needs a Python with ZODB: `$ZEORS_PYTHON`, else `<workspace>/.venv/bin/python`.

// The crate's cast lints (see src/lib.rs).
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(clippy::cast_lossless)]

use filestorage::iter::RecordIter;
use filestorage::{FileStorageCore, Options, PackOptions, PackOutcome};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use zodb::refs::RefScanner;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ZEORS_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!("these tests need Python with ZODB: set ZEORS_PYTHON or run scripts/test.sh");
}

fn run_py(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let mut cmd = Command::new(python());
    cmd.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script),
    );
    for a in args {
        cmd.arg(a);
    }
    let out = cmd.output().expect("running python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn fnv(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{}:{h:016x}", data.len())
}

fn hex(b: &[u8]) -> String {
    if b.is_empty() {
        return "-".into();
    }
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// What `history_dump.py` prints, computed by zeors.
fn rust_dump(path: &Path) -> String {
    let core = FileStorageCore::open(
        path,
        Options {
            read_only: true,
            ..Options::default()
        },
    )
    .unwrap();
    let mut out = String::new();
    let mut it = core.iterator(None, None).unwrap();
    let mut scanner = RefScanner::new();
    while let Some((t, info)) = it.next_txn().unwrap() {
        writeln!(
            out,
            "T {} {} {} {} {}",
            hex(&info.tid.to_bytes()),
            info.status as char,
            hex(&info.user),
            hex(&info.description),
            hex(&info.extension)
        )
        .unwrap();
        let mut recs = RecordIter::new(it.view().clone(), t);
        while let Some(r) = recs.next_record().unwrap() {
            writeln!(
                out,
                "R {} {} {} {}",
                hex(&r.oid.to_bytes()),
                hex(&r.tid.to_bytes()),
                r.data.as_deref().map_or("None".into(), fnv),
                r.data_txn.map_or("-".into(), |t| hex(&t.to_bytes()))
            )
            .unwrap();
            if let Some(d) = &r.data {
                let mut refs = Vec::new();
                let refs = match scanner.references(d, &mut refs) {
                    Ok(()) => refs
                        .iter()
                        .map(|o| hex(&o.to_bytes()))
                        .collect::<Vec<_>>()
                        .join(","),
                    Err(_) => "ERROR".into(),
                };
                let refs = if refs.is_empty() { "-".into() } else { refs };
                writeln!(
                    out,
                    "F {} {} {refs}",
                    hex(&r.oid.to_bytes()),
                    hex(&r.tid.to_bytes())
                )
                .unwrap();
            }
        }
    }
    for e in core.undo_log(0, 100_000, None).unwrap() {
        writeln!(
            out,
            "U {} {} {} {}",
            String::from_utf8(e.id()).unwrap(),
            hex(&e.user),
            hex(&e.description),
            e.size
        )
        .unwrap();
    }
    out
}

fn assert_same_lines(ours: &str, theirs: &str, what: &str) {
    let a: Vec<&str> = ours.lines().collect();
    let b: Vec<&str> = theirs.lines().collect();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "{what}: line {i} differs");
    }
    assert_eq!(a.len(), b.len(), "{what}: different number of lines");
}

/// Builds the Python database; returns its path and the pack time it chose.
fn build(dir: &Path) -> (PathBuf, f64) {
    let p = dir.join("py.fs");
    let out = run_py("build_history_db.py", &[&p]);
    let t = out
        .lines()
        .find_map(|l| l.strip_prefix("PACKTIME "))
        .expect("PACKTIME line")
        .parse()
        .unwrap();
    (p, t)
}

#[test]
fn iteration_undo_log_and_references_match_python() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = build(dir.path());
    let theirs = run_py("history_dump.py", &[&p]);
    assert!(theirs.lines().count() > 700, "suspiciously small dump");
    assert!(
        theirs.contains(" None -"),
        "no undone creation in the sample"
    );
    assert_same_lines(&rust_dump(&p), &theirs, "history dump");
}

fn states(path: &Path) -> String {
    run_py("states.py", &[&path])
}

#[test]
fn pack_gives_the_same_file_contents_as_python_pack() {
    let dir = tempfile::tempdir().unwrap();
    let (orig, pack_time) = build(dir.path());
    let before = states(&orig);
    let (ours, theirs) = (dir.path().join("ours.fs"), dir.path().join("theirs.fs"));
    std::fs::copy(&orig, &ours).unwrap();
    std::fs::copy(&orig, &theirs).unwrap();
    run_py("pack.py", &[&theirs, &pack_time.to_string()]);

    let core = FileStorageCore::open(&ours, Options::default()).unwrap();
    let outcome = core
        .pack(
            zodb::timestamp::tid_from_unix(pack_time),
            PackOptions::default(),
        )
        .unwrap();
    assert!(matches!(outcome, PackOutcome::Packed(_)), "{outcome:?}");
    core.close().unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("ours.fs.old")).unwrap(),
        std::fs::read(&orig).unwrap()
    );

    // Python accepts the file (fstest, its .index) and loads the same reachable states as
    // before the pack.
    let after = states(&ours);
    assert!(after.starts_with("USED_INDEX True"), "{}", &after[..40]);
    assert!(after.ends_with("FSTEST OK\n"));
    let reachable = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.starts_with("S "))
            .map(String::from)
            .collect()
    };
    assert_eq!(reachable(&after), reachable(&before));
    // Garbage was collected.
    let len = |s: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix("LEN "))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(len(&after) < len(&before));

    // And the packed file holds exactly what Python's pack keeps: same transactions,
    // records, back pointers, undo log.
    assert_same_lines(
        &run_py("history_dump.py", &[&ours]),
        &run_py("history_dump.py", &[&theirs]),
        "zeors pack vs Python pack",
    );
    assert_eq!(
        std::fs::metadata(&ours).unwrap().len(),
        std::fs::metadata(&theirs).unwrap().len()
    );
}
