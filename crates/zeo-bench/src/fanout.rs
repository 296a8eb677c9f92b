//! Invalidation fan-out, and the server's memory with many idle connections.
//!
//! `clients` connections register and stay idle, recording when each
//! `invalidateTransaction` callback arrives. A separate writer commits one-object
//! transactions; for each, the clock starts just before `tpc_finish` is sent and stops
//! at every idle client's callback. All clients live in this one process, so one
//! monotonic clock serves both ends. With `--writer-address` the writer commits through
//! another server of the same database.

use crate::procfs::{rss_anon_bytes, rss_bytes};
use crate::rng::Rng;
use crate::stats::{Latency, Samples};
use crate::txn::{VoteOutcome, Writer};
use anyhow::{bail, Result};
use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use zeo_client::{Callbacks, ConnectOptions, Connection, NoCallbacks};
use zodb::{Oid, Tid};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: crate::meta::Target,
    /// Idle clients waiting for invalidations.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Transactions committed (each one measured at every client).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Rounds committed first and not measured (the first commit on a fresh server pays
    /// for warming up: imports, allocations).
    #[arg(long, default_value_t = 2)]
    warmup_rounds: usize,
    /// Pause between rounds, milliseconds.
    #[arg(long, default_value_t = 50)]
    pause_ms: u64,
    /// Give up on a round's missing callbacks after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Commit through this server (HOST:PORT) instead of `--address`: another server of
    /// the same database (zeors on PostgreSQL), so that the clients learn of commits made
    /// elsewhere and the figure includes how fast their server hears of them.
    #[arg(long)]
    writer_address: Option<String>,
    /// The server's process id, to sample its RSS with the clients connected.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Serialize)]
pub struct Report {
    clients: usize,
    rounds: usize,
    /// Seconds to connect and register every client.
    connect_s: f64,
    /// From sending `tpc_finish` to each idle client's callback.
    latency: Latency,
    /// Per round, the time until the last client was told.
    round_max: Latency,
    /// Callbacks that never arrived within the timeout.
    missing: usize,
    /// The writer's own `tpc_finish` round trip.
    finish: Latency,
    server_rss_before_mb: Option<f64>,
    /// With every client connected and idle (sampled after a second of settling).
    server_rss_connected_mb: Option<f64>,
    /// Its anonymous part (without mapped files' cached pages).
    server_rss_anon_connected_mb: Option<f64>,
}

/// Records the arrival time of each invalidation.
struct Recorder {
    tx: mpsc::UnboundedSender<(Tid, Instant)>,
}

#[async_trait]
impl Callbacks for Recorder {
    async fn invalidate_transaction(&self, tid: Tid, _oids: Vec<Oid>) {
        let _ = self.tx.send((tid, Instant::now()));
    }
}

pub async fn run(args: Args) -> Result<Report> {
    let meta = args.target.meta()?;
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let mb = |f: fn(u32) -> std::io::Result<u64>| {
        args.server_pid
            .and_then(|p| f(p).ok())
            .map(|b| b as f64 / (1 << 20) as f64)
    };
    let rss_mb = || mb(rss_bytes);
    let server_rss_before_mb = rss_mb();

    let address = args.target.address();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opts = ConnectOptions {
        read_only: true,
        connect_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let connecting = Instant::now();
    let clients: Vec<Connection> = stream::iter(0..args.clients)
        .map(|_| {
            let cb = Arc::new(Recorder { tx: tx.clone() });
            Connection::connect(&address, &opts, cb)
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    let connect_s = connecting.elapsed().as_secs_f64();
    drop(tx);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server_rss_connected_mb = rss_mb();
    let server_rss_anon_connected_mb = mb(rss_anon_bytes);

    let writer_address = match &args.writer_address {
        Some(a) => zeo_client::Address(a.clone()),
        None => address.clone(),
    };
    let conn = Connection::connect(
        &writer_address,
        &ConnectOptions::default(),
        Arc::new(NoCallbacks),
    )
    .await?;
    let mut writer = Writer::new(conn);
    let mut rng = Rng::new(args.seed);
    let mut latency = Samples::default();
    let mut round_max = Samples::default();
    let mut finish = Samples::default();
    let mut missing = 0;
    for round in 0..args.rounds + args.warmup_rounds {
        let measured = round >= args.warmup_rounds;
        let item = meta.random_item(&mut rng);
        let voted = match writer.store_and_vote(&meta, &mut rng, &[item], &[]).await? {
            VoteOutcome::Voted(v) => v,
            VoteOutcome::Conflict => {
                bail!("unexpected conflict on {item} (is something else writing?)")
            }
        };
        let sent = Instant::now();
        let tid = writer.finish(&voted).await?;
        let finished = sent.elapsed();
        let deadline = sent + Duration::from_secs_f64(args.timeout);
        let mut arrivals = Samples::with_capacity(args.clients);
        let mut last = sent;
        while arrivals.len() < args.clients {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((t, at))) if t == tid => {
                    arrivals.push(at - sent);
                    last = last.max(at);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if measured {
            missing += args.clients - arrivals.len();
            latency.extend(arrivals);
            round_max.push(last - sent);
            finish.push(finished);
        }
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    }
    writer.conn.close();
    for c in &clients {
        c.close();
    }
    Ok(Report {
        clients: args.clients,
        rounds: args.rounds,
        connect_s,
        latency: latency.summarize(),
        round_max: round_max.summarize(),
        missing,
        finish: finish.summarize(),
        server_rss_before_mb,
        server_rss_connected_mb,
        server_rss_anon_connected_mb,
    })
}
