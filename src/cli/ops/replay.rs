//! `post-save replay` (deliver acknowledged events again) and `post-save backfill` (synthetic
//! `raw = true` events for rows that already exist), both through the running daemon.

use std::io::Write;

use anyhow::{Context, Result, bail};

use crate::TableName;
use crate::event::decode_ledger_row;
use crate::install;

use crate::cli::{Global, load_config, pg_config};

/// `post-save replay` options.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Events saved at or after this: an RFC 3339 time (2026-12-01T09:00:00Z) or a duration ago (2h)
    #[arg(long)]
    pub since: String,
    /// Only events saved before this (same forms)
    #[arg(long)]
    pub until: Option<String>,
    /// Only this sender (schema.table)
    #[arg(long)]
    pub sender: Option<String>,
    /// Deliver to this handler only (through the retry queue of `dead`); default: every handler
    #[arg(long)]
    pub handler: Option<String>,
    /// Say what would be replayed; change nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// `post-save backfill` options.
#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    /// A watched table (schema.table)
    #[arg(long)]
    pub table: String,
    /// Only rows matching this SQL condition, e.g. "created_at > now() - interval '1 day'"
    #[arg(long = "where")]
    pub filter: Option<String>,
    /// Say how many rows would become events; change nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// A point in time for SQL: a duration ago (`2h`), else a time PostgreSQL reads as
/// `timestamptz` (it rejects what is neither).
fn instant(text: &str) -> (Option<String>, Option<f64>) {
    match humantime::parse_duration(text) {
        Ok(ago) => (None, Some(ago.as_secs_f64())),
        Err(_) => (Some(text.to_owned()), None),
    }
}

/// The ledger rows in the window, over $1–$5 (since as time/seconds, until as time/seconds,
/// sender).
const WINDOW: &str = "(head->>'at')::timestamptz >= coalesce($1::text::timestamptz, clock_timestamp() - make_interval(secs => $2::float8)) \
     AND ($3::text IS NULL AND $4::float8 IS NULL \
          OR (head->>'at')::timestamptz < coalesce($3::text::timestamptz, clock_timestamp() - make_interval(secs => $4::float8))) \
     AND ($5::text IS NULL OR sender = $5)";

/// `post-save replay`.
pub async fn replay(global: &Global, args: &ReplayArgs) -> Result<u8> {
    let config = load_config(global)?;
    if let Some(h) = &args.handler
        && !config.handlers.iter().any(|c| &c.name == h)
    {
        // Handlers registered in Rust code are not in the file; the daemon knows them.
        tracing::warn!(handler = %h, "no handler of this name in the configuration; the daemon records a retry for an unknown handler as failed");
    }
    let pg = pg_config(global, &config)?;
    let (client, _task) = crate::db::connect(pg.session()).await?;
    let (since_at, since_ago) = instant(&args.since);
    let (until_at, until_ago) = args.until.as_deref().map_or((None, None), instant);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&since_at, &since_ago, &until_at, &until_ago, &args.sender];
    let sql = format!(
        "SELECT id, sender, op, head::text, rows::text, current_database()::text FROM post_save.event \
          WHERE handled_at IS NOT NULL AND {WINDOW} ORDER BY id"
    );
    let rows = client.query(&sql, &params).await.context("reading post_save.event")?;
    let mut events = Vec::new();
    for r in &rows {
        let id: i64 = r.get(0);
        events.extend(
            decode_ledger_row(id, r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))
                .with_context(|| format!("ledger row {id} does not decode"))?,
        );
    }
    let target = args.handler.as_deref().map_or_else(|| "every handler".to_owned(), |h| format!("handler {h:?}"));
    if args.dry_run {
        let mut out = std::io::stdout().lock();
        for e in &events {
            writeln!(out, "{}\t{}\t{}", e.id.unwrap_or_default(), e.sender, e.at)?;
        }
        eprintln!("dry run: {} acknowledged events would be delivered again to {target}", events.len());
        return Ok(0);
    }
    let queued = match &args.handler {
        None => {
            let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            client
                .execute(
                    "UPDATE post_save.event SET handled_at = NULL WHERE id = ANY($1) AND handled_at IS NOT NULL",
                    &[&ids],
                )
                .await
                .context("making the events pending again")?;
            // The daemon's cursor is past these ids: ask for a sweep now.
            client.execute("SELECT pg_notify('post_save', '{\"wake\":\"sweep\"}')", &[]).await?;
            events.len()
        }
        Some(handler) => {
            let ids: Vec<Option<i64>> = events.iter().map(|e| e.id).collect();
            let senders: Vec<&str> = events.iter().map(|e| e.sender.as_str()).collect();
            let bodies: Vec<String> = events.iter().map(crate::SaveEvent::to_json).collect();
            let n = client
                .execute(
                    "INSERT INTO post_save.dead_letter (event_id, handler, sender, event, attempts, last_error, retry_requested_at) \
                     SELECT e, $4, s, b::json, 0, 'replay requested', clock_timestamp() \
                       FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(e, s, b)",
                    &[&ids, &senders, &bodies, handler],
                )
                .await
                .context("queueing the replay")?;
            usize::try_from(n).unwrap_or(usize::MAX)
        }
    };
    eprintln!("{queued} events queued for delivery again to {target}; a running daemon takes them up within a second");
    Ok(0)
}

/// `post-save backfill`.
pub async fn backfill(global: &Global, args: &BackfillArgs) -> Result<u8> {
    let config = load_config(global)?;
    let table = TableName::parse(&args.table).map_err(|e| anyhow::anyhow!("--table {:?}: {e}", args.table))?;
    let Some(watch) = config.watch(&table) else {
        bail!("{table} is not a watched table in the configuration: backfill sends events to its handlers");
    };
    let pg = pg_config(global, &config)?;
    let (client, _task) = crate::db::connect(pg.session()).await?;
    let shape = install::table_shape(&client, watch).await?;
    if args.dry_run {
        let sql =
            format!("SELECT count(*) FROM {} n WHERE ({})", table.quoted(), args.filter.as_deref().unwrap_or("TRUE"));
        let n: i64 = client.query_one(&sql, &[]).await.context("counting the rows")?.get(0);
        eprintln!("dry run: {n} rows of {table} would become raw insert events");
        return Ok(0);
    }
    let sql = install::backfill_sql(watch, &shape, args.filter.as_deref());
    let rows = client.query(&sql, &[]).await.context("writing the backfill events")?;
    let events: i64 = rows.iter().map(|r| i64::from(r.get::<_, i32>(0))).sum();
    client.execute("SELECT pg_notify('post_save', '{\"wake\":\"ledger\"}')", &[]).await?;
    eprintln!("{events} raw insert events of {table} written to the ledger ({} ledger rows)", rows.len());
    Ok(0)
}
