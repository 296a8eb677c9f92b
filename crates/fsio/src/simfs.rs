//! [`SimFs`]: a simulated directory tree that can show what the disk would hold after a
//! power loss — [`crate::sim::SimFile`] extended from one file to files *and* their
//! directory entries.
//!
//! It keeps the tree as the running process sees it and a log of every operation: data
//! operations on a file (write, length change, sync — by inode, so they follow the file
//! through renames and extra names) and entry operations (create, link, rename, remove,
//! and the sync of a directory). A *crash image* after a number of logged operations is
//! what the disk may hold then, by the rules of the crate docs:
//!
//! - **Entries.** An entry operation is durable when its directory (for a rename, the
//!   directory of either name) was synced after it. The others reach the disk in the order
//!   they were made, or not at all: an image keeps the durable ones and the first `m` of
//!   the others, for every `m`. An operation that cannot apply in an image (its directory
//!   or its source did not survive) is dropped, as the disk would lose it.
//! - **Data.** Each file's operations up to its last sync are durable; each one after may
//!   be lost, complete or torn (see [`SimFile`]'s fates). The images cover: all of them
//!   lost, all complete, and each one torn in each way (the file's earlier ones complete,
//!   its later ones lost) while the other files' pending operations are all lost or all
//!   complete.
//!
//! Every combination of an entry prefix with a data variant is one image. An image is a
//! new `SimFs` whose durable starting point is that state, so a test reopens its storage
//! on it, checks it, and can go on working (and crash again).
//!
//! Locks are not simulated (one process uses a simulated disk); neither are permissions.
//! [`crate::forgetful::Forgetful`] wraps a `SimFs` to drop chosen syncs (negative controls).

use crate::sim::{Fate, SimFile, SimOp};
use crate::{DirEntry, FileIo, Fs, Lock, Meta, Mode};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// An inode number: the index of a file or directory in the simulated disk.
pub type Ino = usize;

/// One logged operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsOp {
    /// On the data of the file `ino`.
    Data { ino: Ino, op: SimOp },
    /// A new file or directory `ino` named `path`.
    Create { path: PathBuf, ino: Ino, dir: bool },
    /// Another name `path` for the file `ino`.
    Link { path: PathBuf, ino: Ino },
    /// `from` (the file or directory `ino`) renamed to `to` (with everything under it,
    /// for a directory).
    Rename {
        from: PathBuf,
        to: PathBuf,
        ino: Ino,
    },
    /// The name `path` (of a file or an empty directory) removed.
    Remove { path: PathBuf },
    /// The directory `path` synced.
    SyncDir { path: PathBuf },
}

/// How torn writes are enumerated in crash images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Torn {
    /// Unsynced writes are lost or complete, never torn.
    Never,
    /// Also a prefix of a write, cut every `step` bytes (and at every byte of its first and
    /// last 64): pieces of a write reach the disk in order.
    InOrder(usize),
    /// Also a suffix, or all but a hole of `step` bytes: pieces reach the disk in any order.
    AnyOrder(usize),
}

#[derive(Debug, Clone, Default)]
struct Node {
    dir: bool,
    data: Vec<u8>,
}

/// Names and inodes: one state of the disk.
#[derive(Debug, Clone)]
struct Tree {
    /// Every name, of files and directories, by normalised absolute path; `/` always exists.
    names: BTreeMap<PathBuf, Ino>,
    nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Tree {
        let mut names = BTreeMap::new();
        names.insert(PathBuf::from("/"), 0);
        Tree {
            names,
            nodes: vec![Node {
                dir: true,
                data: Vec::new(),
            }],
        }
    }
}

fn not_found(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory (simulated)", p.display()),
    )
}

fn exists_err(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{}: exists (simulated)", p.display()),
    )
}

fn invalid(p: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {what} (simulated)", p.display()),
    )
}

/// `/` and the normal components of `p` (relative paths are taken from `/`).
fn norm(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

fn parent_of(p: &Path) -> PathBuf {
    p.parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_owned)
}

impl Tree {
    fn get(&self, p: &Path) -> Option<Ino> {
        self.names.get(p).copied()
    }

