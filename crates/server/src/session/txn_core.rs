//! The transaction state machine of one connection, without I/O (events in, actions out,
//! in the style of quinn-proto): what `tpc_begin`, the buffered operations, `vote`,
//! `tpc_finish`, `tpc_abort`, a timeout and a disconnect do to a transaction, and which
//! replies and storage calls follow. The async shell ([`super::txn`]) runs the actions —
//! takes and releases the commit lock, calls the storage, writes replies — and feeds the
//! outcomes back as events. Time comes in with the events, so tests drive it on a
//! virtual clock.
//!
//! Invariants:
//! - The commit lock is held from the moment the first vote gets it until the
//!   transaction finishes or aborts — **conflict rounds included**: once a vote has
//!   returned conflicts, the lock stays with this transaction while the client resolves
//!   them and votes again, so the second vote cannot meet a new conflict.
//! - Every path that ends a transaction holding the lock (finish, abort, a failed vote,
//!   timeout, disconnect) releases it exactly once, after telling the storage to drop
//!   whatever the transaction staged.
//! - Buffered operations are accepted only for the open transaction, between
//!   `tpc_begin` and the vote that makes it ready; a misuse closes the connection, as a
//!   failing one-way call does in ZEO.
//! - A transaction's data is bounded ([`TxnCore::new`]'s `max_size`): past the bound its
//!   operations are dropped as they arrive (memory and spill space stay bounded) and its
//!   vote fails with the reason, as a store error is reported at the vote in ZEO.

use std::time::{Duration, Instant};
use zeo_proto::exception::ProtocolError;
use zeo_proto::reply::{VoteItem, VoteResult};
use zeo_proto::Value;
use zodb::{Oid, StorageError, Transaction, TransactionMeta, TxnKey, TxnOp, Vote};

/// What became of a vote in the storage, as the shell reports it: the storage's verdict
/// and the conflicts the server resolved itself on the way (see
/// [`super::txn::resolve_natively`]).
#[derive(Debug)]
pub struct VoteReport {
    pub result: Result<Vote, StorageError>,
    /// Oids whose conflicts the server resolved in this round.
    pub resolved: Vec<Oid>,
}

/// Inputs.
#[derive(Debug)]
pub enum Event {
    Begin {
        id: Value,
        key: TxnKey,
        meta: TransactionMeta,
    },
    /// A buffered operation (`storea`, `restorea`, …, a finished blob upload).
    Op {
        id: Value,
        op: TxnOp,
        what: &'static str,
    },
    /// A buffered operation the shell could not keep: the transaction's vote fails with
    /// `error`.
    OpLost {
        id: Value,
        error: StorageError,
    },
    Vote {
        msgid: Value,
        id: Value,
    },
    /// The storage answered the vote the shell started with [`Action::Vote`].
    Voted {
        txn: Transaction,
        report: VoteReport,
        now: Instant,
    },
    Finish {
        msgid: Value,
        id: Value,
    },
    /// The finish task the shell started with [`Action::Finish`] is done (it has replied
    /// and released the lock itself, in that order).
    Finished,
    Abort {
        msgid: Value,
        id: Value,
    },
    /// The deadline from the last [`Action::Deadline`] passed.
    Timeout,
    /// The vote task was lost (it panicked) and its transaction with it.
    VoteLost,
    /// The connection is gone.
    Disconnected,
}

/// Outputs, to be run in order.
#[derive(Debug)]
pub enum Action {
    Reply {
        msgid: Value,
        answer: Answer,
    },
    /// Take the commit lock unless this transaction holds it already, then vote
    /// `txn` in the storage (with native conflict resolution) and report
    /// [`Event::Voted`].
    Vote {
        txn: Transaction,
        lock_held: bool,
    },
    /// Finish `key` in the storage: reply to `msgid` with the tid, then release the lock,
    /// then report [`Event::Finished`].
    Finish {
        key: TxnKey,
        msgid: Value,
    },
    /// Drop what `key` staged in the storage (it holds the lock).
    AbortInStorage {
        key: TxnKey,
    },
    ReleaseLock {
        key: TxnKey,
    },
    /// When the commit lock must be released by, if the connection holds it (`None`:
    /// no deadline).
    Deadline(Option<Instant>),
    /// A transaction began (for statistics).
    Began,
    /// The transaction ended (for statistics and its temporary files).
    Ended {
        aborted: bool,
    },
    /// Close the connection.
    Close(Closing),
}

