//! The capture triggers: DDL generated from the config, installed, removed and compared.
//!
//! Every watched table gets one AFTER ROW trigger, `post_save_capture`, calling
//! `post_save.capture(mode, include_old, columns, redact, pk)`. It is enabled ALWAYS so writes
//! under `session_replication_role = replica` are captured too (as `raw` events).

use std::collections::BTreeMap;
use std::fmt;

use tokio_postgres::{Client, GenericClient};

use crate::config::{Config, Watch};
use crate::name::{TableName, array_literal, quote_ident, quote_literal};

/// The trigger's name on every watched table.
pub const TRIGGER_NAME: &str = "post_save_capture";

/// A difference between the database and the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// A watched table has no capture trigger.
    Missing(TableName),
    /// A table not in the config still has a capture trigger.
    Unwatched(TableName),
    /// The trigger exists with other options.
    Changed {
        /// The table.
        table: TableName,
        /// What differs.
        what: String,
    },
    /// A watched table does not exist.
    NoTable(TableName),
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Missing(t) => write!(f, "{t}: watched but has no capture trigger"),
            Drift::Unwatched(t) => write!(f, "{t}: has a capture trigger but is not watched"),
            Drift::Changed { table, what } => write!(f, "{table}: trigger differs from the config ({what})"),
            Drift::NoTable(t) => write!(f, "{t}: watched table does not exist"),
        }
    }
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
    /// A query failed.
    #[error("database query failed")]
    Query(#[from] tokio_postgres::Error),
}

/// The trigger arguments for `watch` with primary-key columns `pk`.
pub fn trigger_args(watch: &Watch, pk: &[String]) -> Vec<String> {
    vec![
        watch.mode.as_str().to_owned(),
        watch.include_old.to_string(),
        array_literal(&watch.columns),
        array_literal(&watch.redact),
        array_literal(pk),
    ]
}

/// The idempotent DDL that installs (or updates) the trigger of `watch`.
pub fn trigger_ddl(watch: &Watch, pk: &[String]) -> String {
    let table = watch.table.quoted();
    let name = quote_ident(TRIGGER_NAME);
    let mut events = Vec::new();
    let ops = watch.operations;
    if ops.insert {
        events.push("INSERT");
    }
    if ops.update {
        events.push("UPDATE");
    }
    if ops.delete {
        events.push("DELETE");
    }
    let args: Vec<String> = trigger_args(watch, pk).iter().map(|a| quote_literal(a)).collect();
    format!(
        "DROP TRIGGER IF EXISTS {name} ON {table};\n\
         CREATE TRIGGER {name} AFTER {events} ON {table}\n    \
         FOR EACH ROW EXECUTE FUNCTION post_save.capture({args});\n\
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name};\n",
        events = events.join(" OR "),
        args = args.join(", "),
    )
}

/// The DDL that removes the trigger from `table`.
pub fn drop_ddl(table: &TableName) -> String {
    format!("DROP TRIGGER IF EXISTS {} ON {};\n", quote_ident(TRIGGER_NAME), table.quoted())
}

/// The DDL for every watched table, and for removing triggers of tables no longer watched.
pub async fn plan(client: &impl GenericClient, config: &Config) -> Result<String, TriggerError> {
    let mut sql = String::new();
    for watch in &config.watches {
        let pk = primary_key(client, watch).await?;
        sql.push_str(&trigger_ddl(watch, &pk));
    }
    for table in installed(client).await?.into_keys() {
        if config.watch(&table).is_none() {
            sql.push_str(&drop_ddl(&table));
        }
    }
    Ok(sql)
}

/// Makes the database match the config, in one transaction. Returns the DDL run.
pub async fn install(client: &mut Client, config: &Config) -> Result<String, TriggerError> {
    let tx = client.transaction().await?;
    let sql = plan(&tx, config).await?;
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok(sql)
}

/// Removes every capture trigger. Returns the tables it was removed from.
pub async fn remove(client: &mut Client) -> Result<Vec<TableName>, TriggerError> {
    let tx = client.transaction().await?;
    let tables: Vec<TableName> = installed(&tx).await?.into_keys().collect();
    let sql: String = tables.iter().map(drop_ddl).collect();
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok(tables)
}

