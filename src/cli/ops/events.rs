//! `post-save events list|show|tail`: the ledger, one event at a time, with what became of
//! each (acknowledged, or which handlers gave up on it and why).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio_postgres::Client;

use crate::SaveEvent;
use crate::event::{Op, decode_ledger_row};

use crate::cli::{Global, load_config, pg_config};

/// `events …`.
#[derive(Debug, clap::Subcommand)]
pub enum EventsCommand {
    /// The most recent events, newest last
    List {
        #[command(flatten)]
        filter: EventFilter,
        /// JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// One event, whole, with its delivery state
    Show {
        /// The event id
        id: i64,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// The most recent events as JSON Lines; with --follow, then every new one as it commits
    Tail {
        #[command(flatten)]
        filter: EventFilter,
        /// Keep printing new events until interrupted
        #[arg(long, short)]
        follow: bool,
    },
}

/// Which events.
#[derive(Debug, Clone, clap::Args)]
pub struct EventFilter {
    /// Only this sender (schema.table)
    #[arg(long)]
    pub sender: Option<String>,
    /// Only events not acknowledged yet
    #[arg(long)]
    pub pending: bool,
    /// How many events at most
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

/// A handler that gave up on an event.
#[derive(Debug, Clone, Serialize)]
struct Dead {
    handler: String,
    attempts: i32,
    last_error: String,
}

/// An event and what became of it.
#[derive(Debug, Serialize)]
struct Entry {
    event: SaveEvent,
    /// When every handler had finished with it (`null`: still pending).
    handled_at: Option<String>,
    dead: Vec<Dead>,
}

/// How far back a follower looks again for ids that committed after higher ones.
const LATE_COMMIT: Duration = Duration::from_secs(10);
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// `post-save events …`.
pub async fn events(global: &Global, command: &EventsCommand) -> Result<u8> {
    let config = load_config(global)?;
    let pg = pg_config(global, &config)?;
    let (client, _task) = crate::db::connect(pg.session()).await?;
    match command {
        EventsCommand::List { filter, json } => {
            let entries = recent(&client, filter, None).await?;
            print_list(&entries, *json)?;
            Ok(0)
        }
        EventsCommand::Show { id, json } => show(&client, *id, *json).await,
        EventsCommand::Tail { filter, follow } => tail(&client, filter, *follow).await,
    }
}

const COLUMNS: &str = "id, sender, op, head::text, rows::text, \
     to_char(handled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), current_database()::text";

/// The newest `filter.limit` events (ids above `after` only, when given), oldest first.
async fn recent(client: &Client, filter: &EventFilter, after: Option<i64>) -> Result<Vec<Entry>> {
    let limit = i64::try_from(filter.limit.max(1)).unwrap_or(i64::MAX);
    let sql = format!(
        "SELECT {COLUMNS} FROM post_save.event \
          WHERE ($1::text IS NULL OR sender = $1) AND (NOT $2 OR handled_at IS NULL) AND ($3::bigint IS NULL OR id > $3) \
          ORDER BY id DESC LIMIT $4"
    );
    let rows = client
        .query(&sql, &[&filter.sender, &filter.pending, &after, &limit])
        .await
        .context("reading post_save.event")?;
    let mut entries = decode(&rows)?;
    let skip = entries.len().saturating_sub(filter.limit.max(1));
    entries.drain(..skip);
    attach_dead(client, &mut entries).await?;
    Ok(entries)
}

/// Ledger rows (newest first) into their events, oldest first.
fn decode(rows: &[tokio_postgres::Row]) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for row in rows.iter().rev() {
        let id: i64 = row.get(0);
        let events = decode_ledger_row(id, row.get(1), row.get(2), row.get(3), row.get(4), row.get(6))
            .with_context(|| format!("ledger row {id} does not decode"))?;
        let handled_at: Option<String> = row.get(5);
        entries.extend(events.into_iter().map(|event| Entry {
            event,
            handled_at: handled_at.clone(),
            dead: Vec::new(),
        }));
    }
    Ok(entries)
}

async fn attach_dead(client: &Client, entries: &mut [Entry]) -> Result<()> {
    let ids: Vec<i64> = entries.iter().filter_map(|e| e.event.id).collect();
    let rows = client
        .query(
            "SELECT event_id, handler, attempts, last_error FROM post_save.dead_letter WHERE event_id = ANY($1) ORDER BY id",
            &[&ids],
        )
        .await
        .context("reading post_save.dead_letter")?;
    let mut by_event: HashMap<i64, Vec<Dead>> = HashMap::new();
    for r in &rows {
        by_event.entry(r.get(0)).or_default().push(Dead {
            handler: r.get(1),
            attempts: r.get(2),
            last_error: r.get(3),
        });
    }
    for entry in entries {
        if let Some(dead) = entry.event.id.and_then(|id| by_event.remove(&id)) {
            entry.dead = dead;
        }
    }
    Ok(())
}

async fn show(client: &Client, id: i64, json: bool) -> Result<u8> {
    // Event ids name their ledger row: the highest ledger id not above the event's (ledger ids
    // step by 1000, one per captured statement or chunk).
    let sql =
        format!("SELECT {COLUMNS} FROM post_save.event WHERE id <= $1 AND id > $1 - 1000 ORDER BY id DESC LIMIT 1");
    let rows = client.query(&sql, &[&id]).await.context("reading post_save.event")?;
    let mut entries = decode(&rows)?;
    attach_dead(client, &mut entries).await?;
    let Some(entry) = entries.into_iter().find(|e| e.event.id == Some(id)) else {
        bail!("no event {id} in the ledger (it may have been removed after keep_handled)")
    };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&entry).context("encoding JSON")?)?;
    } else {
        let state = match (&entry.handled_at, entry.dead.is_empty()) {
            (None, _) => "pending".to_owned(),
            (Some(at), true) => format!("handled at {at}"),
            (Some(at), false) => format!("finished at {at}, with dead letters"),
        };
        writeln!(out, "event {id}: {} {} {}", op_name(entry.event.op), entry.event.sender, state)?;
        for d in &entry.dead {
            writeln!(out, "dead: {} after {} attempts: {}", d.handler, d.attempts, d.last_error)?;
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&entry.event).context("encoding JSON")?)?;
    }
    Ok(0)
}

