//! Primaries and replicas in one process, over real sockets and real Data.fs files:
//! the replica's file is the primary's byte for byte, resumes after a restart, refuses a
//! diverged history, feeds a further replica, and speaks zc.zrs's plain dialect too.

use bytes::Bytes;
use filestorage::{FileStorage, Options};
use replication::codec::Dialect;
use replication::net::Listener;
use replication::{FollowConfig, LinkState, Node, Role};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zodb::{Oid, Storage, Tid, Transaction, TransactionMeta, TxnOp, Vote};

/// The record ZODB writes for a `ZODB.blob.Blob`.
const BLOB_RECORD: &[u8] = b"\x80\x03cZODB.blob\nBlob\nq\x00.\x80\x03N.";

fn open(dir: &Path, name: &str) -> FileStorage {
    FileStorage::open(
        dir.join(name),
        Options {
            create: true,
            sync_on_vote: true,
            blob_dir: Some(dir.join(format!("{name}.blobs"))),
            // The test records are not pickles: pack without garbage collection.
            pack_without_gc: true,
            ..Options::default()
        },
    )
    .unwrap()
}

struct Committer {
    next_key: u64,
}

impl Committer {
    async fn commit(&mut self, node: &Node, ops: Vec<TxnOp>, user: &str) -> Tid {
        self.next_key += 1;
        let t = Transaction {
            key: self.next_key,
            meta: TransactionMeta {
                user: user.as_bytes().to_vec(),
                description: b"test".to_vec(),
                extension: zeo_proto::extension_to_bytes(&zeo_proto::Value::dict([(
                    "n",
                    zeo_proto::Value::Int(self.next_key as i64),
                )])),
                ..TransactionMeta::default()
            },
            ops,
        };
        match node.vote(&t).await.unwrap() {
            Vote::Ok { .. } => {}
            Vote::Conflicts(c) => panic!("{c:?}"),
        }
        node.finish(t.key).await.unwrap()
    }
}

async fn serial(node: &Node, oid: u64) -> Tid {
    node.load_before(Oid(oid), Tid::MAX)
        .await
        .ok()
        .and_then(|l| l.revision)
        .map_or(Tid::ZERO, |r| r.start)
}

fn store(oid: u64, serial: Tid, data: &str) -> TxnOp {
    TxnOp::Store {
        oid: Oid(oid),
        serial,
        data: Bytes::from(data.as_bytes().to_vec()),
    }
}

/// Some history: stores, a blob, an undo (back pointers), a deletion.
async fn make_history(node: &Node, c: &mut Committer, rounds: u64) {
    for i in 0..rounds {
        let s0 = serial(node, 0).await;
        let s1 = serial(node, 1).await;
        c.commit(
            node,
            vec![
                store(0, s0, &format!("root {i}")),
                store(1, s1, &format!("one {i}")),
            ],
            "alice",
        )
        .await;
    }
    // Where the server puts a client's upload: the storage's own temporary blob directory
    // (a blob file from anywhere else is refused).
    let blob_file = zodb::Storage::blob_temp_dir(node)
        .expect("the primary has blobs")
        .join("upload.blob");
    std::fs::write(&blob_file, vec![7u8; 200_000]).unwrap();
    let s2 = serial(node, 2).await;
    c.commit(
        node,
        vec![TxnOp::StoreBlob {
            oid: Oid(2),
            serial: s2,
            data: Bytes::from_static(BLOB_RECORD),
            file: blob_file.clone(),
        }],
        "blob",
    )
    .await;
    std::fs::remove_file(blob_file).unwrap();
    let s1 = serial(node, 1).await;
    let undone = c
        .commit(node, vec![store(1, s1, "to be undone")], "bob")
        .await;
    c.commit(
        node,
        vec![TxnOp::Undo {
            transaction_id: zodb::undo_id(undone),
        }],
        "undo",
    )
    .await;
    // A new object, deleted again (external GC).
    let oid = 1000 + c.next_key;
    let created = c
        .commit(node, vec![store(oid, Tid::ZERO, "three")], "carol")
        .await;
    c.commit(
        node,
        vec![TxnOp::Delete {
            oid: Oid(oid),
            serial: created,
        }],
        "gc",
    )
    .await;
}

