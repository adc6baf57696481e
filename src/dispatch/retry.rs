//! The retries operators ask for (`post-save dead retry`): dead letters whose retry was
//! requested are run through their handler again, outside the row lanes, and the dead letter is
//! deleted when delivered or updated when it fails again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use super::delivery::{Delivered, deliver, give_up};
use super::outcome::Outcome;
use super::router::Router;
use super::{POISONED, UNWATCHED};
use crate::db::Work;
use crate::event::SaveEvent;
use crate::expr::EventContext;

/// The requested retries, and which of them are running.
#[derive(Default)]
pub(crate) struct Retries {
    /// Dead letters whose retry is running.
    running: Mutex<HashSet<i64>>,
}

impl Retries {
    /// Starts the retries operators requested (`post-save dead retry`) that are not running.
    pub(crate) async fn check(
        self: &Arc<Self>,
        work: &Arc<Work>,
        router: &Arc<Router>,
    ) -> Result<(), tokio_postgres::Error> {
        let busy: Vec<i64> = self.running.lock().expect(POISONED).iter().copied().collect();
        let requests = retry_requests(&work.client, &busy).await?;
        for request in requests {
            let id = request.id;
            let event = match serde_json::from_str::<SaveEvent>(&request.event) {
                Ok(event) => event,
                Err(e) => {
                    let error = format!("retry requested, but the stored event does not decode: {e}");
                    tracing::warn!(dead_letter = id, %error, "cannot retry a dead letter");
                    retry_done(&work.client, id, Some((0, &error))).await?;
                    continue;
                }
            };
            if request.handler == UNWATCHED {
                route_unwatched(router, work, id, &event).await?;
                continue;
            }
            self.running.lock().expect(POISONED).insert(id);
            let running = Arc::clone(self);
            let settled = move || {
                running.running.lock().expect(POISONED).remove(&id);
            };
            let handler = request.handler.clone();
            if !redeliver(router, request, event, Arc::clone(work), settled) {
                self.running.lock().expect(POISONED).remove(&id);
                let error = format!("retry requested, but no handler named {handler:?} is registered");
                tracing::warn!(dead_letter = id, %handler, "cannot retry a dead letter: no such handler");
                retry_done(&work.client, id, Some((0, &error))).await?;
            }
        }
        Ok(())
    }
}

/// A save of a table no watch named, retried: one dead letter per handler that receives it
/// now, each retried in turn; with none, it stays and says why.
async fn route_unwatched(
    router: &Router,
    work: &Work,
    id: i64,
    event: &SaveEvent,
) -> Result<(), tokio_postgres::Error> {
    let handlers = router.receivers_of(event);
    if handlers.is_empty() {
        let error = format!(
            "no handler receives saves of {} yet: watch the table under this name and give its handlers this sender",
            event.sender
        );
        tracing::warn!(dead_letter = id, sender = %event.sender, "cannot retry a save of an unwatched table: no handler receives it");
        retry_done(&work.client, id, Some((0, &error))).await?;
    } else {
        tracing::info!(dead_letter = id, sender = %event.sender, ?handlers, "a save of an unwatched table goes to its handlers");
        fan_out(&work.client, id, &handlers).await?;
    }
    Ok(())
}

