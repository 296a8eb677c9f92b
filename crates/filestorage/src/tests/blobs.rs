//! Blobs: commit, abort, conflicts, undo and pack with a blob directory.

use super::history::{commit_changed, obj, undo};
use super::*;
use crate::pack::PackOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use zodb::blob::{BlobDir, Layout};
use zodb::StorageError;

/// The record ZODB writes for a `ZODB.blob.Blob`.
const BLOB_RECORD: &[u8] = b"\x80\x03cZODB.blob\nBlob\nq\x00.\x80\x03N.";

fn open_with(dir: &Path, discard_old: bool) -> FileStorageCore {
    FileStorageCore::open(
        dir.join("Data.fs"),
        Options {
            create: true,
            blob_dir: Some(dir.join("blobs")),
            pack_discard_old: discard_old,
            ..Options::default()
        },
    )
    .unwrap()
}

fn open(dir: &Path) -> FileStorageCore {
    open_with(dir, false)
}

fn blobs(core: &FileStorageCore) -> &BlobDir {
    core.blob_dir().expect("a blob directory")
}

/// A client's upload: a file in the blob directory's `tmp`.
fn upload(core: &FileStorageCore, content: &[u8]) -> PathBuf {
    let p = blobs(core).new_temp_path("test-upload");
    std::fs::write(&p, content).unwrap();
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

fn read_blob(core: &FileStorageCore, oid: u64, serial: Tid) -> Result<Vec<u8>, StorageError> {
    use std::io::Read;
    let mut f = core.open_blob(Oid(oid), serial)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    Ok(v)
}

fn staged_files(core: &FileStorageCore) -> Vec<String> {
    std::fs::read_dir(blobs(core).temp_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("staged"))
        .collect()
}

fn serial(core: &FileStorageCore, oid: u64) -> Tid {
    core.load(Oid(oid)).map(|l| l.1).unwrap_or(Tid::ZERO)
}

/// root → blob 1.
fn with_blob(core: &FileStorageCore, content: &[u8]) -> Tid {
    let f = upload(core, content);
    let t = txn(
        1,
        vec![
            store(0, serial(core, 0), &obj(&[1], "root")),
            store(1, serial(core, 1), BLOB_RECORD),
            store_blob(1, serial(core, 1), &f),
        ],
    );
    let tid = commit(core, &t);
    std::fs::remove_file(f).unwrap();
    tid
}

#[test]
fn a_committed_blob_is_in_place_read_only_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    assert_eq!(blobs(&core).layout(), Layout::Bushy);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("blobs/.layout")).unwrap(),
        "bushy"
    );
    let interfaces = core.info().interfaces;
    assert!(interfaces.contains(&("ZODB.interfaces".into(), "IBlobStorage".into())));

    let f = upload(&core, b"hello blob");
    let t = txn(
        7,
        vec![
            store(0, Tid::ZERO, &obj(&[1], "root")),
            store(1, Tid::ZERO, BLOB_RECORD),
            store_blob(1, Tid::ZERO, &f),
        ],
    );
    assert!(matches!(core.vote(&t).unwrap(), Vote::Ok { .. }));
    // Staged, not visible.
    assert_eq!(staged_files(&core).len(), 1);
    let tid = core.finish(7).unwrap();
    assert!(staged_files(&core).is_empty());
    let path = blobs(&core).blob_path(Oid(1), tid);
    assert!(path.starts_with(
        dir.path()
            .join("blobs/0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x01")
    ));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o222, 0, "committed blob files are read-only");
    assert_eq!(read_blob(&core, 1, tid).unwrap(), b"hello blob");
    // The client's file is the client's to remove.
    assert!(f.exists());
    // One record for the blob oid.
    assert_eq!(core.history(Oid(1), 10).unwrap().len(), 1);
    assert!(matches!(
        read_blob(&core, 1, Tid(tid.0 - 1)),
        Err(StorageError::PosKey(_))
    ));
    assert!(matches!(
        read_blob(&core, 0, tid),
        Err(StorageError::PosKey(_))
    ));
}

