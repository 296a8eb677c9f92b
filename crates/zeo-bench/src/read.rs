//! Reads a fixed sample of objects: the proxy scenarios' cold and warm reads.
//!
//! With `--wait-ready` the command keeps trying to connect until the server accepts (a
//! proxy that is still starting), so "restart until the sample is read" is measured from
//! the moment the command starts. `--wait-current` then also waits until the server's
//! `lastTransaction` reaches upstream's: a proxy may accept clients while it still
//! catches up, serving its older (consistent) snapshot meanwhile, and a restart is only
//! over once it serves current data. `--verify-against` reads the same sample straight
//! from upstream and counts objects whose serial or data differ.

use crate::rng::Rng;
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use zeo_client::{Address, ClientError, ConnectOptions, Connection, NoCallbacks};
use zodb::{Oid, Tid};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: crate::meta::Target,
    /// Number of distinct items read.
    #[arg(long, default_value_t = 1000)]
    sample: usize,
    /// Seed of the sample: the same seed reads the same objects.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Connections reading concurrently, one request in flight each (like a pool of
    /// front-end threads).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Keep retrying the connection for up to this many seconds.
    #[arg(long, default_value_t = 0.0)]
    wait_ready: f64,
    /// Compare every object with a direct read from this server (upstream).
    #[arg(long)]
    verify_against: Option<String>,
    /// Before reading, wait until the server is as current as the `--verify-against`
    /// server (its `lastTransaction`), polling every 10 ms.
    #[arg(long, requires = "verify_against")]
    wait_current: bool,
    /// Instead of reading the sample once, read it over and over for this many seconds
    /// and report the rate (the cache-hit rate of a proxy whose cache holds the sample).
    #[arg(long)]
    repeat_for: Option<f64>,
}

#[derive(Serialize)]
pub struct Report {
    objects: usize,
    bytes: u64,
    /// Until every connection was registered.
    connect_s: f64,
    /// Until the server was as current as upstream (with `--wait-current`).
    current_s: Option<f64>,
    /// Reading the sample, once connected (and current).
    read_s: f64,
    /// Both: from the command's start until the last object arrived.
    total_s: f64,
    /// Objects whose serial or data differ from the verification server's.
    mismatches: Option<usize>,
    /// Loads the server refused with `ClientDisconnected` (its upstream not ready), retried.
    refused: u64,
    /// With `--repeat-for`: loads completed in the window, and per second.
    repeated_loads: Option<u64>,
    loads_per_s: Option<f64>,
}

pub async fn run(args: Args) -> Result<Report> {
    let began = Instant::now();
    let meta = args.target.meta()?;
    let oids = Arc::new(meta.distinct_items(args.sample, &mut Rng::new(args.seed)));
    let deadline = began + Duration::from_secs_f64(args.wait_ready);
    let address = args.target.address();
    let conns = futures::future::try_join_all(
        (0..args.connections.max(1)).map(|_| connect_when_ready(&address, deadline)),
    )
    .await?;
    let connected = Instant::now();
    let upstream = match &args.verify_against {
        Some(a) => Some(
            Connection::connect(
                &Address(a.clone()),
                &ConnectOptions::default(),
                Arc::new(NoCallbacks),
            )
            .await?,
        ),
        None => None,
    };
    let mut current_s = None;
    if let (true, Some(up)) = (args.wait_current, &upstream) {
        let target = up.last_transaction().await?;
        while conns[0].last_transaction().await? < target {
            if Instant::now() >= deadline {
                bail!("the server did not catch up with upstream within --wait-ready");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        current_s = Some(began.elapsed().as_secs_f64());
    }
    if let Some(window) = args.repeat_for {
        let (loads, seconds) =
            read_repeatedly(&conns, &oids, Duration::from_secs_f64(window)).await?;
        for c in &conns {
            c.close();
        }
        return Ok(Report {
            objects: oids.len(),
            bytes: 0,
            connect_s: (connected - began).as_secs_f64(),
            current_s,
            read_s: seconds,
            total_s: began.elapsed().as_secs_f64(),
            mismatches: None,
            refused: 0,
            repeated_loads: Some(loads),
            loads_per_s: Some(loads as f64 / seconds),
        });
    }
    let reading = Instant::now();
    let (got, refused) = read_all(&conns, &oids, deadline).await?;
    let done = Instant::now();
    for c in &conns {
        c.close();
    }

    let mismatches = match upstream {
        None => None,
        Some(direct) => {
            let (want, _) = read_all(std::slice::from_ref(&direct), &oids, Instant::now()).await?;
            direct.close();
            Some(got.iter().zip(&want).filter(|(a, b)| a != b).count())
        }
    };
    Ok(Report {
        objects: oids.len(),
        bytes: got.iter().map(|(_, len, _)| *len as u64).sum(),
        connect_s: (connected - began).as_secs_f64(),
        current_s,
        read_s: (done - reading).as_secs_f64(),
        total_s: (done - began).as_secs_f64(),
        mismatches,
        refused,
        repeated_loads: None,
        loads_per_s: None,
    })
}

/// Reads `oids` round and round from every connection (one load in flight each) until
/// `window` has passed: how many loads completed, and the seconds that took.
async fn read_repeatedly(
    conns: &[Connection],
    oids: &Arc<Vec<Oid>>,
    window: Duration,
) -> Result<(u64, f64)> {
    let start = Instant::now();
    let end = start + window;
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for conn in conns {
        let (conn, next, oids) = (conn.clone(), next.clone(), oids.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let oid = oids[next.fetch_add(1, Ordering::Relaxed) % oids.len()];
                conn.load_before(oid, Tid::MAX).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

async fn connect_when_ready(address: &Address, deadline: Instant) -> Result<Connection> {
    let opts = ConnectOptions {
        read_only: true,
        ..Default::default()
    };
    loop {
        match Connection::connect(address, &opts, Arc::new(NoCallbacks)).await {
            Ok(c) => return Ok(c),
            Err(e @ (ClientError::Connect(..) | ClientError::Disconnected)) => {
                if Instant::now() >= deadline {
                    return Err(e.into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// (serial, length, FNV-1a hash of the data) of every oid, in `oids` order, and how many
/// loads were refused because the server's own upstream was unavailable (a proxy that is
/// still catching up); those are retried every 10 ms until `deadline`.
async fn read_all(
    conns: &[Connection],
    oids: &Arc<Vec<Oid>>,
    deadline: Instant,
) -> Result<(Vec<(Tid, usize, u64)>, u64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for conn in conns {
        let (conn, next, oids) = (conn.clone(), next.clone(), oids.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut refused = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&oid) = oids.get(i) else { break };
                let loaded = loop {
                    match conn.load_before(oid, Tid::MAX).await {
                        Ok((loaded, _)) => break loaded,
                        Err(ClientError::Remote(e))
                            if e.class_path.ends_with("ClientDisconnected")
                                && Instant::now() < deadline =>
                        {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                let zodb::Loaded {
                    data,
                    start: serial,
                    ..
                } = loaded.ok_or_else(|| anyhow!("{oid} not found"))?;
                out.push((i, (serial, data.len(), fnv1a(&data))));
            }
            anyhow::Ok((out, refused))
        }));
    }
    let mut all = vec![(Tid::ZERO, 0, 0); oids.len()];
    let mut refused = 0;
    for t in tasks {
        let (got, r) = t.await??;
        for (i, v) in got {
            all[i] = v;
        }
        refused += r;
    }
    Ok((all, refused))
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
