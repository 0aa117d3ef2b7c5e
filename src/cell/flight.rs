//! Starting, joining and finishing a refresh.

use std::sync::Arc;

use futures_util::FutureExt;
use tracing::Instrument;

use super::attempt::{FlightSettings, attempt_all, has_runtime, spawn_detached};
use super::state::{Begin, Need, Session, State, Ticket};
use super::{Answer, Job, TokenCell, now, policy};
use crate::config::RefreshOptions;
use crate::events::RefreshEvent;
use crate::refresher::{RefreshContext, RefreshReason};

fn reason_name(reason: &RefreshReason) -> &'static str {
    match reason {
        RefreshReason::NoToken => "no token",
        RefreshReason::Expired => "expired",
        RefreshReason::Unauthorized(_) => "unauthorized",
        RefreshReason::Forced => "forced",
        RefreshReason::Background => "background",
    }
}

impl TokenCell {
    /// A token newer than `ticket`: the one already there if the cell moved on (a late 401
    /// from a stale token), the result of the refresh in flight, or of a new refresh.
    ///
    /// A refresh that completed since the ticket was taken and failed is this caller's answer
    /// too, so a failure is shared by every waiter instead of being retried once per waiter.
    pub(crate) async fn fresher_than(
        self: &Arc<Self>,
        ticket: Ticket,
        need: Need,
        reason: RefreshReason,
        options: &RefreshOptions,
    ) -> Answer {
        let (job, started) = {
            let mut st = self.write();
            match st.begin(ticket, need, options.clock.now()) {
                Begin::Answer(answer) => return answer,
                Begin::Join(job) => (job, false),
                Begin::Start => (self.start(&mut st, reason, options, false), true),
            }
        };
        if started {
            // A task of its own: the refresh survives the cancellation of every waiter. Each
            // waiter also polls the shared job, so a waiter drives it whenever the task's
            // runtime does not. Without a runtime the waiters alone drive it.
            spawn_detached(job.clone().map(drop));
        }
        Waiting {
            cell: self,
            job: Some(job),
            // Without a runtime there is no task to step aside for.
            yielded: !has_runtime(),
        }
        .await
    }

    /// Always calls the refresher, or joins the refresh already in flight. Ignores an ended
    /// session and a cool-down: the refresher may hold new credentials.
    pub(crate) async fn force_refresh(self: &Arc<Self>, options: &RefreshOptions) -> Answer {
        let ticket = self.ticket();
        self.fresher_than(ticket, Need::Forced, RefreshReason::Forced, options)
            .await
    }

    /// Starts one background refresh if it is due and none is in flight (refresh-ahead).
    pub(crate) fn refresh_ahead(self: &Arc<Self>, options: &RefreshOptions) {
        if !has_runtime() {
            return;
        }
        let job = {
            let mut st = self.write();
            if !st.ahead_due(now(options), policy(options)) {
                return;
            }
            self.start(&mut st, RefreshReason::Background, options, true)
        };
        spawn_detached(job.map(drop));
    }

    /// Builds the job of a new refresh and records it as the flight. Called under the lock.
    fn start(
        self: &Arc<Self>,
        st: &mut State<Job>,
        reason: RefreshReason,
        options: &RefreshOptions,
        background: bool,
    ) -> Job {
        let stale = match &st.session {
            Session::Active(held) => Some(held.token.clone()),
            Session::Empty { stale } | Session::Ended { stale, .. } => stale.clone(),
        };
        let settings = FlightSettings {
            retries: options.retries,
            cooldown: options.cooldown,
            timeout: options.refresh_timeout,
            clock: options.clock.clone(),
        };
        // After a failed refresh, one attempt per cool-down: retries are for blips.
        let single = background || st.failures > 0;
        let generation = st.generation;
        let span = tracing::debug_span!(
            "token_refresh",
            generation,
            background,
            reason = reason_name(&reason)
        );
        let ctx = RefreshContext::new(stale, reason);
        let cell = Arc::clone(self);
        let job = async move {
            let started = settings.clock.now();
            // A token installed (or a logout) between the decision and the start is the answer:
            // do not refresh it away (`finish` discards the outcome of a superseded refresh).
            let superseded = cell.read().generation != generation;
            let result = if superseded {
                Err(crate::refresher::RefreshError::transient(
                    "superseded before it started",
                ))
            } else {
                tracing::debug!("token refresh started");
                attempt_all(&*cell.refresher, ctx, &settings, single).await
            };
            let elapsed_ms = settings
                .clock
                .now()
                .saturating_duration_since(started)
                .as_millis() as u64;
            let error = result.as_ref().err().map(ToString::to_string);
            let reading = super::state::Now {
                mono: settings.clock.now(),
                wall: settings.clock.wall(),
            };
            let (answer, events) = cell.write().finish(result, reading, &settings.cooldown);
            match (&answer, error) {
                (Ok(fresh), _) => tracing::debug!(
                    generation = fresh.ticket.generation,
                    elapsed_ms,
                    background,
                    "token refresh succeeded"
                ),
                (Err(_), Some(error)) => {
                    tracing::warn!(elapsed_ms, background, %error, "token refresh failed")
                }
                (Err(_), None) => tracing::debug!(
                    elapsed_ms,
                    "token refresh result discarded: the token was replaced meanwhile"
                ),
            }
            for event in events.into_iter().flatten() {
                if let RefreshEvent::SessionEnded { generation } = event {
                    tracing::warn!(
                        generation,
                        "session ended: install new credentials to resume"
                    );
                }
                cell.emit(event);
            }
            answer
        }
        .instrument(span)
        .boxed()
        .shared();
        st.started(job.clone(), background);
        job
    }
}

/// A waiter on a refresh: polls the shared job (so a waiter drives it whenever no task does).
///
/// It steps aside once before its first poll, so that the task (and the requests already
/// queued behind this one) get to the job first: requests that run concurrently then all join
/// this refresh instead of finding it finished and starting another.
///
/// If it is dropped as the last one driving a job that no task drives (no runtime, or the
/// task's runtime is gone), the refresh is cancelled and the flight cleared, so that the next
/// request starts a new one instead of waiting on a job nobody polls.
struct Waiting<'a> {
    cell: &'a TokenCell,
    job: Option<Job>,
    yielded: bool,
}

impl std::future::Future for Waiting<'_> {
    type Output = Answer;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Answer> {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let job = self.job.as_mut().expect("polled after completion");
        let answer = std::task::ready!(std::pin::Pin::new(job).poll(cx));
        self.job = None;
        std::task::Poll::Ready(answer)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(job) = self.job.take() else {
            return;
        };
        if job.peek().is_some() {
            return;
        }
        let mut st = self.cell.write();
        let ours = st
            .flight
            .as_ref()
            .is_some_and(|f| futures_util::future::Shared::ptr_eq(&f.job, &job));
        // The state's clone and this one: nobody else will ever poll it.
        if ours && job.strong_count() == Some(2) {
            st.flight = None;
            drop(st);
            tracing::debug!("token refresh cancelled: its last driver was dropped");
        }
    }
}
