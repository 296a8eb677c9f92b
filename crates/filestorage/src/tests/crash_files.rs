//! Crash images of a whole storage on a simulated disk ([`fsio::simfs::SimFs`]): the
//! `Data.fs` with its neighbours (`.index`, `.pack`, `.old`, `.trN`) and the blob
//! directory, where `crash.rs` looks at the `Data.fs` alone.
//!
//! Each test runs some work (several commits of different shapes with an abort among them,
//! commits with blobs and an undo that copies a blob, a pack and its swap, the saves of the
//! `.index`), then "loses power" at every operation of it, in every way the disk may have
//! kept the unsynced operations (see `SimFs`), reopens the storage on each image and checks:
//! - it opens, and the `Data.fs` passes the strict checker;
//! - what it serves is the state after some number of the commits, at least those whose
//!   finish returned before the crash and at most those that had begun (for a pack: the
//!   state before it or after it, nothing else);
//! - every blob revision it serves has its file, with the bytes committed;
//! - it keeps working: one more commit succeeds.
//!
//! The negative controls run the same checks on a disk that forgets one kind of sync
//! (of the `Data.fs`, of directories, of `Data.fs.pack`) and must see them fail: the images
//! are able to show a missing sync.

use super::history::{obj, undo};
use super::*;
use crate::pack::PackOptions;
use crate::scan;
use fsio::forgetful::Forgetful;
use fsio::simfs::{SimFs, Torn};
use fsio::{Fs, Mode};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zodb::StorageError;

const DATA: &str = "/db/Data.fs";
const BLOBS: &str = "/db/blobs";
/// The record ZODB writes for a `ZODB.blob.Blob`.
const BLOB_RECORD: &[u8] = b"\x80\x03cZODB.blob\nBlob\nq\x00.\x80\x03N.";
const OIDS: &[u64] = &[0, 1, 2, 3, 4, 5];

fn options(blobs: bool) -> Options {
    Options {
        create: true,
        sync_on_vote: true,
        blob_dir: blobs.then(|| PathBuf::from(BLOBS)),
        ..Options::default()
    }
}

/// A disk with `/db`, durably.
fn new_disk() -> SimFs {
    let disk = SimFs::new();
    disk.create_dir(Path::new("/db")).unwrap();
    disk.sync_dir(Path::new("/")).unwrap();
    disk
}

fn open_on(fs: Arc<dyn Fs>, blobs: bool) -> Result<FileStorageCore, StorageError> {
    FileStorageCore::open_on(fs, DATA, options(blobs))
}

fn serial(core: &FileStorageCore, oid: u64) -> Tid {
    core.load(Oid(oid)).map(|l| l.1).unwrap_or(Tid::ZERO)
}

fn payload(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(u8::try_from(i * 7 % 251).expect("below 251")))
        .collect()
}

/// A pickle of `len` bytes or more that references `refs`.
fn big_obj(refs: &[u64], seed: u8, len: usize) -> Vec<u8> {
    let text: String = payload(seed, len)
        .into_iter()
        .map(|b| char::from(b'a' + b % 26))
        .collect();
    obj(refs, &text)
}

/// The blob bytes committed for each `(oid, tid)`.
type Committed = BTreeMap<(u64, Tid), Vec<u8>>;

/// A client's upload of `content` into the blob directory's `tmp`, synced (as the server
/// syncs uploads before the vote).
fn upload(fs: &dyn Fs, core: &FileStorageCore, content: &[u8]) -> PathBuf {
    let p = core.blob_dir().unwrap().new_temp_path("test-upload");
    let f = fs.open(&p, Mode::CreateNew).unwrap();
    f.write_all_at(content, 0).unwrap();
    f.sync_data().unwrap();
    p
}

fn store_blob(oid: u64, serial: Tid, file: &Path) -> TxnOp {
    TxnOp::StoreBlob {
        oid: Oid(oid),
        serial,
        data: Bytes::from_static(BLOB_RECORD),
        file: file.to_owned(),
    }
}

