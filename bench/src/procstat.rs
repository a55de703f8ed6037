//! Reading another process's resident memory and CPU time from `/proc`, and its CPU time to the
//! nanosecond from its CPU-time clock.

use std::fs;

use serde_json::{json, Value};

/// One sample of a process's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Resident set size in KiB (`VmRSS` of `/proc/PID/status`).
    pub rss_kib: u64,
    /// The anonymous part of it (heap, stacks; `RssAnon`), KiB; 0 when the kernel omits it.
    pub rss_anon_kib: u64,
    /// The file-backed part of it (the binary's and libraries' pages; `RssFile`), KiB.
    pub rss_file_kib: u64,
    /// User plus system CPU time in microseconds (`utime + stime` of `/proc/PID/stat`).
    pub cpu_us: u64,
    /// The part of it spent in the kernel on the process's behalf (`stime`), microseconds.
    pub sys_us: u64,
    /// User plus system CPU time in nanoseconds from the process's CPU-time clock
    /// ([`process_cpu_ns`]); `None` when the clock could not be read. `cpu_us` and `sys_us`
    /// come in clock ticks (10 ms here), too coarse for a total over a few hundred ms: totals
    /// use this one when both samples have it ([`Sample::cpu_us_since`]).
    pub cpu_ns: Option<u64>,
    /// Open file descriptors (entries of `/proc/PID/fd`); `None` when not counted (see
    /// [`sample_cpu_and_memory`]) or unreadable.
    pub fds: Option<u64>,
}

impl Sample {
    /// The sample as a JSON object.
    pub fn to_json(self) -> Value {
        json!({
            "rss_kib": self.rss_kib,
            "rss_anon_kib": self.rss_anon_kib,
            "rss_file_kib": self.rss_file_kib,
            "cpu_us": self.cpu_us,
            "sys_us": self.sys_us,
            "cpu_ns": self.cpu_ns,
            "fds": self.fds,
        })
    }

    /// The CPU time the process used from `earlier` to this sample, µs: from the CPU-time clock
    /// when both samples read it (nanoseconds), else from `utime + stime` (clock ticks).
    pub fn cpu_us_since(&self, earlier: &Sample) -> f64 {
        match (self.cpu_ns, earlier.cpu_ns) {
            (Some(now), Some(then)) => now.saturating_sub(then) as f64 / 1000.0,
            _ => self.cpu_us.saturating_sub(earlier.cpu_us) as f64,
        }
    }

    /// Whether [`Sample::cpu_us_since`] from `earlier` reads the CPU-time clock (true) or clock
    /// ticks (false).
    pub fn cpu_clock_since(&self, earlier: &Sample) -> bool {
        self.cpu_ns.is_some() && earlier.cpu_ns.is_some()
    }
}

/// The CPU time (user plus system, all threads) process `pid` has used so far, in nanoseconds,
/// from its CPU-time clock (`clock_getcpuclockid` + `clock_gettime`): the scheduler's own
/// accounting, where `/proc/PID/stat` rounds to clock ticks. `None` when the process is gone or
/// its clock cannot be read, and for pids no process can have: 0 (which would mean this
/// process) and 2^28 or more (whose clock id wraps, as `(!pid << 3) | 2`, onto another's).
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&pid| pid > 0 && pid < 1 << 28)?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes one clockid_t through the pointer it is given.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    clock_ns(clock)
}

/// The time on `clock` in nanoseconds; `None` if it cannot be read.
fn clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer it is given.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return None;
    }
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u64::try_from(now.tv_nsec).ok()?;
    Some(secs * 1_000_000_000 + nanos)
}

/// Clock ticks per second used by `/proc/PID/stat`.
fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Parses `VmRSS` (KiB) out of the text of `/proc/PID/status`.
pub fn parse_vmrss_kib(status: &str) -> Option<u64> {
    parse_status_kib(status, "VmRSS")
}

/// Parses the KiB figure of `field` (e.g. `RssAnon`) out of the text of `/proc/PID/status`.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Parses `(utime, stime)` (clock ticks: CPU time in user space and in the kernel) out of the
/// text of `/proc/PID/stat`.
pub fn parse_user_system_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')' come field 3 (state) onwards: utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// Samples process `pid`, its open descriptors counted; `None` when it does not exist or cannot
/// be read. Counting lists `/proc/PID/fd`, which costs about 10-20 ms of CPU for a gateway holding
/// 15,000 sockets: take it at a scenario's few fixed points, not on a timeline.
pub fn sample(pid: u32) -> Option<Sample> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64);
    Some(Sample {
        fds,
        ..sample_cpu_and_memory(pid)?
    })
}

