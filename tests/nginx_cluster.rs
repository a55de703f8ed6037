//! nginx (`nginx/nginx.conf` with its addresses rewritten to free ports) in front of
//! three real `ws2http` nodes: pushes through the internal entry point reach the node
//! that holds each client's socket, and when a node dies only its clients move.
//!
//! Needs `nginx` on the PATH (Debian package `nginx`; `make test` installs it). The test
//! fails, not skips, without it.

mod cluster;

use std::process::Command;

use cluster::{run_failover_scenario, run_spelling_scenario, Failure, ProxyKind, ScratchDir};

#[test]
fn shipped_nginx_conf_passes_nginx_test() {
    let conf = cluster::repo_root().join("nginx/nginx.conf");
    let prefix = ScratchDir::new("nginx-t");
    let out = Command::new(cluster::tool("nginx"))
        .arg("-t")
        .arg("-p")
        .arg(format!("{}/", prefix.0.display()))
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg("stderr")
        .output()
        .expect("run nginx -t (is nginx installed? `make test` installs it)");
    assert!(
        out.status.success(),
        "nginx -t rejected {}:\n{}{}",
        conf.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_routes_every_push_to_its_socket_and_moves_only_a_dead_nodes_clients() {
    run_failover_scenario(ProxyKind::Nginx, Failure::Crash).await;
}

/// A client that opens `/a!1` gets the pushes the API sends to `/a%211`: nginx hashes
/// the percent-decoded ClientId (`$uri`), as the gateway reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_sends_a_push_to_its_socket_whichever_way_the_client_id_is_encoded() {
    run_spelling_scenario(ProxyKind::Nginx).await;
}
