//! Loopback ports for servers the tests start as child processes (the gateway, PHP, HAProxy,
//! nginx), which must be told their port before they bind it.
//!
//! A port from `bind(127.0.0.1:0)` comes from the kernel's ephemeral range, the same range
//! every outgoing connection takes its source port from: between the test reading it and the
//! child binding it, another test's client socket could take it, and the child would fail with
//! `Address already in use` (it happened in CI). Ports here come from below that range, where
//! only explicit binds land, starting at a point that differs per process and per call.
#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lowest port handed out; the range ends just below the ephemeral range.
pub const FIRST_PORT: u32 = 10_000;

/// Ports browsers refuse to connect to (Chromium's restricted list) inside the range used here.
const BROWSER_BLOCKED: [u16; 1] = [10_080];

/// Calls so far in this process, so that consecutive calls try different ports.
static CALLS: AtomicU32 = AtomicU32::new(0);

/// The kernel's lowest ephemeral port (`/proc/sys/net/ipv4/ip_local_port_range`), if readable.
pub fn ephemeral_start() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A port on 127.0.0.1 that was free a moment ago and that no outgoing connection will take as
/// its source port; falls back to the kernel's choice if the ephemeral range starts too low.
pub fn free_port() -> u16 {
    let end = ephemeral_start().unwrap_or(32_768).min(65_536);
    if end <= FIRST_PORT + 1_000 {
        return kernel_choice();
    }
    let span = end - FIRST_PORT;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos);
    for attempt in 0..span {
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        let offset = seed
            .wrapping_add(call.wrapping_mul(7_919))
            .wrapping_add(attempt)
            % span;
        let port = (FIRST_PORT + offset) as u16;
        if !BROWSER_BLOCKED.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    kernel_choice()
}

fn kernel_choice() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