/// Why the core closes the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Closing {
    /// A misuse of the protocol (there is no way to answer a one-way call).
    Protocol(String),
    /// The transaction held the commit lock past its deadline.
    Timeout,
}

/// A reply the core decides.
#[derive(Debug)]
pub enum Answer {
    None,
    Vote(VoteResult),
    Error(StorageError),
    Protocol(ProtocolError),
}

/// Errors compare by their text (a storage error may carry an `io::Error`).
impl PartialEq for Answer {
    fn eq(&self, other: &Answer) -> bool {
        match (self, other) {
            (Answer::None, Answer::None) => true,
            (Answer::Vote(a), Answer::Vote(b)) => a == b,
            (Answer::Error(a), Answer::Error(b)) => a.to_string() == b.to_string(),
            (Answer::Protocol(a), Answer::Protocol(b)) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug)]
enum Phase {
    Idle,
    /// Buffering operations.
    Begun(Open),
    /// The storage is voting (the shell holds the transaction); a `tpc_abort` that
    /// arrives meanwhile is answered once the vote is back.
    Voting {
        id: Value,
        key: TxnKey,
        msgid: Value,
        abort: Option<Value>,
    },
    /// Conflicts went back to the client; it holds the lock and buffers its resolutions.
    Resolving(Open),
    /// Ready; the lock is held until finish or abort.
    Voted(Open),
    /// The shell is finishing.
    Finishing,
}

#[derive(Debug)]
struct Open {
    id: Value,
    txn: Transaction,
    /// Bytes of record data the client has sent in this transaction.
    size: u64,
    /// Set once `size` passed the bound: the operations were dropped.
    too_large: bool,
    /// An operation the shell could not keep (its data could not be spilled): the vote
    /// fails with this.
    lost: Option<StorageError>,
}

impl Open {
    fn new(id: Value, txn: Transaction) -> Open {
        Open {
            id,
            size: txn.ops.iter().map(data_len).sum(),
            txn,
            too_large: false,
            lost: None,
        }
    }

    /// Why the vote must fail without reaching the storage, if it must.
    fn refusal(&mut self, max_size: u64) -> Option<StorageError> {
        if self.too_large {
            return Some(StorageError::Limit(format!(
                "the transaction's data ({} bytes) exceeds this server's limit of {max_size} \
                 bytes (--max-transaction-size); nothing was committed",
                self.size
            )));
        }
        self.lost.take()
    }

    fn push(&mut self, op: TxnOp, max_size: u64) {
        self.size = self.size.saturating_add(data_len(&op));
        if self.size > max_size {
            // Nothing of it can be committed: let go of what it holds now.
            self.too_large = true;
            self.txn.ops = Vec::new();
        }
        if !self.too_large && self.lost.is_none() {
            self.txn.ops.push(op);
        }
    }
}

/// The record data an operation carries (what a transaction's bound counts).
pub fn data_len(op: &TxnOp) -> u64 {
    match op {
        TxnOp::Store { data, .. } | TxnOp::StoreBlob { data, .. } => data.len() as u64,
        TxnOp::Restore { data, .. } => data.as_ref().map_or(0, |d| d.len() as u64),
        TxnOp::CheckCurrent { .. } | TxnOp::Delete { .. } | TxnOp::Undo { .. } => 0,
    }
}

/// One connection's transaction.
#[derive(Debug)]
pub struct TxnCore {
    phase: Phase,
    timeout: Option<Duration>,
    /// The most record data one transaction may carry.
    max_size: u64,
    /// When the lock was first held by the current transaction plus `timeout`.
    deadline: Option<Instant>,
}

impl TxnCore {
    pub fn new(timeout: Option<Duration>, max_size: u64) -> TxnCore {
        TxnCore {
            phase: Phase::Idle,
            timeout,
            max_size,
            deadline: None,
        }
    }

    /// Whether a `tpc_finish` is being run (a new `tpc_begin` must wait for it: the
    /// client sends it as soon as it has the finish reply).
    pub fn is_finishing(&self) -> bool {
        matches!(self.phase, Phase::Finishing)
    }

