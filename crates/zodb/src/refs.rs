//! Persistent references inside record pickles (filestorage.md §7), as pack's garbage
//! collection and the tools need them.
//!
//! A record is two pickles back to back (class metadata, then state) written by one
//! pickler, so the second may refer to the memo of the first. Python's
//! `ZODB.serialize.referencesf` runs zodbpickle's `noload()` twice on one unpickler and
//! collects every persistent id; this module does the same with a small "noload" VM:
//!
//! - containers, memo and mark opcodes run for real, but only the shape of values is kept
//!   (bytes and text are ranges into the input, tuples keep their items, lists, dicts and
//!   sets keep nothing), so no Python object is ever built and nothing is imported;
//! - `GLOBAL`/`STACK_GLOBAL` push a placeholder that remembers the class name, and
//!   `REDUCE`/`BUILD`/`OBJ`/`INST`/`NEWOBJ`/`EXT*` consume their arguments and push a
//!   placeholder;
//! - every `BINPERSID`/`PERSID` classifies the popped reference like `referencesf`: a tuple
//!   gives its first item, bytes or text are the oid itself, a list (weak or
//!   cross-database reference) is skipped.
//!
//! Protocols 0–5 are accepted (zodbpickle itself stops at 3). The VM never recurses, keeps
//! tuple nesting below [`MAX_DEPTH`], holds memory proportional to the input, and reports
//! any malformed input as a [`RefsError`]; it never panics.

use crate::pickle::{op, Reader, Truncated};
use crate::Oid;
use std::collections::HashMap;
use std::rc::Rc;

/// Deepest tuple nesting accepted: deeper input is refused rather than risking deep
/// recursive drops. Real records nest a handful of levels.
pub const MAX_DEPTH: u8 = 100;

/// Why a record's references could not be extracted. Pack must then stop: a record whose
/// references are unknown might keep objects alive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefsError {
    #[error("pickle truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown pickle opcode 0x{op:02x} at byte {at}")]
    BadOpcode { op: u8, at: usize },
    #[error("pickle stack underflow at byte {0}")]
    StackUnderflow(usize),
    #[error("pickle MARK missing at byte {0}")]
    NoMark(usize),
    #[error("pickle memo entry {key} missing at byte {at}")]
    MemoMissing { key: u64, at: usize },
    #[error("unsupported pickle protocol {proto} at byte {at}")]
    Protocol { proto: u8, at: usize },
    #[error("pickle values nested too deeply at byte {0}")]
    TooDeep(usize),
    #[error("persistent reference at byte {at} is not an oid: {what}")]
    BadReference { at: usize, what: &'static str },
    #[error("record has no pickle")]
    Empty,
}

/// A value on the VM stack. Bytes and text are ranges of the input.
#[derive(Debug, Clone)]
enum V {
    /// `None`, and the placeholder for anything constructed (as in noload).
    None,
    /// A number or boolean: its value never matters.
    Scalar,
    Bytes(usize, usize),
    Str(usize, usize),
    Tuple(Rc<[V]>, u8),
    List,
    Dict,
    Set,
    /// A class from `GLOBAL`/`STACK_GLOBAL` (a placeholder for references, a name for
    /// [`class_name`]).
    Global {
        module: (usize, usize),
        name: (usize, usize),
    },
}

impl V {
    fn depth(&self) -> u8 {
        match self {
            V::Tuple(_, d) => *d,
            _ => 0,
        }
    }
}

/// A reusable scanner: keeps its buffers between records (pack scans millions).
#[derive(Debug, Default)]
pub struct RefScanner {
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u64, V>,
}

/// What one pickle of a record produced.
enum Stopped {
    /// The value at `STOP`.
    Value(V),
    /// The input ended exactly where a pickle would start.
    End,
}

struct Vm<'a, 's> {
    r: Reader<'a>,
    s: &'s mut RefScanner,
}

impl From<Truncated> for RefsError {
    fn from(t: Truncated) -> RefsError {
        RefsError::Truncated(t.at)
    }
}

