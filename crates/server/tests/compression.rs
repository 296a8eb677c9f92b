//! zstd between zeors peers (`zeors_compress`), over real sockets: a client that asks
//! gets both directions compressed; one that does not (every stock client) sees plain
//! ZEO; a hostile compressed stream costs its own connection only.

mod support;

use std::time::Duration;
use support::{commit_one, file_storage, serve, Client};
use zeo_proto::message::Encoding;
use zeo_proto::Value;
use zodb::Tid;

/// A record that compresses well, as application text does: a PersistentMapping's class
/// pickle and a long, repetitive string as its state.
fn text_record(len: usize) -> Vec<u8> {
    let text = "lorem ipsum dolor sit amet ".repeat(len / 27 + 1);
    let mut r = b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.\x80\x03X".to_vec();
    r.extend_from_slice(&(text.len() as u32).to_le_bytes());
    r.extend_from_slice(text.as_bytes());
    r.push(b'.');
    r
}

/// Commits `data` as a new object; returns its oid.
fn commit(c: &mut Client, data: &[u8]) -> Value {
    support::commit_new(c, data).unwrap().0
}

/// Bytes read off the socket for `loads` loads of `oid`.
fn load_bytes(c: &mut Client, oid: &Value, loads: usize, expected: &[u8]) -> usize {
    let before = c.wire_in;
    for _ in 0..loads {
        let r = c
            .call("loadBefore", vec![oid.clone(), Value::from(Tid::MAX)])
            .unwrap();
        let data = r.as_seq().unwrap()[0].as_bytes().unwrap().to_vec();
        assert_eq!(data, expected);
    }
    c.wire_in - before
}

#[test]
fn a_client_that_asks_gets_both_directions_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(file_storage(dir.path()), server::ServerConfig::default());
    let record = text_record(20_000);

    let mut plain = Client::connect(&addr, Encoding::Pickle).unwrap();
    plain
        .call("register", vec![Value::str("1"), Value::Bool(false)])
        .unwrap();
    let info = plain.call("get_info", vec![]).unwrap();
    let extensions = format!("{:?}", info.get("zeors_extensions"));
    assert!(extensions.contains("zstd"), "{extensions}");
    let oid = commit(&mut plain, &record);

    let mut zstd = Client::connect(&addr, Encoding::Pickle).unwrap();
    zstd.call("register", vec![Value::str("1"), Value::Bool(false)])
        .unwrap();
    zstd.start_compression().unwrap();
    // Its commits arrive (the server decompresses) and its loads come back compressed.
    let oid2 = commit(&mut zstd, &record);
    let plain_bytes = load_bytes(&mut plain, &oid2, 50, &record);
    let zstd_bytes = load_bytes(&mut zstd, &oid, 50, &record);
    assert!(
        zstd_bytes * 10 < plain_bytes,
        "compressed {zstd_bytes} bytes, plain {plain_bytes}"
    );
    // Invalidations reach the compressed connection in its stream, as callbacks.
    commit_one(&addr).unwrap();
    let m = loop {
        let m = zstd.recv().unwrap();
        if m.name == "invalidateTransaction" {
            break m;
        }
    };
    assert_eq!(m.args.as_seq().unwrap().len(), 2);
    zstd.call("ping", vec![]).unwrap();
}

#[test]
fn a_zstd_bomb_is_a_protocol_error_for_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(file_storage(dir.path()), server::ServerConfig::default());
    let mut other = Client::connect(&addr, Encoding::Pickle).unwrap();
    other
        .call("register", vec![Value::str("1"), Value::Bool(false)])
        .unwrap();

    let mut bomb = Client::connect(&addr, Encoding::Pickle).unwrap();
    bomb.call("register", vec![Value::str("1"), Value::Bool(false)])
        .unwrap();
    bomb.start_compression().unwrap();
    // A frame announcing 4 GB (over the 512 MB limit) and 256 MB of its zeros: a few KB
    // once compressed.
    // The server may hang up before the end: a failed write is not the test's failure.
    bomb.send_raw(&u32::MAX.to_be_bytes()).unwrap();
    for _ in 0..256 {
        if bomb.send_raw(&[0u8; 1 << 20]).is_err() {
            break;
        }
    }
    assert!(
        bomb.drain_until_closed(Duration::from_secs(10)),
        "the bomb's connection was not closed"
    );

    // A bomb within the frame limit: frames of nothing, each an undecodable message.
    let mut zeros = Client::connect(&addr, Encoding::Pickle).unwrap();
    zeros
        .call("register", vec![Value::str("1"), Value::Bool(false)])
        .unwrap();
    zeros.start_compression().unwrap();
    for _ in 0..64 {
        if zeros.send_raw(&[0u8; 1 << 20]).is_err() {
            break;
        }
    }
    assert!(zeros.drain_until_closed(Duration::from_secs(10)));

    // Not zstd at all.
    let mut garbage = Client::connect(&addr, Encoding::Pickle).unwrap();
    garbage
        .call("register", vec![Value::str("1"), Value::Bool(false)])
        .unwrap();
    garbage.start_compression().unwrap();
    use std::io::Write;
    garbage
        .stream
        .write_all(b"this is not zstd at all")
        .unwrap();
    assert!(garbage.drain_until_closed(Duration::from_secs(10)));

    // A method the server does not have ends the connection (the client already
    // compresses what follows its request).
    let mut gzip = Client::connect(&addr, Encoding::Pickle).unwrap();
    gzip.send("zeors_compress", vec![Value::str("gzip")], false)
        .unwrap();
    assert!(gzip.drain_until_closed(Duration::from_secs(10)));

    // Everyone else goes on.
    other.call("ping", vec![]).unwrap();
    commit_one(&addr).expect("a commit after the bombs");
}

/// Requests that arrive in the same read as the switch, behind requests that fill the
/// client's pipeline, are run once the pipeline drains: decompressed requests are held
/// back by the pipelining limit, never forgotten until the client sends more (which it
/// would not: it waits for their replies).
#[test]
fn requests_held_back_by_the_pipeline_limit_are_run_when_it_drains() {
    let dir = tempfile::tempdir().unwrap();
    let config = server::ServerConfig {
        max_pipelined: 1,
        ..Default::default()
    };
    let (_server, addr) = serve(file_storage(dir.path()), config);
    let oid = {
        let mut c = Client::connect(&addr, Encoding::Pickle).unwrap();
        c.call("register", vec![Value::str("1"), Value::Bool(false)])
            .unwrap();
        commit(&mut c, &text_record(1000))
    };
    let mut c = Client::connect(&addr, Encoding::Pickle).unwrap();
    c.call("register", vec![Value::str("1"), Value::Bool(false)])
        .unwrap();
    let load = || ("loadBefore", vec![oid.clone(), Value::from(Tid::MAX)]);
    let (before, after) = c
        .compress_in_one_write(
            vec![load(), load()],
            vec![
                load(),
                ("ping", vec![]),
                load(),
                ("lastTransaction", vec![]),
            ],
        )
        .unwrap();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut waiting: std::collections::BTreeSet<i64> = before.into_iter().chain(after).collect();
    while !waiting.is_empty() {
        let m = c.recv().expect("a reply for every request");
        if m.name == zeo_proto::message::REPLY {
            assert!(!m.is_exception(), "{:?}", m.args);
            waiting.remove(&m.msgid.as_int().unwrap());
        }
    }
}
