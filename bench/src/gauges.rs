//! The gateway's API-pool gauges over a scenario, read from its control listener's `/metrics`
//! every few hundred milliseconds, so that a run shows when requests piled up at the API and how
//! many connections the pool opened for them (S4's failures start there).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The gauges read from one `/metrics` answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// `upstream_connections_open`: API connections open (idle, busy or being opened).
    pub connections_open: u64,
    /// `upstream_requests_in_flight`: requests holding an API connection.
    pub requests_in_flight: u64,
    /// `upstream_requests_waiting`: requests waiting for a free API connection.
    pub requests_waiting: u64,
    /// `upstream_disconnects_waiting`: DELETEs of departed clients not started yet.
    pub disconnects_waiting: u64,
    /// `upstream_concurrency_limit`: API requests allowed at once now (the adaptive limit);
    /// 0 from a gateway that predates it.
    pub concurrency_limit: u64,
}

impl Gauges {
    /// Reads the gauges from a Prometheus text exposition; `None` unless the first four are
    /// there (the concurrency limit is read as 0 when missing).
    pub fn parse(text: &str) -> Option<Gauges> {
        let value = |name: &str| {
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .find_map(|line| {
                    let (key, number) = line.rsplit_once(' ')?;
                    (key == name).then(|| number.parse::<f64>().ok())?
                })
                .map(|v| v.max(0.0) as u64)
        };
        Some(Gauges {
            connections_open: value("upstream_connections_open")?,
            requests_in_flight: value("upstream_requests_in_flight")?,
            requests_waiting: value("upstream_requests_waiting")?,
            disconnects_waiting: value("upstream_disconnects_waiting")?,
            concurrency_limit: value("upstream_concurrency_limit").unwrap_or(0),
        })
    }

    fn max(self, other: Gauges) -> Gauges {
        Gauges {
            connections_open: self.connections_open.max(other.connections_open),
            requests_in_flight: self.requests_in_flight.max(other.requests_in_flight),
            requests_waiting: self.requests_waiting.max(other.requests_waiting),
            disconnects_waiting: self.disconnects_waiting.max(other.disconnects_waiting),
            concurrency_limit: self.concurrency_limit.max(other.concurrency_limit),
        }
    }
}

/// GETs `/metrics` from the control listener on 127.0.0.1:`port`.
fn fetch(port: u16) -> Option<Gauges> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Gauges::parse(answer.split_once("\r\n\r\n")?.1)
}

/// What the polling thread hands back: (seconds since the start, gauges) per read, and how many
/// reads failed.
type Readings = (Vec<(f64, Gauges)>, u64);

/// A thread reading the gauges every `period` until [`Poller::finish`] (or until dropped).
pub struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Readings>>,
    period: Duration,
}