impl<'a> Vm<'a, '_> {
    /// The range of the next `n` bytes, moving past them.
    fn span(&mut self, n: u64) -> Result<(usize, usize), RefsError> {
        let start = self.r.pos();
        self.r.take(n)?;
        Ok((start, self.r.pos()))
    }

    /// A `width`-byte little-endian length, then the range of that many bytes.
    fn counted(&mut self, width: usize) -> Result<(usize, usize), RefsError> {
        let n = self.r.uint_le(width)?;
        self.span(n)
    }

    /// The range of a line (without its `\n`), moving past it.
    fn line(&mut self) -> Result<(usize, usize), RefsError> {
        let start = self.r.pos();
        let line = self.r.line()?;
        Ok((start, start + line.len()))
    }

    fn push(&mut self, v: V) {
        self.s.stack.push(v);
    }

    fn pop(&mut self, at: usize) -> Result<V, RefsError> {
        // A value pushed before the innermost mark belongs to an outer level: popping it
        // is an underflow at this level, as in CPython.
        let floor = self.s.marks.last().copied().unwrap_or(0);
        if self.s.stack.len() <= floor {
            return Err(RefsError::StackUnderflow(at));
        }
        self.s.stack.pop().ok_or(RefsError::StackUnderflow(at))
    }

    fn top(&self, at: usize) -> Result<&V, RefsError> {
        self.s.stack.last().ok_or(RefsError::StackUnderflow(at))
    }

    fn pop_mark(&mut self, at: usize) -> Result<usize, RefsError> {
        self.s.marks.pop().ok_or(RefsError::NoMark(at))
    }

    /// Removes everything above the innermost mark and the mark itself.
    fn pop_to_mark(&mut self, at: usize) -> Result<Vec<V>, RefsError> {
        let m = self.pop_mark(at)?;
        if m > self.s.stack.len() {
            return Err(RefsError::StackUnderflow(at));
        }
        Ok(self.s.stack.split_off(m))
    }

    fn tuple(&mut self, items: Vec<V>, at: usize) -> Result<V, RefsError> {
        let depth = items.iter().map(V::depth).max().unwrap_or(0) + 1;
        if depth > MAX_DEPTH {
            return Err(RefsError::TooDeep(at));
        }
        Ok(V::Tuple(items.into(), depth))
    }

    fn memo_put(&mut self, key: u64, at: usize) -> Result<(), RefsError> {
        let v = self.top(at)?.clone();
        self.s.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64, at: usize) -> Result<(), RefsError> {
        let v = self
            .s
            .memo
            .get(&key)
            .cloned()
            .ok_or(RefsError::MemoMissing { key, at })?;
        self.push(v);
        Ok(())
    }

    fn decimal(&self, (s, e): (usize, usize), at: usize) -> Result<u64, RefsError> {
        std::str::from_utf8(&self.r.data()[s..e])
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or(RefsError::BadReference {
                at,
                what: "bad memo key",
            })
    }

    /// Runs one pickle to its `STOP`, calling `on_ref` for every persistent id.
    fn run(
        &mut self,
        on_ref: &mut dyn FnMut(&V, usize) -> Result<(), RefsError>,
    ) -> Result<Stopped, RefsError> {
        self.s.stack.clear();
        self.s.marks.clear();
        if self.r.at_end() {
            return Ok(Stopped::End);
        }
        loop {
            let at = self.r.pos();
            let opcode = self.r.byte()?;
            match opcode {
                // Framing and protocol.
                op::PROTO => {
                    let proto = self.r.byte()?;
                    if proto > 5 {
                        return Err(RefsError::Protocol { proto, at });
                    }
                }
                op::FRAME => {
                    self.r.take(8)?;
                }
                op::STOP => {
                    let v = self.pop(at)?;
                    return Ok(Stopped::Value(v));
                }
                // Stack and marks.
                op::MARK => self.s.marks.push(self.s.stack.len()),
                op::POP => {
                    // POP: a mark at the top of the stack is popped instead (CPython).
                    if self.s.marks.last() == Some(&self.s.stack.len()) {
                        self.s.marks.pop();
                    } else {
                        self.pop(at)?;
                    }
                }
                op::POP_MARK => {
                    self.pop_to_mark(at)?;
                }
                op::DUP => {
                    let v = self.top(at)?.clone();
                    self.push(v);
                }
                // Constants and numbers.
                op::NONE => self.push(V::None),
                op::NEWTRUE | op::NEWFALSE => self.push(V::Scalar),
                op::INT | op::LONG | op::FLOAT => {
                    self.line()?;
                    self.push(V::Scalar);
                }
                op::BININT => {
                    self.r.take(4)?;
                    self.push(V::Scalar);
                }
                op::BININT1 => {
                    self.r.take(1)?;
                    self.push(V::Scalar);
                }
                op::BININT2 => {
                    self.r.take(2)?;
                    self.push(V::Scalar);
                }
                op::BINFLOAT => {
                    self.r.take(8)?;
                    self.push(V::Scalar);
                }
                op::LONG1 => {
                    self.counted(1)?;
                    self.push(V::Scalar);
                }
                op::LONG4 => {
                    self.counted(4)?;
                    self.push(V::Scalar);
                }
                // Bytes, and Python 2 strings (raw bytes, as the spec recommends).
                op::STRING => {
                    let (s, e) = self.line()?;
                    // A quoted repr: keep the inside of the quotes.
                    let (s, e) = if e >= s + 2 { (s + 1, e - 1) } else { (s, e) };
                    self.push(V::Bytes(s, e));
                }
                op::BINSTRING | op::BINBYTES => {
                    let (s, e) = self.counted(4)?;
                    self.push(V::Bytes(s, e));
                }
                op::SHORT_BINSTRING | op::SHORT_BINBYTES => {
                    let (s, e) = self.counted(1)?;
                    self.push(V::Bytes(s, e));
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let (s, e) = self.counted(8)?;
                    self.push(V::Bytes(s, e));
                }
                // Text.
                op::UNICODE => {
                    let (s, e) = self.line()?;
                    self.push(V::Str(s, e));
                }
                op::BINUNICODE => {
                    let (s, e) = self.counted(4)?;
                    self.push(V::Str(s, e));
                }
                op::SHORT_BINUNICODE => {
                    let (s, e) = self.counted(1)?;
                    self.push(V::Str(s, e));
                }
                op::BINUNICODE8 => {
                    let (s, e) = self.counted(8)?;
                    self.push(V::Str(s, e));
                }
                // Containers.
                op::EMPTY_TUPLE => {
                    let t = self.tuple(Vec::new(), at)?;
                    self.push(t);
                }
                op::TUPLE1..=op::TUPLE3 => {
                    let n = usize::from(opcode - op::TUPLE1) + 1;
                    let floor = self.s.marks.last().copied().unwrap_or(0);
                    if self.s.stack.len() < floor + n {
                        return Err(RefsError::StackUnderflow(at));
                    }
                    let items = self.s.stack.split_off(self.s.stack.len() - n);
                    let t = self.tuple(items, at)?;
                    self.push(t);
                }
                op::TUPLE => {
                    let items = self.pop_to_mark(at)?;
                    let t = self.tuple(items, at)?;
                    self.push(t);
                }
                op::EMPTY_LIST => self.push(V::List),
                op::LIST => {
                    self.pop_to_mark(at)?;
                    self.push(V::List);
                }
                op::EMPTY_DICT => self.push(V::Dict),
                op::DICT => {
                    self.pop_to_mark(at)?;
                    self.push(V::Dict);
                }
                op::EMPTY_SET => self.push(V::Set),
                op::FROZENSET => {
                    self.pop_to_mark(at)?;
                    self.push(V::Set);
                }
                op::APPEND => {
                    self.pop(at)?;
                    self.top(at)?;
                }
                op::SETITEM => {
                    self.pop(at)?;
                    self.pop(at)?;
                    self.top(at)?;
                }
                op::APPENDS | op::SETITEMS | op::ADDITEMS => {
                    self.pop_to_mark(at)?;
                    self.top(at)?;
                }
                // Object building: consume the arguments, push a placeholder.
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(V::Global { module, name });
                }
                op::STACK_GLOBAL => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    match (module, name) {
                        (V::Str(ms, me), V::Str(ns, ne)) => self.push(V::Global {
                            module: (ms, me),
                            name: (ns, ne),
                        }),
                        _ => self.push(V::None),
                    }
                }
                op::REDUCE | op::NEWOBJ => {
                    self.pop(at)?;
                    self.pop(at)?;
                    self.push(V::None);
                }
                op::NEWOBJ_EX => {
                    self.pop(at)?;
                    self.pop(at)?;
                    self.pop(at)?;
                    self.push(V::None);
                }
                op::BUILD => {
                    self.pop(at)?;
                    self.top(at)?;
                }
                op::OBJ => {
                    self.pop_to_mark(at)?;
                    self.push(V::None);
                }
                op::INST => {
                    self.line()?;
                    self.line()?;
                    self.pop_to_mark(at)?;
                    self.push(V::None);
                }
                op::EXT1 => {
                    self.r.take(1)?;
                    self.push(V::None);
                }
                op::EXT2 => {
                    self.r.take(2)?;
                    self.push(V::None);
                }
                op::EXT4 => {
                    self.r.take(4)?;
                    self.push(V::None);
                }
                // Memo.
                op::PUT => {
                    let r = self.line()?;
                    let key = self.decimal(r, at)?;
                    self.memo_put(key, at)?;
                }
                op::BINPUT => {
                    let key = self.r.uint_le(1)?;
                    self.memo_put(key, at)?;
                }
                op::LONG_BINPUT => {
                    let key = self.r.uint_le(4)?;
                    self.memo_put(key, at)?;
                }
                op::MEMOIZE => {
                    let key = self.s.memo.len() as u64;
                    self.memo_put(key, at)?;
                }
                op::GET => {
                    let r = self.line()?;
                    let key = self.decimal(r, at)?;
                    self.memo_get(key, at)?;
                }
                op::BINGET => {
                    let key = self.r.uint_le(1)?;
                    self.memo_get(key, at)?;
                }
                op::LONG_BINGET => {
                    let key = self.r.uint_le(4)?;
                    self.memo_get(key, at)?;
                }
                // Persistent ids.
                op::PERSID => {
                    let (s, e) = self.line()?;
                    on_ref(&V::Str(s, e), at)?;
                    self.push(V::None);
                }
                op::BINPERSID => {
                    let pid = self.pop(at)?;
                    on_ref(&pid, at)?;
                    self.push(V::None);
                }
                _ => return Err(RefsError::BadOpcode { op: opcode, at }),
            }
        }
    }
}

