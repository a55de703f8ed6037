//! The DELETEs of connections that have ended, queued and sent by a few tasks.
//!
//! A session hands its DELETE over here and its task ends, giving back everything it held but
//! the little this queue keeps (the connection's context, the close reason and the connection
//! permit). When a crowd leaves at once, the DELETEs wait here in order, sent by at most one
//! task per two API slots, of those the API has now (the other half stays free for the clients
//! that remain; the number follows the adaptive concurrency limit; while the gateway drains,
//! when no client stays, up to `--shutdown-delete-concurrency` of all the slots), instead of
//! each departed session waiting with a whole request of its own: memory stays near what the
//! crowd held, and no DELETE is refused for lack of a waiting place.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::metrics::DisconnectLoad;
use crate::upstream::{ApiAnswer, ConnectionContext, UpstreamError};
use crate::Shared;

/// Further tries of a DELETE that could not be sent, waiting 250 ms, 500 ms, ... 8 s before each.
const DELETE_RETRIES: usize = 6;
/// Wait before the first retry of a DELETE; doubled for each next one.
const DELETE_RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// Room for departures kept once the queue is empty again.
const KEPT_CAPACITY: usize = 64;

/// One ended connection whose API has not been told yet.
pub(crate) struct Departure {
    /// The connection's ClientId, ConnectionId and forwarded headers.
    pub(crate) context: Arc<ConnectionContext>,
    /// Body of the DELETE: the close reason.
    pub(crate) reason: Bytes,
    /// `X-Close-Code` of the DELETE, if the close had a code.
    pub(crate) code: Option<u16>,
    /// The connection's place under `--max-connections`, given back once the API was told, so
    /// the queue never holds more than that many departures.
    pub(crate) permit: OwnedSemaphorePermit,
    /// Tries of its DELETE made so far (by whichever sender; see [`Departures::hand_back`]).
    pub(crate) tries: u8,
}

/// Departures waiting for their DELETE, and how many tasks are sending them (each sends one
/// DELETE at a time).
#[derive(Default)]
pub(crate) struct Departures {
    state: Mutex<QueueState>,
    /// Fired when the shutdown's grace period is over: the DELETEs not sent by then are given
    /// up, each logged and counted.
    abandoned: CancellationToken,
    /// DELETEs given up that way.
    given_up: AtomicU64,
}

#[derive(Default)]
struct QueueState {
    waiting: VecDeque<Departure>,
    senders: usize,
    /// Departures taken from the queue whose DELETE is not done yet: being sent, or waiting
    /// to be tried again.
    in_flight: usize,
}

impl Departures {
    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// DELETEs of ended connections: queued, not started yet; and started, not done yet
    /// (being sent, or waiting to be tried again).
    pub(crate) fn load(&self) -> DisconnectLoad {
        let state = self.state();
        DisconnectLoad {
            waiting: state.waiting.len(),
            in_flight: state.in_flight,
        }
    }

    /// A departure taken by [`Departures::next_or_retire`] is done with: told, given up, or
    /// abandoned.
    fn done_with_one(&self) {
        let mut state = self.state();
        state.in_flight = state.in_flight.saturating_sub(1);
    }

    /// Gives up on every DELETE not sent yet (the shutdown's grace period is over): the
    /// senders stop, and log each one, queued or being sent, with its ClientId and count it
    /// in `disconnects_failed`.
    pub(crate) fn abandon(&self) {
        self.abandoned.cancel();
    }

    /// DELETEs given up at the end of the shutdown's grace period.
    pub(crate) fn given_up(&self) -> u64 {
        self.given_up.load(Ordering::Relaxed)
    }

    /// Everything still queued, for a sender that is giving up.
    fn take_all(&self) -> VecDeque<Departure> {
        std::mem::take(&mut self.state().waiting)
    }

