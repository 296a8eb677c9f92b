//! Reads ZODB records as `ZODB.ConflictResolution` does: one unpickler per record (its
//! memo shared by the class pickle and the state pickle), persistent ids turned into
//! `PersistentReference`s by one factory shared by the three records.
//!
//! Invariants:
//! - only what zodbpickle's unpickler accepts is accepted (protocols 0 to 3, Python 2
//!   strings decoded as ASCII), and only the data kinds of [`Object`] are built;
//!   everything else — instances of other classes (`REDUCE`, `BUILD`, `NEWOBJ`, `INST`,
//!   `OBJ`, extension codes), sets, protocol 4 and 5 opcodes, ints beyond 128 bits,
//!   strings with lone surrogates, lists or dicts shared by two places of a state, text
//!   forms whose parsing could differ from CPython's — is reported as
//!   [`NotHandled::Pickle`], never guessed;
//! - references are created in the order Python creates them (the new record, then the
//!   old, then the committed one), and equal ids give the same [`Rc`], as the factory's
//!   cache gives the same object;
//! - the machine never recurses, holds memory proportional to the input (every node
//!   created or copied is charged to a budget of four per input byte), and copies out
//!   values no deeper than [`MAX_DEPTH`], so comparing, encoding and dropping them later
//!   cannot overflow the stack.

use std::collections::HashMap;
use std::rc::Rc;

use zodb::pickle::{self, op, Reader, Truncated};

use crate::object::{self, Object, PersistentRef};
use crate::NotHandled;

/// Deepest nesting of a decoded value.
pub const MAX_DEPTH: usize = 100;

/// The highest protocol zodbpickle reads.
const HIGHEST_PROTOCOL: u8 = 3;

/// Modules that zodbpickle renames when it reads a class from a protocol 0–2 pickle
/// (`fix_imports`, Python's `_compat_pickle`). A persistent id naming one would be
/// written back under its Python 3 name by Python; it is not modelled.
const RENAMED_MODULES: &[&str] = &[
    "BaseHTTPServer",
    "CGIHTTPServer",
    "ConfigParser",
    "Cookie",
    "Dialog",
    "DocXMLRPCServer",
    "FileDialog",
    "HTMLParser",
    "Queue",
    "ScrolledText",
    "SimpleDialog",
    "SimpleHTTPServer",
    "SimpleXMLRPCServer",
    "SocketServer",
    "StringIO",
    "Tix",
    "Tkconstants",
    "Tkdnd",
    "Tkinter",
    "UserDict",
    "UserList",
    "UserString",
    "__builtin__",
    "_abcoll",
    "_elementtree",
    "_multiprocessing",
    "_socket",
    "_winreg",
    "anydbm",
    "cPickle",
    "cStringIO",
    "commands",
    "cookielib",
    "copy_reg",
    "dbhash",
    "dbm",
    "dumbdbm",
    "dummy_thread",
    "exceptions",
    "gdbm",
    "htmlentitydefs",
    "httplib",
    "itertools",
    "markupbase",
    "multiprocessing",
    "multiprocessing.forking",
    "multiprocessing.process",
    "repr",
    "robotparser",
    "socket",
    "test.test_support",
    "thread",
    "tkColorChooser",
    "tkCommonDialog",
    "tkFileDialog",
    "tkFont",
    "tkMessageBox",
    "tkSimpleDialog",
    "ttk",
    "urllib",
    "urllib2",
    "urlparse",
    "whichdb",
    "xmlrpclib",
];

fn unhandled(what: &'static str) -> NotHandled {
    NotHandled::Pickle(what)
}

impl From<Truncated> for NotHandled {
    fn from(_: Truncated) -> NotHandled {
        unhandled("truncated pickle")
    }
}

/// `PersistentReferenceFactory`: one reference per `tuple(persistent id)`.
#[derive(Default)]
pub struct Factory {
    refs: HashMap<Vec<u8>, Rc<PersistentRef>>,
}

/// A record's first pickle: `meta`, naming the class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub module: String,
    pub name: String,
    /// Where the class pickle ends (and the state pickle starts).
    pub end: usize,
}

/// A record as the conflict resolver reads it.
pub struct Record {
    pub class: Class,
    pub state: Object,
}

