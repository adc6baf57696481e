//! The PL/pgSQL of a table's capture: its function (from `sql/capture_table.sql`), its
//! triggers, and the statement `post-save backfill` runs.
//!
//! The generated function names no column in code: it reads `NEW` and `OLD` whole, as JSON,
//! and compares values as JSON, so an `ALTER TABLE` or a column type without an `=` operator
//! (hstore, PostGIS, a user type) can never make the user's write fail. Column names appear only
//! as data: the key, redacted and watched columns, and the table's columns at install time for
//! the UPDATE diff's fast path. A name made stale by a rename is found again by attribute number
//! (`post_save.column_names`); a changed column the function does not know sends the diff to
//! `post_save.changed_columns`.

use crate::config::{InsertCapture, Mode, Watch};
use crate::name::{array_literal, quote_ident, quote_literal};

use super::triggers::NEW_TABLE;
use super::{CAPTURE_FORMAT, CHUNK, TableShape, function_name};

/// The template of a table's capture function.
const TEMPLATE: &str = include_str!("../../sql/capture_table.sql");

/// NOTIFY's payload limit: a payload must be shorter.
const NOTE_LIMIT: usize = 8000;

/// A saved row whose JSON is longer than this travels in a note of its own (or by reference);
/// shorter ones are packed together, so a note stays under [`NOTE_LIMIT`].
const NOTE_ROW_MAX: usize = 1000;

/// The writer's clock in UTC, whatever the session's `TimeZone`: a `timestamp`, which JSON
/// writes without an offset (the daemon adds `+00:00`).
const AT_UTC: &str = "v_at AT TIME ZONE 'UTC'";

