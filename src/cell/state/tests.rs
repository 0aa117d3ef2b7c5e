//! The pure transitions of the token cell, without a runtime.

use super::*;

type S = State<u8>;

fn now() -> Now {
    Now {
        mono: Instant::now(),
        wall: SystemTime::now(),
    }
}

fn later(now: Now, by: Duration) -> Now {
    Now {
        mono: now.mono + by,
        wall: now.wall + by,
    }
}

const POLICY: Policy<'static> = Policy {
    leeway: Duration::from_secs(30),
    ahead: None,
};

fn token(secret: &str, life: Option<u64>) -> Token {
    let t = Token::bearer(secret).unwrap();
    match life {
        Some(s) => t.with_expires_in(Duration::from_secs(s)),
        None => t,
    }
}

fn no_cooldown() -> Cooldown {
    Cooldown::none()
}

/// Finishes the flight in `st` (whichever it is), expecting the refresh to be over.
fn finish(
    st: &mut S,
    result: Result<Token, RefreshError>,
    now: Now,
    cooldown: &Cooldown,
) -> (Answer, Emitted) {
    let id = st.flight.as_ref().expect("a flight to finish").id;
    match st.finish(id, result, now, cooldown) {
        Finished::Done(answer, events) => (answer, events),
        again => panic!("expected the refresh to be over, got {again:?}"),
    }
}

#[test]
fn an_empty_cell_asks_the_first_request_to_start_one_refresh_and_the_rest_to_join() {
    let mut st = S::new();
    let t = now();
    let Lookup::Stale { ticket, .. } = st.lookup(t, POLICY) else {
        panic!("an empty cell has no usable token");
    };
    assert!(matches!(
        st.begin(ticket, Need::BeforeSend, t.mono),
        Begin::Start
    ));
    st.started(7, false, 0, false);
    for _ in 0..3 {
        assert!(matches!(
            st.begin(ticket, Need::BeforeSend, t.mono),
            Begin::Join(7)
        ));
    }
}

#[test]
fn a_refusal_pauses_requests_for_that_generation_until_the_refresh_ends() {
    let mut st = S::new();
    let t = now();
    st.install(token("a", None), t);
    let Lookup::Usable { ticket, .. } = st.lookup(t, POLICY) else {
        panic!("installed token is usable");
    };
    assert!(matches!(
        st.begin(ticket, Need::Refused, t.mono),
        Begin::Start
    ));
    st.started(1, false, 0, false);
    // A new request would carry the refused token: it waits instead.
    assert!(matches!(st.lookup(t, POLICY), Lookup::Stale { .. }));
    let (answer, events) = finish(&mut st, Ok(token("b", None)), t, &no_cooldown());
    let fresh = answer.unwrap();
    assert_eq!(fresh.ticket.generation, ticket.generation + 1);
    assert_eq!(
        events[0],
        Some(RefreshEvent::Refreshed {
            generation: fresh.ticket.generation
        })
    );
    assert!(matches!(st.lookup(t, POLICY), Lookup::Usable { .. }));
}

#[test]
fn a_late_refusal_of_an_older_generation_gets_the_newer_token_without_a_refresh() {
    let mut st = S::new();
    let t = now();
    st.install(token("a", None), t);
    let old = st.ticket();
    st.install(token("b", None), t);
    match st.begin(old, Need::Refused, t.mono) {
        Begin::Answer(Ok(fresh)) => assert_eq!(fresh.header, "Bearer b"),
        other => panic!("expected the installed token, got {other:?}"),
    }
}

#[test]
fn shared_failure_is_every_waiters_answer() {
    let mut st = S::new();
    let t = now();
    let ticket = st.ticket();
    assert!(matches!(
        st.begin(ticket, Need::BeforeSend, t.mono),
        Begin::Start
    ));
    st.started(1, false, 0, false);
    let (answer, _) = finish(
        &mut st,
        Err(RefreshError::transient("down")),
        t,
        &no_cooldown(),
    );
    let Err(Unavailable::Failed(first)) = answer else {
        panic!("transient failure");
    };
    // A waiter that held the same ticket gets the same error, by pointer.
    match st.begin(ticket, Need::BeforeSend, t.mono) {
        Begin::Answer(Err(Unavailable::Failed(err))) => assert!(Arc::ptr_eq(&err, &first)),
        other => panic!("expected the shared failure, got {other:?}"),
    }
    // A request that comes after the failure starts a new refresh (no cool-down here).
    assert!(matches!(
        st.begin(st.ticket(), Need::BeforeSend, t.mono),
        Begin::Start
    ));
}

