//! The router: which handlers an event goes to. Each event goes onto the row lane of every
//! handler whose receiver accepts it (see [`super::lanes`] for the order they keep); a worker
//! per busy lane, up to each handler's concurrency, runs the deliveries. A batch is done, and
//! its completion told, when the last delivery of its last event ends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::delivery::{Delivered, deliver, give_up};
use super::lanes::{Job, LaneKey, Lanes, changes_key};
use super::outcome::{DeadLetter, Outcome};
use super::{Batch, Completion, POISONED};
use crate::event::SaveEvent;
use crate::lease::Lease;
use crate::registry::Registry;
use crate::stats::{HandlerMetrics, Stats};

/// Counts the deliveries of one batch's events; when the last one ends, sends the batch's
/// outcome (if its completion asks for one) and lets go of its in-flight permit.
pub(super) struct Tally {
    remaining: AtomicUsize,
    handed_back: AtomicBool,
    completion: Completion,
    outcomes: mpsc::UnboundedSender<Outcome>,
    _permit: OwnedSemaphorePermit,
}

/// The outcome a batch's end sends, if any.
fn outcome(completion: &Completion, handed_back: bool) -> Option<Outcome> {
    match completion {
        Completion::None => None,
        Completion::Ack(id) => Some(if handed_back { Outcome::HandedBack(*id) } else { Outcome::Done(*id) }),
        Completion::Notify(notice) => Some(Outcome::Notify(notice.clone(), handed_back)),
    }
}

impl Tally {
    pub(super) fn new(
        remaining: usize,
        completion: Completion,
        outcomes: mpsc::UnboundedSender<Outcome>,
        permit: OwnedSemaphorePermit,
    ) -> Tally {
        Tally {
            remaining: AtomicUsize::new(remaining),
            handed_back: AtomicBool::new(false),
            completion,
            outcomes,
            _permit: permit,
        }
    }

    pub(super) fn finish(&self, how: Delivered) {
        if how == Delivered::HandedBack {
            self.handed_back.store(true, Ordering::Relaxed);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(outcome) = outcome(&self.completion, self.handed_back.load(Ordering::Relaxed))
        {
            let _ = self.outcomes.send(outcome);
        }
    }
}

/// Routes events to handler lanes.
pub(crate) struct Router {
    pub(super) registry: Arc<Registry>,
    lanes: Mutex<Lanes>,
    pub(super) tracker: TaskTracker,
    pub(super) stop: CancellationToken,
    pub(super) abort: CancellationToken,
    outcomes: mpsc::UnboundedSender<Outcome>,
    stats: Arc<Stats>,
    /// Each route's metric handles, by route index.
    pub(super) metrics: Vec<HandlerMetrics>,
    pub(super) lease: Option<Arc<Lease>>,
}

impl Router {
    pub(crate) fn new(
        registry: Arc<Registry>,
        outcomes: mpsc::UnboundedSender<Outcome>,
        stats: Arc<Stats>,
        stop: CancellationToken,
        lease: Option<Arc<Lease>>,
    ) -> Arc<Router> {
        let metrics = registry.routes().iter().map(|r| stats.handler_metrics(r.receiver.name())).collect();
        let routes = registry.routes().len();
        Arc::new(Router {
            registry,
            lanes: Mutex::new(Lanes::new(routes)),
            tracker: TaskTracker::new(),
            stop,
            abort: CancellationToken::new(),
            outcomes,
            stats,
            metrics,
            lease,
        })
    }

    /// The names of the handlers `event` goes to (a filter that fails on it counts as one).
    pub(crate) fn receivers_of(&self, event: &SaveEvent) -> Vec<String> {
        let mut failed = Vec::new();
        let mut routes = self.registry.matching(event, &mut failed);
        routes.extend(failed.into_iter().map(|(route, _)| route));
        routes.sort_unstable();
        routes.into_iter().map(|r| self.registry.routes()[r].receiver.name().to_owned()).collect()
    }

