//! The demo page in a real browser: Debian's headless Chromium, driven by
//! `tests/browser/demo.mjs` (playwright-core), opens the page served by the PHP example
//! twice, joins as two people, and sees a message typed in one tab appear in the other,
//! through a real `ws2http` gateway. Then the API drops one of them from the room while
//! the socket stays open (as after a cluster node came back): that page must reconnect on
//! the refusal of its next message, send the message again and chat on. Dropped again, it
//! sends two messages at once: both must arrive, once each and in order, although the page
//! closes its socket on the first refusal and never reads the second. The screenshot is
//! kept as `target/test-artifacts/demo.png`.
//!
//! Needs php-cli + php-sqlite3, chromium, node and `npm ci` in tests/browser; `make test`
//! (or `scripts/install-deps.sh test`) installs them. Missing ones fail the test.

mod stack;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stack::{repo_root, Gateway, PhpExample, Proc};

/// `target/test-artifacts/` (next to `target/tmp`, so it follows CARGO_TARGET_DIR).
fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

#[test]
fn two_tabs_of_the_demo_page_chat_through_the_gateway() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (`make test` does)"
    );
    let browser_dir = repo_root().join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in tests/browser (`make test` does)"
    );

    let control_port = stack::free_port();
    let php = PhpExample::start(&format!("http://127.0.0.1:{control_port}/"));
    let gateway = Gateway::start_with_ports(
        env!("CARGO_BIN_EXE_ws2http"),
        &php.base_url(),
        stack::free_port(),
        control_port,
        &["--api-token", stack::API_TOKEN],
    );
    let page_url = format!("http://{}/?ws={}", php.addr, gateway.ws_url());
    let shot = artifacts_dir().join("demo.png");
    let _ = std::fs::remove_file(&shot);

    let mut cmd = Command::new("node");
    cmd.arg(browser_dir.join("demo.mjs"))
        .arg(&page_url)
        .arg(&shot)
        .env("CHROMIUM", &chromium)
        .env("WS2HTTP_API_TOKEN", stack::API_TOKEN)
        .current_dir(&browser_dir)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let mut node = Proc::spawn("node (tests/browser/demo.mjs)", cmd);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = node.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the browser script ran over 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the browser script failed: {status}");

    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "screenshot is not a PNG"
    );
    assert!(
        png.len() > 10_000,
        "screenshot suspiciously small: {} bytes",
        png.len()
    );
    drop(gateway);
}
