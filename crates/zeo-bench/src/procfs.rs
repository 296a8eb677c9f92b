//! What `/proc` says about a process: CPU time and resident memory.
//!
//! CPU seconds per operation are the robust figure on a small machine where the load
//! generator and the server compete for cores: throughput then measures the scheduler as
//! much as the server, while the server's own user+sys time per request does not.

use std::io;

/// (user, system) CPU seconds consumed so far by process `pid` (all its threads).
pub fn cpu_times(pid: u32) -> io::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_times(&stat, clock_ticks())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))
}

/// CPU seconds (user + system) of this process: what the load generator cost.
pub fn own_cpu_seconds() -> f64 {
    cpu_times(std::process::id())
        .map(|(u, s)| u + s)
        .unwrap_or(0.0)
}

/// Resident set size of `pid` in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    status_kb(pid, "VmRSS:").map(|kb| kb * 1024)
}

/// The anonymous (private, not file-backed) part of the RSS, in bytes (`RssAnon`): a
/// server that maps its Data.fs has the file's cached pages in `VmRSS` too, although
/// they are page cache the kernel can drop, not memory the server allocated.
pub fn rss_anon_bytes(pid: u32) -> io::Result<u64> {
    status_kb(pid, "RssAnon:").map(|kb| kb * 1024)
}

fn status_kb(pid: u32, key: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kb(&status, key).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no {key} in /proc/PID/status"),
        )
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn parse_cpu_times(stat: &str, ticks: f64) -> Option<(f64, f64)> {
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of the full line; `rest` starts at field 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime / ticks, stime / ticks))
}

fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time of a server over a measured window.
pub struct CpuWindow {
    pid: Option<u32>,
    server_start: (f64, f64),
    own_start: f64,
}

/// What a window measured.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuUsed {
    /// The server's user + system seconds (`None` without a pid).
    pub server_s: Option<f64>,
    /// The part of `server_s` spent in the kernel (sockets, file reads, scheduling).
    pub server_sys_s: Option<f64>,
    /// The load generator's own CPU seconds.
    pub client_s: f64,
}

impl CpuWindow {
    pub fn start(pid: Option<u32>) -> CpuWindow {
        CpuWindow {
            pid,
            server_start: pid.and_then(|p| cpu_times(p).ok()).unwrap_or_default(),
            own_start: own_cpu_seconds(),
        }
    }

    pub fn stop(&self) -> CpuUsed {
        let server = self.pid.and_then(|p| cpu_times(p).ok()).map(|(u, s)| {
            let (u0, s0) = self.server_start;
            (u - u0, s - s0)
        });
        CpuUsed {
            server_s: server.map(|(u, s)| u + s),
            server_sys_s: server.map(|(_, s)| s),
            client_s: own_cpu_seconds() - self.own_start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let stat = "1234 (python3 -m x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_cpu_times(stat, 100.0), Some((2.5, 0.5)));
    }

    #[test]
    fn parses_rss() {
        let status = "Name:\tx\nVmRSS:\t  2048 kB\nRssAnon:\t 1024 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS:"), Some(2048));
        assert_eq!(parse_status_kb(status, "RssAnon:"), Some(1024));
    }

    #[test]
    fn reads_own_process() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(rss_anon_bytes(std::process::id()).unwrap() > 0);
        assert!(own_cpu_seconds() >= 0.0);
    }
}
