//! The capture triggers: DDL generated from the config, installed, removed and compared.
//!
//! Every watched table gets its own capture function, `post_save."capture_<hash>"`, generated
//! from the table's columns and the watch's options, and one AFTER trigger per captured
//! operation (`post_save_insert`, `post_save_update`, `post_save_delete`). INSERT fires once per
//! statement and reads its transition table, so a multi-row INSERT is one set-based write (one
//! ledger row, or notes packed under NOTIFY's limit); UPDATE and DELETE fire per row, UPDATE
//! diffs computed column by column. The triggers are enabled ALWAYS so writes under
//! `session_replication_role = replica` are captured too (as `raw`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tokio_postgres::{Client, GenericClient};

use crate::config::{Capture, Config, InsertCapture, Mode, Watch};
use crate::name::{TableName, array_literal, quote_ident, quote_literal};

/// The template of a table's capture function.
const TEMPLATE: &str = include_str!("../sql/capture_table.sql");

/// The trigger names, by operation.
pub const TRIGGERS: [(&str, &str); 3] =
    [("insert", "post_save_insert"), ("update", "post_save_update"), ("delete", "post_save_delete")];

/// json_build_object takes at most 100 arguments: 50 columns.
const MAX_BUILD_COLUMNS: usize = 50;

/// Most rows of one statement in one ledger row (ledger ids step by this much).
pub const CHUNK: i64 = 1000;

/// The version of the generated capture, in each function's options line: a capture generated
/// by another version of post-save differs from what `triggers install` would write.
const CAPTURE_FORMAT: &str = "3";

/// NOTIFY's payload limit: a payload must be shorter.
const NOTE_LIMIT: usize = 8000;

/// A saved row whose JSON is longer than this travels in a note of its own (or by reference);
/// shorter ones are packed together, so a note stays under [`NOTE_LIMIT`].
const NOTE_ROW_MAX: usize = 1000;

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
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Missing(t) => write!(f, "{t}: watched but has no capture trigger"),
            Drift::Unwatched(t) => write!(f, "{t}: has a capture trigger but is not watched"),
            Drift::UnwatchedPublished(t) => write!(
                f,
                "{t}: is in the `{}` publication but is not watched (the slot still streams its saves)",
                crate::wal::PUBLICATION
            ),
            Drift::Changed { table, what } => write!(f, "{table}: capture differs from the config ({what})"),
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
    /// A table is captured from the WAL, and the server does not write logical WAL.
    #[error(
        "capture = \"wal\" needs wal_level = logical, and this server runs with wal_level = {0}: set \
         `wal_level = logical` in postgresql.conf and restart PostgreSQL (or use the trigger capture)"
    )]
    WalLevel(String),
    /// A query failed.
    #[error("database query failed")]
    Query(#[from] tokio_postgres::Error),
}

/// A column of a watched table, as the generator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Its type has no `=` operator (json, xml, point…): compared as text.
    pub text_compare: bool,
}

/// The columns and primary key of a watched table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// Columns in table order.
    pub columns: Vec<Column>,
    /// Primary-key columns in key order.
    pub pk: Vec<String>,
}

/// The capture function of `table`: `post_save."capture_<16 hex digits>"`, a stable hash of the
/// qualified name (identifiers are limited to 63 bytes; table names are not short enough).
pub fn function_name(table: &TableName) -> String {
    format!("post_save.{}", quote_ident(&function_ident(table)))
}

/// The bare name of the capture function of `table` (FNV-1a of `schema NUL table`).
fn function_ident(table: &TableName) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in table.schema.bytes().chain([0]).chain(table.name.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("capture_{hash:016x}")
}

/// The options written into each function as a JSON comment line, compared by `check` to say
/// what changed.
fn options_line(watch: &Watch, shape: &TableShape) -> String {
    let options = serde_json::json!({
        "mode": watch.mode.as_str(),
        "include_old": watch.include_old.to_string(),
        "columns": array_literal(&watch.columns),
        "redact": array_literal(&watch.redact),
        "pk": array_literal(&shape.pk),
        "insert_capture": watch.insert_capture.as_str(),
        "format": CAPTURE_FORMAT,
    });
    format!("options: {options}")
}