async fn wait_caught_up(replica: &Node, primary: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while replica.last_transaction() != primary.last_transaction() {
        assert!(
            Instant::now() < deadline,
            "replica at {} never reached {}",
            replica.last_transaction(),
            primary.last_transaction()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The replica's Data.fs is a prefix of the primary's (equal up to its end).
fn assert_prefix(replica: &Path, primary: &Path) {
    let r = std::fs::read(replica).unwrap();
    let p = std::fs::read(primary).unwrap();
    assert!(r.len() <= p.len(), "replica longer than primary");
    assert!(r.len() > 4);
    assert!(
        r == p[..r.len()],
        "the replica's file differs from the primary's"
    );
}

fn blob_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                if p.file_name().unwrap() != "tmp" {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "blob") {
                out.push((
                    p.strip_prefix(dir).unwrap().to_owned(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

async fn start_primary(fs: FileStorage) -> (Arc<Node>, String) {
    let node = Node::new(fs, Role::Primary);
    let listener = Listener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local();
    replication::primary::spawn(node.clone(), listener);
    (node, address)
}

fn start_replica(fs: FileStorage, source: &str, dialect: Option<Dialect>) -> Arc<Node> {
    let node = Node::new(
        fs,
        Role::Replica {
            source: source.to_string(),
        },
    );
    let mut cfg = FollowConfig::new(source);
    if dialect == Some(Dialect::Stock) {
        cfg.stock_only = true;
    }
    replication::replica::spawn(node.clone(), cfg);
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_copies_the_primary_byte_for_byte_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (primary, address) = start_primary(open(d, "primary.fs")).await;
    let mut c = Committer { next_key: 0 };
    make_history(&primary, &mut c, 20).await;

    let replica = start_replica(open(d, "replica.fs"), &address, None);
    wait_caught_up(&replica, &primary).await;
    assert_prefix(&d.join("replica.fs"), &d.join("primary.fs"));
    assert_eq!(
        blob_files(&d.join("replica.fs.blobs")),
        blob_files(&d.join("primary.fs.blobs"))
    );
    assert_eq!(replica.stats().link(), LinkState::Following);
    // Clients of the replica cannot commit.
    assert!(replica.is_read_only());

    // Following new commits, one by one.
    for i in 0..5 {
        let s0 = serial(&primary, 0).await;
        c.commit(&primary, vec![store(0, s0, &format!("live {i}"))], "live")
            .await;
        wait_caught_up(&replica, &primary).await;
        let got = replica.load_before(Oid(0), Tid::MAX).await.unwrap();
        assert_eq!(got.revision.unwrap().data, format!("live {i}").as_bytes());
    }

    // The replica stops; the primary goes on; the replica resumes from its own end.
    replica.close().await.unwrap();
    drop(replica);
    make_history(&primary, &mut c, 3).await;
    let replica = start_replica(open(d, "replica.fs"), &address, None);
    wait_caught_up(&replica, &primary).await;
    assert_prefix(&d.join("replica.fs"), &d.join("primary.fs"));
    assert_eq!(
        std::fs::metadata(d.join("replica.fs")).unwrap().len(),
        std::fs::metadata(d.join("primary.fs")).unwrap().len()
    );
    let s = replica.stats();
    assert!(s.bytes_in.load(std::sync::atomic::Ordering::Relaxed) > 0);
    // zstd was negotiated: fewer bytes on the wire than stream bytes.
    assert!(
        s.bytes_in.load(std::sync::atomic::Ordering::Relaxed)
            < s.bytes_in_raw.load(std::sync::atomic::Ordering::Relaxed)
    );
    replica.close().await.unwrap();
    primary.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zc_zrs_dialect_and_chains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (primary, address) = start_primary(open(d, "primary.fs")).await;
    let mut c = Committer { next_key: 0 };
    make_history(&primary, &mut c, 5).await;
    // A middle node that follows in zc.zrs's plain dialect and feeds a third one.
    let middle = start_replica(open(d, "middle.fs"), &address, Some(Dialect::Stock));
    let listener = Listener::bind("127.0.0.1:0").await.unwrap();
    let middle_address = listener.local();
    replication::primary::spawn(middle.clone(), listener);
    let last = start_replica(open(d, "last.fs"), &middle_address, None);
    make_history(&primary, &mut c, 5).await;
    wait_caught_up(&middle, &primary).await;
    wait_caught_up(&last, &primary).await;
    // The plain dialect carries the extension as a dict, pickled again on arrival: the
    // same content, not necessarily the same bytes (zeors pickles it as ZODB does, so
    // here they are the same).
    assert_prefix(&d.join("middle.fs"), &d.join("primary.fs"));
    assert_prefix(&d.join("last.fs"), &d.join("primary.fs"));
    assert_eq!(
        blob_files(&d.join("last.fs.blobs")),
        blob_files(&d.join("primary.fs.blobs"))
    );
    last.close().await.unwrap();
    middle.close().await.unwrap();
    primary.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_replica_is_refused_and_keeps_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (primary, address) = start_primary(open(d, "primary.fs")).await;
    let mut c = Committer { next_key: 0 };
    make_history(&primary, &mut c, 3).await;
    let replica = start_replica(open(d, "replica.fs"), &address, None);
    wait_caught_up(&replica, &primary).await;
    replica.close().await.unwrap();
    drop(replica);
    // The replica's file gets two transactions of its own (as an old primary would).
    let mut own = Vec::new();
    {
        let fs = Node::new(open(d, "replica.fs"), Role::Primary);
        for i in 0..2 {
            let s = serial(&fs, 9).await;
            own.push(
                c.commit(&fs, vec![store(9, s, &format!("own {i}"))], "x")
                    .await,
            );
        }
        fs.close().await.unwrap();
    }
    make_history(&primary, &mut c, 2).await;
    let before = std::fs::read(d.join("replica.fs")).unwrap();
    for dialect in [None, Some(Dialect::Stock)] {
        let replica = start_replica(open(d, "replica.fs"), &address, dialect);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let refused = match dialect {
                None => replica.stats().link() == LinkState::Diverged,
                Some(_) => replica.status_fields().iter().any(|(k, v)| {
                    *k == "replication-error" && v.contains("closed the connection without")
                }),
            };
            if refused {
                break;
            }
            assert!(Instant::now() < deadline, "{:?}", replica.status_fields());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if dialect.is_none() {
            let error = replica
                .status_fields()
                .into_iter()
                .find(|(k, _)| *k == "replication-error")
                .unwrap()
                .1;
            for t in &own {
                assert!(error.contains(&t.to_string()), "{error}");
            }
        }
        replica.close().await.unwrap();
        drop(replica);
        assert_eq!(std::fs::read(d.join("replica.fs")).unwrap(), before);
    }
    primary.close().await.unwrap();
}

/// Pack is local to each node: the primary packs, and a replica that was behind (whose
/// last transaction the pack removed) still follows it and ends with the same current
/// state; the replica can pack its own file too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_goes_on_across_packs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (primary, address) = start_primary(open(d, "primary.fs")).await;
    let mut c = Committer { next_key: 0 };
    make_history(&primary, &mut c, 5).await;
    let replica = start_replica(open(d, "replica.fs"), &address, None);
    wait_caught_up(&replica, &primary).await;
    let replica_last = replica.last_transaction();
    replica.close().await.unwrap();
    drop(replica);
    make_history(&primary, &mut c, 5).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    primary.pack(zodb::timestamp::now_unix()).await.unwrap();
    make_history(&primary, &mut c, 2).await;
    // The pack removed the replica's last transaction (all its records were superseded).
    assert!(primary
        .file_storage()
        .core()
        .view()
        .find_txn(replica_last)
        .unwrap()
        .is_none());
    let replica = start_replica(open(d, "replica.fs"), &address, None);
    wait_caught_up(&replica, &primary).await;
    for oid in [0, 1, 2] {
        let a = primary
            .load_before(Oid(oid), Tid::MAX)
            .await
            .unwrap()
            .revision;
        let b = replica
            .load_before(Oid(oid), Tid::MAX)
            .await
            .unwrap()
            .revision;
        assert_eq!(a, b, "oid {oid}");
    }
    replica.pack(zodb::timestamp::now_unix()).await.unwrap();
    make_history(&primary, &mut c, 2).await;
    wait_caught_up(&replica, &primary).await;
    for oid in [0, 1, 2] {
        let a = primary
            .load_before(Oid(oid), Tid::MAX)
            .await
            .unwrap()
            .revision;
        let b = replica
            .load_before(Oid(oid), Tid::MAX)
            .await
            .unwrap()
            .revision;
        assert_eq!(a, b, "oid {oid}");
    }
    replica.close().await.unwrap();
    primary.close().await.unwrap();
}
