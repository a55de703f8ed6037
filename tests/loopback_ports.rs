//! The ports the process-starting tests give their servers (tests/ports): free, and outside the
//! kernel's ephemeral range.

mod ports;

use std::collections::HashSet;
use std::net::TcpListener;

use ports::{ephemeral_start, free_port, FIRST_PORT};

#[test]
fn ports_come_from_below_the_ephemeral_range_and_can_be_bound() {
    let end = ephemeral_start().unwrap_or(32_768);
    assert!(
        end > FIRST_PORT + 1_000,
        "this machine's ephemeral range starts at {end}"
    );
    for _ in 0..20 {
        let port = free_port();
        assert!((FIRST_PORT..end).contains(&u32::from(port)), "{port}");
        TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }
}

#[test]
fn consecutive_ports_differ() {
    let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
    assert!(ports.len() >= 45, "{ports:?}");
}
