//! The `ws2http` command: flags, logging, signals and profiles around [`ws2http::Gateway`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use argh::FromArgs;
use tokio::signal::unix::{signal, Signal, SignalKind};
use ws2http::config::{
    is_header_token, parse_duration, parse_size, ApiBase, Config, DescriptorBudget, Secret,
    TlsFiles, DEFAULT_UPSTREAM_MIN_CONCURRENCY,
};
use ws2http::{profile, Gateway};

/// ws2http: holds websocket connections and turns their traffic into plain HTTP requests to
/// an API (GET on connect, POST per message, DELETE on close); the API pushes back with a POST
/// to the control listener.
#[derive(FromArgs)]
struct Args {
    /// public websocket listener (default 0.0.0.0:7001)
    #[argh(option, default = "SocketAddr::from(([0, 0, 0, 0], 7001))")]
    listen: SocketAddr,

    /// control listener for the API: push, disconnect, info, metrics (default 127.0.0.1:7002)
    #[argh(option, default = "SocketAddr::from(([127, 0, 0, 1], 7002))")]
    control_listen: SocketAddr,

    /// also serve the control API on this Unix socket, for an API on the same machine (mode
    /// 0660: the gateway's user and group; removed at shutdown)
    #[argh(option)]
    control_unix_socket: Option<PathBuf>,

    /// base URL of the API; the ClientId is appended (default http://127.0.0.1:8000/)
    #[argh(option, default = "\"http://127.0.0.1:8000/\".parse().unwrap()")]
    api: ApiBase,

    /// messages of one connection in flight to the API at once, replies kept in order (default 1)
    #[argh(option, default = "1")]
    pipeline: usize,

    /// largest message from a client, the API or a push, e.g. 64KiB (default 1MiB)
    #[argh(option, default = "1 << 20", from_str_fn(parse_size))]
    max_message_size: usize,

    /// websocket connections held at once (default: what the open-file limit leaves after the
    /// API connections, pending handshakes, 256 control connections, 64 sockets over those
    /// caps, 8 for API host name lookups and 64 spare)
    #[argh(option)]
    max_connections: Option<usize>,

    /// sockets accepted but not yet upgraded, at once (default 512)
    #[argh(option, default = "512")]
    max_pending_handshakes: usize,

