//! Per-storage counters reported by `server_status` (the same fields the Python server
//! reports, so existing monitoring keeps working).

use parking_lot::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use zeo_proto::Value;

#[derive(Default)]
pub struct Stats {
    pub loads: AtomicU64,
    pub stores: AtomicU64,
    pub commits: AtomicU64,
    pub aborts: AtomicU64,
    pub conflicts: AtomicU64,
    /// Conflicts the server resolved itself (native resolution of BTrees and Length).
    pub conflicts_resolved: AtomicU64,
    pub active_txns: AtomicI64,
    /// Sessions waiting for the commit lock.
    pub waiting: AtomicUsize,
    /// When the commit lock was last taken (POSIX seconds), while it is held.
    pub lock_time: Mutex<Option<f64>>,
    /// Server start, as `time.ctime()` prints it.
    pub start: String,
    /// The storage, for the fields it adds to `server_status` ([`zodb::Storage::status`]).
    pub storage: Option<std::sync::Arc<dyn zodb::Storage>>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            start: ctime(zodb::timestamp::now_unix()),
            ..Default::default()
        }
    }

    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The `server_status` dict, minus the fields the caller knows (connections,
    /// last-transaction).
    pub fn status(
        &self,
        connections: usize,
        last_transaction_hex: String,
        has_timeout: bool,
    ) -> Value {
        let n = |c: &AtomicU64| Value::Int(c.load(Ordering::Relaxed) as i64);
        let mut status = Value::dict([
            ("connections", Value::Int(connections as i64)),
            ("loads", n(&self.loads)),
            ("stores", n(&self.stores)),
            ("commits", n(&self.commits)),
            ("aborts", n(&self.aborts)),
            (
                "active_txns",
                Value::Int(self.active_txns.load(Ordering::Relaxed)),
            ),
            (
                "lock_time",
                self.lock_time
                    .lock()
                    .map(Value::Float)
                    .unwrap_or(Value::None),
            ),
            ("conflicts", n(&self.conflicts)),
            ("conflicts_resolved", n(&self.conflicts_resolved)),
            ("start", Value::Str(self.start.clone())),
            (
                "waiting",
                Value::Int(self.waiting.load(Ordering::Relaxed) as i64),
            ),
            (
                "timeout-thread-is-alive",
                if has_timeout {
                    Value::Bool(true)
                } else {
                    Value::str("stub")
                },
            ),
            ("last-transaction", Value::Str(last_transaction_hex)),
        ]);
        if let (Value::Dict(items), Some(storage)) = (&mut status, &self.storage) {
            items.extend(
                storage
                    .status()
                    .into_iter()
                    .map(|(k, v)| (Value::str(k), Value::Str(v))),
            );
        }
        status
    }
}

/// `time.ctime()` format (`Wed Nov 25 14:36:07 2026`), in UTC.
pub fn ctime(t: f64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let p = zodb::timestamp::Parts::from_unix(t);
    let days = (t / 86400.0).floor() as i64;
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(p.month - 1) as usize],
        p.day,
        p.hour,
        p.minute,
        p.second as u32,
        p.year
    )
}

/// Renders a status value as JSON, for the `ruok` probe.
pub fn to_json(v: &Value) -> String {
    let mut out = String::new();
    write_json(v, &mut out);
    out
}

fn write_json(v: &Value, out: &mut String) {
    use std::fmt::Write;
    match v {
        Value::None => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) if f.is_finite() => {
            let _ = write!(out, "{f:?}");
        }
        Value::Float(_) => out.push_str("null"),
        Value::Str(s) => json_str(s, out),
        Value::Bytes(b) => json_str(&String::from_utf8_lossy(b), out),
        Value::Tuple(items) | Value::List(items) | Value::Set(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(x, out);
            }
            out.push(']');
        }
        Value::Dict(items) => {
            out.push('{');
            for (i, (k, x)) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                match k {
                    Value::Str(s) => json_str(s, out),
                    other => json_str(&format!("{other:?}"), out),
                }
                out.push_str(": ");
                write_json(x, out);
            }
            out.push('}');
        }
        Value::Object { state, .. } => write_json(state, out),
    }
}

fn json_str(s: &str, out: &mut String) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctime_matches_python() {
        // time.ctime(1704164645) in UTC: 'Tue Jan  2 03:04:05 2024'
        assert_eq!(ctime(1_704_164_645.0), "Tue Jan  2 03:04:05 2024");
    }

    #[test]
    fn json() {
        let v = Value::dict([
            ("a", Value::Int(1)),
            ("b", Value::None),
            ("c", Value::str("x\"y")),
        ]);
        assert_eq!(to_json(&v), r#"{"a": 1, "b": null, "c": "x\"y"}"#);
    }
}