/// Per-option differences between two options lines: `mode: durable → notify`.
fn option_changes(have: &str, want: &str) -> Vec<String> {
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

/// The SQL that creates (or replaces) the capture function of `watch`.
pub fn function_sql(watch: &Watch, shape: &TableShape) -> String {
    let g = Generator { watch, shape, sender: quote_literal(&watch.table.to_string()) };
    let ops = watch.operations;
    let branch = |on: bool, body: String| if on { body } else { "        NULL;".to_owned() };
    // What the events of one ledger row (or one note) share.
    let head = format!(
        "    v_head := json_build_object('raw', v_raw, 'txid', v_txid, 'at', v_at, 'actor', v_actor, 'origin', v_origin,\n                                \
         'keys', {});\n",
        g.keys()
    );
    // The variables only notify captures use, to pack notes.
    let declare = match watch.mode {
        Mode::Durable => "",
        Mode::Notify => "\n    v_item   text;\n    v_room   integer;\n    v_big    bigint;",
    };
    let wake = match watch.mode {
        // A function call, not a query: PL/pgSQL evaluates it without starting an executor.
        Mode::Durable => {
            "    IF v_rows > 0 AND pg_sequence_last_value('post_save.doorbell'::regclass) > 0 THEN\n        \
                          PERFORM pg_notify('post_save', '{\"wake\":\"ledger\"}');\n    END IF;"
                .to_owned()
        }
        Mode::Notify => String::new(),
    };
    TEMPLATE
        .replace("{{function}}", &function_name(&watch.table))
        .replace("{{sender_comment}}", &watch.table.to_string().replace(['\n', '\r'], " "))
        .replace("{{options}}", &options_line(watch, shape))
        .replace("{{declare}}", declare)
        .replace("{{head}}", &head)
        .replace("{{insert}}", &branch(ops.insert, g.branch(Op::Insert)))
        .replace("{{update}}", &branch(ops.update, g.branch(Op::Update)))
        .replace("{{delete}}", &branch(ops.delete, g.branch(Op::Delete)))
        .replace("{{wake}}", &wake)
}

/// The idempotent DDL that installs (or updates) the capture of `watch`.
pub fn trigger_ddl(watch: &Watch, shape: &TableShape) -> String {
    let table = watch.table.quoted();
    let function = function_name(&watch.table);
    let ops = watch.operations;
    let mut sql = function_sql(watch, shape);
    sql.push_str(&format!(
        "COMMENT ON FUNCTION {function}() IS {};\n",
        quote_literal(&format!("post-save capture for {}", watch.table))
    ));
    for ((op, name), on) in TRIGGERS.iter().zip([ops.insert, ops.update, ops.delete]) {
        let name = quote_ident(name);
        sql.push_str(&format!("DROP TRIGGER IF EXISTS {name} ON {table};\n"));
        if !on {
            continue;
        }
        let level = match (*op, watch.insert_capture) {
            ("insert", InsertCapture::Statement) => " REFERENCING NEW TABLE AS post_save_new\n    FOR EACH STATEMENT",
            _ => "\n    FOR EACH ROW",
        };
        sql.push_str(&format!(
            "CREATE TRIGGER {name} AFTER {} ON {table}{level} EXECUTE FUNCTION {function}();\n\
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name};\n",
            op.to_uppercase()
        ));
    }
    sql
}

/// The DDL of a table captured from the WAL: no trigger; the old row in the WAL of an UPDATE or
/// DELETE when either is captured (`update_fields`, `columns` and `include_old` need it). Its
/// place in the publication is set by [`publication_ddl`].
pub fn wal_ddl(watch: &Watch) -> String {
    let mut sql =
        format!("-- post-save capture for {}: read from the WAL (capture = \"wal\"); no trigger.\n", watch.table);
    sql.push_str(&drop_ddl(&watch.table));
    if watch.operations.update || watch.operations.delete {
        sql.push_str(&format!("ALTER TABLE {} REPLICA IDENTITY FULL;\n", watch.table.quoted()));
    }
    sql
}

/// The DDL that makes the `post_save` publication list exactly the WAL-captured tables (and
/// drops it when there are none and it exists).
fn publication_ddl(config: &Config, exists: bool) -> String {
    let tables: Vec<String> =
        config.watches.iter().filter(|w| w.capture == Capture::Wal).map(|w| w.table.quoted()).collect();
    let publication = quote_ident(crate::wal::PUBLICATION);
    if tables.is_empty() {
        return if exists { format!("DROP PUBLICATION IF EXISTS {publication};\n") } else { String::new() };
    }
    let mut sql = String::new();
    if !exists {
        sql.push_str(&format!("CREATE PUBLICATION {publication} WITH (publish = 'insert, update, delete');\n"));
    }
    sql.push_str(&format!("ALTER PUBLICATION {publication} SET TABLE {};\n", tables.join(", ")));
    sql
}

/// The tables in the `post_save` publication, or `None` when it does not exist.
async fn published(client: &impl GenericClient) -> Result<Option<BTreeSet<TableName>>, tokio_postgres::Error> {
    let exists =
        client.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&crate::wal::PUBLICATION]).await?;
    if exists.is_none() {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&crate::wal::PUBLICATION],
        )
        .await?;
    Ok(Some(rows.iter().map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1))).collect()))
}

