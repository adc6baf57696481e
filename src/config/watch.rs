//! `[[watch]]`: a watched table, which of its statements are captured, how, and from where.

use std::ops::Range;

use serde::Deserialize;

use super::ConfigError;
use super::section::error_at;
use crate::name::TableName;

/// How a table's saves are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Ledger row + NOTIFY: at-least-once, survives the daemon being down.
    Durable,
    /// NOTIFY only: at-most-once, nothing written.
    Notify,
}

impl Mode {
    /// The name used in the trigger arguments and the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Durable => "durable",
            Mode::Notify => "notify",
        }
    }
}

/// How INSERTs are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InsertCapture {
    /// Once per statement: a multi-row INSERT is one set-based ledger write (the default).
    Statement,
    /// Once per row: cheaper for single-row INSERTs, costlier for multi-row ones.
    Row,
}

impl InsertCapture {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            InsertCapture::Statement => "statement",
            InsertCapture::Row => "row",
        }
    }
}

/// Where a durable watch's saves are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capture {
    /// A trigger writes each save to the ledger in the writer's transaction (the default).
    Trigger,
    /// No trigger: the daemon reads committed saves from the write-ahead log through a logical
    /// replication slot (needs `wal_level = logical`). The writer pays nothing extra; the event
    /// carries no actor, unless the transaction emits one (see the capture docs, docs/capture.md).
    Wal,
}

impl Capture {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Capture::Trigger => "trigger",
            Capture::Wal => "wal",
        }
    }
}

/// Which statements a watch captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operations {
    /// INSERT.
    pub insert: bool,
    /// UPDATE.
    pub update: bool,
    /// DELETE (`post_delete`).
    pub delete: bool,
}

/// One `[[watch]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// The table.
    pub table: TableName,
    /// Captured operations.
    pub operations: Operations,
    /// Capture mode.
    pub mode: Mode,
    /// An UPDATE counts only if one of these changed; empty: any column.
    pub columns: Vec<String>,
    /// Columns whose values never leave the database.
    pub redact: Vec<String>,
    /// Include the row before an UPDATE as `old`.
    pub include_old: bool,
    /// Primary-key columns, when the table has no primary key constraint to read them from.
    pub pk: Option<Vec<String>>,
    /// How INSERTs are captured.
    pub insert_capture: InsertCapture,
    /// Where the saves are read from: a trigger, or the write-ahead log.
    pub capture: Capture,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWatch {
    table: String,
    #[serde(default)]
    operations: Option<Vec<String>>,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    redact: Vec<String>,
    #[serde(default)]
    include_old: bool,
    #[serde(default)]
    pk: Option<Vec<String>>,
    #[serde(default)]
    insert_capture: Option<InsertCapture>,
    #[serde(default)]
    capture: Option<Capture>,
}

impl RawWatch {
    pub(super) fn validate(self, src: &str, span: Range<usize>, key: &str) -> Result<Watch, ConfigError> {
        let err = |field: &str, msg: &str| error_at(src, span.clone(), key, field, msg);
        let table = TableName::parse(&self.table).map_err(|m| err("table", &m))?;
        let mut operations = Operations { insert: false, update: false, delete: false };
        let ops = self.operations.unwrap_or_else(|| vec!["insert".into(), "update".into()]);
        if ops.is_empty() {
            return Err(err("operations", "at least one operation is needed"));
        }
        for op in &ops {
            match op.as_str() {
                "insert" => operations.insert = true,
                "update" => operations.update = true,
                "delete" => operations.delete = true,
                other => {
                    let msg = format!("unknown operation `{other}`; expected insert, update or delete");
                    return Err(err("operations", &msg));
                }
            }
        }
        if let Some(pk) = &self.pk {
            if pk.is_empty() {
                return Err(err("pk", "an empty primary key cannot identify a row"));
            }
            if let Some(c) = pk.iter().find(|c| self.redact.contains(c)) {
                return Err(err("redact", &format!("primary-key column `{c}` cannot be redacted")));
            }
        }
        let capture = self.capture.unwrap_or(Capture::Trigger);
        if capture == Capture::Wal {
            if self.mode == Some(Mode::Notify) {
                return Err(err(
                    "capture",
                    "capture = \"wal\" is durable by nature (the slot keeps every save until the daemon confirms it); \
                     drop `mode = \"notify\"` or use the trigger capture",
                ));
            }
            if !self.redact.is_empty() {
                return Err(err(
                    "redact",
                    "redacted columns cannot be kept in the database with capture = \"wal\": the replication \
                     stream carries the whole row; use the trigger capture for this table",
                ));
            }
            if self.insert_capture.is_some() {
                return Err(err("insert_capture", "insert_capture applies to the trigger capture only"));
            }
        }
        Ok(Watch {
            table,
            operations,
            capture,
            mode: self.mode.unwrap_or(Mode::Durable),
            columns: self.columns,
            redact: self.redact,
            include_old: self.include_old,
            pk: self.pk,
            insert_capture: self.insert_capture.unwrap_or(InsertCapture::Statement),
        })
    }
}
