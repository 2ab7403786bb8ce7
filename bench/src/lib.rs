//! Shared by the benchmarks: timing statistics and table printing.

use std::time::Duration;

/// Median and 95th percentile of a set of samples.
pub struct Stats {
    pub median: Duration,
    pub p95: Duration,
    pub n: usize,
}

impl Stats {
    pub fn of(mut samples: Vec<Duration>) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Stats {
            median: at(0.5),
            p95: at(0.95),
            n: samples.len(),
        }
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// `ours / theirs` as a percentage, for "at most half" style targets.
pub fn ratio(ours: Duration, theirs: Duration) -> String {
    format!("{:.0}%", 100.0 * ours.as_secs_f64() / theirs.as_secs_f64())
}
