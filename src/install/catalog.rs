//! What the catalog says about the watched tables: their columns and keys, and the capture
//! installed on each (its triggers and function), compared with what the config wants.

use std::collections::BTreeMap;

use tokio_postgres::GenericClient;

use super::generate::body_of;
use super::triggers::{TriggerSpec, trigger_specs};
use super::{TriggerError, function_ident, function_sql, option_changes};
use crate::config::{Config, Watch};
use crate::name::TableName;

/// A column of a watched table, as the generator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Its attribute number, which a rename keeps.
    pub num: i16,
}

/// The columns and primary key of a watched table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// Columns in table order.
    pub columns: Vec<Column>,
    /// Primary-key columns in key order.
    pub pk: Vec<String>,
    /// A partitioned table (its partitions are captured through it).
    pub partitioned: bool,
}

/// One capture trigger as the catalog has it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct FoundTrigger {
    pub(super) tgtype: i16,
    pub(super) enabled: char,
    /// The bare name of the function it runs.
    pub(super) function: String,
    pub(super) new_table: Option<String>,
}

impl FoundTrigger {
    /// Whether this is `spec`, running the capture function `ident`.
    pub(super) fn is(&self, spec: &TriggerSpec, ident: &str) -> bool {
        let function = if spec.shared_function { "capture_statement" } else { ident };
        self.tgtype == spec.tgtype
            && self.enabled == spec.enabled
            && self.function == function
            && self.new_table.as_deref() == spec.new_table
    }
}

/// The capture installed on one table.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Installed {
    /// Its triggers, by name.
    pub(super) triggers: BTreeMap<String, FoundTrigger>,
    /// The bare name of its capture function.
    pub(super) function: String,
    /// The function's body; `None` when the function is gone.
    pub(super) body: Option<String>,
}

impl Installed {
    /// Whether this capture belongs to a watched table that has since been renamed or moved.
    pub(super) fn moved_from(&self, config: &Config) -> bool {
        config.watches.iter().any(|w| function_ident(&w.table) == self.function)
    }

    pub(super) fn differs(&self, watch: &Watch, shape: &TableShape) -> Option<String> {
        let mut what = Vec::new();
        let ident = function_ident(&watch.table);
        let want = trigger_specs(watch, shape.partitioned);
        let missing: Vec<&str> = want.iter().filter(|s| !self.triggers.contains_key(s.name)).map(|s| s.name).collect();
        let extra: Vec<&str> = self
            .triggers
            .keys()
            .filter(|name| !want.iter().any(|s| s.name == name.as_str()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            what.push(format!("operations: missing {}", missing.join(", ")));
        }
        if !extra.is_empty() {
            what.push(format!("operations: not wanted {}", extra.join(", ")));
        }
        for spec in &want {
            let Some(found) = self.triggers.get(spec.name) else { continue };
            if found.is(spec, &ident) {
                continue;
            }
            if found.is(&TriggerSpec { enabled: found.enabled, ..spec.clone() }, &ident) {
                what.push(match spec.enabled {
                    'A' => "not enabled ALWAYS".to_owned(),
                    'R' => format!("{} not enabled for replication only", spec.name),
                    _ => format!("{} not enabled as installed", spec.name),
                });
            } else {
                what.push(format!("{} changed", spec.name));
            }
        }
        let triggers_differ = !what.is_empty();
        let expected = function_sql(watch, shape);
        let body = body_of(&expected);
        if self.function != ident {
            what.push("capture function renamed".to_owned());
        } else if self.body.as_deref() != Some(body) {
            let line = |text: &str| text.lines().find_map(|l| l.trim().strip_prefix("-- options: ")).map(str::to_owned);
            let changes = match (self.body.as_deref().and_then(line), line(body)) {
                (Some(have), Some(want)) => option_changes(&have, &want),
                _ => Vec::new(),
            };
            if changes.is_empty() {
                // the operations are in the function too
                if !triggers_differ {
                    what.push("the table's columns changed".to_owned());
                }
            } else {
                what.extend(changes);
            }
        }
        (!what.is_empty()).then(|| what.join("; "))
    }
}

/// Every table with a capture trigger, by its name now. Triggers PostgreSQL cloned onto the
/// partitions of a partitioned table belong to the table itself and are not listed.
pub(super) async fn installed(
    client: &impl GenericClient,
) -> Result<BTreeMap<TableName, Installed>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, t.tgname::text, t.tgtype, t.tgenabled::text, \
                    p.proname::text, t.tgnewtable::text, \
                    CASE WHEN p.proname LIKE 'capture\\_%' AND p.proname <> 'capture_statement' THEN p.prosrc END \
               FROM pg_trigger t \
               JOIN pg_class c ON c.oid = t.tgrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               JOIN pg_proc p ON p.oid = t.tgfoid \
               JOIN pg_namespace pn ON pn.oid = p.pronamespace \
              WHERE pn.nspname = 'post_save' AND p.proname LIKE 'capture\\_%' AND NOT t.tgisinternal \
                AND t.tgparentid = 0",
            &[],
        )
        .await?;
    let mut out: BTreeMap<TableName, Installed> = BTreeMap::new();
    for row in rows {
        let table = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let function: String = row.get(5);
        let entry = out.entry(table).or_insert_with(|| Installed {
            triggers: BTreeMap::new(),
            function: String::new(),
            body: None,
        });
        if function != "capture_statement" {
            entry.function.clone_from(&function);
            entry.body = row.get(7);
        }
        let enabled: String = row.get(4);
        entry.triggers.insert(
            row.get(2),
            FoundTrigger {
                tgtype: row.get(3),
                enabled: enabled.chars().next().unwrap_or('O'),
                function,
                new_table: row.get(6),
            },
        );
    }
    Ok(out)
}

/// The columns and primary key of a watched table, after checking that every column the config
/// names exists.
pub async fn table_shape(client: &impl GenericClient, watch: &Watch) -> Result<TableShape, TriggerError> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.attnum, array_position(i.indkey::int2[], a.attnum), c.relkind = 'p' \
               FROM pg_attribute a \
               JOIN pg_class c ON c.oid = a.attrelid \
               LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
              ORDER BY a.attnum",
            &[&watch.table.quoted()],
        )
        .await?;
    if rows.is_empty() {
        return Err(TriggerError::NoTable(watch.table.clone()));
    }
    let columns: Vec<Column> = rows.iter().map(|r| Column { name: r.get(0), num: r.get(1) }).collect();
    let partitioned = rows[0].get(3);
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    let named =
        [("pk", watch.pk.as_deref().unwrap_or_default()), ("columns", &watch.columns), ("redact", &watch.redact)];
    for (key, list) in named {
        if let Some(column) = list.iter().find(|c| !names.contains(&c.as_str())) {
            return Err(TriggerError::NoColumn { table: watch.table.clone(), column: column.clone(), key });
        }
    }
    let pk = match &watch.pk {
        Some(pk) => pk.clone(),
        None => {
            let mut keyed: Vec<(i32, String)> =
                rows.iter().filter_map(|r| r.get::<_, Option<i32>>(2).map(|p| (p, r.get(0)))).collect();
            keyed.sort();
            keyed.into_iter().map(|(_, c)| c).collect()
        }
    };
    if pk.is_empty() {
        return Err(TriggerError::NoPrimaryKey(watch.table.clone()));
    }
    Ok(TableShape { columns, pk, partitioned })
}