/// Samples process `pid`'s memory and CPU time only (two small reads of `/proc` and its CPU-time
/// clock), cheap enough to take every 250 ms beside a loaded gateway; `fds` is `None`.
pub fn sample_cpu_and_memory(pid: u32) -> Option<Sample> {
    let cpu_ns = process_cpu_ns(pid);
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (user, system) = parse_user_system_ticks(&stat)?;
    let us = |ticks: u64| ticks * 1_000_000 / ticks_per_sec();
    Some(Sample {
        rss_kib: parse_vmrss_kib(&status)?,
        rss_anon_kib: parse_status_kib(&status, "RssAnon").unwrap_or(0),
        rss_file_kib: parse_status_kib(&status, "RssFile").unwrap_or(0),
        cpu_us: us(user + system),
        sys_us: us(system),
        cpu_ns,
        fds: None,
    })
}

/// The whole machine's CPU time so far, all cores together, from the `cpu` line of
/// `/proc/stat`: (busy, idle) in microseconds, idle counting `idle` and `iowait`.
pub fn parse_machine_cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    if ticks.len() < 8 {
        return None;
    }
    let idle = ticks[3] + ticks[4];
    let busy = ticks[..8].iter().sum::<u64>() - idle;
    let us = |t: u64| t * 1_000_000 / ticks_per_sec();
    Some((us(busy), us(idle)))
}

/// [`parse_machine_cpu`] of this machine now.
pub fn machine_cpu() -> Option<(u64, u64)> {
    parse_machine_cpu(&fs::read_to_string("/proc/stat").ok()?)
}

/// Machine-wide TCP counters that explain slow handshakes: `ListenOverflows` and
/// `ListenDrops` (a listener's accept queue was full) and `TCPSynRetrans` (SYNs sent again, 1 s
/// later the first time), from the `TcpExt` lines of `/proc/net/netstat`.
pub const TCP_COUNTERS: [&str; 3] = ["ListenOverflows", "ListenDrops", "TCPSynRetrans"];

/// Parses the [`TCP_COUNTERS`] out of the text of `/proc/net/netstat` (header line, value line).
pub fn parse_tcp_counters(netstat: &str) -> Vec<(&'static str, u64)> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    let pairs: Vec<(&str, &str)> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .collect();
    TCP_COUNTERS
        .iter()
        .filter_map(|&k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .and_then(|(_, v)| v.parse().ok())
                .map(|v| (k, v))
        })
        .collect()
}

/// The [`TCP_COUNTERS`] of this machine now, as a JSON object (empty when unreadable).
pub fn tcp_counters() -> Value {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let m: serde_json::Map<String, Value> = parse_tcp_counters(&text)
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    Value::Object(m)
}

