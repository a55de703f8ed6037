//! Process-wide counters and the upstream latency histogram, rendered as Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the upstream latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How busy the API client is at one moment, for the `upstream_*` gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamLoad {
    /// API connections open (idle, busy or being opened).
    pub connections_open: usize,
    /// Requests holding one of the API slots (sent, or about to be).
    pub requests_in_flight: usize,
    /// API slots now: requests the API may have at once, adapted to its pace.
    pub concurrency_limit: usize,
    /// Requests waiting for a slot; beyond `--upstream-max-waiting` they fail with 1013.
    pub requests_waiting: usize,
}

/// The DELETEs of ended connections at one moment, for the `upstream_disconnects_*` gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DisconnectLoad {
    /// Queued, not started yet.
    pub waiting: usize,
    /// Started, not done yet: being sent, or waiting to be tried again.
    pub in_flight: usize,
}

/// Why a websocket ended, as counted in `connections_closed_by_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame.
    Client,
    /// The TCP connection dropped without a close frame.
    Eof,
    /// The API asked for it through the control listener.
    Control,
    /// A newer connection took the same ClientId.
    Replaced,
    /// The gateway is shutting down.
    Shutdown,
    /// No frame within the ping timeout.
    PingTimeout,
    /// No data message within the idle timeout.
    IdleTimeout,
    /// The client did not read its messages.
    SlowConsumer,
    /// A message over the size limit.
    TooBig,
    /// A protocol violation (bad frame, invalid UTF-8 ...).
    ProtocolError,
    /// The API could not be reached for a message.
    UpstreamFailure,
}

impl CloseReason {
    const ALL: [CloseReason; 11] = [
        CloseReason::Client,
        CloseReason::Eof,
        CloseReason::Control,
        CloseReason::Replaced,
        CloseReason::Shutdown,
        CloseReason::PingTimeout,
        CloseReason::IdleTimeout,
        CloseReason::SlowConsumer,
        CloseReason::TooBig,
        CloseReason::ProtocolError,
        CloseReason::UpstreamFailure,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Eof => "eof",
            CloseReason::Control => "control",
            CloseReason::Replaced => "replaced",
            CloseReason::Shutdown => "shutdown",
            CloseReason::PingTimeout => "ping_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::TooBig => "too_big",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::UpstreamFailure => "upstream_failure",
        }
    }
}

/// Why a handshake did not become a websocket, as counted in `handshakes_refused`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// Malformed request, bad ClientId, bad websocket key or version.
    BadRequest,
    /// Origin not in `--allowed-origins`.
    Origin,
    /// Connection or handshake cap reached, or shutting down.
    Overloaded,
    /// The API answered something other than `ok`.
    Api,
    /// The API failed (5xx, unreachable, timeout).
    ApiFailure,
    /// The request (or TLS handshake) did not arrive within `--handshake-timeout`.
    Timeout,
}

impl RefusalReason {
    const ALL: [RefusalReason; 6] = [
        RefusalReason::BadRequest,
        RefusalReason::Origin,
        RefusalReason::Overloaded,
        RefusalReason::Api,
        RefusalReason::ApiFailure,
        RefusalReason::Timeout,
    ];

    fn label(self) -> &'static str {
        match self {
            RefusalReason::BadRequest => "bad_request",
            RefusalReason::Origin => "origin",
            RefusalReason::Overloaded => "overloaded",
            RefusalReason::Api => "api",
            RefusalReason::ApiFailure => "api_failure",
            RefusalReason::Timeout => "timeout",
        }
    }
}