/// Fails with [`TriggerError::WalLevel`] when a table is captured from the WAL and the server
/// cannot stream it.
async fn check_wal_level(client: &impl GenericClient, config: &Config) -> Result<(), TriggerError> {
    if !crate::wal::wanted(config) {
        return Ok(());
    }
    let level: String = client.query_one("SELECT current_setting('wal_level')", &[]).await?.get(0);
    if level == "logical" { Ok(()) } else { Err(TriggerError::WalLevel(level)) }
}

/// The DDL that removes the capture of `table`.
pub fn drop_ddl(table: &TableName) -> String {
    format!("DROP FUNCTION IF EXISTS {}() CASCADE;\n", function_name(table))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

struct Generator<'a> {
    watch: &'a Watch,
    shape: &'a TableShape,
    sender: String,
}

impl Generator<'_> {
    /// One IF branch: capture the rows of `op`.
    fn branch(&self, op: Op) -> String {
        match (op, self.watch.insert_capture) {
            (Op::Insert, InsertCapture::Statement) => self.statement_insert(),
            _ => self.row_branch(op),
        }
    }

    /// The start of a notify-mode note, as a SQL expression: `{"sender":…,"op":…,"head":{…}`.
    /// The daemon reads a note as it reads a ledger row; the rest is `,"rows":[…]}` or, for a
    /// row too big for NOTIFY, `,"reread":true,"pk":{…},"update_fields":…}`.
    fn note_start(&self, op: Op) -> String {
        let start = format!(
            "{{\"sender\":{},\"op\":\"{}\",\"head\":",
            serde_json::Value::from(self.watch.table.to_string()),
            op.name()
        );
        format!("{} || v_head::text", quote_literal(&start))
    }

    /// INSERT, per statement: every new row, set-based.
    fn statement_insert(&self) -> String {
        match self.watch.mode {
            // The first CHUNK rows need no numbering; `n` tells whether there are more. A
            // transition table is read in the same order every time, so OFFSET finds the rest.
            Mode::Durable => format!(
                "        INSERT INTO post_save.event (sender, op, n, head, rows)\n        \
                 SELECT {sender}, 'insert', count(*), v_head, json_agg(e.item)\n          \
                 FROM (SELECT {item} AS item FROM post_save_new n LIMIT {CHUNK}) e\n        \
                 HAVING count(*) > 0\n        \
                 RETURNING n INTO v_rows;\n        \
                 IF v_rows = {CHUNK} THEN\n            \
                 INSERT INTO post_save.event (sender, op, n, head, rows)\n            \
                 SELECT {sender}, 'insert', count(*), v_head, json_agg(e.item)\n              \
                 FROM (SELECT {item} AS item, (row_number() OVER () - 1) / {CHUNK} AS chunk\n                      \
                 FROM (SELECT * FROM post_save_new OFFSET {CHUNK}) n) e\n             \
                 GROUP BY e.chunk;\n        \
                 END IF;\n        \
                 v_rows := coalesce(v_rows, 0);",
                sender = self.sender,
                item = self.insert_item("n"),
            ),
            // Rows of at most NOTE_ROW_MAX bytes are packed into notes by a running sum of
            // their lengths: a note holds less than `v_room` plus one row. Longer rows, which
            // are rare, are sent one by one, by reference when even that is too long.
            Mode::Notify => format!(
                "        v_note := {start};\n        \
                 v_room := {room} - octet_length(v_note);\n        \
                 IF v_room <= 0 THEN\n            \
                 {too_big}\n            \
                 RETURN NULL;\n        \
                 END IF;\n        \
                 SELECT count(*) FILTER (WHERE c.chunk < 0) INTO v_big\n          \
                 FROM (SELECT r.chunk, CASE WHEN r.chunk >= 0 THEN pg_notify('post_save', v_note || ',\"rows\":[' || string_agg(r.item, ',') FILTER (WHERE r.chunk >= 0) || ']}}') END\n                  \
                 FROM (SELECT r.item, CASE WHEN octet_length(r.item) <= {NOTE_ROW_MAX}\n                                \
                 THEN sum(CASE WHEN octet_length(r.item) <= {NOTE_ROW_MAX} THEN octet_length(r.item) + 1 END) OVER w / v_room\n                                \
                 ELSE -1 END AS chunk\n                          \
                 FROM (SELECT ({item})::text AS item FROM post_save_new n) r\n                        \
                 WINDOW w AS (ROWS UNBOUNDED PRECEDING)) r\n                 \
                 GROUP BY r.chunk) c;\n        \
                 IF v_big > 0 THEN\n            \
                 PERFORM pg_notify('post_save', e.note)\n               \
                 FROM (SELECT CASE WHEN octet_length(v_note) + octet_length(b.post_save_item) < {fits}\n                                 \
                 THEN v_note || ',\"rows\":[' || b.post_save_item || ']}}'\n                                 \
                 ELSE v_note || ',\"reread\":true,\"pk\":' || b.post_save_pk || '}}' END AS note\n                       \
                 FROM (SELECT ({item})::text AS post_save_item, ({pk})::text AS post_save_pk\n                               \
                 FROM post_save_new n OFFSET 0) b\n                      \
                 WHERE octet_length(b.post_save_item) > {NOTE_ROW_MAX}) e\n              \
                 WHERE octet_length(e.note) < {NOTE_LIMIT};\n        \
                 END IF;",
                start = self.note_start(Op::Insert),
                // the note's start, `,"rows":[`, at most v_room + a row + its comma, `]}`
                room = NOTE_LIMIT - 9 - (NOTE_ROW_MAX + 1) - 2 - 8,
                fits = NOTE_LIMIT - 20,
                too_big = self.too_big(),
                item = self.insert_item("n"),
                pk = self.pk("n"),
            ),
        }
    }

    /// Per row, with NEW and OLD: UPDATE, DELETE, and INSERT when `insert_capture = "row"`.
    fn row_branch(&self, op: Op) -> String {
        let mut sql = String::new();
        let row = if op == Op::Delete { "OLD" } else { "NEW" };
        let changed = if op == Op::Update { "v_changed" } else { "NULL::text[]" };
        if op == Op::Update {
            let diff: Vec<String> = self
                .shape
                .columns
                .iter()
                .map(|c| {
                    let q = quote_ident(&c.name);
                    let cast = if c.text_compare { "::text" } else { "" };
                    format!(
                        "CASE WHEN NEW.{q}{cast} IS DISTINCT FROM OLD.{q}{cast} THEN {} END",
                        quote_literal(&c.name)
                    )
                })
                .collect();
            sql.push_str(&format!(
                "        v_changed := array_remove(ARRAY[{}]::text[], NULL);\n",
                diff.join(",\n                                          ")
            ));
            // No change, or none of the watched columns: no event.
            let mut quiet = "cardinality(v_changed) = 0".to_owned();
            if !self.watch.columns.is_empty() {
                let watched: Vec<String> = self.watch.columns.iter().map(|c| quote_literal(c)).collect();
                quiet.push_str(&format!(" OR NOT (v_changed && ARRAY[{}]::text[])", watched.join(", ")));
            }
            sql.push_str(&format!("        IF {quiet} THEN\n            RETURN NULL;\n        END IF;\n"));
        }
        let old =
            if op == Op::Update && self.watch.include_old { self.instance("OLD") } else { "NULL::json".to_owned() };
        let instance = self.instance(row);
        let pk = self.pk(row);
        let name = op.name();
        match self.watch.mode {
            Mode::Durable => sql.push_str(&format!(
                "        INSERT INTO post_save.event (sender, op, n, head, rows)\n        \
                 VALUES ({sender}, '{name}', 1, v_head,\n                \
                 json_build_array(json_build_array({pk}, {instance}, {old}, {changed})));\n        \
                 v_rows := 1;",
                sender = self.sender,
            )),
            Mode::Notify => sql.push_str(&format!(
                "        v_item := json_build_array({pk}, {instance}, {old}, {changed})::text;\n        \
                 v_note := {start};\n        \
                 IF octet_length(v_note) + octet_length(v_item) < {fits} THEN\n            \
                 PERFORM pg_notify('post_save', v_note || ',\"rows\":[' || v_item || ']}}');\n        \
                 ELSE\n            \
                 v_note := v_note || ',\"reread\":true,\"pk\":' || {pk}::text\n                      \
                 || ',\"update_fields\":' || coalesce(to_json({changed})::text, 'null') || '}}';\n            \
                 IF octet_length(v_note) < {NOTE_LIMIT} THEN\n                \
                 PERFORM pg_notify('post_save', v_note);\n            \
                 ELSE\n                \
                 {too_big}\n            \
                 END IF;\n        \
                 END IF;",
                start = self.note_start(op),
                fits = NOTE_LIMIT - 20,
                too_big = self.too_big(),
            )),
        }
        sql
    }

    /// What a notify capture does when even a note without rows is over NOTIFY's limit (an
    /// enormous `post_save.actor`): the save commits, its event is not sent, the client is told.
    fn too_big(&self) -> String {
        let message = format!(
            "post-save: saves of {} not sent: their event head is over NOTIFY's {NOTE_LIMIT}-byte limit (is post_save.actor that long?)",
            self.watch.table
        );
        format!("RAISE WARNING '%', {};", quote_literal(&message))
    }

    /// The row as JSON, redacted columns left out.
    fn instance(&self, alias: &str) -> String {
        // The whole row of a FROM alias is `alias.*`: a bare `alias` would mean a column of the
        // same name if the table has one (a transition-table alias `n` and a column `n`).
        let whole = if alias == "NEW" || alias == "OLD" { alias.to_owned() } else { format!("{alias}.*") };
        let redact = &self.watch.redact;
        if redact.is_empty() {
            return format!("row_to_json({whole})");
        }
        let kept: Vec<&Column> = self.shape.columns.iter().filter(|c| !redact.contains(&c.name)).collect();
        if kept.len() > MAX_BUILD_COLUMNS {
            let gone: Vec<String> = redact.iter().map(|c| quote_literal(c)).collect();
            return format!("(to_jsonb({whole}) - ARRAY[{}]::text[])::json", gone.join(", "));
        }
        let pairs: Vec<String> =
            kept.iter().map(|c| format!("{}, {alias}.{}", quote_literal(&c.name), quote_ident(&c.name))).collect();
        format!("json_build_object({})", pairs.join(", "))
    }

    /// One row of a set-based INSERT capture in the ledger: the instance alone, its primary key
    /// read from it by the head's `keys`; the full `[pk, instance, old, update_fields]` item when
    /// a key column is left out of the instance.
    fn insert_item(&self, alias: &str) -> String {
        if self.shape.pk.iter().any(|c| self.watch.redact.contains(c)) {
            return format!("json_build_array({}, {}, NULL::json, NULL::text[])", self.pk(alias), self.instance(alias));
        }
        self.instance(alias)
    }

    /// The primary-key column names, as JSON for the head.
    fn keys(&self) -> String {
        let keys = serde_json::Value::from(self.shape.pk.clone()).to_string();
        format!("{}::json", quote_literal(&keys))
    }

    fn pk(&self, alias: &str) -> String {
        let pairs: Vec<String> =
            self.shape.pk.iter().map(|c| format!("{}, {alias}.{}", quote_literal(c), quote_ident(c))).collect();
        format!("json_build_object({})", pairs.join(", "))
    }
}