/// Every blob revision `core` serves has its file with the committed bytes. Returns how
/// many it checked.
fn check_blob_files(
    fs: &dyn Fs,
    core: &FileStorageCore,
    committed: &Committed,
) -> Result<usize, String> {
    let Some(dir) = core.blob_dir() else {
        return Ok(0);
    };
    let mut n = 0;
    for &o in OIDS {
        let Ok(hist) = core.history(Oid(o), 100) else {
            continue;
        };
        for h in hist {
            if core.load_serial(Oid(o), h.tid).ok().as_deref() != Some(BLOB_RECORD) {
                continue;
            }
            let path = dir.blob_path(Oid(o), h.tid);
            let got = fsio::read(fs, &path)
                .map_err(|e| format!("oid {o} revision {:?}: blob file: {e}", h.tid))?;
            let want = committed
                .get(&(o, h.tid))
                .ok_or_else(|| format!("oid {o}: revision {:?} was never committed", h.tid))?;
            if &got != want {
                return Err(format!("oid {o} revision {:?}: wrong blob bytes", h.tid));
            }
            n += 1;
        }
    }
    Ok(n)
}

/// Opens `image`, runs the common checks, and returns the storage's observation (see
/// [`observe`]) for the caller to compare.
fn reopen_and_check(
    image: &SimFs,
    blobs: bool,
    committed: &Committed,
) -> Result<(String, usize), String> {
    let fs: Arc<dyn Fs> = Arc::new(image.clone());
    let core = open_on(fs.clone(), blobs).map_err(|e| format!("reopen failed: {e}"))?;
    let data = fs
        .open(Path::new(DATA), Mode::Read)
        .map_err(|e| e.to_string())?;
    scan::verify(&*data).map_err(|e| format!("invalid Data.fs after recovery: {e}"))?;
    let seen = observe(&core, OIDS);
    let blob_files = check_blob_files(&*fs, &core, committed)?;
    // The recovered storage keeps working.
    let t = txn(99, vec![store(5, serial(&core, 5), b"later")]);
    match core
        .vote(&t)
        .map_err(|e| format!("vote after recovery: {e}"))?
    {
        Vote::Ok { .. } => {}
        Vote::Conflicts(c) => return Err(format!("conflicts after recovery: {c:?}")),
    }
    core.finish(99)
        .map_err(|e| format!("finish after recovery: {e}"))?;
    scan::verify(&*data).map_err(|e| format!("invalid Data.fs after a new commit: {e}"))?;
    Ok((seen, blob_files))
}

/// What a run of work did: the observation after each step, and the log positions at
/// which each step began and ended.
struct Steps {
    /// `states[k]`: the storage after `k` steps.
    states: Vec<String>,
    /// Log position when step `k` began and when it returned.
    began: Vec<usize>,
    returned: Vec<usize>,
    committed: Committed,
}

impl Steps {
    fn new(core: &FileStorageCore) -> Steps {
        Steps {
            states: vec![observe(core, OIDS)],
            began: Vec::new(),
            returned: Vec::new(),
            committed: Committed::new(),
        }
    }

    /// Runs one step (a commit, an abort, a pack) and records where it began and ended.
    fn step(&mut self, disk: &SimFs, core: &FileStorageCore, f: impl FnOnce()) {
        self.began.push(disk.op_count());
        f();
        self.returned.push(disk.op_count());
        self.states.push(observe(core, OIDS));
    }

    /// The states allowed after a crash at log position `at`: from the last step that had
    /// returned to the last that had begun.
    fn allowed(&self, at: usize) -> std::ops::RangeInclusive<usize> {
        let done = self.returned.iter().filter(|&&r| r <= at).count();
        let begun = self.began.iter().filter(|&&b| b < at).count();
        done..=begun
    }
}

/// Checks every crash image at every log position in `from..=to`. Returns the number of
/// images checked and of blob files verified in them, or the first problem.
fn check_all(
    disk: &SimFs,
    from: usize,
    to: usize,
    torn: Torn,
    blobs: bool,
    steps: &Steps,
) -> Result<(usize, usize), String> {
    let (mut images, mut files) = (0, 0);
    for at in from..=to {
        for image in disk.crash_images(at, torn).iter() {
            let (seen, n) = reopen_and_check(&image, blobs, &steps.committed)
                .map_err(|e| format!("crash at operation {at}: {e}"))?;
            let allowed = steps.allowed(at);
            if !allowed.clone().any(|k| steps.states[k] == seen) {
                let matches: Vec<usize> = (0..steps.states.len())
                    .filter(|&k| steps.states[k] == seen)
                    .collect();
                return Err(format!(
                    "crash at operation {at}: the storage shows the state after steps {matches:?}, \
                     allowed {allowed:?}:\n{seen}"
                ));
            }
            images += 1;
            files += n;
        }
    }
    Ok((images, files))
}

