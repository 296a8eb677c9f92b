//! A TCP relay that behaves like a slow WAN link, and counts the bytes crossing it.
//!
//! Each direction is one shared link of `--bandwidth` bytes/s: a chunk read from one side
//! occupies the link for `len / bandwidth` after the link is free, then takes half the
//! round-trip time to arrive. Pipelined traffic therefore flows at the link's rate
//! with one fixed delay, as on a real line (delaying each chunk *in turn*, as a naive
//! relay does, would cap throughput at one chunk per delay).
//!
//! Control is over stdin/stdout, one line each way: the relay first prints
//! `{"port": N}`; then `counts` prints `{"up": .., "down": .., "connections": ..}`,
//! `reset` zeroes the counts and prints them; end of input stops the relay.

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Where to forward connections, HOST:PORT.
    #[arg(long)]
    target: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Round-trip time added, milliseconds (half in each direction).
    #[arg(long, default_value_t = 20.0)]
    rtt_ms: f64,
    /// Capacity of each direction, bytes per second (0: unlimited).
    #[arg(long, default_value_t = 1_000_000)]
    bandwidth: u64,
}

/// Largest chunk forwarded at once; small enough that a large reply trickles out at the
/// link's rate rather than arriving all at once after a long pause.
const CHUNK: usize = 16 * 1024;

/// One direction of the link, shared by all connections.
struct Link {
    /// When the link finishes sending what is already scheduled.
    free_at: Mutex<Instant>,
    bandwidth: u64,
    one_way: Duration,
    bytes: AtomicU64,
}

impl Link {
    fn new(bandwidth: u64, one_way: Duration) -> Link {
        Link {
            free_at: Mutex::new(Instant::now()),
            bandwidth,
            one_way,
            bytes: AtomicU64::new(0),
        }
    }

    /// Accounts for `len` bytes entering the link now; returns when they arrive.
    fn schedule(&self, len: usize) -> Instant {
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let mut free_at = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*free_at).max(Instant::now());
        let transmit = if self.bandwidth == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(len as f64 / self.bandwidth as f64)
        };
        *free_at = start + transmit;
        *free_at + self.one_way
    }
}

struct Relay {
    up: Link,
    down: Link,
    connections: AtomicU64,
}

pub async fn run(args: Args) -> Result<()> {
    let one_way = Duration::from_secs_f64(args.rtt_ms / 2000.0);
    let relay = Arc::new(Relay {
        up: Link::new(args.bandwidth, one_way),
        down: Link::new(args.bandwidth, one_way),
        connections: AtomicU64::new(0),
    });
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("{{\"port\": {}}}", listener.local_addr()?.port());
    std::io::stdout().flush()?;

    let control = relay.clone();
    std::thread::spawn(move || control_loop(&control));

    loop {
        let (client, _) = listener.accept().await?;
        let relay = relay.clone();
        let target = args.target.clone();
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(&target).await else {
                return;
            };
            relay.connections.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            tokio::spawn(pump(cr, uw, relay.clone(), true));
            tokio::spawn(pump(ur, cw, relay, false));
        });
    }
}

fn control_loop(relay: &Relay) {
    let counts = |relay: &Relay| {
        format!(
            "{{\"up\": {}, \"down\": {}, \"connections\": {}}}",
            relay.up.bytes.load(Ordering::Relaxed),
            relay.down.bytes.load(Ordering::Relaxed),
            relay.connections.load(Ordering::Relaxed)
        )
    };
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "counts" => println!("{}", counts(relay)),
            "reset" => {
                relay.up.bytes.store(0, Ordering::Relaxed);
                relay.down.bytes.store(0, Ordering::Relaxed);
                relay.connections.store(0, Ordering::Relaxed);
                println!("{}", counts(relay));
            }
            other => println!("{{\"error\": \"unknown command {other:?}\"}}"),
        }
        let _ = std::io::stdout().flush();
    }
    std::process::exit(0);
}

/// Forwards one direction: a reader stamps each chunk with its arrival time, a writer
/// delivers chunks when they are due (in order: arrival times only grow).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    relay: Arc<Relay>,
    up: bool,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let link = if up { &relay.up } else { &relay.down };
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        match from.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let data = buf.split().freeze();
                let due = link.schedule(data.len());
                if tx.send((due, data)).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_serializes_then_delays() {
        let link = Link::new(1000, Duration::from_millis(10));
        let t0 = Instant::now();
        let near = |got: Instant, ms: u64| {
            let d = got - t0;
            d >= Duration::from_millis(ms) && d < Duration::from_millis(ms + 50)
        };
        // 500 bytes take 0.5 s on the wire, then 10 ms to arrive.
        assert!(near(link.schedule(500), 510));
        // The next chunk queues behind the first.
        assert!(near(link.schedule(500), 1010));
        assert_eq!(link.bytes.load(Ordering::Relaxed), 1000);
    }
}
