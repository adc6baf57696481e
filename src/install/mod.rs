//! The capture triggers: DDL generated from the config, installed, removed and compared.
//!
//! Every watched table gets its own capture function, `post_save."capture_<hash>"`, generated
//! from the watch's options (see [`generate`]), and AFTER triggers for the captured operations
//! (`post_save_insert`, `post_save_update`, `post_save_delete`, and the few a partitioned table
//! or logical replication needs). INSERT fires once per statement and reads its transition
//! table, so a multi-row INSERT is one set-based write (one ledger row, or notes packed under
//! NOTIFY's limit); UPDATE and DELETE fire per row. Writes under
//! `session_replication_role = replica`, the apply worker of a subscription among them, are
//! captured too (as `raw`).
//!
//! Install changes only what differs from the config, each table in a transaction of its own
//! whose locks are taken with a short `lock_timeout` and retried: an unchanged config runs no
//! DDL, and a change never queues the table's readers behind a long transaction for long.

mod catalog;
mod generate;
pub mod grants;
pub mod publication;
mod triggers;

use std::collections::BTreeMap;
use std::fmt;

use tokio_postgres::{Client, GenericClient};

use crate::config::{Capture, Config, Watch};
use crate::name::{TableName, quote_ident, quote_literal};

use catalog::{Installed, installed};
pub use catalog::{TableShape, table_shape};
use generate::body_of;
pub use generate::{backfill_sql, function_sql};
use triggers::{TRIGGER_NAMES, trigger_specs};

/// Most rows of one statement in one ledger row (ledger ids step by this much).
pub const CHUNK: i64 = 1000;

/// The version of the generated capture, in each function's options line: a capture generated
/// by another version of post-save differs from what `triggers install` would write.
const CAPTURE_FORMAT: &str = "4";

/// How long install waits for a table's lock before it lets the table's readers through and
/// tries again.
const LOCK_TIMEOUT: &str = "500ms";

/// How many times install tries to take a table's locks before it gives up.
const LOCK_ATTEMPTS: u32 = 40;

/// A difference between the database and the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// A watched table has no capture trigger.
    Missing(TableName),
    /// A table not in the config still has a capture trigger.
    Unwatched(TableName),
    /// A table not in the config is still in the publication a `capture = "wal"` slot streams.
    UnwatchedPublished(TableName),
    /// The capture exists but differs from what the config (and the table's columns) call for.
    Changed {
        /// The table.
        table: TableName,
        /// What differs.
        what: String,
    },
    /// A watched table does not exist.
    NoTable(TableName),
    /// A watched table was renamed or moved to another schema: its capture goes on, with the
    /// configured name as the events' `sender`.
    Moved {
        /// The name in the config.
        from: TableName,
        /// Its name now.
        to: TableName,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Missing(t) => write!(f, "{t}: watched but has no capture trigger"),
            Drift::Unwatched(t) => write!(f, "{t}: has a capture trigger but is not watched"),
            Drift::UnwatchedPublished(t) => write!(
                f,
                "{t}: is in a post-save publication but is not watched (the slot still streams its saves; \
                 `post-save triggers install` takes it out)"
            ),
            Drift::Changed { table, what } => write!(f, "{table}: capture differs from the config ({what})"),
            Drift::NoTable(t) => write!(f, "{t}: watched table does not exist"),
            Drift::Moved { from, to } => write!(
                f,
                "{from}: renamed or moved to {to}; its saves are still captured and sent with sender {from}: \
                 set `table = {}` in its [[watch]] (and the handlers' `sender`) and run `post-save triggers install`",
                serde_json::Value::from(config_name(to))
            ),
        }
    }
}

/// `table` as a `[[watch]]` names it: `schema.table`, with SQL quotes where a part needs them.
fn config_name(table: &TableName) -> String {
    let plain = |part: &str| !part.is_empty() && !part.contains(['.', '"']) && part.trim() == part;
    if plain(&table.schema) && plain(&table.name) { table.to_string() } else { table.quoted() }
}