/// All counters of one gateway.
#[derive(Default)]
pub struct Metrics {
    /// Websockets accepted: approved by the API and registered, as their `101` goes out (one
    /// whose upgrade then fails, its client gone, is counted closed with reason `eof`).
    pub connections_opened: AtomicU64,
    /// Websockets ended, for any reason.
    pub connections_closed: AtomicU64,
    closed_by_reason: [AtomicU64; CloseReason::ALL.len()],
    refused_by_reason: [AtomicU64; RefusalReason::ALL.len()],
    /// API requests started (GET, POST, DELETE).
    pub requests_started: AtomicU64,
    /// API requests that failed: transport error, timeout, or a non-2xx answer.
    pub requests_failed: AtomicU64,
    /// API requests answered 2xx.
    pub requests_succeeded: AtomicU64,
    /// Data messages received from clients.
    pub messages_received: AtomicU64,
    /// Data messages sent to clients (replies and pushes).
    pub messages_sent: AtomicU64,
    /// Pushes queued on a socket.
    pub pushes_accepted: AtomicU64,
    /// Pushes refused (unknown client, full queue, too large).
    pub pushes_refused: AtomicU64,
    /// Pushes accepted but never written: the socket was gone, or stopped taking writes,
    /// before their turn.
    pub pushes_undelivered: AtomicU64,
    /// DELETEs that reached the API.
    pub disconnects_notified: AtomicU64,
    /// DELETEs that could not be delivered.
    pub disconnects_failed: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Counts a websocket's end.
    pub fn connection_closed(&self, reason: CloseReason) {
        // Release: a scrape that reads this count (Acquire) sees the opening counted too.
        self.connections_closed.fetch_add(1, Ordering::Release);
        let index = CloseReason::ALL.iter().position(|r| *r == reason);
        if let Some(i) = index {
            bump(&self.closed_by_reason[i]);
        }
    }

    /// Counts a refused handshake.
    pub fn handshake_refused(&self, reason: RefusalReason) {
        let index = RefusalReason::ALL.iter().position(|r| *r == reason);
        if let Some(i) = index {
            bump(&self.refused_by_reason[i]);
        }
    }

    /// Records how long one API request took.
    pub fn observe_upstream_latency(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if seconds <= *bound {
                bump(bucket);
                break;
            }
        }
        bump(&self.latency_count);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Websockets open now.
    pub fn connections_active(&self) -> u64 {
        let opened = self.connections_opened.load(Ordering::Relaxed);
        let closed = self.connections_closed.load(Ordering::Relaxed);
        opened.saturating_sub(closed)
    }

