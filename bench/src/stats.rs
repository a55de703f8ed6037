//! Latency histograms (HDR, microsecond resolution) and their JSON form.
//!
//! Worker processes send their histograms to the parent as `[[value_us, count], ...]` pairs, which
//! the parent records again and merges; the summary reports milliseconds.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Highest trackable latency: one hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

/// A new empty latency histogram (µs, 3 significant figures).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// Records a duration (clamped to the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    record_us(h, d.as_micros().min(u128::from(MAX_US)) as u64);
}

/// Records a value in microseconds (clamped to 1 µs ..= one hour).
pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_US));
}

/// The histogram as JSON pairs `[[value_us, count], ...]`, enough to rebuild it.
pub fn to_pairs(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded()
            .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
            .collect(),
    )
}

/// Adds the pairs made by [`to_pairs`] into `h`; malformed entries are skipped.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &Value) {
    for p in pairs.as_array().into_iter().flatten() {
        if let (Some(v), Some(c)) = (
            p.get(0).and_then(Value::as_u64),
            p.get(1).and_then(Value::as_u64),
        ) {
            let _ = h.record_n(v.clamp(1, MAX_US), c);
        }
    }
}

/// Milliseconds with three decimals.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The summary reported for a histogram: count and p50/p90/p99/p99.9/max/mean in milliseconds.
pub fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": ((h.mean() / 1000.0) * 1000.0).round() / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= b.abs() * rel
    }

    #[test]
    fn percentiles_of_a_uniform_spread_are_where_expected() {
        let mut h = new_hist();
        for ms in 1..=1000u64 {
            record(&mut h, Duration::from_millis(ms));
        }
        let s = summary(&h);
        assert_eq!(s["count"], 1000);
        assert!(close(s["p50_ms"].as_f64().unwrap(), 500.0, 0.002), "{s}");
        assert!(close(s["p90_ms"].as_f64().unwrap(), 900.0, 0.002), "{s}");
        assert!(close(s["p99_ms"].as_f64().unwrap(), 990.0, 0.002), "{s}");
        assert!(close(s["max_ms"].as_f64().unwrap(), 1000.0, 0.002), "{s}");
    }

    #[test]
    fn pairs_round_trip_and_merge_across_workers() {
        let mut a = new_hist();
        let mut b = new_hist();
        for us in [10u64, 20, 30, 40_000] {
            record_us(&mut a, us);
        }
        for us in [5u64, 7_000_000] {
            record_us(&mut b, us);
        }
        let mut merged = new_hist();
        add_pairs(&mut merged, &to_pairs(&a));
        add_pairs(&mut merged, &to_pairs(&b));
        assert_eq!(merged.len(), 6);
        assert_eq!(merged.min(), 5);
        assert!(close(merged.max() as f64, 7_000_000.0, 0.001));
        // Garbage in the pairs is ignored rather than panicking.
        add_pairs(&mut merged, &json!([["x", 1], [3]]));
        assert_eq!(merged.len(), 6);
        assert_eq!(summary(&new_hist())["count"], 0);
    }
}