/// A watched table that cannot get a trigger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TriggerError {
    /// The table does not exist.
    #[error("table {0} does not exist")]
    NoTable(TableName),
    /// No `pk` in the config and no primary key on the table.
    #[error("table {0} has no primary key; set `pk = [...]` in its [[watch]]")]
    NoPrimaryKey(TableName),
    /// A configured column is not in the table.
    #[error("table {table} has no column `{column}` (named in `{key}`)")]
    NoColumn {
        /// The table.
        table: TableName,
        /// The column.
        column: String,
        /// The config key naming it.
        key: &'static str,
    },
    /// A table is captured from the WAL, and the server does not write logical WAL.
    #[error(
        "capture = \"wal\" needs wal_level = logical, and this server runs with wal_level = {0}: set \
         `wal_level = logical` in postgresql.conf and restart PostgreSQL (or use the trigger capture)"
    )]
    WalLevel(String),
    /// Publishing a table for `capture = "wal"` would make its own UPDATE or DELETE fail.
    #[error("{0}; nothing was changed")]
    Unpublishable(String),
    /// A watched table was renamed or moved: installing the config as it is would leave it
    /// without its capture.
    #[error(
        "table {from} was renamed or moved to {to}; its capture still runs, with sender {from}: set \
         `table = {}` in its [[watch]] (and the handlers' `sender`), then install again",
        serde_json::Value::from(config_name(to))
    )]
    Moved {
        /// The name in the config.
        from: TableName,
        /// Its name now.
        to: TableName,
    },
    /// Another transaction held a watched table for the whole time install tried to lock it.
    #[error(
        "could not lock table {table} in {attempts} attempts: a long transaction holds it (see pg_locks and \
         pg_stat_activity); nothing was changed on this table, run `post-save triggers install` again"
    )]
    Locked {
        /// The table.
        table: TableName,
        /// How many times install tried.
        attempts: u32,
    },
    /// A query failed.
    #[error("database query failed")]
    Query(#[from] tokio_postgres::Error),
}

/// The capture function of `table`: `post_save."capture_<16 hex digits>"`, a stable hash of the
/// qualified name (identifiers are limited to 63 bytes; table names are not short enough).
pub fn function_name(table: &TableName) -> String {
    format!("post_save.{}", quote_ident(&function_ident(table)))
}

/// The bare name of the capture function of `table` (FNV-1a of `schema NUL table`).
pub(super) fn function_ident(table: &TableName) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in table.schema.bytes().chain([0]).chain(table.name.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("capture_{hash:016x}")
}

/// Per-option differences between two options lines: `mode: durable → notify`.
pub(super) fn option_changes(have: &str, want: &str) -> Vec<String> {
    let parse =
        |line: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line).unwrap_or_default();
    let (have, want) = (parse(have), parse(want));
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or("-").to_owned();
    if have.get("format") != want.get("format") {
        return vec![format!(
            "generated by another version of post-save (capture format {} → {}); `post-save triggers install` updates it",
            text(have.get("format")),
            text(want.get("format"))
        )];
    }
    ["mode", "include_old", "columns", "redact", "pk", "insert_capture"]
        .iter()
        .filter(|k| have.get(**k) != want.get(**k))
        .map(|k| format!("{k}: {} → {}", text(have.get(*k)), text(want.get(*k))))
        .collect()
}

/// The full, idempotent DDL of one trigger-captured table: its function and every trigger, each
/// dropped and created again (what `triggers sql` prints for review or for `psql`).
pub fn trigger_ddl(watch: &Watch, shape: &TableShape) -> String {
    let table = watch.table.quoted();
    let function = function_name(&watch.table);
    let mut sql = function_sql(watch, shape);
    sql.push_str(&comment_sql(watch));
    for name in TRIGGER_NAMES {
        sql.push_str(&format!("DROP TRIGGER IF EXISTS {} ON {table};\n", quote_ident(name)));
    }
    for spec in trigger_specs(watch, shape.partitioned) {
        sql.push_str(&spec.create_sql(&table, &function));
    }
    sql
}

fn comment_sql(watch: &Watch) -> String {
    format!(
        "COMMENT ON FUNCTION {}() IS {};\n",
        function_name(&watch.table),
        quote_literal(&format!("post-save capture for {}", watch.table))
    )
}

