//! The binary's runtime and process life: `--current-thread` serves websockets and pushes on
//! one thread and refuses to be combined with `--worker-threads`; a runtime the system refuses
//! threads for, a wrong flag next to a profile, a signal right after start-up, a gateway told
//! to call itself.

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
async fn an_api_base_without_a_trailing_slash_is_warned_of_with_the_url_it_makes() {
    let api = MockApi::start().await;
    let prefix = format!("{}gw", api.base());
    let binary = Binary::start_ready(&prefix, &[], &[]).await;
    // Logged before it serves; the reader of its stderr may lag a moment behind.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !binary.stderr().contains("--api does not end with /")
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = binary.stderr();
    assert!(log.contains("--api does not end with /"), "{log}");
    assert!(log.contains(&format!("{prefix}alice")), "{log}");
    // With the slash, no such line: read once the binary has stopped, all of its log in
    // (the warning would come before it serves).
    let mut binary = Binary::start_ready(&api.base(), &[], &[]).await;
    binary.signal(libc::SIGTERM);
    let status = binary.wait_exit(Duration::from_secs(15)).await;
    let log = binary.stderr();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("ws2http listening"), "{log}");
    assert!(log.contains("ws2http stopped"), "{log}");
    assert!(!log.contains("does not end with /"), "{log}");
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
async fn a_memprofile_with_no_temporary_directory_stops_the_binary_naming_the_flag_and_tmpdir() {
    // Every heap dump goes through a temporary file there: GET /debug/pprof/heap would answer
    // 500 and the profile at shutdown would be lost (exit 3).
    let api = MockApi::start().await;
    let path = std::env::temp_dir().join(format!("ws2http-{}-no-tmp.pb.gz", std::process::id()));
    let log = Binary::refused_at_start(
        &api.base(),
        &["--memprofile", path.to_str().unwrap()],
        &[("TMPDIR", "/nonexistent")],
    )
    .await;
    assert!(
        log.starts_with("ws2http: --memprofile: ")
            && log.contains("/nonexistent")
            && log.contains("TMPDIR"),
        "{log}"
    );
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(!path.exists(), "{log}");
}

#[tokio::test]
async fn an_empty_rust_log_logs_at_info_as_an_unset_one_does() {
    // tracing-subscriber reads an empty RUST_LOG as errors only: the start-up lines and the
    // warnings went missing without a word.
    let api = MockApi::start().await;
    let prefix = format!("{}gw", api.base());
    for value in ["", "  "] {
        let mut binary = Binary::start_ready(&prefix, &[], &[("RUST_LOG", value)]).await;
        let log = binary.wait_for_log("--api does not end with /").await;
        assert!(log.contains(" WARN "), "RUST_LOG={value:?}: {log}");
        assert!(log.contains("ws2http started"), "RUST_LOG={value:?}: {log}");
        binary.signal(libc::SIGTERM);
        let status = binary.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "RUST_LOG={value:?}: {}",
            binary.stderr()
        );
        assert!(
            binary.stderr().contains("ws2http stopped"),
            "{}",
            binary.stderr()
        );
    }
}

#[tokio::test]
async fn a_gateway_that_cannot_start_leaves_an_earlier_profile_in_place() {
    let api = MockApi::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let path = std::env::temp_dir().join(format!("ws2http-{}-kept-cpu.pb", std::process::id()));
    std::fs::write(&path, b"an earlier run's profile").unwrap();
    let log = Binary::refused_at_start(
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
    // Refused at the bind, which comes after the profiler started, not by an earlier check.
    assert!(
        log.contains(&format!("--control-listen {taken}: cannot listen")),
        "{log}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"an earlier run's profile");
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn a_runtime_the_system_refuses_threads_for_exits_1_naming_the_cause() {
    use std::os::unix::process::CommandExt;
    let api = MockApi::start().await;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ws2http"));
    command
        .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .args(["--api", &api.base(), "--worker-threads", "1024"])
        // One jemalloc arena: the workers already started must not be the ones to run out of
        // address space first (an abort, not the refusal under test), however many CPUs.
        .env("_RJEM_MALLOC_CONF", "narenas:1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // 1 GiB of address space: far from enough for 1,024 thread stacks, as a container's
    // limits would refuse them.
    // SAFETY: only setrlimit(2), between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn ws2http");
    let pid = child.id();
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let Ok(output) = output else {
        // SAFETY: kill(2) on the child this test spawned.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("the gateway hung instead of exiting");
    };
    let output = output.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot start the runtime"), "{stderr}");
}

#[tokio::test]
async fn a_wrong_flag_next_to_a_profile_is_one_line_on_stderr() {
    let api = MockApi::start().await;
    let path = std::env::temp_dir().join(format!("ws2http-{}-one-line.pb", std::process::id()));
    let log = Binary::refused_at_start(
        &api.base(),
        &["--pipeline", "0", "--cpuprofile", path.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(log.contains("--pipeline"), "{log}");
    assert!(
        !path.exists(),
        "no profile for a gateway that never started"
    );
}

#[tokio::test]
async fn sigterm_right_after_the_first_start_up_line_drains_and_exits_0() {
    let api = MockApi::start().await;
    for run in 0..20 {
        let api = api.base();
        let pid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
        let child_pid = std::sync::Arc::clone(&pid);
        // Read in this thread and signalled from it, as a supervisor that stops a process as
        // soon as it says it started: no time for the gateway to get further.
        let ended = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ws2http"))
                .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
                .args(["--api", &api])
                .env("RUST_LOG", "info")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn ws2http");
            let pid = child.id() as i32;
            child_pid.store(pid, std::sync::atomic::Ordering::SeqCst);
            let mut stderr = String::new();
            let mut signalled = false;
            for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
                let line = line.unwrap_or_default();
                if !signalled && line.contains("ws2http started") {
                    // SAFETY: kill(2) on the child spawned here.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                    signalled = true;
                }
                stderr.push_str(&line);
                stderr.push('\n');
            }
            (child.wait().expect("wait"), stderr)
        });
        let Ok(ended) = tokio::time::timeout(Duration::from_secs(30), ended).await else {
            // SAFETY: kill(2) on the child spawned above; the reading thread then ends.
            unsafe { libc::kill(pid.load(std::sync::atomic::Ordering::SeqCst), libc::SIGKILL) };
            panic!("run {run}: the gateway did not exit within 30 s of its SIGTERM");
        };
        let (status, stderr) = ended.unwrap();
        assert_eq!(status.code(), Some(0), "run {run}: {stderr}");
        assert!(stderr.contains("ws2http stopped"), "run {run}: {stderr}");
    }
}

#[tokio::test]
async fn a_gateway_told_to_call_itself_is_refused_at_start() {
    let api_port = common::binary::free_port();
    let own = format!("127.0.0.1:{api_port}");
    let log = Binary::refused_at_start(
        &format!("http://127.0.0.1:{api_port}/"),
        &["--control-listen", &own],
        &[],
    )
    .await;
    assert!(
        log.contains("is this gateway's own --control-listen"),
        "{log}"
    );
    let socket = std::env::temp_dir().join(format!("ws2http-{}-self.sock", std::process::id()));
    let socket = socket.to_str().unwrap();
    let log = Binary::refused_at_start(
        "http://api/",
        &["--api-unix-socket", socket, "--control-unix-socket", socket],
        &[],
    )
    .await;
    assert!(
        log.contains("--api-unix-socket") && log.contains("--control-unix-socket"),
        "{log}"
    );
}
