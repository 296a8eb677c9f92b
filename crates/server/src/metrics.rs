//! Prometheus metrics: an HTTP endpoint serving `/metrics` in the text exposition format.
//!
//! The figures already live in the server as atomics (the same ones `server_status`
//! reports), so instead of keeping a second set of counters in sync, a collector reads
//! them at scrape time. Only the commit lock's wait and hold times are real histograms.

use crate::{Shared, StorageHandle};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Server-wide counters updated on the hot paths.
#[derive(Debug)]
pub struct ServerMetrics {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub connections_accepted: AtomicU64,
    /// Connections open now (every listener).
    pub connections_open: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub connections_refused: AtomicU64,
    /// Connections closed by the idle timeout.
    pub idle_closed: AtomicU64,
    /// Iterators open now, over all connections.
    pub iterators_open: AtomicU64,
    /// `iterator_start`s refused because the connection had `max_iterators` open.
    pub iterators_refused: AtomicU64,
    /// Seconds a `vote` waited for the commit lock.
    pub commit_lock_wait: Histogram,
    /// Seconds the commit lock was held, by phase ([`HoldPhase`]): what every other
    /// committer waits for, taken apart so that its sum can be accounted for.
    pub commit_lock_hold: [Histogram; HoldPhase::ALL.len()],
}

/// The phases of a commit lock hold, in order (the order of [`HoldPhase::ALL`], which
/// `as usize` indexes). A conflict round repeats `Client` and
/// `Vote`; an aborted transaction ends with `Abort` instead of `Finish` and `Reply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldPhase {
    /// From taking the lock until the storage has voted (writing the data, first sync).
    Vote,
    /// From the vote until the session starts `tpc_finish` (or a second vote): the
    /// vote's reply, the client's round trip, the request's decoding.
    Client,
    /// The storage's finish (the second sync, the index), from the session's start.
    Finish,
    /// From the storage's finish until the lock is released (the `info` callback and
    /// the reply queued, invalidations sent).
    Reply,
    /// From the last phase until an aborted transaction released the lock.
    Abort,
}

impl HoldPhase {
    pub const ALL: [HoldPhase; 5] = [
        HoldPhase::Vote,
        HoldPhase::Client,
        HoldPhase::Finish,
        HoldPhase::Reply,
        HoldPhase::Abort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HoldPhase::Vote => "vote",
            HoldPhase::Client => "client",
            HoldPhase::Finish => "finish",
            HoldPhase::Reply => "reply",
            HoldPhase::Abort => "abort",
        }
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            iterators_open: AtomicU64::new(0),
            iterators_refused: AtomicU64::new(0),
            commit_lock_wait: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            // 10 µs to 2.6 s: a phase may be a few microseconds.
            commit_lock_hold: HoldPhase::ALL
                .map(|_| Histogram::new(exponential_buckets(0.00001, 4.0, 10))),
        }
    }
}

#[derive(Debug)]
struct ServerCollector {
    shared: Weak<Shared>,
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    m.encode_gauge(&value)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    m.encode_counter::<NoLabelSet, _, u64>(&value, None)
}

