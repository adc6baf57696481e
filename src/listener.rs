//! The listener: the LISTEN connection, reconnect with backoff, catch-up, live consumption.
//!
//! Every session does the same three steps in the same order — LISTEN, then catch up on every
//! unacknowledged ledger event, then consume notifications — because NOTIFY is lost whenever
//! nobody listens. The LISTEN connection is dedicated: never pooled, never in a transaction.
//! Ledger reads and acknowledgements use a second connection.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Mode};
use crate::daemon::State;
use crate::db::{self, CHANNEL, DbError};
use crate::delivery::{InFlight, Outcome};
use crate::event::{Notice, SaveEvent, decode_notice};
use crate::ledger::{self, BadRow, DeadLetter, LedgerRow, PageLimit, Work};
use crate::name::{TableName, quote_ident};
use crate::router::Router;
use crate::stats::Stats;
use crate::triggers::CHUNK;

mod cursor;

use cursor::{Cursor, Gaps};

/// Notifications buffered between the connection and the listener loop; when full, the
/// connection stops being read and the rest wait in PostgreSQL's queue.
const NOTICE_BUFFER: usize = 4096;

/// Most notifications handled as one batch.
const NOTICE_BATCH: usize = 1024;

/// At the start of a session, this many ledger ids up to the sequence's last value that no row
/// holds are remembered as gaps: a writer may have taken one just before the sequence was read
/// and commit after the catch-up has looked.
const START_GAPS: i64 = 1_000;

/// How often, at most, the transactions of this database are listed while gaps are remembered:
/// a gap that a transaction of another database keeps below the cluster's oldest running one is
/// dropped within about this much of its own transaction's end ([`Gaps::settle`]).
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// The doorbell: armed (durable captures NOTIFY) while the daemon waits idle; silenced while it
/// is busy, when it polls the ledger every `busy_poll` instead and most commits carry no NOTIFY.
/// Busy means: more than `daemon.doorbell_rate` events per second, or commits queueing for
/// NOTIFY's lock (with a slow disk that happens well below any fixed rate, and the queue itself
/// keeps the rate down). It is armed again below a quarter of the rate.
struct Bell {
    armed: bool,
    high: f64,
    window_start: Instant,
    window_events: usize,
}

/// The rate is measured over windows this long.
const RATE_WINDOW: Duration = Duration::from_millis(200);

/// Below this rate NOTIFY's lock is not worth looking at.
const LOCK_CHECK_RATE: f64 = 100.0;

/// This many writers queueing for NOTIFY's lock silence the doorbell.
const LOCK_WAITERS: i64 = 2;

impl Bell {
    fn new(config: &Config) -> Self {
        Bell { armed: false, high: config.daemon.doorbell_rate as f64, window_start: Instant::now(), window_events: 0 }
    }

    async fn arm(&mut self, work: &Work) -> Result<(), SessionError> {
        ledger::set_doorbell(&work.client, true).await.map_err(DbError::Query)?;
        self.armed = true;
        Ok(())
    }

    /// Counts `got` events; at the end of each window, decides whether to ring or poll.
    async fn observe(&mut self, work: &Work, got: usize) -> Result<(), SessionError> {
        self.window_events += got;
        let elapsed = self.window_start.elapsed();
        if elapsed < RATE_WINDOW {
            return Ok(());
        }
        let rate = self.window_events as f64 / elapsed.as_secs_f64();
        self.window_start = Instant::now();
        self.window_events = 0;
        if self.armed {
            let busy = rate > self.high
                || rate > LOCK_CHECK_RATE
                    && ledger::notify_lock_waiters(&work.client).await.map_err(DbError::Query)? >= LOCK_WAITERS;
            if busy {
                ledger::set_doorbell(&work.client, false).await.map_err(DbError::Query)?;
                self.armed = false;
                tracing::debug!(rate, "busy: polling the ledger; captures stop notifying");
            }
        } else if rate < self.high / 4.0 {
            self.arm(work).await?;
            tracing::debug!(rate, "idle: captures notify again");
        }
        Ok(())
    }
}

