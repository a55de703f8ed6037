//! How many requests the API gets at once. The limit starts at `--upstream-min-concurrency` and
//! grows by one for each answer that came back at the API's pace while every slot was taken
//! (a slot handed to a waiting request that has not run yet counts as taken), so an API that
//! keeps its pace under more load (many workers, however slow each is) doubles its share with
//! each round of answers, up to `--upstream-max-connections`; it shrinks by one for each answer
//! that came back slow, so an API that is queueing requests (a pause, a saturated worker pool)
//! is not handed hundreds more on new connections, which only add to its work (bench/README.md,
//! "Why the targets are missed", S4). Requests over the limit wait in the order they came.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::Method;
use tokio::sync::{AcquireError, Semaphore, TryAcquireError};

/// The API is slow when its recent answers took longer than twice the fastest one plus this.
const SLOW_SLACK: Duration = Duration::from_millis(5);
/// The fastest answer is that of the last one to two of these that had an answer
/// (see [`Pace::record_fastest`]); a slot taken after two or more of these with no
/// request of its kind at the API finds the pace forgotten (see [`Pace::taken`]).
const PACE_WINDOW: Duration = Duration::from_secs(10);
/// After a slow answer, the limit grows by one per round of answers for this long.
const CAUTIOUS_FOR: Duration = Duration::from_secs(10);
/// How far over the slow mark (see [`Pace::slow_mark`]) the time of a slow answer, or of a
/// request that went unanswered past the mark, is recorded at most: it counts as one slow
/// answer, whatever it held its slot for (a 30 s wait recorded whole against a 1 ms pace
/// would keep the recent answers slow for the next fifty, each lowering the limit once more).
const RECORDED_OVER_SLOW_MARK: Duration = Duration::from_millis(1);

/// Which of the API's paces an answer counts towards: connecting, a message and disconnecting
/// are different work for the API and may take very different times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestKind {
    /// `GET`: may this client connect?
    Connect,
    /// `POST`: a client's message.
    Message,
    /// `DELETE` (or anything else): a client left.
    Disconnect,
}

impl RequestKind {
    /// The kind of a request sent with `method`.
    pub(super) fn of(method: &Method) -> RequestKind {
        match *method {
            Method::GET => RequestKind::Connect,
            Method::POST => RequestKind::Message,
            _ => RequestKind::Disconnect,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The API's slots: at most the current limit of requests at once, the others wait in order.
pub(super) struct ConcurrencyLimit {
    /// Free slots: the limit less the requests in flight.
    permits: Semaphore,
    in_flight: AtomicUsize,
    state: Mutex<LimitState>,
}

impl ConcurrencyLimit {
    /// Slots for `min` to `max` requests at once, starting with `min` of them (`max` if lower).
    pub(super) fn new(min: usize, max: usize) -> ConcurrencyLimit {
        let state = LimitState::new(min, max);
        ConcurrencyLimit {
            permits: Semaphore::new(state.limit),
            in_flight: AtomicUsize::new(0),
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> MutexGuard<'_, LimitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot, if one is free now.
    pub(super) fn try_acquire(&self, kind: RequestKind) -> Result<Slot<'_>, TryAcquireError> {
        let permit = self.permits.try_acquire()?;
        permit.forget();
        Ok(self.taken(kind))
    }

    /// A slot, once one is free; slots go to waiting requests in the order they asked.
    pub(super) async fn acquire(&self, kind: RequestKind) -> Result<Slot<'_>, AcquireError> {
        let permit = self.permits.acquire().await?;
        permit.forget();
        Ok(self.taken(kind))
    }

    fn taken(&self, kind: RequestKind) -> Slot<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.state().taken(kind, Instant::now());
        Slot {
            limit: self,
            kind,
            sent_at: None,
            answered: false,
        }
    }

    /// Requests holding a slot now.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests allowed at once now.
    pub(super) fn current(&self) -> usize {
        self.state().limit
    }

    /// Requests always allowed at once: the minimum as clamped to `1..=max`.
    pub(super) fn floor(&self) -> usize {
        self.state().floor
    }
}

/// One request's slot, given back (and the answer's pace counted) when dropped.
pub(super) struct Slot<'a> {
    limit: &'a ConcurrencyLimit,
    kind: RequestKind,
    /// When the request went out (`None`: it never did).
    sent_at: Option<Instant>,
    /// Whether the API answered it (not with a 5xx).
    answered: bool,
}

impl Slot<'_> {
    /// The API answered the request (not with a 5xx, which a proxy in front of a stopped API
    /// can answer at once and would pass for a fast API): the time since it was [`sent`]
    /// counts towards the API's pace.
    ///
    /// [`sent`]: Slot::sent
    pub(super) fn answered(&mut self) {
        self.answered = true;
    }

