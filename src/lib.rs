//! ws2http: a gateway that holds websocket connections and turns everything that happens on them
//! into plain HTTP requests to a stateless API, and the API's pushes back into websocket messages.
//!
//! [`Gateway::bind`] opens both listeners (port 0 works, for tests); [`Gateway::serve`] runs
//! until the given shutdown future resolves, then drains: in-flight requests finish, every
//! websocket gets `1001`, and the API gets one DELETE per connection.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod control;
mod departures;
pub mod handshake;
pub mod identity;
pub mod metrics;
pub mod profile;
pub mod registry;
pub mod server;
pub mod session;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, DescriptorBudget};
use departures::Departures;
use metrics::Metrics;
use registry::Registry;
use server::ControlListener;
use session::Command;
use upstream::Upstream;

/// State shared by every task of one gateway.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) budget: DescriptorBudget,
    pub(crate) upstream: Upstream,
    pub(crate) registry: Registry,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) connection_permits: Arc<Semaphore>,
    pub(crate) shutdown_deletes: Semaphore,
    /// Bytes of push bodies being read at once, one permit a byte: as many as one body on
    /// each control connection ([`config::CONTROL_CONNECTIONS`] × `--max-message-size`).
    pub(crate) push_bodies: Semaphore,
    pub(crate) departures: Departures,
    pub(crate) tasks: TaskTracker,
    /// Fires when the shutdown begins: the public listener stops accepting, and its
    /// connections whose request head has not arrived (silent, a head still coming, a TLS
    /// handshake not done) are closed rather than waited for.
    pub(crate) stop_public: CancellationToken,
    draining: AtomicBool,
    shutdown_deadline: OnceLock<Instant>,
}

impl Shared {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub(crate) fn shutdown_deadline(&self) -> Option<Instant> {
        self.shutdown_deadline.get().copied()
    }

    /// Stops new websockets: every upgrade request from now on is answered `503` before the
    /// API is asked, `/healthz` answers `404`, and the drain's deadline starts.
    fn stop_admitting(&self) {
        let _ = self
            .shutdown_deadline
            .set(Instant::now() + self.config.shutdown_timeout);
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Stops new websockets and asks every session to finish its work and close.
    fn begin_drain(&self) {
        self.stop_admitting();
        for session in self.registry.all() {
            session.command(Command::Shutdown);
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug)]
pub enum StartError {
    /// A listener could not be bound.
    Bind {
        /// Which flag named the address.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        error: std::io::Error,
    },
    /// A setting does not work (names the flag).
    Config(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind { flag, addr, error } => {
                write!(f, "{flag} {addr}: cannot listen: {error}")
            }
            StartError::Config(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for StartError {}

/// How long the DELETE senders get, once the grace period is over, to log what they give up.
const ABANDON_TIME: Duration = Duration::from_secs(1);

/// What a finished gateway did while draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections open when the drain started.
    pub sessions_at_shutdown: usize,
    /// Whether every session finished (and sent its DELETE) before the grace period ran out.
    pub completed: bool,
    /// DELETEs given up when the grace period ran out (the API unreachable or too slow for
    /// all of them; not sent, or sent and not answered), each logged with its ClientId.
    pub disconnects_untold: u64,
}

/// A gateway with its listeners bound, ready to serve.
pub struct Gateway {
    shared: Arc<Shared>,
    public: TcpListener,
    control: TcpListener,
    control_unix: Option<tokio::net::UnixListener>,
    tls: Option<TlsAcceptor>,
}

/// The process's open-file limit (soft), raised to the hard limit where allowed.
pub fn open_file_limit() -> usize {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, hard)) => {
            let raised = if soft < hard {
                rlimit::increase_nofile_limit(hard).unwrap_or(soft)
            } else {
                soft
            };
            usize::try_from(raised).unwrap_or(usize::MAX)
        }
        Err(_) => 1024,
    }
}

/// Checks every setting of `config` and splits this process's open-file limit for it: what
/// [`Gateway::bind`] does before it binds anything, for a caller that wants to know before it
/// starts anything else.
pub fn check(config: &Config) -> Result<DescriptorBudget, StartError> {
    // A flag that is wrong on its own is named before the budget it would upset.
    validate(config)?;
    DescriptorBudget::plan(config, open_file_limit()).map_err(StartError::Config)
}

#[cfg(test)]
impl Gateway {
    /// For unit tests: binds with `config`, its listeners on free loopback ports.
    pub(crate) async fn bind_on_free_ports(config: Config) -> Gateway {
        let config = Config {
            listen: ([127, 0, 0, 1], 0).into(),
            control_listen: ([127, 0, 0, 1], 0).into(),
            ..config
        };
        Gateway::bind(config).await.unwrap()
    }
}

impl Gateway {
    /// Binds both listeners and prepares the API client, with the descriptor budget derived from
    /// this process's open-file limit.
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let budget = check(&config)?;
        Gateway::bind_with_budget(config, budget).await
    }

