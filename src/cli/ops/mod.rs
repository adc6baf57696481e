//! Operator commands: `doctor`, `dead`, `events`, `replay`, `backfill`. Tables on a terminal, tab-separated lines in a pipe, `--json`
//! for scripts.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result};

use crate::doctor;

use crate::cli::{EXIT_DRIFT, Global, load_config, pg_config};

mod events;
mod replay;
pub use events::{EventsCommand, events};
pub use replay::{BackfillArgs, ReplayArgs, backfill, replay};

/// `post-save doctor`: exit 0 when every check is ok, 1 when any found a problem, 77 when the
/// database refused the role.
pub async fn doctor(global: &Global, json: bool) -> Result<u8> {
    let config = load_config(global)?;
    let pg = pg_config(global, &config)?;
    let mut refused = None;
    let checks = match crate::db::connect(pg.session()).await {
        Ok((client, _task)) => doctor::run_on(&pg, &client, &config).await,
        Err(e) => {
            let checks = vec![doctor::connect_failed(&e)];
            // The checks are still printed (scripts read them), but a refused role exits 77
            // like every other command that connects.
            refused = e.is_auth_failure().then_some(e);
            checks
        }
    };
    if json {
        writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(&checks).context("encoding JSON")?)?;
    } else {
        let rows = checks.iter().map(|c| {
            [c.verdict.as_str(), c.name, &c.detail, c.fix.as_deref().unwrap_or("")].map(str::to_owned).to_vec()
        });
        print_rows(&["verdict", "check", "detail", "fix"], rows)?;
    }
    if let Some(e) = refused {
        return Err(e.into());
    }
    Ok(if doctor::problems(&checks) { EXIT_DRIFT } else { 0 })
}

/// Rows for people: a table on a terminal, tab-separated lines (header first) in a pipe.
pub(crate) fn print_rows(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if std::io::stdout().is_terminal() {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
        table.set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
        table.set_header(header);
        for row in rows {
            table.add_row(row);
        }
        writeln!(out, "{table}")?;
    } else {
        writeln!(out, "{}", header.join("\t"))?;
        for row in rows {
            writeln!(out, "{}", row.join("\t"))?;
        }
    }
    Ok(())
}

/// `dead …`.
#[derive(Debug, clap::Subcommand)]
pub enum DeadCommand {
    /// The dead letters matching the filters, oldest first
    List {
        #[command(flatten)]
        filter: DeadFilter,
        /// JSON array on stdout
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon to run the matching dead letters through their handler again
    /// (within a second; a dead letter that is delivered is removed)
    Retry {
        #[command(flatten)]
        filter: DeadFilter,
    },
    /// Delete the matching dead letters for good (a filter or --all is required)
    Purge {
        #[command(flatten)]
        filter: DeadFilter,
        /// Every dead letter
        #[arg(long)]
        all: bool,
    },
}

/// Which dead letters a `dead` command acts on; filters combine with AND.
#[derive(Debug, Clone, clap::Args)]
pub struct DeadFilter {
    /// Only these dead-letter ids (repeatable)
    #[arg(long = "id")]
    pub ids: Vec<i64>,
    /// Only this handler
    #[arg(long)]
    pub handler: Option<String>,
    /// Only this sender (schema.table)
    #[arg(long)]
    pub sender: Option<String>,
    /// Only dead letters older than this (e.g. 1h, 2days)
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Option<std::time::Duration>,
    /// Only dead letters newer than this
    #[arg(long, value_parser = humantime::parse_duration)]
    pub newer_than: Option<std::time::Duration>,
}

impl DeadFilter {
    fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.handler.is_none()
            && self.sender.is_none()
            && self.older_than.is_none()
            && self.newer_than.is_none()
    }
}

/// The WHERE clause of a filter, over $1..$5 as bound by [`filter_params`].
const DEAD_WHERE: &str = "(cardinality($1::bigint[]) = 0 OR id = ANY($1)) \
     AND ($2::text IS NULL OR handler = $2) AND ($3::text IS NULL OR sender = $3) \
     AND ($4::float8 IS NULL OR dead_at < clock_timestamp() - make_interval(secs => $4)) \
     AND ($5::float8 IS NULL OR dead_at >= clock_timestamp() - make_interval(secs => $5))";