    /// Keeps events no handler may receive as dead letters of `handler`, for an operator to
    /// look at and retry (`post-save dead`).
    pub(crate) fn keep_dead(&self, handler: &str, events: Vec<SaveEvent>, why: &str) {
        for event in events {
            Stats::bump(&self.stats.dead);
            let _ = self.outcomes.send(Outcome::Dead(DeadLetter {
                event_id: event.id,
                handler: handler.to_owned(),
                sender: event.sender.clone(),
                event: event.to_json(),
                attempts: 0,
                last_error: why.to_owned(),
            }));
        }
    }

    /// Queues each event of `batch` on the lanes of every handler that accepts it; its
    /// completion is told, and its permit let go, when every delivery has ended.
    pub(crate) fn dispatch(self: &Arc<Self>, batch: Batch) {
        let Batch { events, permit, completion } = batch;
        let mut jobs = Vec::new();
        let mut failed = Vec::new();
        for event in events {
            Stats::bump(&self.stats.events);
            let routes = self.registry.matching(&event, &mut failed);
            // A filter that fails on the event (say it names a column a migration dropped)
            // makes a dead letter: sent before the completion below reports the event done, so
            // it is written no later than the acknowledgement.
            for (route, error) in failed.drain(..) {
                let name = self.registry.routes()[route].receiver.name();
                give_up(name, &event, 0, &error.to_string(), &self.metrics[route], &self.outcomes);
            }
            if routes.is_empty() {
                tracing::debug!(sender = %event.sender, id = ?event.id, "no handler for event");
                continue;
            }
            let (row, barrier) = (event.row_digest(), changes_key(&event));
            let event = Arc::new(event);
            jobs.extend(routes.into_iter().map(|r| (r, Arc::clone(&event), row, barrier)));
        }
        if jobs.is_empty() {
            if let Some(outcome) = outcome(&completion, false) {
                let _ = self.outcomes.send(outcome);
            }
            return;
        }
        let done = Arc::new(Tally::new(jobs.len(), completion, self.outcomes.clone(), permit));
        let mut new_workers = Vec::new();
        {
            let mut lanes = self.lanes.lock().expect(POISONED);
            for (route, event, row, barrier) in jobs {
                let job = Job { event, done: Arc::clone(&done), row, barrier };
                if lanes.admit(route, job, self.registry.routes()[route].concurrency) {
                    new_workers.push(route);
                }
            }
        }
        for route in new_workers {
            self.spawn_worker(route);
        }
    }

    fn spawn_worker(self: &Arc<Self>, route: usize) {
        let router = Arc::clone(self);
        self.tracker.spawn(async move { router.work(route).await });
    }

    /// One of `route`'s workers: takes a ready lane, runs its events in order until it is
    /// empty, then the next ready lane; ends when none is ready.
    async fn work(self: &Arc<Self>, route_index: usize) {
        let route = &self.registry.routes()[route_index];
        let metrics = &self.metrics[route_index];
        let mut lane: Option<LaneKey> = None;
        loop {
            let mut spawn = 0;
            let job = {
                let mut lanes = self.lanes.lock().expect(POISONED);
                lanes.next(route_index, &mut lane, route.concurrency, &mut spawn)
            };
            // events a barrier held back, now on lanes of their own
            for _ in 0..spawn {
                self.spawn_worker(route_index);
            }
            let Some(job) = job else { return };
            let how =
                deliver(route, &job.event, &self.stop, &self.abort, self.lease.as_deref(), metrics, &self.outcomes)
                    .await;
            job.done.finish(how);
        }
    }

    /// Waits for the deliveries running and queued, at most `grace`; then drops the ones still
    /// running and hands every event left back (they stay pending in the ledger).
    pub(crate) async fn finish(&self, grace: std::time::Duration) {
        if tokio::time::timeout(grace, self.drained()).await.is_err() {
            tracing::warn!(grace = ?grace, "handlers still running after the grace period; handing their events back");
            self.abort.cancel();
            self.drained().await;
        }
    }

    /// Waits until every lane is empty (after `stop`, lanes hand their events back quickly).
    pub(crate) async fn drained(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}
