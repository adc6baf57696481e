//! `capture = "wal"`: saves read from the write-ahead log instead of a trigger.
//!
//! A watched table with this capture has no trigger at all: the writer's transaction does no
//! more work than without post-save. `triggers install` puts the table in the `post_save`
//! publication (with `REPLICA IDENTITY FULL` when UPDATE or DELETE is captured, so the stream
//! carries the row before the change) and creates the database's logical replication slot. The
//! daemon streams the slot with `pgoutput`, turns each committed change into a [`SaveEvent`],
//! dispatches a transaction's events together, and confirms a transaction to the slot once every
//! handler is done with its events (dead letters written first). The slot keeps the WAL of
//! anything not yet confirmed, so a save made while the daemon is down, or one whose delivery
//! was cut short by a stop or a crash, is streamed again: at least once, as in durable mode.
//!
//! What the WAL does not carry: who made the save. `actor` has an empty role and pid 0, unless
//! the transaction names its actor with `pg_logical_emit_message(true, 'post_save.actor', …)`;
//! `at` is the commit time; the event `id` is the change's WAL position, unique and the same on
//! every redelivery. The SQL handler marks its writes for the chain-depth guard the same way,
//! with a `post_save.origin` message.

mod confirm;
pub mod pgoutput;
pub mod stream;
mod time;
mod types;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Capture, Config, Watch};
use crate::event::{Actor, Op, RowImage, SaveEvent};
use crate::lease::Lease;
use crate::name::TableName;
use crate::router::Router;
use crate::stats::Stats;
use confirm::Confirmations;
use pgoutput::{Datum, Message, Relation};
use stream::{Copied, Replication, StreamError};
use time::pg_time;
use types::UserTypes;

/// The publication that lists the tables captured from the WAL.
pub const PUBLICATION: &str = "post_save";

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

/// A transaction confirmed by every handler (or handed back by a stopping daemon).
#[derive(Debug)]
pub(crate) struct Settled {
    pub(crate) end_lsn: u64,
    pub(crate) handed_back: bool,
}

/// Where a WAL transaction's outcome goes once its deliveries end.
#[derive(Debug, Clone)]
pub(crate) struct SettleTo {
    pub(crate) end_lsn: u64,
    pub(crate) to: mpsc::UnboundedSender<Settled>,
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
}

/// A watched table as the stream names it.
struct Table {
    watch: Watch,
    sender: String,
    pk: Vec<String>,
}

/// What is known of the stream's tables: the relation messages, by OID.
struct Relations {
    by_oid: HashMap<u32, Described>,
    tables: Vec<Table>,
    types: UserTypes,
}

/// A table as its last relation message describes it.
struct Described {
    rel: Arc<Relation>,
    /// Its index in `Relations::tables` when it is watched, and where each key column is in
    /// its rows (`None`: the stream does not have that column).
    watched: Option<(usize, Vec<Option<usize>>)>,
}

impl Relations {
    fn learn(&mut self, mut rel: Relation) {
        let name = TableName::new(rel.schema.clone(), rel.name.clone());
        for column in &mut rel.columns {
            column.type_oid = self.types.base(column.type_oid);
        }
        let watched = self.tables.iter().position(|t| t.watch.table == name).map(|i| {
            let at = self.tables[i].pk.iter().map(|key| rel.columns.iter().position(|c| &c.name == key)).collect();
            (i, at)
        });
        self.by_oid.insert(rel.id, Described { rel: Arc::new(rel), watched });
    }
}

/// Most events a new transaction reserves room for, from the size of the last one.
const MAX_EVENTS_RESERVED: usize = 1024;

/// The transaction being read.
#[derive(Default)]
struct Open {
    xid: u32,
    commit_time: i64,
    origin: Option<String>,
    actor: Option<String>,
    events: Vec<SaveEvent>,
}