    /// Queues `departure`; starts a sender task (tracked, so shutdown waits for it) when fewer
    /// than allowed are running.
    pub(crate) fn push(shared: &Arc<Shared>, departure: Departure) {
        if shared
            .departures
            .enqueue(departure, senders_allowed(shared))
        {
            shared.tasks.spawn(send_departures(Arc::clone(shared)));
        }
    }

    /// Starts the senders that the drain allows beyond those running, for departures queued
    /// before it began (the sessions that end in the drain start theirs as they queue).
    pub(crate) fn drain_begun(shared: &Arc<Shared>) {
        let allowed = senders_allowed(shared);
        let more = {
            let mut state = shared.departures.state();
            let more = allowed
                .saturating_sub(state.senders)
                .min(state.waiting.len());
            state.senders += more;
            more
        };
        for _ in 0..more {
            shared.tasks.spawn(send_departures(Arc::clone(shared)));
        }
    }

    /// Queues `departure`; true when the caller is to start one more sender (counted now),
    /// `allowed` being running at most ([`senders_allowed`]).
    fn enqueue(&self, departure: Departure, allowed: usize) -> bool {
        let mut state = self.state();
        state.waiting.push_back(departure);
        let start = state.senders < allowed;
        if start {
            state.senders += 1;
        }
        start
    }

    /// Puts `departure`, whose DELETE is to be tried again, back at the head of the queue and
    /// counts the asking sender out, when more senders run than `allowed` (the API's slots went
    /// down since it took it): a DELETE waiting to be tried again holds no slot, and another
    /// sender takes it on with its tries so far. Gives it back to the caller otherwise.
    fn hand_back(&self, departure: Departure, allowed: usize) -> Option<Departure> {
        let mut state = self.state();
        if state.senders <= allowed {
            return Some(departure);
        }
        state.senders -= 1;
        state.in_flight = state.in_flight.saturating_sub(1);
        state.waiting.push_front(departure);
        None
    }

    /// Whether more senders run than `allowed`.
    fn too_many_senders(&self, allowed: usize) -> bool {
        self.state().senders > allowed
    }

    /// The next departure to send, or `None` after counting the asking sender out: when the
    /// queue is empty, or when more senders run than `allowed` ([`senders_allowed`] now).
    fn next_or_retire(&self, allowed: usize) -> Option<Departure> {
        let mut state = self.state();
        if state.senders > allowed {
            state.senders -= 1;
            return None;
        }
        let next = state.waiting.pop_front();
        if next.is_some() {
            state.in_flight += 1;
        } else {
            state.senders -= 1;
            // A crowd's departures took room for all of them (64 bytes each); give it back.
            if state.waiting.capacity() > KEPT_CAPACITY {
                state.waiting = VecDeque::new();
            }
        }
        next
    }
}

/// Senders allowed now: [`allowed_senders`] of the API's slots of the moment (the adaptive
/// limit's current value), and of `--shutdown-delete-concurrency` once the gateway drains.
fn senders_allowed(shared: &Shared) -> usize {
    let drain_cap = shared
        .is_draining()
        .then_some(shared.config.shutdown_delete_concurrency);
    allowed_senders(shared.upstream.concurrency_limit(), drain_cap)
}

/// Senders allowed when the API has `api_slots` slots now (never more than
/// `--upstream-max-connections`): half of them, at least one, so that the clients that stay
/// keep the other half. While the gateway drains (`drain_cap` is then
/// `--shutdown-delete-concurrency`) no client stays that would need them: as many as the cap,
/// up to all the slots. (Senders hold at most half the slots otherwise, and the limit grows
/// only when every slot is taken, so with half a cap above it could never be reached; and
/// each DELETE of a drain takes one of the cap's places, so a sender beyond the cap would
/// only hold a DELETE while it waits for one.)
fn allowed_senders(api_slots: usize, drain_cap: Option<usize>) -> usize {
    match drain_cap {
        Some(cap) => cap.min(api_slots).max(1),
        None => (api_slots / 2).max(1),
    }
}

