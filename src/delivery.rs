//! Delivery: attempts with timeout and retries, dead letters, and batched acknowledgements.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::DaemonConfig;
use crate::event::SaveEvent;
use crate::handler::{Delivery, Failure, HandlerError};
use crate::ledger::{self, DeadLetter};
use crate::registry::Route;
use crate::stats::Stats;

/// What became of one event, for the ledger writer.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Every handler finished (done or dead): acknowledge.
    Done(i64),
    /// The daemon stopped before every handler finished: leave it pending, redelivered later.
    HandedBack(i64),
    /// A delivery gave up.
    Dead(DeadLetter),
}

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivered {
    Done,
    Dead,
    HandedBack,
}

/// Ids fetched from the ledger and not yet acknowledged (or handed back): never dispatched twice.
pub(crate) type InFlight = Arc<Mutex<HashSet<i64>>>;

/// Runs `route`'s handler for `event` until it succeeds, gives up, or the daemon stops.
///
/// `stop` ends the waits between attempts; `abort` also drops a running attempt.
pub(crate) async fn deliver(
    route: &Route,
    event: &SaveEvent,
    stop: &CancellationToken,
    abort: &CancellationToken,
    stats: &Stats,
    outcomes: &mpsc::UnboundedSender<Outcome>,
) -> Delivered {
    let receiver = &route.receiver;
    let policy = receiver.retry_policy();
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(policy.backoff)
        .with_max_delay(policy.max_backoff)
        .with_jitter()
        .without_max_times()
        .build();
    for attempt in 1..=policy.attempts {
        let delivery = Delivery { handler: receiver.name().to_owned(), attempt, max_attempts: policy.attempts };
        let result = tokio::select! {
            r = attempt_once(route, event, &delivery) => r,
            () = abort.cancelled() => return Delivered::HandedBack,
        };
        let error = match result {
            Ok(()) => {
                Stats::bump(&stats.handled);
                return Delivered::Done;
            }
            Err(e) => e,
        };
        Stats::bump(&stats.failed_attempts);
        if attempt == policy.attempts || error.failure == Failure::Permanent {
            tracing::error!(handler = receiver.name(), sender = %event.sender, id = ?event.id, attempt, error = %error, "delivery is dead");
            Stats::bump(&stats.dead);
            let _ = outcomes.send(Outcome::Dead(DeadLetter {
                event_id: event.id,
                handler: receiver.name().to_owned(),
                sender: event.sender.clone(),
                event: event.to_json(),
                attempts: i32::try_from(attempt).unwrap_or(i32::MAX),
                last_error: error.message.clone(),
            }));
            return Delivered::Dead;
        }
        let delay = delays.next().unwrap_or(policy.max_backoff);
        tracing::warn!(handler = receiver.name(), sender = %event.sender, id = ?event.id, attempt, retry_in = ?delay, error = %error, "handler failed; will retry");
        Stats::bump(&stats.retried);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return Delivered::HandedBack,
        }
    }
    Delivered::HandedBack
}

async fn attempt_once(route: &Route, event: &SaveEvent, delivery: &Delivery) -> Result<(), HandlerError> {
    let Ok(_permit) = route.permits.acquire().await else {
        return Err(HandlerError::retry("handler is closed"));
    };
    let timeout = route.receiver.attempt_timeout();
    match tokio::time::timeout(timeout, route.handler.handle(event, delivery)).await {
        Ok(result) => result,
        Err(_) => Err(HandlerError::retry(format!("timed out after {}", humantime::format_duration(timeout)))),
    }
}

/// Writes outcomes to the ledger in batches until the channel closes.
///
/// A failed write is kept and tried again on the current connection (the listener replaces it
/// after a reconnect) until `give_up` fires; what is not written then stays pending in the
/// ledger and is delivered again: at least once.
pub(crate) async fn write_outcomes(
    mut rx: mpsc::UnboundedReceiver<Outcome>,
    mut client: watch::Receiver<Option<Arc<Client>>>,
    in_flight: InFlight,
    config: DaemonConfig,
    stats: Arc<Stats>,
    give_up: CancellationToken,
) {
    let mut dead = Vec::new();
    let mut acks = Vec::new();
    let mut handed_back = Vec::new();
    while let Some(first) = rx.recv().await {
        sort(first, &mut dead, &mut acks, &mut handed_back);
        let deadline = tokio::time::Instant::now() + config.ack_interval;
        while acks.len() + dead.len() < config.ack_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(o)) => sort(o, &mut dead, &mut acks, &mut handed_back),
                Ok(None) | Err(_) => break,
            }
        }
        if !acks.is_empty() || !dead.is_empty() {
            if !write_batch(&mut client, &dead, &acks, &give_up).await {
                tracing::warn!(
                    acks = acks.len(),
                    dead = dead.len(),
                    "outcomes not written; these events stay pending and will be delivered again"
                );
            } else {
                stats.acked.fetch_add(acks.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if let Ok(mut set) = in_flight.lock() {
            for id in acks.drain(..).chain(handed_back.drain(..)) {
                set.remove(&id);
            }
        }
        dead.clear();
    }
}

fn sort(outcome: Outcome, dead: &mut Vec<DeadLetter>, acks: &mut Vec<i64>, back: &mut Vec<i64>) {
    match outcome {
        Outcome::Done(id) => acks.push(id),
        Outcome::HandedBack(id) => back.push(id),
        Outcome::Dead(d) => dead.push(d),
    }
}

async fn write_batch(
    client: &mut watch::Receiver<Option<Arc<Client>>>,
    dead: &[DeadLetter],
    acks: &[i64],
    give_up: &CancellationToken,
) -> bool {
    loop {
        let current = client.borrow_and_update().clone();
        if let Some(c) = current {
            match ledger::write_outcomes(&c, dead, acks).await {
                Ok(_) => return true,
                Err(e) => tracing::warn!(error = %e, "writing acknowledgements failed; retrying"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = give_up.cancelled() => return false,
        }
    }
}
