//! A panic while serving one connection (a bug, none is known to be reachable) is
//! confined to that connection: the server keeps serving everyone else, and the
//! connection is cleaned up as if it had dropped, so a transaction it had voted is
//! aborted and the next commit goes through.

mod support;

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{commit_one, file_storage, serve, Client, RECORD};
use zeo_proto::message::Encoding;
use zeo_proto::Value;
use zodb::{
    HistoryEntry, InvalidationSink, LoadBefore, Oid, Storage, StorageInfo, Tid, Transaction,
    TxnKey, Vote,
};

/// Loading this oid panics.
const BOMB: Oid = Oid(0xdead);

/// A FileStorage with a bug planted in `load_before`.
struct Panicky(Arc<filestorage::FileStorage>);

#[async_trait]
impl Storage for Panicky {
    fn info(&self) -> StorageInfo {
        self.0.info()
    }
    fn is_read_only(&self) -> bool {
        self.0.is_read_only()
    }
    fn last_transaction(&self) -> Tid {
        self.0.last_transaction()
    }
    fn attach(&self, sink: Arc<dyn InvalidationSink>) {
        self.0.attach(sink)
    }
    async fn load_before(&self, oid: Oid, before: Tid) -> zodb::Result<LoadBefore> {
        if oid == BOMB {
            panic!("planted bug: load of {oid}");
        }
        self.0.load_before(oid, before).await
    }
    async fn load_serial(&self, oid: Oid, serial: Tid) -> zodb::Result<Bytes> {
        self.0.load_serial(oid, serial).await
    }
    async fn history(&self, oid: Oid, size: usize) -> zodb::Result<Vec<HistoryEntry>> {
        self.0.history(oid, size).await
    }
    async fn new_oids(&self, count: usize) -> zodb::Result<Vec<Oid>> {
        self.0.new_oids(count).await
    }
    async fn vote(&self, txn: &Transaction) -> zodb::Result<Vote> {
        self.0.vote(txn).await
    }
    async fn finish(&self, key: TxnKey) -> zodb::Result<Tid> {
        self.0.finish(key).await
    }
    async fn abort(&self, key: TxnKey) {
        self.0.abort(key).await
    }
    async fn recent_transactions(&self, count: usize) -> zodb::Result<Vec<(Tid, Vec<Oid>)>> {
        self.0.recent_transactions(count).await
    }
    async fn close(&self) -> zodb::Result<()> {
        self.0.close().await
    }
}

#[test]
fn a_panic_in_one_connection_aborts_its_transaction_and_spares_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(Panicky(file_storage(dir.path())));
    let (_server, addr) = serve(storage, server::ServerConfig::default());
    commit_one(&addr).unwrap();

    // A client votes, so it holds the commit lock and the storage has its data staged...
    let mut a = Client::connect(&addr, Encoding::Pickle).unwrap();
    a.call("register", vec![Value::str("1"), Value::Bool(false)])
        .unwrap();
    let oid = a
        .call("new_oids", vec![Value::Int(1)])
        .unwrap()
        .as_seq()
        .unwrap()[0]
        .clone();
    let txn = Value::Int(1);
    let begin = vec![
        txn.clone(),
        Value::bytes(&b""[..]),
        Value::bytes(&b""[..]),
        Value::Dict(vec![]),
        Value::None,
        Value::str(" "),
    ];
    a.send("tpc_begin", begin, true).unwrap();
    let store = vec![
        oid,
        Value::bytes(vec![0u8; 8]),
        Value::bytes(RECORD),
        txn.clone(),
    ];
    a.send("storea", store, true).unwrap();
    a.call("vote", vec![txn]).unwrap();
    // ...then trips the bug.
    let bomb = vec![Value::from(BOMB), Value::from(Tid::MAX)];
    a.send("loadBefore", bomb, false).unwrap();
    assert!(
        a.drain_until_closed(Duration::from_secs(10)),
        "the panicking connection was not closed"
    );

    // Everyone else goes on: the lock is free and the storage has nothing staged.
    let t0 = Instant::now();
    commit_one(&addr).expect("a commit after the panic");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let mut b = Client::connect(&addr, Encoding::Msgpack).unwrap();
    b.call("register", vec![Value::str("1"), Value::Bool(true)])
        .unwrap();
    b.call("ping", vec![]).unwrap();
    // The other clients have hung up, but the server notices a hang-up asynchronously:
    // the count must come down to this one connection, not be there at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = b.call("server_status", vec![]).unwrap();
        let connections = status.get("connections").and_then(Value::as_int);
        if connections == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections stayed at {connections:?}: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