/// One sender: sends queued DELETEs one after another until the queue is empty, or until
/// they are abandoned.
async fn send_departures(shared: Arc<Shared>) {
    let queue = &shared.departures;
    let mut next = queue.next_or_retire(senders_allowed(&shared));
    while let Some(mut departure) = next {
        let told = tokio::select! {
            biased;
            _ = queue.abandoned.cancelled() => None,
            tried = notify_api(&shared, &mut departure) => Some(tried),
        };
        match told {
            Some(Tried::ToTryAgain) => {
                // Fewer senders are allowed now: it goes back to the queue, unless that
                // changed meanwhile (then this sender tries it again itself).
                next = queue.hand_back(departure, senders_allowed(&shared));
                if next.is_none() {
                    return;
                }
                continue;
            }
            Some(Tried::Done) => {
                drop(departure.permit);
                queue.done_with_one();
            }
            None => {
                drop(departure.permit);
                queue.done_with_one();
                let left = queue.take_all();
                // Counted before the lines are logged: the stop line reads the count a fixed
                // time after the senders were told to give up, and logging many lines may
                // take longer.
                given_up_in_time(&shared, 1 + left.len() as u64);
                log_not_told_in_time(&departure.context);
                for left in left {
                    log_not_told_in_time(&left.context);
                }
            }
        }
        next = queue.next_or_retire(senders_allowed(&shared));
    }
}

/// Counts `n` DELETEs given up at the end of the shutdown's grace period.
fn given_up_in_time(shared: &Shared, n: u64) {
    shared
        .metrics
        .disconnects_failed
        .fetch_add(n, Ordering::Relaxed);
    shared.departures.given_up.fetch_add(n, Ordering::Relaxed);
}

/// Logs a DELETE given up at the end of the shutdown's grace period: not sent, or sent and
/// not answered (the API may have it).
fn log_not_told_in_time(context: &ConnectionContext) {
    tracing::warn!(
        client_id = %context.client_id,
        connection_id = %context.connection_id,
        "DELETE given up: the shutdown grace period ran out before the API took it \
         (not sent, or not answered)"
    );
}

/// How far a sender took a departure's DELETE.
enum Tried {
    /// Told, or failed for good: counted and logged.
    Done,
    /// Could not be sent, and is to be tried again; but more senders run than the API's slots
    /// allow now, so this one gives it back ([`Departures::hand_back`]).
    ToTryAgain,
}

/// Sends one DELETE, trying again while it could not be sent; counts and logs the outcome.
/// Before each further try, stops when more senders run than allowed now, so that the DELETEs
/// that retry keep to half of the API's slots of the moment as the limit goes down.
async fn notify_api(shared: &Shared, departure: &mut Departure) -> Tried {
    let result = loop {
        if departure.tries > 0 {
            if shared.departures.too_many_senders(senders_allowed(shared)) {
                return Tried::ToTryAgain;
            }
            let doublings = u32::from(departure.tries - 1);
            tokio::time::sleep(DELETE_RETRY_BACKOFF * 2u32.pow(doublings)).await;
        }
        let context = &departure.context;
        let result = send_delete(shared, context, departure.reason.clone(), departure.code).await;
        departure.tries += 1;
        if !worth_another_try(&result) || usize::from(departure.tries) > DELETE_RETRIES {
            break result;
        }
    };
    report(shared, &departure.context, result);
    Tried::Done
}

