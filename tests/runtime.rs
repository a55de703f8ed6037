//! The binary's runtime flags: `--current-thread` serves websockets and pushes on one thread,
//! and refuses to be combined with `--worker-threads`.

mod common;

use std::time::Duration;

use common::binary::Binary;
use common::*;
use futures_util::SinkExt;
use tokio_websockets::Message;

#[tokio::test]
async fn the_binary_on_the_current_thread_runtime_round_trips_and_pushes() {
    let api = MockApi::start().await;
    let binary = Binary::start_ready(&api.base(), &["--current-thread"], &[]).await;
    assert!(
        binary.stderr().contains("worker_threads=1"),
        "{}",
        binary.stderr()
    );
    let mut ws = binary.connect("/single").await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "echo:hello");
    let pushed = raw_http(binary.control, "POST", "/single", &[], b"pushed").await;
    assert_eq!(pushed.status, 200);
    assert_eq!(next_text(&mut ws).await, "pushed");
}

#[tokio::test]
async fn current_thread_with_worker_threads_exits_2_naming_both_flags() {
    let api = MockApi::start().await;
    let log = Binary::refused_at_start(
        &api.base(),
        &["--current-thread", "--worker-threads", "2"],
        &[],
    )
    .await;
    assert!(
        log.contains("--current-thread") && log.contains("--worker-threads"),
        "{log}"
    );
}

#[tokio::test]
async fn a_profile_that_cannot_be_written_at_shutdown_gives_exit_status_3() {
    let api = MockApi::start().await;
    let dir = std::env::temp_dir().join(format!("ws2http-{}-gone-dir", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cpu.pb");
    let mut gateway =
        Binary::start_ready(&api.base(), &["--cpuprofile", path.to_str().unwrap()], &[]).await;
    // The directory checked at start goes away while the gateway runs.
    std::fs::remove_dir_all(&dir).unwrap();
    gateway.signal(libc::SIGTERM);
    let status = gateway.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(3), "{}", gateway.stderr());
    assert!(
        gateway.stderr().contains("profile not written"),
        "{}",
        gateway.stderr()
    );
}

#[tokio::test]
async fn a_gateway_that_cannot_start_leaves_an_earlier_profile_in_place() {
    let api = MockApi::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let path = std::env::temp_dir().join(format!("ws2http-{}-kept-cpu.pb", std::process::id()));
    std::fs::write(&path, b"an earlier run's profile").unwrap();
    Binary::refused_at_start(
        &api.base(),
        &[
            "--control-listen",
            &taken,
            "--cpuprofile",
            path.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(std::fs::read(&path).unwrap(), b"an earlier run's profile");
    std::fs::remove_file(&path).unwrap();
}