/// The DDL that brings one trigger-captured table from `have` to what `watch` calls for: empty
/// when nothing differs.
fn trigger_changes(watch: &Watch, shape: &TableShape, have: Option<&Installed>) -> String {
    let table = watch.table.quoted();
    let function = function_name(&watch.table);
    let mut sql = String::new();
    let expected = function_sql(watch, shape);
    if have.and_then(|h| h.body.as_deref()) != Some(body_of(&expected)) {
        sql.push_str(&expected);
        sql.push_str(&comment_sql(watch));
    }
    let want = trigger_specs(watch, shape.partitioned);
    let ident = function_ident(&watch.table);
    let empty = BTreeMap::new();
    let triggers = have.map_or(&empty, |h| &h.triggers);
    for (name, found) in triggers {
        let keep = want.iter().any(|spec| found.is(spec, &ident));
        if !keep {
            sql.push_str(&format!("DROP TRIGGER IF EXISTS {} ON {table};\n", quote_ident(name)));
        }
    }
    for spec in &want {
        if !triggers.get(spec.name).is_some_and(|found| found.is(spec, &ident)) {
            sql.push_str(&spec.create_sql(&table, &function));
        }
    }
    sql
}

/// The DDL that removes the capture of `table`.
pub fn drop_ddl(table: &TableName) -> String {
    format!("DROP FUNCTION IF EXISTS {}() CASCADE;\n", function_name(table))
}

/// The DDL for every watched table, and for removing the capture of tables no longer watched:
/// all of it, whatever is installed (`post-save triggers sql`).
pub async fn plan(client: &impl GenericClient, config: &Config) -> Result<String, TriggerError> {
    let mut sql = String::new();
    for watch in &config.watches {
        let shape = table_shape(client, watch).await?;
        match watch.capture {
            Capture::Trigger => sql.push_str(&trigger_ddl(watch, &shape)),
            Capture::Wal => sql.push_str(&publication::wal_ddl(client, watch).await?),
        }
    }
    for table in installed(client).await?.into_keys() {
        if config.watch(&table).is_none() {
            sql.push_str(&drop_ddl(&table));
        }
    }
    sql.push_str(&publication::ddl(config, &publication::Published::read(client).await?, true));
    Ok(sql)
}

/// Makes the database match the config, changing only what differs. Each table's DDL runs in a
/// transaction of its own, with a short `lock_timeout`, tried again while another transaction
/// holds the table. Returns the DDL run (empty when everything was in sync).
pub async fn install(client: &mut Client, config: &Config) -> Result<String, TriggerError> {
    publication::preflight(&*client, config).await?;
    // Every table must exist before anything changes.
    let mut found = installed(&*client).await?;
    let mut shapes = Vec::with_capacity(config.watches.len());
    for watch in &config.watches {
        match table_shape(&*client, watch).await {
            Ok(shape) => shapes.push(shape),
            Err(TriggerError::NoTable(from)) => {
                let ident = function_ident(&from);
                return Err(match found.iter().find(|(_, have)| have.function == ident) {
                    Some((to, _)) => TriggerError::Moved { from, to: to.clone() },
                    None => TriggerError::NoTable(from),
                });
            }
            Err(e) => return Err(e),
        }
    }
    let mut steps: Vec<(TableName, String)> = Vec::new();
    for (watch, shape) in config.watches.iter().zip(&shapes) {
        let have = found.remove(&watch.table);
        let sql = match watch.capture {
            Capture::Trigger => trigger_changes(watch, shape, have.as_ref()),
            Capture::Wal => publication::wal_changes(&*client, watch, have.is_some()).await?,
        };
        steps.push((watch.table.clone(), sql));
    }
    for (table, have) in found {
        // a table renamed since install keeps its capture (its function still names the
        // configured table): only a capture no watch accounts for is removed
        if !have.moved_from(config) {
            steps.push((table.clone(), drop_ddl(&table)));
        }
    }
    let published = publication::Published::read(&*client).await?;
    steps.push((TableName::new("", ""), publication::ddl(config, &published, false)));
    let mut run = String::new();
    for (table, sql) in steps.into_iter().filter(|(_, sql)| !sql.is_empty()) {
        apply(client, &table, &sql).await?;
        run.push_str(&sql);
    }
    // The slot starts keeping saves from here on; a slot cannot be made in a transaction that
    // wrote, so it comes after the commit.
    if crate::capture::wal::wanted(config) {
        let dbname: String = client.query_one("SELECT current_database()::text", &[]).await?.get(0);
        crate::capture::wal::slot::make(client, &crate::capture::wal::slot_name(&dbname)).await?;
    }
    Ok(run)
}

