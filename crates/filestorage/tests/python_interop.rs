//! Cross-checks with the real Python ZODB: files written by Python read identically here,
//! files written here are accepted by Python (`.index` included, `fstest` clean), and
//! torn tails of Python-written files are recovered.
//!
//! Needs a Python with ZODB: `$ZEORS_PYTHON`, else `<workspace>/.venv/bin/python` (which
//! `scripts/test.sh` creates).

// The crate's cast lints (see src/lib.rs).
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(clippy::cast_lossless)]

use bytes::Bytes;
use filestorage::{scan, FileStorageCore, Options};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use zodb::{Oid, StorageError, Tid, Transaction, TransactionMeta, TxnOp, Vote};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ZEORS_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!(
        "these tests need Python with ZODB: run scripts/test.sh (it creates .venv with the \
         test dependencies), or set ZEORS_PYTHON to a python that has ZODB installed"
    );
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs a Python script and returns its stdout; panics with stderr on failure.
fn run_py(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let mut cmd = Command::new(python());
    for a in args {
        cmd.arg(a);
    }
    let out = cmd.output().expect("running python");
    assert!(
        out.status.success(),
        "python {:?} failed:\n{}\n{}",
        cmd.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn fstest(path: &Path) {
    let out = Command::new(python())
        .args(["-m", "ZODB.scripts.fstest"])
        .arg(path)
        .output()
        .expect("running fstest");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "fstest {} failed: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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

fn id(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap()
}

/// Answers the queries of a `dump.py` output with this crate, in the same format.
fn rust_dump(core: &FileStorageCore, python: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rt_done = false;
    let mut history_done = std::collections::HashSet::new();
    for line in python.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f[0] {
            "LAST" => out.push(format!("LAST {:016x}", core.last_transaction().0)),
            "LEN" => out.push(format!("LEN {}", core.len())),
            "SIZE" => out.push(format!("SIZE {}", core.size())),
            "RT" if !rt_done => {
                rt_done = true;
                let n = python.lines().filter(|l| l.starts_with("RT ")).count();
                for (tid, oids) in core.recent_transactions(n).unwrap() {
                    let oids: Vec<String> = oids.iter().map(|o| format!("{:016x}", o.0)).collect();
                    out.push(format!("RT {:016x} {}", tid.0, oids.join(",")));
                }
            }
            "LB" => {
                let r = match core.load_before(Oid(id(f[1])), Tid(id(f[2]))) {
                    Err(StorageError::PosKey(_)) => "POSKEY".to_string(),
                    Err(e) => panic!("{line}: {e}"),
                    Ok(lb) => match lb.revision {
                        None => "NONE".into(),
                        Some(r) => format!(
                            "{} {:016x} {}",
                            fnv(&r.data),
                            r.start.0,
                            r.end.map_or("-".into(), |e| format!("{:016x}", e.0))
                        ),
                    },
                };
                out.push(format!("LB {} {} {r}", f[1], f[2]));
            }
            "H" if history_done.insert(f[1].to_string()) => {
                let oid = Oid(id(f[1]));
                for h in core.history(oid, usize::MAX).unwrap() {
                    out.push(format!(
                        "H {} {:016x} {} {} {} {}",
                        f[1],
                        h.tid.0,
                        hex(&h.user),
                        hex(&h.description),
                        hex(&h.extension),
                        h.size
                    ));
                    let s = match core.load_serial(oid, h.tid) {
                        Ok(d) => fnv(&d),
                        Err(StorageError::PosKey(_)) => "POSKEY".into(),
                        Err(e) => panic!("{line}: {e}"),
                    };
                    out.push(format!("LS {} {:016x} {s}", f[1], h.tid.0));
                }
            }
            "RT" | "H" | "LS" => {}
            other => panic!("unexpected dump line kind {other}"),
        }
    }
    out
}

fn assert_same(core: &FileStorageCore, python: &str, what: &str) {
    let ours = rust_dump(core, python);
    let theirs: Vec<&str> = python.lines().collect();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "{what}: line {i} differs");
    }
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{what}: different number of lines"
    );
    assert!(theirs.len() > 100, "{what}: suspiciously small dump");
}

fn read_only() -> Options {
    Options {
        read_only: true,
        ..Options::default()
    }
}

/// Builds the Python test database in `dir`; returns its path and the path of the snapshot
/// taken before its last transaction.
fn python_db(dir: &Path) -> (PathBuf, PathBuf) {
    let p = dir.join("py.fs");
    let snap = dir.join("snapshot.fs");
    run_py(&[&script("build_db.py"), &p, &snap]);
    (p, snap)
}

fn dump(path: &Path) -> String {
    run_py(&[&script("dump.py"), &path])
}