#[test]
fn install_during_flight_wins_over_the_refresh_result() {
    let mut st = S::new();
    let t = now();
    st.started(1, false, 0, false);
    st.install(token("login", None), t);
    let (answer, events) = finish(&mut st, Ok(token("refreshed", None)), t, &no_cooldown());
    assert_eq!(answer.unwrap().header, "Bearer login");
    assert_eq!(events, [None, None]);
    // And a terminal failure of the superseded refresh does not end the new session.
    st.started(2, false, 0, false);
    st.install(token("login-2", None), t);
    let (answer, _) = finish(
        &mut st,
        Err(RefreshError::terminal("revoked")),
        t,
        &no_cooldown(),
    );
    assert_eq!(answer.unwrap().header, "Bearer login-2");
    assert!(matches!(st.session, Session::Active(_)));
}

#[test]
fn a_terminal_failure_ends_the_session_once_in_the_foreground_and_the_background() {
    for background in [false, true] {
        let mut st = S::new();
        let t = now();
        st.install(token("a", Some(600)), t);
        st.started(1, background, 0, false);
        let (answer, events) = finish(
            &mut st,
            Err(RefreshError::terminal("revoked")),
            t,
            &no_cooldown(),
        );
        assert!(matches!(answer, Err(Unavailable::Rejected(_))));
        assert_eq!(
            events[1],
            Some(RefreshEvent::SessionEnded {
                generation: st.generation
            })
        );
        assert!(matches!(st.lookup(t, POLICY), Lookup::Ended(_)));

        // A forced refresh of the ended session that fails terminally again ends nothing new:
        // `SessionEnded` is sent once per end.
        st.started(2, false, 1, false);
        let (answer, events) = finish(
            &mut st,
            Err(RefreshError::terminal("still revoked")),
            t,
            &no_cooldown(),
        );
        assert!(matches!(answer, Err(Unavailable::Rejected(_))));
        assert_eq!(
            events,
            [
                Some(RefreshEvent::RefreshFailed {
                    generation: st.generation,
                    terminal: true
                }),
                None
            ]
        );
        assert!(matches!(st.lookup(t, POLICY), Lookup::Ended(_)));
    }
}

#[test]
fn a_failed_refresh_cools_down_and_later_requests_fail_fast_without_a_refresh() {
    let mut st = S::new();
    let t = now();
    let cooldown = Cooldown::new(Duration::from_secs(60), Duration::from_secs(600));
    st.started(1, false, 0, false);
    let _ = finish(&mut st, Err(RefreshError::transient("503")), t, &cooldown);
    let Lookup::Cooling(c) = st.lookup(t, POLICY) else {
        panic!("no token and cooling: fail fast");
    };
    assert!(c.until > t.mono && c.until <= t.mono + Duration::from_secs(60));
    let ticket = st.ticket();
    assert!(matches!(
        st.begin(ticket, Need::Refused, t.mono),
        Begin::Answer(Err(Unavailable::Cooling(_)))
    ));
    // The handle's forced refresh bypasses it.
    assert!(matches!(
        st.begin(ticket, Need::Forced, t.mono),
        Begin::Start
    ));
    // After the cool-down, a refresh may start again.
    let after = later(t, Duration::from_secs(61));
    assert!(matches!(st.lookup(after, POLICY), Lookup::Stale { .. }));
}

#[test]
fn inside_the_leeway_a_failed_refresh_keeps_sending_the_valid_token() {
    let mut st = S::new();
    let t = now();
    let cooldown = Cooldown::new(Duration::from_secs(600), Duration::from_secs(600));
    st.install(token("a", Some(600)), t);
    // 50 s before expiry, inside the 60 s leeway: refresh first.
    let policy = Policy {
        leeway: Duration::from_secs(60),
        ahead: None,
    };
    let near = later(t, Duration::from_secs(550));
    assert!(matches!(st.lookup(near, policy), Lookup::Stale { .. }));
    st.started(1, false, 0, false);
    let _ = finish(
        &mut st,
        Err(RefreshError::transient("503")),
        near,
        &cooldown,
    );
    // The refresh failed: the token is still valid for 50 s, so it is used.
    assert!(matches!(st.lookup(near, policy), Lookup::Usable { .. }));
    // Past the hard expiry, with the cool-down still running: fail fast.
    let dead = later(t, Duration::from_secs(601));
    assert!(matches!(st.lookup(dead, policy), Lookup::Cooling(_)));
}

