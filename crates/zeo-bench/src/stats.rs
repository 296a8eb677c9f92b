//! Latency summaries.
//!
//! Every sample is kept (8 bytes each; a run records at most a few million) and sorted
//! once at the end: exact percentiles, no histogram resolution to argue about.

use serde::Serialize;
use std::time::Duration;

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct Latency {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Collected durations, in nanoseconds.
#[derive(Default)]
pub struct Samples(Vec<u64>);

impl Samples {
    pub fn with_capacity(n: usize) -> Samples {
        Samples(Vec::with_capacity(n))
    }

    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn summarize(mut self) -> Latency {
        if self.0.is_empty() {
            return Latency::default();
        }
        self.0.sort_unstable();
        let v = &self.0;
        let ms = |ns: u64| ns as f64 / 1e6;
        // Nearest-rank percentile.
        let pct = |p: f64| {
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            ms(v[rank.clamp(1, v.len()) - 1])
        };
        Latency {
            count: v.len(),
            mean_ms: v.iter().map(|&n| n as f64).sum::<f64>() / v.len() as f64 / 1e6,
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p99_ms: pct(99.0),
            max_ms: ms(*v.last().unwrap_or(&0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = Samples::default();
        for i in 1..=100 {
            s.push(Duration::from_millis(i));
        }
        let l = s.summarize();
        assert_eq!(l.count, 100);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        assert!((l.mean_ms - 50.5).abs() < 1e-9);
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(Samples::default().summarize().count, 0);
    }
}
