//! The listener: the LISTEN connection, reconnect with backoff, catch-up, live consumption.
//!
//! Every session does the same three steps in the same order — LISTEN, then catch up on every
//! unacknowledged ledger event, then consume notifications — because NOTIFY is lost whenever
//! nobody listens. The LISTEN connection is dedicated: never pooled, never in a transaction.
//! Ledger reads and acknowledgements use a second connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::capture::notify;
use crate::config::Config;
use crate::daemon::State;
use crate::db::Work;
use crate::db::{self, CHANNEL, DbError};
use crate::dispatch::claims::InFlight;
use crate::dispatch::outcome::{self, DeadLetter, Outcome};
use crate::dispatch::retry::Retries;
use crate::dispatch::router::Router;
use crate::dispatch::{Batch, Completion};
use crate::event::{Notice, SaveEvent, decode_notice};
use crate::install::CHUNK;
use crate::stats::Stats;

mod cursor;
mod doorbell;
mod listen;
pub(crate) mod query;
pub(crate) mod retention;

use cursor::{Cursor, Gaps};
use doorbell::Bell;
use listen::{AbortOnDrop, liveness, open_listener};
use query::{BadRow, LedgerRow, PageLimit};

/// The statements a session runs most, prepared on its work connection.
const HOT: [&str; 4] = [query::FETCH_NEW, query::FETCH_GAPS, query::FETCH_PENDING, outcome::WRITE_OUTCOMES];

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
    /// The retries operators requested.
    pub retries: Arc<Retries>,
    /// The dispatch lease, when several daemons share the database (`daemon.lease`).
    pub lease: Option<Arc<crate::lease::Lease>>,
    /// Notify-mode rows arriving in parts.
    pub parts: std::sync::Mutex<crate::capture::notify::parts::Joiner>,
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
                        && let Ok(work) = Work::new(ack_client, self.pg.pooled(), &HOT).await
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
        let work = Arc::new(Work::new(work, self.pg.pooled(), &HOT).await.map_err(DbError::Query)?);
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
        let floor = match query::last_id(&work.client).await {
            Ok(id) => Some(id),
            Err(error) => {
                tracing::warn!(%error, "cannot read the ledger's id sequence; events committed late at start-up wait for the sweep");
                None
            }
        };
        let mut cursor = Cursor::new(floor, using);
        if let Some(floor) = floor {
            let (absent, snapshot) =
                query::absent_ids(&work.client, floor, START_GAPS, CHUNK).await.map_err(DbError::Query)?;
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
                    let silence = query::set_doorbell(&work.client, false);
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
                let router = self.router.borrow().clone();
                self.retries.check(&work, &router).await.map_err(DbError::Query)?;
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
                    let (lost, joined) = self.parts.lock().expect(crate::dispatch::POISONED).push(part);
                    if let Some(reason) = lost {
                        self.skip_invalid(&reason, &payload);
                    }
                    match joined.and_then(|joined| match joined {
                        crate::capture::notify::parts::Joined::More => Ok(None),
                        crate::capture::notify::parts::Joined::Note(note) => decode_notice(&note, using).map(Some),
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
                let local = query::local_xids(&work.client).await.map_err(DbError::Query)?;
                cursor.gaps.settle(&local);
                cursor.settled_at = Instant::now();
            }
            let epoch = self.in_flight.epoch();
            let page = PageLimit::for_events(limit, cursor.per_row);
            let query::NewPage { rows, bad, more, snapshot } =
                query::fetch_new(work, cursor.after, page, &cursor.using).await.map_err(DbError::Query)?;
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
                query::fetch_gaps(work, &due[from..], page, &cursor.using).await.map_err(DbError::Query)?;
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
                query::fetch_pending(work, after, page, &cursor.using).await.map_err(DbError::Query)?;
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

    /// Claims the ledger rows of a fetch that started at `epoch` — at once, before any wait —
    /// and dispatches the newly claimed ones. Returns how many events were dispatched, or `None`
    /// when stopping (the claimed rows not dispatched are handed back).
    async fn admit(&self, epoch: u64, rows: Vec<LedgerRow>) -> Option<usize> {
        let (fresh, known) = self.in_flight.claim(epoch, rows, |r| (r.id, r.events.len()));
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
            self.router.borrow().dispatch(Batch { events: row.events, permit, completion: Completion::Ack(row.id) });
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
    async fn accept_notify_events(&self, work: &Work, events: Vec<SaveEvent>) -> Result<(), SessionError> {
        let Some(events) = notify::prepare(work, &self.config, &self.stats, events).await.map_err(DbError::Query)?
        else {
            return Ok(());
        };
        if let Some(permit) = self.permits(events.len()).await {
            self.router.borrow().dispatch(Batch { events, permit, completion: Completion::None });
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