#[test]
fn an_expired_token_from_the_refresher_never_replaces_a_valid_one() {
    let mut st = S::new();
    let t = now();
    st.install(token("valid", Some(600)), t);
    let generation = st.generation;
    st.started(1, false, 0, false);
    let (answer, _) = finish(&mut st, Ok(token("dead", Some(0))), t, &no_cooldown());
    assert!(matches!(answer, Err(Unavailable::Failed(_))));
    assert_eq!(st.generation, generation);
    let Lookup::Usable { header, .. } = st.lookup(t, POLICY) else {
        panic!("the valid token stays");
    };
    assert_eq!(header, "Bearer valid");
    // With no valid token, the expired one serves the waiters of that refresh, once.
    let mut empty = S::new();
    empty.started(1, false, 0, false);
    let (answer, _) = finish(
        &mut empty,
        Ok(token("single-use", Some(0))),
        t,
        &no_cooldown(),
    );
    assert_eq!(answer.unwrap().header, "Bearer single-use");
    assert!(matches!(empty.lookup(t, POLICY), Lookup::Stale { .. }));
}

#[test]
fn a_machine_that_slept_past_the_deadline_does_not_send_the_token() {
    let mut st = S::new();
    let t = now();
    st.install(token("a", Some(600)), t);
    // The monotonic clock stood still during suspend; the wall clock moved an hour.
    let woke = Now {
        mono: t.mono + Duration::from_secs(1),
        wall: t.wall + Duration::from_secs(3600),
    };
    assert!(matches!(
        st.lookup(woke, POLICY),
        Lookup::Stale { expired: true, .. }
    ));
}

#[test]
fn invalidate_refreshes_without_ending_and_clear_ends() {
    let mut st = S::new();
    let t = now();
    st.install(token("a", None), t);
    st.invalidate();
    assert!(matches!(st.lookup(t, POLICY), Lookup::Stale { .. }));
    st.clear();
    assert!(matches!(st.lookup(t, POLICY), Lookup::Ended(_)));
    st.install(token("b", None), t);
    assert!(matches!(st.lookup(t, POLICY), Lookup::Usable { .. }));
}

#[test]
fn refresh_ahead_is_due_once_inside_its_window_and_never_during_a_flight() {
    let mut st = S::new();
    let t = now();
    let window = RefreshAhead::fixed(Duration::from_secs(120));
    let policy = Policy {
        leeway: Duration::from_secs(30),
        ahead: Some(&window),
    };
    st.install(token("a", Some(600)), t);
    assert!(!st.ahead_due(t, policy));
    let inside = later(t, Duration::from_secs(500));
    assert!(st.ahead_due(inside, policy));
    st.started(1, true, 0, false);
    assert!(!st.ahead_due(inside, policy));
    let _ = finish(
        &mut st,
        Err(RefreshError::transient("x")),
        inside,
        &no_cooldown(),
    );
    // A failed background refresh keeps the token and backs off.
    assert!(matches!(
        st.lookup(inside, policy),
        Lookup::Usable { ahead: false, .. }
    ));
}