    fn is_dir(&self, p: &Path) -> bool {
        self.get(p).is_some_and(|i| self.nodes[i].dir)
    }

    fn children<'a>(&'a self, dir: &'a Path) -> impl Iterator<Item = (&'a PathBuf, Ino)> + 'a {
        self.names
            .range(dir.to_path_buf()..)
            .skip(1)
            .take_while(move |(p, _)| p.starts_with(dir))
            .filter(move |(p, _)| p.parent() == Some(dir))
            .map(|(p, i)| (p, *i))
    }

    fn new_node(&mut self, dir: bool) -> Ino {
        self.nodes.push(Node {
            dir,
            data: Vec::new(),
        });
        self.nodes.len() - 1
    }

    /// Checks that `p` can be created: it does not exist and its parent is a directory.
    fn check_new(&self, p: &Path) -> io::Result<()> {
        if self.names.contains_key(p) {
            return Err(exists_err(p));
        }
        if !self.is_dir(&parent_of(p)) {
            return Err(not_found(&parent_of(p)));
        }
        Ok(())
    }

    /// Applies an entry operation; an error leaves the tree unchanged.
    fn apply_entry(&mut self, op: &FsOp) -> io::Result<()> {
        match op {
            FsOp::Data { .. } | FsOp::SyncDir { .. } => Ok(()),
            FsOp::Create { path, ino, dir } => {
                self.check_new(path)?;
                if self.nodes.len() <= *ino {
                    self.nodes.resize(ino + 1, Node::default());
                }
                self.nodes[*ino].dir = *dir;
                self.names.insert(path.clone(), *ino);
                Ok(())
            }
            FsOp::Link { path, ino } => {
                self.check_new(path)?;
                self.names.insert(path.clone(), *ino);
                Ok(())
            }
            FsOp::Remove { path } => {
                let ino = self.get(path).ok_or_else(|| not_found(path))?;
                if self.nodes[ino].dir && self.children(path).next().is_some() {
                    return Err(invalid(path, "directory not empty"));
                }
                self.names.remove(path);
                Ok(())
            }
            FsOp::Rename { from, to, ino } => {
                if !self.is_dir(&parent_of(to)) {
                    return Err(not_found(&parent_of(to)));
                }
                let ino = match self.get(from) {
                    Some(i) if i == *ino => i,
                    // The source name did not survive (it was never made durable) but the
                    // rename did: the file has its new name.
                    _ if !self.nodes[*ino].dir => {
                        if self.is_dir(to) {
                            return Err(invalid(to, "is a directory"));
                        }
                        self.names.insert(to.clone(), *ino);
                        return Ok(());
                    }
                    _ => return Err(not_found(from)),
                };
                if from == to {
                    return Ok(());
                }
                if self.nodes[ino].dir {
                    if to.starts_with(from) {
                        return Err(invalid(to, "rename of a directory into itself"));
                    }
                    if let Some(t) = self.get(to) {
                        if !self.nodes[t].dir || self.children(to).next().is_some() {
                            return Err(invalid(to, "not an empty directory"));
                        }
                    }
                    let moved: Vec<(PathBuf, Ino)> = self
                        .names
                        .range(from.clone()..)
                        .take_while(|(p, _)| p.starts_with(from))
                        .map(|(p, i)| (p.clone(), *i))
                        .collect();
                    for (p, _) in &moved {
                        self.names.remove(p);
                    }
                    self.names.remove(to);
                    for (p, i) in moved {
                        let rest = p.strip_prefix(from).map_err(io::Error::other)?;
                        let np = if rest.as_os_str().is_empty() {
                            to.clone()
                        } else {
                            to.join(rest)
                        };
                        self.names.insert(np, i);
                    }
                } else {
                    if self.is_dir(to) {
                        return Err(invalid(to, "is a directory"));
                    }
                    self.names.remove(from);
                    self.names.insert(to.clone(), ino);
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// The durable state the log starts from.
    base: Tree,
    /// The state as the process sees it.
    now: Tree,
    log: Vec<FsOp>,
    fail_writes: bool,
}

/// A simulated disk; see the module docs. Clones share the disk.
#[derive(Debug, Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

/// An open file of a [`SimFs`].
struct SimHandle {
    state: Arc<Mutex<State>>,
    ino: Ino,
    writable: bool,
}

impl SimHandle {
    fn check_write(&self, s: &State) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "file opened read-only (simulated)",
            ));
        }
        if s.fail_writes {
            return Err(io::Error::other("simulated write failure (no space left)"));
        }
        Ok(())
    }
}