/// The statement `post-save backfill` runs: a synthetic `raw = true` insert event for every
/// row of `watch`'s table matching `filter` (SQL, the operator's own; `TRUE` when absent),
/// written to the ledger in chunks of [`CHUNK`] rows, in primary-key order. Returns the number
/// of events through `RETURNING n`. Redacted columns are left out, as in the capture.
pub fn backfill_sql(watch: &Watch, shape: &TableShape, filter: Option<&str>) -> String {
    let g = Generator { watch, shape, sender: quote_literal(&watch.table.to_string()) };
    let order: Vec<String> = shape.pk.iter().map(|c| format!("n.{}", quote_ident(c))).collect();
    format!(
        "INSERT INTO post_save.event (sender, op, n, head, rows)\n\
         SELECT {sender}, 'insert', count(*), \
                json_build_object('raw', true, 'txid', txid_current(), 'at', clock_timestamp(), \
                  'actor', json_build_object('role', current_user::text, 'application_name', current_setting('application_name'), \
                    'client_addr', inet_client_addr(), 'pid', pg_backend_pid(), 'actor', 'post-save backfill'), \
                  'origin', NULL), \
                json_agg(e.item ORDER BY e.position)\n\
           FROM (SELECT json_build_array({pk}, {instance}, NULL::json, NULL::text[]) AS item, \
                        row_number() OVER (ORDER BY {order}) AS position\n\
                   FROM {table} n WHERE ({filter})) e\n\
          GROUP BY (e.position - 1) / {CHUNK}\n\
          ORDER BY (e.position - 1) / {CHUNK}\n\
         RETURNING n",
        sender = g.sender,
        pk = g.pk("n"),
        instance = g.instance("n"),
        order = order.join(", "),
        table = watch.table.quoted(),
        filter = filter.unwrap_or("TRUE"),
    )
}