    /// deadline of one API request, e.g. 500ms, 30s (default 30s)
    #[argh(
        option,
        default = "Duration::from_secs(30)",
        from_str_fn(parse_duration)
    )]
    upstream_timeout: Duration,

    /// concurrent API requests and pooled API connections (default: open-file limit / 16, at
    /// least 16, at most 1024)
    #[argh(option)]
    upstream_max_connections: Option<usize>,

    /// API requests always allowed at once; more, up to --upstream-max-connections, only while
    /// the API answers at its usual pace (default 64; equal to --upstream-max-connections for
    /// a fixed limit)
    #[argh(option)]
    upstream_min_concurrency: Option<usize>,

    /// API requests that may wait for a free API connection at once before more are refused
    /// (1013 on a message, 503 on a handshake); default: as many as the clients can have
    /// outstanding, so that --upstream-max-wait is the bound that applies
    #[argh(option)]
    upstream_max_waiting: Option<usize>,

    /// longest an API request waits for a free API connection before it is refused (1013 on a
    /// message, 503 on a handshake), e.g. 500ms, 5s (default 5s)
    #[argh(
        option,
        default = "Duration::from_secs(5)",
        from_str_fn(parse_duration)
    )]
    upstream_max_wait: Duration,

    /// speak HTTP/2 without TLS (h2c) to the API
    #[argh(switch)]
    upstream_http2: bool,

    /// extra CA certificate (PEM) trusted for an https:// API, besides the system roots
    #[argh(option)]
    api_ca: Option<PathBuf>,

    /// reach the API over this Unix socket instead of --api's host and port, which still give
    /// the Host header and the path (plain http:// only)
    #[argh(option)]
    api_unix_socket: Option<PathBuf>,

    /// pushes queued for one socket before pushes get 503 (default 64)
    #[argh(option, default = "64")]
    max_queued_messages: usize,

    /// bytes queued for one socket before pushes get 503 (default 1MiB)
    #[argh(option, default = "1 << 20", from_str_fn(parse_size))]
    max_queued_bytes: usize,

    /// close a socket whose writes make no progress for this long with 1008, and a control
    /// connection whose answers go unread (default 30s)
    #[argh(
        option,
        default = "Duration::from_secs(30)",
        from_str_fn(parse_duration)
    )]
    write_timeout: Duration,

    /// time a client has to complete its upgrade request, and a control connection its first
    /// request (default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    handshake_timeout: Duration,

    /// ping a client after this long without a frame from it; 0 disables (default 30s)
    #[argh(
        option,
        default = "Duration::from_secs(30)",
        from_str_fn(parse_duration)
    )]
    ping_interval: Duration,

    /// close a client that sent nothing at all for this long (default 60s)
    #[argh(
        option,
        default = "Duration::from_secs(60)",
        from_str_fn(parse_duration)
    )]
    ping_timeout: Duration,

    /// close a connection without a data message either way for this long (default: never)
    #[argh(option, from_str_fn(parse_duration))]
    idle_timeout: Option<Duration>,

    /// on SIGTERM/SIGINT/SIGHUP, how long in-flight requests may take before sockets close (default 10s)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(parse_duration)
    )]
    shutdown_timeout: Duration,

    /// DELETEs sent to the API at once while shutting down (default 64)
    #[argh(option, default = "64")]
    shutdown_delete_concurrency: usize,

    /// bearer token the control listener requires (also from WS2HTTP_CONTROL_TOKEN)
    #[argh(option)]
    control_token: Option<String>,

    /// secret sent to the API with every request as X-Ws2http-Token, for the API to tell its
    /// gateways from other callers (also from WS2HTTP_API_TOKEN)
    #[argh(option)]
    api_token: Option<String>,

    /// origins allowed to open a websocket, comma-separated or repeated (default: any; the
    /// API judges the forwarded Origin)
    #[argh(option)]
    allowed_origins: Vec<String>,

    /// certificate chain (PEM) to serve wss:// on the public listener
    #[argh(option)]
    tls_cert: Option<PathBuf>,

    /// private key (PEM) for --tls-cert
    #[argh(option)]
    tls_key: Option<PathBuf>,

    /// runtime worker threads (default: one per CPU)
    #[argh(option)]
    worker_threads: Option<usize>,

    /// run everything on the main thread (tokio's current_thread runtime) instead of a pool of
    /// worker threads
    #[argh(switch)]
    current_thread: bool,

    /// write a CPU profile (pprof protobuf; flame graph SVG if FILE ends in .svg) at shutdown
    #[argh(option)]
    cpuprofile: Option<PathBuf>,

    /// write a heap profile (pprof protobuf, gzipped) at shutdown; also enables
    /// GET /debug/pprof/heap on the control listener
    #[argh(option)]
    memprofile: Option<PathBuf>,

    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

/// A token given by its flag, or else by the environment variable `name` (unset or empty:
/// none); the variable keeps it out of the process list. One that cannot travel in a header
/// is refused, naming where it came from: the flag, or the variable.
fn token_from(
    flag: &Option<String>,
    flag_name: &str,
    name: &str,
) -> Result<Option<String>, String> {
    let (token, given_as) = match (flag, std::env::var(name)) {
        (Some(value), _) => (Some(value.clone()), flag_name),
        (None, Ok(value)) => ((!value.is_empty()).then_some(value), name),
        (None, Err(std::env::VarError::NotPresent)) => (None, name),
        (None, Err(std::env::VarError::NotUnicode(_))) => {
            return Err(format!("{name} is not valid UTF-8"))
        }
    };
    if token.as_deref().is_some_and(|t| !is_header_token(t)) {
        return Err(format!(
            "{given_as} must be non-empty visible ASCII, without spaces"
        ));
    }
    Ok(token)
}

