//! `loopback`: what one 64-byte round trip over loopback TCP costs this machine, no gateway.
//!
//! Prints one JSON line and a sentence. The echoing side's CPU per round trip (one read and
//! one write) is the machine's price of taking in a message and sending one out; a gateway
//! makes two such exchanges per message (websocket and API), see `ws2http_bench::loopback`.

use argh::FromArgs;
use ws2http_bench::{loopback, usage_error};

/// Measure the CPU cost of a loopback TCP round trip on this machine.
#[derive(FromArgs)]
struct Args {
    /// round trips to make (default 100000)
    #[argh(option, default = "100_000")]
    round_trips: u32,
}

fn main() {
    let args: Args = argh::from_env();
    if args.round_trips == 0 {
        usage_error("loopback", "--round-trips must be at least 1");
    }
    match loopback::measure(args.round_trips) {
        Ok(f) => {
            println!("{}", f.to_json());
            eprintln!(
                "loopback TCP, 64 bytes each way: {:.1} µs per round trip; the echoing side spent \
                 {:.2} µs of CPU ({:.2} in the kernel) per read+write pair; two such pairs, as \
                 a gateway makes per message, waiting for each read: {:.1} µs",
                f.wall_us,
                f.echo_cpu_us,
                f.echo_kernel_us,
                2.0 * f.echo_cpu_us
            );
        }
        Err(e) => {
            eprintln!("loopback: measurement failed: {e}");
            std::process::exit(1);
        }
    }
}
