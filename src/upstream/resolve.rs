//! The resolver the API connector looks up `--api`'s host name with: getaddrinfo on tokio's
//! blocking pool, as hyper-util's `GaiResolver` does, but at most [`LOOKUPS_AT_ONCE`] lookups
//! at a time, so that the descriptors they hold are bounded and counted in the budget
//! ([`crate::config::DescriptorBudget::lookups`]).
//!
//! A getaddrinfo call cannot be stopped once it runs. The connection attempt that asked for it
//! may give up (at half `--upstream-timeout`) and drop its future; the call goes on, with its
//! socket, for up to 10 s when the resolver does not answer (glibc: 5 s a try, twice). So a
//! lookup holds its place until the call itself returns, not until its asker stops waiting.
//! A lookup waiting for a place is a plain future: the attempt's own time bounds the wait
//! (`connect_network` in `pool.rs` times the whole connector call, lookup included).

use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
use tokio::sync::Semaphore;
use tokio_util::task::AbortOnDropHandle;
use tower_service::Service;

use crate::config::LOOKUPS_AT_ONCE;

/// A blocking lookup of a host name's addresses, their ports 0.
pub(super) type Lookup = Arc<dyn Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync>;

/// The addresses a lookup found, their ports 0 (the connector sets the port).
pub(super) type Addresses = std::vec::IntoIter<SocketAddr>;

/// Looks up host names with at most a fixed number of lookups at once; its clones share
/// the places.
#[derive(Clone)]
pub(super) struct BoundedResolver {
    /// One permit per lookup that may run at once; a lookup's permit goes with it into the
    /// blocking pool.
    places: Arc<Semaphore>,
    /// The blocking call: getaddrinfo, or a stand-in in tests.
    lookup: Lookup,
}

impl BoundedResolver {
    /// getaddrinfo, [`LOOKUPS_AT_ONCE`] at a time.
    pub(super) fn new() -> BoundedResolver {
        BoundedResolver::with_lookup(LOOKUPS_AT_ONCE, Arc::new(getaddrinfo))
    }

    /// `lookup`, `places` at a time (tests stand in for getaddrinfo with it).
    pub(super) fn with_lookup(places: usize, lookup: Lookup) -> BoundedResolver {
        BoundedResolver {
            places: Arc::new(Semaphore::new(places)),
            lookup,
        }
    }
}

/// `host`'s addresses by getaddrinfo (as `GaiResolver` asks for them: port 0, any family).
fn getaddrinfo(host: &str) -> io::Result<Vec<SocketAddr>> {
    (host, 0).to_socket_addrs().map(Iterator::collect)
}