    /// Prometheus text exposition (version 0.0.4), with the API client's `upstream` load and
    /// the DELETEs of ended connections not done yet (`disconnects`).
    pub fn render(&self, upstream: UpstreamLoad, disconnects: DisconnectLoad) -> String {
        let mut out = String::with_capacity(4096);
        // Each read once, closed before opened, so that one scrape's figures agree with each
        // other: opened - closed = active, and never fewer opened than closed.
        let closed = self.connections_closed.load(Ordering::Acquire);
        let opened = self.connections_opened.load(Ordering::Relaxed);
        // Likewise undelivered pushes before accepted ones: none is counted undelivered
        // before it is counted accepted.
        let undelivered = self.pushes_undelivered.load(Ordering::Acquire);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let plain: [(&str, &str, u64); 12] = [
            ("connections_opened", "Websockets accepted.", opened),
            ("connections_closed", "Websockets ended.", closed),
            (
                "requests_started",
                "API requests started.",
                load(&self.requests_started),
            ),
            (
                "requests_failed",
                "API requests failed (transport error, timeout or non-2xx).",
                load(&self.requests_failed),
            ),
            (
                "requests_succeeded",
                "API requests answered 2xx.",
                load(&self.requests_succeeded),
            ),
            (
                "messages_received",
                "Data messages received from clients.",
                load(&self.messages_received),
            ),
            (
                "messages_sent",
                "Data messages sent to clients.",
                load(&self.messages_sent),
            ),
            (
                "pushes_accepted",
                "Pushes queued on a socket.",
                load(&self.pushes_accepted),
            ),
            (
                "pushes_refused",
                "Pushes refused.",
                load(&self.pushes_refused),
            ),
            (
                "pushes_undelivered",
                "Pushes accepted, then not written: the socket closed or stopped taking writes first.",
                undelivered,
            ),
            (
                "disconnects_notified",
                "DELETEs delivered to the API.",
                load(&self.disconnects_notified),
            ),
            (
                "disconnects_failed",
                "DELETEs that could not be delivered.",
                load(&self.disconnects_failed),
            ),
        ];
        for (name, help, value) in plain {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP connections_active Websockets open now.\n# TYPE connections_active gauge\nconnections_active {}",
            opened.saturating_sub(closed)
        );
        let gauges = [
            (
                "upstream_connections_open",
                "API connections open (idle, busy or being opened).",
                upstream.connections_open,
            ),
            (
                "upstream_requests_in_flight",
                "API requests holding a connection slot.",
                upstream.requests_in_flight,
            ),
            (
                "upstream_concurrency_limit",
                "API requests allowed at once now (grows while the API keeps its pace).",
                upstream.concurrency_limit,
            ),
            (
                "upstream_requests_waiting",
                "API requests waiting for a connection slot.",
                upstream.requests_waiting,
            ),
            (
                "upstream_disconnects_waiting",
                "DELETEs of ended connections queued, not yet started.",
                disconnects.waiting,
            ),
            (
                "upstream_disconnects_in_flight",
                "DELETEs of ended connections started, not done yet: being sent, or waiting to be tried again.",
                disconnects.in_flight,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP connections_closed_by_reason Websockets ended, by reason.\n# TYPE connections_closed_by_reason counter"
        );
        for (reason, value) in CloseReason::ALL.iter().zip(&self.closed_by_reason) {
            let _ = writeln!(
                out,
                "connections_closed_by_reason{{reason=\"{}\"}} {}",
                reason.label(),
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP handshakes_refused Upgrade requests refused, by reason.\n# TYPE handshakes_refused counter"
        );
        for (reason, value) in RefusalReason::ALL.iter().zip(&self.refused_by_reason) {
            let _ = writeln!(
                out,
                "handshakes_refused{{reason=\"{}\"}} {}",
                reason.label(),
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP upstream_latency_seconds API request latency.\n# TYPE upstream_latency_seconds histogram"
        );
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "upstream_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        // Read after the buckets, the count can still lag one just observed (they are separate
        // counters): never show fewer in all than in the buckets below.
        let count = self.latency_count.load(Ordering::Relaxed).max(cumulative);
        let _ = writeln!(
            out,
            "upstream_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "upstream_latency_seconds_sum {sum}");
        let _ = writeln!(out, "upstream_latency_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_between_a_bucket_and_the_count_still_shows_a_cumulative_histogram() {
        let metrics = Metrics::default();
        metrics.observe_upstream_latency(Duration::from_millis(3));
        // An observation caught halfway: its bucket counted, the total not yet.
        bump(&metrics.latency_buckets[0]);
        let load = UpstreamLoad {
            connections_open: 0,
            requests_in_flight: 0,
            concurrency_limit: 1,
            requests_waiting: 0,
        };
        let text = metrics.render(load, DisconnectLoad::default());
        assert!(
            text.contains("upstream_latency_seconds_bucket{le=\"10\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("upstream_latency_seconds_bucket{le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("\nupstream_latency_seconds_count 2\n"),
            "{text}"
        );
    }

    #[test]
    fn render_lists_ws2api_counters_the_upstream_gauges_and_the_histogram() {
        let metrics = Metrics::default();
        bump(&metrics.connections_opened);
        bump(&metrics.connections_opened);
        metrics.connection_closed(CloseReason::Eof);
        metrics.observe_upstream_latency(Duration::from_micros(700));
        metrics.observe_upstream_latency(Duration::from_secs(20));
        let text = metrics.render(
            UpstreamLoad {
                connections_open: 3,
                requests_in_flight: 2,
                concurrency_limit: 64,
                requests_waiting: 1,
            },
            DisconnectLoad {
                waiting: 4,
                in_flight: 5,
            },
        );
        assert!(text.contains("\nconnections_opened 2\n"), "{text}");
        assert!(text.contains("\nconnections_closed 1\n"));
        assert!(text.contains("\nconnections_active 1\n"));
        assert!(text.contains("connections_closed_by_reason{reason=\"eof\"} 1"));
        assert!(text.contains("upstream_latency_seconds_bucket{le=\"0.0005\"} 0"));
        assert!(text.contains("upstream_latency_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("upstream_latency_seconds_bucket{le=\"10\"} 1"));
        assert!(text.contains("upstream_latency_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text
            .contains("\n# TYPE upstream_connections_open gauge\nupstream_connections_open 3\n"));
        assert!(text.contains("\nupstream_requests_in_flight 2\n"));
        assert!(text.contains("\nupstream_concurrency_limit 64\n"));
        assert!(text.contains("\nupstream_requests_waiting 1\n"));
        assert!(text.contains("\nupstream_disconnects_waiting 4\n"));
        assert!(text.contains("\nupstream_disconnects_in_flight 5\n"));
        for name in ["requests_started", "requests_failed", "requests_succeeded"] {
            assert!(text.contains(&format!("\n{name} 0\n")), "{name}");
        }
    }
}