/// `after − before` for each counter present in both.
pub fn counters_delta(before: &Value, after: &Value) -> Value {
    let mut m = serde_json::Map::new();
    for k in TCP_COUNTERS {
        if let (Some(a), Some(b)) = (before[k].as_u64(), after[k].as_u64()) {
            m.insert(k.to_string(), json!(b.saturating_sub(a)));
        }
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat_lines() {
        let status = "Name:\tws2http\nVmPeak:\t  9000 kB\nVmRSS:\t    6123 kB\nRssAnon:\t    1100 kB\nRssAnonX:\t    1 kB\nRssFile:\t    5023 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kib(status), Some(6123));
        assert_eq!(parse_status_kib(status, "RssAnon"), Some(1100));
        assert_eq!(parse_status_kib(status, "RssFile"), Some(5023));
        assert_eq!(parse_status_kib(status, "RssShmem"), None);
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_user_system_ticks(stat), Some((250, 75)));
        assert_eq!(parse_user_system_ticks("garbage"), None);
    }

    #[test]
    fn picks_listen_overflow_and_syn_retransmit_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPSynRetrans\n\
                    TcpExt: 1 22 23 40\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(
            parse_tcp_counters(text),
            vec![
                ("ListenOverflows", 22),
                ("ListenDrops", 23),
                ("TCPSynRetrans", 40)
            ]
        );
        let d = counters_delta(
            &json!({"ListenOverflows": 20, "TCPSynRetrans": 1}),
            &json!({"ListenOverflows": 25, "TCPSynRetrans": 4, "ListenDrops": 9}),
        );
        assert_eq!(d, json!({"ListenOverflows": 5, "TCPSynRetrans": 3}));
        assert!(tcp_counters().get("ListenOverflows").is_some());
    }

    #[test]
    fn reads_the_machine_cpu_line() {
        let stat = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\nintr 1 2\n";
        let tick = 1_000_000 / ticks_per_sec();
        assert_eq!(parse_machine_cpu(stat), Some((160 * tick, 820 * tick)));
        assert_eq!(parse_machine_cpu("cpu  1 2 3\n"), None);
        assert!(machine_cpu().is_some_and(|(busy, idle)| busy + idle > 0));
    }

    #[test]
    fn samples_our_own_process() {
        let s = sample(std::process::id()).expect("own process readable");
        assert!(s.rss_kib > 0);
        assert!(s.fds.is_some_and(|n| n > 0));
    }

    #[test]
    fn the_cpu_clock_sees_a_few_milliseconds_that_clock_ticks_round_away() {
        let pid = std::process::id();
        let before = process_cpu_ns(pid).expect("own CPU clock readable");
        // 3 ms of this thread's CPU, however long a loaded machine takes to give it: less
        // than one 10-ms clock tick.
        let thread_cpu_ns =
            || clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).expect("this thread's CPU clock");
        let (spin_from, wall) = (thread_cpu_ns(), std::time::Instant::now());
        let mut x = 0u64;
        while thread_cpu_ns() - spin_from < 3_000_000 {
            assert!(
                wall.elapsed() < std::time::Duration::from_secs(10),
                "no CPU in 10 s"
            );
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = process_cpu_ns(pid).expect("own CPU clock readable") - before;
        assert!(
            (3_000_000..500_000_000).contains(&used),
            "{used} ns for 3 ms of this thread's spinning"
        );
        assert_eq!(process_cpu_ns(0), None, "pid 0 is not a process to sample");
        // i32::MAX's clock id would wrap onto this process's own.
        assert_eq!(process_cpu_ns(i32::MAX as u32), None, "not a pid");
        let gone = (1..4_194_304u32)
            .rev()
            .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
            .expect("a free pid");
        assert_eq!(process_cpu_ns(gone), None, "no such process");
        assert!(sample(pid).is_some_and(|s| s.cpu_ns.is_some()));
        // Another process's clock reads as well (the gateway is never this process).
        let mut other = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep starts");
        let read = process_cpu_ns(other.id());
        let _ = other.kill();
        let _ = other.wait();
        assert!(read.is_some(), "another process's CPU clock");
    }

    #[test]
    fn cpu_totals_use_the_clock_when_both_samples_read_it_and_ticks_otherwise() {
        let at = |cpu_us, cpu_ns| Sample {
            cpu_us,
            cpu_ns,
            ..Default::default()
        };
        let (before, after) = (at(10_000, Some(12_345_000)), at(10_000, Some(15_845_500)));
        assert_eq!(after.cpu_us_since(&before), 3_500.5);
        assert!(after.cpu_clock_since(&before));
        // The clock missing in either sample (process gone, no permission): the ticks.
        let (before, after) = (at(10_000, Some(12_345_000)), at(20_000, None));
        assert_eq!(after.cpu_us_since(&before), 10_000.0);
        assert!(!after.cpu_clock_since(&before));
        assert_eq!(at(10_000, None).cpu_us_since(&at(20_000, None)), 0.0);
        // Serialized beside the tick-based figures, whose names do not change.
        let json = after.to_json();
        assert_eq!(json["cpu_us"], 20_000);
        assert!(json["cpu_ns"].is_null());
    }

    #[test]
    fn a_cpu_and_memory_sample_does_not_count_descriptors() {
        let s = sample_cpu_and_memory(std::process::id()).expect("own process readable");
        assert!(s.rss_kib > 0 && s.cpu_us >= s.sys_us);
        assert_eq!(s.fds, None);
    }
}