    /// The request went out at `sent_at` (or began to wait then for one of the streams its
    /// HTTP/2 connection allows), answered or not: the API's pace is measured from here, not
    /// from any wait for a connection before (opening one, with TLS to a distant API, can
    /// take longer than the answer).
    pub(super) fn sent(&mut self, sent_at: Instant) {
        self.sent_at = Some(sent_at);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        let outcome = match self.sent_at {
            Some(sent_at) if self.answered => {
                Outcome::Answered(now.saturating_duration_since(sent_at))
            }
            Some(sent_at) => Outcome::Unanswered(now.saturating_duration_since(sent_at)),
            None => Outcome::NotSent,
        };
        // Taken counts the slots handed to waiting requests that have not run yet: with
        // answers arriving together, the requests they free start only after the last of
        // them is counted, and the limit would grow by one per batch, not per answer.
        let every_slot_taken = self.limit.permits.available_permits() == 0;
        self.limit.in_flight.fetch_sub(1, Ordering::Relaxed);
        let free = self
            .limit
            .state()
            .release(self.kind, outcome, every_slot_taken, now);
        if free > 0 {
            self.limit.permits.add_permits(free);
        }
    }
}

/// What became of the request a slot was held for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Answered this long after it went out.
    Answered(Duration),
    /// Sent, then no answer (or a 5xx) this long after it went out.
    Unanswered(Duration),
    /// Never sent.
    NotSent,
}

/// The limit and what it is judged on.
#[derive(Debug)]
struct LimitState {
    limit: usize,
    floor: usize,
    max: usize,
    /// One per [`RequestKind`].
    paces: [Pace; 3],
    /// When an answer last came back slow: for [`CAUTIOUS_FOR`] after it, the limit grows by
    /// one per round of answers instead of one per answer.
    last_slow: Option<Instant>,
    /// Answers towards the next step up while growing by one per round.
    answers_towards_step: usize,
}

impl LimitState {
    fn new(floor: usize, max: usize) -> LimitState {
        let max = max.max(1);
        let floor = floor.clamp(1, max);
        LimitState {
            limit: floor,
            floor,
            max,
            paces: Default::default(),
            last_slow: None,
            answers_towards_step: 0,
        }
    }

    /// A slot for a request of `kind` was taken at `now` (see [`Pace::taken`]).
    fn taken(&mut self, kind: RequestKind, now: Instant) {
        self.paces[kind.index()].taken(now);
    }

    /// A request of `kind` gave its slot back at `now` with this `outcome`, while
    /// `every_slot_taken` or some were free: moves the limit and says how many slots to free
    /// (none, when the limit shrank by this one; two, when it grew). An answer is slow as
    /// [`Pace::answered`] judges it. A request sent but not answered (it failed, timed out,
    /// got a 5xx) says nothing of the API's pace unless it was out longer than a slow answer
    /// would take (a timeout, an API that hung up after a long wait): then it counts as one
    /// slow answer, recorded among the recent answers as just over the slow mark
    /// ([`RECORDED_OVER_SLOW_MARK`]) however long it was out, so that the answers after it
    /// are judged on their own times; never as the fastest answer (see
    /// [`Pace::record_fastest`]).
    fn release(
        &mut self,
        kind: RequestKind,
        outcome: Outcome,
        every_slot_taken: bool,
        now: Instant,
    ) -> usize {
        let pace = &mut self.paces[kind.index()];
        pace.given_back(outcome != Outcome::NotSent, now);
        let slow = match outcome {
            Outcome::Answered(took) => pace.answered(took, now),
            Outcome::Unanswered(out) => match pace.slow_mark() {
                Some(mark) if out > mark => {
                    let counted = out.min(mark + RECORDED_OVER_SLOW_MARK);
                    pace.recent = Some(pace.averaged_with(counted));
                    true
                }
                _ => return 1,
            },
            Outcome::NotSent => return 1,
        };
        if slow {
            self.last_slow = Some(now);
            if self.limit > self.floor {
                self.limit -= 1;
                return 0;
            }
        } else if every_slot_taken && self.limit < self.max && self.step_up(now) {
            self.limit += 1;
            return 2;
        }
        1
    }

