//! `capture = "wal"`: saves read from the write-ahead log instead of a trigger.
//!
//! A watched table with this capture has no trigger at all: the writer's transaction does no
//! more work than without post-save. `triggers install` puts the table in a publication
//! (see [`crate::install::publication`]: `REPLICA IDENTITY FULL` when UPDATE or DELETE is
//! captured, so the stream carries the row before the change) and creates the database's logical replication slot. The
//! daemon streams the slot with `pgoutput`, turns each committed change into a [`SaveEvent`],
//! dispatches a transaction's events in batches that fit the in-flight permits, and confirms a
//! transaction to the slot once every handler is done with all of its events (dead letters
//! written first). A transaction too big to hold waits for its commit in a temporary file
//! ([`spill`]), so memory stays bounded whatever its size. The slot keeps the WAL of
//! anything not yet confirmed, so a save made while the daemon is down, or one whose delivery
//! was cut short by a stop or a crash, is streamed again: at least once, as in durable mode.
//!
//! What the WAL does not carry: who made the save. `actor` has an empty role and pid 0, unless
//! the transaction names its actor with `pg_logical_emit_message(true, 'post_save.actor', …)`;
//! `at` is the commit time; the event `id` is the change's WAL position, unique and the same on
//! every redelivery. Tables are known by OID: a watched table renamed or moved while the daemon
//! runs keeps its watch (and its sender); its key columns are read again when renamed.
//! The SQL handler marks its writes for the chain-depth guard the same way,
//! with a `post_save.origin` message.

mod change;
mod confirm;
pub(crate) mod error;
pub(crate) mod health;
pub mod pgoutput;
mod relations;
mod retry;
pub(crate) mod slot;
mod spill;
mod start;
pub mod stream;
mod time;
mod types;
mod values;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Capture, Config};
use crate::dispatch::router::Router;
use crate::dispatch::{self, Completion, Notice, Settled, UNWATCHED};
use crate::event::{Actor, SaveEvent};
use crate::lease::Lease;
use crate::stats::Stats;
use change::{Batch, change_event};
use confirm::Confirmations;
pub use error::{Blocked, Blocker, WalError};
use pgoutput::Message;
use relations::{Catalog, Relations};
use spill::Spill;
use stream::{Copied, Replication, StreamError};
use time::pg_time;

/// The logical replication slot of the post-save install in database `dbname`: slots are
/// cluster-wide, so the name carries the database's (letters, digits and `_` only).
pub fn slot_name(dbname: &str) -> String {
    let mut name = String::from("post_save_");
    name.extend(dbname.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }));
    name.truncate(63);
    name
}

/// Whether any watched table is captured from the WAL.
pub fn wanted(config: &Config) -> bool {
    config.watches.iter().any(|w| w.capture == Capture::Wal)
}

/// The WAL reader of a running daemon.
pub(crate) struct WalCapture {
    pub(crate) pg: crate::db::Settings,
    pub(crate) config: Arc<Config>,
    /// Dropped when stopping: the router it holds must go for the outcome writer to finish.
    pub(crate) router: Option<watch::Receiver<Arc<Router>>>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) stop: CancellationToken,
    pub(crate) lease: Option<Arc<Lease>>,
    /// Where the reader says what blocks it (`STATUS=`, the metrics); `None` while it can stream.
    pub(crate) blocked: watch::Sender<Option<Blocked>>,
}

/// Most events a new transaction reserves room for, from the size of the last one.
const MAX_EVENTS_RESERVED: usize = 1024;
/// Past this many events, or bytes of their messages, the rest of an open transaction goes to
/// a temporary file (see [`spill`]).
const SPILL_EVENTS: usize = 16_384;
const SPILL_BYTES: usize = 16 << 20;
/// A batch of a transaction's events takes one in-flight permit per event, or per this many
/// bytes of their messages when that is more: wide rows hold fewer at once.
const BYTES_PER_PERMIT: usize = 2048;