/// Checks one `--allowed-origins` entry: an origin as browsers send it, `scheme://host[:port]`
/// (or `null`, what sandboxed frames and `file://` pages send), so that no entry silently
/// matches nothing.
fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "null" {
        return Ok(());
    }
    if !origin.is_ascii() {
        return Err(format!(
            "--allowed-origins: `{origin}` is not ASCII; browsers send a host name in its \
             punycode form (xn--...)"
        ));
    }
    let lower = origin.to_ascii_lowercase();
    if (lower.starts_with("http://") && lower.ends_with(":80"))
        || (lower.starts_with("https://") && lower.ends_with(":443"))
    {
        return Err(format!(
            "--allowed-origins: `{origin}`: browsers leave the default port out of an origin"
        ));
    }
    let shape = || {
        format!(
            "--allowed-origins: `{origin}` is not an origin; give scheme://host[:port] as a \
             browser sends it (e.g. https://app.example.com), without a path or a trailing /"
        )
    };
    let (scheme, rest) = origin.split_once("://").ok_or_else(shape)?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let rest_ok = !rest.is_empty()
        && !rest.contains(|c: char| "/?#@*".contains(c) || c.is_whitespace() || c.is_control());
    if !(scheme_ok && rest_ok) {
        return Err(shape());
    }
    check_origin_host_port(rest).map_err(|why| format!("--allowed-origins: `{origin}` {why}"))
}

/// Checks the `host[:port]` of an `--allowed-origins` entry as a browser writes it: a host
/// name, or an IPv6 address in closed brackets; a port, if any, from 1 to 65535 without a
/// leading zero. What is wrong, if anything, as the end of a sentence about the entry.
fn check_origin_host_port(authority: &str) -> Result<(), &'static str> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (address, after) = bracketed
            .split_once(']')
            .ok_or("has an unclosed [; an IPv6 host is written [::1]")?;
        let Ok(parsed) = address.parse::<std::net::Ipv6Addr>() else {
            return Err("has no IPv6 address between [ and ]");
        };
        // Browsers send an IPv6 host in its shortest form (RFC 5952: zeros compressed, no
        // leading zeros, hex throughout), and the origin is compared as text.
        let shortest = match parsed.to_ipv4_mapped() {
            // Rust writes these dotted (`::ffff:127.0.0.1`), browsers in hex.
            Some(_) => {
                let [.., high, low] = parsed.segments();
                format!("::ffff:{high:x}:{low:x}")
            }
            None => parsed.to_string(),
        };
        if !shortest.eq_ignore_ascii_case(address) {
            return Err(
                "has an IPv6 address not in the shortest form browsers send (as [::1], \
                 [2001:db8::7])",
            );
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or("has something other than :port after the ]")?,
            ),
        };
        (address, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("has no host");
    }
    if !authority.starts_with('[') && host.contains(['[', ']', ':']) {
        return Err("has a [, ] or : in its host; an IPv6 host is written [::1]");
    }
    let port_ok = |port: &str| {
        port.bytes().all(|b| b.is_ascii_digit())
            && !port.starts_with('0')
            && port.parse::<u16>().is_ok()
    };
    if port.is_some_and(|port| !port_ok(port)) {
        return Err("has a port that is not a number from 1 to 65535 as browsers write it");
    }
    Ok(())
}

/// Worker threads the runtime may be asked for; more is a typo, not a machine.
const MAX_WORKER_THREADS: usize = 1024;