/// The DDL for every watched table, and for removing the capture of tables no longer watched.
pub async fn plan(client: &impl GenericClient, config: &Config) -> Result<String, TriggerError> {
    let mut sql = String::new();
    for watch in &config.watches {
        let shape = table_shape(client, watch).await?;
        match watch.capture {
            Capture::Trigger => sql.push_str(&trigger_ddl(watch, &shape)),
            Capture::Wal => sql.push_str(&wal_ddl(watch)),
        }
    }
    for table in installed(client).await?.into_keys() {
        if config.watch(&table).is_none() {
            sql.push_str(&drop_ddl(&table));
        }
    }
    sql.push_str(&publication_ddl(config, published(client).await?.is_some()));
    Ok(sql)
}

/// Makes the database match the config, in one transaction. Returns the DDL run.
pub async fn install(client: &mut Client, config: &Config) -> Result<String, TriggerError> {
    check_wal_level(&*client, config).await?;
    let tx = client.transaction().await?;
    let sql = plan(&tx, config).await?;
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    // The slot starts keeping saves from here on; a slot cannot be made in a transaction that
    // wrote, so it comes after the commit.
    if crate::wal::wanted(config) {
        let dbname: String = client.query_one("SELECT current_database()::text", &[]).await?.get(0);
        crate::wal::ensure_slot(client, &crate::wal::slot_name(&dbname)).await?;
    }
    Ok(sql)
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
    if let Some(wal_tables) = published(&tx).await? {
        tables.extend(wal_tables.into_iter().filter(|t| !tables.contains(t)).collect::<Vec<_>>());
        sql.push_str(&format!("DROP PUBLICATION IF EXISTS {};\n", quote_ident(crate::wal::PUBLICATION)));
    }
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    // The slot would keep WAL forever once nothing reads it.
    let dbname: String = client.query_one("SELECT current_database()::text", &[]).await?.get(0);
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&crate::wal::slot_name(&dbname)],
        )
        .await?;
    Ok(tables)
}

