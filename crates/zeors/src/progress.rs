//! Showing the progress of long work (`pack`, `check`, `info --iterate`, a proxy's
//! catch-up): a bar with done/total, rate and time left when stderr is a terminal, and
//! log lines otherwise — one every `ZEORS_PROGRESS_SECONDS` (10 s by default) with done,
//! total, rate and time left, and one when the phase ends — so that a log file or a pipe
//! gets a readable record instead of terminal control codes. Work shorter than the
//! interval logs nothing.
//!
//! Invariant: while a bar is on screen it is registered in [`ACTIVE`], and every log line
//! written to stderr goes through [`Stderr`], which hides the bar for that write; so log
//! lines and the bar never garble each other.

use indicatif::{
    HumanBytes, HumanCount, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle,
};
use parking_lot::Mutex;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use zodb::progress::{Progress, Unit};

/// The bar on screen, if any, with the number that tells it from others.
static ACTIVE: Mutex<Option<(u64, ProgressBar)>> = Mutex::new(None);
static NEXT_BAR: AtomicU64 = AtomicU64::new(0);

/// Unregisters bar `id` if it is the one on screen.
fn deactivate(id: u64) {
    let mut active = ACTIVE.lock();
    if active.as_ref().is_some_and(|(a, _)| *a == id) {
        *active = None;
    }
}

