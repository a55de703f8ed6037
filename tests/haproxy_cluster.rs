//! HAProxy (`haproxy/haproxy.cfg`, run unchanged with its addresses from environment
//! variables) in front of three real `ws2http` nodes: pushes through the internal
//! frontend reach the node that holds each client's socket, and when a node dies only
//! its clients move.
//!
//! Needs `haproxy` on the PATH (Debian package `haproxy`; `make test` installs it). The
//! test fails, not skips, without it.

mod cluster;

use std::process::{Command, Stdio};

use cluster::{
    run_busy_node_scenario, run_draining_node_scenario, run_failover_scenario,
    run_push_burst_scenario, run_push_room_scenario, run_spelling_scenario, Failure, ProxyKind,
};

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

/// `WS2HTTP_MAXCONN` lowered (or raised) without `WS2HTTP_PUBLIC_MAXCONN`, or the other
/// way round, could let websockets take every connection HAProxy has and leave pushes
/// none; the shipped file refuses to start instead, and says why.
#[test]
fn haproxy_cfg_refuses_one_connection_limit_without_the_other() {
    let cfg = cluster::repo_root().join("haproxy/haproxy.cfg");
    for set in ["WS2HTTP_MAXCONN", "WS2HTTP_PUBLIC_MAXCONN"] {
        let out = Command::new(cluster::tool("haproxy"))
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .env_remove("WS2HTTP_MAXCONN")
            .env_remove("WS2HTTP_PUBLIC_MAXCONN")
            .env(set, "3000")
            .output()
            .expect("run haproxy -c (is haproxy installed? `make test` installs it)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && stderr.contains("set WS2HTTP_MAXCONN and WS2HTTP_PUBLIC_MAXCONN together"),
            "haproxy -c with only {set} set: {}\n{}{stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A push share that does not fit next to the public one (`WS2HTTP_PUSH_MAXCONN=5000` with
/// the defaults: 7990 + 5000 + 10 > 9000) would let websockets take every connection
/// HAProxy has and leave pushes none. HAProxy's `.if` cannot add, so `scripts/cluster.sh`
/// (`make cluster`) refuses the sum before it starts anything; the shipped file itself
/// refuses the push share set without the global limit.
#[test]
fn a_push_share_over_the_connection_limit_is_refused() {
    let root = cluster::repo_root();
    let out = Command::new(cluster::tool("haproxy"))
        .arg("-c")
        .arg("-f")
        .arg(root.join("haproxy/haproxy.cfg"))
        .env_remove("WS2HTTP_MAXCONN")
        .env_remove("WS2HTTP_PUBLIC_MAXCONN")
        .env("WS2HTTP_PUSH_MAXCONN", "5000")
        .output()
        .expect("run haproxy -c (is haproxy installed? `make test` installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("set WS2HTTP_PUSH_MAXCONN only with WS2HTTP_MAXCONN"),
        "haproxy -c with only WS2HTTP_PUSH_MAXCONN=5000 set: {}\n{}{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );

    // (total, public, push): unset takes haproxy.cfg's default. The second has all three
    // set, which haproxy.cfg cannot tell from a sum that fits.
    for (total, public, push, said) in [
        (None, None, "5000", "WS2HTTP_PUBLIC_MAXCONN (7990) + WS2HTTP_PUSH_MAXCONN (5000) + 10 must not exceed WS2HTTP_MAXCONN (9000)"),
        (Some("3000"), Some("2000"), "991", "WS2HTTP_PUBLIC_MAXCONN (2000) + WS2HTTP_PUSH_MAXCONN (991) + 10 must not exceed WS2HTTP_MAXCONN (3000)"),
    ] {
        let mut cmd = Command::new(root.join("scripts/cluster.sh"));
        cmd.env_remove("WS2HTTP_MAXCONN")
            .env_remove("WS2HTTP_PUBLIC_MAXCONN")
            .env("WS2HTTP_PUSH_MAXCONN", push)
            // Without the check the script would go on; this way it builds nothing, starts
            // no API, and gives up when no gateway comes up.
            .env("WS2HTTP_BIN", "/nonexistent/ws2http")
            .env("WS2HTTP_API_URL", "http://127.0.0.1:9/")
            .stdin(Stdio::null());
        if let Some(total) = total {
            cmd.env("WS2HTTP_MAXCONN", total);
        }
        if let Some(public) = public {
            cmd.env("WS2HTTP_PUBLIC_MAXCONN", public);
        }
        let out = cmd.output().expect("run scripts/cluster.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(said) && out.stdout.is_empty(),
            "scripts/cluster.sh with limits {total:?}/{public:?}/{push}: {}\n{}{stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
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

/// A client that opens `/a!1` gets the pushes the API sends to `/a%211`: HAProxy hashes
/// the percent-decoded ClientId, as the gateway reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_sends_a_push_to_its_socket_whichever_way_the_client_id_is_encoded() {
    run_spelling_scenario(ProxyKind::Haproxy).await;
}

/// A node whose public port is saturated with handshakes (a check sent there would time
/// out) still answers its health check on the control port; HAProxy keeps it UP instead
/// of closing all its websockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_keeps_a_node_whose_handshake_slots_are_all_taken_up() {
    run_busy_node_scenario().await;
}

/// A node that drains (SIGTERM with a message still at the API) answers its health check
/// `404`; HAProxy's `http-check disable-on-404` takes it out of balancing, so a client whose
/// ClientId hashed to it opens on another node while it finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_sends_new_clients_elsewhere_while_a_node_drains() {
    run_draining_node_scenario().await;
}

/// Websockets that fill the public entry's share of HAProxy's connections (limits set low
/// through `WS2HTTP_MAXCONN`, `WS2HTTP_PUBLIC_MAXCONN`, `WS2HTTP_PUSH_MAXCONN`) leave the
/// push entry its own: a push still goes through at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_keeps_room_for_pushes_while_websockets_fill_the_public_entry() {
    run_push_room_scenario().await;
}

/// Two bursts of 600 pushes to one node's clients, 300 at a time, each push on a connection
/// of its own (`Connection: close`, as the PHP example sends them), all answered `200`:
/// HAProxy queues what is over the node's `maxconn` and keeps no finished connection open to
/// its control port, where it would hold one of the gateway's 256 control connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_answers_every_push_of_two_bursts_on_connections_of_their_own() {
    run_push_burst_scenario().await;
}