/// The transaction being read.
#[derive(Default)]
struct Open {
    xid: u32,
    commit_time: i64,
    origin: Option<String>,
    actor: Option<String>,
    made: Batch,
    /// The rest of the transaction, once it holds too much.
    spill: Option<Spill>,
}

/// What a replication session knows between messages.
struct Session {
    /// The database's name (the events' `using`).
    using: String,
    relations: Relations,
    /// For what the stream does not say: a table's key, new types.
    catalog: Catalog,
    settle_tx: mpsc::UnboundedSender<Settled>,
    confirms: Confirmations,
    /// The transaction being read.
    open: Option<Open>,
    /// How many events the last transaction had.
    last_events: usize,
    /// The slot, and the position last written to its `post_save.wal_slot` row, and when.
    slot: String,
    recorded: (u64, tokio::time::Instant),
}

/// Why the stream stopped.
enum Ended {
    Stopping,
    Lost(String),
}

/// How often confirmations are sent while events settle.
const CONFIRM_EVERY: Duration = Duration::from_millis(50);
/// How often the server hears from a reader that waits for in-flight permits.
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// How often the slot's row hears how far it is confirmed (see [`slot`]): after a lost slot,
/// the saves to send again start at most this much earlier than they had to.
const RECORD_EVERY: Duration = Duration::from_secs(10);
/// How long a stopping reader waits for the server to end the stream after its last confirmation.
const FINISH_WITHIN: Duration = Duration::from_secs(5);

impl Session {
    /// Writes how far the slot is confirmed to its `post_save.wal_slot` row, when that moved.
    /// A failed write is only logged: the row is a hint for after a lost slot, and the next
    /// write catches up.
    async fn record(&mut self) {
        let confirmed = self.confirms.confirmed;
        self.recorded.1 = tokio::time::Instant::now();
        if confirmed == 0 || confirmed == self.recorded.0 {
            return;
        }
        let commit = self.confirms.confirmed_commit;
        let written = match self.catalog.client().await {
            Ok(client) => slot::remember(client, &self.slot, confirmed, commit).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => self.recorded.0 = confirmed,
            Err(e) => tracing::debug!(error = %e, "WAL capture: recording the slot's position failed"),
        }
    }
}

