//! The router: which handlers an event goes to, in per-row lanes.
//!
//! A lane is one handler × one row. Events of a lane run one after another, in ledger-id
//! order (for one row that is commit order: the row lock serialises its writers); lanes run in
//! parallel, bounded by each handler's concurrency and by the daemon's `max_in_flight` permits.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::{Delivered, Outcome, deliver, give_up};
use crate::event::SaveEvent;
use crate::expr::EventContext;
use crate::lease::Lease;
use crate::ledger::{self, RetryRequest, Work};
use crate::registry::Registry;
use crate::stats::{HandlerMetrics, Stats};
use crate::wal::SettleTo;

/// A route and the digest of a row's key ([`SaveEvent::row_digest`]). Two rows whose digests
/// collide share a lane: their events run one after another, each row's still in order.
type LaneKey = (usize, u64);

type LaneMap = HashMap<LaneKey, VecDeque<Job>, foldhash::fast::RandomState>;

struct Job {
    event: Arc<SaveEvent>,
    done: Arc<Completion>,
}

/// The row lanes and the workers that run them. A lane is in `queues` while it has events or a
/// worker on it; a lane without a worker waits in its route's `ready` list. A route runs at most
/// `concurrency` workers, each on one lane at a time, so one row's events never run in
/// parallel, and a 100-row statement starts as many workers as the handler may use (not a task
/// per row).
struct Lanes {
    queues: LaneMap,
    /// Per route: rows of lanes waiting for a worker.
    ready: Vec<VecDeque<u64>>,
    /// Per route: workers running.
    workers: Vec<usize>,
}

/// Tracks the deliveries of one ledger row's events (or of one notify-mode event); reports the
/// row's outcome when the last one ends.
struct Completion {
    remaining: AtomicUsize,
    handed_back: AtomicBool,
    report: Report,
    outcomes: mpsc::UnboundedSender<Outcome>,
    _permit: OwnedSemaphorePermit,
}

/// Whom a completion tells.
enum Report {
    /// A notify-mode event: nobody.
    Nothing,
    /// The ledger row of this id.
    Ledger(i64),
    /// The WAL reader, for the transaction ending at this position.
    Wal(SettleTo),
}

impl Report {
    fn outcome(&self, handed_back: bool) -> Option<Outcome> {
        match self {
            Report::Nothing => None,
            Report::Ledger(id) => Some(if handed_back { Outcome::HandedBack(*id) } else { Outcome::Done(*id) }),
            Report::Wal(to) => Some(Outcome::Wal(to.clone(), handed_back)),
        }
    }
}

impl Completion {
    fn finish(&self, how: Delivered) {
        if how == Delivered::HandedBack {
            self.handed_back.store(true, Ordering::Relaxed);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(outcome) = self.report.outcome(self.handed_back.load(Ordering::Relaxed))
        {
            let _ = self.outcomes.send(outcome);
        }
    }
}

/// Routes events to handler lanes.
pub(crate) struct Router {
    registry: Arc<Registry>,
    lanes: Mutex<Lanes>,
    tracker: TaskTracker,
    stop: CancellationToken,
    abort: CancellationToken,
    outcomes: mpsc::UnboundedSender<Outcome>,
    stats: Arc<Stats>,
    /// Each route's metric handles, by route index.
    metrics: Vec<HandlerMetrics>,
    lease: Option<Arc<Lease>>,
}

impl Router {
    pub(crate) fn new(
        registry: Arc<Registry>,
        outcomes: mpsc::UnboundedSender<Outcome>,
        stats: Arc<Stats>,
        stop: CancellationToken,
        abort: CancellationToken,
        lease: Option<Arc<Lease>>,
    ) -> Arc<Router> {
        let metrics = registry.routes().iter().map(|r| stats.handler_metrics(r.receiver.name())).collect();
        let routes = registry.routes().len();
        Arc::new(Router {
            registry,
            lanes: Mutex::new(Lanes {
                queues: LaneMap::default(),
                ready: vec![VecDeque::new(); routes],
                workers: vec![0; routes],
            }),
            tracker: TaskTracker::new(),
            stop,
            abort,
            outcomes,
            stats,
            metrics,
            lease,
        })
    }

    /// Queues each event on the lanes of every handler that accepts it. `ledger_id` names the
    /// ledger row the events came from (acknowledged when all of them are done); `permit` is
    /// held until then.
    pub(crate) fn dispatch(
        self: &Arc<Self>,
        ledger_id: Option<i64>,
        events: Vec<SaveEvent>,
        permit: OwnedSemaphorePermit,
    ) {
        self.dispatch_reporting(ledger_id.map_or(Report::Nothing, Report::Ledger), events, permit);
    }

