//! Replication lag: how far a replica's clients trail the primary's.
//!
//! One idle client registers with the primary and one with the replica, both in this
//! process (one monotonic clock), and record when each `invalidateTransaction` arrives.
//! The primary's callback marks the commit (it follows `tpc_finish` by the fan-out, well
//! under a millisecond here); the replica's marks the moment the replica's own clients
//! can see the transaction (it has applied it durably). Someone else commits on the
//! primary meanwhile (`zeo-bench commits` started alongside).
//!
//! Per transaction committed inside the window: the lag in milliseconds, and the lag in
//! transactions, that is how many transactions the primary had announced and the replica
//! not yet at the moment the primary announced this one (0 when the replica keeps up
//! commit by commit). After the window the command waits for the replica to announce
//! every transaction of the window (`drain_s`); those it never announces are `missing`.

use crate::stats::{Latency, Samples};
use anyhow::Result;
use async_trait::async_trait;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use zeo_client::{Address, Callbacks, ConnectOptions, Connection};
use zodb::{Oid, Tid};

#[derive(clap::Args)]
pub struct Args {
    /// The primary's ZEO address, HOST:PORT.
    #[arg(long)]
    primary: String,
    /// The replica's ZEO address, HOST:PORT.
    #[arg(long)]
    replica: String,
    /// Seconds measured: transactions the primary announces in this window count.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds before the window (the writers getting up to speed).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// After the window, wait this long at most for the replica to announce the
    /// window's transactions.
    #[arg(long, default_value_t = 60.0)]
    drain_timeout: f64,
}

#[derive(Serialize)]
pub struct Report {
    /// Transactions the primary announced in the window.
    transactions: usize,
    seconds: f64,
    /// Per transaction: replica announcement − primary announcement.
    lag: Latency,
    /// Per transaction: announced by the primary and not yet by the replica when the
    /// primary announced it.
    lag_txns_mean: f64,
    lag_txns_p50: u64,
    lag_txns_p99: u64,
    lag_txns_max: u64,
    /// From the window's end until the replica had announced every transaction of it.
    drain_s: Option<f64>,
    /// Transactions of the window the replica never announced (within the timeout).
    missing: usize,
}

/// Tells the collector when an invalidation arrived, and on which side.
struct Recorder {
    replica: bool,
    tx: mpsc::UnboundedSender<(bool, Tid, Instant)>,
}

#[async_trait]
impl Callbacks for Recorder {
    async fn invalidate_transaction(&self, tid: Tid, _oids: Vec<Oid>) {
        let _ = self.tx.send((self.replica, tid, Instant::now()));
    }
}

pub async fn run(args: Args) -> Result<Report> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opts = ConnectOptions {
        read_only: true,
        ..Default::default()
    };
    let connect = |address: &str, replica: bool| {
        let cb = Arc::new(Recorder {
            replica,
            tx: tx.clone(),
        });
        let address = Address(address.to_string());
        let opts = opts.clone();
        async move { Connection::connect(&address, &opts, cb).await }
    };
    let primary = connect(&args.primary, false).await?;
    let replica = connect(&args.replica, true).await?;
    drop(tx);

    let began = Instant::now();
    let start = began + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.duration);
    let mut on_primary: HashMap<Tid, Instant> = HashMap::new();
    let mut on_replica: HashMap<Tid, Instant> = HashMap::new();
    // In the window, in the primary's order: (tid, backlog when announced).
    let mut window: Vec<(Tid, u64)> = Vec::new();
    // Announced by the primary, not yet by the replica (any time, not only the window).
    let mut behind: u64 = 0;
    // Transactions of the window the replica has not announced yet.
    let mut outstanding: HashSet<Tid> = HashSet::new();
    let mut drained_at = None;
    let deadline = end + Duration::from_secs_f64(args.drain_timeout);
    loop {
        let now = Instant::now();
        if now >= end && outstanding.is_empty() {
            drained_at = Some(now.max(end));
            break;
        }
        if now >= deadline {
            break;
        }
        let wait = if now < end { end } else { deadline };
        let event = tokio::select! {
            e = rx.recv() => e,
            _ = tokio::time::sleep_until(wait) => continue,
        };
        let Some((from_replica, tid, at)) = event else {
            break;
        };
        if from_replica {
            if on_replica.insert(tid, at).is_none() && on_primary.contains_key(&tid) {
                behind = behind.saturating_sub(1);
                outstanding.remove(&tid);
            }
        } else if !on_replica.contains_key(&tid) {
            on_primary.insert(tid, at);
            if at >= start && at < end {
                window.push((tid, behind));
                outstanding.insert(tid);
            }
            behind += 1;
        } else {
            // The replica was faster than our primary connection (scheduling): no lag.
            on_primary.insert(tid, at);
            if at >= start && at < end {
                window.push((tid, 0));
            }
        }
    }
    primary.close();
    replica.close();

    let mut lag = Samples::default();
    let mut missing = 0;
    for (tid, _) in &window {
        match (on_primary.get(tid), on_replica.get(tid)) {
            (Some(p), Some(r)) => lag.push(r.saturating_duration_since(*p)),
            _ => missing += 1,
        }
    }
    let mut txns: Vec<u64> = window.iter().map(|(_, b)| *b).collect();
    txns.sort_unstable();
    let pct = |p: f64| -> u64 {
        if txns.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * txns.len() as f64).ceil() as usize;
        txns[rank.clamp(1, txns.len()) - 1]
    };
    Ok(Report {
        transactions: window.len(),
        seconds: args.duration,
        lag: lag.summarize(),
        lag_txns_mean: if txns.is_empty() {
            0.0
        } else {
            txns.iter().sum::<u64>() as f64 / txns.len() as f64
        },
        lag_txns_p50: pct(50.0),
        lag_txns_p99: pct(99.0),
        lag_txns_max: txns.last().copied().unwrap_or(0),
        drain_s: drained_at.map(|d| (d - end).as_secs_f64()),
        missing,
    })
}