    /// Whether an answer at the API's pace, with every slot taken, grows the limit now: each
    /// does, unless an answer came back slow in the last [`CAUTIOUS_FOR`]; then one of each
    /// `limit` does, so the limit nears the API's pace again by one per round of answers
    /// instead of doubling past it with the answers already on their way.
    fn step_up(&mut self, now: Instant) -> bool {
        let cautious = self
            .last_slow
            .is_some_and(|slow| now.saturating_duration_since(slow) < CAUTIOUS_FOR);
        if !cautious {
            self.answers_towards_step = 0;
            return true;
        }
        self.answers_towards_step += 1;
        if self.answers_towards_step < self.limit {
            return false;
        }
        self.answers_towards_step = 0;
        true
    }
}

/// How fast the API answers now against how fast it can.
#[derive(Debug, Default)]
struct Pace {
    /// The fastest answer of the current window and of the one before.
    fastest: [Option<Duration>; 2],
    window_started: Option<Instant>,
    /// Moving average of the answer times, each new one weighing an eighth.
    recent: Option<Duration>,
    /// Slots of this kind held now, whether their request went out yet or not.
    held: usize,
    /// When a request of this kind that went out last gave its slot back (answered or not).
    last_back: Option<Instant>,
}

impl Pace {
    /// Records an answer that took `took`, at `now`, and says whether it came back slow:
    /// whether the recent answers, this one counted at its full time, took well over the
    /// fastest one. A slow one enters the recent answers at most just over the slow mark
    /// ([`RECORDED_OVER_SLOW_MARK`]), so that one very late answer counts as one slow answer
    /// and the answers after it are judged on their own times. Every answer counts towards
    /// the fastest one, slow or not, so that an API that turns slower for good sets a new pace
    /// within one or two windows (see [`Pace::record_fastest`]).
    fn answered(&mut self, took: Duration, now: Instant) -> bool {
        self.record_fastest(took, now);
        let slow = self.slow_answer(self.averaged_with(took));
        let counted = match self.slow_mark() {
            Some(mark) if slow => took.min(mark + RECORDED_OVER_SLOW_MARK),
            _ => took,
        };
        self.recent = Some(self.averaged_with(counted));
        slow
    }

    /// A slot of this kind was taken at `now`: if none was held and no request of this kind
    /// that went out gave its slot back in the last two [`PACE_WINDOW`]s, the kind was idle
    /// (no answer came, and the API held none of its requests), so every answer recorded is
    /// forgotten and the next answer starts the pace afresh: after an idle hour, the fastest
    /// answer of an hour ago would judge the next ones, and their average would be an hour
    /// old. Not while a request is held (it went out or waits for a connection): the answers
    /// an API held through a long pause, however long and in whatever order they come back,
    /// are judged against its pace before it, not against the first of them.
    fn taken(&mut self, now: Instant) {
        let idle = self.held == 0
            && self
                .last_back
                .is_some_and(|back| now.saturating_duration_since(back) >= PACE_WINDOW * 2);
        if idle {
            self.fastest = [None, None];
            self.window_started = None;
            self.recent = None;
        }
        self.held += 1;
    }

    /// A slot of this kind was given back at `now`, its request having `went_out` or not.
    fn given_back(&mut self, went_out: bool, now: Instant) {
        // Saturating: the unit tests give back slots they never took.
        self.held = self.held.saturating_sub(1);
        if went_out {
            self.last_back = Some(now);
        }
    }

    /// Counts `took`, an answer's time, towards the fastest answer of the window at `now`,
    /// starting a new one if the current one is over. A request unanswered past the mark
    /// never counts, nor starts a window: as the fastest of a window, the time of a timeout
    /// (clipped to just over the mark) would raise the mark with each window (from 7 ms to
    /// seconds over minutes of timeouts against a 1 ms pace), and the backlog's answers
    /// under it would grow the limit. A window without an answer keeps the fastest answer
    /// from before it.
    fn record_fastest(&mut self, took: Duration, now: Instant) {
        match self.window_started {
            Some(started) if now.saturating_duration_since(started) < PACE_WINDOW => {}
            _ => {
                self.fastest = [None, self.fastest[0]];
                self.window_started = Some(now);
            }
        }
        self.fastest[0] = Some(self.fastest[0].map_or(took, |fastest| fastest.min(took)));
    }

