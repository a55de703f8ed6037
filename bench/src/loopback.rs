//! The machine's own price of moving a message over loopback TCP, with no gateway involved.
//!
//! One thread writes 64 bytes to a loopback socket and reads them back; the other end, a
//! second thread, reads them and writes them back. The echoing thread's CPU time per round
//! trip is one blocking read plus one write: what a process spends to take in a message and
//! send one out when it waits for each. A gateway does that twice per message (the websocket
//! side and the API side); under load it waits less often, so it can spend somewhat less, but
//! the figure shows what this machine's kernel charges. The scenario runner records it with
//! every run, so runs made on a faster or slower day can be told apart.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Instant;

/// Size of the message sent each way.
const MESSAGE_BYTES: usize = 64;

/// What one loopback round trip cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoopbackCost {
    /// Round trips measured.
    pub round_trips: u32,
    /// Wall-clock time per round trip, µs.
    pub wall_us: f64,
    /// CPU time (user + kernel) of the echoing thread per round trip, µs.
    pub echo_cpu_us: f64,
    /// The kernel's part of `echo_cpu_us`, µs.
    pub echo_kernel_us: f64,
}

impl LoopbackCost {
    /// The figures as the JSON object `loopback` prints and the scenario runner records.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "round_trips": self.round_trips,
            "wall_us": self.wall_us,
            "echo_cpu_us": self.echo_cpu_us,
            "echo_kernel_us": self.echo_kernel_us,
        })
    }
}

/// User and kernel CPU time of the calling thread, µs.
fn thread_cpu_us() -> io::Result<(f64, f64)> {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    Ok((us(usage.ru_utime), us(usage.ru_stime)))
}

/// Measures `round_trips` 64-byte round trips between two threads over loopback TCP.
pub fn measure(round_trips: u32) -> io::Result<LoopbackCost> {
    let round_trips = round_trips.max(1);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> io::Result<(f64, f64)> {
        let (mut socket, _) = listener.accept()?;
        socket.set_nodelay(true)?;
        let mut buf = [0u8; MESSAGE_BYTES];
        let (user0, kernel0) = thread_cpu_us()?;
        for _ in 0..round_trips {
            socket.read_exact(&mut buf)?;
            socket.write_all(&buf)?;
        }
        let (user1, kernel1) = thread_cpu_us()?;
        Ok((user1 - user0, kernel1 - kernel0))
    });
    let mut client = TcpStream::connect(addr)?;
    client.set_nodelay(true)?;
    let mut buf = [7u8; MESSAGE_BYTES];
    let started = Instant::now();
    for _ in 0..round_trips {
        client.write_all(&buf)?;
        client.read_exact(&mut buf)?;
    }
    let wall = started.elapsed();
    let (user, kernel) = echo
        .join()
        .map_err(|_| io::Error::other("the echo thread panicked"))??;
    let n = f64::from(round_trips);
    Ok(LoopbackCost {
        round_trips,
        wall_us: wall.as_secs_f64() * 1e6 / n,
        echo_cpu_us: (user + kernel) / n,
        echo_kernel_us: kernel / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_costs_cpu_and_the_kernel_part_is_within_it() {
        let cost = measure(2_000).unwrap();
        assert_eq!(cost.round_trips, 2_000);
        assert!(cost.wall_us > 0.0, "{cost:?}");
        // Clock ticks are coarse: over 2,000 blocking reads and writes some time shows.
        assert!(cost.echo_cpu_us > 0.0, "{cost:?}");
        assert!(cost.echo_kernel_us <= cost.echo_cpu_us, "{cost:?}");
    }
}