/// Everything a listening session needs.
pub(crate) struct Listener {
    pub pg: crate::db::Settings,
    pub config: Arc<Config>,
    /// The router new events go to; replaced when the handlers are reloaded.
    pub router: watch::Receiver<Arc<Router>>,
    pub in_flight: Arc<InFlight>,
    pub permits: Arc<Semaphore>,
    pub stats: Arc<Stats>,
    pub work_client: watch::Sender<Option<Arc<Work>>>,
    pub outcomes: mpsc::UnboundedSender<Outcome>,
    pub state: watch::Sender<State>,
    pub stop: CancellationToken,
    /// When the session last completed a round trip with the database.
    pub alive: watch::Sender<Instant>,
    /// Longest wait between two round trips while idle (the watchdog's proof of life).
    pub heartbeat: Duration,
    /// Dead letters whose requested retry is running.
    pub retrying: Arc<std::sync::Mutex<std::collections::HashSet<i64>>>,
    /// The dispatch lease, when several daemons share the database (`daemon.lease`).
    pub lease: Option<Arc<crate::lease::Lease>>,
    /// Notify-mode rows arriving in parts.
    pub parts: std::sync::Mutex<crate::parts::Joiner>,
}

/// How often the dead-letter list is checked for retries an operator requested.
const RETRY_CHECK: Duration = Duration::from_secs(1);

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the {0} connection closed")]
    Closed(&'static str),
}