/// Runs a dead letter's `event` through the handler named `handler` again, outside the
/// row lanes (an operator's retry), then records the result on `work`. `settled` runs when
/// it ends. False when no handler has that name.
fn redeliver(
    router: &Arc<Router>,
    request: RetryRequest,
    event: SaveEvent,
    work: Arc<Work>,
    settled: impl FnOnce() + Send + 'static,
) -> bool {
    let Some(index) = router.registry.routes().iter().position(|r| r.receiver.name() == request.handler) else {
        return false;
    };
    let tracker = router.tracker.clone();
    let router = Arc::clone(router);
    tracker.spawn(async move {
        let route = &router.registry.routes()[index];
        // The new attempts' outcome is recorded on the dead letter itself, not as a new one.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let metrics = &router.metrics[index];
        // The filter decides again: it may have been fixed since it failed on this event,
        // and an event it now leaves out is not the handler's to receive.
        let ctx = route.receiver.has_filter().then(|| EventContext::new(&event));
        let passes = route.receiver.passes(ctx.as_ref());
        let left_out = matches!(passes, Ok(false));
        let how = match passes {
            Err(e) => {
                give_up(route.receiver.name(), &event, 0, &e.to_string(), metrics, &tx);
                Delivered::Dead
            }
            Ok(false) => Delivered::Done,
            Ok(true) => {
                deliver(route, &event, &router.stop, &router.abort, router.lease.as_deref(), metrics, &tx).await
            }
        };
        let failure = match (how, rx.try_recv()) {
            (Delivered::Done, _) => Some(None),
            (Delivered::Dead, Ok(Outcome::Dead(d))) => Some(Some((d.attempts, d.last_error))),
            _ => None,
        };
        if let Some(failure) = failure {
            let failed = failure.as_ref().map(|(a, e)| (*a, e.as_str()));
            match retry_done(&work.client, request.id, failed).await {
                Ok(()) if left_out => tracing::info!(dead_letter = request.id, handler = %request.handler, "dead letter retried; the handler's filter leaves the event out now, nothing delivered"),
                Ok(()) if failed.is_none() => tracing::info!(dead_letter = request.id, handler = %request.handler, "dead letter retried and delivered"),
                Ok(()) => tracing::warn!(dead_letter = request.id, handler = %request.handler, "dead letter retried and failed again"),
                Err(e) => tracing::warn!(dead_letter = request.id, error = %e, "could not record the retry; it will run again"),
            }
        }
        settled();
    });
    true
}

/// A dead letter whose retry was requested (`post-save dead retry`).
#[derive(Debug)]
pub(crate) struct RetryRequest {
    pub id: i64,
    pub handler: String,
    pub event: String,
}

/// Dead letters waiting for a retry, oldest first, leaving out `busy` (already running).
async fn retry_requests(client: &Client, busy: &[i64]) -> Result<Vec<RetryRequest>, tokio_postgres::Error> {
    let rows = client
        .query_typed(
            "SELECT id, handler, event::text FROM post_save.dead_letter \
              WHERE retry_requested_at IS NOT NULL AND id <> ALL($1) ORDER BY id LIMIT 100",
            &[(&busy, Type::INT8_ARRAY)],
        )
        .await?;
    Ok(rows.iter().map(|r| RetryRequest { id: r.get(0), handler: r.get(1), event: r.get(2) }).collect())
}

/// Turns one dead letter into one per handler in `handlers`, each queued for a retry: the saves of
/// a table no watch named, once handlers receive its sender.
async fn fan_out(client: &Client, id: i64, handlers: &[String]) -> Result<(), tokio_postgres::Error> {
    client
        .execute_typed(
            "WITH kept AS (DELETE FROM post_save.dead_letter WHERE id = $1 RETURNING *) \
             INSERT INTO post_save.dead_letter (event_id, handler, sender, event, attempts, last_error, retry_requested_at) \
             SELECT kept.event_id, h, kept.sender, kept.event, kept.attempts, kept.last_error, clock_timestamp() \
               FROM kept, unnest($2::text[]) h",
            &[(&id, Type::INT8), (&handlers, Type::TEXT_ARRAY)],
        )
        .await?;
    Ok(())
}

/// Records how a requested retry ended: `None` (delivered) deletes the dead letter; a failure
/// adds its attempts, keeps its error and clears the request.
async fn retry_done(client: &Client, id: i64, failure: Option<(i32, &str)>) -> Result<(), tokio_postgres::Error> {
    match failure {
        None => client.execute_typed("DELETE FROM post_save.dead_letter WHERE id = $1", &[(&id, Type::INT8)]).await?,
        Some((attempts, error)) => {
            client
                .execute_typed(
                    "UPDATE post_save.dead_letter SET attempts = attempts + $2, last_error = $3, \
                            dead_at = clock_timestamp(), retry_requested_at = NULL WHERE id = $1",
                    &[(&id, Type::INT8), (&attempts, Type::INT4), (&error, Type::TEXT)],
                )
                .await?
        }
    };
    Ok(())
}
