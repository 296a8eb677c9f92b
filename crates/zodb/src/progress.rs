//! Progress of long work (a pack, a check, an iteration, a proxy's catch-up), reported by
//! the layer that does it to whoever shows it.
//!
//! The storage crates only count; how progress is shown (a bar on a terminal, log lines
//! otherwise) is the binary's business, so they depend on this trait and nothing else.
//! Calls are cheap and frequent (one per transaction is normal): an implementation must
//! throttle its own output. A phase that ends with an error is simply followed by the
//! next `start` (or by nothing): `finish` is not guaranteed.

/// What a phase counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes of a file (shown as KiB/MiB/GiB).
    Bytes,
    /// Objects.
    Objects,
    /// Transactions.
    Transactions,
}

impl Unit {
    /// The plural noun, for log lines.
    pub fn noun(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Objects => "objects",
            Unit::Transactions => "transactions",
        }
    }
}

/// Receives the progress of one piece of work, one phase after the other.
pub trait Progress: Send + Sync {
    /// A phase starts: `what` is a short description ("packing: copying to the pack
    /// time"); `total` is how many `unit`s it will do, 0 when unknown.
    fn start(&self, what: &str, unit: Unit, total: u64);
    /// `done` units of the current phase are done (monotonic within a phase).
    fn update(&self, done: u64);
    /// The current phase is complete.
    fn finish(&self);
}

/// Reports nowhere: the default for library calls and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: Unit, _: u64) {}
    fn update(&self, _: u64) {}
    fn finish(&self) {}
}

/// A shared [`Progress`] for option and configuration structs: cloneable, printable, and
/// reporting nowhere by default.
#[derive(Clone)]
pub struct ProgressHandle(pub std::sync::Arc<dyn Progress>);

impl ProgressHandle {
    pub fn new(p: impl Progress + 'static) -> ProgressHandle {
        ProgressHandle(std::sync::Arc::new(p))
    }
}

impl Default for ProgressHandle {
    fn default() -> Self {
        ProgressHandle::new(NoProgress)
    }
}

impl std::fmt::Debug for ProgressHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHandle")
    }
}

impl std::ops::Deref for ProgressHandle {
    type Target = dyn Progress;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}