/// The options written into each function as a JSON comment line, compared by `check` to say
/// what changed.
pub(super) fn options_line(watch: &Watch, shape: &TableShape) -> String {
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

/// The SQL that creates (or replaces) the capture function of `watch`.
pub fn function_sql(watch: &Watch, shape: &TableShape) -> String {
    let g = Generator::new(watch, shape);
    let ops = watch.operations;
    let moves = shape.partitioned && ops.update;
    let insert = if shape.partitioned || watch.insert_capture == InsertCapture::Row || !ops.insert {
        g.row_insert(ops.insert, moves)
    } else {
        // a statement trigger; the replica row trigger runs the same function
        format!(
            "        IF TG_LEVEL = 'ROW' THEN\n{}\n        ELSE\n{}\n        END IF;",
            indent(&g.row_insert(true, false)),
            indent(&g.statement_insert())
        )
    };
    let declare = match watch.mode {
        Mode::Durable => "",
        Mode::Notify => {
            "\n    v_item   text;\n    v_room   integer;\n    v_big    bigint;\n    v_bytes  bytea;\n    v_parts  integer;\n    v_part   text;"
        }
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
    let function = function_name(&watch.table);
    let parts: [(&str, &dyn std::fmt::Display); 10] = [
        ("function", &function),
        ("options", &options_line(watch, shape)),
        ("keys", &text_array(&shape.pk)),
        ("redact", &text_array(&watch.redact)),
        ("watch", &text_array(&watch.columns)),
        ("declare", &declare),
        ("insert", &insert),
        ("update", &if ops.update { g.row_update() } else { "        NULL;".to_owned() }),
        ("delete", &g.row_delete(ops.delete, moves)),
        ("wake", &wake),
    ];
    // The dollar-quote tag is one the function's text does not hold (a column may be named
    // `$capture$`): the text is filled once without it to find one, then with it.
    let fill_with = |tag: &str| {
        let mut values = parts.to_vec();
        values.push(("tag", &tag));
        // a whole statement: its line ends
        fill(TEMPLATE, &values) + "\n"
    };
    fill_with(&dollar_tag(&fill_with("")))
}

/// A dollar-quote tag that does not occur in `body`: `$capture$`, or `$capture_<n>$` when a name
/// in the body contains that.
fn dollar_tag(body: &str) -> String {
    (0..)
        .map(|n| if n == 0 { "$capture$".to_owned() } else { format!("$capture_{n}$") })
        .find(|tag| !body.contains(tag.as_str()))
        .expect("some tag is free")
}

/// The body of a function created with a dollar-quoted body, as `pg_proc.prosrc` holds it.
pub(super) fn body_of(sql: &str) -> &str {
    let Some(start) = sql.find("\nAS $capture") else { return "" };
    let rest = &sql[start + 4..];
    let Some(tag_end) = rest[1..].find('$') else { return "" };
    let tag = &rest[..tag_end + 2];
    let body = &rest[tag.len()..];
    body.find(tag).map_or("", |end| &body[..end])
}

/// A `text[]` literal of `items`.
fn text_array(items: &[String]) -> String {
    format!("{}::text[]", quote_literal(&array_literal(items)))
}

/// A `smallint[]` literal of attribute numbers.
fn num_array(nums: &[i16]) -> String {
    let nums: Vec<String> = nums.iter().map(i16::to_string).collect();
    format!("'{{{}}}'::smallint[]", nums.join(","))
}

/// A fragment of a capture function (`sql/capture/*.sql`) with each `{{name}}` replaced by its
/// value, in one pass: a value (a table's name, say) that holds `{{…}}` is never read again. The
/// file's last newline is not part of the fragment.
fn fill(template: &str, values: &[(&str, &dyn std::fmt::Display)]) -> String {
    let template = template.strip_suffix('\n').unwrap_or(template);
    let mut sql = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        sql.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").expect("a placeholder of a capture fragment is closed");
        let name = &after[..close];
        let (_, value) = values.iter().find(|(n, _)| *n == name).expect("every placeholder has a value");
        sql.push_str(&value.to_string());
        rest = &after[close + 2..];
    }
    sql.push_str(rest);
    sql
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
#[test]
fn a_value_that_looks_like_a_placeholder_is_not_filled_again() {
    let sql = fill("a {{x}} b {{y}}\n", &[("x", &"{{y}}"), ("y", &1)]);
    assert_eq!(sql, "a {{y}} b 1");
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

impl<'a> Generator<'a> {
    fn new(watch: &'a Watch, shape: &'a TableShape) -> Self {
        Generator { watch, shape, sender: quote_literal(&watch.table.to_string()) }
    }

    /// The relation whose attribute numbers the function was generated with.
    fn rel(&self) -> &'static str {
        if self.shape.partitioned { "coalesce(pg_partition_root(TG_RELID)::oid, TG_RELID)" } else { "TG_RELID" }
    }

    fn attnums(&self, names: &[String]) -> Vec<i16> {
        names.iter().map(|n| self.shape.columns.iter().find(|c| &c.name == n).map_or(0, |c| c.num)).collect()
    }

    /// The current names of the key, redacted and watched columns, by attribute number.
    fn resolve_lists(&self, with_watch: bool) -> String {
        let mut sql = format!(
            "v_keys := post_save.column_names({rel}, v_keys, {nums});\n",
            rel = self.rel(),
            nums = num_array(&self.attnums(&self.shape.pk))
        );
        for (var, list) in [("v_redact", &self.watch.redact), ("v_watch", &self.watch.columns)] {
            if !list.is_empty() && (with_watch || var != "v_watch") {
                sql.push_str(&format!(
                    "{var} := post_save.column_names({rel}, {var}, {nums});\n",
                    rel = self.rel(),
                    nums = num_array(&self.attnums(list))
                ));
            }
        }
        sql
    }

    /// Per row: the names are current when `row` has every one of them (a jsonb key test);
    /// otherwise a rename made one stale.
    fn resolve_from(&self, row: &str) -> String {
        let mut names: Vec<String> = self.shape.pk.clone();
        names.extend(self.watch.redact.iter().cloned());
        names.extend(self.watch.columns.iter().cloned());
        names.sort();
        names.dedup();
        format!(
            "        IF NOT ({row} ?& {}) THEN\n{}        END IF;\n",
            text_array(&names),
            self.resolve_lists(true).lines().map(|l| format!("            {l}\n")).collect::<String>()
        )
    }

    /// What the events of one ledger row (or note) share; `keys` tells the daemon where a
    /// set-based INSERT's rows keep their key.
    fn head_sql(&self) -> String {
        format!(
            "        v_head := json_build_object('raw', v_raw, 'txid', v_txid, 'at', {AT_UTC}, 'actor', v_actor,\n                                    'origin', v_origin, 'keys', to_json(v_keys));\n"
        )
    }

    /// The primary key of a row image, in key order.
    fn pk(&self, row: &str) -> String {
        let n = self.shape.pk.len();
        let pairs: Vec<String> = (1..=n).map(|i| format!("v_keys[{i}], {row} -> v_keys[{i}]")).collect();
        format!(
            "CASE WHEN cardinality(v_keys) = {n} THEN json_build_object({}) ELSE post_save.key_of({row}, v_keys) END",
            pairs.join(", ")
        )
    }

    /// The row as JSON, redacted columns left out: `record` is `NEW` or `OLD` when the row is
    /// one, `image` its jsonb.
    fn instance(&self, record: Option<&str>, image: &str) -> String {
        match record {
            Some(record) if self.watch.redact.is_empty() => format!("row_to_json({record})"),
            _ if self.watch.redact.is_empty() => format!("{image}::json"),
            _ => format!("({image} - v_redact)::json"),
        }
    }

    /// INSERT, per statement: every new row, set-based.
    fn statement_insert(&self) -> String {
        let mut names: Vec<String> = self.shape.pk.clone();
        names.extend(self.watch.redact.iter().cloned());
        names.sort();
        names.dedup();
        // The catalog tells whether a key or redacted column was renamed since install: its
        // name by attribute number, read from the caches by a function call. Reading the first
        // new row instead (as JSON) took a query of its own, about 7 µs per statement.
        let nums = self.attnums(&names);
        let found: Vec<String> = nums
            .iter()
            .map(|num| {
                format!(
                    "(pg_identify_object_as_address('pg_class'::regclass, {rel}, {num})).object_names[3]",
                    rel = self.rel()
                )
            })
            .collect();
        let mut sql = format!(
            "        IF ARRAY[{}]::text[] IS DISTINCT FROM {} THEN\n",
            found.join(",\n                 "),
            text_array(&names)
        );
        for line in self.resolve_lists(false).lines() {
            sql.push_str(&format!("            {line}\n"));
        }
        sql.push_str("        END IF;\n");
        sql.push_str(&self.head_sql());
        let item = self.insert_item("v_keys", "v_redact");
        let body = match self.watch.mode {
            // The first CHUNK rows need no numbering; `n` tells whether there are more. A
            // transition table is read in the same order every time, so OFFSET finds the rest.
            Mode::Durable => fill(
                include_str!("../../sql/capture/insert_statement_durable.sql"),
                &[("sender", &self.sender), ("item", &item), ("NEW_TABLE", &NEW_TABLE), ("CHUNK", &CHUNK)],
            ),
            // Rows of at most NOTE_ROW_MAX bytes are packed into notes by a running sum of
            // their lengths: a note holds less than `v_room` plus one row. Longer rows, which
            // are rare, are sent one by one, by reference when even that is too long.
            Mode::Notify => fill(
                include_str!("../../sql/capture/insert_statement_notify.sql"),
                &[
                    ("start", &self.note_start(Op::Insert)),
                    ("room", &(NOTE_LIMIT - 9 - (NOTE_ROW_MAX + 1) - 2 - 8)),
                    ("too_big", &self.too_big()),
                    ("NOTE_ROW_MAX", &NOTE_ROW_MAX),
                    ("item", &item),
                    ("NEW_TABLE", &NEW_TABLE),
                    ("fits", &(NOTE_LIMIT - 20)),
                    ("NOTE_LIMIT", &NOTE_LIMIT),
                ],
            ),
        };
        sql.push_str(&body);
        sql
    }

    /// One row of a set-based INSERT capture: the instance alone, its primary key read from it
    /// by the head's `keys`; the full `[pk, instance, old, update_fields]` item when a key column
    /// is left out of the instance.
    fn insert_item(&self, keys: &str, redact: &str) -> String {
        let redacted = &self.watch.redact;
        let instance = if redacted.is_empty() {
            "row_to_json(n.*)".to_owned()
        } else {
            format!("(to_jsonb(n.*) - {redact})::json")
        };
        if self.shape.pk.iter().any(|c| redacted.contains(c)) {
            return format!(
                "json_build_array(post_save.key_of(to_jsonb(n.*), {keys}), {instance}, NULL::json, NULL::text[])"
            );
        }
        instance
    }

    /// INSERT, per row (`insert_capture = "row"`, partitioned tables, rows applied by logical
    /// replication). With `moves`, the INSERT half of a row moved between partitions is an
    /// update; `captured` says whether plain inserts are.
    fn row_insert(&self, captured: bool, moves: bool) -> String {
        let mut insert = String::new();
        if captured {
            insert.push_str(&self.resolve_from("v_new"));
            insert.push_str(&self.head_sql());
            insert.push_str(&self.emit(
                Op::Insert,
                &self.pk("v_new"),
                &self.instance(Some("NEW"), "v_new"),
                "NULL::json",
                "NULL::text[]",
            ));
        } else {
            insert.push_str("        NULL;");
        }
        if !moves {
            return format!("        v_new := to_jsonb(NEW);\n{insert}");
        }
        fill(
            include_str!("../../sql/capture/insert_row_moved.sql"),
            &[
                ("moving", &self.moving()),
                ("update", &indent(&self.update_core(Some("NEW"), None))),
                ("insert", &indent(&insert)),
            ],
        )
    }

    /// Whether this row trigger runs for a row an UPDATE through the partitioned parent moves.
    fn moving(&self) -> String {
        let here = "coalesce(pg_partition_root(TG_RELID)::oid, TG_RELID)::text || ':' || pg_trigger_depth()";
        format!(
            "current_setting('post_save.moving', true) = {here}\n           \
             AND current_setting('post_save.nomove', true) IS DISTINCT FROM {here}"
        )
    }

    /// UPDATE, per row.
    fn row_update(&self) -> String {
        format!(
            "        v_new := to_jsonb(NEW);\n        v_old := to_jsonb(OLD);\n{}",
            self.update_core(Some("NEW"), Some("OLD"))
        )
    }

    /// An update from `v_new` and `v_old` (and the row records, where the trigger has them).
    fn update_core(&self, new_record: Option<&str>, old_record: Option<&str>) -> String {
        let mut sql = self.resolve_from("v_new");
        let diff: Vec<String> = self
            .shape
            .columns
            .iter()
            .map(|c| {
                let name = quote_literal(&c.name);
                format!("CASE WHEN v_new -> {name} IS DISTINCT FROM v_old -> {name} THEN {name} END")
            })
            .collect();
        let known = if diff.is_empty() {
            "ARRAY[]::text[]".to_owned()
        } else {
            format!("ARRAY[{}]::text[]", diff.join(",\n                                          "))
        };
        let names: Vec<String> = self.shape.columns.iter().map(|c| c.name.clone()).collect();
        // Only a column added or renamed since install is left once the known names are taken
        // out; that one minus is cheaper than the two of the full comparison it guards.
        sql.push_str(&fill(
            include_str!("../../sql/capture/update_changed.sql"),
            &[("known", &known), ("names", &text_array(&names))],
        ));
        if !self.watch.columns.is_empty() {
            sql.push_str("        IF NOT (v_changed && v_watch) THEN\n            RETURN NULL;\n        END IF;\n");
        }
        sql.push_str(&self.head_sql());
        let old = if self.watch.include_old { self.instance(old_record, "v_old") } else { "NULL::json".to_owned() };
        sql.push_str(&self.emit(Op::Update, &self.pk("v_new"), &self.instance(new_record, "v_new"), &old, "v_changed"));
        sql
    }

    /// DELETE, per row. With `moves`, the DELETE half of a row moved between partitions is kept
    /// for the INSERT half; `captured` says whether plain deletes are.
    fn row_delete(&self, captured: bool, moves: bool) -> String {
        let mut sql = String::new();
        if moves {
            sql.push_str(&format!(
                "        IF {} THEN\n            \
                 PERFORM set_config('post_save.moved', to_jsonb(OLD)::text, true);\n            \
                 RETURN NULL;\n        \
                 END IF;\n",
                self.moving()
            ));
        }
        if !captured {
            sql.push_str("        NULL;");
            return sql;
        }
        sql.push_str("        v_old := to_jsonb(OLD);\n");
        sql.push_str(&self.resolve_from("v_old"));
        sql.push_str(&self.head_sql());
        sql.push_str(&self.emit(
            Op::Delete,
            &self.pk("v_old"),
            &self.instance(Some("OLD"), "v_old"),
            "NULL::json",
            "NULL::text[]",
        ));
        sql
    }

    /// Writes one row's event: a ledger row, or a note.
    fn emit(&self, op: Op, pk: &str, instance: &str, old: &str, changed: &str) -> String {
        let name = op.name();
        match self.watch.mode {
            Mode::Durable => fill(
                include_str!("../../sql/capture/emit_durable.sql"),
                &[
                    ("sender", &self.sender),
                    ("name", &name),
                    ("pk", &pk),
                    ("instance", &instance),
                    ("old", &old),
                    ("changed", &changed),
                ],
            ),
            Mode::Notify => {
                // A row too big for one note: an insert or update is read again by its key; a
                // deleted row cannot be, so it travels in parts the daemon joins.
                let too_long = if op == Op::Delete {
                    self.parts()
                } else {
                    fill(
                        include_str!("../../sql/capture/emit_notify_reread.sql"),
                        &[
                            ("pk", &pk),
                            ("changed", &changed),
                            ("NOTE_LIMIT", &NOTE_LIMIT),
                            ("too_big", &self.too_big()),
                        ],
                    )
                };
                fill(
                    include_str!("../../sql/capture/emit_notify.sql"),
                    &[
                        ("pk", &pk),
                        ("instance", &instance),
                        ("old", &old),
                        ("changed", &changed),
                        ("start", &self.note_start(op)),
                        ("fits", &(NOTE_LIMIT - 20)),
                        ("too_long", &too_long),
                    ],
                )
            }
        }
    }

    /// Sends `v_item` in numbered parts: `…,"part":[i,n,"<txid>.<k>"],"data":"<base64>"}`. The
    /// parts of one transaction reach the daemon together and in order; `k` counts the rows sent
    /// in parts in this transaction, so the parts of two rows are never folded together.
    fn parts(&self) -> String {
        fill(
            include_str!("../../sql/capture/emit_notify_parts.sql"),
            &[("limit", &(NOTE_LIMIT - 100)), ("too_big", &self.too_big())],
        )
    }

    /// The start of a notify-mode note, as a SQL expression: `{"sender":…,"op":…,"head":{…}`.
    /// The daemon reads a note as it reads a ledger row; the rest is `,"rows":[…]}`, for a row
    /// too big for NOTIFY `,"reread":true,"pk":{…},"update_fields":…}`, or one of its parts.
    fn note_start(&self, op: Op) -> String {
        let start = format!(
            "{{\"sender\":{},\"op\":\"{}\",\"head\":",
            serde_json::Value::from(self.watch.table.to_string()),
            op.name()
        );
        format!("{} || v_head::text", quote_literal(&start))
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
}

/// The statement `post-save backfill` runs: a synthetic `raw = true` insert event for every
/// row of `watch`'s table matching `filter` (SQL, the operator's own; `TRUE` when absent),
/// written to the ledger in chunks of [`CHUNK`] rows, in primary-key order. Returns the number
/// of events through `RETURNING n`. Redacted columns are left out, as in the capture.
pub fn backfill_sql(watch: &Watch, shape: &TableShape, filter: Option<&str>) -> String {
    let order: Vec<String> = shape.pk.iter().map(|c| format!("n.{}", quote_ident(c))).collect();
    let instance = if watch.redact.is_empty() {
        "row_to_json(n.*)".to_owned()
    } else {
        format!("(to_jsonb(n.*) - {})::json", text_array(&watch.redact))
    };
    format!(
        "INSERT INTO post_save.event (sender, op, n, head, rows)\n\
         SELECT {sender}, 'insert', count(*), \
                json_build_object('raw', true, 'txid', txid_current(), 'at', {at}, \
                  'actor', json_build_object('role', current_user::text, 'application_name', current_setting('application_name'), \
                    'client_addr', inet_client_addr(), 'pid', pg_backend_pid(), 'actor', 'post-save backfill'), \
                  'origin', NULL), \
                json_agg(e.item ORDER BY e.position)\n\
           FROM (SELECT json_build_array(post_save.key_of(to_jsonb(n.*), {keys}), {instance}, NULL::json, NULL::text[]) AS item, \
                        row_number() OVER (ORDER BY {order}) AS position\n\
                   FROM {table} n WHERE ({filter})) e\n\
          GROUP BY (e.position - 1) / {CHUNK}\n\
          ORDER BY (e.position - 1) / {CHUNK}\n\
         RETURNING n",
        sender = quote_literal(&watch.table.to_string()),
        at = AT_UTC.replace("v_at", "clock_timestamp()"),
        keys = text_array(&shape.pk),
        order = order.join(", "),
        table = watch.table.quoted(),
        filter = filter.unwrap_or("TRUE"),
    )
}
