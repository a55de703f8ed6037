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
//! Needs php-cli + php-sqlite3, chromium, node (18 or later, as playwright-core's `engines`
//! says) and `npm ci` in tests/browser; `make test` (or `scripts/install-deps.sh test`)
//! installs them. Missing ones, or too old a node, fail the test.

mod stack;

use std::path::{Path, PathBuf};
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

/// Leading digits of `s` as a number (the major of "18.20.4", of ">=18").
fn major(s: &str) -> Option<u32> {
    s.trim_start_matches(['v', '>', '=', ' '])
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Checks that the `node` on PATH runs the installed playwright-core: on a node older than
/// its `engines` that exits 1 at start-up, and the test would only say the script failed.
fn check_node(browser_dir: &Path) {
    let out = Command::new("node")
        .args([
            "-p",
            "const p = require('./node_modules/playwright-core/package.json'); \
                     [process.versions.node, p.version, p.engines.node].join('|')",
        ])
        .current_dir(browser_dir)
        .output()
        .unwrap_or_else(|e| panic!("node is missing ({e}): install nodejs (`make test` does)"));
    let said = String::from_utf8_lossy(&out.stdout);
    let [node, playwright, engines] = said.trim().split('|').collect::<Vec<_>>()[..] else {
        panic!(
            "node could not read playwright-core's package.json: {said:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (have, need) = (major(node), major(engines));
    assert!(
        have.zip(need).is_some_and(|(have, need)| have >= need),
        "node {node} is too old: the playwright-core {playwright} in tests/browser needs Node.js \
         {engines} (get a newer nodejs, e.g. nodesource's packages; or, if package-lock.json \
         pins an older playwright-core, `npm ci` there)"
    );
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
    check_node(&browser_dir);

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