    /// Whether `id` is the transaction buffering operations (blob uploads check it
    /// before they start writing a file).
    pub fn accepts_ops(&self, id: Option<&Value>) -> bool {
        match &self.phase {
            Phase::Begun(o) | Phase::Resolving(o) => id.is_none_or(|id| o.id == *id),
            _ => false,
        }
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Begin { id, key, meta } => self.begin(id, key, meta, &mut out),
            Event::Op { id, op, what } => match &mut self.phase {
                Phase::Begun(o) | Phase::Resolving(o) if o.id == id => o.push(op, self.max_size),
                _ => out.push(Action::Close(Closing::Protocol(format!(
                    "{what} without tpc_begin"
                )))),
            },
            Event::OpLost { id, error } => match &mut self.phase {
                Phase::Begun(o) | Phase::Resolving(o) if o.id == id => {
                    o.lost.get_or_insert(error);
                    o.txn.ops = Vec::new();
                }
                _ => {}
            },
            Event::Vote { msgid, id } => self.vote(msgid, id, &mut out),
            Event::Voted { txn, report, now } => self.voted(txn, report, now, &mut out),
            Event::Finish { msgid, id } => self.finish(msgid, id, &mut out),
            Event::Finished => {
                if self.is_finishing() {
                    self.phase = Phase::Idle;
                }
            }
            Event::Abort { msgid, id } => self.abort(msgid, id, &mut out),
            Event::Timeout => {
                if self.holds_lock() {
                    self.end_holding_lock(&mut out);
                    out.push(Action::Close(Closing::Timeout));
                }
            }
            Event::VoteLost => {
                if let Phase::Voting { key, msgid, .. } =
                    std::mem::replace(&mut self.phase, Phase::Idle)
                {
                    out.push(Action::ReleaseLock { key });
                    out.push(Action::Ended { aborted: true });
                    self.deadline = None;
                    out.push(Action::Deadline(None));
                    out.push(Action::Reply {
                        msgid,
                        answer: error(StorageError::Transaction(
                            "the vote failed unexpectedly; the transaction was aborted".into(),
                        )),
                    });
                }
            }
            Event::Disconnected => self.disconnected(&mut out),
        }
        out
    }

    fn holds_lock(&self) -> bool {
        matches!(self.phase, Phase::Resolving(_) | Phase::Voted(_))
    }

    fn begin(&mut self, id: Value, key: TxnKey, meta: TransactionMeta, out: &mut Vec<Action>) {
        match &self.phase {
            Phase::Idle => {
                out.push(Action::Began);
                self.phase = Phase::Begun(Open::new(
                    id,
                    Transaction {
                        key,
                        meta,
                        ops: Vec::new(),
                    },
                ));
            }
            // ClientStorage may repeat it (a recovery transaction); harmless.
            Phase::Begun(o) if o.id == id => {}
            _ => out.push(Action::Close(Closing::Protocol(
                "duplicate tpc_begin".into(),
            ))),
        }
    }