/// What a replication session knows between messages.
struct Session {
    /// The database's name (the events' `using`).
    using: String,
    relations: Relations,
    settle_tx: mpsc::UnboundedSender<Settled>,
    confirms: Confirmations,
    /// The transaction being read.
    open: Option<Open>,
    /// How many events the last transaction had.
    last_events: usize,
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

impl WalCapture {
    /// Streams until `stop`; reconnects with backoff when the connection is lost.
    pub(crate) async fn run(mut self) {
        let mut attempt = 0u32;
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
            match self.session().await {
                Ok(Ended::Stopping) => return,
                Ok(Ended::Lost(why)) | Err(why) => {
                    attempt = attempt.saturating_add(1);
                    Stats::bump(&self.stats.reconnects);
                    let wait = Duration::from_millis(200 * 2u64.pow(attempt.min(5)));
                    tracing::warn!(error = %why, retry_in = ?wait, "WAL capture: stream lost; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One replication session: from the slot's confirmed position until the stream ends.
    async fn session(&mut self) -> Result<Ended, String> {
        let (client, task) = crate::db::connect(&self.pg).await.map_err(|e| e.to_string())?;
        let using: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .map_err(|e| format!("reading the database name: {e}"))?
            .get(0);
        let slot = slot_name(&using);
        ensure_slot(&client, &slot).await.map_err(|e| e.to_string())?;
        let mut tables = Vec::new();
        for watch in self.config.watches.iter().filter(|w| w.capture == Capture::Wal) {
            let shape = crate::triggers::table_shape(&client, watch).await.map_err(|e| e.to_string())?;
            tables.push(Table { watch: watch.clone(), sender: watch.table.to_string(), pk: shape.pk });
        }
        let types = UserTypes::load(&client).await.map_err(|e| format!("reading the database's types: {e}"))?;
        drop(client);
        task.abort();

        let mut conn = Replication::connect(&self.pg).await.map_err(|e| e.to_string())?;
        match conn.start(&slot, PUBLICATION, 0, self.config.daemon.wal_read_pause).await {
            Ok(()) => {}
            Err(e) if e.code() == Some("55006") => return Err(format!("{e} (another daemon streams it)")),
            Err(e) => return Err(e.to_string()),
        }
        tracing::info!(slot = %slot, tables = tables.len(), "WAL capture streaming");
        let (settle_tx, mut settle_rx) = mpsc::unbounded_channel::<Settled>();
        let mut st = Session {
            using,
            relations: Relations { by_oid: HashMap::new(), tables, types },
            settle_tx,
            confirms: Confirmations::default(),
            open: None,
            last_events: 0,
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
        let Session { mut confirms, settle_tx, .. } = st;
        if matches!(ended, Ended::Stopping) {
            self.router = None;
            // Deliveries still running end within the grace period; their confirmations
            // arrive once the outcome writer has written their dead letters.
            drop(settle_tx);
            let grace = self.config.daemon.shutdown_grace + Duration::from_secs(6);
            let _ = tokio::time::timeout(grace, async {
                while let Some(s) = settle_rx.recv().await {
                    confirms.settle(s);
                }
            })
            .await;
            if confirms.dirty {
                let _ = conn.confirm(confirms.confirmed).await;
            }
            tracing::info!(confirmed = %stream::format_lsn(confirms.confirmed), "WAL capture stopped");
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
                let message = match pgoutput::decode(&payload) {
                    Ok(m) => m,
                    Err(e) => {
                        Stats::bump(&self.stats.invalid);
                        tracing::error!(error = %e, lsn = %stream::format_lsn(start), "WAL capture: skipped a message it cannot read");
                        return Ok(());
                    }
                };
                match message {
                    Message::Begin { commit_time, xid } => {
                        // room for as many events as the last transaction had: growing a vector
                        // of events one doubling at a time moved each 100-row transaction's
                        // events about twice more
                        let events = Vec::with_capacity(st.last_events.min(MAX_EVENTS_RESERVED));
                        st.open = Some(Open { xid, commit_time, events, ..Open::default() });
                    }
                    Message::Commit { end_lsn } => {
                        let Some(tx) = st.open.take() else { return Ok(()) };
                        st.last_events = tx.events.len();
                        self.dispatch(tx, end_lsn, st, conn).await?;
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
                    Message::Relation(rel) => {
                        if st.relations.types.unknown_in(&rel) {
                            // a type made since the stream started (new DDL): read them again
                            match self.read_types().await {
                                Ok(types) => st.relations.types = types,
                                Err(e) => {
                                    tracing::warn!(error = %e, table = %rel.name, "WAL capture: could not read the database's types; values of new types arrive as text")
                                }
                            }
                        }
                        st.relations.learn(rel);
                    }
                    change => {
                        if let Some(tx) = st.open.as_mut() {
                            change_event(&st.relations, change, start, tx, &self.stats);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn read_types(&self) -> Result<UserTypes, String> {
        let (client, task) = crate::db::connect(&self.pg).await.map_err(|e| e.to_string())?;
        let types = UserTypes::load(&client).await.map_err(|e| e.to_string());
        drop(client);
        task.abort();
        types
    }

    /// Hands a committed transaction's events to the router; its confirmation comes back on
    /// `settle_tx` when they are all done.
    async fn dispatch(&self, tx: Open, end_lsn: u64, st: &mut Session, conn: &mut Replication) -> Result<(), Ended> {
        let confirms = &mut st.confirms;
        if tx.events.is_empty() {
            confirms.push(end_lsn, true);
            return Ok(());
        }
        let n = u32::try_from(tx.events.len()).unwrap_or(u32::MAX);
        let wanted = n.min(u32::try_from(self.config.daemon.max_in_flight.max(1)).unwrap_or(u32::MAX));
        let permit = loop {
            tokio::select! {
                p = Arc::clone(&self.permits).acquire_many_owned(wanted) => break p.map_err(|_| Ended::Stopping)?,
                () = self.stop.cancelled() => return Err(Ended::Stopping),
                () = tokio::time::sleep(STATUS_EVERY) => {
                    conn.confirm(confirms.confirmed).await.map_err(|e: StreamError| Ended::Lost(e.to_string()))?;
                }
            }
        };
        let at = pg_time(tx.commit_time);
        let actor = Actor { role: String::new(), application_name: None, client_addr: None, pid: 0, actor: tx.actor };
        // in place: an event is 552 bytes, and moving each out and back cost more than this
        let mut events = tx.events;
        for e in &mut events {
            e.using.clone_from(&st.using);
            e.txid = i64::from(tx.xid);
            e.at.clone_from(&at);
            e.actor = actor.clone();
            e.origin.clone_from(&tx.origin);
        }
        confirms.push(end_lsn, false);
        let Some(router) = self.router.as_ref().map(|r| r.borrow().clone()) else { return Err(Ended::Stopping) };
        router.dispatch_wal(SettleTo { end_lsn, to: st.settle_tx.clone() }, events, permit);
        Ok(())
    }
}

/// Creates the logical replication slot when it is missing.
pub async fn ensure_slot(client: &tokio_postgres::Client, slot: &str) -> Result<bool, tokio_postgres::Error> {
    let exists = client.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?.is_some();
    if !exists {
        client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await?;
        tracing::info!(slot = %slot, "logical replication slot created");
    }
    Ok(!exists)
}

/// Adds the event of one change to the open transaction, when its table is watched for it.
fn change_event(relations: &Relations, change: Message, lsn: u64, tx: &mut Open, stats: &Stats) {
    let (rel_id, op) = match &change {
        Message::Insert { rel, .. } => (*rel, Op::Insert),
        Message::Update { rel, .. } => (*rel, Op::Update),
        Message::Delete { rel, .. } => (*rel, Op::Delete),
        _ => return,
    };
    let Some(Described { rel, watched: Some((table, key_at)) }) = relations.by_oid.get(&rel_id) else {
        if !relations.by_oid.contains_key(&rel_id) {
            Stats::bump(&stats.invalid);
            tracing::error!(relation = rel_id, "WAL capture: a change of a table the stream never described; skipped");
        }
        return;
    };
    let table = &relations.tables[*table];
    let watch = &table.watch;
    let ops = watch.operations;
    let (new, old, update_fields) = match change {
        Message::Insert { new, .. } if ops.insert => (new, None, None),
        Message::Update { old, mut new, .. } if ops.update => {
            let changed = old.as_deref().map(|old| changed_columns(rel, old, &new));
            if let Some(changed) = &changed {
                let watched = watch.columns.is_empty() || changed.iter().any(|c| watch.columns.contains(c));
                if changed.is_empty() || !watched {
                    return;
                }
            }
            if let Some(old) = old.as_deref() {
                pgoutput::fill_unchanged(&mut new, old);
            }
            (new, old.filter(|_| watch.include_old), changed)
        }
        Message::Delete { old, .. } if ops.delete => (old, None, None),
        _ => return,
    };
    let mut pk = Map::with_capacity(table.pk.len());
    for (key, at) in table.pk.iter().zip(key_at) {
        let value = at.and_then(|i| match new.get(i) {
            Some(Datum::Text(text)) => Some(pgoutput::to_json(rel.columns[i].type_oid, text)),
            Some(Datum::Null) => Some(Value::Null),
            Some(Datum::Unchanged) | None => None,
        });
        let Some(value) = value else {
            Stats::bump(&stats.invalid);
            tracing::error!(sender = %table.sender, column = %key, "WAL capture: a change without its primary key; skipped");
            return;
        };
        pk.insert(key.clone(), value);
    }
    pk.values_mut().for_each(crate::event::exact_numbers);
    // The row images are built into JSON when something reads them: a handler that only needs
    // the key, or a filter on other fields, never pays for it.
    let image = |tuple: Vec<Datum>| {
        let rel = Arc::clone(rel);
        RowImage::lazy(move || Value::Object(pgoutput::row_json(&rel, &tuple)))
    };
    let instance = image(new);
    let old = old.map(image).unwrap_or_default();
    tx.events.push(SaveEvent {
        id: i64::try_from(lsn).ok(),
        signal: if op == Op::Delete { crate::config::Signal::PostDelete } else { crate::config::Signal::PostSave },
        sender: table.sender.clone(),
        op,
        created: op == Op::Insert,
        pk,
        instance,
        old,
        update_fields,
        raw: false,
        using: String::new(),
        txid: 0,
        at: String::new(),
        actor: Actor { role: String::new(), application_name: None, client_addr: None, pid: 0, actor: None },
        origin: None,
        reread: false,
    });
}

/// The columns whose values differ between the old and the new row (an unchanged out-of-line
/// value is not a change).
fn changed_columns(rel: &Relation, old: &[Datum], new: &[Datum]) -> Vec<String> {
    rel.columns
        .iter()
        .enumerate()
        .filter(|(i, _)| match (old.get(*i), new.get(*i)) {
            (_, Some(Datum::Unchanged)) | (None, _) => false,
            (Some(a), Some(b)) => a != b,
            (Some(_), None) => false,
        })
        .map(|(_, c)| c.name.clone())
        .collect()
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
