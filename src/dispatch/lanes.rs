//! The row lanes: the order in which one handler receives events.
//!
//! A lane is one handler × one row. Events of a lane run one after another, in ledger-id
//! order (for one row that is commit order: the row lock serialises its writers); lanes run in
//! parallel, bounded by each handler's concurrency and by the daemon's `max_in_flight` permits.
//!
//! A lane is keyed by the row's primary key as the event carries it, and an UPDATE that changes
//! the key carries the new one: its lane is not the lane of the row's earlier events. Such an
//! event is a barrier for its handler: it starts once every earlier event of the handler has
//! finished, and every later one waits until it has (see [`RouteLanes`]). Key changes are rare;
//! events of other updates never wait for anything but their own lane.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::router::Tally;
use crate::event::{Op, SaveEvent};

/// A route and the digest of a row's key ([`SaveEvent::row_digest`]). Two rows whose digests
/// collide share a lane: their events run one after another, each row's still in order.
pub(super) type LaneKey = (usize, u64);

type LaneMap = HashMap<LaneKey, VecDeque<Job>, foldhash::fast::RandomState>;

pub(super) struct Job {
    pub(super) event: Arc<SaveEvent>,
    pub(super) done: Arc<Tally>,
    /// The digest of the event's row: its lane.
    pub(super) row: u64,
    /// The event changes its row's primary key: a barrier.
    pub(super) barrier: bool,
}

/// The row lanes and the workers that run them. A lane is in `queues` while it has events or a
/// worker on it; a lane without a worker waits in its route's `ready` list. A route runs at most
/// `concurrency` workers, each on one lane at a time, so one row's events never run in
/// parallel, and a 100-row statement starts as many workers as the handler may use (not a task
/// per row).
pub(super) struct Lanes {
    queues: LaneMap,
    /// Per route, by route index.
    routes: Vec<RouteLanes>,
}

/// One route's lanes and workers.
///
/// A barrier (an event that changes its row's primary key) goes onto a lane only when the
/// route has no lane at all, that is when every earlier event of the route has finished; it
/// is then the route's only lane until it finishes. Meanwhile it and every later event wait in
/// `held`, in order, and move onto lanes when the last lane ends. So the row's events under its
/// old key run before it, and those under its new key after it.
#[derive(Default)]
struct RouteLanes {
    /// Rows of lanes waiting for a worker.
    ready: VecDeque<u64>,
    /// Workers running.
    workers: usize,
    /// Lanes of this route in `queues`.
    lanes: usize,
    /// Events waiting for a barrier to start or to finish; a barrier, if any, first.
    held: VecDeque<Job>,
    /// A barrier is on a lane.
    barrier_out: bool,
}

impl Lanes {
    pub(super) fn new(routes: usize) -> Self {
        Lanes { queues: LaneMap::default(), routes: std::iter::repeat_with(RouteLanes::default).take(routes).collect() }
    }

    /// Puts `job` of `route` on its lane, or holds it behind a barrier. True when the route
    /// wants one worker more (it runs fewer than `concurrency`).
    pub(super) fn admit(&mut self, route: usize, job: Job, concurrency: usize) -> bool {
        let r = &mut self.routes[route];
        if r.barrier_out || !r.held.is_empty() || (job.barrier && r.lanes > 0) {
            insert_in_order(&mut r.held, job);
            return false;
        }
        r.barrier_out = job.barrier;
        self.enqueue(route, job, concurrency)
    }

    /// Puts `job` of `route` on its lane; true when the route wants one worker more.
    fn enqueue(&mut self, route: usize, job: Job, concurrency: usize) -> bool {
        let key = (route, job.row);
        if let Some(queue) = self.queues.get_mut(&key) {
            insert_in_order(queue, job);
            return false;
        }
        self.queues.insert(key, VecDeque::from([job]));
        let r = &mut self.routes[route];
        r.lanes += 1;
        r.ready.push_back(key.1);
        if r.workers < concurrency {
            r.workers += 1;
            return true;
        }
        false
    }

    /// The next job of a worker of `route`, whose lane so far is `lane`: the lane's next event,
    /// else the first event of the next ready lane. `None` when no lane is ready: the worker
    /// ends (and is no longer counted). `spawn` grows by the workers that events released from
    /// `held` want.
    pub(super) fn next(
        &mut self,
        route: usize,
        lane: &mut Option<LaneKey>,
        concurrency: usize,
        spawn: &mut usize,
    ) -> Option<Job> {
        loop {
            if let Some(key) = lane.take() {
                if let Some(job) = self.queues.get_mut(&key).and_then(VecDeque::pop_front) {
                    *lane = Some(key);
                    return Some(job);
                }
                // the lane is empty: it ends here, and a new event for its row starts a new one
                self.queues.remove(&key);
                *spawn += self.lane_ended(route, concurrency);
            }
            match self.routes[route].ready.pop_front() {
                Some(row) => *lane = Some((route, row)),
                None => {
                    self.routes[route].workers -= 1;
                    return None;
                }
            }
        }
    }