#[test]
fn the_read_only_begin_agrees_with_begin_and_never_skips_a_change() {
    let t = now();
    // A flight to join: the read-only path joins, as `begin` does.
    let mut st = S::new();
    st.install(token("a", None), t);
    let Lookup::Usable { ticket, .. } = st.lookup(t, POLICY) else {
        panic!("usable");
    };
    assert!(
        st.begin_shared(ticket, Need::Refused).is_none(),
        "the first refusal records itself"
    );
    assert!(matches!(
        st.begin(ticket, Need::Refused, t.mono),
        Begin::Start
    ));
    st.started(4, false, 0, false);
    for need in [Need::Refused, Need::BeforeSend] {
        assert!(matches!(
            st.begin_shared(ticket, need),
            Some(Begin::Join(4))
        ));
        assert!(matches!(st.begin(ticket, need, t.mono), Begin::Join(4)));
    }
    // A forced refresh always goes through `begin`.
    assert!(st.begin_shared(ticket, Need::Forced).is_none());
    // After the refresh: the answer, without a lock to write.
    let _ = finish(&mut st, Ok(token("b", None)), t, &no_cooldown());
    assert!(matches!(
        st.begin_shared(ticket, Need::BeforeSend),
        Some(Begin::Answer(Ok(_)))
    ));
    // No flight and nothing newer: `begin` decides (start or cool-down).
    let Lookup::Usable { ticket, .. } = st.lookup(t, POLICY) else {
        panic!("usable");
    };
    assert!(st.begin_shared(ticket, Need::BeforeSend).is_none());
}

#[test]
fn an_absurd_retry_after_never_panics_and_still_pauses() {
    let window = RefreshAhead::fixed(Duration::from_secs(120));
    let policy = Policy {
        leeway: Duration::from_secs(30),
        ahead: Some(&window),
    };
    for background in [true, false] {
        let mut st = S::new();
        let t = now();
        st.install(token("a", Some(600)), t);
        st.started(1, background, 0, false);
        let err = RefreshError::transient("slow down").with_retry_after(Duration::MAX);
        let (answer, _) = finish(&mut st, Err(err), t, &Cooldown::default());
        assert!(matches!(answer, Err(Unavailable::Failed(_))));
        // An hour on, the token long expired: still paused, no refresh starts.
        let hour = later(t, Duration::from_secs(3600));
        if background {
            assert!(!st.ahead_due(later(t, Duration::from_secs(500)), policy));
            assert!(st.ahead_not_before.is_some_and(|at| at > hour.mono));
        } else {
            assert!(matches!(st.lookup(hour, policy), Lookup::Cooling(_)));
        }
    }
}

#[test]
fn an_invalidation_during_a_refresh_makes_the_same_flight_refresh_again() {
    let mut st = S::new();
    let t = now();
    st.install(token("a", None), t);
    st.started(7, false, 1, false);
    st.invalidate();
    // A request after the invalidation joins the flight, which calls the refresher again
    // when its first call ends, handing on the token that call got (with rotation, its
    // refresh token is the only valid one).
    let after = st.ticket();
    assert!(matches!(
        st.begin(after, Need::BeforeSend, t.mono),
        Begin::Join(7)
    ));
    match st.finish(1, Ok(token("early", None)), t, &no_cooldown()) {
        Finished::Again {
            generation, stale, ..
        } => {
            assert_eq!(generation, after.generation);
            assert_eq!(stale.unwrap().secret(), "early");
        }
        other => panic!("expected another round, got {other:?}"),
    }
    // Still one flight: nobody starts a refresh beside it.
    assert!(matches!(
        st.begin(after, Need::BeforeSend, t.mono),
        Begin::Join(7)
    ));
    assert!(matches!(st.lookup(t, POLICY), Lookup::Stale { .. }));
    // Its second round answers every waiter with a token from after the invalidation.
    let (answer, events) = finish(&mut st, Ok(token("late", None)), t, &no_cooldown());
    assert_eq!(answer.unwrap().header, "Bearer late");
    assert!(matches!(events[0], Some(RefreshEvent::Refreshed { .. })));
    assert!(st.flight.is_none());
}

/// A token installed by the handle while an older refresh runs, and refused since (a request
/// sent with it met a 401 and joined the flight): the flight's answer must not be that very
/// token. It refreshes again, from the installed token set, for the new generation.
#[test]
fn a_refused_installed_token_makes_a_superseded_flight_refresh_again() {
    let mut st = S::new();
    let t = now();
    st.started(7, false, 1, false);
    st.install(token("installed", None), t);
    let sent = st.ticket();
    assert!(matches!(
        st.begin(sent, Need::Refused, t.mono),
        Begin::Join(7)
    ));
    match st.finish(1, Ok(token("from-before", None)), t, &no_cooldown()) {
        Finished::Again {
            generation, stale, ..
        } => {
            assert_eq!(generation, sent.generation);
            assert_eq!(stale.unwrap().secret(), "installed");
        }
        other => panic!("expected another round, got {other:?}"),
    }
    let (answer, _) = finish(&mut st, Ok(token("new", None)), t, &no_cooldown());
    let fresh = answer.unwrap();
    assert_eq!(fresh.header, "Bearer new");
    assert!(fresh.ticket.generation > sent.generation);
}

