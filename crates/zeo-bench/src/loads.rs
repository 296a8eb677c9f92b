//! Random `loadBefore` throughput and latency.
//!
//! A closed loop: `connections` connections, each with `depth` requests in flight (a
//! new one is sent as soon as one returns), every request for a uniformly random oid of
//! the whole database. Loads that complete inside the measured window (after a warm-up)
//! count; their latencies are kept exactly.

use crate::procfs::CpuWindow;
use crate::rng::Rng;
use crate::stats::{Latency, Samples};
use anyhow::{bail, Result};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use zeo_client::{ConnectOptions, Connection, NoCallbacks};
use zodb::{Oid, Tid};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: crate::meta::Target,
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// The server's process id, to measure its CPU time over the window.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Serialize)]
pub struct Report {
    connections: usize,
    depth: usize,
    seconds: f64,
    loads: usize,
    loads_per_s: f64,
    latency: Latency,
    errors: u64,
    /// The server's user+sys CPU seconds over the window.
    server_cpu_s: Option<f64>,
    /// Of which in the kernel.
    server_sys_s: Option<f64>,
    /// Server CPU microseconds per load: the figure that does not depend on how the
    /// two cores were shared with the load generator.
    server_cpu_us_per_load: Option<f64>,
    /// CPU seconds the load generator itself used over the window.
    client_cpu_s: f64,
}

pub async fn run(args: Args) -> Result<Report> {
    if args.connections == 0 || args.depth == 0 {
        bail!("--connections and --depth must be at least 1");
    }
    let max_oid = args.target.meta()?.max_oid;
    let address = args.target.address();
    let opts = ConnectOptions {
        read_only: true,
        ..Default::default()
    };
    let conns: Vec<Connection> = stream::iter(0..args.connections)
        .map(|_| Connection::connect(&address, &opts, Arc::new(NoCallbacks)))
        .buffer_unordered(32)
        .try_collect()
        .await?;

    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.duration);
    let mut workers = Vec::new();
    for (c, conn) in conns.iter().enumerate() {
        for d in 0..args.depth {
            let conn = conn.clone();
            let mut rng = Rng::new(args.seed.wrapping_mul(1_000_003) + (c * args.depth + d) as u64);
            workers.push(tokio::spawn(async move {
                let mut samples = Samples::with_capacity(64 * 1024);
                let mut errors = 0u64;
                loop {
                    let oid = Oid(rng.below(max_oid + 1));
                    let sent = Instant::now();
                    let ok = matches!(conn.load_before(oid, Tid::MAX).await, Ok((Some(_), _)));
                    let done = Instant::now();
                    if done >= end {
                        break;
                    }
                    if done >= start {
                        if ok {
                            samples.push(done - sent);
                        } else {
                            errors += 1;
                        }
                    }
                    if !conn.is_connected() {
                        break;
                    }
                }
                (samples, errors)
            }));
        }
    }

    tokio::time::sleep_until(start).await;
    let cpu = CpuWindow::start(args.server_pid);
    tokio::time::sleep_until(end).await;
    let used = cpu.stop();
    let (server_cpu_s, client_cpu_s) = (used.server_s, used.client_s);

    let mut samples = Samples::default();
    let mut errors = 0;
    for w in workers {
        let (s, e) = w.await?;
        samples.extend(s);
        errors += e;
    }
    for c in &conns {
        c.close();
    }
    let loads = samples.len();
    Ok(Report {
        connections: args.connections,
        depth: args.depth,
        seconds: args.duration,
        loads,
        loads_per_s: loads as f64 / args.duration,
        latency: samples.summarize(),
        errors,
        server_cpu_s,
        server_sys_s: used.server_sys_s,
        server_cpu_us_per_load: server_cpu_s
            .filter(|_| loads > 0)
            .map(|s| s * 1e6 / loads as f64),
        client_cpu_s,
    })
}