    fn vote(&mut self, msgid: Value, id: Value, out: &mut Vec<Action>) {
        let (mut open, lock_held) = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Begun(o) if o.id == id => (o, false),
            Phase::Resolving(o) if o.id == id => (o, true),
            other => {
                self.phase = other;
                out.push(Action::Reply {
                    msgid,
                    answer: error(StorageError::Transaction(
                        "vote for a transaction that is not open on this connection".into(),
                    )),
                });
                return;
            }
        };
        if let Some(e) = open.refusal(self.max_size) {
            if lock_held {
                self.phase = Phase::Resolving(open);
                self.end_holding_lock(out);
            } else {
                out.push(Action::Ended { aborted: true });
            }
            out.push(Action::Reply {
                msgid,
                answer: error(e),
            });
            return;
        }
        self.phase = Phase::Voting {
            id: open.id,
            key: open.txn.key,
            msgid,
            abort: None,
        };
        out.push(Action::Vote {
            txn: open.txn,
            lock_held,
        });
    }

    fn voted(&mut self, txn: Transaction, report: VoteReport, now: Instant, out: &mut Vec<Action>) {
        let Phase::Voting {
            id,
            key,
            msgid,
            abort,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        let resolved = report.resolved.into_iter().map(VoteItem::Resolved);
        let open = Open::new(id, txn);
        let holding = match report.result {
            Ok(Vote::Ok { changed }) => {
                let mut items: Vec<VoteItem> = resolved.collect();
                items.extend(changed.into_iter().map(VoteItem::Resolved));
                out.push(Action::Reply {
                    msgid,
                    answer: Answer::Vote(VoteResult(items)),
                });
                self.phase = Phase::Voted(open);
                true
            }
            Ok(Vote::Conflicts(conflicts)) => {
                let mut items: Vec<VoteItem> = resolved.collect();
                items.extend(conflicts.into_iter().map(VoteItem::Conflict));
                out.push(Action::Reply {
                    msgid,
                    answer: Answer::Vote(VoteResult(items)),
                });
                self.phase = Phase::Resolving(open);
                true
            }
            Err(e) => {
                // The storage dropped the attempt: the transaction is over.
                out.push(Action::ReleaseLock { key });
                out.push(Action::Ended { aborted: true });
                self.deadline = None;
                out.push(Action::Deadline(None));
                out.push(Action::Reply {
                    msgid,
                    answer: error(e),
                });
                false
            }
        };
        if holding && self.deadline.is_none() {
            self.deadline = self.timeout.map(|t| now + t);
            out.push(Action::Deadline(self.deadline));
        }
        if let Some(abort_msgid) = abort {
            if holding {
                self.end_holding_lock(out);
            }
            out.push(Action::Reply {
                msgid: abort_msgid,
                answer: Answer::None,
            });
        }
    }

    fn finish(&mut self, msgid: Value, id: Value, out: &mut Vec<Action>) {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Voted(o) if o.id == id => {
                self.deadline = None;
                out.push(Action::Deadline(None));
                out.push(Action::Finish {
                    key: o.txn.key,
                    msgid,
                });
                out.push(Action::Ended { aborted: false });
                self.phase = Phase::Finishing;
            }
            Phase::Begun(o) if o.id == id => {
                self.phase = Phase::Begun(o);
                out.push(Action::Reply {
                    msgid,
                    answer: Answer::Protocol(ProtocolError::FinishedWithoutLock),
                });
            }
            Phase::Resolving(o) if o.id == id => {
                // The client gave up re-voting (ZEO tries 9 times) with conflicts left.
                self.phase = Phase::Resolving(o);
                out.push(Action::Reply {
                    msgid,
                    answer: Answer::Protocol(ProtocolError::FinishedWithoutLock),
                });
            }
            other => {
                // No such transaction: Python answers None.
                self.phase = other;
                out.push(Action::Reply {
                    msgid,
                    answer: Answer::None,
                });
            }
        }
    }

    fn abort(&mut self, msgid: Value, id: Value, out: &mut Vec<Action>) {
        match &mut self.phase {
            Phase::Voting { id: vid, abort, .. } if *vid == id => {
                *abort = Some(msgid);
                return;
            }
            Phase::Begun(o) if o.id == id => {
                self.phase = Phase::Idle;
                out.push(Action::Ended { aborted: true });
            }
            Phase::Resolving(o) | Phase::Voted(o) if o.id == id => self.end_holding_lock(out),
            _ => {}
        }
        out.push(Action::Reply {
            msgid,
            answer: Answer::None,
        });
    }

    /// Ends a transaction that holds the lock: the storage drops it, then the lock goes.
    fn end_holding_lock(&mut self, out: &mut Vec<Action>) {
        if let Phase::Resolving(o) | Phase::Voted(o) =
            std::mem::replace(&mut self.phase, Phase::Idle)
        {
            out.push(Action::AbortInStorage { key: o.txn.key });
            out.push(Action::ReleaseLock { key: o.txn.key });
            out.push(Action::Ended { aborted: true });
        }
        self.deadline = None;
        out.push(Action::Deadline(None));
    }

    fn disconnected(&mut self, out: &mut Vec<Action>) {
        match &self.phase {
            Phase::Begun(_) => {
                self.phase = Phase::Idle;
                out.push(Action::Ended { aborted: true });
            }
            Phase::Resolving(_) | Phase::Voted(_) => self.end_holding_lock(out),
            // The shell waits for the vote or the finish and reports it first.
            Phase::Voting { .. } | Phase::Finishing | Phase::Idle => {}
        }
    }
}

fn error(e: StorageError) -> Answer {
    Answer::Error(e)
}

#[cfg(test)]
mod tests {
    //! The core driven against a fake storage and a fake commit lock shared by several
    //! connections, on a virtual clock: the shell's job done synchronously.
    use super::*;
    use bytes::Bytes;
    use std::collections::{HashMap, VecDeque};
    use zodb::{Conflict, Tid};

    /// The transaction bound of the cores under test, in bytes of record data.
    const MAX_SIZE: u64 = 100;

    /// A storage of serials only: a store conflicts when its serial is not the committed
    /// one; the last store of an oid in a transaction wins, as in FileStorage.
    #[derive(Default)]
    struct FakeStorage {
        committed: HashMap<Oid, Tid>,
        last: u64,
        staged: Option<(TxnKey, Vec<Oid>)>,
        votes: usize,
    }