/// A forced refresh asked for after the handle cleared the token, while an older refresh
/// ran: it joins that flight, which then calls the refresher again instead of answering with
/// the logout.
#[test]
fn a_forced_refresh_after_a_clear_makes_a_superseded_flight_refresh_again() {
    let mut st = S::new();
    let t = now();
    st.install(token("a", None), t);
    st.started(7, false, 1, false);
    st.clear();
    let after = st.ticket();
    assert!(matches!(
        st.begin(after, Need::Forced, t.mono),
        Begin::Join(7)
    ));
    assert!(matches!(
        st.finish(1, Ok(token("from-before", None)), t, &no_cooldown()),
        Finished::Again { .. }
    ));
    let (answer, _) = finish(&mut st, Ok(token("forced", None)), t, &no_cooldown());
    assert_eq!(answer.unwrap().header, "Bearer forced");
}

#[test]
fn a_finishing_refresh_that_is_no_longer_the_flight_records_nothing() {
    let mut st = S::new();
    let t = now();
    st.started(1, false, 1, false);
    // Its waiters gave up on it; another started.
    st.flight = None;
    st.started(2, false, 2, false);
    let generation = st.generation;
    match st.finish(1, Ok(token("late", None)), t, &no_cooldown()) {
        Finished::Done(_, events) => assert_eq!(events, [None, None]),
        other => panic!("expected no second round, got {other:?}"),
    }
    assert_eq!(st.generation, generation);
    assert!(matches!(
        st.begin(st.ticket(), Need::BeforeSend, t.mono),
        Begin::Join(2)
    ));
    let (answer, _) = finish(&mut st, Ok(token("b", None)), t, &no_cooldown());
    assert_eq!(answer.unwrap().header, "Bearer b");
}

#[test]
fn a_failed_background_refresh_joined_inside_the_leeway_keeps_the_valid_token() {
    let mut st = S::new();
    let t = now();
    let window = RefreshAhead::fixed(Duration::from_secs(120));
    let policy = Policy {
        leeway: Duration::from_secs(30),
        ahead: Some(&window),
    };
    st.install(token("a", Some(600)), t);
    // A background refresh starts in the window and is still running when the leeway
    // starts: a request there waits for it (it joins the background flight).
    let inside = later(t, Duration::from_secs(500));
    assert!(st.ahead_due(inside, policy));
    st.started(1, true, 1, false);
    let leeway = later(t, Duration::from_secs(580));
    let Lookup::Stale { ticket, .. } = st.lookup(leeway, policy) else {
        panic!("inside the leeway, requests wait for the refresh");
    };
    assert!(matches!(
        st.begin_shared(ticket, Need::BeforeSend),
        Some(Begin::Join(1))
    ));
    // It fails transiently: one event, and its waiters (who look again) and later requests
    // keep the token, still valid for 20 s, as after a failed foreground refresh. (No
    // cool-down: the background pause is its shortest, 1 s.)
    let (answer, events) = finish(
        &mut st,
        Err(RefreshError::transient("503")),
        leeway,
        &no_cooldown(),
    );
    assert!(matches!(answer, Err(Unavailable::Failed(_))));
    assert!(matches!(
        events,
        [
            Some(RefreshEvent::RefreshFailed {
                terminal: false,
                ..
            }),
            None
        ]
    ));
    let Lookup::Usable { header, ahead, .. } = st.lookup(leeway, policy) else {
        panic!("the still-valid token is used after a failed background refresh");
    };
    assert_eq!(header, "Bearer a");
    assert!(!ahead);
    // Once its pause is over, the leeway's foreground refresh takes over.
    let paused_out = later(t, Duration::from_secs(582));
    assert!(matches!(
        st.lookup(paused_out, policy),
        Lookup::Stale { expired: true, .. }
    ));
    // Past the hard deadline the token is never sent.
    let dead = later(t, Duration::from_secs(600));
    assert!(matches!(
        st.lookup(dead, policy),
        Lookup::Stale { expired: true, .. }
    ));
}