/// Runs one table's DDL in a transaction whose locks wait at most [`LOCK_TIMEOUT`]; while a
/// lock is not granted in time, the transaction is rolled back (letting the table's readers
/// through) and tried again after a pause.
async fn apply(client: &mut Client, table: &TableName, sql: &str) -> Result<(), TriggerError> {
    let mut pause = std::time::Duration::from_millis(100);
    for attempt in 1..=LOCK_ATTEMPTS {
        let tx = client.transaction().await?;
        tx.batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")).await?;
        match tx.batch_execute(sql).await {
            Ok(()) => {
                tx.commit().await?;
                return Ok(());
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                drop(tx);
                if attempt == LOCK_ATTEMPTS {
                    return Err(TriggerError::Locked { table: table.clone(), attempts: attempt });
                }
                tracing::info!(table = %table, attempt, "another transaction holds the table; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the last attempt returns")
}

/// Removes every capture trigger and function. Returns the tables it was removed from.
pub async fn remove(client: &mut Client) -> Result<Vec<TableName>, TriggerError> {
    let tx = client.transaction().await?;
    let tables: Vec<TableName> = installed(&tx).await?.into_keys().collect();
    let mut sql: String = tables.iter().map(drop_ddl).collect();
    let orphans = tx
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
              WHERE n.nspname = 'post_save' AND p.proname LIKE 'capture\\_%'",
            &[],
        )
        .await?;
    for row in orphans {
        sql.push_str(&format!("DROP FUNCTION IF EXISTS {} CASCADE;\n", row.get::<_, String>(0)));
    }
    let mut tables = tables;
    let published = publication::Published::read(&tx).await?;
    tables.extend(published.tables().into_iter().filter(|t| !tables.contains(t)).collect::<Vec<_>>());
    for name in published.members.keys() {
        sql.push_str(&format!("DROP PUBLICATION IF EXISTS {};\n", quote_ident(name)));
    }
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    // The slot would keep WAL forever once nothing reads it.
    let dbname: String = client.query_one("SELECT current_database()::text", &[]).await?.get(0);
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&crate::capture::wal::slot_name(&dbname)],
        )
        .await?;
    // removed on purpose: no daemon should report the slot as lost
    client
        .batch_execute("DO $$ BEGIN IF to_regclass('post_save.wal_slot') IS NOT NULL THEN DELETE FROM post_save.wal_slot; END IF; END $$")
        .await?;
    Ok(tables)
}

/// Every difference between the installed captures and the config; empty when in sync.
pub async fn check(client: &impl GenericClient, config: &Config) -> Result<Vec<Drift>, TriggerError> {
    let mut found = installed(client).await?;
    let mut drift = Vec::new();
    let publications = publication::Published::read(client).await?;
    let mut published = publications.tables();
    let slot = if crate::capture::wal::wanted(config) {
        let dbname: String = client.query_one("SELECT current_database()::text", &[]).await?.get(0);
        let slot = crate::capture::wal::slot_name(&dbname);
        let exists = client.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?;
        Some((slot, exists.is_some()))
    } else {
        None
    };
    for watch in &config.watches {
        let shape = match table_shape(client, watch).await {
            Ok(shape) => shape,
            Err(TriggerError::NoTable(t)) => {
                let ident = function_ident(&t);
                let moved = found.iter().find(|(_, have)| have.function == ident).map(|(now, _)| now.clone());
                match moved {
                    Some(to) => {
                        found.remove(&to);
                        drift.push(Drift::Moved { from: t, to });
                    }
                    None => drift.push(Drift::NoTable(t)),
                }
                continue;
            }
            Err(TriggerError::Query(e)) => return Err(TriggerError::Query(e)),
            Err(other) => {
                drift.push(Drift::Changed { table: watch.table.clone(), what: other.to_string() });
                continue;
            }
        };
        if watch.capture == Capture::Wal {
            let mut what = Vec::new();
            if found.remove(&watch.table).is_some() {
                what.push("capture = \"wal\" but a capture trigger is installed".to_owned());
            }
            published.remove(&watch.table);
            let belongs = publication::of(watch);
            match publications.holding(&watch.table) {
                None => what.push(format!("not in the `{belongs}` publication")),
                Some(other) if other != belongs => {
                    what.push(format!("in the `{other}` publication instead of `{belongs}`"));
                }
                Some(_) if publications.stale_options.contains(belongs) => {
                    what.push(format!("the `{belongs}` publication's options are not post-save's"));
                }
                Some(_) => {}
            }
            let missing = publication::identity_missing(client, watch).await?;
            if !missing.is_empty() {
                let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
                what.push(format!("REPLICA IDENTITY is not FULL on {}", names.join(", ")));
            }
            if let Some(why) = publication::unsafe_to_publish(client, watch, publications.major).await? {
                what.push(why);
            }
            if let Some((slot, false)) = &slot {
                what.push(format!("no replication slot `{slot}`"));
            }
            if !what.is_empty() {
                drift.push(Drift::Changed { table: watch.table.clone(), what: what.join("; ") });
            }
            continue;
        }
        let Some(have) = found.remove(&watch.table) else {
            drift.push(Drift::Missing(watch.table.clone()));
            continue;
        };
        // only the trigger for rows applied by replication is left
        if have.triggers.keys().all(|name| name == "post_save_insert_replica") {
            drift.push(Drift::Missing(watch.table.clone()));
            continue;
        }
        if let Some(what) = have.differs(watch, &shape) {
            drift.push(Drift::Changed { table: watch.table.clone(), what });
        }
    }
    drift.extend(found.into_keys().map(Drift::Unwatched));
    drift.extend(published.into_iter().map(Drift::UnwatchedPublished));
    Ok(drift)
}