    /// Like [`Gateway::bind`], with an explicit budget.
    pub async fn bind_with_budget(
        config: Config,
        budget: DescriptorBudget,
    ) -> Result<Gateway, StartError> {
        validate(&config)?;
        let tls = match &config.tls {
            Some(files) => Some(server::tls_acceptor(files).map_err(StartError::Config)?),
            None => None,
        };
        let metrics = Arc::new(Metrics::default());
        let upstream = Upstream::new(
            &config,
            budget.upstream_max_connections,
            budget.upstream_max_waiting,
            Arc::clone(&metrics),
        )
        .map_err(|e| StartError::Config(e.to_string()))?;
        let public = server::listen(config.listen).map_err(|error| StartError::Bind {
            flag: "--listen",
            addr: config.listen,
            error,
        })?;
        let control = server::listen(config.control_listen).map_err(|error| StartError::Bind {
            flag: "--control-listen",
            addr: config.control_listen,
            error,
        })?;
        let control_unix = match &config.control_unix_socket {
            Some(path) => Some(server::listen_unix(path).await.map_err(|error| {
                StartError::Config(format!(
                    "--control-unix-socket {}: cannot listen: {error}",
                    path.display()
                ))
            })?),
            None => None,
        };
        let shared = Arc::new(Shared {
            connection_permits: Arc::new(Semaphore::new(budget.max_connections)),
            shutdown_deletes: Semaphore::new(config.shutdown_delete_concurrency),
            push_bodies: Semaphore::new(
                config
                    .max_message_size
                    .saturating_mul(budget.control_connections)
                    .min(Semaphore::MAX_PERMITS),
            ),
            // Half the API slots at most: a crowd leaving at once leaves the other half to the
            // clients that stay, whose messages would otherwise wait behind its DELETEs (while
            // draining, when none stays, --shutdown-delete-concurrency of them).
            departures: Departures::default(),
            config,
            budget,
            upstream,
            registry: Registry::default(),
            metrics,
            tasks: TaskTracker::new(),
            stop_public: CancellationToken::new(),
            draining: AtomicBool::new(false),
            shutdown_deadline: OnceLock::new(),
        });
        Ok(Gateway {
            shared,
            public,
            control,
            control_unix,
            tls,
        })
    }