/// Several commits of different shapes, with an abort among them.
fn several_commits(disk: &SimFs, fs: Arc<dyn Fs>) -> (Steps, usize) {
    let core = open_on(fs, false).unwrap();
    commit(
        &core,
        &txn(1, vec![store(0, Tid::ZERO, &obj(&[1, 2], "root"))]),
    );
    let mut steps = Steps::new(&core);
    let start = disk.op_count();
    steps.step(disk, &core, || {
        commit(
            &core,
            &txn(
                2,
                vec![
                    store(1, Tid::ZERO, &big_obj(&[], 1, 9000)),
                    store(2, Tid::ZERO, b"two"),
                    store(3, Tid::ZERO, b"three"),
                ],
            ),
        );
    });
    steps.step(disk, &core, || {
        let t = txn(3, vec![store(2, serial(&core, 2), &big_obj(&[], 3, 5000))]);
        assert!(matches!(core.vote(&t).unwrap(), Vote::Ok { .. }));
        core.abort(3);
    });
    steps.step(disk, &core, || {
        commit(
            &core,
            &txn(
                4,
                vec![
                    TxnOp::Delete {
                        oid: Oid(3),
                        serial: serial(&core, 3),
                    },
                    store(1, serial(&core, 1), &big_obj(&[], 4, 300)),
                ],
            ),
        );
    });
    let t4 = serial(&core, 1);
    steps.step(disk, &core, || {
        let (_, changed) = super::history::commit_changed(&core, &txn(5, vec![undo(t4)]));
        assert!(!changed.is_empty());
    });
    (steps, start)
}

#[test]
fn crash_during_several_commits() {
    let disk = new_disk();
    let (steps, start) = several_commits(&disk, Arc::new(disk.clone()));
    assert_eq!(steps.states.len(), 5);
    let (images, _) = check_all(
        &disk,
        start,
        disk.op_count(),
        Torn::AnyOrder(509),
        false,
        &steps,
    )
    .unwrap();
    eprintln!("{images} images checked");
    assert!(images > 500, "{images} images");
}

fn forgetful(
    disk: &SimFs,
    file_suffix: Option<&'static str>,
    dirs_under: Option<&'static str>,
) -> Arc<dyn Fs> {
    Arc::new(Forgetful {
        inner: disk.clone(),
        file_suffix,
        dirs_under,
    })
}

#[test]
fn negative_control_a_data_file_never_synced_loses_finished_commits() {
    let disk = new_disk();
    let (steps, start) = several_commits(&disk, forgetful(&disk, Some("Data.fs"), None));
    let e = check_all(&disk, start, disk.op_count(), Torn::Never, false, &steps).unwrap_err();
    eprintln!("as expected: {e}");
    assert!(e.contains("allowed"), "{e}");
}