/// Reads the class pickle only (for [`crate::handles`]).
pub fn class_of(data: &[u8]) -> Result<Class, NotHandled> {
    let mut factory = Factory::default();
    let mut vm = Vm::new(data, &mut factory);
    vm.class()
}

/// Reads a whole record: its class, then its state, which must end the record.
pub fn record(data: &[u8], factory: &mut Factory) -> Result<Record, NotHandled> {
    let mut vm = Vm::new(data, factory);
    let class = vm.class()?;
    let root = vm.run()?;
    if !vm.r.at_end() {
        return Err(unhandled("data after the state pickle"));
    }
    let state = vm.copy_out(root, false)?;
    Ok(Record { class, state })
}

type Id = usize;

enum Node {
    /// `None`, a bool, a number, text or bytes.
    Scalar(Object),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>, HashMap<Vec<u8>, usize>),
    Global(String, String),
    Ref(Rc<PersistentRef>),
}

struct Vm<'a, 'f> {
    r: Reader<'a>,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    /// Shared by the two pickles of the record, as one unpickler reads both.
    memo: HashMap<u64, Id>,
    /// Items left to build or copy.
    budget: usize,
    /// Whether the current pickle is protocol 0–2 (zodbpickle then renames modules).
    old_protocol: bool,
    factory: &'f mut Factory,
}

impl<'a, 'f> Vm<'a, 'f> {
    fn new(data: &'a [u8], factory: &'f mut Factory) -> Self {
        Vm {
            r: Reader::new(data),
            nodes: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            budget: data.len().saturating_mul(4).saturating_add(1024),
            old_protocol: true,
            factory,
        }
    }

    fn charge(&mut self, n: usize) -> Result<(), NotHandled> {
        self.budget = self
            .budget
            .checked_sub(n)
            .ok_or(unhandled("pickle builds more than four values per byte"))?;
        Ok(())
    }

    /// The class pickle, as `tryToResolveConflict` reads `meta`: a class, or a tuple
    /// `(class, args)` whose class may be a `(module, name)` pair; `args` must be empty.
    fn class(&mut self) -> Result<Class, NotHandled> {
        let root = self.run()?;
        let end = self.r.pos();
        let meta = self.copy_out(root, true)?;
        let not_a_class = NotHandled::Class;
        let (module, name) = match meta {
            Object::Global { module, name } => (module, name),
            Object::Tuple(items) if items.len() == 2 => {
                let no_args = match &items[1] {
                    Object::None => true,
                    Object::Tuple(args) => args.is_empty(),
                    _ => false,
                };
                if !no_args {
                    return Err(not_a_class);
                }
                match &items[0] {
                    Object::Global { module, name } => (module.clone(), name.clone()),
                    Object::Tuple(pair) => match pair.as_slice() {
                        [Object::Str(module), Object::Str(name)] => (module.clone(), name.clone()),
                        _ => return Err(not_a_class),
                    },
                    _ => return Err(not_a_class),
                }
            }
            _ => return Err(not_a_class),
        };
        Ok(Class { module, name, end })
    }

    fn new_node(&mut self, node: Node) -> Result<Id, NotHandled> {
        self.charge(1)?;
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, node: Node) -> Result<(), NotHandled> {
        let id = self.new_node(node)?;
        self.stack.push(id);
        Ok(())
    }

