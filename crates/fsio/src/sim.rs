//! An in-memory [`FileIo`] that can show what the file would contain after a power loss.
//!
//! It keeps the bytes as the running process sees them and a log of every write, length
//! change and sync. A *crash image* is what the disk may hold if power fails after a given
//! number of logged operations: everything up to the last completed sync is durable, and
//! each operation after it may have reached the disk completely, not at all, or in part
//! (a prefix, a suffix, or with a hole in the middle, as page-sized pieces can be written
//! back in any order). Tests enumerate these images, reopen each one and check what
//! survived — the approach of redb's crash tests.

use crate::FileIo;
use parking_lot::Mutex;
use std::io;

/// One logged operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Sync,
}

/// How much of one unsynced operation reached the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Lost,
    Full,
    /// Only the first `n` bytes of a write.
    Prefix(usize),
    /// Only the bytes from `n` on.
    Suffix(usize),
    /// Everything but the bytes in `a..b`.
    Hole(usize, usize),
}

#[derive(Debug, Default)]
struct State {
    current: Vec<u8>,
    log: Vec<SimOp>,
    fail_writes: bool,
}

/// A simulated file; see the module docs.
#[derive(Debug, Default)]
pub struct SimFile {
    state: Mutex<State>,
}

fn apply_write(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let offset = offset as usize;
    if buf.len() < offset + data.len() {
        buf.resize(offset + data.len(), 0);
    }
    buf[offset..offset + data.len()].copy_from_slice(data);
}

impl SimFile {
    pub fn new() -> SimFile {
        SimFile::default()
    }

    /// A file that already holds `bytes`, durably.
    pub fn with_contents(bytes: Vec<u8>) -> SimFile {
        SimFile {
            state: Mutex::new(State {
                current: bytes,
                log: Vec::new(),
                fail_writes: false,
            }),
        }
    }

    /// The bytes as the process sees them.
    pub fn contents(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    /// Number of logged operations so far (a crash point).
    pub fn op_count(&self) -> usize {
        self.state.lock().log.len()
    }

    /// The log from `from` on.
    pub fn ops_since(&self, from: usize) -> Vec<SimOp> {
        self.state.lock().log[from..].to_vec()
    }

    /// Makes writes and length changes fail with `ENOSPC`-like errors (reads still work).
    pub fn set_fail_writes(&self, fail: bool) {
        self.state.lock().fail_writes = fail;
    }

    /// The durable contents as of crash point `at` (the number of operations that had been
    /// issued), given the image `base` the log started from: the state after the last
    /// `Sync` before `at`, and the unsynced operations after it.
    pub fn crash_base(base: &[u8], log: &[SimOp], at: usize) -> (Vec<u8>, Vec<SimOp>) {
        let last_sync = log[..at].iter().rposition(|op| *op == SimOp::Sync);
        let synced = last_sync.map_or(0, |i| i + 1);
        let mut image = base.to_vec();
        for op in &log[..synced] {
            Self::apply(&mut image, op, Fate::Full);
        }
        let pending = log[synced..at]
            .iter()
            .filter(|op| **op != SimOp::Sync)
            .cloned()
            .collect();
        (image, pending)
    }

    /// Applies `op` to `image` with the given fate.
    pub fn apply(image: &mut Vec<u8>, op: &SimOp, fate: Fate) {
        match (op, fate) {
            (_, Fate::Lost) | (SimOp::Sync, _) => {}
            (SimOp::SetLen(n), _) => image.resize(*n as usize, 0),
            (SimOp::Write { offset, data }, Fate::Full) => apply_write(image, *offset, data),
            (SimOp::Write { offset, data }, Fate::Prefix(n)) => {
                apply_write(image, *offset, &data[..n.min(data.len())])
            }
            (SimOp::Write { offset, data }, Fate::Suffix(n)) => {
                let n = n.min(data.len());
                // The file grows to cover the whole write; the head stays as it was.
                let end = *offset as usize + data.len();
                if image.len() < end {
                    image.resize(end, 0);
                }
                apply_write(image, offset + n as u64, &data[n..]);
            }
            (SimOp::Write { offset, data }, Fate::Hole(a, b)) => {
                let (a, b) = (a.min(data.len()), b.min(data.len()));
                let end = *offset as usize + data.len();
                if image.len() < end {
                    image.resize(end, 0);
                }
                apply_write(image, *offset, &data[..a]);
                apply_write(image, offset + b as u64, &data[b..]);
            }
        }
    }

    /// Cut points worth trying in a write of `n` bytes: every byte of the first and last
    /// 64 (headers and trailers live there), and every `step` bytes in between.
    pub fn cuts(n: usize, step: usize) -> Vec<usize> {
        let mut cuts: Vec<usize> = (1..n).step_by(step.max(1)).collect();
        cuts.extend((1..n).filter(|&c| c < 64 || c + 64 > n));
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }

    /// The fates of an operation when writes reach the disk in order and only the last
    /// one can be torn: lost, complete, or a prefix.
    pub fn ordered_fates(op: &SimOp, step: usize) -> Vec<Fate> {
        let mut v = vec![Fate::Lost, Fate::Full];
        if let SimOp::Write { data, .. } = op {
            v.extend(Self::cuts(data.len(), step).into_iter().map(Fate::Prefix));
        }
        v
    }

    /// The fates of an operation when pieces of a write can reach the disk in any order:
    /// also a suffix only, or everything but a hole of `step` bytes.
    pub fn arbitrary_fates(op: &SimOp, step: usize) -> Vec<Fate> {
        let mut v = Self::ordered_fates(op, step);
        if let SimOp::Write { data, .. } = op {
            let n = data.len();
            for c in Self::cuts(n, step) {
                v.push(Fate::Suffix(c));
                if c + step < n {
                    v.push(Fate::Hole(c, c + step));
                }
            }
        }
        v
    }
}

impl FileIo for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= s.current.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&s.current[start..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.fail_writes {
            return Err(io::Error::other("simulated write failure (no space left)"));
        }
        apply_write(&mut s.current, offset, buf);
        s.log.push(SimOp::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        s.current.resize(len as usize, 0);
        s.log.push(SimOp::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.fail_writes {
            return Err(io::Error::other("simulated fsync failure"));
        }
        s.log.push(SimOp::Sync);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.state.lock().current.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_base_keeps_synced_ops_and_lists_pending_ones() {
        let f = SimFile::with_contents(b"FS30".to_vec());
        f.write_all_at(b"abc", 4).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(b"XY", 5).unwrap();
        f.set_len(6).unwrap();
        let log = f.ops_since(0);
        assert_eq!(f.contents(), b"FS30aX");
        let (img, pending) = SimFile::crash_base(b"FS30", &log, 1);
        assert_eq!((img, pending.len()), (b"FS30".to_vec(), 1));
        let (img, pending) = SimFile::crash_base(b"FS30", &log, 4);
        assert_eq!(img, b"FS30abc");
        assert_eq!(pending.len(), 2);
        let mut i = img.clone();
        SimFile::apply(&mut i, &pending[0], Fate::Prefix(1));
        assert_eq!(i, b"FS30aXc");
        let mut i = img.clone();
        SimFile::apply(&mut i, &pending[0], Fate::Suffix(1));
        assert_eq!(i, b"FS30abY");
        let mut i = img;
        SimFile::apply(&mut i, &pending[1], Fate::Full);
        assert_eq!(i, b"FS30ab");
    }
}