/// Turns the flags into a [`Config`], or a one-line error naming the flag.
fn config_from(args: &Args) -> Result<Config, String> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".to_owned()),
    };
    let token = token_from(
        &args.control_token,
        "--control-token",
        "WS2HTTP_CONTROL_TOKEN",
    )?;
    let api_token = token_from(&args.api_token, "--api-token", "WS2HTTP_API_TOKEN")?;
    let origins: Vec<String> = args
        .allowed_origins
        .iter()
        .flat_map(|list| list.split(','))
        .map(|o| o.trim().to_owned())
        .filter(|o| !o.is_empty())
        .collect();
    if !args.allowed_origins.is_empty() && origins.is_empty() {
        // An empty list would allow every origin: the opposite of what was asked.
        return Err("--allowed-origins names no origin".to_owned());
    }
    for origin in &origins {
        check_origin(origin)?;
    }
    match args.worker_threads {
        Some(0) => return Err("--worker-threads must be at least 1".to_owned()),
        Some(n) if n > MAX_WORKER_THREADS => {
            return Err(format!(
                "--worker-threads {n} is over {MAX_WORKER_THREADS}; one per CPU is the default"
            ))
        }
        _ => {}
    }
    if let (Some(cpu), Some(mem)) = (&args.cpuprofile, &args.memprofile) {
        if ws2http::resolved_path(cpu) == ws2http::resolved_path(mem) {
            return Err("--cpuprofile and --memprofile name the same file".to_owned());
        }
    }
    if let (Some(min), Some(max)) = (args.upstream_min_concurrency, args.upstream_max_connections) {
        // The default (64) is lowered to a smaller pool without a word; a number given for
        // both that cannot hold is a mistake in one of them.
        if min > max {
            return Err(format!(
                "--upstream-min-concurrency {min} is more than --upstream-max-connections {max}"
            ));
        }
    }
    if args.current_thread && args.worker_threads.is_some() {
        return Err("--current-thread and --worker-threads exclude each other".to_owned());
    }
    Ok(Config {
        listen: args.listen,
        control_listen: args.control_listen,
        api: args.api.clone(),
        pipeline: args.pipeline,
        max_message_size: args.max_message_size,
        max_connections: args.max_connections,
        max_pending_handshakes: args.max_pending_handshakes,
        upstream_timeout: args.upstream_timeout,
        upstream_max_connections: args.upstream_max_connections,
        upstream_min_concurrency: args
            .upstream_min_concurrency
            .unwrap_or(DEFAULT_UPSTREAM_MIN_CONCURRENCY),
        upstream_max_waiting: args.upstream_max_waiting,
        upstream_max_wait: args.upstream_max_wait,
        upstream_http2: args.upstream_http2,
        api_ca: args.api_ca.clone(),
        api_unix_socket: args.api_unix_socket.clone(),
        control_unix_socket: args.control_unix_socket.clone(),
        max_queued_messages: args.max_queued_messages,
        max_queued_bytes: args.max_queued_bytes,
        write_timeout: args.write_timeout,
        handshake_timeout: args.handshake_timeout,
        ping_interval: (!args.ping_interval.is_zero()).then_some(args.ping_interval),
        ping_timeout: args.ping_timeout,
        idle_timeout: args.idle_timeout,
        shutdown_timeout: args.shutdown_timeout,
        shutdown_delete_concurrency: args.shutdown_delete_concurrency,
        control_token: token.map(Secret::from),
        api_token: api_token.map(Secret::from),
        allowed_origins: (!origins.is_empty()).then_some(origins),
        tls,
    })
}

/// What to log: `RUST_LOG` if set, else `info`. An empty (or blank) `RUST_LOG` counts as
/// unset: tracing-subscriber would read it as no directive at all and log errors only,
/// dropping the start-up lines and every warning. A `RUST_LOG` that does not parse is said on
/// stderr (logging then stays at `info`), not ignored without a word.
fn log_filter() -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let unset = std::env::var_os(EnvFilter::DEFAULT_ENV)
        .is_none_or(|value| value.to_string_lossy().trim().is_empty());
    if unset {
        return EnvFilter::new("info");
    }
    EnvFilter::try_from_default_env().unwrap_or_else(|error| {
        eprintln!("ws2http: RUST_LOG: {error}; logging at info");
        EnvFilter::new("info")
    })
}