    /// The moving average of the answer times with `took` added.
    fn averaged_with(&self, took: Duration) -> Duration {
        match self.recent {
            Some(recent) => (recent * 7 + took) / 8,
            None => took,
        }
    }

    /// Whether the recent answers took well over the fastest one: the API is queueing them.
    #[cfg(test)]
    fn slow(&self) -> bool {
        self.recent.is_some_and(|recent| self.slow_answer(recent))
    }

    /// Whether `took` (an answer's time, or the recent answers' average) is well over the
    /// fastest answer (never, before the first answer).
    fn slow_answer(&self, took: Duration) -> bool {
        self.slow_mark().is_some_and(|mark| took > mark)
    }

    /// The time an answer must take longer than to be slow: twice the fastest one plus
    /// [`SLOW_SLACK`] (`None` before the first answer).
    fn slow_mark(&self) -> Option<Duration> {
        let fastest = self.fastest.iter().flatten().min()?;
        Some(*fastest * 2 + SLOW_SLACK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(1);
    const MESSAGE: RequestKind = RequestKind::Message;

    #[test]
    fn the_limit_grows_while_every_slot_is_taken_and_the_api_keeps_its_pace() {
        let mut state = LimitState::new(4, 6);
        let now = Instant::now();
        assert_eq!(
            state.release(MESSAGE, Outcome::Answered(FAST), true, now),
            2,
            "grew: two slots free"
        );
        assert_eq!(state.limit, 5);
        assert_eq!(
            state.release(MESSAGE, Outcome::Answered(FAST), true, now),
            2
        );
        assert_eq!(
            state.release(MESSAGE, Outcome::Answered(FAST), true, now),
            1,
            "at the maximum"
        );
        assert_eq!(state.limit, 6);
    }

    #[test]
    fn after_a_slow_answer_the_limit_grows_by_one_per_round_of_answers_for_a_while() {
        let mut state = LimitState::new(4, 100);
        let now = Instant::now();
        for _ in 0..6 {
            state.release(MESSAGE, Outcome::Answered(FAST), true, now);
        }
        assert_eq!(state.limit, 10, "one step per answer");
        state.release(MESSAGE, Outcome::Answered(FAST * 100), true, now);
        while state.paces[MESSAGE.index()].slow() {
            state.release(MESSAGE, Outcome::Answered(FAST), true, now);
        }
        let limit = state.limit;
        let freed: Vec<usize> = (0..limit)
            .map(|_| state.release(MESSAGE, Outcome::Answered(FAST), true, now))
            .collect();
        assert_eq!(state.limit, limit + 1, "one step in a round of answers");
        assert_eq!(freed.iter().filter(|&&f| f == 2).count(), 1);
        let later = now + CAUTIOUS_FOR;
        state.release(MESSAGE, Outcome::Answered(FAST), true, later);
        state.release(MESSAGE, Outcome::Answered(FAST), true, later);
        assert_eq!(state.limit, limit + 3, "one step per answer again");
    }

    #[test]
    fn the_limit_stays_while_slots_are_free() {
        let mut state = LimitState::new(4, 100);
        assert_eq!(
            state.release(MESSAGE, Outcome::Answered(FAST), false, Instant::now()),
            1
        );
        assert_eq!(state.limit, 4);
    }

    #[test]
    fn slow_answers_shrink_the_limit_down_to_the_minimum() {
        let mut state = LimitState::new(4, 100);
        let now = Instant::now();
        for _ in 4..10 {
            state.release(MESSAGE, Outcome::Answered(FAST), true, now);
        }
        assert_eq!(state.limit, 10);
        // A queueing API: each answer slower than the one before.
        let mut freed = Vec::new();
        for n in 1..40 {
            freed.push(state.release(MESSAGE, Outcome::Answered(FAST * 5 * n), true, now));
        }
        assert_eq!(state.limit, 4, "back at the minimum");
        assert!(freed.contains(&0), "a slow answer's slot was withheld");
        assert_eq!(
            freed.last(),
            Some(&1),
            "at the minimum slots are given back"
        );
    }

    #[test]
    fn fast_connects_do_not_make_messages_look_slow() {
        let mut state = LimitState::new(4, 100);
        let now = Instant::now();
        for _ in 0..10 {
            state.release(RequestKind::Connect, Outcome::Answered(FAST), false, now);
        }
        for _ in 4..10 {
            let slow_message = FAST * 100;
            assert_eq!(
                state.release(MESSAGE, Outcome::Answered(slow_message), true, now),
                2
            );
        }
        assert_eq!(state.limit, 10);
        assert_eq!(RequestKind::of(&Method::GET), RequestKind::Connect);
        assert_eq!(RequestKind::of(&Method::POST), MESSAGE);
        assert_eq!(RequestKind::of(&Method::DELETE), RequestKind::Disconnect);
    }

    #[test]
    fn failed_requests_give_their_slot_back_without_moving_the_limit() {
        let mut state = LimitState::new(4, 100);
        assert_eq!(
            state.release(MESSAGE, Outcome::NotSent, true, Instant::now()),
            1
        );
        assert_eq!(state.limit, 4);
        // Nor does a quick failure after sending, once the API's pace is known.
        let now = Instant::now();
        state.release(MESSAGE, Outcome::Answered(FAST), false, now);
        assert_eq!(
            state.release(MESSAGE, Outcome::Unanswered(FAST), true, now),
            1
        );
        assert_eq!(state.limit, 4);
        assert!(!state.paces[MESSAGE.index()].slow());
    }

    /// A limit from 4 that fast answers, all slots taken, have grown to 10; and their time.
    fn grown_to_ten() -> (LimitState, Instant) {
        let mut state = LimitState::new(4, 100);
        let now = Instant::now();
        for _ in 0..6 {
            state.release(MESSAGE, Outcome::Answered(FAST), true, now);
        }
        assert_eq!(state.limit, 10);
        (state, now)
    }

    #[test]
    fn a_request_that_held_its_slot_past_the_apis_pace_without_an_answer_counts_as_slow() {
        let (mut state, now) = grown_to_ten();
        // A timeout: no answer after holding the slot for 30 s.
        let timed_out = Duration::from_secs(30);
        assert_eq!(
            state.release(MESSAGE, Outcome::Unanswered(timed_out), true, now),
            0,
            "shrank: its slot is not given back"
        );
        assert_eq!(state.limit, 9);
        assert_eq!(state.last_slow, Some(now), "counted as a slow answer");
        // Before any answer there is no pace to judge by: no signal.
        let mut fresh = LimitState::new(4, 100);
        assert_eq!(
            fresh.release(MESSAGE, Outcome::Unanswered(timed_out), true, now),
            1
        );
        assert_eq!(fresh.limit, 4);
    }

    #[test]
    fn one_timeout_lowers_the_limit_once_and_the_fast_answers_after_it_grow_it_again() {
        let (mut state, now) = grown_to_ten();
        // One request out for 30 s, unanswered, against a 1 ms pace.
        let timed_out = Duration::from_secs(30);
        state.release(MESSAGE, Outcome::Unanswered(timed_out), true, now);
        assert_eq!(state.limit, 9, "one slow event");
        // The API answers at its pace again: none of these is slow, and for a while after the
        // slow event the limit grows by one per round of answers.
        let mut lowest = state.limit;
        for _ in 0..20 {
            state.release(MESSAGE, Outcome::Answered(FAST), true, now);
            lowest = lowest.min(state.limit);
        }
        assert_eq!(lowest, 9, "no answer after the timeout counted as slow");
        assert!(state.limit >= 10, "grew again: {}", state.limit);
        assert!(!state.paces[MESSAGE.index()].slow());
        // Each further timeout is one more slow event, however long it was out.
        let limit = state.limit;
        state.release(MESSAGE, Outcome::Unanswered(timed_out), true, now);
        state.release(MESSAGE, Outcome::Unanswered(timed_out * 2), true, now);
        assert_eq!(state.limit, limit - 2);
    }

    #[test]
    fn one_slow_answer_lowers_the_limit_once_and_the_fast_answers_after_it_grow_it_again() {
        let (mut state, now) = grown_to_ten();
        // One answer after 29 s against a 1 ms pace.
        let late = Duration::from_secs(29);
        assert_eq!(
            state.release(MESSAGE, Outcome::Answered(late), true, now),
            0,
            "shrank: its slot is not given back"
        );
        assert_eq!(state.limit, 9, "one slow answer");
        let mut lowest = state.limit;
        for _ in 0..20 {
            state.release(MESSAGE, Outcome::Answered(FAST), true, now);
            lowest = lowest.min(state.limit);
        }
        assert_eq!(lowest, 9, "no answer after the late one counted as slow");
        assert!(state.limit >= 10, "grew again: {}", state.limit);
        // Each further late answer is one more slow answer, however late.
        let limit = state.limit;
        state.release(MESSAGE, Outcome::Answered(late), true, now);
        state.release(MESSAGE, Outcome::Answered(late * 2), true, now);
        assert_eq!(state.limit, limit - 2);
    }

    #[test]
    fn an_api_slowed_to_a_steady_pace_over_the_slow_mark_takes_the_limit_to_the_minimum() {
        let (mut state, now) = grown_to_ten();
        // From now on every answer takes three times the slow mark (7 ms).
        for _ in 0..20 {
            state.release(MESSAGE, Outcome::Answered(FAST * 21), true, now);
        }
        assert_eq!(state.limit, 4, "each answer once the recent ones are slow");
    }

    #[test]
    fn a_slow_api_that_keeps_its_pace_is_not_slow() {
        let mut pace = Pace::default();
        let now = Instant::now();
        for _ in 0..100 {
            assert!(!pace.answered(Duration::from_millis(300), now));
        }
        let slow: Vec<bool> = (0..3)
            .map(|_| pace.answered(Duration::from_millis(2000), now))
            .collect();
        assert_eq!(slow, [false, true, true], "far over its pace");
    }

    #[test]
    fn the_fastest_answer_is_forgotten_after_two_windows() {
        let mut pace = Pace::default();
        let start = Instant::now();
        pace.answered(FAST, start);
        // 5 ms: under the 7 ms slow mark, at the API's pace.
        let slower = Duration::from_millis(5);
        pace.answered(slower, start + PACE_WINDOW + FAST);
        assert_eq!(
            pace.slow_mark(),
            Some(FAST * 2 + SLOW_SLACK),
            "still measured against the fast one"
        );
        pace.answered(slower, start + PACE_WINDOW * 2 + FAST * 2);
        assert_eq!(
            pace.slow_mark(),
            Some(slower * 2 + SLOW_SLACK),
            "the new pace is the API's pace"
        );
    }

    #[test]
    fn an_api_that_turns_slower_for_good_sets_a_new_pace_within_two_windows() {
        let mut pace = Pace::default();
        let start = Instant::now();
        pace.answered(FAST, start);
        let slower = Duration::from_millis(50);
        assert!(
            pace.answered(slower, start + PACE_WINDOW),
            "slow against 1 ms"
        );
        for n in 0..50 {
            pace.answered(slower, start + PACE_WINDOW * 2 + FAST * n);
        }
        assert_eq!(pace.slow_mark(), Some(slower * 2 + SLOW_SLACK));
        assert!(!pace.answered(slower, start + PACE_WINDOW * 2 + FAST * 60));
    }

    #[test]
    fn after_a_long_outage_the_slow_mark_is_the_pace_before_it_and_slow_answers_lower_the_limit() {
        // A 1 ms pace, every slot taken, grows the limit from 4 to 400.
        let mut state = LimitState::new(4, 1000);
        let start = Instant::now();
        for _ in 0..396 {
            answer(&mut state, MESSAGE, FAST, start);
        }
        assert_eq!(state.limit, 400);
        let mark = Some(FAST * 2 + SLOW_SLACK);
        // Then the API hangs for five minutes: a request goes out every second, and each
        // times out after 30 s, every slot taken.
        let timeout = Duration::from_secs(30);
        let mut highest = mark;
        for second in 1..=300 {
            let at = start + Duration::from_secs(second);
            if second > 30 {
                state.release(MESSAGE, Outcome::Unanswered(timeout), true, at);
            }
            state.taken(MESSAGE, at);
            highest = highest.max(state.paces[MESSAGE.index()].slow_mark());
        }
        assert_eq!(
            highest, mark,
            "the timeouts left the slow mark where it was"
        );
        assert_eq!(state.limit, 400 - 270, "one lower for each timeout");
        // The API comes back with a backlog: it answers the 30 requests still out (1 to 30 s),
        // then the next ones in 200 ms each. Each is slow against the pace before the outage.
        let back = start + Duration::from_secs(301);
        let limit = state.limit;
        for second in 271..=300 {
            let took = back - (start + Duration::from_secs(second));
            state.release(MESSAGE, Outcome::Answered(took), true, back);
        }
        let next = Duration::from_millis(200);
        for n in 1..=20 {
            answer(&mut state, MESSAGE, next, back + next * n);
        }
        assert_eq!(state.limit, limit - 50, "each answer lowered the limit");
        assert_eq!(state.paces[MESSAGE.index()].slow_mark(), mark);
    }

    /// A request of `kind` that took its slot at `at - took` and was answered at `at`, while
    /// every slot was taken: how many slots that freed.
    fn answer(state: &mut LimitState, kind: RequestKind, took: Duration, at: Instant) -> usize {
        state.taken(kind, at - took);
        state.release(kind, Outcome::Answered(took), true, at)
    }

    #[test]
    fn after_two_windows_without_requests_the_pace_starts_afresh() {
        let mut state = LimitState::new(4, 100);
        let start = Instant::now();
        answer(&mut state, MESSAGE, FAST, start);
        // An hour later the API answers in 50 ms: not slow against a 1 ms answer of an
        // hour ago.
        let an_hour_later = start + Duration::from_secs(3600);
        let later = Duration::from_millis(50);
        assert_eq!(answer(&mut state, MESSAGE, later, an_hour_later), 2);
        assert!(
            !state.paces[MESSAGE.index()].slow(),
            "the fastest answer of an hour ago is forgotten"
        );
        // Nor do slow answers of an hour ago make the first fast one after them slow.
        let mut state = LimitState::new(4, 100);
        answer(&mut state, MESSAGE, FAST, start);
        for _ in 0..100 {
            answer(&mut state, MESSAGE, FAST * 20, start);
        }
        assert!(state.paces[MESSAGE.index()].slow());
        assert_eq!(
            answer(&mut state, MESSAGE, FAST, an_hour_later),
            2,
            "the recent answers of an hour ago are forgotten"
        );
        // Two windows are enough; less is not.
        let mut state = LimitState::new(4, 100);
        answer(&mut state, MESSAGE, FAST, start);
        let almost = start + PACE_WINDOW * 2 - FAST;
        assert_eq!(answer(&mut state, MESSAGE, later, almost + later), 0);
        let mut state = LimitState::new(4, 100);
        answer(&mut state, MESSAGE, FAST, start);
        let idle = start + PACE_WINDOW * 2;
        assert_eq!(answer(&mut state, MESSAGE, later, idle + later), 2);
    }

    #[test]
    fn a_request_held_up_by_a_long_pause_is_judged_against_the_pace_when_it_went_out() {
        let (mut state, now) = grown_to_ten();
        // Two requests go out, and the API stops: the answer to one comes back after 25 s,
        // more than two windows after the last answer at its pace; the other times out.
        state.taken(MESSAGE, now);
        state.taken(MESSAGE, now);
        let paused = Duration::from_secs(25);
        assert_eq!(
            state.release(MESSAGE, Outcome::Answered(paused), true, now + paused),
            0,
            "a slow answer"
        );
        let timed_out = Duration::from_secs(30);
        assert_eq!(
            state.release(
                MESSAGE,
                Outcome::Unanswered(timed_out),
                true,
                now + timed_out
            ),
            0,
            "a slow event"
        );
        assert_eq!(state.limit, 8);
    }

    #[test]
    fn answers_held_through_a_pause_are_judged_against_the_pace_before_it_in_any_order() {
        // Answers at a 1 ms pace from S to S+9 s, every slot taken: the limit grows to 30.
        let mut state = LimitState::new(4, 100);
        let start = Instant::now();
        for n in 0..26 {
            answer(
                &mut state,
                MESSAGE,
                FAST,
                start + Duration::from_millis(350 * n),
            );
        }
        assert_eq!(state.limit, 30);
        // Then the API stops until S+34 s, while requests keep going out every second from
        // S+10 s on (the slots held by the ones before are not all of them).
        let sent: Vec<Instant> = (10..=30)
            .map(|second| start + Duration::from_secs(second))
            .collect();
        for &at in &sent {
            state.taken(MESSAGE, at);
        }
        // At S+34 s the API answers them all, the last one sent counted first (4 s), then the
        // one sent at S+27 (7 s) and the one at S+15 (19 s), then the others.
        let back = start + Duration::from_secs(34);
        let mut order = vec![20, 17, 5];
        order.extend((0..20).filter(|i| ![17, 5].contains(i)).rev());
        let freed: Vec<usize> = order
            .iter()
            .map(|&i| {
                let took = back - sent[i];
                state.release(MESSAGE, Outcome::Answered(took), true, back)
            })
            .collect();
        // Each one slow against the 1 ms pace before the pause: none grows the limit.
        assert_eq!(freed, [0; 21], "every held answer judged slow");
        assert_eq!(state.limit, 9);
    }

    #[test]
    fn a_request_unanswered_after_two_windows_without_requests_says_nothing() {
        let (mut state, now) = grown_to_ten();
        // The first request after an hour without any times out: the pace of an hour ago
        // does not tell whether that is slow for the API.
        let timed_out = Duration::from_secs(30);
        let then = now + Duration::from_secs(3600);
        state.taken(MESSAGE, then - timed_out);
        assert_eq!(
            state.release(MESSAGE, Outcome::Unanswered(timed_out), true, then),
            1
        );
        assert_eq!(state.limit, 10);
    }

    #[test]
    fn the_minimum_is_capped_by_the_maximum() {
        let state = LimitState::new(64, 10);
        assert_eq!((state.limit, state.floor, state.max), (10, 10, 10));
    }

    #[tokio::test]
    async fn slots_follow_the_limit() {
        let limit = ConcurrencyLimit::new(2, 4);
        let mut first = limit.try_acquire(MESSAGE).unwrap();
        let _second = limit.try_acquire(MESSAGE).unwrap();
        assert!(
            limit.try_acquire(MESSAGE).is_err(),
            "two slots to start with"
        );
        assert_eq!(limit.in_flight(), 2);
        first.sent(Instant::now());
        first.answered();
        drop(first);
        assert_eq!(limit.current(), 3, "an answer while every slot was taken");
        let _third = limit.try_acquire(MESSAGE).unwrap();
        let _fourth = limit.try_acquire(MESSAGE).unwrap();
        assert!(limit.try_acquire(MESSAGE).is_err());
        assert_eq!(limit.in_flight(), 3);
    }

    #[test]
    fn an_answers_time_counts_from_when_its_request_was_sent() {
        let limit = ConcurrencyLimit::new(2, 4);
        let mut slot = limit.try_acquire(MESSAGE).unwrap();
        // The slot was held while a connection was opened; the request went out just now.
        std::thread::sleep(Duration::from_millis(50));
        slot.sent(Instant::now());
        slot.answered();
        drop(slot);
        let recent = limit.state().paces[MESSAGE.index()].recent.unwrap();
        assert!(recent < Duration::from_millis(50), "counted {recent:?}");
    }

    #[tokio::test]
    async fn answers_arriving_together_each_grow_the_limit_while_requests_wait() {
        let limit = std::sync::Arc::new(ConcurrencyLimit::new(2, 8));
        let mut first = limit.try_acquire(MESSAGE).unwrap();
        let mut second = limit.try_acquire(MESSAGE).unwrap();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let limit = limit.clone();
                tokio::spawn(async move { drop(limit.acquire(MESSAGE).await.unwrap()) })
            })
            .collect();
        tokio::task::yield_now().await;
        // Both answers are counted before the requests they free have run (as when a
        // worker thread reads several answers in one go).
        first.sent(Instant::now());
        first.answered();
        drop(first);
        assert_eq!(limit.in_flight(), 1, "the freed requests have not run yet");
        second.sent(Instant::now());
        second.answered();
        drop(second);
        assert_eq!(limit.current(), 4, "each answer grew the limit");
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(limit.in_flight(), 0);
    }
}
