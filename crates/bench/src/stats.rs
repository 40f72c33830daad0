//! Latency percentiles and result rendering.

use std::time::Duration;

/// Nearest-rank percentile of sorted samples (`p` in 0..=100); zero when there are none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Rounds for display and JSON (3 decimals).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A fixed-width text table: a header row, then rows, columns right-aligned except the first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let mut out = line(header, &widths);
    out.push_str(&line(&rule, &widths));
    for r in rows {
        out.push_str(&line(r, &widths));
    }
    out
}

fn line<S: AsRef<str>>(cells: &[S], widths: &[usize]) -> String {
    let mut out = String::new();
    for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
        let c = c.as_ref();
        if i == 0 {
            out.push_str(&format!("{c:<w$}"));
        } else {
            out.push_str(&format!("  {c:>w$}"));
        }
    }
    let mut out = out.trim_end().to_string();
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(d).collect();
        assert_eq!(percentile(&s, 50.0), d(50));
        assert_eq!(percentile(&s, 90.0), d(90));
        assert_eq!(percentile(&s, 99.0), d(99));
        assert_eq!(percentile(&s, 100.0), d(100));
        assert_eq!(percentile(&s, 0.0), d(1));
        assert_eq!(percentile(&[d(7)], 99.0), d(7));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        let s: Vec<Duration> = (1..=10).map(d).collect();
        assert_eq!(percentile(&s, 99.0), d(10));
        assert_eq!(percentile(&s, 50.0), d(5));
    }

    #[test]
    fn table_aligns() {
        let t = table(&["a", "bb"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "a    bb\n---  --\nxyz   1\n");
    }
}