#[test]
fn abort_and_conflicts_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let first = with_blob(&core, b"v1");

    let f = upload(&core, b"v2");
    let t = txn(2, vec![store_blob(1, first, &f)]);
    assert!(matches!(core.vote(&t).unwrap(), Vote::Ok { .. }));
    core.abort(2);
    assert!(staged_files(&core).is_empty());
    let files: Vec<_> = std::fs::read_dir(blobs(&core).oid_dir(Oid(1)))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1);

    // A stale serial is a conflict: nothing staged.
    let t = txn(3, vec![store_blob(1, Tid(first.0 - 1), &f)]);
    assert!(matches!(core.vote(&t).unwrap(), Vote::Conflicts(_)));
    assert!(staged_files(&core).is_empty());

    // A file that is gone fails the vote.
    let t = txn(4, vec![store_blob(1, first, &dir.path().join("missing"))]);
    assert!(matches!(core.vote(&t), Err(StorageError::Value(_))));
    assert_eq!(read_blob(&core, 1, first).unwrap(), b"v1");
}

#[test]
fn a_file_left_without_a_committed_record_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let first = with_blob(&core, b"v1");
    // As if a crash happened after placing a file and before the status byte.
    let ghost = Tid(first.0 + 1000);
    std::fs::write(blobs(&core).blob_path(Oid(1), ghost), b"ghost").unwrap();
    assert!(matches!(
        read_blob(&core, 1, ghost),
        Err(StorageError::PosKey(_))
    ));
}

#[test]
fn reopening_cleans_our_temporary_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let ours = upload(&core, b"partial upload");
    let theirs = blobs(&core).temp_dir().join("tmpclientblob");
    std::fs::write(&theirs, b"client's uncommitted blob").unwrap();
    core.close().unwrap();
    drop(core);
    let core = open(dir.path());
    assert!(!ours.exists());
    assert!(theirs.exists());
    drop(core);
}

#[test]
fn no_blob_directory_refuses_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let core = FileStorageCore::open(
        dir.path().join("Data.fs"),
        Options {
            create: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(!core
        .info()
        .interfaces
        .contains(&("ZODB.interfaces".into(), "IBlobStorage".into())));
    let t = txn(1, vec![store_blob(1, Tid::ZERO, &dir.path().join("x"))]);
    assert!(matches!(core.vote(&t), Err(StorageError::Unsupported(_))));
}

#[test]
fn undo_gives_the_undoing_transaction_a_copy_of_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let t1 = with_blob(&core, b"version one");
    let t2 = with_blob(&core, b"version two");
    let (t3, changed) = commit_changed(&core, &txn(9, vec![undo(t2)]));
    assert_eq!(changed, vec![Oid(0), Oid(1)]);
    assert_eq!(serial(&core, 1), t3);
    assert_eq!(read_blob(&core, 1, t3).unwrap(), b"version one");
    assert_eq!(read_blob(&core, 1, t1).unwrap(), b"version one");
    assert_eq!(read_blob(&core, 1, t2).unwrap(), b"version two");
    // Undo the undo: version two again, under a new tid.
    let (t4, _) = commit_changed(&core, &txn(10, vec![undo(t3)]));
    assert_eq!(read_blob(&core, 1, t4).unwrap(), b"version two");

    // Undoing a revision whose file is gone fails as Python's does (POSKeyError).
    std::fs::remove_file(blobs(&core).blob_path(Oid(1), t1)).unwrap();
    std::fs::remove_file(blobs(&core).blob_path(Oid(1), t3)).unwrap();
    let r = core.vote(&txn(11, vec![undo(t4)]));
    assert!(matches!(r, Err(StorageError::PosKey(_))), "{r:?}");
    assert!(staged_files(&core).is_empty());
}