    impl FakeStorage {
        fn vote(&mut self, txn: &Transaction) -> Result<Vote, StorageError> {
            self.votes += 1;
            assert!(
                self.staged.is_none(),
                "a vote while another is staged: the lock failed"
            );
            let mut last: HashMap<Oid, (Tid, Bytes)> = HashMap::new();
            for op in &txn.ops {
                if let TxnOp::Store { oid, serial, data } = op {
                    last.insert(*oid, (*serial, data.clone()));
                }
            }
            let mut conflicts: Vec<Conflict> = last
                .iter()
                .filter(|(oid, (serial, _))| {
                    self.committed.get(oid).copied().unwrap_or(Tid::ZERO) != *serial
                })
                .map(|(oid, (serial, data))| Conflict {
                    oid: *oid,
                    committed: self.committed[oid],
                    read: *serial,
                    data: data.clone(),
                })
                .collect();
            if !conflicts.is_empty() {
                conflicts.sort_by_key(|c| c.oid);
                return Ok(Vote::Conflicts(conflicts));
            }
            self.staged = Some((txn.key, last.into_keys().collect()));
            Ok(Vote::Ok { changed: vec![] })
        }

        fn finish(&mut self, key: TxnKey) -> Tid {
            let (k, oids) = self
                .staged
                .take()
                .expect("finish without a staged transaction");
            assert_eq!(k, key);
            self.last += 1;
            for oid in oids {
                self.committed.insert(oid, Tid(self.last));
            }
            Tid(self.last)
        }

        fn abort(&mut self, key: TxnKey) {
            if self.staged.as_ref().is_some_and(|(k, _)| *k == key) {
                self.staged = None;
            }
        }
    }

    /// Connections, their cores, the commit lock and the fake storage.
    struct World {
        storage: FakeStorage,
        cores: Vec<TxnCore>,
        replies: Vec<Vec<(Value, Answer)>>,
        closed: Vec<Option<Closing>>,
        lock: Option<TxnKey>,
        /// Votes waiting for the lock: (connection, transaction).
        waiting: VecDeque<(usize, Transaction)>,
        /// Votes started but whose answer the test delivers itself.
        held_votes: Vec<(usize, Transaction, VoteReport)>,
        hold: bool,
        deadlines: Vec<Option<Instant>>,
        now: Instant,
        next_key: u64,
    }

    impl World {
        fn new(connections: usize, timeout: Option<Duration>) -> World {
            World {
                storage: FakeStorage::default(),
                cores: (0..connections)
                    .map(|_| TxnCore::new(timeout, MAX_SIZE))
                    .collect(),
                replies: (0..connections).map(|_| Vec::new()).collect(),
                closed: vec![None; connections],
                lock: None,
                waiting: VecDeque::new(),
                held_votes: Vec::new(),
                hold: false,
                deadlines: vec![None; connections],
                now: Instant::now(),
                next_key: 1,
            }
        }

        fn send(&mut self, c: usize, event: Event) {
            let actions = self.cores[c].handle(event);
            self.run(c, actions);
        }

