//! Client sockets bound to a chosen loopback source address before connecting.
//!
//! One source address offers about 28k ephemeral ports towards one destination; spreading the
//! clients over 127.0.0.x lifts that limit. `IP_BIND_ADDRESS_NO_PORT` lets the kernel pick the
//! port at connect time (per 4-tuple) instead of at bind time.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

/// The source address for client `idx` when spreading over `spread` addresses 127.0.0.1..=N.
/// `spread == 0` means "let the kernel choose" (`None`).
pub fn source_addr(idx: u64, spread: u32) -> Option<Ipv4Addr> {
    if spread == 0 {
        return None;
    }
    let n = (idx % u64::from(spread.min(254))) as u32 + 1;
    Some(Ipv4Addr::from(0x7f00_0000u32 | n))
}

/// Connects to `dst`, first binding to `src` (port chosen at connect time) when given.
pub async fn connect_from(src: Option<Ipv4Addr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let (Some(ip), SocketAddr::V4(_)) = (src, dst) {
        let one: libc::c_int = 1;
        // SAFETY: valid fd, option value points to a c_int of the stated size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))?;
    }
    sock.set_nodelay(true)?;
    sock.connect(dst).await
}

/// Raises this process's soft open-file limit to its hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_cycle_over_the_spread() {
        assert_eq!(source_addr(0, 0), None);
        assert_eq!(source_addr(0, 4), Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(source_addr(3, 4), Some(Ipv4Addr::new(127, 0, 0, 4)));
        assert_eq!(source_addr(4, 4), Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(source_addr(300, 1000), Some(Ipv4Addr::new(127, 0, 0, 47)));
    }

    #[tokio::test]
    async fn connects_from_a_chosen_loopback_address() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = l.local_addr().unwrap();
        let c = connect_from(Some(Ipv4Addr::new(127, 0, 0, 3)), dst)
            .await
            .unwrap();
        let (_s, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(c.peer_addr().unwrap(), dst);
    }
}