impl WalCapture {
    /// Streams until `stop`; reconnects with the daemon's backoff when the connection is
    /// lost, and checks quietly while something only an operator can fix blocks it.
    pub(crate) async fn run(mut self) {
        let mut reconnect = retry::Reconnect::new(&self.config.daemon, self.blocked.clone());
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            if self.lease.as_ref().is_some_and(|l| !l.held()) {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    () = self.stop.cancelled() => return,
                }
            }
            let wait = match self.session(&mut reconnect).await {
                Ok(Ended::Stopping) => return,
                Ok(Ended::Lost(why)) => reconnect.lost(&why),
                Err(e) => reconnect.failed(&e),
            };
            Stats::bump(&self.stats.reconnects);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    /// One replication session: from the slot's confirmed position until the stream ends.
    async fn session(&mut self, reconnect: &mut retry::Reconnect) -> Result<Ended, WalError> {
        let mut prepared = self.prepare().await?;
        let mut conn = self.start_streaming(&mut prepared).await?;
        reconnect.streaming();
        let start::Prepared { using, slot, tables, types, catalog, .. } = prepared;
        tracing::info!(slot = %slot, tables = tables.len(), "WAL capture streaming");
        let slot = slot.clone();
        let (settle_tx, mut settle_rx) = mpsc::unbounded_channel::<Settled>();
        let mut st = Session {
            using,
            relations: Relations { by_oid: HashMap::new(), tables, types },
            catalog,
            settle_tx,
            confirms: Confirmations::default(),
            open: None,
            last_events: 0,
            slot,
            recorded: (0, tokio::time::Instant::now()),
        };
        let mut tick = tokio::time::interval(CONFIRM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped = self.stop.clone().cancelled_owned();
        tokio::pin!(stopped);
        let ended = 'stream: loop {
            let first = tokio::select! {
                biased;
                () = &mut stopped => break Ended::Stopping,
                Some(s) = settle_rx.recv() => {
                    st.confirms.settle(s);
                    continue;
                }
                _ = tick.tick() => {
                    if st.confirms.dirty {
                        st.confirms.dirty = false;
                        if let Err(e) = conn.confirm(st.confirms.confirmed).await {
                            break Ended::Lost(e.to_string());
                        }
                    }
                    if st.recorded.1.elapsed() >= RECORD_EVERY {
                        st.record().await;
                    }
                    continue;
                }
                next = conn.next() => next,
            };
            // every message the same read brought, without going round the select for each
            let mut next = Some(first);
            while let Some(message) = next {
                if let Err(ended) = self.on_message(message, &mut st, &mut conn).await {
                    break 'stream ended;
                }
                next = conn.try_next();
            }
        };
        if matches!(ended, Ended::Stopping) {
            self.router = None;
            // Deliveries still running end within the grace period; their confirmations
            // arrive once the outcome writer has written their dead letters.
            drop(std::mem::replace(&mut st.settle_tx, mpsc::unbounded_channel().0));
            let grace = self.config.daemon.shutdown_grace + Duration::from_secs(6);
            let confirms = &mut st.confirms;
            let _ = tokio::time::timeout(grace, async {
                while let Some(s) = settle_rx.recv().await {
                    confirms.settle(s);
                }
            })
            .await;
            let confirmed = st.confirms.confirmed;
            let finished = tokio::time::timeout(FINISH_WITHIN, conn.finish(confirmed)).await.unwrap_or_else(|_| {
                Err(StreamError::Protocol(format!("the server did not end the stream within {FINISH_WITHIN:?}")))
            });
            if let Err(e) = finished {
                tracing::warn!(error = %e, "WAL capture: the last confirmation may not have reached the server; the next start may deliver its transactions again");
            }
            st.record().await;
            tracing::info!(confirmed = %stream::format_lsn(confirmed), "WAL capture stopped");
        }
        Ok(ended)
    }

