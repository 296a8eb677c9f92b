//! The undo log through the proxy (`undoLog` / `undoInfo`).
//!
//! Transactional undo itself needs nothing here: `undoa` is an operation of a forwarded
//! transaction (see [`super::commit`]), upstream checks and performs it and reports the
//! undone oids in its vote; the commit then invalidates them like stored ones, in the
//! proxy's cache and in every downstream client.
//!
//! Invariants: the entries are upstream's, in upstream's order; without a filter the
//! reply is upstream's `undoLog(first, last)` itself. With a filter (`undoInfo`'s
//! specification, Zope's `ZopeUndo.Prefix`), the filter is evaluated here, by the server's
//! own evaluator (the same one a direct zeors uses), over upstream's unfiltered log read
//! in pages that double in size: the reply is what upstream's log filtered that way gives,
//! and a stock upstream never has to unpickle Zope's filter classes or apply them to the
//! bytes Python 3 ZODB stores (where `Prefix` raises `TypeError`).

use super::Inner;
use zeo_proto::reply::UndoLog;
use zeo_proto::Request;
use zodb::{UndoEntry, UndoFilter};

/// The first page of the unfiltered log read for a filtered one; each next page is twice
/// as long (a stock FileStorage scans its log from the end for each call, so doubling
/// keeps the total work linear in how far back the filter has to look).
const FIRST_PAGE: i64 = 64;

/// Python's normalisation of `undoLog`'s bounds: a negative `last` means `-last` entries
/// after `first`.
fn bounds(first: i64, last: i64) -> (i64, i64) {
    let first = first.max(0);
    let last = if last < 0 { first - last } else { last };
    (first, last.max(first))
}

impl Inner {
    pub(super) async fn undo_log(
        &self,
        first: i64,
        last: i64,
        filter: Option<UndoFilter>,
    ) -> zodb::Result<Vec<UndoEntry>> {
        let (first, last) = bounds(first, last);
        let conn = self.link().await?;
        let Some(filter) = filter else {
            let log: UndoLog = conn.request(&Request::UndoLog { first, last }).await?;
            return Ok(log.0);
        };
        let wanted = (last - first) as usize;
        let mut out = Vec::with_capacity(wanted.min(1024));
        // Matching entries to skip before the first one returned.
        let mut skip = first;
        let mut offset = 0i64;
        let mut page = FIRST_PAGE;
        // Newest first: a transaction committed between two pages shifts the offsets,
        // and the entries the next page repeats are skipped by tid.
        let mut oldest_seen = zodb::Tid::MAX;
        while out.len() < wanted {
            let log: UndoLog = conn
                .request(&Request::UndoLog {
                    first: offset,
                    last: offset + page,
                })
                .await?;
            let n = log.0.len() as i64;
            for entry in log.0 {
                if entry.tid >= oldest_seen {
                    continue;
                }
                oldest_seen = entry.tid;
                if !filter(&entry) {
                    continue;
                }
                if skip > 0 {
                    skip -= 1;
                } else if out.len() < wanted {
                    out.push(entry);
                }
            }
            if n < page {
                break;
            }
            offset += page;
            page = page.saturating_mul(2);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::bounds;

    #[test]
    fn bounds_follow_python() {
        assert_eq!(bounds(0, -20), (0, 20));
        assert_eq!(bounds(5, -3), (5, 8));
        assert_eq!(bounds(0, 10), (0, 10));
        assert_eq!(bounds(10, 5), (10, 10));
    }
}
