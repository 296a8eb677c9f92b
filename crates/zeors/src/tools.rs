//! Offline tools over a `Data.fs`: `zeors check` (what `fstest` and `fsrefs` check),
//! `zeors dump` (transactions and records, in `fsdump`'s format) and `zeors pack`.
//!
//! `check` and `dump` open the file read-only and take no lock, so they can run beside a
//! server (they see the transactions committed when they start). `pack` opens the storage
//! for writing and so needs it not to be served; a served storage is packed through ZEO
//! (`ClientStorage.pack()`, `zeopack`).

use crate::progress::Reporter;
use anyhow::{bail, Context, Result};
use clap::Args;
use filestorage::check::CheckReport;
use filestorage::iter::{RecordIter, TxnIter};
use filestorage::view::FileView;
use filestorage::{FileStorageCore, Options, PackOptions, PackOutcome};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zodb::progress::{Progress, Unit};
use zodb::timestamp::format_tid;

#[derive(Args)]
pub struct CheckArgs {
    /// The Data.fs to check.
    path: PathBuf,
    /// Skip the reference check (faster: only the format is checked, as `fstest` does).
    #[arg(long)]
    no_refs: bool,
    /// Print every broken reference instead of the first 50.
    #[arg(short, long)]
    verbose: bool,
}

#[derive(Args)]
pub struct DumpArgs {
    /// The Data.fs to dump.
    path: PathBuf,
    /// Leave out the offsets (`fsdump`'s `with_offset=False`).
    #[arg(long)]
    no_offsets: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    /// The Data.fs to open.
    path: PathBuf,
    /// Also read every transaction and record (with its data) and time it.
    #[arg(long)]
    iterate: bool,
}

#[derive(Args)]
pub struct PackArgs {
    /// The Data.fs to pack (not being served: the lock file must be free).
    path: PathBuf,
    /// Keep history of the last N days (fractions allowed); 0 packs to now.
    #[arg(long, default_value_t = 0.0)]
    days: f64,
    /// Keep every object that existed at the pack time, reachable or not.
    #[arg(long)]
    no_gc: bool,
    /// Delete Data.fs.old afterwards instead of keeping it (and, with --blob-dir, delete
    /// the removed blob files instead of moving them to `<blob dir>.old`).
    #[arg(long)]
    discard_old: bool,
    /// The storage's blob directory: the files of the blob revisions the pack removes
    /// are removed too (without it they are left behind, unreferenced).
    #[arg(long, value_name = "DIR")]
    blob_dir: Option<PathBuf>,
}

fn open_io(path: &PathBuf) -> Result<Arc<std::fs::File>> {
    // io::Error's text does not name the file: say which one.
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    Ok(Arc::new(f))
}

/// Opens `path` read-only for a tool, naming the file in every error.
fn open_read_only(path: &Path) -> Result<FileStorageCore> {
    let core = FileStorageCore::open(
        path,
        Options {
            read_only: true,
            ..Options::default()
        },
    )?;
    Ok(core)
}

/// `zeors check PATH`: exit status 0 when the file is sound, 1 otherwise.
pub fn check(args: CheckArgs) -> Result<u8> {
    let io = open_io(&args.path)?;
    let progress = Reporter::for_tool(args.path.display().to_string());
    let report = filestorage::check::check_with(io, !args.no_refs, &progress);
    drop(progress);
    print_check(&args, &report);
    Ok(if report.is_ok() { 0 } else { 1 })
}