#[test]
fn a_refusal_joining_a_background_refresh_makes_it_a_foreground_one() {
    let mut st = S::new();
    let t = now();
    let cooldown = Cooldown::new(Duration::from_secs(10), Duration::from_secs(10));
    st.install(token("a", Some(600)), t);
    let sent = st.ticket();
    st.started(1, true, 1, false);
    // A request inside the leeway joins it as it is, on the shared path.
    assert!(matches!(
        st.begin_shared(sent, Need::BeforeSend),
        Some(Begin::Join(1))
    ));
    assert!(st.flight.as_ref().unwrap().background);
    // A refusal takes the write lock (even of a token already marked refused), and from then
    // on the flight is a foreground one.
    assert!(st.begin_shared(sent, Need::Refused).is_none());
    assert!(matches!(
        st.begin(sent, Need::Refused, t.mono),
        Begin::Join(1)
    ));
    assert!(!st.flight.as_ref().unwrap().background);
    assert!(matches!(
        st.begin_shared(sent, Need::Refused),
        Some(Begin::Join(1))
    ));
    // Its transient failure is booked as a foreground one: a failure in a row, a cool-down.
    let (answer, _) = finish(&mut st, Err(RefreshError::transient("503")), t, &cooldown);
    assert!(matches!(answer, Err(Unavailable::Failed(_))));
    assert_eq!(st.failures, 1);
    assert!(st.cooling_at(t.mono).is_some());
    assert!(st.ahead_not_before.is_none());
}

#[test]
fn a_login_then_an_invalidation_during_a_refresh_keeps_the_logins_refresh_token() {
    let mut st = S::new();
    let t = now();
    st.install(token("old", None).with_refresh_token("r-old"), t);
    // A refresh starts from the old refresh token; meanwhile the handle logs in, then
    // invalidates the new token.
    st.started(7, false, 1, false);
    st.install(token("login", None).with_refresh_token("r-login"), t);
    st.invalidate();
    match st.finish(
        1,
        Ok(token("old-refreshed", None).with_refresh_token("r-old-2")),
        t,
        &no_cooldown(),
    ) {
        Finished::Again { stale, .. } => {
            let stale = stale.expect("the invalidated login token");
            assert_eq!(stale.secret(), "login");
            assert_eq!(stale.refresh_token(), Some("r-login"));
        }
        other => panic!("expected another round, got {other:?}"),
    }
    // Without an install, the refresh's token is still handed on (refresh-token rotation).
    st.invalidate();
    match st.finish(
        1,
        Ok(token("login-refreshed", None).with_refresh_token("r-login-2")),
        t,
        &no_cooldown(),
    ) {
        Finished::Again { stale, .. } => {
            assert_eq!(stale.unwrap().refresh_token(), Some("r-login-2"));
        }
        other => panic!("expected another round, got {other:?}"),
    }
}

#[test]
fn invalidate_leaves_an_ended_session_ended() {
    let mut st = S::new();
    let t = now();
    st.install(token("a", None), t);
    st.clear();
    let generation = st.generation;
    assert_eq!(st.invalidate(), (generation, false));
    assert!(matches!(st.lookup(t, POLICY), Lookup::Ended(_)));
    // After a terminal failure too: the revoked credentials are not tried again.
    let mut st = S::new();
    st.install(token("a", None), t);
    st.started(1, false, 1, false);
    let _ = finish(
        &mut st,
        Err(RefreshError::terminal("invalid_grant")),
        t,
        &no_cooldown(),
    );
    st.invalidate();
    assert!(matches!(st.lookup(t, POLICY), Lookup::Ended(_)));
    assert!(matches!(
        st.begin(st.ticket(), Need::BeforeSend, t.mono),
        Begin::Answer(Err(Unavailable::Ended(_)))
    ));
}

