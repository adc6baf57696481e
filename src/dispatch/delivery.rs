//! Delivery: one handler on one event, with its timeout, retries and backoff; a delivery that
//! gives up becomes a dead letter.

use std::task::Poll;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::outcome::{DeadLetter, Outcome};
use crate::config::RetryPolicy;
use crate::event::SaveEvent;
use crate::handler::{Delivery, Failure, HandlerError};
use crate::lease::Lease;
use crate::registry::Route;
use crate::stats::{HandlerMetrics, Stats};

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    Done,
    Dead,
    HandedBack,
}

/// Runs `route`'s handler for `event` until it succeeds, gives up, or the daemon stops.
///
/// `stop` ends the waits between attempts; `abort` also drops a running attempt.
pub(crate) async fn deliver(
    route: &Route,
    event: &SaveEvent,
    stop: &CancellationToken,
    abort: &CancellationToken,
    lease: Option<&Lease>,
    metrics: &HandlerMetrics,
    outcomes: &mpsc::UnboundedSender<Outcome>,
) -> Delivered {
    let stats = &metrics.stats;
    let receiver = &route.receiver;
    let policy = receiver.retry_policy();
    // built at the first failure: most deliveries never need it
    let mut delays = None;
    for attempt in 1..=policy.attempts {
        // Once stopping, nothing new starts: queued work is handed back.
        if stop.is_cancelled() {
            return Delivered::HandedBack;
        }
        // A free permit, as for most events, is taken at once; only a wait for one can outlast
        // a stop, so only then is the stop looked at again.
        let _permit = match route.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                let permit = tokio::select! {
                    biased;
                    p = route.permits.acquire() => p,
                    () = stop.cancelled() => return Delivered::HandedBack,
                };
                let Ok(permit) = permit else { return Delivered::HandedBack };
                if stop.is_cancelled() {
                    return Delivered::HandedBack;
                }
                permit
            }
        };
        // With several daemons, only the lease holder starts an attempt, and an attempt still
        // running when the lease runs out is dropped: no two daemons dispatch at once.
        if lease.is_some_and(|l| !l.held()) {
            return Delivered::HandedBack;
        }
        let lease_lost = async {
            match lease {
                Some(l) => l.lost().await,
                None => std::future::pending().await,
            }
        };
        let delivery = Delivery { handler: receiver.name().to_owned(), attempt, max_attempts: policy.attempts };
        let started = std::time::Instant::now();
        let result = tokio::select! {
            biased;
            r = attempt_once(route, event, &delivery, started) => r,
            () = abort.cancelled() => return Delivered::HandedBack,
            () = lease_lost => return Delivered::HandedBack,
        };
        metrics.durations.observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(()) => {
                Stats::bump(&stats.handled);
                metrics.handled.inc();
                return Delivered::Done;
            }
            Err(e) => e,
        };
        Stats::bump(&stats.failed_attempts);
        metrics.failed.inc();
        if attempt == policy.attempts || error.failure == Failure::Permanent {
            let attempts = i32::try_from(attempt).unwrap_or(i32::MAX);
            give_up(receiver.name(), event, attempts, &error.message, metrics, outcomes);
            return Delivered::Dead;
        }
        let backoff = delays.get_or_insert_with(|| RetryDelays::new(policy, fastrand::Rng::new())).next_delay();
        // A handler that knows when to come back (HTTP `Retry-After`) sets the wait, up to
        // the policy's longest backoff.
        let delay = error.retry_after.map_or(backoff, |d| d.min(policy.max_backoff));
        tracing::warn!(handler = receiver.name(), sender = %event.sender, id = ?event.id, attempt, retry_in = ?delay, error = %error, "handler failed; will retry");
        Stats::bump(&stats.retried);
        metrics.retried.inc();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return Delivered::HandedBack,
        }
    }
    Delivered::HandedBack
}

/// Makes `event`'s delivery to `handler` a dead letter: logged, counted, and sent to the ledger
/// writer, which writes it before (or with) the acknowledgement of the event's ledger row.
/// `attempts` is how many times the handler ran (none when its filter failed).
pub(crate) fn give_up(
    handler: &str,
    event: &SaveEvent,
    attempts: i32,
    error: &str,
    metrics: &HandlerMetrics,
    outcomes: &mpsc::UnboundedSender<Outcome>,
) {
    tracing::error!(handler, sender = %event.sender, id = ?event.id, attempts, error = %error, "delivery is dead");
    Stats::bump(&metrics.stats.dead);
    metrics.dead.inc();
    let _ = outcomes.send(Outcome::Dead(DeadLetter {
        event_id: event.id,
        handler: handler.to_owned(),
        sender: event.sender.clone(),
        event: event.to_json(),
        attempts,
        last_error: error.to_owned(),
    }));
}