    fn scalar(&mut self, o: Object) -> Result<(), NotHandled> {
        self.push(Node::Scalar(o))
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn top(&self) -> Result<Id, NotHandled> {
        if self.stack.len() > self.floor() {
            Ok(self.stack[self.stack.len() - 1])
        } else {
            Err(unhandled("pickle stack underflow"))
        }
    }

    fn pop(&mut self) -> Result<Id, NotHandled> {
        let top = self.top()?;
        self.stack.pop();
        Ok(top)
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Id>, NotHandled> {
        if self.stack.len() - self.floor() < n {
            return Err(unhandled("pickle stack underflow"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, NotHandled> {
        let mark = self.marks.pop().ok_or(unhandled("pickle MARK missing"))?;
        Ok(self.stack.split_off(mark))
    }

    /// Runs one pickle to its STOP.
    fn run(&mut self) -> Result<Id, NotHandled> {
        self.stack.clear();
        self.marks.clear();
        self.old_protocol = true;
        loop {
            let opcode = self.r.byte()?;
            match opcode {
                op::PROTO => {
                    let version = self.r.byte()?;
                    if version > HIGHEST_PROTOCOL {
                        return Err(unhandled("pickle protocol above 3 (zodbpickle refuses it)"));
                    }
                    self.old_protocol = version < 3;
                }
                op::STOP => {
                    let root = self.pop()?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return Err(unhandled("objects left on the pickle stack"));
                    }
                    return Ok(root);
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::DUP => {
                    let top = self.top()?;
                    self.charge(1)?;
                    self.stack.push(top);
                }

                op::NONE => self.scalar(Object::None)?,
                op::NEWTRUE => self.scalar(Object::Bool(true))?,
                op::NEWFALSE => self.scalar(Object::Bool(false))?,
                op::INT => {
                    let line = self.r.line()?;
                    let o = match line {
                        b"01" => Object::Bool(true),
                        b"00" => Object::Bool(false),
                        _ => Object::Int(decimal(line)?),
                    };
                    self.scalar(o)?;
                }
                op::LONG => {
                    let line = self.r.line()?;
                    let digits = line.strip_suffix(b"L").unwrap_or(line);
                    self.scalar(Object::Int(decimal(digits)?))?;
                }
                op::BININT => {
                    let i = i32::from_le_bytes(self.r.array()?);
                    self.scalar(Object::Int(i.into()))?;
                }
                op::BININT1 => {
                    let i = self.r.byte()?;
                    self.scalar(Object::Int(i.into()))?;
                }
                op::BININT2 => {
                    let i = u16::from_le_bytes(self.r.array()?);
                    self.scalar(Object::Int(i.into()))?;
                }
                op::LONG1 | op::LONG4 => {
                    let len = if opcode == op::LONG1 {
                        u64::from(self.r.byte()?)
                    } else {
                        signed_len(self.r.array()?)?
                    };
                    let bytes = self.r.take(len)?;
                    let i = pickle::decode_long(bytes).ok_or(unhandled("int beyond 128 bits"))?;
                    self.scalar(Object::Int(i))?;
                }
                op::FLOAT => {
                    let line = self.r.line()?;
                    self.scalar(Object::Float(float_literal(line)?))?;
                }
                op::BINFLOAT => {
                    let f = f64::from_be_bytes(self.r.array()?);
                    self.scalar(Object::Float(f))?;
                }

                // Python 2 `str`, decoded as ASCII (zodbpickle's default): anything else
                // fails to load in Python.
                op::BINSTRING | op::SHORT_BINSTRING => {
                    let len = if opcode == op::SHORT_BINSTRING {
                        u64::from(self.r.byte()?)
                    } else {
                        signed_len(self.r.array()?)?
                    };
                    let bytes = self.r.take(len)?;
                    if !bytes.is_ascii() {
                        return Err(unhandled("a non-ASCII Python 2 string"));
                    }
                    let text = String::from_utf8(bytes.to_vec()).expect("ASCII is UTF-8");
                    self.charge(bytes.len() / 16)?;
                    self.scalar(Object::Str(text))?;
                }
                op::BINUNICODE => {
                    let len = u32::from_le_bytes(self.r.array()?);
                    let bytes = self.r.take(len.into())?;
                    let text = std::str::from_utf8(bytes).map_err(|_| {
                        unhandled("text that is not UTF-8 (or has lone surrogates)")
                    })?;
                    self.charge(bytes.len() / 16)?;
                    self.scalar(Object::Str(text.to_owned()))?;
                }
                op::SHORT_BINBYTES | op::BINBYTES => {
                    let len = if opcode == op::SHORT_BINBYTES {
                        u64::from(self.r.byte()?)
                    } else {
                        u64::from(u32::from_le_bytes(self.r.array()?))
                    };
                    let bytes = self.r.take(len)?;
                    self.charge(bytes.len() / 16)?;
                    self.scalar(Object::Bytes(bytes.to_vec()))?;
                }

                op::EMPTY_TUPLE => self.push(Node::Tuple(Vec::new()))?,
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let items = self.pop_n(usize::from(opcode - op::TUPLE1) + 1)?;
                    self.push(Node::Tuple(items))?;
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))?;
                }
                op::EMPTY_LIST => self.push(Node::List(Vec::new()))?,
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?;
                }
                op::APPEND => {
                    let item = self.pop()?;
                    self.extend_list(&[item])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.extend_list(&items)?;
                }
                op::EMPTY_DICT => self.push(Node::Dict(Vec::new(), HashMap::new()))?,
                op::DICT => {
                    let items = self.pop_mark()?;
                    let id = self.new_node(Node::Dict(Vec::new(), HashMap::new()))?;
                    self.set_items(id, &items)?;
                    self.stack.push(id);
                }
                op::SETITEM => {
                    let items = self.pop_n(2)?;
                    let dict = self.top()?;
                    self.set_items(dict, &items)?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?;
                    self.set_items(dict, &items)?;
                }

                op::GLOBAL => {
                    let module = utf8(self.r.line()?)?;
                    let name = utf8(self.r.line()?)?;
                    if self.old_protocol && RENAMED_MODULES.contains(&module) {
                        return Err(unhandled("a class of a module zodbpickle renames"));
                    }
                    self.push(Node::Global(module.to_owned(), name.to_owned()))?;
                }

                op::PUT => {
                    let index = memo_index(self.r.line()?)?;
                    self.memoize(index)?;
                }
                op::BINPUT => {
                    let index = self.r.uint_le(1)?;
                    self.memoize(index)?;
                }
                op::LONG_BINPUT => {
                    let index = self.r.uint_le(4)?;
                    self.memoize(index)?;
                }
                op::GET => {
                    let index = memo_index(self.r.line()?)?;
                    self.fetch(index)?;
                }
                op::BINGET => {
                    let index = self.r.uint_le(1)?;
                    self.fetch(index)?;
                }
                op::LONG_BINGET => {
                    let index = self.r.uint_le(4)?;
                    self.fetch(index)?;
                }

                op::PERSID => {
                    let line = self.r.line()?;
                    if !line.is_ascii() {
                        return Err(unhandled("a non-ASCII text persistent id"));
                    }
                    let pid = Object::Str(String::from_utf8(line.to_vec()).expect("ASCII"));
                    let r = self.reference(pid)?;
                    self.push(Node::Ref(r))?;
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let pid = self.copy_out(pid, true)?;
                    let r = self.reference(pid)?;
                    self.push(Node::Ref(r))?;
                }

                op::REDUCE
                | op::BUILD
                | op::NEWOBJ
                | op::OBJ
                | op::INST
                | op::EXT1
                | op::EXT2
                | op::EXT4 => {
                    return Err(unhandled(
                        "an instance of a class other than a persistent one",
                    ))
                }
                op::STRING | op::UNICODE => {
                    return Err(unhandled("protocol 0 string opcodes"));
                }
                op::POP | op::POP_MARK => {
                    return Err(unhandled(
                        "POP opcodes (no pickler writes them in a record)",
                    ))
                }
                _ => return Err(unhandled("an opcode zodbpickle does not read")),
            }
        }
    }

    fn memoize(&mut self, index: u64) -> Result<(), NotHandled> {
        let top = self.top()?;
        self.memo.insert(index, top);
        Ok(())
    }

    fn fetch(&mut self, index: u64) -> Result<(), NotHandled> {
        let id = *self
            .memo
            .get(&index)
            .ok_or(unhandled("memo entry never stored"))?;
        self.charge(1)?;
        self.stack.push(id);
        Ok(())
    }

    fn extend_list(&mut self, items: &[Id]) -> Result<(), NotHandled> {
        let list = self.top()?;
        match &mut self.nodes[list] {
            Node::List(list) => {
                list.extend_from_slice(items);
                Ok(())
            }
            _ => Err(unhandled("APPEND to something that is not a list")),
        }
    }

    /// SETITEM(S) and DICT: a repeated key replaces the value in place, keeping the
    /// first key (Python's dict).
    fn set_items(&mut self, dict: Id, items: &[Id]) -> Result<(), NotHandled> {
        if !items.len().is_multiple_of(2) {
            return Err(unhandled("odd number of dict items"));
        }
        if !matches!(self.nodes[dict], Node::Dict(..)) {
            return Err(unhandled("SETITEM on something that is not a dict"));
        }
        for pair in items.chunks_exact(2) {
            let key = self.hash_key(pair[0])?;
            let Node::Dict(entries, index) = &mut self.nodes[dict] else {
                unreachable!("checked above");
            };
            match index.get(&key) {
                Some(&at) => entries[at].1 = pair[1],
                None => {
                    index.insert(key, entries.len());
                    entries.push((pair[0], pair[1]));
                }
            }
        }
        Ok(())
    }

    /// The identity of a dict key under Python's rules (`1`, `1.0` and `True` are one
    /// key). Keys Python cannot hash, and NaN (equal to nothing but itself), are not
    /// modelled.
    fn hash_key(&mut self, id: Id) -> Result<Vec<u8>, NotHandled> {
        let mut key = Vec::new();
        let mut todo = vec![(id, 0usize)];
        while let Some((id, depth)) = todo.pop() {
            self.charge(1)?;
            if depth > MAX_DEPTH {
                return Err(unhandled("values nested too deeply"));
            }
            match &self.nodes[id] {
                Node::Scalar(o) => {
                    if !object::scalar_key(o, &mut key) {
                        return Err(unhandled("a dict key that is NaN"));
                    }
                }
                Node::Tuple(items) => {
                    key.push(b'T');
                    key.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    todo.extend(items.iter().rev().map(|&i| (i, depth + 1)));
                }
                _ => return Err(unhandled("a dict key Python cannot hash")),
            }
        }
        Ok(key)
    }

    /// Copies `root` out of the arena. A list or dict reached twice (shared, or in a
    /// cycle) is not modelled: Python's pickler would keep the sharing, this crate's
    /// writer would not.
    fn copy_out(&mut self, root: Id, globals: bool) -> Result<Object, NotHandled> {
        enum Task {
            Copy(Id, usize),
            Tuple(usize),
            List(usize),
            Dict(usize),
        }
        let mut copied = vec![false; self.nodes.len()];
        let mut tasks = vec![Task::Copy(root, 0)];
        let mut done: Vec<Object> = Vec::new();
        while let Some(task) = tasks.pop() {
            match task {
                Task::Copy(id, depth) => {
                    self.charge(1)?;
                    if depth > MAX_DEPTH {
                        return Err(unhandled("values nested too deeply"));
                    }
                    let mut once = |id: Id| {
                        if std::mem::replace(&mut copied[id], true) {
                            Err(unhandled("a list or dict shared by two places"))
                        } else {
                            Ok(())
                        }
                    };
                    match &self.nodes[id] {
                        Node::Scalar(o) => done.push(o.clone()),
                        Node::Ref(r) => done.push(Object::Ref(r.clone())),
                        Node::Global(module, name) => {
                            if !globals {
                                return Err(unhandled("a class used as a value"));
                            }
                            done.push(Object::Global {
                                module: module.clone(),
                                name: name.clone(),
                            });
                        }
                        Node::Tuple(items) => {
                            tasks.push(Task::Tuple(items.len()));
                            tasks.extend(items.iter().rev().map(|&i| Task::Copy(i, depth + 1)));
                        }
                        Node::List(items) => {
                            once(id)?;
                            tasks.push(Task::List(items.len()));
                            tasks.extend(items.iter().rev().map(|&i| Task::Copy(i, depth + 1)));
                        }
                        Node::Dict(entries, _) => {
                            once(id)?;
                            tasks.push(Task::Dict(entries.len()));
                            for &(k, v) in entries.iter().rev() {
                                tasks.push(Task::Copy(v, depth + 1));
                                tasks.push(Task::Copy(k, depth + 1));
                            }
                        }
                    }
                }
                Task::Tuple(n) => {
                    let items = done.split_off(done.len() - n);
                    done.push(Object::Tuple(items));
                }
                Task::List(n) => {
                    let items = done.split_off(done.len() - n);
                    done.push(Object::List(items));
                }
                Task::Dict(n) => {
                    let mut flat = done.split_off(done.len() - 2 * n).into_iter();
                    let mut entries = Vec::with_capacity(n);
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        entries.push((k, v));
                    }
                    done.push(Object::Dict(entries));
                }
            }
        }
        Ok(done.pop().expect("the root was copied"))
    }

    /// `PersistentReferenceFactory.persistent_load(pid)`.
    fn reference(&mut self, data: Object) -> Result<Rc<PersistentRef>, NotHandled> {
        let (exact, loose) = factory_keys(&data)?;
        if let Some(r) = self.factory.refs.get(&exact) {
            return Ok(r.clone());
        }
        let (oid, database, weak) = reference_fields(&data)?;
        let r = Rc::new(PersistentRef {
            data,
            oid,
            database,
            weak,
            loose_key: loose,
        });
        self.factory.refs.insert(exact, r.clone());
        Ok(r)
    }
}

/// The factory's cache key `tuple(pid)`, exact and with classes left out. Items of a
/// tuple or list id are text, bytes, tuples of those, or classes (hashed by identity).
fn factory_keys(data: &Object) -> Result<(Vec<u8>, Vec<u8>), NotHandled> {
    let mut exact = Vec::new();
    let mut loose = Vec::new();
    let both = |exact: &mut Vec<u8>, loose: &mut Vec<u8>, bytes: &[u8]| {
        exact.extend_from_slice(bytes);
        loose.extend_from_slice(bytes);
    };
    let header = |n: usize| [&b"T"[..], &(n as u64).to_le_bytes()].concat();
    match data {
        // tuple(b"...") is a tuple of ints, tuple("...") one of one-character strings.
        Object::Bytes(b) => {
            both(&mut exact, &mut loose, &header(b.len()));
            for &byte in b {
                both(&mut exact, &mut loose, &[b'I', byte]);
            }
        }
        Object::Str(s) => {
            both(&mut exact, &mut loose, &header(s.chars().count()));
            for c in s.chars() {
                let mut buf = [0u8; 4];
                both(&mut exact, &mut loose, b"S");
                both(&mut exact, &mut loose, c.encode_utf8(&mut buf).as_bytes());
            }
        }
        Object::Tuple(items) | Object::List(items) => {
            let mut todo: Vec<&Object> = vec![];
            both(&mut exact, &mut loose, &header(items.len()));
            todo.extend(items.iter().rev());
            while let Some(item) = todo.pop() {
                match item {
                    Object::Str(s) => {
                        both(&mut exact, &mut loose, b"S");
                        both(&mut exact, &mut loose, &(s.len() as u64).to_le_bytes());
                        both(&mut exact, &mut loose, s.as_bytes());
                    }
                    Object::Bytes(b) => {
                        both(&mut exact, &mut loose, b"B");
                        both(&mut exact, &mut loose, &(b.len() as u64).to_le_bytes());
                        both(&mut exact, &mut loose, b);
                    }
                    Object::Tuple(inner) => {
                        both(&mut exact, &mut loose, &header(inner.len()));
                        todo.extend(inner.iter().rev());
                    }
                    Object::Global { module, name } => {
                        exact.push(b'G');
                        for part in [module, name] {
                            exact.extend_from_slice(&(part.len() as u64).to_le_bytes());
                            exact.extend_from_slice(part.as_bytes());
                        }
                        loose.push(b'G');
                    }
                    _ => return Err(unhandled("a persistent id of an unknown form")),
                }
            }
        }
        _ => return Err(unhandled("a persistent id of an unknown form")),
    }
    Ok((exact, loose))
}

/// `PersistentReference.__init__`: `(oid, database_name, weak)` of the id forms ZODB
/// writes — `oid`, `(oid, class)`, `['w', (oid,)]`, `['w', (oid, database)]`,
/// `['m', (database, oid, class)]`, `['n', (database, oid)]` and the legacy `[oid]`.
fn reference_fields(data: &Object) -> Result<(Vec<u8>, Option<String>, bool), NotHandled> {
    let odd = || unhandled("a persistent id of an unknown form");
    let oid = |o: &Object| match o {
        Object::Bytes(b) => Ok(b.clone()),
        Object::Str(s) if s.is_ascii() => Ok(s.as_bytes().to_vec()),
        _ => Err(odd()),
    };
    let database = |o: &Object| match o {
        Object::Str(s) => Ok(s.clone()),
        _ => Err(odd()),
    };
    let is_class = |o: &Object| match o {
        Object::Global { .. } => true,
        Object::Tuple(pair) => matches!(pair.as_slice(), [Object::Str(_), Object::Str(_)]),
        _ => false,
    };
    match data {
        Object::Bytes(_) | Object::Str(_) => Ok((oid(data)?, None, false)),
        Object::Tuple(items) => match items.as_slice() {
            [o, class] if is_class(class) => Ok((oid(o)?, None, false)),
            _ => Err(odd()),
        },
        Object::List(items) => match items.as_slice() {
            [Object::Str(kind), Object::Tuple(args)] if kind == "m" => match args.as_slice() {
                [db, o, class] if is_class(class) => Ok((oid(o)?, Some(database(db)?), false)),
                _ => Err(odd()),
            },
            [Object::Str(kind), Object::Tuple(args)] if kind == "n" => match args.as_slice() {
                [db, o] => Ok((oid(o)?, Some(database(db)?), false)),
                _ => Err(odd()),
            },
            [Object::Str(kind), Object::Tuple(args)] if kind == "w" => match args.as_slice() {
                [o] => Ok((oid(o)?, None, true)),
                [o, db] => Ok((oid(o)?, Some(database(db)?), true)),
                _ => Err(odd()),
            },
            // The legacy weak reference `[oid]` (a one-item list whose item is not one
            // of the type letters, which would need a second item).
            [Object::Str(kind)] if matches!(kind.as_str(), "m" | "n" | "w") => Err(odd()),
            [o] => Ok((oid(o)?, None, true)),
            _ => Err(odd()),
        },
        _ => Err(odd()),
    }
}

/// LONG4 and BINSTRING lengths are signed; Python refuses negative ones.
fn signed_len(bytes: [u8; 4]) -> Result<u64, NotHandled> {
    u64::try_from(i32::from_le_bytes(bytes)).map_err(|_| unhandled("a negative length"))
}

fn utf8(bytes: &[u8]) -> Result<&str, NotHandled> {
    std::str::from_utf8(bytes).map_err(|_| unhandled("a class name that is not UTF-8"))
}

/// An INT or LONG literal as Python 2 writes them: canonical decimal only (CPython reads
/// other spellings with base 0, where `010` is octal).
fn decimal(text: &[u8]) -> Result<i128, NotHandled> {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    let canonical = !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits == b"0" || digits[0] != b'0');
    if !canonical {
        return Err(unhandled("an integer literal that is not plain decimal"));
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(unhandled("int beyond 128 bits"))
}

/// A FLOAT literal (`repr` of a float): digits, exponent, `inf` or `nan`.
fn float_literal(text: &[u8]) -> Result<f64, NotHandled> {
    let bad = || unhandled("a float literal that is not a float's repr");
    let t = std::str::from_utf8(text).map_err(|_| bad())?;
    let plain = t
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    let special = matches!(t, "inf" | "-inf" | "nan");
    if !(plain || special) || t.is_empty() {
        return Err(bad());
    }
    let f: f64 = t.parse().map_err(|_| bad())?;
    // Python raises OverflowError where Rust rounds to infinity.
    if f.is_infinite() && !special {
        return Err(bad());
    }
    Ok(f)
}

fn memo_index(text: &[u8]) -> Result<u64, NotHandled> {
    std::str::from_utf8(text)
        .ok()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .ok_or(unhandled("a memo index that is not plain decimal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zodb_bucket_record() {
        // OOBucket {'k000': PersistentMapping oid 0x3f, 'k001': oid 0x40}, as ZODB
        // writes it: the class memoized in the first pickle, fetched in the state's ids.
        let mut rec = b"\x80\x03cBTrees.OOBTree\nOOBucket\nq\x00.".to_vec();
        rec.extend_from_slice(b"\x80\x03(X\x04\x00\x00\x00k000q\x01C\x08\x00\x00\x00\x00\x00\x00\x00?q\x02cpersistent.mapping\nPersistentMapping\nq\x03\x86q\x04QX\x04\x00\x00\x00k001q\x05C\x08\x00\x00\x00\x00\x00\x00\x00@q\x06h\x03\x86q\x07Qtq\x08\x85q\x09.");
        let mut factory = Factory::default();
        let r = record(&rec, &mut factory).unwrap();
        assert_eq!(r.class.module, "BTrees.OOBTree");
        assert_eq!(r.class.name, "OOBucket");
        assert_eq!(r.class.end, 30);
        let Object::Tuple(state) = r.state else {
            panic!("state is a tuple")
        };
        let Object::Tuple(items) = &state[0] else {
            panic!("items")
        };
        assert_eq!(items.len(), 4);
        let Object::Ref(v) = &items[1] else {
            panic!("a reference")
        };
        assert_eq!(v.oid, b"\x00\x00\x00\x00\x00\x00\x00?");
        assert!(!v.weak);
        // The same id in another record of the same resolution is the same reference.
        let again = record(&rec, &mut factory).unwrap();
        let Object::Tuple(state2) = again.state else {
            panic!()
        };
        let Object::Tuple(items2) = &state2[0] else {
            panic!()
        };
        let Object::Ref(v2) = &items2[1] else {
            panic!()
        };
        assert!(Rc::ptr_eq(v, v2));
    }

    #[test]
    fn what_is_not_modelled() {
        let class = b"\x80\x03cBTrees.OOBTree\nOOBucket\nq\x00.".to_vec();
        let with = |state: &[u8]| {
            let mut f = Factory::default();
            record(&[&class[..], state].concat(), &mut f).map(|_| ())
        };
        // A datetime value (REDUCE), a set, protocol 4, a shared list, trailing data.
        assert!(matches!(
            with(b"\x80\x03cdatetime\ndate\nC\x04\x07\xe8\x01\x01\x85R\x85."),
            Err(NotHandled::Pickle(_))
        ));
        assert!(matches!(
            with(b"\x80\x04\x8c\x01a\x85\x85."),
            Err(NotHandled::Pickle(_))
        ));
        assert!(matches!(
            with(b"\x80\x03]q\x01h\x01\x86\x85."),
            Err(NotHandled::Pickle(_))
        ));
        assert!(matches!(
            with(b"\x80\x03N\x85\x85.N"),
            Err(NotHandled::Pickle(_))
        ));
        assert!(matches!(
            with(b"\x80\x02U\x02\xc3\xa9\x85\x85."),
            Err(NotHandled::Pickle(_))
        ));
        // An immutable shared value is fine.
        assert!(with(b"\x80\x03X\x01\x00\x00\x00aq\x01h\x01\x86\x85.").is_ok());
        // Python 2 ASCII strings, INT and LONG literals.
        assert!(with(b"\x80\x02(U\x01aI12345678901\nL7L\nt\x85.").is_ok());
        assert!(matches!(with(b"I010\n\x85."), Err(NotHandled::Pickle(_))));
        // A class as a value is not; every truncation fails cleanly.
        assert!(matches!(
            with(b"\x80\x03h\x00\x85\x85."),
            Err(NotHandled::Pickle(_))
        ));
        let good = b"\x80\x03X\x01\x00\x00\x00aq\x01h\x01\x86\x85.";
        for end in 0..good.len() {
            assert!(with(&good[..end]).is_err());
        }
    }

    #[test]
    fn reference_forms() {
        let mut f = Factory::default();
        let mut vm = Vm::new(b"", &mut f);
        let oid = Object::Bytes(vec![0, 0, 0, 0, 0, 0, 0, 7]);
        let class = Object::Global {
            module: "m".into(),
            name: "C".into(),
        };
        let s = |t: &str| Object::Str(t.into());
        let plain = vm.reference(oid.clone()).unwrap();
        let with_class = vm
            .reference(Object::Tuple(vec![oid.clone(), class.clone()]))
            .unwrap();
        let weak = vm
            .reference(Object::List(vec![s("w"), Object::Tuple(vec![oid.clone()])]))
            .unwrap();
        let cross = vm
            .reference(Object::List(vec![
                s("m"),
                Object::Tuple(vec![s("other"), oid.clone(), class.clone()]),
            ]))
            .unwrap();
        assert!(!Rc::ptr_eq(&plain, &with_class));
        assert!(weak.weak && !plain.weak && !with_class.weak);
        assert_eq!(cross.database.as_deref(), Some("other"));
        assert_eq!(with_class.oid, plain.oid);
        // A list and a tuple with equal items are one factory entry (`tuple(ref)`).
        let again = vm
            .reference(Object::List(vec![oid.clone(), class.clone()]))
            .unwrap();
        assert!(Rc::ptr_eq(&again, &with_class));
        // The same oid with another spelling of the class: a different entry, equal
        // once classes are left out.
        let alias = vm
            .reference(Object::Tuple(vec![
                oid.clone(),
                Object::Global {
                    module: "m2".into(),
                    name: "C".into(),
                },
            ]))
            .unwrap();
        assert!(!Rc::ptr_eq(&alias, &with_class));
        assert_eq!(alias.loose_key, with_class.loose_key);
        assert!(vm.reference(Object::Int(1)).is_err());
        assert!(vm
            .reference(Object::Tuple(vec![oid, Object::Int(1)]))
            .is_err());
    }
}