/// The command line, or which argument is not valid UTF-8 (and after which flag).
fn arguments() -> Result<Vec<String>, String> {
    let mut arguments = Vec::new();
    for argument in std::env::args_os() {
        match argument.into_string() {
            Ok(argument) => arguments.push(argument),
            Err(bad) => {
                let bad = bad.to_string_lossy();
                return Err(match arguments.last().filter(|a| a.starts_with("--")) {
                    Some(flag) if arguments.len() > 1 => {
                        format!("{flag}: `{bad}` is not valid UTF-8")
                    }
                    _ => format!("argument `{bad}` is not valid UTF-8"),
                });
            }
        }
    }
    Ok(arguments)
}

fn main() -> ExitCode {
    let raw = match arguments() {
        Ok(raw) => raw,
        Err(message) => {
            eprintln!("ws2http: {message}");
            return ExitCode::from(2);
        }
    };
    let strings: Vec<&str> = raw.iter().map(String::as_str).collect();
    let args = match Args::from_args(&["ws2http"], strings.get(1..).unwrap_or(&[])) {
        Ok(args) => args,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    print!("{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    let first = early.output.lines().next().unwrap_or("bad arguments");
                    eprintln!("ws2http: {first}");
                    ExitCode::from(2)
                }
            };
        }
    };
    if args.version {
        println!("ws2http {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let config = match config_from(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("ws2http: {message}");
            return ExitCode::from(2);
        }
    };
    // Every flag and the descriptor budget are checked before anything starts (logging, the
    // runtime, the profilers): a wrong value is one line naming the flag.
    let budget = match ws2http::check(&config) {
        Ok(budget) => budget,
        Err(error) => {
            eprintln!("ws2http: {error}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(log_filter())
        .init();

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (workers, mut builder) = if args.current_thread {
        (1, tokio::runtime::Builder::new_current_thread())
    } else {
        let workers = args.worker_threads.unwrap_or(cpus);
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        (workers, builder)
    };
    // tokio panics, rather than return an error, when the system refuses a worker thread (a
    // container's pids limit, systemd's TasksMax), and the process then hung with the threads
    // it had: exit 1 with one line instead.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let why = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        eprintln!("ws2http: cannot start the runtime: {why}");
        std::process::exit(1);
    }));
    let built = builder
        .on_thread_park(profile::on_worker_park)
        .enable_all()
        .build();
    std::panic::set_hook(default_hook);
    let runtime = match built {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ws2http: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    for (flag, path) in [
        ("--cpuprofile", &args.cpuprofile),
        ("--memprofile", &args.memprofile),
    ] {
        if let Some(Err(error)) = path.as_deref().map(profile::check_writable) {
            eprintln!("ws2http: {flag}: {error}");
            return ExitCode::from(2);
        }
    }
    if args.memprofile.is_some() {
        if let Err(error) = profile::check_heap_temp_dir() {
            eprintln!("ws2http: --memprofile: {error}");
            return ExitCode::from(2);
        }
    }
    let profiles = match profile::start(args.cpuprofile.clone(), args.memprofile.clone()) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("ws2http: --cpuprofile/--memprofile: {error}");
            return ExitCode::from(2);
        }
    };
    let served = runtime.block_on(serve(config, budget, workers, cpus));
    if served.is_err() {
        // Nothing ran: a profile of an earlier run at the same path is kept.
        profiles.discard();
    } else if let Err(error) = profiles.finish() {
        // Drained, but what was asked for is missing: a script that waits for the file
        // learns it from the status.
        tracing::error!(%error, "profile not written; exiting with status {PROFILE_NOT_WRITTEN}");
        return ExitCode::from(PROFILE_NOT_WRITTEN);
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// Exit status of a gateway that drained but could not write a profile it was asked for.
const PROFILE_NOT_WRITTEN: u8 = 3;

/// Serves until a signal has drained the gateway; Err with the exit code if it never started.
async fn serve(
    config: Config,
    budget: DescriptorBudget,
    workers: usize,
    cpus: usize,
) -> Result<(), ExitCode> {
    // Before anything is bound or logged: a SIGTERM sent as soon as the start-up lines
    // appear must drain, not kill the process with the default action.
    let signals = ShutdownSignals::install();
    // The budget `check` planned before the runtime started, not planned again.
    let gateway = match Gateway::bind_with_budget(config.clone(), budget).await {
        Ok(gateway) => gateway,
        Err(error) => {
            eprintln!("ws2http: {error}");
            return Err(ExitCode::from(2));
        }
    };
    let budget = gateway.budget();
    let upstream_min_concurrency = gateway.upstream_min_concurrency();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        public = %gateway.public_addr(),
        control = %gateway.control_addr(),
        control_unix_socket = config.control_unix_socket.as_ref().map(|p| p.display().to_string()),
        api = config.api.as_str(),
        api_unix_socket = config.api_unix_socket.as_ref().map(|p| p.display().to_string()),
        tls = config.tls.is_some(),
        open_file_limit = budget.open_file_limit,
        max_connections = budget.max_connections,
        upstream_max_connections = budget.upstream_max_connections,
        upstream_min_concurrency,
        upstream_max_waiting = budget.upstream_max_waiting,
        upstream_max_wait = ?config.upstream_max_wait,
        pending_handshakes = budget.pending_handshakes,
        control_connections = budget.control_connections,
        handshake_waiters = budget.handshake_waiters,
        control_refusals = budget.control_refusals,
        lookup_descriptors = budget.lookups,
        spare_descriptors = budget.spare,
        worker_threads = workers,
        cpus,
        "ws2http started"
    );
    tracing::info!(
        "ws2http listening: public={} control={}",
        gateway.public_addr(),
        gateway.control_addr()
    );
    if !gateway.control_addr().ip().is_loopback() && config.control_token.is_none() {
        tracing::warn!(
            control = %gateway.control_addr(),
            "the control listener is not on loopback and has no --control-token: anyone who \
             reaches it can push to and disconnect every client"
        );
    }
    if !config.api.as_str().ends_with('/') {
        // A prefix is allowed (`…/client-` + ClientId), but `http://api/ws` meant as a
        // directory would send every call to `/wsalice`: said once, with an example.
        tracing::warn!(
            api = config.api.as_str(),
            example = format!("{}alice", config.api.as_str()),
            "--api does not end with /: the ClientId is appended as is, so the API is called at \
             the example's URL for ClientId alice; end --api with / if that is not meant"
        );
    }
    let report = gateway.serve(signals.first()).await;
    tracing::info!(
        sessions = report.sessions_at_shutdown,
        completed = report.completed,
        disconnects_untold = report.disconnects_untold,
        "ws2http stopped"
    );
    Ok(())
}