#[cfg(test)]
mod tests {
    use super::catalog::Column;
    use super::*;
    use crate::config::Config;

    #[test]
    fn ddl_snapshot() {
        let config = Config::parse(
            r#"
[[watch]]
table = "public.shop_order"

[[watch]]
table = '"Sales"."Order Items"'
operations = ["insert", "update", "delete"]
mode = "notify"
columns = ["Unit €", "it's"]
redact = ['say "hi"']
include_old = true

[[watch]]
table = "public.signup"
mode = "notify"
redact = ["password"]
"#,
        )
        .unwrap();
        let col = |name: &str, num| Column { name: name.to_owned(), num };
        let shop = TableShape {
            columns: vec![col("id", 1), col("user_id", 2), col("product", 3)],
            pk: vec!["id".to_owned()],
            partitioned: false,
        };
        let items = TableShape {
            columns: vec![
                col("Order Id", 1),
                col("line", 2),
                col("Unit €", 4),
                col("it's", 5),
                col("say \"hi\"", 6),
                col("meta", 7),
            ],
            pk: vec!["Order Id".to_owned(), "line".to_owned()],
            partitioned: true,
        };
        let signup = TableShape {
            columns: vec![col("id", 1), col("email", 2), col("password", 3)],
            pk: vec!["id".to_owned()],
            partitioned: false,
        };
        let sql = format!(
            "{}{}{}",
            trigger_ddl(&config.watches[0], &shop),
            trigger_ddl(&config.watches[1], &items),
            trigger_ddl(&config.watches[2], &signup)
        );
        insta::assert_snapshot!(sql);
    }

    #[test]
    fn a_name_holding_the_dollar_tag_gets_another_tag() {
        let config = Config::parse("[[watch]]\ntable = 'public.\"x$capture$; DROP TABLE canary; --\"'\n").unwrap();
        let shape = TableShape {
            columns: vec![Column { name: "id$capture$".to_owned(), num: 1 }],
            pk: vec!["id$capture$".to_owned()],
            partitioned: false,
        };
        let sql = function_sql(&config.watches[0], &shape);
        assert!(sql.contains("AS $capture_1$\n"), "{sql}");
        assert!(sql.trim_end().ends_with("$capture_1$;"), "{sql}");
        assert!(body_of(&sql).contains("id$capture$"));
    }

    #[test]
    fn function_names_are_stable_and_distinct() {
        let a = function_name(&TableName::new("public", "shop_order"));
        assert_eq!(a, function_name(&TableName::new("public", "shop_order")));
        assert_ne!(a, function_name(&TableName::new("public.shop", "order")));
        assert!(a.len() < 63 + 12);
    }
}