impl Poller {
    /// Starts reading the gateway whose control listener is on 127.0.0.1:`port`.
    pub fn start(port: u16, period: Duration) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut failed = 0;
            while !stop_flag.load(Ordering::Relaxed) {
                let due = Instant::now() + period;
                match fetch(port) {
                    Some(gauges) => samples.push((started.elapsed().as_secs_f64(), gauges)),
                    None => failed += 1,
                }
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            (samples, failed)
        });
        Poller {
            stop,
            thread: Some(thread),
            period,
        }
    }

    /// Stops reading; returns the samples as `[seconds, open, in flight, waiting, disconnects
    /// waiting, concurrency limit]` rows, their maxima and how many reads failed.
    pub fn finish(mut self) -> Value {
        self.stop.store(true, Ordering::Relaxed);
        let (samples, failed) = self
            .thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default();
        summary(&samples, failed, self.period)
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The JSON of a poll: the rows, the maxima, the failed reads.
fn summary(samples: &[(f64, Gauges)], failed: u64, period: Duration) -> Value {
    let max = samples
        .iter()
        .fold(Gauges::default(), |acc, (_, g)| acc.max(*g));
    let rows: Vec<Value> = samples
        .iter()
        .map(|(t, g)| {
            json!([
                (t * 100.0).round() / 100.0,
                g.connections_open,
                g.requests_in_flight,
                g.requests_waiting,
                g.disconnects_waiting,
                g.concurrency_limit
            ])
        })
        .collect();
    json!({
        "period_ms": period.as_millis() as u64,
        "columns": ["s", "upstream_connections_open", "upstream_requests_in_flight",
                    "upstream_requests_waiting", "upstream_disconnects_waiting",
                    "upstream_concurrency_limit"],
        "samples": rows,
        "failed_reads": failed,
        "max": {
            "upstream_connections_open": max.connections_open,
            "upstream_requests_in_flight": max.requests_in_flight,
            "upstream_requests_waiting": max.requests_waiting,
            "upstream_disconnects_waiting": max.disconnects_waiting,
            "upstream_concurrency_limit": max.concurrency_limit,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = "# HELP upstream_connections_open API connections open\n\
        # TYPE upstream_connections_open gauge\n\
        upstream_connections_open 3\n\
        upstream_requests_in_flight 2\n\
        upstream_requests_waiting 1\n\
        upstream_disconnects_waiting 4\n\
        upstream_concurrency_limit 96\n\
        upstream_requests_waiting_total 99\n";

    #[test]
    fn the_gauges_are_read_by_exact_name() {
        assert_eq!(
            Gauges::parse(EXPOSITION),
            Some(Gauges {
                connections_open: 3,
                requests_in_flight: 2,
                requests_waiting: 1,
                disconnects_waiting: 4,
                concurrency_limit: 96,
            })
        );
    }

    #[test]
    fn a_gateway_without_the_concurrency_limit_gauge_reads_as_zero() {
        let older = EXPOSITION.replace("upstream_concurrency_limit 96\n", "");
        assert_eq!(
            Gauges::parse(&older).map(|g| (g.connections_open, g.concurrency_limit)),
            Some((3, 0))
        );
    }

    #[test]
    fn an_exposition_without_the_gauges_gives_none() {
        assert_eq!(Gauges::parse("connections_active 5\n"), None);
    }

    #[test]
    fn the_summary_keeps_each_gauges_maximum_over_the_samples() {
        let g = |open, waiting, limit| Gauges {
            connections_open: open,
            requests_waiting: waiting,
            concurrency_limit: limit,
            ..Gauges::default()
        };
        let json = summary(
            &[
                (0.25, g(200, 0, 64)),
                (0.5, g(1024, 0, 170)),
                (0.75, g(900, 2143, 90)),
            ],
            1,
            Duration::from_millis(250),
        );
        assert_eq!(json["max"]["upstream_connections_open"], 1024);
        assert_eq!(json["max"]["upstream_requests_waiting"], 2143);
        assert_eq!(json["max"]["upstream_concurrency_limit"], 170);
        assert_eq!(json["samples"][1][5], 170);
        assert_eq!(json["samples"].as_array().map(Vec::len), Some(3));
        assert_eq!(json["failed_reads"], 1);
    }

    #[test]
    fn a_poller_reads_a_metrics_endpoint_until_finished() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for stream in listener.incoming().flatten().take(3) {
                let mut stream = stream;
                let mut request = [0u8; 512];
                let _ = stream.read(&mut request);
                let body = EXPOSITION;
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let poller = Poller::start(port, Duration::from_millis(20));
        // Three reads served, then the listener is gone: every read after fails. Some time
        // for the third answer to be parsed and a later read to fail (15 periods).
        server.join().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let json = poller.finish();
        assert_eq!(json["max"]["upstream_disconnects_waiting"], 4);
        let read = json["samples"].as_array().map_or(0, Vec::len);
        assert_eq!(read, 3, "{json}");
        assert!(json["failed_reads"].as_u64().unwrap_or(0) >= 1, "{json}");
    }
}