/// How soon after the first stop signal another one is taken as the same stop, not as
/// a second signal: coreutils' `timeout`, and supervisors like it, signal the process and then
/// its whole process group, and the two arrive microseconds apart.
const REPEATED_SIGNAL: Duration = Duration::from_millis(250);

/// The stop signals, SIGTERM, SIGINT and SIGHUP, taken over from their default action (ending
/// the process) as soon as this is made. SIGHUP drains like the others: a gateway started in a
/// terminal whose session ends (a dropped SSH connection) still closes every client with
/// `1001` and tells the API of each, instead of vanishing.
struct ShutdownSignals(Option<[Signal; 3]>);

impl ShutdownSignals {
    fn install() -> Self {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => ShutdownSignals(Some([term, int, hup])),
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                ShutdownSignals(None)
            }
        }
    }

    /// Resolves on the first stop signal (also one that came before this was polled); a
    /// second one ends the process at once (once a profile file being written is in place),
    /// unless it came within [`REPEATED_SIGNAL`] of the first: that one is the same stop.
    async fn first(self) {
        let Some(mut signals) = self.0 else {
            std::future::pending::<()>().await;
            return;
        };
        any_of(&mut signals).await;
        let first = tokio::time::Instant::now();
        tokio::spawn(async move {
            loop {
                any_of(&mut signals).await;
                if first.elapsed() >= REPEATED_SIGNAL {
                    break;
                }
                tracing::debug!(
                    after = ?first.elapsed(),
                    "signal repeated right after the first, taken as the same stop: draining"
                );
            }
            eprintln!("ws2http: second signal, exiting without draining");
            // A profile file being written is finished first (no longer than the write takes).
            let _no_more_writes = profile::writes_finished();
            std::process::exit(1);
        });
    }
}