#[test]
fn python_written_files_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = python_db(dir.path());
    let expected = dump(&p);
    let python_index = std::fs::read(dir.path().join("py.fs.index")).unwrap();

    let core = FileStorageCore::open(&p, read_only()).unwrap();
    assert!(core.used_index(), "Python's .index was not used");
    assert_same(&core, &expected, "with Python's .index");
    drop(core);

    std::fs::remove_file(dir.path().join("py.fs.index")).unwrap();
    let core = FileStorageCore::open(&p, read_only()).unwrap();
    assert!(!core.used_index());
    assert_same(&core, &expected, "full scan");
    drop(core);

    // A writable open rebuilds the index and saves it exactly as Python did.
    let core = FileStorageCore::open(&p, Options::default()).unwrap();
    assert_same(&core, &expected, "writable");
    assert_eq!(
        std::fs::read(dir.path().join("py.fs.index")).unwrap(),
        python_index
    );
    core.close().unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("py.fs.index")).unwrap(),
        python_index
    );
    // Our strict checker accepts Python's file (double store, undo records included).
    let summary = scan::verify(&std::fs::File::open(&p).unwrap()).unwrap();
    assert_eq!(
        summary.last_tid,
        FileStorageCore::open(&p, read_only())
            .unwrap()
            .last_transaction()
    );
}

fn store(oid: u64, serial: Tid, data: impl Into<Bytes>) -> TxnOp {
    TxnOp::Store {
        oid: Oid(oid),
        serial,
        data: data.into(),
    }
}

fn commit(core: &FileStorageCore, key: u64, meta: TransactionMeta, ops: Vec<TxnOp>) -> Tid {
    let t = Transaction { key, meta, ops };
    assert!(matches!(core.vote(&t).unwrap(), Vote::Ok { .. }));
    core.finish(key).unwrap()
}

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// Writes a new storage from the Python database's current records plus arbitrary
/// payloads; returns the manifest for `check_rust_file.py`.
fn write_with_rust(source: &Path, python_dump: &str, target: &Path) -> String {
    let src = FileStorageCore::open(source, read_only()).unwrap();
    let mut oids: Vec<u64> = python_dump
        .lines()
        .filter_map(|l| l.strip_prefix("H "))
        .map(|l| id(l.split(' ').next().unwrap()))
        .collect();
    oids.dedup();
    let mut manifest = String::new();
    let mut rev = |oid: u64, tid: Tid, data: &[u8]| {
        writeln!(manifest, "REV {oid:016x} {:016x} {}", tid.0, hex(data)).unwrap();
    };
    let core = FileStorageCore::open(
        target,
        Options {
            create: true,
            ..Options::default()
        },
    )
    .unwrap();

    // 1: every live object of the Python database, with real pickles and metadata.
    let mut ops = Vec::new();
    let mut copied = Vec::new();
    for &oid in &oids {
        if let Ok((data, _)) = src.load(Oid(oid)) {
            ops.push(store(oid, Tid::ZERO, data.clone()));
            copied.push((oid, data));
        }
    }
    let meta = TransactionMeta {
        user: b"rust".to_vec(),
        description: "copied by zeors \u{2713}".as_bytes().to_vec(),
        extension: b"\x80\x03}q\x00X\x03\x00\x00\x00fooq\x01X\x03\x00\x00\x00barq\x02s.".to_vec(),
        ..TransactionMeta::default()
    };
    let t1 = commit(&core, 1, meta, ops);
    for (oid, data) in &copied {
        rev(*oid, t1, data);
    }

    // 2: arbitrary payloads, one of them large.
    let base = 0x1_0000u64;
    let payloads: Vec<Vec<u8>> = (0..6usize)
        .map(|i| pseudo_random(i as u64, if i == 3 { 200_000 } else { 10 + i * 37 }))
        .collect();
    let t2 = commit(
        &core,
        2,
        TransactionMeta::default(),
        (base..)
            .zip(&payloads)
            .map(|(oid, p)| store(oid, Tid::ZERO, p.clone()))
            .collect(),
    );
    for (oid, p) in (base..).zip(&payloads) {
        rev(oid, t2, p);
    }

    // 3: new revisions, one oid stored twice (the last store counts), and a delete.
    let a = pseudo_random(100, 77);
    let b = pseudo_random(101, 99);
    let t3 = commit(
        &core,
        3,
        TransactionMeta {
            description: b"revisions".to_vec(),
            ..TransactionMeta::default()
        },
        vec![
            store(base, t2, a.clone()),
            store(base + 1, t2, b"first".to_vec()),
            store(base + 1, t2, b.clone()),
        ],
    );
    rev(base, t3, &a);
    rev(base + 1, t3, &b);
    let t4 = commit(
        &core,
        4,
        TransactionMeta::default(),
        vec![TxnOp::Delete {
            oid: Oid(base + 2),
            serial: t2,
        }],
    );
    // 5: an empty transaction.
    let t5 = commit(
        &core,
        5,
        TransactionMeta {
            description: b"nothing".to_vec(),
            ..TransactionMeta::default()
        },
        vec![],
    );
    assert!(t5 > t4);
    core.close().unwrap();

    for (oid, _) in &copied {
        writeln!(manifest, "CUR {oid:016x} {:016x}", t1.0).unwrap();
    }
    writeln!(manifest, "CUR {:016x} {:016x}", base, t3.0).unwrap();
    writeln!(manifest, "CUR {:016x} {:016x}", base + 1, t3.0).unwrap();
    writeln!(manifest, "CUR {:016x} POSKEY", base + 2).unwrap();
    writeln!(manifest, "CUR {:016x} {:016x}", base + 3, t2.0).unwrap();
    manifest
}