/// Commits with blobs: a new blob, a new revision of it and a second blob, an aborted
/// blob commit, and an undo that gives the undoing transaction a copy of a blob.
fn blob_commits(disk: &SimFs, fs: Arc<dyn Fs>) -> (Steps, usize) {
    let core = open_on(fs.clone(), true).unwrap();
    commit(
        &core,
        &txn(1, vec![store(0, Tid::ZERO, &obj(&[1, 2], "root"))]),
    );
    let mut steps = Steps::new(&core);
    let start = disk.op_count();
    let mut committed = Committed::new();
    let a = payload(1, 5000);
    steps.step(disk, &core, || {
        let f = upload(&*fs, &core, &a);
        let tid = commit(
            &core,
            &txn(
                2,
                vec![store_blob(1, Tid::ZERO, &f), store(3, Tid::ZERO, b"x")],
            ),
        );
        committed.insert((1, tid), a.clone());
    });
    let first = serial(&core, 1);
    let (b, c) = (payload(2, 300), payload(3, 7000));
    steps.step(disk, &core, || {
        let (fb, fc) = (upload(&*fs, &core, &b), upload(&*fs, &core, &c));
        let tid = commit(
            &core,
            &txn(
                3,
                vec![
                    store_blob(1, serial(&core, 1), &fb),
                    store_blob(2, Tid::ZERO, &fc),
                ],
            ),
        );
        committed.insert((1, tid), b.clone());
        committed.insert((2, tid), c.clone());
    });
    let second = serial(&core, 1);
    steps.step(disk, &core, || {
        let f = upload(&*fs, &core, b"aborted");
        let t = txn(4, vec![store_blob(1, serial(&core, 1), &f)]);
        assert!(matches!(core.vote(&t).unwrap(), Vote::Ok { .. }));
        core.abort(4);
    });
    steps.step(disk, &core, || {
        // Undoing the second revision brings the first back, with a file of its own.
        let (tid, changed) = super::history::commit_changed(&core, &txn(5, vec![undo(second)]));
        assert!(changed.contains(&Oid(1)));
        committed.insert((1, tid), a.clone());
    });
    assert_eq!(core.load(Oid(1)).unwrap().0.as_ref(), BLOB_RECORD);
    assert_ne!(first, serial(&core, 1));
    steps.committed = committed;
    (steps, start)
}

#[test]
fn crash_during_blob_commits() {
    let disk = new_disk();
    let (steps, start) = blob_commits(&disk, Arc::new(disk.clone()));
    let (images, files) = check_all(
        &disk,
        start,
        disk.op_count(),
        Torn::InOrder(1021),
        true,
        &steps,
    )
    .unwrap();
    eprintln!("{images} images checked, {files} blob files verified in them");
    assert!(images > 300, "{images} images");
    assert!(files > 300, "{files} blob files");
}

#[test]
fn negative_control_blob_files_without_directory_syncs_go_missing() {
    let disk = new_disk();
    let (steps, start) = blob_commits(&disk, forgetful(&disk, None, Some(BLOBS)));
    let e = check_all(&disk, start, disk.op_count(), Torn::Never, true, &steps).unwrap_err();
    eprintln!("as expected: {e}");
    assert!(e.contains("blob file"), "{e}");
}

/// A storage with history and garbage (and blobs), packed, then closed (the `.index`
/// save). Returns the steps (pack, close) and where they began.
fn pack_and_close(disk: &SimFs, fs: Arc<dyn Fs>, blobs: bool) -> (Steps, usize) {
    let core = open_on(fs.clone(), blobs).unwrap();
    let mut committed = Committed::new();
    commit(
        &core,
        &txn(
            1,
            vec![
                store(0, Tid::ZERO, &obj(&[1, 2, 3], "root")),
                store(1, Tid::ZERO, &big_obj(&[], 1, 3000)),
                store(2, Tid::ZERO, &obj(&[], "two")),
                store(3, Tid::ZERO, &obj(&[], "garbage soon")),
            ],
        ),
    );
    for i in 0..3u8 {
        let mut ops = vec![store(1, serial(&core, 1), &big_obj(&[], 10 + i, 2000))];
        if blobs {
            let content = payload(20 + i, 1500);
            let f = upload(&*fs, &core, &content);
            ops.push(store_blob(2, serial(&core, 2), &f));
            let tid = commit(&core, &txn(10 + u64::from(i), ops));
            committed.insert((2, tid), content);
        } else {
            commit(&core, &txn(10 + u64::from(i), ops));
        }
    }
    // Object 3 becomes garbage.
    commit(
        &core,
        &txn(20, vec![store(0, serial(&core, 0), &obj(&[1, 2], "root"))]),
    );
    let pack_time = Tid(core.last_transaction().0 + 1);
    let mut steps = Steps::new(&core);
    steps.committed = committed;
    let start = disk.op_count();
    steps.step(disk, &core, || {
        assert!(matches!(
            core.pack(pack_time, PackOptions::gc(true)).unwrap(),
            crate::PackOutcome::Packed(_)
        ));
    });
    steps.step(disk, &core, || core.close().unwrap());
    // Packed: the garbage and the old revisions are gone.
    assert!(core.load(Oid(3)).is_err());
    assert_eq!(core.history(Oid(1), 10).unwrap().len(), 1);
    (steps, start)
}