/// How often a phase is logged when no bar can be shown.
fn log_interval() -> Duration {
    std::env::var("ZEORS_PROGRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(10))
}

/// Shows progress as a bar or as log lines (see the module docs).
pub struct Reporter {
    /// Prefix of every line: what the work is about (a file, a storage name).
    label: String,
    bar: bool,
    log: bool,
    every: Duration,
    phase: Mutex<Option<Phase>>,
}

struct Phase {
    what: String,
    unit: Unit,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
    /// Whether a log line was written for this phase (then its end is logged too).
    logged: bool,
    bar: Option<(u64, ProgressBar)>,
}

impl Reporter {
    /// For a tool run by a person: a bar on a terminal, log lines otherwise.
    pub fn for_tool(label: impl Into<String>) -> Reporter {
        let bar = std::io::stderr().is_terminal();
        Reporter::new(label, bar, !bar)
    }

    /// For the server: its log always gets the lines (it is the record of what happened);
    /// a terminal gets the bar too.
    pub fn for_server(label: impl Into<String>) -> Reporter {
        Reporter::new(label, std::io::stderr().is_terminal(), true)
    }

    fn new(label: impl Into<String>, bar: bool, log: bool) -> Reporter {
        Reporter {
            label: label.into(),
            bar,
            log,
            every: log_interval(),
            phase: Mutex::new(None),
        }
    }
}

fn amount(unit: Unit, n: u64) -> String {
    match unit {
        Unit::Bytes => HumanBytes(n).to_string(),
        _ => format!("{} {}", HumanCount(n), unit.noun()),
    }
}

fn rate(unit: Unit, n: u64, elapsed: Duration) -> String {
    let per_sec = n as f64 / elapsed.as_secs_f64().max(1e-3);
    match unit {
        Unit::Bytes => format!("{}/s", HumanBytes(per_sec as u64)),
        _ => format!("{} {}/s", HumanCount(per_sec as u64), unit.noun()),
    }
}

fn style(unit: Unit, total: u64) -> ProgressStyle {
    let noun = unit.noun();
    let template = match (unit, total) {
        (Unit::Bytes, 0) => {
            "{spinner} {prefix}{msg}: {binary_bytes} ({binary_bytes_per_sec}), {elapsed}"
                .to_string()
        }
        (_, 0) => format!(
            "{{spinner}} {{prefix}}{{msg}}: {{human_pos}} {noun} ({{per_sec:0}}), {{elapsed}}"
        ),
        (Unit::Bytes, _) => {
            "{prefix}{msg} [{bar:30}] {percent:>3}% {binary_bytes}/{binary_total_bytes} \
             ({binary_bytes_per_sec}), {eta} left"
                .to_string()
        }
        _ => format!(
            "{{prefix}}{{msg}} [{{bar:30}}] {{percent:>3}}% {{human_pos}}/{{human_len}} {noun} \
             ({{per_sec:0}}), {{eta}} left"
        ),
    };
    ProgressStyle::with_template(&template)
        .expect("the templates are valid")
        .progress_chars("=> ")
}

impl Phase {
    fn log_line(&self, label: &str) {
        let elapsed = self.started.elapsed();
        if self.total > 0 {
            let left = if self.done > 0 {
                let per = elapsed.as_secs_f64() / self.done as f64;
                format!(
                    ", about {} left",
                    HumanDuration(Duration::from_secs_f64(
                        per * self.total.saturating_sub(self.done) as f64
                    ))
                )
            } else {
                String::new()
            };
            tracing::info!(
                target: "zeors::progress",
                "{label}{}: {:.0}% ({} of {}), {}{left}",
                self.what,
                100.0 * self.done as f64 / self.total as f64,
                match self.unit {
                    Unit::Bytes => HumanBytes(self.done).to_string(),
                    _ => HumanCount(self.done).to_string(),
                },
                amount(self.unit, self.total),
                rate(self.unit, self.done, elapsed),
            );
        } else {
            tracing::info!(
                target: "zeors::progress",
                "{label}{}: {} so far, {}",
                self.what,
                amount(self.unit, self.done),
                rate(self.unit, self.done, elapsed),
            );
        }
    }
}

impl Progress for Reporter {
    fn start(&self, what: &str, unit: Unit, total: u64) {
        let mut slot = self.phase.lock();
        if let Some(old) = slot.take() {
            if let Some((id, bar)) = old.bar {
                bar.abandon();
                deactivate(id);
            }
        }
        let label = if self.label.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.label)
        };
        let bar = self.bar.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(style(unit, total))
                .with_prefix(label.clone())
                .with_message(what.to_string());
            if total == 0 {
                bar.enable_steady_tick(Duration::from_millis(200));
            }
            let id = NEXT_BAR.fetch_add(1, Ordering::Relaxed);
            *ACTIVE.lock() = Some((id, bar.clone()));
            (id, bar)
        });
        let now = Instant::now();
        let phase = Phase {
            what: what.to_string(),
            unit,
            total,
            done: 0,
            started: now,
            last_log: now,
            logged: false,
            bar,
        };
        *slot = Some(phase);
    }

    fn update(&self, done: u64) {
        let mut slot = self.phase.lock();
        let Some(phase) = slot.as_mut() else {
            return;
        };
        phase.done = done;
        if let Some((_, bar)) = &phase.bar {
            bar.set_position(done);
        }
        if self.log && phase.last_log.elapsed() >= self.every {
            phase.last_log = Instant::now();
            phase.logged = true;
            let label = if self.label.is_empty() {
                String::new()
            } else {
                format!("{}: ", self.label)
            };
            phase.log_line(&label);
        }
    }

    fn finish(&self) {
        let Some(phase) = self.phase.lock().take() else {
            return;
        };
        if let Some((id, bar)) = &phase.bar {
            if phase.total > 0 {
                bar.set_position(phase.total);
            }
            bar.finish();
            deactivate(*id);
        }
        if self.log && phase.logged {
            let done = if phase.total > 0 {
                phase.total
            } else {
                phase.done
            };
            let elapsed = phase.started.elapsed();
            let label = if self.label.is_empty() {
                String::new()
            } else {
                format!("{}: ", self.label)
            };
            tracing::info!(
                target: "zeors::progress",
                "{label}{}: done, {} in {:.1} s ({})",
                phase.what,
                amount(phase.unit, done),
                elapsed.as_secs_f64(),
                rate(phase.unit, done, elapsed),
            );
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(phase) = self.phase.get_mut().take() {
            if let Some((id, bar)) = phase.bar {
                bar.abandon();
                deactivate(id);
            }
        }
    }
}

/// stderr for log lines: hides the bar on screen, if any, while a line is written.
#[derive(Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE.lock().as_ref().map(|(_, bar)| bar.clone());
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf).map(|()| buf.len())),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        Stderr
    }
}