fn blob_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else if e.file_name().to_string_lossy().ends_with(".blob") {
                out.push(e.path().strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn pack_removes_the_files_of_removed_revisions() {
    for discard_old in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let core = open_with(dir.path(), discard_old);
        let t1 = with_blob(&core, b"one");
        let t2 = with_blob(&core, b"two");
        // A blob that becomes garbage: oid 2, referenced, then dropped.
        let f = upload(&core, b"garbage");
        commit(
            &core,
            &txn(
                5,
                vec![
                    store(0, serial(&core, 0), &obj(&[1, 2], "root")),
                    store_blob(2, Tid::ZERO, &f),
                ],
            ),
        );
        let t_garbage = serial(&core, 2);
        commit(
            &core,
            &txn(6, vec![store(0, serial(&core, 0), &obj(&[1], "root"))]),
        );
        let before = blob_files(&dir.path().join("blobs"));
        assert_eq!(before.len(), 3);
        let pack_time = zodb::timestamp::new_tid(core.last_transaction()).unwrap();
        core.pack(pack_time, PackOptions::default()).unwrap();

        let after = blob_files(&dir.path().join("blobs"));
        let kept = blobs(&core).blob_path(Oid(1), t2);
        assert_eq!(after.len(), 1, "{after:?}");
        assert!(kept.exists());
        assert!(!blobs(&core).blob_path(Oid(1), t1).exists());
        // The garbage object's directory is gone, and its empty parents.
        assert!(!blobs(&core).oid_dir(Oid(2)).exists());
        assert!(!dir
            .path()
            .join("blobs/0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x02")
            .exists());
        assert_eq!(read_blob(&core, 1, t2).unwrap(), b"two");

        let old = dir.path().join("blobs.old");
        if discard_old {
            assert!(!old.exists());
        } else {
            // The state before the pack, as Python leaves it next to Data.fs.old.
            assert_eq!(blob_files(&old), before);
            assert_eq!(
                std::fs::read_to_string(old.join(".layout")).unwrap(),
                "bushy"
            );
            let old_core = FileStorageCore::open(
                dir.path().join("Data.fs.old"),
                Options {
                    read_only: true,
                    blob_dir: Some(old.clone()),
                    ..Options::default()
                },
            )
            .unwrap();
            assert_eq!(read_blob(&old_core, 1, t1).unwrap(), b"one");
            assert_eq!(read_blob(&old_core, 2, t_garbage).unwrap(), b"garbage");
        }
        // Commits go on after the pack, into recreated directories.
        with_blob(&core, b"three");
    }
}

#[test]
fn a_crash_after_vote_leaves_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let first = with_blob(&core, b"v1");
    let f = upload(&core, b"never committed");
    let t = txn(2, vec![store_blob(1, first, &f)]);
    assert!(matches!(core.vote(&t).unwrap(), Vote::Ok { .. }));
    assert_eq!(staged_files(&core).len(), 1);
    // The process dies here: no finish, no abort, no close.
    drop(core);
    let core = open(dir.path());
    assert_eq!(core.last_transaction(), first);
    assert!(staged_files(&core).is_empty());
    assert!(
        !f.exists(),
        "upload files of the dead process are cleaned too"
    );
    let files: Vec<_> = std::fs::read_dir(blobs(&core).oid_dir(Oid(1)))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(read_blob(&core, 1, first).unwrap(), b"v1");
    // And the storage goes on.
    let second = with_blob(&core, b"v2");
    assert_eq!(read_blob(&core, 1, second).unwrap(), b"v2");
}

/// `restoreBlob`: a replicated record with its blob file, committed like a stored one.
#[test]
fn vote_restore_commits_blob_files() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path());
    let f = upload(&core, b"replicated blob");
    let tid = zodb::timestamp::tid_from_unix(zodb::timestamp::now_unix() - 60.0);
    let mut t = txn(
        1,
        vec![TxnOp::Restore {
            oid: Oid(3),
            serial: tid,
            data: Some(Bytes::from_static(BLOB_RECORD)),
            prev_txn: None,
        }],
    );
    t.meta.tid = Some(tid);
    assert!(matches!(
        core.vote_restore(&t, &[(Oid(3), f.clone())]).unwrap(),
        Vote::Ok { .. }
    ));
    assert_eq!(core.finish(1).unwrap(), tid);
    std::fs::remove_file(f).unwrap();
    assert_eq!(read_blob(&core, 3, tid).unwrap(), b"replicated blob");
    assert!(staged_files(&core).is_empty());
}