impl Listener {
    /// Runs sessions until `stop`, reconnecting with exponential backoff and jitter.
    pub(crate) async fn run(&self) {
        let daemon = &self.config.daemon;
        let backoff = db::reconnect_backoff(daemon);
        let mut delays = backoff.build();
        let mut attempt = 0u32;
        loop {
            if let Some(lease) = &self.lease
                && !lease.held()
                && !self.standby(lease).await
            {
                return;
            }
            let result = self.session(&mut attempt).await;
            if self.stop.is_cancelled() {
                return;
            }
            if self.lease.as_ref().is_some_and(|l| !l.held()) {
                tracing::warn!("the lease ran out: dispatch stopped; standing by");
                continue;
            }
            let error = match result {
                Ok(()) => return,
                Err(e) => e,
            };
            if attempt == 0 {
                delays = backoff.build();
            }
            attempt += 1;
            Stats::bump(&self.stats.reconnects);
            let delay = delays.next().unwrap_or(daemon.reconnect_max);
            tracing::warn!(error = %error, attempt, retry_in = ?delay, "database connection lost; reconnecting");
            self.state.send_replace(State::Reconnecting { attempt });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    /// Waits as a standby until this daemon holds the lease; false when stopping first.
    async fn standby(&self, lease: &crate::lease::Lease) -> bool {
        let poll = (lease.length / 6).max(Duration::from_millis(50));
        let mut announced = false;
        loop {
            match db::connect(&self.pg).await {
                Ok((client, _task)) => loop {
                    // Acknowledgements of events this daemon handled before it lost the lease
                    // are written on this connection meanwhile (else they wait for the next
                    // session, and those events are delivered again).
                    let stale = self.work_client.borrow().as_ref().is_none_or(|w| w.client.is_closed());
                    if stale
                        && let Ok((ack_client, _ack_task)) = db::connect(&self.pg).await
                        && let Ok(work) = Work::new(ack_client, self.pg.pooled()).await
                    {
                        self.work_client.send_replace(Some(Arc::new(work)));
                    }
                    match lease.try_acquire(&client).await {
                        Ok(true) => {
                            tracing::info!(holder = %lease.holder, "lease acquired: dispatching");
                            return true;
                        }
                        Ok(false) => {
                            self.alive.send_replace(Instant::now());
                            if !announced {
                                let holder = crate::lease::Lease::current(&client).await.ok().flatten();
                                tracing::info!(holder = ?holder.map(|h| h.0), "standby: another instance holds the lease");
                                self.state.send_replace(State::Standby);
                                announced = true;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not take the lease; reconnecting");
                            break;
                        }
                    }
                    tokio::select! {
                        () = tokio::time::sleep(poll) => {}
                        () = self.stop.cancelled() => return false,
                    }
                },
                Err(e) => tracing::warn!(error = %e, "standby cannot reach the database"),
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                () = self.stop.cancelled() => return false,
            }
        }
    }

    async fn session(&self, attempt: &mut u32) -> Result<(), SessionError> {
        let ping_channel = format!("post_save_ping_{}", uuid::Uuid::new_v4().simple());
        let (_listen_client, mut notices, echoes, listen_task) =
            open_listener(self.pg.session(), &ping_channel).await?;
        let listen_task = AbortOnDrop(listen_task);
        let (work, work_task) = db::connect(&self.pg).await?;
        let work_abort = work_task.abort_handle();
        // Not aborted with the session: the ledger writer may still hold this connection to
        // flush the last acknowledgements.
        let mut work_task = work_task;
        let work = Arc::new(Work::new(work, self.pg.pooled()).await.map_err(DbError::Query)?);
        // From here on every query either answers or fails within the liveness interval: a
        // failed ping drops both connections, which fails whatever is waiting on them.
        let every = self.config.daemon.liveness;
        let listen_abort = listen_task.0.abort_handle();
        let watchdog =
            liveness(Arc::clone(&work), ping_channel, echoes, every, self.alive.clone(), Arc::clone(&self.stats));
        // The lease holder renews on the work connection; losing the lease drops the session.
        let _keeper = self.lease.as_ref().map(|lease| {
            let (lease, work) = (Arc::clone(lease), Arc::clone(&work));
            let (listen, worker) = (listen_task.0.abort_handle(), work_task.abort_handle());
            AbortOnDrop(tokio::spawn(async move {
                crate::lease::keep(lease, work).await;
                listen.abort();
                worker.abort();
            }))
        });
        let _liveness = AbortOnDrop(tokio::spawn(async move {
            let waited = watchdog.await;
            tracing::warn!(waited = ?waited, liveness = ?every, "no answer from the database within the liveness interval; reconnecting");
            listen_abort.abort();
            work_abort.abort();
        }));
        self.work_client.send_replace(Some(Arc::clone(&work)));
        // LISTEN is on; now everything unacknowledged, then live.
        let using: String =
            work.client.query_typed_one("SELECT current_database()::text", &[]).await.map_err(DbError::Query)?.get(0);
        let floor = match ledger::last_id(&work.client).await {
            Ok(id) => Some(id),
            Err(error) => {
                tracing::warn!(%error, "cannot read the ledger's id sequence; events committed late at start-up wait for the sweep");
                None
            }
        };
        let mut cursor = Cursor::new(floor, using);
        if let Some(floor) = floor {
            let (absent, snapshot) =
                ledger::absent_ids(&work.client, floor, START_GAPS, CHUNK).await.map_err(DbError::Query)?;
            if let Some(snapshot) = snapshot {
                cursor.remember(&absent, snapshot);
            }
        }
        let caught_up = self.drain(&work, &mut cursor).await?;
        if caught_up > 0 {
            tracing::info!(events = caught_up, "caught up on pending ledger events");
        }
        let mut bell = Bell::new(&self.config);
        bell.arm(&work).await?;
        self.drain(&work, &mut cursor).await?;
        *attempt = 0;
        let tables = self.config.watches.len();
        self.state.send_replace(State::Listening { tables });
        tracing::info!(tables, channel = CHANNEL, "listening");
        let sweep_every = self.config.daemon.sweep_interval.max(Duration::from_millis(10));
        let mut next_sweep = tokio::time::Instant::now() + sweep_every;
        let mut next_retry = tokio::time::Instant::now();
        loop {
            let poll = if bell.armed { self.config.daemon.idle_poll } else { self.config.daemon.busy_poll };
            let poll = poll.min(self.heartbeat);
            let woken = tokio::select! {
                biased;
                () = self.stop.cancelled() => {
                    // Nobody will listen: spare writers the NOTIFY until the next start.
                    let silence = ledger::set_doorbell(&work.client, false);
                    let _ = tokio::time::timeout(Duration::from_secs(1), silence).await;
                    return Ok(());
                }
                _ = &mut work_task => return Err(SessionError::Closed("work")),
                first = notices.recv() => {
                    let Some(first) = first else { return Err(SessionError::Closed("listen")) };
                    let mut batch = vec![first];
                    while batch.len() < NOTICE_BATCH {
                        match notices.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    let (wake, sweep) = self.handle_notices(&work, batch, &cursor.using).await?;
                    if sweep {
                        next_sweep = tokio::time::Instant::now();
                    }
                    wake || sweep
                }
                () = tokio::time::sleep(poll) => true,
            };
            if woken {
                let got = self.drain(&work, &mut cursor).await?;
                bell.observe(&work, got).await?;
            }
            if tokio::time::Instant::now() >= next_sweep {
                self.sweep(&work, &cursor).await?;
                next_sweep = tokio::time::Instant::now() + sweep_every;
            }
            if tokio::time::Instant::now() >= next_retry {
                self.retry_dead(&work).await?;
                next_retry = tokio::time::Instant::now() + RETRY_CHECK;
            }
        }
    }

    /// Handles a batch of notifications: (one asked to read the ledger, one asked for a sweep).
    async fn handle_notices(
        &self,
        work: &Work,
        payloads: Vec<String>,
        using: &str,
    ) -> Result<(bool, bool), SessionError> {
        let (mut wake, mut sweep) = (false, false);
        for payload in payloads {
            Stats::bump(&self.stats.notifications);
            match decode_notice(&payload, using) {
                Ok(Notice::Wake) => wake = true,
                Ok(Notice::Sweep) => sweep = true,
                Ok(Notice::Event(event)) => self.accept_notify_events(work, vec![*event]).await?,
                Ok(Notice::Events(events)) => self.accept_notify_events(work, events).await?,
                Ok(Notice::Part(part)) => {
                    let (lost, joined) = self.parts.lock().expect("the parts joiner is never poisoned").push(part);
                    if let Some(reason) = lost {
                        self.skip_invalid(&reason, &payload);
                    }
                    match joined.and_then(|joined| match joined {
                        crate::parts::Joined::More => Ok(None),
                        crate::parts::Joined::Note(note) => decode_notice(&note, using).map(Some),
                    }) {
                        Ok(Some(Notice::Events(events))) => self.accept_notify_events(work, events).await?,
                        Ok(_) => {}
                        Err(reason) => self.skip_invalid(&reason, &payload),
                    }
                }
                Err(reason) => self.skip_invalid(&reason, &payload),
            }
        }
        Ok((wake, sweep))
    }

    /// Counts and logs a notification that carries no event.
    fn skip_invalid(&self, reason: &crate::event::DecodeError, payload: &str) {
        Stats::bump(&self.stats.invalid);
        let total = self.stats.invalid.load(std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(%reason, payload = %excerpt(payload), invalid_total = total, "skipped a notification that is not an event");
    }

    /// Dispatches every ledger event past the cursor (and in its due gaps), page by page. Returns
    /// how many were dispatched.
    async fn drain(&self, work: &Work, cursor: &mut Cursor) -> Result<usize, SessionError> {
        let limit = i64::try_from(self.config.daemon.fetch_batch.max(1)).unwrap_or(1000);
        let mut total = 0;
        loop {
            if !cursor.gaps.is_empty() && cursor.settled_at.elapsed() >= SETTLE_EVERY {
                let local = ledger::local_xids(&work.client).await.map_err(DbError::Query)?;
                cursor.gaps.settle(&local);
                cursor.settled_at = Instant::now();
            }
            let epoch = self.in_flight.epoch();
            let page = PageLimit::for_events(limit, cursor.per_row);
            let ledger::NewPage { rows, bad, more, snapshot } =
                ledger::fetch_new(work, cursor.after, page, &cursor.using).await.map_err(DbError::Query)?;
            self.alive.send_replace(Instant::now());
            cursor.per_row = events_per_row(&rows).unwrap_or(cursor.per_row);
            let mut ids: Vec<i64> = bad.iter().map(|r| r.id).chain(rows.iter().map(|r| r.id)).collect();
            let evicted = cursor.gaps.evicted;
            let taken = cursor.take(&mut ids, snapshot);
            log_gaps(&taken.dropped, &cursor.gaps, evicted);
            // The gaps first (all behind the cursor, so below the page): a later event of the
            // same table row may be on this page, and it was saved after the transaction that
            // fills the gap ended.
            match self.fill_gaps(work, cursor).await? {
                Some(n) => total += n,
                None => return Ok(total),
            }
            self.reject_rows(bad);
            match self.admit(epoch, rows).await {
                Some(n) => total += n,
                None => return Ok(total),
            }
            if !more {
                return Ok(total);
            }
        }
    }

    /// Reads and dispatches the rows of the due gaps, all of them, page by page. Returns how
    /// many events were dispatched, or `None` when stopping.
    async fn fill_gaps(&self, work: &Work, cursor: &mut Cursor) -> Result<Option<usize>, SessionError> {
        let due = cursor.gaps.due();
        let limit = i64::try_from(self.config.daemon.fetch_batch.max(1)).unwrap_or(1000);
        let (mut from, mut found, mut total) = (0, Vec::new(), 0);
        while from < due.len() {
            let epoch = self.in_flight.epoch();
            let page = PageLimit::for_events(limit, cursor.per_row);
            let (rows, bad, more) =
                ledger::fetch_gaps(work, &due[from..], page, &cursor.using).await.map_err(DbError::Query)?;
            let ids: Vec<i64> = bad.iter().map(|r| r.id).chain(rows.iter().map(|r| r.id)).collect();
            let last = ids.iter().copied().max();
            found.extend(ids);
            self.reject_rows(bad);
            match self.admit(epoch, rows).await {
                Some(n) => total += n,
                None => return Ok(None),
            }
            match last {
                Some(last) if more => from = due.partition_point(|&id| id <= last),
                _ => break,
            }
        }
        cursor.gaps.looked_up(&found);
        Ok(Some(total))
    }

    /// Re-reads what the cursor has passed, for events whose gap was not remembered: more gaps
    /// than can be, a session that could not read the ledger's sequence, a row written by hand.
    async fn sweep(&self, work: &Work, cursor: &Cursor) -> Result<(), SessionError> {
        let limit = i64::try_from(self.config.daemon.fetch_batch.max(1)).unwrap_or(1000);
        let mut after = 0i64;
        let mut found = 0usize;
        let mut per_row = cursor.per_row;
        while after < cursor.after {
            let epoch = self.in_flight.epoch();
            let page = PageLimit::for_events(limit, per_row);
            let (rows, bad, last, more) =
                ledger::fetch_pending(work, after, page, &cursor.using).await.map_err(DbError::Query)?;
            per_row = events_per_row(&rows).unwrap_or(per_row);
            self.reject_rows(bad);
            let passed: Vec<LedgerRow> = rows.into_iter().filter(|r| r.id <= cursor.after).collect();
            match self.admit(epoch, passed).await {
                Some(n) => found += n,
                None => return Ok(()),
            }
            match last {
                Some(last) if more => after = last,
                _ => break,
            }
        }
        if found > 0 {
            tracing::info!(events = found, "sweep found events committed late");
        }
        Ok(())
    }

    /// Starts the retries operators requested (`post-save dead retry`) that are not running.
    async fn retry_dead(&self, work: &Arc<Work>) -> Result<(), SessionError> {
        let busy: Vec<i64> = self.retrying.lock().map(|b| b.iter().copied().collect()).unwrap_or_default();
        let requests = ledger::retry_requests(&work.client, &busy).await.map_err(DbError::Query)?;
        for request in requests {
            let id = request.id;
            let event = match serde_json::from_str::<SaveEvent>(&request.event) {
                Ok(event) => event,
                Err(e) => {
                    let error = format!("retry requested, but the stored event does not decode: {e}");
                    tracing::warn!(dead_letter = id, %error, "cannot retry a dead letter");
                    ledger::retry_done(&work.client, id, Some((0, &error))).await.map_err(DbError::Query)?;
                    continue;
                }
            };
            if request.handler == crate::wal::UNWATCHED {
                self.route_unwatched(work, id, &event).await?;
                continue;
            }
            if let Ok(mut busy) = self.retrying.lock() {
                busy.insert(id);
            }
            let retrying = Arc::clone(&self.retrying);
            let settled = move || {
                if let Ok(mut busy) = retrying.lock() {
                    busy.remove(&id);
                }
            };
            let handler = request.handler.clone();
            let router = self.router.borrow().clone();
            if !router.redeliver(request, event, Arc::clone(work), settled) {
                if let Ok(mut busy) = self.retrying.lock() {
                    busy.remove(&id);
                }
                let error = format!("retry requested, but no handler named {handler:?} is registered");
                tracing::warn!(dead_letter = id, %handler, "cannot retry a dead letter: no such handler");
                ledger::retry_done(&work.client, id, Some((0, &error))).await.map_err(DbError::Query)?;
            }
        }
        Ok(())
    }

    /// A save of a table no watch named, retried: one dead letter per handler that receives it
    /// now, each retried in turn; with none, it stays and says why.
    async fn route_unwatched(&self, work: &Arc<Work>, id: i64, event: &SaveEvent) -> Result<(), SessionError> {
        let handlers = self.router.borrow().receivers_of(event);
        if handlers.is_empty() {
            let error = format!(
                "no handler receives saves of {} yet: watch the table under this name and give its handlers this sender",
                event.sender
            );
            tracing::warn!(dead_letter = id, sender = %event.sender, "cannot retry a save of an unwatched table: no handler receives it");
            ledger::retry_done(&work.client, id, Some((0, &error))).await.map_err(DbError::Query)?;
        } else {
            tracing::info!(dead_letter = id, sender = %event.sender, ?handlers, "a save of an unwatched table goes to its handlers");
            ledger::fan_out(&work.client, id, &handlers).await.map_err(DbError::Query)?;
        }
        Ok(())
    }

    /// Claims the ledger rows of a fetch that started at `epoch` — at once, before any wait —
    /// and dispatches the newly claimed ones. Returns how many events were dispatched, or `None`
    /// when stopping (the claimed rows not dispatched are handed back).
    async fn admit(&self, epoch: u64, rows: Vec<LedgerRow>) -> Option<usize> {
        let (fresh, known) = self.in_flight.claim(epoch, rows);
        self.stats.duplicates.fetch_add(known as u64, std::sync::atomic::Ordering::Relaxed);
        let mut count = 0;
        let mut fresh = fresh.into_iter();
        while let Some(row) = fresh.next() {
            let Some(permit) = self.permits(row.events.len()).await else {
                for id in std::iter::once(row.id).chain(fresh.map(|r| r.id)) {
                    let _ = self.outcomes.send(Outcome::HandedBack(id));
                }
                return None;
            };
            count += row.events.len();
            self.router.borrow().dispatch(Some(row.id), row.events, permit);
        }
        Some(count)
    }

    /// `n` in-flight permits (at most all of them), or `None` when stopping.
    async fn permits(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n.clamp(1, self.config.daemon.max_in_flight.max(1))).unwrap_or(u32::MAX);
        let acquire = Arc::clone(&self.permits).acquire_many_owned(n);
        tokio::pin!(acquire);
        loop {
            // Waiting for handlers to make room is healthy: the listener is running, the
            // handlers are slow.
            tokio::select! {
                p = &mut acquire => return p.ok(),
                () = self.stop.cancelled() => return None,
                () = tokio::time::sleep(self.heartbeat) => {
                    self.alive.send_replace(Instant::now());
                }
            }
        }
    }

    /// Dispatches the events of one notification (all of one table).
    async fn accept_notify_events(&self, work: &Work, mut events: Vec<SaveEvent>) -> Result<(), SessionError> {
        let Some(first) = events.first() else { return Ok(()) };
        // by the sender's text, which is all a note says of its table (a name may hold dots and
        // quotes, so it is not parsed)
        let watch = self.config.watches.iter().find(|w| w.mode == Mode::Notify && w.table.is_sender(&first.sender));
        let Some(watch) = watch else {
            self.stats.unknown_sender.fetch_add(events.len() as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(sender = %first.sender, events = events.len(), "skipped a notification of a table not watched in notify mode");
            return Ok(());
        };
        for event in events.iter_mut().filter(|e| e.reread) {
            event.instance = reread(work, &watch.table, event).await.map_err(DbError::Query)?.into();
            if let serde_json::Value::Object(row) = &mut *event.instance {
                watch.redact.iter().for_each(|c| {
                    row.remove(c);
                });
            }
            crate::event::exact_numbers(&mut event.instance);
        }
        if let Some(permit) = self.permits(events.len()).await {
            self.router.borrow().dispatch(None, events, permit);
        }
        Ok(())
    }

    /// Ledger rows that do not decode (written by hand?) go to the dead-letter list, acknowledged.
    fn reject_rows(&self, rows: Vec<BadRow>) {
        for row in rows {
            Stats::bump(&self.stats.invalid);
            tracing::error!(id = row.id, reason = %row.error, "ledger row is not an event; moved to dead letters");
            let _ = self.outcomes.send(Outcome::Dead(DeadLetter {
                event_id: Some(row.id),
                handler: "(decode)".into(),
                sender: String::new(),
                event: "null".into(),
                attempts: 0,
                last_error: row.error.to_string(),
            }));
            let _ = self.outcomes.send(Outcome::Done(row.id));
        }
    }
}

/// Opens the dedicated LISTEN connection; its notifications arrive on the returned channel,
/// which closes when the connection does.
/// The LISTEN connection: notifications on the post_save channel go to the first receiver,
/// the echoes of this session's liveness pings (on its private `ping_channel`) to the second.
async fn open_listener(
    pg: &crate::db::Settings,
    ping_channel: &str,
) -> Result<(Client, mpsc::Receiver<String>, mpsc::Receiver<String>, tokio::task::JoinHandle<()>), DbError> {
    let (client, mut connection) = db::start_up(pg).await?;
    let (tx, rx) = mpsc::channel(NOTICE_BUFFER);
    let (echo_tx, echo_rx) = mpsc::channel(16);
    let pings = ping_channel.to_owned();
    let task = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == pings => {
                    // A full buffer means the liveness task is behind; dropping an echo only
                    // makes a ping look late, never a dead connection look alive.
                    let _ = echo_tx.try_send(n.payload().to_owned());
                }
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_owned()).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "listen connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    let listen = format!("LISTEN {}; LISTEN {}", quote_ident(CHANNEL), quote_ident(ping_channel));
    client.batch_execute(&listen).await.map_err(DbError::Query)?;
    Ok((client, rx, echo_rx, task))
}

/// Pings through both connections every half `every`: a NOTIFY on this session's private
/// channel, sent on the work connection, must come back on the LISTEN connection within half
/// `every`. So a connection cut anywhere (even a half-open TCP connection that never errors) is
/// found within `every`. Returns when a ping failed; the caller then drops both connections.
async fn liveness(
    work: Arc<Work>,
    channel: String,
    mut echoes: mpsc::Receiver<String>,
    every: Duration,
    alive: watch::Sender<Instant>,
    stats: Arc<Stats>,
) -> Duration {
    let half = (every / 2).max(Duration::from_millis(5));
    let mut ticks = tokio::time::interval(half);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut nonce = 0u64;
    loop {
        ticks.tick().await;
        nonce += 1;
        let expected = nonce.to_string();
        let sent = Instant::now();
        let deadline = tokio::time::Instant::now() + half;
        let echoed = tokio::time::timeout_at(deadline, async {
            let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
                [(&channel, Type::TEXT), (&expected, Type::TEXT)];
            work.client.query_typed_one("SELECT pg_notify($1, $2)", &params).await.ok()?;
            while let Some(echo) = echoes.recv().await {
                if echo == expected {
                    return Some(());
                }
            }
            None
        })
        .await;
        match echoed {
            Ok(Some(())) => {
                alive.send_replace(Instant::now());
            }
            _ => {
                Stats::bump(&stats.liveness_failures);
                return sent.elapsed();
            }
        }
    }
}

/// A task aborted when its handle is dropped: a session's connections and pings end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Re-reads a row too big for its notification, by primary key. `null` when it is gone.
async fn reread(work: &Work, table: &TableName, event: &SaveEvent) -> Result<serde_json::Value, tokio_postgres::Error> {
    if event.op == crate::event::Op::Delete {
        return Ok(serde_json::Value::Null);
    }
    let cols: Vec<String> = event.pk.keys().map(|k| quote_ident(k)).collect();
    let t = table.quoted();
    let sql = format!(
        "SELECT row_to_json(t)::text FROM {t} t WHERE ({tc}) = (SELECT {pc} FROM json_populate_record(NULL::{t}, $1::text::json) p)",
        tc = cols.iter().map(|c| format!("t.{c}")).collect::<Vec<_>>().join(", "),
        pc = cols.iter().map(|c| format!("p.{c}")).collect::<Vec<_>>().join(", "),
    );
    let pk = serde_json::Value::Object(event.pk.clone()).to_string();
    let row = work.client.query_typed_opt(&sql, &[(&pk, Type::TEXT)]).await?;
    Ok(row.and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok()).unwrap_or(serde_json::Value::Null))
}

/// Logs the gaps a fetch dropped, and gaps given up on for want of room (`evicted` is the count
/// before the fetch): a warning the first time in a session, which is when it starts to matter.
fn log_gaps(dropped: &[i64], gaps: &Gaps, evicted: u64) {
    if let (Some(lowest), Some(highest)) = (dropped.first(), dropped.last()) {
        tracing::debug!(
            gaps = dropped.len(),
            lowest,
            highest,
            remembered = gaps.len(),
            "dropped ledger gaps that no open transaction can fill"
        );
    }
    if gaps.evicted > evicted {
        let given_up = gaps.evicted - evicted;
        if evicted == 0 {
            tracing::warn!(
                given_up,
                remembered = gaps.len(),
                "too many ledger gaps to remember; the oldest are left to the sweep"
            );
        } else {
            tracing::debug!(given_up, remembered = gaps.len(), "ledger gaps left to the sweep");
        }
    }
}

/// Events per ledger row on a page (rounded down, at least 1); `None` for an empty page.
fn events_per_row(rows: &[LedgerRow]) -> Option<i64> {
    let events: usize = rows.iter().map(|r| r.events.len()).sum();
    (!rows.is_empty()).then(|| i64::try_from(events / rows.len()).unwrap_or(i64::MAX).max(1))
}

fn excerpt(payload: &str) -> &str {
    let mut end = payload.len().min(200);
    while !payload.is_char_boundary(end) {
        end -= 1;
    }
    &payload[..end]
}