/// One metric with a value per storage.
fn per_storage(
    encoder: &mut DescriptorEncoder,
    storages: &[&Arc<StorageHandle>],
    name: &str,
    help: &str,
    kind: MetricType,
    value: impl Fn(&StorageHandle) -> f64,
) -> std::fmt::Result {
    let mut m = encoder.encode_descriptor(name, help, None, kind)?;
    for h in storages {
        let labels = [("storage", h.name.as_str())];
        let mut fam = m.encode_family(&labels)?;
        let v = value(h);
        match kind {
            MetricType::Counter => {
                fam.encode_counter::<NoLabelSet, _, u64>(&(v.max(0.0) as u64), None)?
            }
            _ => fam.encode_gauge(&v)?,
        }
    }
    Ok(())
}

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        let m = &shared.metrics;
        counter(
            &mut encoder,
            "zeors_bytes_received",
            "Bytes read from clients.",
            m.bytes_in.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "zeors_bytes_sent",
            "Bytes written to clients.",
            m.bytes_out.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "zeors_connections_accepted",
            "Client connections accepted.",
            m.connections_accepted.load(Ordering::Relaxed),
        )?;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        gauge(
            &mut encoder,
            "zeors_connections_open",
            "Client connections open now (registered or not).",
            load(&m.connections_open) as f64,
        )?;
        counter(
            &mut encoder,
            "zeors_connections_refused",
            "Connections closed when accepted because max-connections were open.",
            load(&m.connections_refused),
        )?;
        counter(
            &mut encoder,
            "zeors_connections_idle_closed",
            "Connections closed by the idle timeout.",
            load(&m.idle_closed),
        )?;
        gauge(
            &mut encoder,
            "zeors_iterators_open",
            "Transaction and record iterators open, over all connections.",
            load(&m.iterators_open) as f64,
        )?;
        counter(
            &mut encoder,
            "zeors_iterators_refused",
            "iterator_start calls refused because the connection had max-iterators open.",
            load(&m.iterators_refused),
        )?;
        let budget = &shared.budget;
        gauge(
            &mut encoder,
            "zeors_queued_bytes",
            "Output queued for all clients, not yet written.",
            budget.total() as f64,
        )?;
        gauge(
            &mut encoder,
            "zeors_queued_bytes_limit",
            "The server-wide bound on queued output (max-queued-total).",
            budget.limit() as f64,
        )?;
        gauge(
            &mut encoder,
            "zeors_connections_paused",
            "Connections not read from now because queued output is over the bound.",
            budget.paused.load(Ordering::Relaxed) as f64,
        )?;
        counter(
            &mut encoder,
            "zeors_connection_pauses",
            "Times a connection stopped being read from because queued output was over the bound.",
            budget.pauses.load(Ordering::Relaxed),
        )?;
        {
            let mut d = encoder.encode_descriptor(
                "zeors_commit_lock_wait_seconds",
                "Time votes waited for the commit lock.",
                None,
                MetricType::Histogram,
            )?;
            m.commit_lock_wait
                .encode(d.encode_family(&[("storage", "all")])?)?;
        }
        {
            let mut d = encoder.encode_descriptor(
                "zeors_commit_lock_hold_seconds",
                "Time the commit lock was held, by phase (vote, client, finish, reply, abort).",
                None,
                MetricType::Histogram,
            )?;
            for (phase, h) in HoldPhase::ALL.iter().zip(&m.commit_lock_hold) {
                h.encode(d.encode_family(&[("storage", "all"), ("phase", phase.name())])?)?;
            }
        }
        let mut storages: Vec<&Arc<StorageHandle>> = shared.storages.values().collect();
        storages.sort_by(|a, b| a.name.cmp(&b.name));
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        use MetricType::{Counter, Gauge};
        per_storage(
            &mut encoder,
            &storages,
            "zeors_connected_clients",
            "Registered client connections.",
            Gauge,
            |h| h.hub.connections() as f64,
        )?;
        per_storage(
            &mut encoder,
            &storages,
            "zeors_loads",
            "Objects loaded.",
            Counter,
            |h| n(&h.stats.loads),
        )?;
        per_storage(
            &mut encoder,
            &storages,
            "zeors_stores",
            "Objects stored.",
            Counter,
            |h| n(&h.stats.stores),
        )?;
        per_storage(
            &mut encoder,
            &storages,
            "zeors_commits",
            "Transactions committed.",
            Counter,
            |h| n(&h.stats.commits),
        )?;
        per_storage(
            &mut encoder,
            &storages,
            "zeors_aborts",
            "Transactions aborted.",
            Counter,
            |h| n(&h.stats.aborts),
        )?;
        per_storage(
            &mut encoder,
            &storages,
            "zeors_conflicts",
            "Write conflicts returned to clients.",
            Counter,
            |h| n(&h.stats.conflicts),
        )?;
        per_storage(
            &mut encoder,
            &storages,
            "zeors_invalidations_sent",
            "invalidateTransaction messages queued.",
            Counter,
            |h| h.hub.invalidations_sent() as f64,
        )?;
        per_storage(
            &mut encoder,
            &storages,
            "zeors_commit_lock_waiting",
            "Votes waiting for the commit lock.",
            Gauge,
            |h| h.stats.waiting.load(Ordering::Relaxed) as f64,
        )?;
        per_storage(
            &mut encoder,
            &storages,
            "zeors_database_size_bytes",
            "Size of the storage.",
            Gauge,
            |h| h.storage.info().size as f64,
        )?;
        per_storage(
            &mut encoder,
            &storages,
            "zeors_objects",
            "Objects in the storage.",
            Gauge,
            |h| h.storage.info().length as f64,
        )?;
        // Storage-specific figures (the proxy's cache and upstream link).
        let extra: Vec<(String, Vec<zodb::StorageMetric>)> = storages
            .iter()
            .map(|h| (h.name.clone(), h.storage.metrics()))
            .collect();
        let mut names: Vec<(&'static str, &'static str, bool)> = extra
            .iter()
            .flat_map(|(_, ms)| ms.iter().map(|m| (m.name, m.help, m.counter)))
            .collect();
        names.sort();
        names.dedup_by_key(|n| n.0);
        for (name, help, is_counter) in names {
            let full = format!("zeors_{name}");
            let kind = if is_counter { Counter } else { Gauge };
            let mut d = encoder.encode_descriptor(&full, help, None, kind)?;
            for (storage, ms) in &extra {
                if let Some(m) = ms.iter().find(|m| m.name == name) {
                    let labels = [("storage", storage.as_str())];
                    let mut fam = d.encode_family(&labels)?;
                    if is_counter {
                        fam.encode_counter::<NoLabelSet, _, u64>(&(m.value.max(0.0) as u64), None)?;
                    } else {
                        fam.encode_gauge(&m.value)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Renders the current metrics.
pub(crate) fn render(shared: &Arc<Shared>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ServerCollector {
        shared: Arc::downgrade(shared),
    }));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

/// Serves `GET /metrics` until shutdown. A deliberately small HTTP/1.0 responder: one
/// request per connection, nothing else is served.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line =
                String::from_utf8_lossy(buf.split(|b| *b == b'\n').next().unwrap_or_default())
                    .into_owned();
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let response = if method == "GET"
                && (path == "/metrics" || path.starts_with("/metrics?"))
            {
                let body = render(&shared);
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                tracing::debug!(%peer, %line, "metrics: not found");
                "HTTP/1.0 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n".to_string()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