impl Service<Name> for BoundedResolver {
    type Response = Addresses;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Addresses>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The wait for a place is in the lookup's future, which the attempt's timeout bounds.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let places = self.places.clone();
        let lookup = self.lookup.clone();
        Box::pin(async move {
            let place = places
                .acquire_owned()
                .await
                .map_err(|_| io::Error::other(format!("{name}: the resolver is closed")))?;
            let host = name.as_str().to_owned();
            // The place goes into the blocking call and is given back when the call returns,
            // whether or not anyone still waits for its answer. Dropping this future before
            // the call has started drops the call, and the place with it.
            let blocking = AbortOnDropHandle::new(tokio::task::spawn_blocking(move || {
                let _place = place;
                lookup(&host)
                    .map_err(|error| io::Error::new(error.kind(), format!("{host}: {error}")))
            }));
            match blocking.await {
                Ok(found) => found.map(Vec::into_iter),
                Err(failed) => Err(io::Error::other(format!(
                    "{name}: the lookup failed: {failed}"
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// A lookup that blocks until it is let go, one [`Gate::release`] each, counting the
    /// lookups that started; each answers `[127.0.0.1:0]`.
    struct Gate {
        started: AtomicUsize,
        release: Mutex<mpsc::Sender<()>>,
        released: Mutex<mpsc::Receiver<()>>,
    }

    impl Gate {
        fn new() -> Arc<Gate> {
            let (release, released) = mpsc::channel();
            Arc::new(Gate {
                started: AtomicUsize::new(0),
                release: Mutex::new(release),
                released: Mutex::new(released),
            })
        }

        /// A resolver with `places` whose lookups wait at this gate.
        fn resolver(self: &Arc<Gate>, places: usize) -> BoundedResolver {
            let gate = self.clone();
            BoundedResolver::with_lookup(
                places,
                Arc::new(move |_host: &str| {
                    gate.started.fetch_add(1, Ordering::SeqCst);
                    // Not for ever: a test that fails while a lookup waits here must end, not hang.
                    let _ = gate
                        .released
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(10));
                    Ok(vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))])
                }),
            )
        }

        fn started(&self) -> usize {
            self.started.load(Ordering::SeqCst)
        }

        /// Lets one blocked lookup (or the next to block) return.
        fn release(&self) {
            self.release.lock().unwrap().send(()).unwrap();
        }

        /// Waits (up to 5 s) until `count` lookups have started.
        async fn wait_for_started(&self, count: usize) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while self.started() < count {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} of {count} lookups started",
                    self.started()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    fn name(host: &str) -> Name {
        host.parse().unwrap()
    }

    #[tokio::test]
    async fn a_lookup_over_the_places_waits_until_one_is_given_back() {
        let gate = Gate::new();
        let mut resolver = gate.resolver(2);
        let lookups: Vec<_> = (0..3)
            .map(|_| tokio::spawn(resolver.call(name("api.internal"))))
            .collect();
        gate.wait_for_started(2).await;
        // The third waits for a place while the two are blocked.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(gate.started(), 2);
        assert!(lookups.iter().all(|lookup| !lookup.is_finished()));
        // One returns: its place goes to the third.
        gate.release();
        gate.wait_for_started(3).await;
        gate.release();
        gate.release();
        for lookup in lookups {
            let addresses: Vec<_> = lookup.await.unwrap().unwrap().collect();
            assert_eq!(addresses, [SocketAddr::from((Ipv4Addr::LOCALHOST, 0))]);
        }
        assert_eq!(resolver.places.available_permits(), 2);
    }

    #[tokio::test]
    async fn a_lookup_whose_attempt_gave_up_keeps_its_place_until_getaddrinfo_returns() {
        let gate = Gate::new();
        let mut resolver = gate.resolver(1);
        // The attempt gives up while its lookup is blocked, and drops the lookup's future.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            resolver.call(name("api.internal")),
        )
        .await;
        assert!(gave_up.is_err());
        assert_eq!(gate.started(), 1);
        // The blocking call still holds the place: the next lookup waits, to its own timeout.
        let next = tokio::time::timeout(
            Duration::from_millis(300),
            resolver.call(name("api.internal")),
        )
        .await;
        assert!(
            next.is_err(),
            "a second lookup ran while the first was blocked"
        );
        assert_eq!(gate.started(), 1);
        assert_eq!(resolver.places.available_permits(), 0);
        // The call returns, nobody wants its answer, and its place is free again.
        gate.release();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while resolver.places.available_permits() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the place is still held"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gate.release();
        let addresses: Vec<_> = resolver.call(name("api.internal")).await.unwrap().collect();
        assert_eq!(addresses, [SocketAddr::from((Ipv4Addr::LOCALHOST, 0))]);
        assert_eq!(gate.started(), 2);
    }

    #[tokio::test]
    async fn the_addresses_and_errors_of_a_lookup_pass_through() {
        let both = [
            SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
            SocketAddr::from(([10, 0, 0, 7], 0)),
        ];
        let mut resolver = BoundedResolver::with_lookup(
            1,
            Arc::new(move |host: &str| match host {
                "api.internal" => Ok(both.to_vec()),
                _ => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "failed to lookup address information: Name or service not known",
                )),
            }),
        );
        let found: Vec<_> = resolver.call(name("api.internal")).await.unwrap().collect();
        assert_eq!(found, both);
        let error = resolver.call(name("nowhere.internal")).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            error.to_string(),
            "nowhere.internal: failed to lookup address information: Name or service not known"
        );
        assert_eq!(resolver.places.available_permits(), 1);
    }

    #[tokio::test]
    async fn getaddrinfo_answers_for_localhost_with_port_zero() {
        let found: Vec<_> = BoundedResolver::new()
            .call(name("localhost"))
            .await
            .unwrap()
            .collect();
        assert!(
            found.contains(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                || found.contains(&SocketAddr::from((Ipv6Addr::LOCALHOST, 0))),
            "{found:?}"
        );
        assert!(found.iter().all(|address| address.port() == 0), "{found:?}");
    }
}