async fn tail(client: &Client, filter: &EventFilter, follow: bool) -> Result<u8> {
    let mut out = std::io::stdout().lock();
    let first = recent(client, filter, None).await?;
    let mut seen: BTreeSet<i64> = BTreeSet::new();
    let mut marks: Vec<(Instant, i64)> = Vec::new();
    let mut top = 0;
    for entry in &first {
        writeln!(out, "{}", serde_json::to_string(&entry.event).context("encoding JSON")?)?;
        if let Some(id) = entry.event.id {
            seen.insert(id);
            top = top.max(id);
        }
    }
    out.flush()?;
    if !follow {
        return Ok(0);
    }
    let follow_filter = EventFilter { limit: 10_000, ..filter.clone() };
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        // Look again a little below the highest id seen: a transaction that took a lower id can
        // commit after one that took a higher one.
        marks.push((Instant::now(), top));
        marks.retain(|(at, _)| at.elapsed() < LATE_COMMIT);
        let floor = marks.first().map_or(top, |(_, id)| *id).min(top);
        seen.retain(|id| *id > floor);
        for entry in recent(client, &follow_filter, Some(floor)).await? {
            let Some(id) = entry.event.id else { continue };
            if seen.insert(id) {
                writeln!(out, "{}", serde_json::to_string(&entry.event).context("encoding JSON")?)?;
                top = top.max(id);
            }
        }
        out.flush()?;
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Insert => "insert",
        Op::Update => "update",
        Op::Delete => "delete",
    }
}

fn print_list(entries: &[Entry], json: bool) -> Result<()> {
    if json {
        writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(entries).context("encoding JSON")?)?;
        return Ok(());
    }
    const HEADER: [&str; 7] = ["id", "sender", "op", "pk", "at", "handled", "dead"];
    let cells = |e: &Entry| {
        [
            e.event.id.map_or_else(String::new, |i| i.to_string()),
            e.event.sender.clone(),
            op_name(e.event.op).to_owned(),
            serde_json::Value::Object(e.event.pk.clone()).to_string(),
            e.event.at.clone(),
            e.handled_at.clone().unwrap_or_else(|| "pending".into()),
            e.dead.iter().map(|d| d.handler.as_str()).collect::<Vec<_>>().join(","),
        ]
    };
    super::print_rows(&HEADER, entries.iter().map(|e| cells(e).to_vec()))
}