impl FileIo for SimHandle {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock();
        let data = &s.now.nodes[self.ino].data;
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= data.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&data[start..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        self.check_write(&s)?;
        let op = SimOp::Write {
            offset,
            data: buf.to_vec(),
        };
        SimFile::apply(&mut s.now.nodes[self.ino].data, &op, Fate::Full);
        s.log.push(FsOp::Data { ino: self.ino, op });
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        self.check_write(&s)?;
        let op = SimOp::SetLen(len);
        SimFile::apply(&mut s.now.nodes[self.ino].data, &op, Fate::Full);
        s.log.push(FsOp::Data { ino: self.ino, op });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.fail_writes {
            return Err(io::Error::other("simulated fsync failure"));
        }
        s.log.push(FsOp::Data {
            ino: self.ino,
            op: SimOp::Sync,
        });
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.state.lock().now.nodes[self.ino].data.len() as u64)
    }
}

/// How many of each pending file's operations complete, and the fate of the next one.
type Variant = Vec<(Ino, usize, Fate)>;

/// The crash images at one point of a [`SimFs`]'s log (see [`SimFs::crash_images`]):
/// every entry prefix combined with every data variant, built on demand.
pub struct CrashImages {
    /// The names of each image, one tree per prefix of the pending entry operations.
    trees: Vec<Tree>,
    /// The durable bytes of every file.
    durable: Vec<Vec<u8>>,
    /// The operations of each file after its last sync.
    pending: Vec<(Ino, Vec<SimOp>)>,
    variants: Vec<Variant>,
}

impl CrashImages {
    /// The number of images.
    pub fn len(&self) -> usize {
        self.trees.len() * self.variants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `n` (`n < len()`).
    pub fn get(&self, n: usize) -> SimFs {
        let names = &self.trees[n / self.variants.len()];
        let v = &self.variants[n % self.variants.len()];
        let mut tree = names.clone();
        let mut used = vec![false; tree.nodes.len()];
        for &i in tree.names.values() {
            used[i] = true;
        }
        for (ino, data) in self.durable.iter().enumerate() {
            if used[ino] {
                tree.nodes[ino].data.clone_from(data);
            }
        }
        for &(ino, complete, fate) in v {
            if !used[ino] {
                continue;
            }
            let ops = &self
                .pending
                .iter()
                .find(|(i, _)| *i == ino)
                .expect("pending")
                .1;
            for op in &ops[..complete] {
                SimFile::apply(&mut tree.nodes[ino].data, op, Fate::Full);
            }
            if let Some(op) = ops.get(complete) {
                SimFile::apply(&mut tree.nodes[ino].data, op, fate);
            }
        }
        SimFs::from_tree(tree)
    }

    /// Every image, in order.
    pub fn iter(&self) -> impl Iterator<Item = SimFs> + '_ {
        (0..self.len()).map(|n| self.get(n))
    }
}

impl SimFs {
    /// An empty disk (only `/`).
    pub fn new() -> SimFs {
        SimFs::default()
    }

    fn from_tree(tree: Tree) -> SimFs {
        SimFs {
            state: Arc::new(Mutex::new(State {
                base: tree.clone(),
                now: tree,
                log: Vec::new(),
                fail_writes: false,
            })),
        }
    }

    /// A new disk that holds, durably, what this one holds now (as after a clean shutdown
    /// that synced everything).
    pub fn snapshot(&self) -> SimFs {
        SimFs::from_tree(self.state.lock().now.clone())
    }

    /// Number of logged operations so far: a crash point.
    pub fn op_count(&self) -> usize {
        self.state.lock().log.len()
    }

    /// The log from `from` on.
    pub fn ops_since(&self, from: usize) -> Vec<FsOp> {
        self.state.lock().log[from..].to_vec()
    }