    /// Queues the events of one WAL transaction; `to` hears when all of them are done.
    pub(crate) fn dispatch_wal(self: &Arc<Self>, to: SettleTo, events: Vec<SaveEvent>, permit: OwnedSemaphorePermit) {
        self.dispatch_reporting(Report::Wal(to), events, permit);
    }

    fn dispatch_reporting(self: &Arc<Self>, report: Report, events: Vec<SaveEvent>, permit: OwnedSemaphorePermit) {
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
            let event = Arc::new(event);
            jobs.extend(routes.into_iter().map(|r| (r, Arc::clone(&event))));
        }
        if jobs.is_empty() {
            if let Some(outcome) = report.outcome(false) {
                let _ = self.outcomes.send(outcome);
            }
            return;
        }
        let done = Arc::new(Completion {
            remaining: AtomicUsize::new(jobs.len()),
            handed_back: AtomicBool::new(false),
            report,
            outcomes: self.outcomes.clone(),
            _permit: permit,
        });
        let mut new_workers = Vec::new();
        {
            let Ok(mut lanes) = self.lanes.lock() else { return };
            for (route, event) in jobs {
                let key = (route, event.row_digest());
                let job = Job { event, done: Arc::clone(&done) };
                match lanes.queues.get_mut(&key) {
                    Some(queue) => insert_in_order(queue, job),
                    None => {
                        let (route, row) = key;
                        lanes.queues.insert((route, row), VecDeque::from([job]));
                        lanes.ready[route].push_back(row);
                        if lanes.workers[route] < self.registry.routes()[route].concurrency {
                            lanes.workers[route] += 1;
                            new_workers.push(route);
                        }
                    }
                }
            }
        }
        for route in new_workers {
            let router = Arc::clone(self);
            self.tracker.spawn(async move { router.work(route).await });
        }
    }

    /// One of `route`'s workers: takes a ready lane, runs its events in order until it is
    /// empty, then the next ready lane; ends when none is ready.
    async fn work(&self, route_index: usize) {
        let route = &self.registry.routes()[route_index];
        let metrics = &self.metrics[route_index];
        let mut lane: Option<LaneKey> = None;
        loop {
            let job = {
                let Ok(mut lanes) = self.lanes.lock() else { return };
                loop {
                    if let Some(key) = &lane {
                        if let Some(job) = lanes.queues.get_mut(key).and_then(VecDeque::pop_front) {
                            break job;
                        }
                        // the lane is empty: it ends here, and a new event for its row starts
                        // a new one
                        lanes.queues.remove(key);
                    }
                    match lanes.ready[route_index].pop_front() {
                        Some(row) => lane = Some((route_index, row)),
                        None => {
                            lanes.workers[route_index] -= 1;
                            return;
                        }
                    }
                }
            };
            let how =
                deliver(route, &job.event, &self.stop, &self.abort, self.lease.as_deref(), metrics, &self.outcomes)
                    .await;
            job.done.finish(how);
        }
    }

    /// Runs a dead letter's `event` through the handler named `handler` again, outside the
    /// row lanes (an operator's retry), then records the result on `work`. `settled` runs when
    /// it ends. False when no handler has that name.
    pub(crate) fn redeliver(
        self: &Arc<Self>,
        request: RetryRequest,
        event: SaveEvent,
        work: Arc<Work>,
        settled: impl FnOnce() + Send + 'static,
    ) -> bool {
        let Some(index) = self.registry.routes().iter().position(|r| r.receiver.name() == request.handler) else {
            return false;
        };
        let router = Arc::clone(self);
        self.tracker.spawn(async move {
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
                match ledger::retry_done(&work.client, request.id, failed).await {
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

    /// Waits until every lane is empty (after `stop`, lanes hand their events back quickly).
    pub(crate) async fn drained(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Keeps a lane in ledger-id order even when a lower id arrives late (catch-up racing a live
/// notification).
fn insert_in_order(queue: &mut VecDeque<Job>, job: Job) {
    let Some(id) = job.event.id else {
        queue.push_back(job);
        return;
    };
    let at = queue.iter().rposition(|j| j.event.id.is_none_or(|other| other <= id)).map_or(0, |p| p + 1);
    queue.insert(at, job);
}