    /// One message of the stream.
    async fn on_message(
        &self,
        next: Result<Copied, StreamError>,
        st: &mut Session,
        conn: &mut Replication,
    ) -> Result<(), Ended> {
        match next {
            Err(e) => return Err(Ended::Lost(e.to_string())),
            Ok(Copied::Keepalive { wal_end, reply }) => {
                let confirms = &mut st.confirms;
                if st.open.is_none() && confirms.queue.is_empty() && !confirms.stuck && wal_end > confirms.confirmed {
                    confirms.confirmed = wal_end;
                    confirms.dirty = true;
                }
                if reply {
                    confirms.dirty = false;
                    conn.confirm(confirms.confirmed).await.map_err(|e| Ended::Lost(e.to_string()))?;
                }
            }
            Ok(Copied::Data { start, payload }) => {
                if let Some(spill) = st.open.as_mut().and_then(|tx| tx.spill.as_mut())
                    && spilled(&payload)
                {
                    return spill.push(start, &payload).map_err(|e| {
                        Ended::Lost(format!("writing a big transaction to a temporary file (TMPDIR): {e}"))
                    });
                }
                let Some(message) = decode(&payload, start, &self.stats) else { return Ok(()) };
                match message {
                    Message::Begin { commit_time, xid } => {
                        // room for as many events as the last transaction had: growing a vector
                        // of events one doubling at a time moved each 100-row transaction's
                        // events about twice more
                        let events = Vec::with_capacity(st.last_events.min(MAX_EVENTS_RESERVED));
                        let made = Batch { events, ..Batch::default() };
                        st.open = Some(Open { xid, commit_time, made, ..Open::default() });
                    }
                    Message::Commit { end_lsn } => {
                        let Some(tx) = st.open.take() else { return Ok(()) };
                        st.last_events = tx.made.events.len();
                        self.commit(tx, end_lsn, st, conn).await?;
                    }
                    Message::Origin(name) => {
                        if let Some(tx) = st.open.as_mut() {
                            tx.origin.get_or_insert(name);
                        }
                    }
                    Message::Note { prefix, content } => {
                        if let Some(tx) = st.open.as_mut() {
                            let text = String::from_utf8_lossy(&content).into_owned();
                            match prefix.as_str() {
                                "post_save.actor" => tx.actor = Some(text),
                                "post_save.origin" => tx.origin = Some(text),
                                _ => {}
                            }
                        }
                    }
                    Message::Relation(rel) => st.relations.learn(rel, &mut st.catalog).await,
                    change => {
                        if let Some(tx) = st.open.as_mut()
                            && change_event(&st.relations, change, start, payload.len(), &mut tx.made, &self.stats)
                            && (tx.made.len() >= SPILL_EVENTS || tx.made.bytes >= SPILL_BYTES)
                        {
                            tx.spill = Some(Spill::new().map_err(|e| {
                                Ended::Lost(format!("making a temporary file for a big transaction (TMPDIR): {e}"))
                            })?);
                            tracing::info!(
                                xid = tx.xid,
                                events = tx.made.len(),
                                "WAL capture: a big transaction; the rest of it goes to a temporary file until it commits"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands a committed transaction's events to the router in batches that fit the in-flight
    /// permits, its spilled part read back as it goes. Each batch's confirmation comes back on
    /// `settle_tx`; the slot moves past the transaction once all have, and its reader has
    /// sent the last one.
    async fn commit(&self, mut tx: Open, end_lsn: u64, st: &mut Session, conn: &mut Replication) -> Result<(), Ended> {
        if tx.made.len() == 0 && tx.spill.is_none() {
            st.confirms.push(end_lsn, tx.commit_time, true);
            return Ok(());
        }
        st.confirms.push(end_lsn, tx.commit_time, false);
        let stamp = Stamp::new(&tx, &st.using);
        let max = self.config.daemon.max_in_flight.max(1);
        let per_event = tx.made.bytes / tx.made.len().max(1);
        let fits = max.min(max * BYTES_PER_PERMIT / per_event.max(1)).max(1);
        let Batch { events: mut rest, unwatched, .. } = std::mem::take(&mut tx.made);
        while rest.len() > fits {
            let tail = rest.split_off(fits);
            let batch = Batch { events: rest, unwatched: Vec::new(), bytes: fits * per_event };
            self.send(batch, &stamp, end_lsn, st, conn).await?;
            rest = tail;
        }
        let mut batch = Batch { bytes: rest.len() * per_event, events: rest, unwatched };
        if let Some(spill) = tx.spill.take() {
            tracing::info!(
                xid = tx.xid,
                messages = spill.len(),
                "WAL capture: delivering a big transaction from its temporary file"
            );
            self.replay(spill, &mut batch, &stamp, end_lsn, st, conn).await?;
        }
        if batch.len() > 0 {
            self.send(batch, &stamp, end_lsn, st, conn).await?;
        }
        st.confirms.settle(Settled { key: end_lsn, handed_back: false });
        Ok(())
    }

    /// Reads a spilled transaction back, sending its events a batch at a time.
    async fn replay(
        &self,
        spill: Spill,
        batch: &mut Batch,
        stamp: &Stamp,
        end_lsn: u64,
        st: &mut Session,
        conn: &mut Replication,
    ) -> Result<(), Ended> {
        let max = self.config.daemon.max_in_flight.max(1);
        let lost =
            |e: std::io::Error| Ended::Lost(format!("reading a big transaction back from its temporary file: {e}"));
        let mut replay = spill.replay().map_err(lost)?;
        let mut told = tokio::time::Instant::now();
        while let Some((lsn, payload)) = replay.next().map_err(lost)? {
            let len = payload.len();
            match decode(payload, lsn, &self.stats) {
                Some(Message::Relation(rel)) => st.relations.learn(rel, &mut st.catalog).await,
                Some(change) => {
                    change_event(&st.relations, change, lsn, len, batch, &self.stats);
                }
                None => {}
            }
            if batch.len() >= max || batch.bytes >= max * BYTES_PER_PERMIT {
                self.send(std::mem::take(batch), stamp, end_lsn, st, conn).await?;
            }
            if told.elapsed() >= STATUS_EVERY {
                // the server hears from a reader busy with one long transaction
                told = tokio::time::Instant::now();
                conn.confirm(st.confirms.confirmed).await.map_err(|e| Ended::Lost(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Hands one batch of a committed transaction to the router once the in-flight permits
    /// allow it.
    async fn send(
        &self,
        batch: Batch,
        stamp: &Stamp,
        end_lsn: u64,
        st: &mut Session,
        conn: &mut Replication,
    ) -> Result<(), Ended> {
        let max = self.config.daemon.max_in_flight.max(1);
        let weight = batch.len().max(batch.bytes.div_ceil(BYTES_PER_PERMIT)).clamp(1, max);
        let wanted = u32::try_from(weight).unwrap_or(u32::MAX);
        let permit = loop {
            tokio::select! {
                p = Arc::clone(&self.permits).acquire_many_owned(wanted) => break p.map_err(|_| Ended::Stopping)?,
                () = self.stop.cancelled() => return Err(Ended::Stopping),
                () = tokio::time::sleep(STATUS_EVERY) => {
                    conn.confirm(st.confirms.confirmed).await.map_err(|e: StreamError| Ended::Lost(e.to_string()))?;
                }
            }
        };
        let Batch { mut events, mut unwatched, .. } = batch;
        stamp.apply(&mut events);
        stamp.apply(&mut unwatched);
        let Some(router) = self.router.as_ref().map(|r| r.borrow().clone()) else { return Err(Ended::Stopping) };
        if !unwatched.is_empty() {
            // written before the batch's confirmation, which follows on the same queue
            router.keep_dead(UNWATCHED, unwatched, "its table is in a post-save publication but no watch names it");
        }
        st.confirms.hold(end_lsn);
        let notice = Notice { key: end_lsn, to: st.settle_tx.clone() };
        router.dispatch(dispatch::Batch { events, permit, completion: Completion::Notify(notice) });
        Ok(())
    }
}

/// What every event of a transaction shares, known at its commit.
struct Stamp {
    using: String,
    txid: i64,
    at: String,
    actor: Actor,
    origin: Option<String>,
}

impl Stamp {
    fn new(tx: &Open, using: &str) -> Stamp {
        Stamp {
            using: using.to_owned(),
            txid: i64::from(tx.xid),
            at: pg_time(tx.commit_time),
            actor: Actor {
                role: String::new(),
                application_name: None,
                client_addr: None,
                pid: 0,
                actor: tx.actor.clone(),
            },
            origin: tx.origin.clone(),
        }
    }

    fn apply(&self, events: &mut [SaveEvent]) {
        // in place: an event is 552 bytes, and moving each out and back cost more than this
        for e in events {
            e.using.clone_from(&self.using);
            e.txid = self.txid;
            e.at.clone_from(&self.at);
            e.actor = self.actor.clone();
            e.origin.clone_from(&self.origin);
        }
    }
}

/// Whether a message of a spilling transaction goes to its file: its changes and the relation
/// and type messages they depend on, in order. Its actor and origin are read at once.
fn spilled(payload: &[u8]) -> bool {
    matches!(payload.first(), Some(b'I' | b'U' | b'D' | b'R' | b'Y' | b'T'))
}

/// A message of the stream, or `None` (counted and logged) when it cannot be read.
fn decode(payload: &[u8], lsn: u64, stats: &Stats) -> Option<Message> {
    match pgoutput::decode(payload) {
        Ok(m) => Some(m),
        Err(e) => {
            Stats::bump(&stats.invalid);
            tracing::error!(error = %e, lsn = %stream::format_lsn(lsn), "WAL capture: skipped a message it cannot read");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_carry_the_database() {
        assert_eq!(slot_name("shop"), "post_save_shop");
        assert_eq!(slot_name("My-DB.1"), "post_save_my_db_1");
        assert!(slot_name(&"x".repeat(100)).len() <= 63);
    }
}