fn print_check(args: &CheckArgs, r: &CheckReport) {
    let name = args.path.display();
    if let Some(e) = &r.format_error {
        // The words the server's open uses for the same damage.
        println!("{name}: {e}");
        println!("Nothing after that offset was checked.");
        return;
    }
    if let Some(tail) = &r.torn_tail {
        println!("{name}: {tail}");
        println!(
            "The transactions before it are intact: opening the file for writing (zeors \
             serve, or Python) moves the tail to {name}.trN and cuts it off, as after a crash."
        );
    }
    if let Some(s) = &r.summary {
        println!(
            "{name}: {} bytes, {} transactions, {} data records, {} objects",
            s.end,
            s.transactions,
            s.data_records,
            s.index.len()
        );
        if s.transactions > 0 {
            println!(
                "last transaction {} ({})",
                s.last_tid,
                format_tid(s.last_tid)
            );
        }
        if r.torn_tail.is_some() {
            println!("format: OK up to the torn tail");
        } else {
            println!("format: OK (every check of fstest and of pack passed)");
        }
    }
    if args.no_refs {
        return;
    }
    if r.without_state > 0 {
        println!(
            "{} objects have no current state (creation undone or deleted)",
            r.without_state
        );
    }
    let limit = if args.verbose { usize::MAX } else { 50 };
    for b in r.bad_references.iter().take(limit) {
        println!(
            "oid {} {} last updated {} ({}) refers to invalid objects:",
            b.oid,
            b.class.as_deref().unwrap_or("<unknown class>"),
            b.tid,
            format_tid(b.tid)
        );
        for (oid, why) in &b.refs {
            println!("    oid {oid}: {why}");
        }
    }
    for (oid, why) in r.unscannable.iter().take(limit) {
        println!("oid {oid}: references not readable: {why}");
    }
    let shown = r.bad_references.len() + r.unscannable.len();
    if shown > limit {
        println!("... {} more (use --verbose)", shown - limit);
    }
    if r.bad_references.is_empty() && r.unscannable.is_empty() {
        println!("references: OK (every reference of every current object resolves)");
    } else {
        println!(
            "references: {} objects with broken references, {} unreadable; \
             a garbage-collecting pack would fail",
            r.bad_references.len(),
            r.unscannable.len()
        );
    }
}

/// Python's `repr()` of a bytes value.
fn py_bytes_repr(b: &[u8]) -> String {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') {
        '"'
    } else {
        '\''
    };
    let mut s = String::with_capacity(b.len() + 3);
    s.push('b');
    s.push(quote);
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            c if c as char == quote => {
                s.push('\\');
                s.push(quote);
            }
            0x20..=0x7e => s.push(c as char),
            c => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s.push(quote);
    s
}

/// `zeors dump PATH`: every transaction and record, line for line what `fsdump` prints.
pub fn dump(args: DumpArgs) -> Result<u8> {
    let io = open_io(&args.path)?;
    let core = open_read_only(&args.path)?;
    let view = FileView::new(io, core.size());
    drop(core);
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut it = TxnIter::new(view.clone(), None, None)?;
    let mut i = 0u64;
    while let Some((t, info)) = it.next_txn()? {
        write!(
            out,
            "Trans #{i:05} tid={:016x} size={} time={}",
            info.tid.0,
            t.header.tlen,
            format_tid(info.tid)
        )?;
        if args.no_offsets {
            writeln!(out)?;
        } else {
            writeln!(out, " offset={}", t.records_start())?;
        }
        writeln!(
            out,
            "    status='{}' user={} description={}",
            info.status as char,
            py_bytes_repr(&info.user),
            py_bytes_repr(&info.description)
        )?;
        let mut recs = RecordIter::new(view.clone(), t);
        let mut j = 0u64;
        while let Some(r) = recs.next_record()? {
            let (size, class) = match &r.data {
                None => (
                    String::new(),
                    "undo or abort of object creation".to_string(),
                ),
                Some(d) => (
                    format!(" size={}", d.len()),
                    zodb::refs::class_name(d)
                        .map(|(m, n)| format!("{m}.{n}"))
                        .unwrap_or_else(|| ".".into()),
                ),
            };
            let bp = r
                .data_txn
                .map(|t| format!(" bp={:016x}", t.0))
                .unwrap_or_default();
            writeln!(
                out,
                "  data #{j:05} oid={:016x}{size} class={class}{bp}",
                r.oid.0
            )?;
            j += 1;
        }
        i += 1;
    }
    out.flush()?;
    Ok(0)
}