#[test]
fn crash_during_pack_swap_and_index_save() {
    let disk = new_disk();
    let (steps, start) = pack_and_close(&disk, Arc::new(disk.clone()), false);
    let (images, _) = check_all(
        &disk,
        start,
        disk.op_count(),
        Torn::InOrder(4093),
        false,
        &steps,
    )
    .unwrap();
    eprintln!("{images} images checked");
    assert!(images > 200, "{images} images");
}

#[test]
fn crash_during_pack_with_blobs() {
    let disk = new_disk();
    let (steps, start) = pack_and_close(&disk, Arc::new(disk.clone()), true);
    let (images, files) = check_all(
        &disk,
        start,
        disk.op_count(),
        Torn::InOrder(4093),
        true,
        &steps,
    )
    .unwrap();
    eprintln!("{images} images checked, {files} blob files verified in them");
    assert!(images > 200, "{images} images");
    assert!(files > 200, "{files} blob files");
}

#[test]
fn negative_control_a_pack_file_never_synced_is_swapped_in_empty() {
    let disk = new_disk();
    let (steps, start) = pack_and_close(&disk, forgetful(&disk, Some("Data.fs.pack"), None), false);
    let e = check_all(&disk, start, disk.op_count(), Torn::Never, false, &steps).unwrap_err();
    eprintln!("as expected: {e}");
    assert!(e.contains("allowed") || e.contains("reopen"), "{e}");
}

/// The `.index` saved when a file without one is opened (after a rebuild), then commits
/// and the save at close: an image's index is used only when it matches its file.
#[test]
fn crash_during_index_saves() {
    let disk = new_disk();
    let fs: Arc<dyn Fs> = Arc::new(disk.clone());
    {
        let core = open_on(fs.clone(), false).unwrap();
        commit(
            &core,
            &txn(1, vec![store(0, Tid::ZERO, &obj(&[1], "root"))]),
        );
        commit(
            &core,
            &txn(2, vec![store(1, Tid::ZERO, &big_obj(&[], 1, 4000))]),
        );
        core.close().unwrap();
    }
    fs.remove_file(&crate::paths::index(Path::new(DATA)))
        .unwrap();
    fs.sync_dir(Path::new("/db")).unwrap();
    let disk = disk.snapshot();
    let fs: Arc<dyn Fs> = Arc::new(disk.clone());
    let start = disk.op_count();
    let core = open_on(fs, false).unwrap(); // rebuilds and saves the index
    assert!(!core.used_index());
    let mut steps = Steps::new(&core);
    steps.began.push(start);
    steps.returned.push(disk.op_count());
    steps.states.insert(0, steps.states[0].clone());
    steps.step(&disk, &core, || {
        commit(&core, &txn(3, vec![store(1, serial(&core, 1), b"small")]));
    });
    steps.step(&disk, &core, || core.close().unwrap());
    let mut used = 0;
    let mut images = 0;
    for at in start..=disk.op_count() {
        for image in disk.crash_images(at, Torn::InOrder(97)).iter() {
            // With the index the image has, and with none: the same storage.
            let with = open_on(Arc::new(image.snapshot()), false).unwrap();
            used += usize::from(with.used_index());
            let seen = observe(&with, OIDS);
            drop(with);
            let plain = image.snapshot();
            let _ = plain.remove_file(&crate::paths::index(Path::new(DATA)));
            let scanned = observe(&open_on(Arc::new(plain), false).unwrap(), OIDS);
            assert_eq!(seen, scanned, "crash at operation {at}: the index misleads");
            let (seen, _) = reopen_and_check(&image, false, &Committed::new())
                .unwrap_or_else(|e| panic!("crash at operation {at}: {e}"));
            assert!(
                steps.allowed(at).any(|k| steps.states[k] == seen),
                "crash at operation {at}: {seen}"
            );
            images += 1;
        }
    }
    eprintln!("{images} images checked, {used} opened with their saved index");
    assert!(used > 10 && used < images, "{used} of {images}");
}