/// Every difference between the installed triggers and the config; empty when in sync.
pub async fn check(client: &impl GenericClient, config: &Config) -> Result<Vec<Drift>, TriggerError> {
    let mut found = installed(client).await?;
    let mut drift = Vec::new();
    for watch in &config.watches {
        let pk = match primary_key(client, watch).await {
            Ok(pk) => pk,
            Err(TriggerError::NoTable(t)) => {
                drift.push(Drift::NoTable(t));
                continue;
            }
            Err(TriggerError::Query(e)) => return Err(TriggerError::Query(e)),
            Err(_) => Vec::new(),
        };
        let Some(have) = found.remove(&watch.table) else {
            drift.push(Drift::Missing(watch.table.clone()));
            continue;
        };
        let want = Installed { events: events_mask(watch), args: trigger_args(watch, &pk), always: true };
        if let Some(what) = have.differs(&want) {
            drift.push(Drift::Changed { table: watch.table.clone(), what });
        }
    }
    drift.extend(found.into_keys().map(Drift::Unwatched));
    Ok(drift)
}

/// An installed capture trigger.
#[derive(Debug, PartialEq, Eq)]
struct Installed {
    events: i16,
    args: Vec<String>,
    always: bool,
}

const TG_INSERT: i16 = 1 << 2;
const TG_DELETE: i16 = 1 << 3;
const TG_UPDATE: i16 = 1 << 4;

fn events_mask(watch: &Watch) -> i16 {
    let ops = watch.operations;
    (if ops.insert { TG_INSERT } else { 0 })
        | (if ops.update { TG_UPDATE } else { 0 })
        | (if ops.delete { TG_DELETE } else { 0 })
}

impl Installed {
    fn differs(&self, want: &Installed) -> Option<String> {
        const ARGS: [&str; 5] = ["mode", "include_old", "columns", "redact", "pk"];
        let mut what = Vec::new();
        if self.events != want.events {
            what.push("operations".to_owned());
        }
        for (i, name) in ARGS.iter().enumerate() {
            if self.args.get(i) != want.args.get(i) {
                what.push(format!("{name}: {} → {}", self.args.get(i).map_or("-", |s| s), want.args[i]));
            }
        }
        if !self.always {
            what.push("not enabled ALWAYS".to_owned());
        }
        (!what.is_empty()).then(|| what.join("; "))
    }
}

async fn installed(client: &impl GenericClient) -> Result<BTreeMap<TableName, Installed>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, t.tgtype, t.tgenabled::text, t.tgargs \
               FROM pg_trigger t \
               JOIN pg_class c ON c.oid = t.tgrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE t.tgfoid = to_regproc('post_save.capture') AND NOT t.tgisinternal",
            &[],
        )
        .await?;
    let mut out = BTreeMap::new();
    for row in rows {
        let table = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let tgtype: i16 = row.get(2);
        let enabled: String = row.get(3);
        let raw: Vec<u8> = row.get(4);
        let mut args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.last().is_some_and(String::is_empty) {
            args.pop();
        }
        let events = tgtype & (TG_INSERT | TG_DELETE | TG_UPDATE);
        out.insert(table, Installed { events, args, always: enabled == "A" });
    }
    Ok(out)
}

/// The primary-key columns of a watched table (from the config, else the table), after checking
/// that every column the config names exists.
async fn primary_key(client: &impl GenericClient, watch: &Watch) -> Result<Vec<String>, TriggerError> {
    let table = watch.table.quoted();
    let rows = client
        .query(
            "SELECT a.attname::text, coalesce(array_position(i.indkey::int2[], a.attnum) IS NOT NULL AND i.indisprimary, false) \
               FROM pg_attribute a \
               LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
              ORDER BY array_position(i.indkey::int2[], a.attnum), a.attnum",
            &[&table],
        )
        .await?;
    if rows.is_empty() {
        return Err(TriggerError::NoTable(watch.table.clone()));
    }
    let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let named =
        [("pk", watch.pk.as_deref().unwrap_or_default()), ("columns", &watch.columns), ("redact", &watch.redact)];
    for (key, list) in named {
        if let Some(column) = list.iter().find(|c| !columns.contains(c)) {
            return Err(TriggerError::NoColumn { table: watch.table.clone(), column: column.clone(), key });
        }
    }
    if let Some(pk) = &watch.pk {
        return Ok(pk.clone());
    }
    let pk: Vec<String> = rows.iter().filter(|r| r.get::<_, bool>(1)).map(|r| r.get(0)).collect();
    if pk.is_empty() {
        return Err(TriggerError::NoPrimaryKey(watch.table.clone()));
    }
    Ok(pk)
}

#[cfg(test)]
mod tests {
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
"#,
        )
        .unwrap();
        let sql: String = config
            .watches
            .iter()
            .zip([vec!["id".to_owned()], vec!["Order Id".to_owned(), "line".to_owned()]])
            .map(|(w, pk)| trigger_ddl(w, &pk))
            .collect();
        insta::assert_snapshot!(sql);
    }
}