    /// Makes writes, length changes and syncs fail with `ENOSPC`-like errors.
    pub fn set_fail_writes(&self, fail: bool) {
        self.state.lock().fail_writes = fail;
    }

    /// Every path on the disk with, for files, their content (for comparing images).
    pub fn listing(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        let s = self.state.lock();
        s.now
            .names
            .iter()
            .map(|(p, &i)| {
                let n = &s.now.nodes[i];
                (p.clone(), (!n.dir).then(|| n.data.clone()))
            })
            .collect()
    }

    /// The crash images after the first `at` logged operations; see the module docs.
    /// They are built one at a time, as [`CrashImages::get`] or the iterator asks.
    pub fn crash_images(&self, at: usize, torn: Torn) -> CrashImages {
        let s = self.state.lock();
        let log = &s.log[..at];
        // Entries: which are durable, and the order of the others.
        let mut forced = vec![false; at];
        let mut synced_dirs: Vec<&Path> = Vec::new();
        for i in (0..at).rev() {
            match &log[i] {
                FsOp::SyncDir { path } => synced_dirs.push(path),
                FsOp::Create { path, .. } | FsOp::Link { path, .. } | FsOp::Remove { path } => {
                    let d = parent_of(path);
                    forced[i] = synced_dirs.iter().any(|s| *s == d);
                }
                FsOp::Rename { from, to, .. } => {
                    let (a, b) = (parent_of(from), parent_of(to));
                    forced[i] = synced_dirs.iter().any(|s| *s == a || *s == b);
                }
                FsOp::Data { .. } => {}
            }
        }
        let is_entry = |op: &FsOp| !matches!(op, FsOp::Data { .. } | FsOp::SyncDir { .. });
        let pending_entries: Vec<usize> = (0..at)
            .filter(|&i| is_entry(&log[i]) && !forced[i])
            .collect();

        // Data: the durable bytes of each file, and its operations after its last sync.
        let n_nodes = s.now.nodes.len();
        let mut durable: Vec<Vec<u8>> = (0..n_nodes)
            .map(|i| {
                s.base
                    .nodes
                    .get(i)
                    .map_or_else(Vec::new, |n| n.data.clone())
            })
            .collect();
        let mut per_file: Vec<Vec<&SimOp>> = vec![Vec::new(); n_nodes];
        for op in log {
            if let FsOp::Data { ino, op } = op {
                per_file[*ino].push(op);
            }
        }
        let mut pending: Vec<(Ino, Vec<SimOp>)> = Vec::new();
        for (ino, ops) in per_file.into_iter().enumerate() {
            let synced = ops
                .iter()
                .rposition(|op| **op == SimOp::Sync)
                .map_or(0, |i| i + 1);
            for op in &ops[..synced] {
                SimFile::apply(&mut durable[ino], op, Fate::Full);
            }
            let rest: Vec<SimOp> = ops[synced..]
                .iter()
                .filter(|op| ***op != SimOp::Sync)
                .map(|op| (*op).clone())
                .collect();
            if !rest.is_empty() {
                pending.push((ino, rest));
            }
        }

        // The data variants: for each pending file, how many of its operations complete
        // and the fate of the next one.
        let all = |complete: bool| -> Variant {
            pending
                .iter()
                .map(|(ino, ops)| (*ino, if complete { ops.len() } else { 0 }, Fate::Lost))
                .collect()
        };
        let mut variants: Vec<Variant> = vec![all(false)];
        if !pending.is_empty() {
            variants.push(all(true));
        }
        for (n, (ino, ops)) in pending.iter().enumerate() {
            for (k, op) in ops.iter().enumerate() {
                let fates = match torn {
                    Torn::Never => vec![],
                    Torn::InOrder(step) => SimFile::ordered_fates(op, step),
                    Torn::AnyOrder(step) => SimFile::arbitrary_fates(op, step),
                };
                let fates: Vec<Fate> = fates
                    .into_iter()
                    .filter(|f| !matches!(f, Fate::Lost | Fate::Full))
                    .chain((k > 0).then_some(Fate::Lost))
                    .collect();
                for fate in fates {
                    for others_complete in [false, true] {
                        if pending.len() == 1 && others_complete {
                            continue;
                        }
                        let mut v = all(others_complete);
                        v[n] = (*ino, k, fate);
                        variants.push(v);
                    }
                }
            }
        }

        let mut trees = Vec::with_capacity(pending_entries.len() + 1);
        for m in 0..=pending_entries.len() {
            let mut names = s.base.clone();
            names.nodes.resize(n_nodes, Node::default());
            for n in &mut names.nodes {
                n.data = Vec::new();
            }
            for (i, op) in log.iter().enumerate() {
                if !is_entry(op) {
                    continue;
                }
                let keep = forced[i] || pending_entries[..m].contains(&i);
                if keep {
                    // An operation whose directory or source did not survive is lost too.
                    let _ = names.apply_entry(op);
                }
            }
            trees.push(names);
        }
        CrashImages {
            trees,
            durable,
            pending,
            variants,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> io::Result<T>) -> io::Result<T> {
        f(&mut self.state.lock())
    }

    /// Applies an entry operation to the process's view and logs it.
    fn entry(&self, op: FsOp) -> io::Result<()> {
        self.with(|s| {
            s.now.apply_entry(&op)?;
            s.log.push(op);
            Ok(())
        })
    }
}

impl Fs for SimFs {
    fn open(&self, path: &Path, mode: Mode) -> io::Result<Arc<dyn FileIo>> {
        let p = norm(path);
        let ino = self.with(|s| {
            let found = s.now.get(&p);
            if let Some(i) = found {
                if s.now.nodes[i].dir {
                    return Err(invalid(&p, "is a directory"));
                }
            }
            match (found, mode) {
                (Some(_), Mode::CreateNew) => Err(exists_err(&p)),
                (Some(i), Mode::Truncate) => {
                    if s.fail_writes {
                        return Err(io::Error::other("simulated write failure"));
                    }
                    let op = SimOp::SetLen(0);
                    SimFile::apply(&mut s.now.nodes[i].data, &op, Fate::Full);
                    s.log.push(FsOp::Data { ino: i, op });
                    Ok(i)
                }
                (Some(i), _) => Ok(i),
                (None, Mode::Read | Mode::Write) => Err(not_found(&p)),
                (None, _) => {
                    s.now.check_new(&p)?;
                    let ino = s.now.new_node(false);
                    let op = FsOp::Create {
                        path: p.clone(),
                        ino,
                        dir: false,
                    };
                    s.now.apply_entry(&op)?;
                    s.log.push(op);
                    Ok(ino)
                }
            }
        })?;
        Ok(Arc::new(SimHandle {
            state: self.state.clone(),
            ino,
            writable: mode != Mode::Read,
        }))
    }

    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        let p = norm(path);
        let s = self.state.lock();
        let i = s.now.get(&p).ok_or_else(|| not_found(&p))?;
        let n = &s.now.nodes[i];
        Ok(Meta {
            is_dir: n.dir,
            len: if n.dir { 0 } else { n.data.len() as u64 },
        })
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let p = norm(path);
        self.with(|s| {
            s.now.check_new(&p)?;
            let ino = s.now.new_node(true);
            let op = FsOp::Create {
                path: p.clone(),
                ino,
                dir: true,
            };
            s.now.apply_entry(&op)?;
            s.log.push(op);
            Ok(())
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (norm(from), norm(to));
        let ino = self
            .state
            .lock()
            .now
            .get(&from)
            .ok_or_else(|| not_found(&from))?;
        self.entry(FsOp::Rename { from, to, ino })
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (norm(from), norm(to));
        let ino = self.with(|s| {
            let i = s.now.get(&from).ok_or_else(|| not_found(&from))?;
            if s.now.nodes[i].dir {
                return Err(invalid(&from, "is a directory"));
            }
            Ok(i)
        })?;
        self.entry(FsOp::Link { path: to, ino })
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let p = norm(path);
        if self.state.lock().now.is_dir(&p) {
            return Err(invalid(&p, "is a directory"));
        }
        self.entry(FsOp::Remove { path: p })
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        let p = norm(path);
        let s = self.state.lock();
        if s.now.get(&p).is_some() && !s.now.is_dir(&p) {
            return Err(invalid(&p, "not a directory"));
        }
        drop(s);
        self.entry(FsOp::Remove { path: p })
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let p = norm(path);
        self.with(|s| {
            if !s.now.is_dir(&p) {
                return Err(not_found(&p));
            }
            if s.fail_writes {
                return Err(io::Error::other("simulated fsync failure"));
            }
            s.log.push(FsOp::SyncDir { path: p.clone() });
            Ok(())
        })
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let p = norm(path);
        let s = self.state.lock();
        if !s.now.is_dir(&p) {
            return Err(not_found(&p));
        }
        Ok(s.now
            .children(&p)
            .map(|(c, i)| DirEntry {
                name: c.file_name().map(OsString::from).unwrap_or_default(),
                is_dir: s.now.nodes[i].dir,
                is_file: !s.now.nodes[i].dir,
            })
            .collect())
    }

    fn set_not_writable(&self, path: &Path) -> io::Result<()> {
        self.metadata(path).map(|_| ())
    }

    fn lock(&self, _path: &Path) -> io::Result<Lock> {
        Ok(Lock(Box::new(())))
    }

    fn host_path(&self, _path: &Path) -> Option<PathBuf> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read;

    fn write(fs: &SimFs, p: &str, data: &[u8], sync: bool) {
        let f = fs.open(Path::new(p), Mode::Create).unwrap();
        f.write_all_at(data, 0).unwrap();
        if sync {
            f.sync_data().unwrap();
        }
    }

    fn names(fs: &SimFs) -> Vec<String> {
        fs.listing()
            .into_iter()
            .map(|(p, d)| match d {
                Some(d) => format!("{}={}", p.display(), String::from_utf8_lossy(&d)),
                None => format!("{}/", p.display()),
            })
            .collect()
    }

    /// The distinct listings of the images at `at`.
    fn outcomes(fs: &SimFs, at: usize, torn: Torn) -> Vec<Vec<String>> {
        let mut v: Vec<Vec<String>> = fs
            .crash_images(at, torn)
            .iter()
            .map(|i| names(&i))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    #[test]
    fn the_process_sees_its_operations() {
        let fs = SimFs::new();
        fs.create_dir(Path::new("/d")).unwrap();
        write(&fs, "/d/a", b"hello", false);
        fs.hard_link(Path::new("/d/a"), Path::new("/d/b")).unwrap();
        fs.rename(Path::new("/d/a"), Path::new("/d/c")).unwrap();
        assert_eq!(read(&fs, Path::new("/d/b")).unwrap(), b"hello");
        assert_eq!(read(&fs, Path::new("/d/c")).unwrap(), b"hello");
        assert!(fs.metadata(Path::new("/d/a")).is_err());
        fs.remove_file(Path::new("/d/b")).unwrap();
        assert!(fs.remove_dir(Path::new("/d")).is_err(), "not empty");
        fs.rename(Path::new("/d"), Path::new("/e")).unwrap();
        assert_eq!(read(&fs, Path::new("/e/c")).unwrap(), b"hello");
        let mut listed: Vec<_> = fs
            .read_dir(Path::new("/e"))
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        listed.sort();
        assert_eq!(listed, vec![OsString::from("c")]);
        assert!(fs.open(Path::new("/e/c"), Mode::CreateNew).is_err());
        assert!(fs.open(Path::new("/nowhere/x"), Mode::Create).is_err());
    }

    #[test]
    fn an_entry_needs_the_sync_of_its_directory() {
        let fs = SimFs::new();
        fs.create_dir(Path::new("/d")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        let start = fs.op_count();
        write(&fs, "/d/a", b"x", true); // data synced, name not
        let end = fs.op_count();
        let got = outcomes(&fs, end, Torn::Never);
        assert_eq!(got, vec![vec!["//", "/d/"], vec!["//", "/d/", "/d/a=x"]]);
        fs.sync_dir(Path::new("/d")).unwrap();
        assert_eq!(
            outcomes(&fs, fs.op_count(), Torn::Never),
            vec![vec!["//", "/d/", "/d/a=x"]]
        );
        // Before any of it: only the directory.
        assert_eq!(outcomes(&fs, start, Torn::Never), vec![vec!["//", "/d/"]]);
    }

    #[test]
    fn a_renamed_file_whose_data_was_not_synced_can_come_back_empty() {
        let fs = SimFs::new();
        write(&fs, "/f", b"old", true);
        fs.sync_dir(Path::new("/")).unwrap();
        let fs = fs.snapshot();
        write(&fs, "/f.tmp", b"new", false);
        fs.rename(Path::new("/f.tmp"), Path::new("/f")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        let got = outcomes(&fs, fs.op_count(), Torn::Never);
        assert!(
            got.contains(&vec!["//".to_string(), "/f=".to_string()]),
            "{got:?}"
        );
        assert!(got.contains(&vec!["//".to_string(), "/f=new".to_string()]));
        // With the data synced before the rename, only the new content.
        let fs = SimFs::new();
        write(&fs, "/f.tmp", b"new", true);
        fs.rename(Path::new("/f.tmp"), Path::new("/f")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        assert_eq!(
            outcomes(&fs, fs.op_count(), Torn::Never),
            vec![vec!["//".to_string(), "/f=new".to_string()]]
        );
    }

    #[test]
    fn unsynced_entries_persist_in_order() {
        let fs = SimFs::new();
        write(&fs, "/a", b"1", true);
        write(&fs, "/b", b"2", true);
        let got = outcomes(&fs, fs.op_count(), Torn::Never);
        // Never "/b" without "/a".
        let want: Vec<Vec<String>> = [&["//"][..], &["//", "/a=1"], &["//", "/a=1", "/b=2"]]
            .iter()
            .map(|v| v.iter().map(|s| s.to_string()).collect())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_durable_rename_needs_no_durable_source_name() {
        let fs = SimFs::new();
        fs.create_dir(Path::new("/tmp")).unwrap();
        fs.create_dir(Path::new("/d")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        write(&fs, "/tmp/x", b"1", true); // /tmp never synced
        fs.rename(Path::new("/tmp/x"), Path::new("/d/x")).unwrap();
        fs.sync_dir(Path::new("/d")).unwrap();
        for img in fs.crash_images(fs.op_count(), Torn::Never).iter() {
            assert_eq!(read(&img, Path::new("/d/x")).unwrap(), b"1");
            assert!(img.metadata(Path::new("/tmp/x")).is_err());
        }
    }

    #[test]
    fn entries_in_a_lost_directory_are_lost() {
        let fs = SimFs::new();
        fs.create_dir(Path::new("/d")).unwrap();
        write(&fs, "/d/a", b"1", true);
        fs.sync_dir(Path::new("/d")).unwrap(); // /d/a durable in /d, /d itself not
        let got = outcomes(&fs, fs.op_count(), Torn::Never);
        assert_eq!(
            got,
            vec![
                vec!["//".to_string()],
                vec!["//".into(), "/d/".into(), "/d/a=1".into()]
            ]
        );
    }

    #[test]
    fn torn_writes_and_images_that_go_on() {
        let fs = SimFs::new();
        write(&fs, "/f", b"abcd", true);
        fs.sync_dir(Path::new("/")).unwrap();
        let f = fs.open(Path::new("/f"), Mode::Write).unwrap();
        f.write_all_at(b"XYZW", 0).unwrap();
        let got = outcomes(&fs, fs.op_count(), Torn::AnyOrder(1));
        for want in ["/f=abcd", "/f=XYZW", "/f=XYcd", "/f=abZW", "/f=XbZW"] {
            assert!(
                got.iter().any(|v| v.contains(&want.to_string())),
                "{want} in {got:?}"
            );
        }
        // An image is a disk of its own.
        let img = &fs.crash_images(fs.op_count(), Torn::Never).get(0);
        let g = img.open(Path::new("/f"), Mode::Write).unwrap();
        g.write_all_at(b"q", 0).unwrap();
        assert_eq!(read(img, Path::new("/f")).unwrap(), b"qbcd");
        assert_eq!(read(&fs, Path::new("/f")).unwrap(), b"XYZW");
    }
}
