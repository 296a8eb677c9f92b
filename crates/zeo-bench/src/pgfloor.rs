//! The PostgreSQL floor: what one database round trip costs on this machine.
//!
//! A load that misses a server's cache on PostgreSQL is a ZEO round trip plus a database
//! round trip, whichever server answers it. This times the second part alone, from the
//! same driver zeors uses (`tokio-postgres`, its connection task on the same kind of
//! runtime), on one connection, closed loop: a bare `SELECT 1`, and the statement zeors
//! runs for a miss ([`relstorage::LOAD_BEFORE_SQL`]) on uniformly random oids. Added to
//! the ZEO floor's latency at one connection, it bounds what any server can do for cold
//! loads at one connection (see `bench/server/report_pg.py`).

use crate::rng::Rng;
use crate::stats::{Latency, Samples};
use anyhow::{Context, Result};
use serde::Serialize;
use std::time::Duration;
use tokio::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The database, as a libpq connection string.
    #[arg(long)]
    dsn: String,
    /// meta.json of the generated database (`bench/server/gendb.py`).
    #[arg(long)]
    meta: std::path::PathBuf,
    /// Seconds measured, per statement.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Seconds run before measuring, per statement.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Serialize)]
pub struct Timing {
    queries: usize,
    queries_per_s: f64,
    latency: Latency,
}

#[derive(Serialize)]
pub struct Report {
    /// `SELECT 1`: the round trip itself.
    select_1: Timing,
    /// zeors's cache-miss statement on a random oid.
    load: Timing,
}

pub async fn run(args: Args) -> Result<Report> {
    let max_oid = crate::meta::Meta::load(&args.meta)?.max_oid;
    let (client, connection) = tokio_postgres::connect(&args.dsn, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {}", args.dsn))?;
    let driver = tokio::spawn(connection);
    let select_1 = client.prepare("SELECT 1").await?;
    let load = client.prepare(relstorage::LOAD_BEFORE_SQL).await?;
    let mut rng = Rng::new(args.seed);
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);

    let mut time = |stmt: tokio_postgres::Statement, random_oid: bool| {
        let client = &client;
        let oids: Vec<i64> = (0..1 << 16)
            .map(|_| {
                if random_oid {
                    i64::try_from(rng.below(max_oid + 1)).unwrap_or(0)
                } else {
                    0
                }
            })
            .collect();
        async move {
            let start = Instant::now() + warmup;
            let end = start + duration;
            let mut samples = Samples::with_capacity(1 << 16);
            let mut i = 0usize;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                if random_oid {
                    client
                        .query_opt(&stmt, &[&oids[i % oids.len()], &i64::MAX])
                        .await?;
                } else {
                    client.query_one(&stmt, &[]).await?;
                }
                i += 1;
                if began >= start {
                    samples.push(began.elapsed());
                }
            }
            let queries = samples.len();
            Ok::<_, anyhow::Error>(Timing {
                queries,
                queries_per_s: queries as f64 / duration.as_secs_f64(),
                latency: samples.summarize(),
            })
        }
    };
    let select_1 = time(select_1, false).await?;
    let load = time(load, true).await?;
    drop(client);
    let _ = driver.await;
    Ok(Report { select_1, load })
}
