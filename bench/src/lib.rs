//! Shared pieces of the ws2http benchmark tools.
//!
//! The binaries (`mock-api`, `load`, `push`, `scenarios`) agree on one small wire format so that
//! every reply can be checked against the request it answers:
//!
//! * a request message sent by `load` starts with `c<conn>:<seq>;` and is padded to the payload
//!   size; `mock-api` echoes the POST body, so the reply carries the same prefix, and `load`
//!   checks every byte of it against what it sent;
//! * a pushed message sent by `push` through the control API is `push:<ns since the epoch>:<i>`
//!   (`i` the index of the client id it was posted to) and is recognised by `load` as a
//!   delivery, whose latency is measured on arrival (on another client's socket, or not newer
//!   than the newest push its connection had, an error).
//!
//! The modules here hold that format ([`proto`]), the latency histograms ([`stats`]), the
//! reading of another process's RSS and CPU time ([`procstat`]), the source-address-spreading
//! connect ([`net`]), the machine's own cost of a loopback round trip ([`loopback`]) and the
//! gateway's API-pool gauges over a run ([`gauges`]).

pub mod gauges;
pub mod loopback;
pub mod net;
pub mod procstat;
pub mod proto;
pub mod stats;

/// Bad input to one of the tools: one line naming the tool and the flag, exit status 2.
pub fn usage_error(tool: &str, message: &str) -> ! {
    eprintln!("{tool}: {message}");
    std::process::exit(2)
}
