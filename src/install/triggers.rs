//! The triggers of a capture: which ones a watch needs (by the operations it captures, and
//! whether its table is partitioned), and their DDL.

use crate::config::{InsertCapture, Watch};
use crate::name::quote_ident;

/// One trigger of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TriggerSpec {
    /// Its name.
    pub name: &'static str,
    /// `pg_trigger.tgtype`: what fires it, and when.
    pub tgtype: i16,
    /// `pg_trigger.tgenabled`: `A` always, `O` unless replicating, `R` only when replicating.
    pub enabled: char,
    /// The function it runs: the table's capture, or the shared statement trigger.
    pub shared_function: bool,
    /// The transition table it references (`REFERENCING NEW TABLE AS …`).
    pub new_table: Option<&'static str>,
}

// pg_trigger.tgtype bits
const ROW: i16 = 1;
const BEFORE: i16 = 2;
const INSERT: i16 = 4;
const DELETE: i16 = 8;
const UPDATE: i16 = 16;

/// The transition table a statement-level INSERT capture reads.
pub(super) const NEW_TABLE: &str = "post_save_new";

impl TriggerSpec {
    /// The `CREATE TRIGGER` and `ALTER TABLE … ENABLE` statements of this trigger on `table`.
    pub fn create_sql(&self, table: &str, function: &str) -> String {
        let when = if self.tgtype & BEFORE != 0 { "BEFORE" } else { "AFTER" };
        let ops: Vec<&str> = [(INSERT, "INSERT"), (UPDATE, "UPDATE"), (DELETE, "DELETE")]
            .iter()
            .filter(|(bit, _)| self.tgtype & bit != 0)
            .map(|(_, op)| *op)
            .collect();
        let referencing = self.new_table.map(|t| format!(" REFERENCING NEW TABLE AS {t}")).unwrap_or_default();
        let level = if self.tgtype & ROW != 0 { "ROW" } else { "STATEMENT" };
        let function = if self.shared_function { "post_save.capture_statement" } else { function };
        let enable = match self.enabled {
            'A' => "ENABLE ALWAYS",
            'R' => "ENABLE REPLICA",
            _ => "ENABLE",
        };
        let name = quote_ident(self.name);
        format!(
            "CREATE TRIGGER {name} {when} {} ON {table}{referencing}\n    FOR EACH {level} EXECUTE FUNCTION {function}();\n\
             ALTER TABLE {table} {enable} TRIGGER {name};\n",
            ops.join(" OR ")
        )
    }
}

/// Every trigger name a capture may use, for dropping the ones no longer wanted.
pub(super) const TRIGGER_NAMES: [&str; 6] = [
    "post_save_insert",
    "post_save_insert_replica",
    "post_save_update",
    "post_save_delete",
    "post_save_move_begin",
    "post_save_move_end",
];

/// The triggers the capture of `watch` needs on its table.
///
/// A plain table's INSERT capture runs once per statement, which logical replication's apply
/// worker never fires: a row trigger enabled only for replication (`R`) captures those rows, and
/// the statement trigger is enabled for every other session (`O`). UPDATE and DELETE run per row,
/// always. A partitioned table gets row triggers only (PostgreSQL clones them onto every
/// partition, later ones too, and a statement trigger on the parent does not fire for a write
/// made directly to a partition); when UPDATE is watched, its INSERT and DELETE row triggers also
/// see rows moved between partitions, which the statement triggers mark.
pub(super) fn trigger_specs(watch: &Watch, partitioned: bool) -> Vec<TriggerSpec> {
    let ops = watch.operations;
    let row = |name, tgtype| TriggerSpec {
        name,
        tgtype: ROW | tgtype,
        enabled: 'A',
        shared_function: false,
        new_table: None,
    };
    let mut specs = Vec::new();
    if partitioned {
        if ops.insert || ops.update {
            specs.push(row("post_save_insert", INSERT));
        }
        if ops.update {
            specs.push(row("post_save_update", UPDATE));
        }
        if ops.delete || ops.update {
            specs.push(row("post_save_delete", DELETE));
        }
        if ops.update {
            let statement = |name, tgtype| TriggerSpec {
                name,
                tgtype: tgtype | UPDATE | DELETE,
                enabled: 'A',
                shared_function: true,
                new_table: None,
            };
            specs.push(statement("post_save_move_begin", BEFORE));
            specs.push(statement("post_save_move_end", 0));
        }
        return specs;
    }
    if ops.insert {
        match watch.insert_capture {
            InsertCapture::Statement => {
                specs.push(TriggerSpec {
                    name: "post_save_insert",
                    tgtype: INSERT,
                    enabled: 'O',
                    shared_function: false,
                    new_table: Some(NEW_TABLE),
                });
                specs.push(TriggerSpec { enabled: 'R', ..row("post_save_insert_replica", INSERT) });
            }
            InsertCapture::Row => specs.push(row("post_save_insert", INSERT)),
        }
    }
    if ops.update {
        specs.push(row("post_save_update", UPDATE));
    }
    if ops.delete {
        specs.push(row("post_save_delete", DELETE));
    }
    specs
}