/// Review item (this session): a request that needs a token while a forced refresh runs
/// during a cool-down joins that refresh; it failed fast with the cool-down's error.
#[test]
fn a_forced_refresh_during_a_cool_down_is_joined_by_requests_that_need_a_token() {
    let cooldown = Cooldown::new(Duration::from_secs(200), Duration::from_secs(200));
    for installed in [None, Some(10)] {
        let mut st = S::new();
        let t = now();
        if let Some(life) = installed {
            st.install(token("a", Some(life)), t);
        }
        let later = later(t, Duration::from_secs(20));
        // A refresh fails: the cool-down runs, and a request fails fast.
        let ticket = st.ticket();
        assert!(matches!(
            st.begin(ticket, Need::BeforeSend, later.mono),
            Begin::Start
        ));
        st.started(1, false, 1, false);
        let _failed = finish(
            &mut st,
            Err(RefreshError::transient("503")),
            later,
            &cooldown,
        );
        assert!(matches!(st.lookup(later, POLICY), Lookup::Cooling(_)));
        // A forced refresh starts: requests that need a token wait for it.
        assert!(matches!(
            st.begin(st.ticket(), Need::Forced, later.mono),
            Begin::Start
        ));
        st.started(2, false, 2, false);
        let Lookup::Stale { ticket, .. } = st.lookup(later, POLICY) else {
            panic!("a request joins the forced refresh ({installed:?})");
        };
        assert!(matches!(
            st.begin_shared(ticket, Need::BeforeSend),
            Some(Begin::Join(2))
        ));
        let (answer, _) = finish(&mut st, Ok(token("b", None)), later, &cooldown);
        assert_eq!(answer.unwrap().header, "Bearer b");
    }
}

/// Review item (this session): dropping the token keeps the cool-down and the failures in a
/// row; it ended them, so an application that invalidated after each error while the token
/// endpoint was down got the whole retry budget again each time.
#[test]
fn invalidating_keeps_the_cool_down_and_the_failures_in_a_row() {
    let cooldown = Cooldown::new(Duration::from_secs(30), Duration::from_secs(30));
    let mut st = S::new();
    let t = now();
    st.install(token("a", None), t);
    let ticket = st.ticket();
    assert!(matches!(
        st.begin(ticket, Need::Refused, t.mono),
        Begin::Start
    ));
    st.started(1, false, 1, false);
    let (answer, _) = finish(&mut st, Err(RefreshError::transient("503")), t, &cooldown);
    assert!(matches!(answer, Err(Unavailable::Failed(_))));
    assert_eq!(st.failures, 1);
    let (_, dropped) = st.invalidate();
    assert!(dropped);
    assert_eq!(st.failures, 1);
    let Lookup::Cooling(c) = st.lookup(t, POLICY) else {
        panic!("still cooling down after an invalidation");
    };
    assert!(c.left > Duration::ZERO);
    assert!(matches!(
        st.begin(st.ticket(), Need::BeforeSend, t.mono),
        Begin::Answer(Err(Unavailable::Cooling(_)))
    ));
    // The pause over, the next refresh may start.
    let after = later(t, Duration::from_secs(31));
    assert!(matches!(
        st.begin(st.ticket(), Need::BeforeSend, after.mono),
        Begin::Start
    ));
}

/// A token a refresh got is never taken for an installed login: a cell whose first refresh
/// (at generation 0, nothing ever installed) got a token while an invalidation came, and
/// whose second call failed, holds that token as the stale one one generation on; it is no
/// login (the keyed layer would keep it on eviction for a refresher that keeps sessions).
#[test]
fn a_refreshed_token_handed_on_by_an_invalidation_is_no_installed_login() {
    let t = now();
    let mut st = S::new();
    st.started(1, false, 0, false);
    st.invalidate();
    let got = token("from-refresh", Some(3600)).with_refresh_token("rt-1");
    assert!(matches!(
        st.finish(0, Ok(got), t, &no_cooldown()),
        Finished::Again { .. }
    ));
    let (answer, _) = finish(
        &mut st,
        Err(RefreshError::transient("token endpoint down")),
        t,
        &no_cooldown(),
    );
    assert!(answer.is_err());
    assert!(
        matches!(&st.session, Session::Empty { stale: Some(s) } if s.secret() == "from-refresh")
    );
    assert!(st.installed().is_none());

    // An install is a login, also once invalidated right after.
    st.install(token("login", Some(3600)).with_refresh_token("rt-login"), t);
    assert_eq!(st.installed().map(Token::secret), Some("login"));
    st.invalidate();
    assert_eq!(st.installed().map(Token::secret), Some("login"));
}