    /// Where websocket clients connect.
    pub fn public_addr(&self) -> SocketAddr {
        self.public
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// Where the API pushes.
    pub fn control_addr(&self) -> SocketAddr {
        self.control
            .local_addr()
            .unwrap_or(self.shared.config.control_listen)
    }

    /// How descriptors are split between websockets and API connections.
    pub fn budget(&self) -> DescriptorBudget {
        self.shared.budget
    }

    /// API requests always allowed at once (`--upstream-min-concurrency`, at most the API
    /// connections of the budget), as the adaptive limit applies it.
    pub fn upstream_min_concurrency(&self) -> usize {
        self.shared.upstream.min_concurrency()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> DrainReport {
        let Gateway {
            shared,
            public,
            control,
            control_unix,
            tls,
        } = self;
        let stop_public = shared.stop_public.clone();
        let stop_control = CancellationToken::new();
        let public_task = tokio::spawn(server::accept_public(
            public,
            tls,
            Arc::clone(&shared),
            stop_public.clone(),
        ));
        let control_slots = server::ControlSlots::new(&shared.budget);
        let control_task = tokio::spawn(server::accept_control(
            ControlListener::Network(control),
            control_slots.clone(),
            Arc::clone(&shared),
            stop_control.clone(),
        ));
        let control_unix_task = control_unix.map(|listener| {
            tokio::spawn(server::accept_control(
                ControlListener::UnixSocket(listener),
                control_slots,
                Arc::clone(&shared),
                stop_control.clone(),
            ))
        });
        shutdown.await;
        // Before the public sockets are told to stop: a request head that arrives while the
        // accept loop winds down is then answered `503` at once, not sent on to the API.
        shared.stop_admitting();
        stop_public.cancel();
        joined("public", public_task).await;
        let sessions_at_shutdown = shared.registry.len();
        tracing::info!(
            sessions = sessions_at_shutdown,
            "shutting down: finishing in-flight requests, closing websockets with 1001"
        );
        shared.begin_drain();
        Departures::drain_begun(&shared);
        shared.tasks.close();
        let config = &shared.config;
        let grace = config.shutdown_timeout + config.upstream_timeout * 2 + Duration::from_secs(5);
        let completed = server::finishes_within(grace, shared.tasks.wait()).await;
        let mut disconnects_untold = 0;
        if !completed {
            tracing::warn!(
                remaining = shared.tasks.len(),
                "shutdown grace period over; some sessions did not finish"
            );
            shared.departures.abandon();
            // The DELETE senders log what they give up, then end.
            server::finishes_within(ABANDON_TIME, shared.tasks.wait()).await;
            disconnects_untold = shared.departures.given_up();
        }
        stop_control.cancel();
        joined("control", control_task).await;
        if let Some(task) = control_unix_task {
            joined("control Unix socket", task).await;
            if let Some(path) = &shared.config.control_unix_socket {
                let _ = std::fs::remove_file(path);
            }
        }
        DrainReport {
            sessions_at_shutdown,
            completed,
            disconnects_untold,
        }
    }
}

/// Waits for the accept loop of the `which` listener to end; one that panicked is logged (it
/// would otherwise end unseen: the drain goes on without it).
async fn joined(which: &str, accept_loop: tokio::task::JoinHandle<()>) {
    if let Err(error) = accept_loop.await {
        tracing::error!(%error, "the {which} listener's accept loop failed");
    }
}

fn validate(config: &Config) -> Result<(), StartError> {
    let fail = |m: &str| Err(StartError::Config(m.to_owned()));
    if config.pipeline == 0 {
        return fail("--pipeline must be at least 1");
    }
    if config.max_message_size == 0 {
        return fail("--max-message-size must be at least 1 byte");
    }
    if u32::try_from(config.max_message_size).is_err() {
        // Each message is held whole in memory on its way through; and a session follows the
        // frames of a message still arriving with 32-bit lengths (`session::ReadProgress`).
        return fail("--max-message-size must be below 4GiB");
    }
    if config.upstream_min_concurrency == 0 {
        return fail("--upstream-min-concurrency must be at least 1");
    }
    if config.max_queued_messages == 0 {
        return fail("--max-queued-messages must be at least 1");
    }
    if config.max_queued_bytes == 0 {
        return fail("--max-queued-bytes must be at least 1 byte");
    }
    if let Some(interval) = config.ping_interval {
        if config.ping_timeout <= interval {
            return fail("--ping-timeout must be longer than --ping-interval");
        }
    }
    if config.upstream_timeout.is_zero() {
        return fail("--upstream-timeout must be more than 0");
    }
    if config.upstream_max_wait.is_zero() {
        return fail("--upstream-max-wait must be more than 0");
    }
    if config.handshake_timeout.is_zero() {
        return fail("--handshake-timeout must be more than 0");
    }
    if config.write_timeout.is_zero() {
        return fail("--write-timeout must be more than 0");
    }
    if config.idle_timeout.is_some_and(|t| t.is_zero()) {
        return fail("--idle-timeout must be more than 0 (leave it out for none)");
    }
    if config.max_connections == Some(0) {
        return fail("--max-connections must be at least 1");
    }
    if config.max_pending_handshakes == 0 {
        return fail("--max-pending-handshakes must be at least 1");
    }
    if config.upstream_max_connections == Some(0) {
        return fail("--upstream-max-connections must be at least 1");
    }
    if config.shutdown_delete_concurrency == 0 {
        return fail("--shutdown-delete-concurrency must be at least 1");
    }
    // The command line checks these too, naming the flag or variable they came from.
    for (token, flag) in [
        (&config.api_token, "--api-token"),
        (&config.control_token, "--control-token"),
    ] {
        if token
            .as_ref()
            .is_some_and(|t| !config::is_header_token(t.expose()))
        {
            return fail(&format!(
                "{flag} must be non-empty visible ASCII, without spaces"
            ));
        }
    }
    if config.api_ca.is_some() && (!config.api.is_https() || config.api_unix_socket.is_some()) {
        return fail(
            "--api-ca is for an https:// API reached over TCP; this API is called in plain HTTP",
        );
    }
    if let Some(message) = calls_itself(config) {
        return fail(&message);
    }
    if config.shutdown_delete_concurrency > Semaphore::MAX_PERMITS {
        return fail(&format!(
            "--shutdown-delete-concurrency must be at most {}",
            Semaphore::MAX_PERMITS
        ));
    }
    Ok(())
}

/// `path` with its directory resolved (links, `.`, `..`), so that two spellings of one file
/// compare equal; as given when the directory cannot be resolved.
pub fn resolved_path(path: &std::path::Path) -> std::path::PathBuf {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_owned(),
    }
}

/// Whether a connection to `api` can land on a listener bound to `listener` (the same port
/// assumed): the same address; a loopback or unspecified target of a listener on all addresses
/// (of its family, or any for `[::]`, which takes IPv4 too); an unspecified target of a
/// loopback listener. Both are compared in their canonical form: an IPv4-mapped IPv6 address
/// (`::ffff:127.0.0.1`) is the IPv4 address it maps, to a connect() and to a bind().
fn reaches(api: std::net::IpAddr, listener: std::net::IpAddr) -> bool {
    let (api, listener) = (api.to_canonical(), listener.to_canonical());
    let local = |ip: std::net::IpAddr| ip.is_loopback() || ip.is_unspecified();
    let same_family = api.is_ipv4() == listener.is_ipv4();
    api == listener
        || (listener.is_unspecified() && local(api) && (same_family || listener.is_ipv6()))
        || (api.is_unspecified() && local(listener) && same_family)
}

/// Why `config` would have the gateway send its API calls to itself, if it would: `--api` an
/// address and port that reach one of its listeners (see [`reaches`]), or `--api-unix-socket`
/// the path of its `--control-unix-socket`. The addresses are those known without DNS (see
/// [`config::ApiBase::addresses_known_without_dns`]): an IP address in any spelling
/// getaddrinfo reads (`127.1`, `0x7f.0.0.1`), and loopback for `localhost`. Any other host
/// name is not resolved, and a listener on all addresses is not matched with the host's other
/// addresses.
fn calls_itself(config: &Config) -> Option<String> {
    if let (Some(api), Some(control)) = (&config.api_unix_socket, &config.control_unix_socket) {
        if resolved_path(api) == resolved_path(control) {
            return Some(format!(
                "--api-unix-socket {} is this gateway's own --control-unix-socket: the API \
                 must be another server",
                api.display()
            ));
        }
    }
    if config.api_unix_socket.is_some() {
        return None;
    }
    let api = config.api.addresses_known_without_dns();
    [
        ("--listen", config.listen),
        ("--control-listen", config.control_listen),
    ]
    .into_iter()
    .find(|(_, listener)| {
        listener.port() != 0
            && api
                .iter()
                .any(|api| listener.port() == api.port() && reaches(api.ip(), listener.ip()))
    })
    .map(|(flag, listener)| {
        format!(
            "--api {} is this gateway's own {flag} {listener}: the API must be another server",
            config.api.as_str()
        )
    })
}

/// Binds and serves `config` until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<DrainReport, StartError> {
    let gateway = Gateway::bind(config).await?;
    Ok(gateway.serve(shutdown).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_address_reaches_a_listener_of_its_own_or_a_wildcard_of_its_family() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(reaches(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(reaches(ip("127.0.0.1"), ip("0.0.0.0")));
        assert!(reaches(ip("127.0.0.1"), ip("::")), "[::] is dual-stack");
        assert!(reaches(ip("::1"), ip("::")));
        assert!(reaches(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(
            !reaches(ip("::1"), ip("0.0.0.0")),
            "IPv4 wildcard, IPv6 target"
        );
        assert!(!reaches(ip("127.0.0.2"), ip("127.0.0.1")));
        assert!(!reaches(ip("10.0.0.1"), ip("127.0.0.1")));
    }

    fn config() -> Config {
        Config::default()
    }

    /// The start-up refusal of `api` with these listeners, if any.
    fn refusal(listen: &str, control: &str, api: &str) -> Option<String> {
        let config = Config {
            listen: listen.parse().unwrap(),
            control_listen: control.parse().unwrap(),
            api: api.parse().unwrap(),
            ..config()
        };
        validate(&config).err().map(|error| error.to_string())
    }

    #[test]
    fn an_api_that_spells_a_listener_as_an_ipv4_mapped_ipv6_address_is_refused() {
        // `[::ffff:127.0.0.1]` is 127.0.0.1 to a connect(): the gateway would call itself.
        for (listen, control, api, flag) in [
            (
                "127.0.0.1:27001",
                "127.0.0.1:27002",
                "http://[::ffff:127.0.0.1]:27001/",
                "--listen",
            ),
            (
                "0.0.0.0:27001",
                "127.0.0.1:27002",
                "http://[::ffff:127.0.0.1]:27001/",
                "--listen",
            ),
            (
                "127.0.0.1:27001",
                "[::ffff:127.0.0.1]:27002",
                "http://127.0.0.1:27002/",
                "--control-listen",
            ),
        ] {
            let error = refusal(listen, control, api)
                .unwrap_or_else(|| panic!("--api {api} with --listen {listen} passed"));
            assert!(
                error.contains(&format!("is this gateway's own {flag}")),
                "{error}"
            );
        }
        // Another port, or an IPv4-mapped address that is not the listener's, is another server.
        assert_eq!(
            refusal(
                "127.0.0.1:27001",
                "127.0.0.1:27002",
                "http://[::ffff:127.0.0.1]:27003/"
            ),
            None
        );
        assert_eq!(
            refusal(
                "127.0.0.1:27001",
                "127.0.0.1:27002",
                "http://[::ffff:10.0.0.1]:27001/"
            ),
            None
        );
    }

    #[test]
    fn an_api_that_spells_a_listener_as_getaddrinfo_would_read_it_is_refused() {
        // Each of these is an address of the listener to a connect() (getaddrinfo reads the
        // legacy IPv4 forms as inet_aton does; localhost is loopback), so the gateway would
        // call itself.
        let control = "127.0.0.1:27002";
        for (listen, api, flag) in [
            ("127.0.0.1:27001", "http://127.1:27001/", "--listen"),
            ("127.0.0.1:27001", "http://0x7f.0.0.1:27001/", "--listen"),
            ("127.0.0.1:27001", "http://2130706433:27001/", "--listen"),
            ("127.0.0.1:27001", "http://017700000001:27001/", "--listen"),
            ("127.0.0.1:27001", "http://0:27001/", "--listen"),
            ("127.0.0.1:27001", "http://localhost:27001/", "--listen"),
            (
                "127.0.0.1:27001",
                "http://LOCALHOST.:27002/",
                "--control-listen",
            ),
            ("0.0.0.0:27001", "http://api.localhost:27001/", "--listen"),
            ("[::1]:27001", "http://localhost:27001/", "--listen"),
            ("[::]:27001", "http://0x7f.1:27001/", "--listen"),
            ("0.0.0.0:27001", "http://127.1:27002/", "--control-listen"),
        ] {
            let error = refusal(listen, control, api)
                .unwrap_or_else(|| panic!("--api {api} with --listen {listen} passed"));
            let listener = if flag == "--listen" { listen } else { control };
            let listener = listener.parse::<std::net::SocketAddr>().unwrap();
            assert_eq!(
                error,
                format!(
                    "--api {api} is this gateway's own {flag} {listener}: the API must be \
                     another server"
                )
            );
        }
    }

    #[test]
    fn an_api_that_only_looks_like_a_listener_is_not_refused() {
        for api in [
            // Another address, or another port.
            "http://127.2:27001/",
            "http://127.1:27003/",
            "http://localhost:27003/",
            // Not an address to getaddrinfo, but a name it would ask DNS for.
            "http://0x7g.1:27001/",
            "http://256.1:27001/",
            "http://127.1.:27001/",
            // A host name is not resolved at start-up.
            "http://api.internal:27001/",
            "http://localhost.example:27001/",
        ] {
            assert_eq!(
                refusal("127.0.0.1:27001", "127.0.0.1:27002", api),
                None,
                "{api}"
            );
        }
        // 0.0.0.0 reaches an IPv4 listener only.
        assert_eq!(
            refusal("[::1]:27001", "127.0.0.1:27002", "http://0:27001/"),
            None
        );
    }

    #[test]
    fn a_max_message_size_of_4_gib_or_more_is_refused_with_its_flag() {
        let with = |size: usize| {
            validate(&Config {
                max_message_size: size,
                ..config()
            })
            .err()
            .map(|error| error.to_string())
        };
        assert_eq!(with(u32::MAX as usize), None);
        assert_eq!(
            with(u32::MAX as usize + 1).as_deref(),
            Some("--max-message-size must be below 4GiB")
        );
    }

    #[test]
    fn a_token_that_cannot_travel_in_a_header_is_refused_with_its_flag() {
        for (token, good) in [
            ("abc123", true),
            ("two words", false),
            ("", false),
            ("é", false),
        ] {
            let mut api = config();
            api.api_token = Some(token.into());
            let mut control = config();
            control.control_token = Some(token.into());
            for (config, flag) in [(api, "--api-token"), (control, "--control-token")] {
                match validate(&config) {
                    Ok(()) => assert!(good, "{flag} {token:?} passed"),
                    Err(error) => {
                        assert!(!good, "{flag} {token:?}: {error}");
                        assert!(error.to_string().starts_with(flag), "{error}");
                    }
                }
            }
        }
    }
}