type FilterParams = (Vec<i64>, Option<String>, Option<String>, Option<f64>, Option<f64>);

fn filter_params(f: &DeadFilter) -> FilterParams {
    let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64());
    (f.ids.clone(), f.handler.clone(), f.sender.clone(), secs(f.older_than), secs(f.newer_than))
}

/// One dead letter, as `dead list` shows it.
#[derive(Debug, serde::Serialize)]
struct DeadLetterRow {
    id: i64,
    event_id: Option<i64>,
    handler: String,
    sender: String,
    attempts: i32,
    last_error: String,
    dead_at: String,
    retry_requested: bool,
    event: serde_json::Value,
}

/// `post-save dead list|retry|purge`.
pub async fn dead(global: &Global, command: &DeadCommand) -> Result<u8> {
    let config = load_config(global)?;
    let pg = pg_config(global, &config)?;
    let (client, _task) = crate::db::connect(pg.session()).await?;
    let filter = match command {
        DeadCommand::List { filter, .. } | DeadCommand::Retry { filter } | DeadCommand::Purge { filter, .. } => filter,
    };
    let (ids, handler, sender, older, newer) = filter_params(filter);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [&ids, &handler, &sender, &older, &newer];
    match command {
        DeadCommand::List { json, .. } => {
            let sql = format!(
                "SELECT id, event_id, handler, sender, attempts, last_error, \
                        to_char(dead_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                        retry_requested_at IS NOT NULL, event::text \
                   FROM post_save.dead_letter WHERE {DEAD_WHERE} ORDER BY id"
            );
            let rows = client.query(&sql, &params).await.context("reading post_save.dead_letter")?;
            let letters: Vec<DeadLetterRow> = rows
                .iter()
                .map(|r| DeadLetterRow {
                    id: r.get(0),
                    event_id: r.get(1),
                    handler: r.get(2),
                    sender: r.get(3),
                    attempts: r.get(4),
                    last_error: r.get(5),
                    dead_at: r.get(6),
                    retry_requested: r.get(7),
                    event: serde_json::from_str(r.get::<_, &str>(8)).unwrap_or(serde_json::Value::Null),
                })
                .collect();
            print_dead(&letters, *json)?;
            Ok(0)
        }
        DeadCommand::Retry { .. } => {
            let sql = format!(
                "UPDATE post_save.dead_letter SET retry_requested_at = clock_timestamp() \
                  WHERE retry_requested_at IS NULL AND {DEAD_WHERE}"
            );
            let n = client.execute(&sql, &params).await.context("requesting retries")?;
            eprintln!("{n} dead letters queued for retry; a running daemon takes them up within a second");
            Ok(0)
        }
        DeadCommand::Purge { all, .. } => {
            if filter.is_empty() && !all {
                anyhow::bail!(
                    "refusing to purge every dead letter without --all; give a filter (--id, --handler, --sender, --older-than, --newer-than) or --all"
                );
            }
            let sql = format!("DELETE FROM post_save.dead_letter WHERE {DEAD_WHERE}");
            let n = client.execute(&sql, &params).await.context("purging dead letters")?;
            eprintln!("{n} dead letters purged");
            Ok(0)
        }
    }
}

fn print_dead(letters: &[DeadLetterRow], json: bool) -> Result<()> {
    if json {
        writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(letters).context("encoding JSON")?)?;
        return Ok(());
    }
    let cells = |d: &DeadLetterRow| {
        [
            d.id.to_string(),
            d.event_id.map_or_else(|| "-".into(), |e| e.to_string()),
            d.handler.clone(),
            d.sender.clone(),
            d.attempts.to_string(),
            d.dead_at.clone(),
            if d.retry_requested { "queued".into() } else { String::new() },
            d.last_error.clone(),
        ]
    };
    const HEADER: [&str; 8] = ["id", "event", "handler", "sender", "attempts", "dead at", "retry", "last error"];
    print_rows(&HEADER, letters.iter().map(|d| cells(d).to_vec()))
}
