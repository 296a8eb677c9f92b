//! Commit throughput of small transactions.
//!
//! `writers` connections commit in a closed loop. Each transaction reads and rewrites
//! 1–10 random items (uniform over 100,000: conflicts are rare) and, with `--hot N`,
//! also increments one of N `BTrees.Length` counters (a hot set every writer touches:
//! conflicts are frequent and resolvable). The servers fsync as configured (zeors at vote
//! and finish, the stock FileStorage at finish).

use crate::procfs::CpuWindow;
use crate::rng::Rng;
use crate::stats::{Latency, Samples};
use crate::txn::{ConflictTally, Writer};
use anyhow::{bail, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use zeo_client::{ConnectOptions, Connection, NoCallbacks};
use zodb::Oid;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: crate::meta::Target,
    #[arg(long, default_value_t = 1)]
    writers: usize,
    #[arg(long, default_value_t = 1)]
    min_objects: usize,
    #[arg(long, default_value_t = 10)]
    max_objects: usize,
    /// Every transaction also increments one of the first N counters (0: no hot set).
    #[arg(long, default_value_t = 0)]
    hot: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Commit exactly this many transactions (no warm-up, no time limit) instead.
    #[arg(long)]
    transactions: Option<u64>,
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Serialize)]
pub struct Report {
    writers: usize,
    hot: usize,
    seconds: f64,
    commits: usize,
    commits_per_s: f64,
    objects_stored: u64,
    /// From the first read of a transaction to `tpc_finish`'s reply, retries included.
    latency: Latency,
    #[serde(flatten)]
    conflicts: ConflictTally,
    /// Attempts that met a conflict / attempts.
    conflict_rate: f64,
    server_cpu_s: Option<f64>,
    server_sys_s: Option<f64>,
    server_cpu_ms_per_commit: Option<f64>,
    client_cpu_s: f64,
}

pub async fn run(args: Args) -> Result<Report> {
    let meta = Arc::new(args.target.meta()?);
    if args.writers == 0 || args.min_objects == 0 || args.min_objects > args.max_objects {
        bail!("need at least one writer and 1 <= --min-objects <= --max-objects");
    }
    if args.hot > meta.counters.len() {
        bail!(
            "--hot {} but meta.json has {} counters",
            args.hot,
            meta.counters.len()
        );
    }
    let address = args.target.address();
    let mut writers = Vec::new();
    for _ in 0..args.writers {
        let conn = Connection::connect(&address, &ConnectOptions::default(), Arc::new(NoCallbacks))
            .await?;
        writers.push(Writer::new(conn));
    }

    let (start, end) = match args.transactions {
        Some(_) => (
            Instant::now(),
            Instant::now() + Duration::from_secs(24 * 3600),
        ),
        None => {
            let start = Instant::now() + Duration::from_secs_f64(args.warmup);
            (start, start + Duration::from_secs_f64(args.duration))
        }
    };
    let budget = Arc::new(AtomicU64::new(args.transactions.unwrap_or(u64::MAX)));
    let mut tasks = Vec::new();
    for (w, mut writer) in writers.into_iter().enumerate() {
        let meta = meta.clone();
        let budget = budget.clone();
        let (min, max, hot) = (args.min_objects as u64, args.max_objects as u64, args.hot);
        let mut rng = Rng::new(args.seed.wrapping_mul(7919) + w as u64);
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut tally = ConflictTally::default();
            let mut objects = 0u64;
            loop {
                if budget
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                let n = rng.between(min, max) as usize;
                let items = meta.distinct_items(n, &mut rng);
                let counters: Vec<Oid> = match hot {
                    0 => vec![],
                    h => vec![Oid(meta.counters[rng.below(h as u64) as usize])],
                };
                let began = Instant::now();
                let mut attempt = ConflictTally::default();
                writer
                    .commit(&meta, &mut rng, &items, &counters, &mut attempt)
                    .await?;
                let done = Instant::now();
                if done >= end {
                    break;
                }
                if done >= start {
                    samples.push(done - began);
                    tally.add(&attempt);
                    objects += (items.len() + counters.len()) as u64;
                }
            }
            writer.conn.close();
            anyhow::Ok((samples, tally, objects))
        }));
    }

    tokio::time::sleep_until(start).await;
    let cpu = CpuWindow::start(args.server_pid);
    // With a time limit the window closes at `end`; with a transaction count, once all
    // transactions are committed.
    let timed = args.transactions.is_none();
    let timed_cpu = if timed {
        tokio::time::sleep_until(end).await;
        Some(cpu.stop())
    } else {
        None
    };
    let mut samples = Samples::default();
    let mut tally = ConflictTally::default();
    let mut objects_stored = 0;
    for t in tasks {
        let (s, c, o) = t.await??;
        samples.extend(s);
        tally.add(&c);
        objects_stored += o;
    }
    let used = timed_cpu.unwrap_or_else(|| cpu.stop());
    let (server_cpu_s, client_cpu_s) = (used.server_s, used.client_s);
    let seconds = if timed {
        args.duration
    } else {
        start.elapsed().as_secs_f64()
    };
    let commits = samples.len();
    Ok(Report {
        writers: args.writers,
        hot: args.hot,
        seconds,
        commits,
        commits_per_s: commits as f64 / seconds,
        objects_stored,
        latency: samples.summarize(),
        conflict_rate: if tally.attempts > 0 {
            tally.conflicted_attempts as f64 / tally.attempts as f64
        } else {
            0.0
        },
        conflicts: tally,
        server_cpu_s,
        server_sys_s: used.server_sys_s,
        server_cpu_ms_per_commit: server_cpu_s
            .filter(|_| commits > 0)
            .map(|s| s * 1e3 / commits as f64),
        client_cpu_s,
    })
}