/// Every difference between the installed captures and the config; empty when in sync.
pub async fn check(client: &impl GenericClient, config: &Config) -> Result<Vec<Drift>, TriggerError> {
    let mut found = installed(client).await?;
    let mut drift = Vec::new();
    let mut published = published(client).await?.unwrap_or_default();
    let slot = if crate::wal::wanted(config) {
        let dbname: String = client.query_one("SELECT current_database()::text", &[]).await?.get(0);
        let slot = crate::wal::slot_name(&dbname);
        let exists = client.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?;
        Some((slot, exists.is_some()))
    } else {
        None
    };
    for watch in &config.watches {
        let shape = match table_shape(client, watch).await {
            Ok(shape) => shape,
            Err(TriggerError::NoTable(t)) => {
                drift.push(Drift::NoTable(t));
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
            if !published.remove(&watch.table) {
                what.push(format!("not in the `{}` publication", crate::wal::PUBLICATION));
            }
            if watch.operations.update || watch.operations.delete {
                let full: bool = client
                    .query_one(
                        "SELECT relreplident = 'f' FROM pg_class WHERE oid = to_regclass($1)",
                        &[&watch.table.quoted()],
                    )
                    .await?
                    .get(0);
                if !full {
                    what.push("REPLICA IDENTITY is not FULL".to_owned());
                }
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
        if let Some(what) = have.differs(watch, &shape) {
            drift.push(Drift::Changed { table: watch.table.clone(), what });
        }
    }
    drift.extend(found.into_keys().map(Drift::Unwatched));
    drift.extend(published.into_iter().map(Drift::UnwatchedPublished));
    Ok(drift)
}

/// The capture installed on one table.
#[derive(Debug, PartialEq, Eq)]
struct Installed {
    triggers: BTreeSet<String>,
    always: bool,
    function: String,
    body: String,
}

impl Installed {
    fn differs(&self, watch: &Watch, shape: &TableShape) -> Option<String> {
        let mut what = Vec::new();
        let ops = watch.operations;
        let want: BTreeSet<String> = TRIGGERS
            .iter()
            .zip([ops.insert, ops.update, ops.delete])
            .filter(|(_, on)| *on)
            .map(|((_, name), _)| (*name).to_owned())
            .collect();
        if self.triggers != want {
            let missing: Vec<&str> = want.difference(&self.triggers).map(String::as_str).collect();
            let extra: Vec<&str> = self.triggers.difference(&want).map(String::as_str).collect();
            let mut parts = vec!["operations".to_owned()];
            if !missing.is_empty() {
                parts.push(format!("missing {}", missing.join(", ")));
            }
            if !extra.is_empty() {
                parts.push(format!("not wanted {}", extra.join(", ")));
            }
            what.push(parts.join(": "));
        }
        if !self.always {
            what.push("not enabled ALWAYS".to_owned());
        }
        let expected = function_sql(watch, shape);
        let body = expected.split("$capture$").nth(1).unwrap_or_default();
        if self.function != function_ident(&watch.table) {
            what.push("capture function renamed".to_owned());
        } else if self.body != body {
            let line = |text: &str| text.lines().find_map(|l| l.trim().strip_prefix("-- options: ")).map(str::to_owned);
            let changes = match (line(&self.body), line(body)) {
                (Some(have), Some(want)) => option_changes(&have, &want),
                _ => Vec::new(),
            };
            if changes.is_empty() {
                what.push("the table's columns changed".to_owned());
            } else {
                what.extend(changes);
            }
        }
        (!what.is_empty()).then(|| what.join("; "))
    }
}

async fn installed(client: &impl GenericClient) -> Result<BTreeMap<TableName, Installed>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, t.tgname::text, t.tgenabled::text, \
                    p.proname::text, p.prosrc \
               FROM pg_trigger t \
               JOIN pg_class c ON c.oid = t.tgrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               JOIN pg_proc p ON p.oid = t.tgfoid \
               JOIN pg_namespace pn ON pn.oid = p.pronamespace \
              WHERE pn.nspname = 'post_save' AND p.proname LIKE 'capture\\_%' AND NOT t.tgisinternal",
            &[],
        )
        .await?;
    let mut out: BTreeMap<TableName, Installed> = BTreeMap::new();
    for row in rows {
        let table = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        let entry = out.entry(table).or_insert_with(|| Installed {
            triggers: BTreeSet::new(),
            always: true,
            function: row.get(4),
            body: row.get(5),
        });
        entry.triggers.insert(row.get(2));
        entry.always &= row.get::<_, String>(3) == "A";
    }
    Ok(out)
}

/// The columns and primary key of a watched table, after checking that every column the config
/// names exists.
pub async fn table_shape(client: &impl GenericClient, watch: &Watch) -> Result<TableShape, TriggerError> {
    let rows = client
        .query(
            "SELECT a.attname::text, \
                    NOT EXISTS (SELECT 1 FROM pg_operator op \
                                 WHERE op.oprname = '=' AND op.oprleft = b.t AND op.oprright = b.t), \
                    array_position(i.indkey::int2[], a.attnum) \
               FROM pg_attribute a \
               JOIN pg_type ty ON ty.oid = a.atttypid \
               CROSS JOIN LATERAL (SELECT CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE a.atttypid END AS t0) d \
               JOIN pg_type bt ON bt.oid = d.t0 \
               CROSS JOIN LATERAL (SELECT CASE WHEN bt.typcategory = 'A' AND bt.typelem <> 0 THEN bt.typelem ELSE d.t0 END AS t) b \
               LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
              ORDER BY a.attnum",
            &[&watch.table.quoted()],
        )
        .await?;
    if rows.is_empty() {
        return Err(TriggerError::NoTable(watch.table.clone()));
    }
    let columns: Vec<Column> = rows.iter().map(|r| Column { name: r.get(0), text_compare: r.get(1) }).collect();
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
    Ok(TableShape { columns, pk })
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
        let col = |name: &str, text_compare| Column { name: name.to_owned(), text_compare };
        let shop = TableShape {
            columns: vec![col("id", false), col("user_id", false), col("product", false)],
            pk: vec!["id".to_owned()],
        };
        let items = TableShape {
            columns: vec![
                col("Order Id", false),
                col("line", false),
                col("Unit €", false),
                col("it's", false),
                col("say \"hi\"", false),
                col("meta", true),
            ],
            pk: vec!["Order Id".to_owned(), "line".to_owned()],
        };
        let sql = format!("{}{}", trigger_ddl(&config.watches[0], &shop), trigger_ddl(&config.watches[1], &items));
        insta::assert_snapshot!(sql);
    }

    #[test]
    fn function_names_are_stable_and_distinct() {
        let a = function_name(&TableName::new("public", "shop_order"));
        assert_eq!(a, function_name(&TableName::new("public", "shop_order")));
        assert_ne!(a, function_name(&TableName::new("public.shop", "order")));
        assert!(a.len() < 63 + 12);
    }
}