        fn run(&mut self, c: usize, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::Reply { msgid, answer } => self.replies[c].push((msgid, answer)),
                    Action::Vote { txn, lock_held } => {
                        if lock_held {
                            assert_eq!(
                                self.lock,
                                Some(txn.key),
                                "a conflict round without the lock"
                            );
                            self.vote_now(c, txn);
                        } else if self.lock.is_none() {
                            self.lock = Some(txn.key);
                            self.vote_now(c, txn);
                        } else {
                            self.waiting.push_back((c, txn));
                        }
                    }
                    Action::Finish { key, msgid } => {
                        let tid = self.storage.finish(key);
                        self.replies[c].push((
                            msgid,
                            Answer::Vote(VoteResult(vec![VoteItem::Resolved(Oid(tid.0))])),
                        ));
                        self.release(key);
                        self.send(c, Event::Finished);
                    }
                    Action::AbortInStorage { key } => self.storage.abort(key),
                    Action::ReleaseLock { key } => self.release(key),
                    Action::Deadline(d) => self.deadlines[c] = d,
                    Action::Began | Action::Ended { .. } => {}
                    Action::Close(why) => self.closed[c] = Some(why),
                }
            }
        }

        fn vote_now(&mut self, c: usize, txn: Transaction) {
            let result = self.storage.vote(&txn);
            let report = VoteReport {
                result,
                resolved: vec![],
            };
            if self.hold {
                self.held_votes.push((c, txn, report));
            } else {
                let now = self.now;
                self.send(c, Event::Voted { txn, report, now });
            }
        }

        fn release(&mut self, key: TxnKey) {
            assert_eq!(self.lock, Some(key), "released a lock it did not hold");
            self.lock = None;
            if let Some((c, txn)) = self.waiting.pop_front() {
                self.lock = Some(txn.key);
                self.vote_now(c, txn);
            }
        }

        fn begin(&mut self, c: usize, id: i64) {
            let key = self.next_key;
            self.next_key += 1;
            self.send(
                c,
                Event::Begin {
                    id: Value::Int(id),
                    key,
                    meta: TransactionMeta::default(),
                },
            );
        }

        fn store(&mut self, c: usize, id: i64, oid: u64, serial: Tid) {
            self.store_sized(c, id, oid, serial, 1);
        }

        fn store_sized(&mut self, c: usize, id: i64, oid: u64, serial: Tid, len: usize) {
            self.send(
                c,
                Event::Op {
                    id: Value::Int(id),
                    op: TxnOp::Store {
                        oid: Oid(oid),
                        serial,
                        data: Bytes::from(vec![b'x'; len]),
                    },
                    what: "storea",
                },
            );
        }

        fn vote(&mut self, c: usize, id: i64) {
            self.send(
                c,
                Event::Vote {
                    msgid: Value::str("vote"),
                    id: Value::Int(id),
                },
            );
        }

        fn finish(&mut self, c: usize, id: i64) {
            self.send(
                c,
                Event::Finish {
                    msgid: Value::str("finish"),
                    id: Value::Int(id),
                },
            );
        }

        /// Commits a store of `oid` on connection `c` at its current serial.
        fn commit(&mut self, c: usize, id: i64, oid: u64) {
            let serial = self
                .storage
                .committed
                .get(&Oid(oid))
                .copied()
                .unwrap_or(Tid::ZERO);
            self.begin(c, id);
            self.store(c, id, oid, serial);
            self.vote(c, id);
            self.finish(c, id);
        }

        fn last_reply(&self, c: usize) -> Option<&Answer> {
            self.replies[c].last().map(|(_, a)| a)
        }

        fn conflicts_in_last_reply(&self, c: usize) -> Vec<Conflict> {
            match self.last_reply(c) {
                Some(Answer::Vote(v)) => v.conflicts().cloned().collect(),
                other => panic!("not a vote reply: {other:?}"),
            }
        }
    }

    #[test]
    fn conflict_rounds_keep_the_lock_so_the_second_vote_cannot_conflict_again() {
        let mut w = World::new(3, None);
        w.commit(2, 1, 1);
        let t1 = w.storage.committed[&Oid(1)];
        // Two clients changed object 1 from an older revision.
        w.begin(0, 10);
        w.store(0, 10, 1, Tid::ZERO);
        w.begin(1, 20);
        w.store(1, 20, 1, Tid::ZERO);
        w.vote(0, 10);
        let c = w.conflicts_in_last_reply(0);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].committed, c[0].read), (t1, Tid::ZERO));
        // Client 1 votes while client 0 resolves: it must wait for the lock, not commit
        // in between (which would make client 0's second vote conflict again).
        w.vote(1, 20);
        assert!(
            w.replies[1].is_empty(),
            "the other vote ran while conflicts were being resolved"
        );
        assert_eq!(w.waiting.len(), 1);
        w.store(0, 10, 1, t1);
        w.vote(0, 10);
        assert_eq!(w.last_reply(0), Some(&Answer::Vote(VoteResult(vec![]))));
        w.finish(0, 10);
        let t2 = w.storage.committed[&Oid(1)];
        // Now client 1's vote ran, and met client 0's commit.
        let c = w.conflicts_in_last_reply(1);
        assert_eq!(c[0].committed, t2);
        w.store(1, 20, 1, t2);
        w.vote(1, 20);
        assert_eq!(w.last_reply(1), Some(&Answer::Vote(VoteResult(vec![]))));
        w.finish(1, 20);
        assert_eq!(w.lock, None);
        assert_eq!(w.storage.last, 3);
    }

    #[test]
    fn aborting_while_resolving_releases_the_lock_for_the_next_voter() {
        let mut w = World::new(2, None);
        w.commit(0, 1, 1);
        w.begin(0, 2);
        w.store(0, 2, 1, Tid::ZERO);
        w.vote(0, 2);
        assert_eq!(w.conflicts_in_last_reply(0).len(), 1);
        let t1 = w.storage.committed[&Oid(1)];
        w.begin(1, 3);
        w.store(1, 3, 1, t1);
        w.vote(1, 3);
        assert!(w.replies[1].is_empty());
        w.send(
            0,
            Event::Abort {
                msgid: Value::str("abort"),
                id: Value::Int(2),
            },
        );
        assert_eq!(w.last_reply(0), Some(&Answer::None));
        // Client 1's vote went through once the lock was free.
        assert_eq!(w.replies[1][0].1, Answer::Vote(VoteResult(vec![])));
        w.finish(1, 3);
        assert_eq!(w.lock, None);
        assert_eq!(w.storage.last, 2);
    }

    #[test]
    fn abort_during_vote_is_answered_after_the_vote_and_drops_what_it_staged() {
        let mut w = World::new(1, None);
        w.hold = true;
        w.begin(0, 1);
        w.store(0, 1, 5, Tid::ZERO);
        w.vote(0, 1);
        w.send(
            0,
            Event::Abort {
                msgid: Value::str("abort"),
                id: Value::Int(1),
            },
        );
        assert!(w.replies[0].is_empty(), "the abort must wait for the vote");
        let (c, txn, report) = w.held_votes.pop().unwrap();
        assert!(w.storage.staged.is_some());
        let now = w.now;
        w.send(c, Event::Voted { txn, report, now });
        let answers: Vec<&Answer> = w.replies[0].iter().map(|(_, a)| a).collect();
        assert_eq!(
            answers,
            vec![&Answer::Vote(VoteResult(vec![])), &Answer::None]
        );
        assert!(w.storage.staged.is_none());
        assert_eq!(w.lock, None);
    }

    #[test]
    fn disconnecting_while_holding_the_lock_aborts_and_releases_it() {
        for conflicted in [false, true] {
            let mut w = World::new(2, None);
            w.commit(1, 1, 1);
            w.begin(0, 1);
            let serial = if conflicted {
                Tid::ZERO
            } else {
                w.storage.committed[&Oid(1)]
            };
            w.store(0, 1, 1, serial);
            w.vote(0, 1);
            assert!(w.lock.is_some());
            w.send(0, Event::Disconnected);
            assert_eq!(w.lock, None, "conflicted: {conflicted}");
            assert!(w.storage.staged.is_none());
            // The other connection commits at once.
            w.commit(1, 2, 1);
            assert_eq!(w.storage.last, 2);
        }
    }

    #[test]
    fn the_timeout_runs_from_the_first_vote_holding_the_lock_across_rounds() {
        let mut w = World::new(1, Some(Duration::from_secs(5)));
        w.commit(0, 1, 1);
        assert_eq!(
            w.deadlines[0], None,
            "a finished transaction leaves no deadline"
        );
        let t0 = w.now;
        w.begin(0, 2);
        w.store(0, 2, 1, Tid::ZERO);
        w.vote(0, 2);
        assert_eq!(w.deadlines[0], Some(t0 + Duration::from_secs(5)));
        // The second round, later, does not push the deadline back.
        w.now = t0 + Duration::from_secs(3);
        let t1 = w.storage.committed[&Oid(1)];
        w.store(0, 2, 1, t1);
        w.vote(0, 2);
        assert_eq!(w.last_reply(0), Some(&Answer::Vote(VoteResult(vec![]))));
        assert_eq!(w.deadlines[0], Some(t0 + Duration::from_secs(5)));
        w.send(0, Event::Timeout);
        assert_eq!(w.closed[0], Some(Closing::Timeout));
        assert_eq!(w.lock, None);
        assert!(w.storage.staged.is_none());
        assert_eq!(w.deadlines[0], None);
    }

    #[test]
    fn a_second_transaction_on_one_connection_and_misuse() {
        let mut w = World::new(1, None);
        w.commit(0, 7, 1);
        // The same client id again: a new transaction.
        w.commit(0, 7, 1);
        assert_eq!(w.storage.last, 2);
        // tpc_finish without a vote: the stock server's AssertionError.
        w.begin(0, 8);
        w.finish(0, 8);
        assert_eq!(
            w.last_reply(0),
            Some(&Answer::Protocol(ProtocolError::FinishedWithoutLock))
        );
        // A second tpc_begin for another transaction closes the connection.
        w.begin(0, 9);
        assert_eq!(
            w.closed[0],
            Some(Closing::Protocol("duplicate tpc_begin".into()))
        );
        // An operation for a transaction that is not open too.
        let mut w = World::new(1, None);
        w.store(0, 1, 1, Tid::ZERO);
        assert_eq!(
            w.closed[0],
            Some(Closing::Protocol("storea without tpc_begin".into()))
        );
        // A finish for no transaction is answered None; a vote is an error.
        let mut w = World::new(1, None);
        w.finish(0, 3);
        assert_eq!(w.last_reply(0), Some(&Answer::None));
        w.vote(0, 3);
        assert!(matches!(
            w.last_reply(0),
            Some(Answer::Error(StorageError::Transaction(_)))
        ));
    }

    #[test]
    fn a_failed_vote_ends_the_transaction_and_releases_the_lock() {
        let mut w = World::new(1, Some(Duration::from_secs(5)));
        w.hold = true;
        w.begin(0, 1);
        w.store(0, 1, 1, Tid::ZERO);
        w.vote(0, 1);
        let (c, txn, _) = w.held_votes.pop().unwrap();
        w.storage.abort(txn.key);
        let now = w.now;
        w.send(
            c,
            Event::Voted {
                txn,
                report: VoteReport {
                    result: Err(StorageError::Quota),
                    resolved: vec![],
                },
                now,
            },
        );
        assert!(matches!(
            w.last_reply(0),
            Some(Answer::Error(StorageError::Quota))
        ));
        assert_eq!(w.lock, None);
        assert_eq!(w.deadlines[0], None);
        assert!(!w.cores[0].accepts_ops(None));
    }

    #[test]
    fn resolved_oids_are_reported_with_the_round_that_resolved_them() {
        let mut w = World::new(1, None);
        w.hold = true;
        w.begin(0, 1);
        w.store(0, 1, 1, Tid::ZERO);
        w.vote(0, 1);
        let (c, txn, _) = w.held_votes.pop().unwrap();
        let now = w.now;
        w.send(
            c,
            Event::Voted {
                txn,
                report: VoteReport {
                    result: Ok(Vote::Ok {
                        changed: vec![Oid(9)],
                    }),
                    resolved: vec![Oid(4)],
                },
                now,
            },
        );
        assert_eq!(
            w.last_reply(0),
            Some(&Answer::Vote(VoteResult(vec![
                VoteItem::Resolved(Oid(4)),
                VoteItem::Resolved(Oid(9))
            ])))
        );
    }

    #[test]
    fn a_transaction_past_the_bound_fails_its_vote_without_the_lock_and_the_next_one_commits() {
        let mut w = World::new(2, None);
        w.begin(0, 1);
        w.store_sized(0, 1, 1, Tid::ZERO, 60);
        w.store_sized(0, 1, 2, Tid::ZERO, 60);
        // What came after the bound was not kept either.
        w.store_sized(0, 1, 3, Tid::ZERO, 1);
        w.vote(0, 1);
        match w.last_reply(0) {
            Some(Answer::Error(StorageError::Limit(why))) => {
                assert!(
                    why.contains("121 bytes") && why.contains("100 bytes"),
                    "{why}"
                )
            }
            other => panic!("not a limit error: {other:?}"),
        }
        assert_eq!(w.lock, None);
        assert!(w.storage.committed.is_empty());
        assert!(!w.cores[0].accepts_ops(None));
        // Exactly at the bound is allowed, on this connection and the other.
        w.begin(0, 2);
        w.store_sized(0, 2, 1, Tid::ZERO, 100);
        w.vote(0, 2);
        w.finish(0, 2);
        assert!(w.storage.committed.contains_key(&Oid(1)));
        w.commit(1, 1, 2);
        assert!(w.storage.committed.contains_key(&Oid(2)));
    }

    #[test]
    fn resolutions_past_the_bound_end_the_round_and_release_the_lock() {
        let mut w = World::new(2, None);
        w.commit(1, 1, 1);
        // Connection 0 stores on a stale serial, gets the conflict and keeps the lock...
        w.begin(0, 1);
        w.store_sized(0, 1, 1, Tid::ZERO, 60);
        w.vote(0, 1);
        assert_eq!(w.conflicts_in_last_reply(0).len(), 1);
        assert!(w.lock.is_some());
        // ...then resolves with more than the bound allows.
        let serial = w.storage.committed[&Oid(1)];
        w.store_sized(0, 1, 1, serial, 60);
        w.vote(0, 1);
        assert!(matches!(
            w.last_reply(0),
            Some(Answer::Error(StorageError::Limit(_)))
        ));
        assert_eq!(w.lock, None);
        w.commit(1, 2, 1);
        assert_eq!(w.closed, vec![None, None]);
    }
}