/// The oid a persistent id stands for, classified as `referencesf` does: `None` for weak
/// and cross-database references (lists).
fn classify(data: &[u8], pid: &V, at: usize) -> Result<Option<Oid>, RefsError> {
    let oid_of = |v: &V| -> Result<Oid, RefsError> {
        let (s, e) = match v {
            V::Bytes(s, e) | V::Str(s, e) => (*s, *e),
            _ => {
                return Err(RefsError::BadReference {
                    at,
                    what: "the oid is neither bytes nor text",
                })
            }
        };
        Oid::from_slice(&data[s..e]).ok_or(RefsError::BadReference {
            at,
            what: "the oid is not 8 bytes",
        })
    };
    match pid {
        V::Tuple(items, _) => match items.first() {
            Some(first) => oid_of(first).map(Some),
            None => Err(RefsError::BadReference {
                at,
                what: "empty tuple",
            }),
        },
        V::Bytes(..) | V::Str(..) => oid_of(pid).map(Some),
        V::List => Ok(None),
        _ => Err(RefsError::BadReference {
            at,
            what: "not a tuple, bytes, text or list",
        }),
    }
}

impl RefScanner {
    pub fn new() -> RefScanner {
        RefScanner::default()
    }

    /// Appends the oids `data` references to `out`, in pickle order, duplicates included
    /// (`referencesf`). The class pickle is scanned too: a persistent class is a reference.
    /// A record holding only the class pickle has no state references.
    pub fn references(&mut self, data: &[u8], out: &mut Vec<Oid>) -> Result<(), RefsError> {
        self.memo.clear();
        if data.is_empty() {
            return Err(RefsError::Empty);
        }
        let mut on_ref = |pid: &V, at: usize| -> Result<(), RefsError> {
            if let Some(oid) = classify(data, pid, at)? {
                out.push(oid);
            }
            Ok(())
        };
        let mut vm = Vm {
            r: Reader::new(data),
            s: self,
        };
        let mut result = Ok(());
        for _ in 0..2 {
            match vm.run(&mut on_ref) {
                Ok(Stopped::Value(_)) => {}
                Ok(Stopped::End) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.release();
        result
    }

    /// Drops buffers that grew large on an unusual record, so one huge pickle does not
    /// pin its memory for the rest of a scan.
    fn release(&mut self) {
        const KEEP: usize = 1 << 16;
        if self.stack.capacity() > KEEP {
            self.stack = Vec::new();
        }
        if self.memo.capacity() > KEEP {
            self.memo = HashMap::new();
        }
        self.memo.clear();
    }
}

/// The oids a record pickle references (see [`RefScanner::references`]).
pub fn references(data: &[u8]) -> Result<Vec<Oid>, RefsError> {
    let mut out = Vec::new();
    RefScanner::new().references(data, &mut out)?;
    Ok(out)
}

/// The `(module, class)` of a record, read from its class pickle without importing
/// anything, like `ZODB.utils.get_pickle_metadata`: a class `C`, `(C, args)`, or
/// `((module, name), args)`. `None` when the first pickle is none of these (for example a
/// persistent class given by reference) or does not parse.
pub fn class_name(data: &[u8]) -> Option<(String, String)> {
    let mut scanner = RefScanner::new();
    let mut vm = Vm {
        r: Reader::new(data),
        s: &mut scanner,
    };
    let Ok(Stopped::Value(meta)) = vm.run(&mut |_, _| Ok(())) else {
        return None;
    };
    let text = |(s, e): (usize, usize)| String::from_utf8_lossy(&data[s..e]).into_owned();
    let global = |v: &V| match v {
        V::Global { module, name } => Some((text(*module), text(*name))),
        _ => None,
    };
    let pair = |v: &V| match v {
        V::Tuple(items, _) if items.len() == 2 => match (&items[0], &items[1]) {
            (V::Str(ms, me) | V::Bytes(ms, me), V::Str(ns, ne) | V::Bytes(ns, ne)) => {
                Some((text((*ms, *me)), text((*ns, *ne))))
            }
            _ => None,
        },
        _ => None,
    };
    match &meta {
        V::Global { .. } => global(&meta),
        V::Tuple(items, _) => items.first().and_then(|c| global(c).or_else(|| pair(c))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(n: u64) -> Oid {
        Oid(n)
    }

    /// `(oid, class)` references as ZODB writes them with protocol 3, the class memoized
    /// in the first pickle and fetched with `BINGET 0` in the second (docs/filestorage.md §2 root).
    #[test]
    fn spec_root_record() {
        let mut p = Vec::new();
        p.extend_from_slice(b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.");
        p.extend_from_slice(b"\x80\x03}q\x01X\x04\x00\x00\x00dataq\x02}q\x03X\x01\x00\x00\x00aq\x04C\x08\x00\x00\x00\x00\x00\x00\x00\x01q\x05h\x00\x86q\x06Qss.");
        assert_eq!(references(&p).unwrap(), vec![oid(1)]);
        assert_eq!(
            class_name(&p),
            Some(("persistent.mapping".into(), "PersistentMapping".into()))
        );
    }

    #[test]
    fn reference_forms() {
        // Plain oid, weak ref list, cross-database 'm' and 'n' lists, legacy [oid].
        let mut p = b"\x80\x03cx\nY\nq\x00.\x80\x03(".to_vec();
        p.extend_from_slice(b"C\x08\x00\x00\x00\x00\x00\x00\x00\x02Q");
        p.extend_from_slice(
            b"]q\x01(X\x01\x00\x00\x00wC\x08\x00\x00\x00\x00\x00\x00\x00\x03\x85eQ",
        );
        p.extend_from_slice(b"]q\x02(X\x01\x00\x00\x00mX\x05\x00\x00\x00otherC\x08\x00\x00\x00\x00\x00\x00\x00\x04h\x00\x87eQ");
        p.extend_from_slice(b"]C\x08\x00\x00\x00\x00\x00\x00\x00\x05aQ");
        p.extend_from_slice(b"U\x08\x00\x00\x00\x00\x00\x00\x00\x06h\x00\x86Q");
        p.extend_from_slice(b"h\x01Q");
        p.extend_from_slice(b"t.");
        assert_eq!(references(&p).unwrap(), vec![oid(2), oid(6)]);
    }

    #[test]
    fn protocol_4_and_0() {
        let mut p =
            b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x01m\x94\x8c\x01C\x94\x93\x94."
                .to_vec();
        p.extend_from_slice(b"\x80\x04C\x08\x00\x00\x00\x00\x00\x00\x00\x07h\x02\x86Q.");
        assert_eq!(references(&p).unwrap(), vec![oid(7)]);
        assert_eq!(class_name(&p), Some(("m".into(), "C".into())));
        // Protocol 0: PERSID with text oid of 8 ASCII characters.
        let p = b"(cfoo\nBar\np0\n(dp1\nVkey\np2\nP12345678\nsb.";
        assert_eq!(
            references(p).unwrap(),
            vec![Oid::from_slice(b"12345678").unwrap()]
        );
    }

    #[test]
    fn class_forms() {
        assert_eq!(
            class_name(b"\x80\x03(cfoo\nBar\nq\x00)tq\x01."),
            Some(("foo".into(), "Bar".into()))
        );
        assert_eq!(
            class_name(b"\x80\x02(U\x03modU\x04Nameq\x01tN\x86."),
            Some(("mod".into(), "Name".into()))
        );
        assert_eq!(class_name(b"\x80\x03N."), None);
        assert_eq!(class_name(b""), None);
    }

    #[test]
    fn only_a_class_pickle_and_errors() {
        assert_eq!(references(b"\x80\x03cfoo\nBar\n.").unwrap(), vec![]);
        assert!(matches!(references(b""), Err(RefsError::Empty)));
        assert!(matches!(
            references(b"\x80\x03cfoo\nBar\n.\x80\x03(C\x08\x00"),
            Err(RefsError::Truncated(_))
        ));
        assert!(matches!(
            references(b"\x80\x03cfoo\nBar\n.\x80\x03K\x01Q."),
            Err(RefsError::BadReference { .. })
        ));
        assert!(matches!(
            references(b"\x80\x03cfoo\nBar\n.\x80\x03C\x03abcQ."),
            Err(RefsError::BadReference { .. })
        ));
        assert!(matches!(
            references(b"\x80\x03h\x05."),
            Err(RefsError::MemoMissing { key: 5, .. })
        ));
        assert!(matches!(
            references(b"\x80\x06N."),
            Err(RefsError::Protocol { proto: 6, .. })
        ));
        assert!(matches!(
            references(b"\xffN."),
            Err(RefsError::BadOpcode { .. })
        ));
        assert!(matches!(
            references(b"\x80\x03(N0t."),
            Ok(_) | Err(RefsError::StackUnderflow(_))
        ));
        // Values pushed before a MARK cannot be taken by what follows it.
        assert!(matches!(
            references(b"N(a."),
            Err(RefsError::StackUnderflow(_))
        ));
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowing() {
        let mut p = b"\x80\x03N".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 100_000));
        p.push(b'.');
        assert!(matches!(references(&p), Err(RefsError::TooDeep(_))));
        // Wide but shallow is fine.
        let mut p = b"\x80\x03(".to_vec();
        for _ in 0..100_000 {
            p.extend_from_slice(b"N");
        }
        p.extend_from_slice(b"t.");
        assert_eq!(references(&p).unwrap(), vec![]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz; the proptest target in filestorage goes further.
        let mut x: u64 = 0x1234_5678;
        let alphabet =
            b"().0123NabcdeghjlpqrstuQPCKJMBXUT]}\x80\x85\x86\x87\x88\x8a\x8c\x93\x94\x95\x81\x92";
        for len in 0..300 {
            for _ in 0..50 {
                let mut p = Vec::with_capacity(len);
                for _ in 0..len {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let r = (x >> 33) as usize;
                    p.push(if r.is_multiple_of(3) {
                        (r >> 8) as u8
                    } else {
                        alphabet[(r >> 8) % alphabet.len()]
                    });
                }
                let _ = references(&p);
                let _ = class_name(&p);
            }
        }
    }
}