/// Counts and logs the outcome of a DELETE's last try.
fn report(shared: &Shared, context: &ConnectionContext, result: Result<ApiAnswer, UpstreamError>) {
    let unavailable = worth_another_try(&result);
    match result {
        Ok(answer) if !unavailable => {
            shared
                .metrics
                .disconnects_notified
                .fetch_add(1, Ordering::Relaxed);
            if answer.status.is_success() {
                return;
            }
            tracing::warn!(
                client_id = %context.client_id,
                connection_id = %context.connection_id,
                status = %answer.status,
                "API answered the DELETE with an error status"
            );
        }
        failed => {
            shared
                .metrics
                .disconnects_failed
                .fetch_add(1, Ordering::Relaxed);
            // A timeout or a broken connection may have come after the API took the DELETE;
            // a 502/503 is a proxy's, and the API may have been reached behind it.
            let (why, told) = match failed {
                Ok(answer) => (
                    format!("it stayed unavailable ({})", answer.status),
                    "the API may not have been told of this disconnect",
                ),
                Err(error) if error.outcome_unknown() => (
                    error.to_string(),
                    "the API may not have been told of this disconnect",
                ),
                Err(error) => (error.to_string(), "the API was not told of this disconnect"),
            };
            tracing::warn!(
                client_id = %context.client_id,
                connection_id = %context.connection_id,
                why,
                "{told}"
            );
        }
    }
}

/// One try of a DELETE; while shutting down, as one of at most `--shutdown-delete-concurrency`
/// (checked at each try, so that a retry waiting when the drain began keeps to it too).
async fn send_delete(
    shared: &Shared,
    context: &ConnectionContext,
    reason: Bytes,
    code: Option<u16>,
) -> Result<ApiAnswer, UpstreamError> {
    let _permit = if shared.is_draining() {
        shared.shutdown_deletes.acquire().await.ok()
    } else {
        None
    };
    shared.upstream.disconnect(context, reason, code).await
}

