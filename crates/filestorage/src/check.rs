//! Offline consistency check of a `Data.fs` (what `zeors check` prints).
//!
//! Two parts:
//! - the format: every rule of docs/filestorage.md §1.6 that `fstest` and pack enforce ([`scan::verify`]),
//!   stopping at the first violation as `fstest` does;
//! - references, like `fsrefs`: every current object's pickle is scanned, and references
//!   to objects that do not exist, whose creation was undone or that cannot be loaded are
//!   reported. Such references make a garbage-collecting pack fail.
//!
//! A torn tail (a last transaction cut short, which the next writable open moves away) is
//! reported as such, in the words the server uses, and the transactions before it are
//! still checked, references included.

use crate::scan::{self, TornTail, VerifyError, VerifySummary};
use crate::view::FileView;
use fsio::FileIo;
use std::collections::HashSet;
use std::sync::Arc;
use zodb::progress::{NoProgress, Progress, Unit};
use zodb::refs::RefScanner;
use zodb::{Oid, Tid};

/// Why a reference is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// No object has this oid.
    Missing,
    /// The object's creation was undone, or it was deleted.
    NoState,
    /// The object's record cannot be read.
    Unreadable,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Broken::Missing => "missing",
            Broken::NoState => "object creation was undone or the object was deleted",
            Broken::Unreadable => "failed to load",
        })
    }
}

/// One object whose current state references broken objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadReferences {
    pub oid: Oid,
    pub tid: Tid,
    /// `module.Class` of the referencing object, when readable.
    pub class: Option<String>,
    pub refs: Vec<(Oid, Broken)>,
}

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Counts of a file whose format is valid.
    pub summary: Option<VerifySummary>,
    /// The first format violation: where and what (the server's words for it).
    pub format_error: Option<String>,
    /// A damaged last transaction; `summary` then describes what precedes it.
    pub torn_tail: Option<TornTail>,
    /// Objects with broken references (only when the format is valid).
    pub bad_references: Vec<BadReferences>,
    /// Objects whose pickle could not be scanned for references, with the reason.
    pub unscannable: Vec<(Oid, String)>,
    /// Objects without state (undone creations, deletions): not an error.
    pub without_state: u64,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.format_error.is_none()
            && self.torn_tail.is_none()
            && self.bad_references.is_empty()
            && self.unscannable.is_empty()
    }
}

/// Checks the file behind `io`; `references` adds the `fsrefs`-like pass.
pub fn check(io: Arc<dyn FileIo>, references: bool) -> CheckReport {
    check_with(io, references, &NoProgress)
}

/// [`check`], reporting each pass's progress (bytes, then objects) to `progress`.
pub fn check_with(io: Arc<dyn FileIo>, references: bool, progress: &dyn Progress) -> CheckReport {
    let mut report = CheckReport::default();
    let summary = match scan::verify_with(&*io, progress) {
        Ok(s) => s,
        Err(VerifyError::TornTail { tail, intact }) => {
            report.torn_tail = Some(tail);
            *intact
        }
        Err(VerifyError::Damaged(e)) => {
            report.format_error = Some(e.to_string());
            return report;
        }
    };
    if references {
        check_references(
            FileView::new(io, summary.end),
            &summary,
            &mut report,
            progress,
        );
    }
    report.summary = Some(summary);
    report
}

fn check_references(
    view: FileView,
    summary: &VerifySummary,
    report: &mut CheckReport,
    progress: &dyn Progress,
) {
    let mut no_state = HashSet::new();
    let mut unreadable = HashSet::new();
    // Two passes over the objects: resolving every current record, then scanning them.
    progress.start(
        "checking references",
        Unit::Objects,
        2 * summary.index.len() as u64,
    );
    let mut done = 0u64;
    for (oid, pos) in summary.index.iter() {
        done += 1;
        if done.is_multiple_of(1024) {
            progress.update(done);
        }
        match view.resolve(oid, pos) {
            Ok(Some(_)) => {}
            Ok(None) => {
                no_state.insert(oid);
            }
            Err(_) => {
                unreadable.insert(oid);
            }
        }
    }
    report.without_state = no_state.len() as u64;
    let mut scanner = RefScanner::new();
    let mut refs = Vec::new();
    for (oid, pos) in summary.index.iter() {
        done += 1;
        if done.is_multiple_of(1024) {
            progress.update(done);
        }
        if no_state.contains(&oid) || unreadable.contains(&oid) {
            continue;
        }
        let Ok(Some((data, _))) = view.resolve(oid, pos) else {
            continue;
        };
        refs.clear();
        if let Err(e) = scanner.references(&data, &mut refs) {
            report.unscannable.push((oid, e.to_string()));
            continue;
        }
        let mut broken = Vec::new();
        for &r in &refs {
            let why = if summary.index.get(r).is_none() {
                Broken::Missing
            } else if no_state.contains(&r) {
                Broken::NoState
            } else if unreadable.contains(&r) {
                Broken::Unreadable
            } else {
                continue;
            };
            if !broken.contains(&(r, why)) {
                broken.push((r, why));
            }
        }
        if !broken.is_empty() {
            let tid = view.record(oid, pos).map(|h| h.tid).unwrap_or(Tid::ZERO);
            report.bad_references.push(BadReferences {
                oid,
                tid,
                class: zodb::refs::class_name(&data).map(|(m, n)| format!("{m}.{n}")),
                refs: broken,
            });
        }
    }
    progress.update(done);
    progress.finish();
    for oid in unreadable {
        report
            .unscannable
            .push((oid, "its current record cannot be read".into()));
    }
}
