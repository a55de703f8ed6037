//! The real `ws2http` binary as a child process: free loopback ports, start-up log capture,
//! readiness, and signals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::raw_http;

#[path = "../ports/mod.rs"]
mod ports;
pub use ports::free_port;

/// `text` without ANSI colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running `ws2http` process whose stderr is collected.
pub struct Binary {
    /// The process.
    pub child: Child,
    /// Its public (websocket) listener.
    pub public: SocketAddr,
    /// Its control listener, as reached from this host.
    pub control: SocketAddr,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Binary {
    /// Starts the binary with `--listen`/`--control-listen` on free loopback ports (unless
    /// `args` names `--control-listen` itself), `--api api`, then `args`, with `envs` added.
    pub fn start(api: &str, args: &[&str], envs: &[(&str, &str)]) -> Binary {
        let public: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut control: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut command = Command::new(env!("CARGO_BIN_EXE_ws2http"));
        command.arg("--listen").arg(public.to_string());
        if let Some(i) = args.iter().position(|a| *a == "--control-listen") {
            control = args[i + 1].parse().expect("--control-listen ADDR");
            // Where the test reaches it: loopback on the same port.
            control.set_ip([127, 0, 0, 1].into());
        } else {
            command.arg("--control-listen").arg(control.to_string());
        }
        command.arg("--api").arg(api).args(args);
        command.env_remove("WS2HTTP_CONTROL_TOKEN");
        command.env("RUST_LOG", "info");
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ws2http");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut all = sink.lock().unwrap();
                all.push_str(&strip_ansi(&line));
                all.push('\n');
            }
        });
        Binary {
            child,
            public,
            control,
            stderr,
            reader: Some(reader),
        }
    }

    /// Starts the binary like [`Binary::start`] and waits until it serves. `{port}` in `args`
    /// becomes a free port. A port taken between choosing and binding (other tests open
    /// many client sockets) makes the binary exit; it is then started again on new ports.
    pub async fn start_ready(api: &str, args: &[&str], envs: &[(&str, &str)]) -> Binary {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let args: Vec<String> = args
                .iter()
                .map(|a| a.replace("{port}", &free_port().to_string()))
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut binary = Binary::start(api, &args, envs);
            match binary.try_ready().await {
                Ok(()) => return binary,
                Err(log) if log.contains("cannot listen") && attempt < 5 => continue,
                Err(log) => panic!("ws2http did not come up; stderr:\n{log}"),
            }
        }
    }

    /// Waits until the gateway answers `/healthz` (10 s at most).
    pub async fn ready(&mut self) {
        if let Err(log) = self.try_ready().await {
            panic!("ws2http did not come up; stderr:\n{log}");
        }
    }

    /// Waits until the gateway answers `/healthz`; on exit or after 10 s, the log.
    pub async fn try_ready(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // The control listener: plain HTTP even when the public one speaks TLS.
            if tokio::net::TcpStream::connect(self.control).await.is_ok() {
                let health = raw_http(self.control, "GET", "/healthz", &[], b"").await;
                if health.status == 200 {
                    return Ok(());
                }
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                // Let the stderr reader catch up with the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(self.stderr());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the process wrote to stderr so far, without colours.
    /// Starts the binary as [`Binary::start`] does, for settings it must refuse: checks that
    /// it exits with status 2 within 10 s, and returns what it wrote on stderr.
    pub async fn refused_at_start(api: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
        let mut binary = Binary::start(api, args, envs);
        let status = binary.wait_exit(Duration::from_secs(10)).await;
        let stderr = binary.stderr();
        assert_eq!(status.code(), Some(2), "{args:?} {envs:?}: {stderr}");
        stderr
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Connects a websocket client to `path` on the binary's public listener.
    pub async fn connect(&self, path: &str) -> super::Ws {
        let url = format!("ws://{}{path}", self.public);
        let (ws, _) = tokio_websockets::ClientBuilder::new()
            .uri(&url)
            .unwrap()
            .connect()
            .await
            .expect("connects to the binary");
        ws
    }

    /// Waits until stderr contains `text` (10 s at most); returns all of stderr.
    pub async fn wait_for_log(&self, text: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.stderr();
            if log.contains(text) {
                return log;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no `{text}` in stderr:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) with a pid we spawned and still own; no memory is involved.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits for the process to exit (at most `within`), killing it if it does not.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // All of stderr is in once the reader sees the pipe close.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "ws2http did not exit within {within:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