/// Whether a DELETE is sent again: one refused before it was sent (no API slot free, the API
/// not reachable), or answered `502`/`503` (a proxy in front of an API that could not take it:
/// restarting, no worker free). The API must hear of every disconnect; a 503 says it did not
/// act on this one, a 502 usually means so too, though a worker that failed after its write
/// makes the API see the DELETE twice (README, "The DELETE is not lost"). One that timed out
/// or broke after it was sent is not: the API may have acted.
fn worth_another_try(result: &Result<ApiAnswer, UpstreamError>) -> bool {
    match result {
        Err(UpstreamError::Overloaded | UpstreamError::Unreachable(_)) => true,
        Ok(answer) => matches!(
            answer.status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
        ),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::identity::{ClientId, ConnectionId};
    use crate::metrics::Metrics;
    use crate::upstream::Upstream;
    use http::HeaderMap;
    use tokio::sync::Semaphore;

    fn test_upstream() -> Upstream {
        Upstream::new(&Config::default(), 4, 16, Arc::new(Metrics::default())).unwrap()
    }

    fn departure(upstream: &Upstream, client: &str) -> Departure {
        let context = upstream
            .context(
                ConnectionId::next(),
                ClientId::from_path(client).unwrap(),
                &HeaderMap::new(),
            )
            .unwrap();
        Departure {
            context: Arc::new(context),
            reason: Bytes::from_static(b"EOF"),
            code: None,
            permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            tries: 0,
        }
    }

    /// Queues a departure per client with the API at `api_slots`; says which started a sender.
    fn enqueue_all(
        queue: &Departures,
        upstream: &Upstream,
        clients: &[&str],
        api_slots: usize,
    ) -> Vec<bool> {
        clients
            .iter()
            .map(|c| queue.enqueue(departure(upstream, c), allowed_senders(api_slots, None)))
            .collect()
    }

    /// The ClientIds one sender takes from the queue, in order, until it retires.
    fn sent_by_one_sender(queue: &Departures, api_slots: usize) -> Vec<String> {
        std::iter::from_fn(|| queue.next_or_retire(allowed_senders(api_slots, None)))
            .map(|d| d.context.client_id.as_str().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn departures_leave_in_order_with_at_most_the_allowed_senders() {
        let upstream = test_upstream();
        // Four API slots: two senders.
        let queue = Departures::default();
        let started = enqueue_all(&queue, &upstream, &["/a", "/b", "/c", "/d"], 4);
        assert_eq!(started, [true, true, false, false], "two senders at most");
        assert_eq!(queue.load().waiting, 4);
        assert_eq!(sent_by_one_sender(&queue, 4), ["a", "b", "c", "d"]);
        // The sender that found the queue empty retired; once the other one does too, new
        // departures start senders again, two at most.
        assert!(queue.next_or_retire(allowed_senders(4, None)).is_none());
        let started = enqueue_all(&queue, &upstream, &["/e", "/f", "/g"], 4);
        assert_eq!(started, [true, true, false]);
    }

    #[tokio::test]
    async fn a_departure_taken_from_the_queue_counts_in_flight_until_done_with() {
        let upstream = test_upstream();
        let queue = Departures::default();
        enqueue_all(&queue, &upstream, &["/a", "/b"], 4);
        let load = |waiting, in_flight| DisconnectLoad { waiting, in_flight };
        assert_eq!(queue.load(), load(2, 0));
        let first = queue
            .next_or_retire(allowed_senders(4, None))
            .expect("one queued");
        assert_eq!(queue.load(), load(1, 1), "being sent");
        drop(first);
        queue.done_with_one();
        assert_eq!(queue.load(), load(1, 0));
    }

    #[tokio::test]
    async fn an_emptied_queue_gives_back_a_crowds_room() {
        let upstream = test_upstream();
        let queue = Departures::default();
        for i in 0..1000 {
            queue.enqueue(departure(&upstream, &format!("/c{i}")), 1);
        }
        assert!(queue.state().waiting.capacity() >= 1000);
        while queue.next_or_retire(allowed_senders(2, None)).is_some() {}
        assert!(queue.state().waiting.capacity() <= KEPT_CAPACITY);
    }

    #[tokio::test]
    async fn senders_follow_the_api_slots_of_the_moment() {
        let upstream = test_upstream();
        let queue = Departures::default();
        let started = enqueue_all(&queue, &upstream, &["/a", "/b", "/c", "/d"], 4);
        assert_eq!(started, [true, true, false, false], "half of four slots");
        // The limit went down to two slots: one sender is one too many and retires although
        // departures wait; the other goes on with them.
        assert!(queue.next_or_retire(allowed_senders(2, None)).is_none());
        assert_eq!(sent_by_one_sender(&queue, 2), ["a", "b", "c", "d"]);
        assert_eq!(queue.state().senders, 0);
        // Even with a single slot, one sender is allowed.
        assert_eq!(allowed_senders(1, None), 1);
        assert!(queue.enqueue(departure(&upstream, "/e"), allowed_senders(1, None)));
        assert!(!queue.enqueue(departure(&upstream, "/f"), allowed_senders(1, None)));
    }

    #[tokio::test]
    async fn a_delete_to_try_again_goes_back_to_the_queue_when_the_api_slots_went_down() {
        let upstream = test_upstream();
        let queue = Departures::default();
        // Eight slots: four senders, each with a DELETE that could not be sent.
        let started = enqueue_all(&queue, &upstream, &["/a", "/b", "/c", "/d", "/e"], 8);
        assert_eq!(started, [true, true, true, true, false]);
        let mut taken: Vec<Departure> = (0..4)
            .map(|_| queue.next_or_retire(allowed_senders(8, None)).unwrap())
            .collect();
        for departure in &mut taken {
            departure.tries = 2;
        }
        // The limit went down to two slots: one sender allowed. Three give theirs back and
        // retire; the last one keeps its own.
        assert!(queue.too_many_senders(allowed_senders(2, None)));
        let mut kept = Vec::new();
        for departure in taken.into_iter().rev() {
            kept.extend(queue.hand_back(departure, allowed_senders(2, None)));
        }
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].context.client_id.as_str(), "a");
        assert!(!queue.too_many_senders(allowed_senders(2, None)));
        assert_eq!(
            queue.load(),
            DisconnectLoad {
                waiting: 4,
                in_flight: 1
            }
        );
        // The remaining sender takes them on in the order they left, with their tries so far.
        let next: Vec<(String, u8)> =
            std::iter::from_fn(|| queue.next_or_retire(allowed_senders(2, None)))
                .map(|d| (d.context.client_id.as_str().to_owned(), d.tries))
                .collect();
        let names: Vec<&str> = next.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["b", "c", "d", "e"]);
        assert_eq!(
            next.iter().map(|(_, tries)| *tries).collect::<Vec<_>>(),
            [2, 2, 2, 0]
        );
    }

    /// What the API of [`a_sender_gives_back_its_delete_to_retry_when_the_api_slots_go_down`]
    /// has seen, and what it waits for before it answers.
    #[derive(Default)]
    struct ScriptedApi {
        /// The ClientIds of the DELETEs it received, in order, with when each came.
        deletes: Mutex<Vec<(String, std::time::Instant)>>,
        /// Cancelled once the limit went down: the first DELETE of `a` is answered `503` then.
        limit_lowered: CancellationToken,
        /// Cancelled once `a` went back to the queue: the DELETE of `b` is answered then.
        a_handed_back: CancellationToken,
    }

    impl ScriptedApi {
        /// The ClientIds of the DELETEs received so far, in order.
        fn deletes(&self) -> Vec<String> {
            let deletes = self.deletes.lock().unwrap();
            deletes.iter().map(|(client, _)| client.clone()).collect()
        }

        /// Serves this script on a loopback port: a DELETE of `a` is answered `503` the first
        /// time, once [`ScriptedApi::limit_lowered`], and `200` after; one of `b` `200` once
        /// [`ScriptedApi::a_handed_back`]; any other `200` at once. A POST to `slow` is
        /// answered `504` after a second (past the slow mark of a 50 ms pace); any other
        /// POST `200` after 50 ms. Its URL.
        async fn serve(self: &Arc<Self>) -> String {
            let script = Arc::clone(self);
            crate::upstream::loopback_api(hyper::service::service_fn(
                move |request: http::Request<hyper::body::Incoming>| {
                    let script = Arc::clone(&script);
                    async move {
                        let client = request.uri().path().trim_start_matches('/').to_owned();
                        let status = if request.method() == http::Method::DELETE {
                            let first_of_a = {
                                let mut deletes = script.deletes.lock().unwrap();
                                deletes.push((client.clone(), std::time::Instant::now()));
                                client == "a"
                                    && deletes.iter().filter(|(c, _)| c == "a").count() == 1
                            };
                            if first_of_a {
                                script.limit_lowered.cancelled().await;
                                503
                            } else if client == "b" {
                                script.a_handed_back.cancelled().await;
                                200
                            } else {
                                200
                            }
                        } else if client == "slow" {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            504
                        } else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            200
                        };
                        http::Response::builder()
                            .status(status)
                            .body(http_body_util::Full::new(Bytes::new()))
                    }
                },
            ))
            .await
        }
    }

    /// Waits, at most 5 s, until `done`.
    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "waited 5 s for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_sender_gives_back_its_delete_to_retry_when_the_api_slots_go_down() {
        let api = Arc::new(ScriptedApi::default());
        let config = Config {
            api: api.serve().await.parse().unwrap(),
            upstream_min_concurrency: 2,
            upstream_max_connections: Some(4),
            ..Config::default()
        };
        let gateway = crate::Gateway::bind_on_free_ports(config).await;
        let shared = Arc::clone(&gateway.shared);
        let queue = &shared.departures;
        // Two API slots to start with; four messages at once, answered at the API's pace while
        // every slot is taken, grow the limit to its maximum, four: two senders allowed.
        let grow = departure(&shared.upstream, "/grow").context;
        let grown = futures_util::future::join_all(
            (0..4).map(|_| shared.upstream.message(&grow, Bytes::new(), false)),
        )
        .await;
        assert!(grown
            .iter()
            .all(|r| r.as_ref().is_ok_and(|a| a.status == 200)));
        assert_eq!(shared.upstream.concurrency_limit(), 4, "the limit grew");
        assert_eq!(senders_allowed(&shared), 2);
        // Two senders take `a` and `b`; `c` waits in the queue.
        Departures::push(&shared, departure(&shared.upstream, "/a"));
        wait_until("the DELETE of a", || api.deletes() == ["a"]).await;
        Departures::push(&shared, departure(&shared.upstream, "/b"));
        wait_until("the DELETE of b", || api.deletes() == ["a", "b"]).await;
        Departures::push(&shared, departure(&shared.upstream, "/c"));
        assert_eq!(queue.state().senders, 2);
        // A message answered `504` past the API's pace is a slow answer: the limit goes down
        // to three slots, one sender allowed.
        let slow = departure(&shared.upstream, "/slow").context;
        let answer = shared.upstream.message(&slow, Bytes::new(), false).await;
        assert_eq!(answer.unwrap().status, 504);
        assert_eq!(
            shared.upstream.concurrency_limit(),
            3,
            "the limit went down"
        );
        assert_eq!(senders_allowed(&shared), 1);
        // The DELETE of `a` could not be sent (503): its sender is one too many now, and
        // gives it back to the head of the queue, with its one try, rather than hold its slot
        // through the backoff and the retries.
        api.limit_lowered.cancel();
        wait_until("a sender to stop", || queue.state().senders == 1).await;
        let queued: Vec<(String, u8)> = queue
            .state()
            .waiting
            .iter()
            .map(|d| (d.context.client_id.as_str().to_owned(), d.tries))
            .collect();
        assert_eq!(
            queued,
            [("a".to_owned(), 1), ("c".to_owned(), 0)],
            "the DELETE to retry went back to the head of the queue (the API has seen {:?})",
            api.deletes()
        );
        assert_eq!(
            api.deletes(),
            ["a", "b"],
            "not retried by the sender that stopped"
        );
        // The sender that remains, done with `b`, retries `a` after the backoff of its second
        // try (its tries came with it), then sends `c`.
        let b_answered = std::time::Instant::now();
        api.a_handed_back.cancel();
        wait_until("every DELETE done", || {
            queue.load() == DisconnectLoad::default() && queue.state().senders == 0
        })
        .await;
        assert_eq!(api.deletes(), ["a", "b", "a", "c"]);
        let a_retried = api.deletes.lock().unwrap()[2].1;
        assert!(
            a_retried.duration_since(b_answered) >= DELETE_RETRY_BACKOFF,
            "retried {:?} after b, with no backoff: its tries were lost",
            a_retried.duration_since(b_answered)
        );
        let notified = shared.metrics.disconnects_notified.load(Ordering::Relaxed);
        let failed = shared.metrics.disconnects_failed.load(Ordering::Relaxed);
        assert_eq!((notified, failed), (3, 0));
    }

    #[test]
    fn a_drain_allows_the_shutdown_delete_concurrency_up_to_every_api_slot() {
        // Outside a drain: half the slots, whatever the flag.
        assert_eq!(allowed_senders(64, None), 32);
        // Draining with the defaults (64 slots, --shutdown-delete-concurrency 64): all 64,
        // which half the slots could never reach (the limit grows only when all are taken).
        assert_eq!(allowed_senders(64, Some(64)), 64);
        // The flag below half the slots: the flag (a sender beyond it would hold a DELETE
        // waiting for one of its places).
        assert_eq!(allowed_senders(64, Some(8)), 8);
        // The flag above the slots: the slots.
        assert_eq!(allowed_senders(40, Some(1000)), 40);
        assert_eq!(allowed_senders(1, Some(1)), 1);
    }
}