/// The waits between the attempts of one delivery: exponential, with jitter, never longer than
/// the policy's `max_backoff`.
///
/// The n-th wait is drawn from `[ceiling / 2, ceiling]`, where the ceiling is `backoff × 2^n`
/// capped at `max_backoff` (and the floor never below `backoff` while that fits under the cap).
/// Before the cap this is the spread backon's jitter gives (`[d, 2d)` for a nominal `d`); at the
/// cap the jitter stays inside it, where backon adds it on top and reaches twice `max_backoff`.
/// Deliveries that fail together still spread out there instead of retrying in step.
struct RetryDelays {
    /// The nominal delays, `backoff` doubling up to `max_backoff`, without jitter.
    nominal: backon::ExponentialBackoff,
    backoff: Duration,
    max_backoff: Duration,
    rng: fastrand::Rng,
}

impl RetryDelays {
    fn new(policy: RetryPolicy, rng: fastrand::Rng) -> Self {
        let nominal = ExponentialBuilder::default()
            .with_min_delay(policy.backoff)
            .with_max_delay(policy.max_backoff)
            .without_max_times()
            .build();
        RetryDelays { nominal, backoff: policy.backoff, max_backoff: policy.max_backoff, rng }
    }

    fn next_delay(&mut self) -> Duration {
        let nominal = self.nominal.next().unwrap_or(self.max_backoff);
        let ceiling = nominal.saturating_mul(2).min(self.max_backoff);
        let floor = (ceiling / 2).max(self.backoff.min(ceiling));
        floor + (ceiling - floor).mul_f64(self.rng.f64())
    }
}

/// One call of the handler, cut off `attempt_timeout` after `started` (the attempt's clock
/// reading, shared with its duration metric: reading the clock twice showed in drain profiles).
async fn attempt_once(
    route: &Route,
    event: &SaveEvent,
    delivery: &Delivery,
    started: std::time::Instant,
) -> Result<(), HandlerError> {
    let timeout = route.receiver.attempt_timeout();
    let mut call = route.handler.handle(event, delivery);
    // A handler that finishes in its first poll (as many do: a log line, a queued message)
    // needs no timer: the timeout is set up only for one that has to wait.
    if let Poll::Ready(result) = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await {
        return result;
    }
    let deadline = tokio::time::Instant::from_std(started) + timeout;
    match tokio::time::timeout_at(deadline, call).await {
        Ok(result) => result,
        Err(_) => Err(HandlerError::retry(format!("timed out after {}", humantime::format_duration(timeout)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff_ms: u64, max_backoff_ms: u64) -> RetryPolicy {
        RetryPolicy {
            attempts: u32::MAX,
            backoff: Duration::from_millis(backoff_ms),
            max_backoff: Duration::from_millis(max_backoff_ms),
        }
    }

    /// The first `n` delays of a delivery, from a seeded generator.
    fn delays(policy: RetryPolicy, seed: u64, n: usize) -> Vec<Duration> {
        let mut delays = RetryDelays::new(policy, fastrand::Rng::with_seed(seed));
        (0..n).map(|_| delays.next_delay()).collect()
    }

    #[test]
    fn no_delay_exceeds_max_backoff() {
        // backoff above, at and far below the cap, and one the cap cuts mid-doubling
        for (backoff, max) in [(200, 500), (100, 100), (1, 300_000), (1000, 500), (300, 1000), (20, 50)] {
            let p = policy(backoff, max);
            for seed in 0..200 {
                for d in delays(p, seed, 40) {
                    assert!(d <= p.max_backoff, "{d:?} > max_backoff {:?} (backoff {backoff} ms)", p.max_backoff);
                }
            }
        }
    }

    #[test]
    fn delays_grow_from_backoff_with_jitter_up_to_the_cap() {
        let p = policy(100, 1000);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let runs: Vec<Vec<Duration>> = (0..200).map(|seed| delays(p, seed, 8)).collect();
        for run in &runs {
            // before the cap: the n-th delay lies in [backoff × 2^n, backoff × 2^(n+1)]
            for (n, (low, high)) in [(100.0, 200.0), (200.0, 400.0), (400.0, 800.0)].into_iter().enumerate() {
                assert!((low..=high).contains(&ms(run[n])), "delay {n} = {:?}", run[n]);
            }
            // at the cap: inside [max_backoff / 2, max_backoff]
            for d in &run[3..] {
                assert!((500.0..=1000.0).contains(&ms(*d)), "capped delay {d:?}");
            }
        }
        // jittered, at the cap too: the deliveries that fail together do not retry in step
        let capped: std::collections::HashSet<Duration> = runs.iter().map(|r| r[7]).collect();
        assert!(capped.len() > 100, "only {} distinct capped delays", capped.len());
    }

    #[test]
    fn a_backoff_above_the_cap_waits_the_cap() {
        assert!(delays(policy(1000, 500), 7, 5).iter().all(|d| *d == Duration::from_millis(500)));
    }
}