    /// A lane of `route` ended. When it was the last, the held events move onto lanes, up to the
    /// next barrier; that barrier too if nothing is left running before it. Returns the workers
    /// to start.
    fn lane_ended(&mut self, route: usize, concurrency: usize) -> usize {
        let r = &mut self.routes[route];
        r.lanes -= 1;
        if r.lanes > 0 {
            return 0;
        }
        r.barrier_out = false;
        let mut spawn = 0;
        loop {
            let r = &mut self.routes[route];
            let barrier = match r.held.front() {
                Some(job) if job.barrier && r.lanes > 0 => break,
                Some(job) => job.barrier,
                None => break,
            };
            let Some(job) = r.held.pop_front() else { break };
            r.barrier_out = barrier;
            spawn += usize::from(self.enqueue(route, job, concurrency));
            if barrier {
                break;
            }
        }
        spawn
    }
}

/// Whether `event` is an UPDATE that changed its row's primary key (its `pk` holds the new one).
pub(super) fn changes_key(event: &SaveEvent) -> bool {
    event.op == Op::Update && event.update_fields.as_deref().is_some_and(|f| f.iter().any(|c| event.pk.contains_key(c)))
}

/// Keeps a lane (or the events held behind a barrier) in ledger-id order even when a lower id
/// arrives late (catch-up racing a live notification).
fn insert_in_order(queue: &mut VecDeque<Job>, job: Job) {
    let Some(id) = job.event.id else {
        queue.push_back(job);
        return;
    };
    let at = queue.iter().rposition(|j| j.event.id.is_none_or(|other| other <= id)).map_or(0, |p| p + 1);
    queue.insert(at, job);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Completion;
    use serde_json::Value;
    use tokio::sync::{Semaphore, mpsc};

    fn event(id: i64, op: &str, pk: i64, fields: &str) -> SaveEvent {
        serde_json::from_value(serde_json::json!({
            "id": id, "signal": "post_save", "sender": "public.t", "op": op, "created": op == "insert",
            "pk": {"id": pk}, "instance": {"id": pk}, "update_fields": serde_json::from_str::<Value>(fields).unwrap(),
            "raw": false, "using": "db", "txid": 1, "at": "x", "actor": {"role": "r", "pid": 1}
        }))
        .unwrap()
    }

    /// A job of ledger id `id` on lane `row`.
    fn job(id: i64, row: u64, barrier: bool) -> Job {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let done = Arc::new(Tally::new(1, Completion::None, mpsc::unbounded_channel().0, permit));
        Job { event: Arc::new(event(id, "insert", 1, "null")), done, row, barrier }
    }

    /// A worker of route 0: its lane, and the ids it has run.
    #[derive(Default)]
    struct Worker {
        lane: Option<LaneKey>,
        ran: Vec<i64>,
    }

    const CONCURRENCY: usize = 4;

    impl Worker {
        /// Finishes the worker's current job (if any) and takes the next; its id, or `None` when
        /// the worker ends. Returns the workers to start too.
        fn next(&mut self, lanes: &mut Lanes) -> (Option<i64>, usize) {
            let mut spawn = 0;
            let id = lanes.next(0, &mut self.lane, CONCURRENCY, &mut spawn).map(|j| j.event.id.unwrap());
            self.ran.extend(id);
            (id, spawn)
        }
    }

    #[test]
    fn events_without_a_key_change_go_straight_to_their_lanes() {
        let mut lanes = Lanes::new(1);
        assert!(lanes.admit(0, job(1, 10, false), CONCURRENCY));
        assert!(lanes.admit(0, job(2, 20, false), CONCURRENCY));
        // same row: same lane, no new worker
        assert!(!lanes.admit(0, job(3, 10, false), CONCURRENCY));
        assert!(lanes.routes[0].held.is_empty());
        assert_eq!((lanes.routes[0].lanes, lanes.routes[0].workers), (2, 2));
        let (mut a, mut b) = (Worker::default(), Worker::default());
        assert_eq!(a.next(&mut lanes).0, Some(1));
        assert_eq!(b.next(&mut lanes).0, Some(2));
        assert_eq!(a.next(&mut lanes).0, Some(3));
        assert_eq!(b.next(&mut lanes), (None, 0));
        assert_eq!(a.next(&mut lanes), (None, 0));
        assert_eq!((lanes.routes[0].lanes, lanes.routes[0].workers), (0, 0));
        assert!(lanes.queues.is_empty());
    }

    #[test]
    fn a_key_change_waits_for_earlier_events_and_later_ones_wait_for_it() {
        let mut lanes = Lanes::new(1);
        // row 1's insert (id 1) and another row (id 2) run; row 1 becomes row 2 (id 3, a
        // barrier); then row 2 changes (id 4) and another row is saved (id 5)
        assert!(lanes.admit(0, job(1, 1, false), CONCURRENCY));
        assert!(lanes.admit(0, job(2, 3, false), CONCURRENCY));
        let (mut a, mut b) = (Worker::default(), Worker::default());
        assert_eq!(a.next(&mut lanes).0, Some(1));
        assert_eq!(b.next(&mut lanes).0, Some(2));
        assert!(!lanes.admit(0, job(3, 2, true), CONCURRENCY));
        assert!(!lanes.admit(0, job(4, 2, false), CONCURRENCY));
        assert!(!lanes.admit(0, job(5, 5, false), CONCURRENCY));
        assert_eq!(lanes.routes[0].held.len(), 3);

        // one earlier event is still running: the barrier waits
        assert_eq!(a.next(&mut lanes), (None, 0));
        assert_eq!(lanes.routes[0].held.len(), 3);
        // the last one ends: the barrier starts, alone
        let (id, spawn) = b.next(&mut lanes);
        assert_eq!(id, Some(3));
        assert!(spawn <= 1, "{spawn}");
        assert_eq!(lanes.routes[0].held.len(), 2);
        assert!(lanes.routes[0].ready.is_empty());
        // a new event arriving meanwhile waits behind it as well, in order
        assert!(!lanes.admit(0, job(6, 7, false), CONCURRENCY));
        assert_eq!(lanes.routes[0].held.iter().map(|j| j.event.id.unwrap()).collect::<Vec<_>>(), [4, 5, 6]);

        // the barrier ends: everything held moves onto lanes and runs in parallel again
        let (id, spawn) = b.next(&mut lanes);
        assert_eq!(id, Some(4));
        assert!(lanes.routes[0].held.is_empty());
        assert!(!lanes.routes[0].barrier_out);
        assert_eq!(lanes.routes[0].ready.len(), 2);
        assert!(spawn >= 1, "released lanes want workers");
        let mut c = Worker::default();
        assert_eq!(c.next(&mut lanes).0, Some(5));
        assert_eq!(a.next(&mut lanes).0, Some(6));
        for w in [&mut a, &mut b, &mut c] {
            while w.next(&mut lanes).0.is_some() {}
        }
        assert_eq!(lanes.routes[0].lanes, 0);
        // the other workers started for released lanes find none left, and end
        assert!(lanes.routes[0].workers <= CONCURRENCY);
        while lanes.routes[0].workers > 0 {
            assert_eq!(Worker::default().next(&mut lanes), (None, 0));
        }
        assert!(lanes.queues.is_empty());
    }

    #[test]
    fn consecutive_key_changes_run_one_at_a_time() {
        let mut lanes = Lanes::new(1);
        // nothing runs: the first barrier starts at once
        assert!(lanes.admit(0, job(1, 2, true), CONCURRENCY));
        assert!(!lanes.admit(0, job(2, 3, true), CONCURRENCY));
        assert!(!lanes.admit(0, job(3, 9, false), CONCURRENCY));
        let mut a = Worker::default();
        assert_eq!(a.next(&mut lanes).0, Some(1));
        // the second barrier starts only after the first, and alone
        assert_eq!(a.next(&mut lanes).0, Some(2));
        assert_eq!(lanes.routes[0].held.len(), 1);
        assert_eq!(a.next(&mut lanes).0, Some(3));
        assert_eq!(a.next(&mut lanes), (None, 0));
        assert_eq!(a.ran, [1, 2, 3]);
    }

    #[test]
    fn a_late_lower_id_is_held_in_ledger_order() {
        let mut lanes = Lanes::new(1);
        assert!(lanes.admit(0, job(1, 1, false), CONCURRENCY));
        assert!(!lanes.admit(0, job(5, 2, true), CONCURRENCY));
        assert!(!lanes.admit(0, job(3, 4, false), CONCURRENCY));
        // id 3 came after the barrier (id 5) but precedes it: it runs before
        assert_eq!(lanes.routes[0].held.iter().map(|j| j.event.id.unwrap()).collect::<Vec<_>>(), [3, 5]);
        let mut a = Worker::default();
        assert_eq!(a.next(&mut lanes).0, Some(1));
        assert_eq!(a.next(&mut lanes).0, Some(3));
        assert_eq!(a.next(&mut lanes).0, Some(5));
        assert_eq!(a.next(&mut lanes), (None, 0));
    }

    #[test]
    fn barriers_are_per_handler() {
        let mut lanes = Lanes::new(2);
        assert!(lanes.admit(0, job(1, 1, false), CONCURRENCY));
        assert!(!lanes.admit(0, job(2, 2, true), CONCURRENCY));
        // route 1 has nothing running: its copy of the barrier starts at once
        assert!(lanes.admit(1, job(2, 2, true), CONCURRENCY));
        assert!(lanes.routes[1].held.is_empty());
    }

    #[test]
    fn only_an_update_of_a_key_column_changes_the_key() {
        assert!(changes_key(&event(1, "update", 2, r#"["id"]"#)));
        assert!(changes_key(&event(1, "update", 2, r#"["name", "id"]"#)));
        assert!(!changes_key(&event(1, "update", 2, r#"["name"]"#)));
        assert!(!changes_key(&event(1, "insert", 2, "null")));
    }
}
