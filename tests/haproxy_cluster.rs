//! HAProxy (`haproxy/haproxy.cfg`, run unchanged with its addresses from environment
//! variables) in front of three real `ws2http` nodes: pushes through the internal
//! frontend reach the node that holds each client's socket, and when a node dies only
//! its clients move.
//!
//! Needs `haproxy` on the PATH (Debian package `haproxy`; `make test` installs it). The
//! test fails, not skips, without it.

mod cluster;

use std::process::Command;

use cluster::{run_failover_scenario, Failure, ProxyKind};

#[test]
fn shipped_haproxy_cfg_passes_haproxy_check() {
    let cfg = cluster::repo_root().join("haproxy/haproxy.cfg");
    let out = Command::new(cluster::tool("haproxy"))
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .expect("run haproxy -c (is haproxy installed? `make test` installs it)");
    assert!(
        out.status.success(),
        "haproxy -c rejected {}:\n{}{}",
        cfg.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_routes_every_push_to_its_socket_and_moves_only_a_dead_nodes_clients() {
    run_failover_scenario(ProxyKind::Haproxy, Failure::Crash).await;
}

/// A hung node keeps its TCP connections open; HAProxy's health check times out
/// (`timeout check`), marks it down and closes its websockets
/// (`on-marked-down shutdown-sessions`), so its clients move to the node their pushes
/// now go to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_closes_a_hung_nodes_sockets_so_its_clients_move_with_their_pushes() {
    run_failover_scenario(ProxyKind::Haproxy, Failure::Hang).await;
}