/// The next of any of the stop signals.
async fn any_of([term, int, hup]: &mut [Signal; 3]) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = hup.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_for(flags: &[&str]) -> Result<Config, String> {
        let args = Args::from_args(&["ws2http"], flags).expect("flags parse");
        config_from(&args)
    }

    #[test]
    fn a_min_concurrency_over_the_given_max_connections_is_refused_naming_both_flags() {
        let error = config_for(&[
            "--upstream-min-concurrency",
            "32",
            "--upstream-max-connections",
            "16",
        ])
        .unwrap_err();
        assert!(
            error.contains("--upstream-min-concurrency 32")
                && error.contains("--upstream-max-connections 16"),
            "{error}"
        );
        // Equal is a fixed limit; the default min is lowered to a smaller pool; a min alone
        // is lowered to the pool the open-file limit allows.
        for flags in [
            &[
                "--upstream-min-concurrency",
                "16",
                "--upstream-max-connections",
                "16",
            ][..],
            &["--upstream-max-connections", "16"][..],
            &["--upstream-min-concurrency", "4096"][..],
        ] {
            assert!(config_for(flags).is_ok(), "{flags:?}");
        }
        let default = config_for(&[]).unwrap();
        assert_eq!(
            default.upstream_min_concurrency,
            DEFAULT_UPSTREAM_MIN_CONCURRENCY
        );
    }

    #[test]
    fn origins_as_browsers_send_them_are_taken() {
        for origin in [
            "https://app.example.com",
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
            "http://[::ffff:7f00:1]",
            "http://[2001:DB8::7]:8443",
            "HTTPS://App.Example.com",
            "https://xn--bcher-kva.example",
            "https://a.example:1",
            "https://a.example:65535",
            "http://[2001:db8::7]",
            "null",
        ] {
            assert_eq!(check_origin(origin), Ok(()), "{origin}");
        }
    }

    #[test]
    fn entries_no_browser_sends_are_refused() {
        for origin in [
            "https://app.example.com/",
            "app.example.com",
            "*",
            "https://*.example.com",
            "https://app.example.com:443",
            "http://app.example.com:80",
            "https://bücher.example",
            "https://user@app.example.com",
        ] {
            assert!(check_origin(origin).is_err(), "{origin}");
        }
    }

    #[test]
    fn entries_with_a_bad_port_a_long_ipv6_form_or_an_unclosed_bracket_are_refused_naming_the_flag_and_entry(
    ) {
        // Each matches no origin a browser sends: every browser would get 403.
        for origin in [
            "https://a.example:abc",
            "https://a.example:",
            "https://a.example:0",
            "https://a.example:65536",
            "https://a.example:99999999999",
            "https://a.example:0443",
            "https://a.example:+443",
            "https://a.example:8080:9090",
            "http://[::1",
            "http://[::1:8080",
            "http://[::1]x",
            "http://[::1]:",
            "http://[::1]:0",
            "http://[not-ipv6]:8080",
            "http://::1",
            "http://a]b.example",
            "https://:8080",
            "http://[0:0:0:0:0:0:0:1]",
            "http://[2001:db8:0:0::7]",
            "http://[2001:0db8::7]",
            "http://[::ffff:127.0.0.1]",
        ] {
            let error = check_origin(origin).expect_err(origin);
            assert!(
                error.starts_with("--allowed-origins: ") && error.contains(origin),
                "{origin}: {error}"
            );
            assert!(!error.contains('\n'), "{origin}: {error}");
        }
    }
}