/// `zeors info PATH`: opens the storage read-only (through its `.index` when valid, as
/// the server does) and prints what it holds and how long opening took.
pub fn info(args: InfoArgs) -> Result<u8> {
    let started = std::time::Instant::now();
    let core = open_read_only(&args.path)?;
    let open_seconds = started.elapsed().as_secs_f64();
    let last = core.last_transaction();
    println!("path: {}", args.path.display());
    println!("size: {}", core.size());
    if let Some(tail) = core.ignored_tail() {
        // `size` is where the intact part ends; the file is longer by the tail.
        println!("file size: {}", tail.file_size);
        println!(
            "damage: {tail} (not counted below; zeors check tells more, and opening the file \
             for writing moves it to {}.trN)",
            args.path.display()
        );
    }
    println!("objects: {}", core.len());
    println!("last transaction: {last} ({})", format_tid(last));
    println!(
        "index used: {}",
        if core.used_index() { "yes" } else { "no" }
    );
    println!("open seconds: {open_seconds:.6}");
    if args.iterate {
        let started = std::time::Instant::now();
        let (mut txns, mut records, mut bytes) = (0u64, 0u64, 0u64);
        let progress = Reporter::for_tool(args.path.display().to_string());
        progress.start("reading every record", Unit::Bytes, core.size());
        let mut it = core.iterator(None, None)?;
        while let Some((t, _)) = it.next_txn()? {
            txns += 1;
            progress.update(t.pos);
            let mut recs = RecordIter::new(it.view().clone(), t);
            while let Some(r) = recs.next_record()? {
                records += 1;
                bytes += r.data.map_or(0, |d| d.len() as u64);
            }
        }
        progress.finish();
        drop(progress);
        println!("transactions: {txns}");
        println!("data records: {records}");
        println!("data bytes: {bytes}");
        println!("iterate seconds: {:.6}", started.elapsed().as_secs_f64());
    }
    Ok(0)
}

/// `zeors pack PATH --days N`.
pub fn pack(args: PackArgs) -> Result<u8> {
    if !(args.days.is_finite() && args.days >= 0.0) {
        bail!("--days must be a non-negative number");
    }
    let core = FileStorageCore::open(
        &args.path,
        Options {
            pack_discard_old: args.discard_old,
            blob_dir: args.blob_dir.clone(),
            ..Options::default()
        },
    )
    .with_context(|| {
        format!(
            "opening {} for writing (a storage that is being served is packed through the \
             server: ClientStorage.pack() or zeopack)",
            args.path.display()
        )
    })?;
    let t = zodb::timestamp::now_unix() - args.days * 86400.0;
    let pack_time = zodb::timestamp::tid_from_unix(t);
    let progress =
        zodb::progress::ProgressHandle::new(Reporter::for_tool(args.path.display().to_string()));
    let outcome = core.pack(
        pack_time,
        PackOptions {
            gc: !args.no_gc,
            progress,
        },
    );
    let closed = core.close();
    match outcome? {
        PackOutcome::Packed(s) => println!(
            "packed {} to {}: {} -> {} bytes, {} -> {} objects, in {:.2}s",
            args.path.display(),
            format_tid(pack_time),
            s.old_size,
            s.new_size,
            s.objects_before,
            s.objects_after,
            s.seconds
        ),
        PackOutcome::Unchanged(why) => println!("{}: nothing to pack ({why})", args.path.display()),
    }
    closed?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::py_bytes_repr;

    #[test]
    fn bytes_repr_like_python() {
        assert_eq!(py_bytes_repr(b""), "b''");
        assert_eq!(py_bytes_repr(b"admin"), "b'admin'");
        assert_eq!(py_bytes_repr(b"it's"), "b\"it's\"");
        assert_eq!(py_bytes_repr(b"'\""), "b'\\'\"'");
        assert_eq!(py_bytes_repr(b"a\\b\n\x00\xff"), "b'a\\\\b\\n\\x00\\xff'");
    }
}