#[test]
fn rust_written_files_are_accepted_by_python_and_python_can_append() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = python_db(dir.path());
    let source_dump = dump(&p);
    let w = dir.path().join("rust.fs");
    let manifest = write_with_rust(&p, &source_dump, &w);
    let mpath = dir.path().join("manifest.txt");
    std::fs::write(&mpath, &manifest).unwrap();

    // (b) Python reads what we wrote, with our .index, and fstest is clean.
    assert_eq!(
        run_py(&[&script("check_rust_file.py"), &w, &mpath]).trim(),
        "OK"
    );
    fstest(&w);
    scan::verify(&std::fs::File::open(&w).unwrap()).unwrap();
    let ours = FileStorageCore::open(&w, read_only()).unwrap();
    assert_same(&ours, &dump(&w), "rust-written file");
    drop(ours);

    // (c) Python appends (and undoes) in the file we wrote; we read its work back, with
    // the .index Python saved and without.
    run_py(&[&script("append.py"), &w]);
    let expected = dump(&w);
    let core = FileStorageCore::open(&w, read_only()).unwrap();
    assert!(core.used_index());
    assert_same(&core, &expected, "after Python appended");
    drop(core);
    std::fs::remove_file(dir.path().join("rust.fs.index")).unwrap();
    let core = FileStorageCore::open(&w, Options::default()).unwrap();
    assert_same(&core, &expected, "after Python appended, full scan");

    // And we can continue the file Python extended.
    let root = core.load(Oid(0)).unwrap();
    commit(
        &core,
        9,
        TransactionMeta::default(),
        vec![store(0, root.1, root.0)],
    );
    core.close().unwrap();
    fstest(&w);
    // Every revision we wrote is still there.
    let revisions: String = manifest
        .lines()
        .filter(|l| l.starts_with("REV "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&mpath, revisions).unwrap();
    assert_eq!(
        run_py(&[&script("check_rust_file.py"), &w, &mpath]).trim(),
        "OK"
    );
}

#[test]
fn torn_tails_of_python_files_are_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (p, snap) = python_db(dir.path());
    let full = std::fs::read(&p).unwrap();
    let good = std::fs::read(&snap).unwrap();
    let expected = dump(&snap);
    let start = good.len();
    assert!(full.len() > start + 100 && full[..start] == good[..]);

    let mut cases: Vec<(String, Vec<u8>)> = [
        1,
        8,
        16,
        17,
        23,
        60,
        (full.len() - start) / 2,
        full.len() - start - 8,
        full.len() - start - 1,
    ]
    .into_iter()
    .map(|cut| (format!("cut at +{cut}"), full[..start + cut].to_vec()))
    .collect();
    let mut checkpoint = full.clone();
    checkpoint[start + 16] = b'c';
    cases.push(("status 'c'".into(), checkpoint));
    let mut zeroed = full.clone();
    zeroed[start + 200..].fill(0);
    cases.push(("zeroed end".into(), zeroed));

    let index = std::fs::read(dir.path().join("py.fs.index")).unwrap();
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let case = dir.path().join(format!("case{i}"));
        std::fs::create_dir(&case).unwrap();
        let f = case.join("Data.fs");
        std::fs::write(&f, &bytes).unwrap();
        // The .index Python saved covers the lost transaction: it must be rejected.
        std::fs::write(case.join("Data.fs.index"), &index).unwrap();
        let core =
            FileStorageCore::open(&f, Options::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(!core.used_index(), "{what}");
        assert_same(&core, &expected, &what);
        core.close().unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), good, "{what}");
        let tr0 = case.join("Data.fs.tr0");
        if bytes.len() - start < 23 {
            // Less than a transaction header: cut without a copy, as Python does.
            assert!(!tr0.exists(), "{what}");
        } else {
            assert_eq!(std::fs::read(&tr0).unwrap(), &bytes[start..], "{what}");
        }
        fstest(&f);
    }
}
