//! The trigger capture under schema changes (issue 22): a running `post-save run` (the real
//! binary, a `log` handler writing every event as JSON), then `ALTER TABLE` on a watched table,
//! then more saves from a writer session that was open before the change, as an application's
//! pooled connection is. Every write must succeed and every save must reach the handler once, in
//! the table's new shape, in both trigger modes.
//!
//! The writer's saves use the simple query protocol (`batch_execute`), so an error is the
//! capture's, never a prepared statement's of the test.

use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::support::db::{TestDb, error_chain};
use crate::support::{BinaryDaemon, observer_handlers, post_save_on};

/// The watched table. `code` and `note` are there to be retyped, dropped and renamed.
const ITEM: &str = "CREATE TABLE item (id integer PRIMARY KEY, name text NOT NULL, \
                    qty integer NOT NULL DEFAULT 1, code integer, note text)";

/// Each case runs once per trigger mode: `<case>::durable` and `<case>::notify`.
macro_rules! in_both_modes {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn durable() {
                super::$case("durable").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn notify() {
                super::$case("notify").await;
            }
        }
    )*};
}

in_both_modes!(
    adding_a_column,
    dropping_a_column,
    renaming_a_column,
    renaming_the_key_column,
    changing_column_types,
    renaming_the_table,
    moving_the_table_to_another_schema,
    dropping_another_watched_table,
);

/// A running daemon and a writer session that has already saved through the capture.
struct Case {
    db: TestDb,
    daemon: BinaryDaemon,
    writer: Client,
}

/// `item` (and the other `tables`, made by `setup`), watched in `mode`; row 1 of `item` inserted
/// and updated by the writer session, and both events received: the capture has run in that
/// session before the schema changes.
async fn running(mode: &str, setup: &str, tables: &[&str]) -> Case {
    let db = TestDb::new().await;
    db.psql_ok(ITEM);
    if !setup.is_empty() {
        db.psql_ok(setup);
    }
    let mut config = String::new();
    for table in ["public.item"].iter().chain(tables) {
        config.push_str(&format!(
            "[[watch]]\ntable = \"{table}\"\nmode = \"{mode}\"\noperations = [\"insert\", \"update\", \"delete\"]\n\n"
        ));
    }
    config.push_str(&observer_handlers(true));
    let mut daemon = BinaryDaemon::install_and_start(&db, &config).await;
    let writer = db.client().await;
    let failed = write_all(
        &writer,
        &[
            "INSERT INTO item (id, name, qty, code, note) VALUES (1, 'first', 1, 1, 'a')",
            "UPDATE item SET qty = 2 WHERE id = 1",
        ],
    )
    .await;
    assert!(failed.is_empty(), "writes failed before any schema change: {failed:#?}");
    let (created, updated) = (daemon.next().await, daemon.next().await);
    assert_eq!((created["op"].as_str(), updated["op"].as_str()), (Some("insert"), Some("update")));
    assert_eq!(updated["update_fields"], json!(["qty"]));
    Case { db, daemon, writer }
}

/// Runs each of `writes` on `writer`; returns the ones that failed, with their errors.
async fn write_all(writer: &Client, writes: &[&str]) -> Vec<String> {
    let mut failed = Vec::new();
    for sql in writes {
        if let Err(e) = writer.batch_execute(sql).await {
            failed.push(format!("{sql}: {}", error_chain(&e)));
        }
    }
    failed
}

/// One expected event: its `op` and `pk`.
type Expected = (&'static str, Value);

/// Runs `ddl` (in a session of its own), then `writes` and a final `marker` insert (of the row
/// whose key is `marker_pk`) on the writer session. Asserts that every write succeeded and that
/// exactly the `expected` events and the marker's arrived, each once, and nothing else; returns
/// the expected events.
async fn after(
    case: &mut Case,
    ddl: &str,
    writes: &[&str],
    (marker, marker_pk): (&str, Value),
    expected: &[Expected],
) -> Vec<Value> {
    case.db.psql_ok(ddl);
    let mut all = writes.to_vec();
    all.push(marker);
    let failed = write_all(&case.writer, &all).await;
    assert!(failed.is_empty(), "after `{ddl}`, writes failed: {failed:#?}");

    let marker_event: Expected = ("insert", marker_pk);
    let wanted: Vec<&Expected> = expected.iter().chain([&marker_event]).collect();
    let mut events = case
        .daemon
        .until(&format!("the events of the saves after `{ddl}`"), |events| {
            wanted.iter().all(|(op, pk)| events.iter().any(|e| e["op"] == *op && e["pk"] == *pk))
        })
        .await;
    // Ordering holds per row only: take what has arrived by now too, and count exact totals.
    events.extend(case.daemon.drain());
    for (op, pk) in &wanted {
        let n = events.iter().filter(|e| e["op"] == *op && e["pk"] == *pk).count();
        assert_eq!(n, 1, "after `{ddl}`: {n} {op} events of {pk}, want exactly 1:\n{}", shown(&events));
    }
    assert_eq!(events.len(), wanted.len(), "after `{ddl}`: unexpected events:\n{}", shown(&events));
    events.retain(|e| !(e["op"] == "insert" && e["pk"] == marker_event.1));
    events
}

/// The event of `op` on the row with key `pk`.
fn event<'a>(events: &'a [Value], op: &str, pk: &Value) -> &'a Value {
    events.iter().find(|e| e["op"] == op && e["pk"] == *pk).unwrap_or_else(|| panic!("no {op} of {pk}"))
}

fn shown(events: &[Value]) -> String {
    events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
}

/// The marker save of most cases: a new row of `item`, keyed by `id`.
fn marker() -> (&'static str, Value) {
    ("INSERT INTO item (id, name) VALUES (1000, 'marker')", json!({"id": 1000}))
}

/// An UPDATE that changes only the new column has an event whose `update_fields` is that
/// column; inserts carry it.
async fn adding_a_column(mode: &str) {
    let mut case = running(mode, "", &[]).await;
    let events = after(
        &mut case,
        "ALTER TABLE item ADD COLUMN color text",
        &[
            "INSERT INTO item (id, name, color) VALUES (2, 'second', 'red')",
            "UPDATE item SET color = 'blue' WHERE id = 1",
        ],
        marker(),
        &[("insert", json!({"id": 2})), ("update", json!({"id": 1}))],
    )
    .await;
    assert_eq!(event(&events, "insert", &json!({"id": 2}))["instance"]["color"], "red");
    let updated = event(&events, "update", &json!({"id": 1}));
    assert_eq!(updated["instance"]["color"], "blue", "{updated}");
    assert_eq!(updated["update_fields"], json!(["color"]), "{updated}");
    case.daemon.stop().await;
}

/// Saves after a DROP COLUMN succeed (the capture does not name the column any more) and their
/// instances lack it.
async fn dropping_a_column(mode: &str) {
    let mut case = running(mode, "", &[]).await;
    let events = after(
        &mut case,
        "ALTER TABLE item DROP COLUMN note",
        &["INSERT INTO item (id, name) VALUES (2, 'second')", "UPDATE item SET qty = 3 WHERE id = 1"],
        marker(),
        &[("insert", json!({"id": 2})), ("update", json!({"id": 1}))],
    )
    .await;
    for e in &events {
        assert!(e["instance"].get("note").is_none(), "the dropped column is still there: {e}");
        assert_eq!(e["instance"]["name"], if e["op"] == "insert" { "second" } else { "first" }, "{e}");
    }
    let updated = event(&events, "update", &json!({"id": 1}));
    assert_eq!(updated["instance"]["qty"], 3, "{updated}");
    assert_eq!(updated["update_fields"], json!(["qty"]), "{updated}");
    case.daemon.stop().await;
}

/// After RENAME COLUMN, instances and `update_fields` use the new name.
async fn renaming_a_column(mode: &str) {
    let mut case = running(mode, "", &[]).await;
    let events = after(
        &mut case,
        "ALTER TABLE item RENAME COLUMN note TO remark",
        &[
            "INSERT INTO item (id, name, remark) VALUES (2, 'second', 'r2')",
            "UPDATE item SET remark = 'r1' WHERE id = 1",
        ],
        marker(),
        &[("insert", json!({"id": 2})), ("update", json!({"id": 1}))],
    )
    .await;
    for e in &events {
        assert!(e["instance"].get("note").is_none(), "the old name is still there: {e}");
    }
    assert_eq!(event(&events, "insert", &json!({"id": 2}))["instance"]["remark"], "r2");
    let updated = event(&events, "update", &json!({"id": 1}));
    assert_eq!(updated["instance"]["remark"], "r1", "{updated}");
    assert_eq!(updated["update_fields"], json!(["remark"]), "{updated}");
    case.daemon.stop().await;
}

/// After the key column is renamed, `pk` uses the new name, for inserts, updates and deletes.
async fn renaming_the_key_column(mode: &str) {
    let mut case = running(mode, "", &[]).await;
    let events = after(
        &mut case,
        "ALTER TABLE item RENAME COLUMN id TO ident",
        &[
            "INSERT INTO item (ident, name) VALUES (5, 'fifth')",
            "UPDATE item SET qty = 7 WHERE ident = 5",
            "DELETE FROM item WHERE ident = 1",
        ],
        ("INSERT INTO item (ident, name) VALUES (1000, 'marker')", json!({"ident": 1000})),
        &[("insert", json!({"ident": 5})), ("update", json!({"ident": 5})), ("delete", json!({"ident": 1}))],
    )
    .await;
    for e in &events {
        assert!(e["instance"].get("id").is_none(), "the old key name is still there: {e}");
    }
    assert_eq!(event(&events, "insert", &json!({"ident": 5}))["instance"]["ident"], 5);
    let updated = event(&events, "update", &json!({"ident": 5}));
    assert_eq!(updated["update_fields"], json!(["qty"]), "{updated}");
    let deleted = event(&events, "delete", &json!({"ident": 1}));
    assert_eq!(deleted["signal"], "post_delete", "{deleted}");
    assert_eq!(deleted["instance"]["name"], "first", "{deleted}");
    case.daemon.stop().await;
}

/// After ALTER COLUMN … TYPE, values arrive in the new type: a bigint beyond what an integer
/// holds (as a string beyond 2^53, as the event contract says), an integer turned into text.
async fn changing_column_types(mode: &str) {
    let mut case = running(mode, "", &[]).await;
    let events = after(
        &mut case,
        "ALTER TABLE item ALTER COLUMN qty TYPE bigint, ALTER COLUMN code TYPE text USING code::text",
        &[
            "INSERT INTO item (id, name, qty, code) VALUES (2, 'second', 3000000000, 'B-2')",
            "UPDATE item SET qty = 9007199254740993 WHERE id = 1",
        ],
        marker(),
        &[("insert", json!({"id": 2})), ("update", json!({"id": 1}))],
    )
    .await;
    let created = event(&events, "insert", &json!({"id": 2}));
    assert_eq!(created["instance"]["qty"], 3_000_000_000_i64, "{created}");
    assert_eq!(created["instance"]["code"], "B-2", "{created}");
    let updated = event(&events, "update", &json!({"id": 1}));
    assert_eq!(updated["instance"]["qty"], "9007199254740993", "{updated}");
    assert_eq!(updated["instance"]["code"], "1", "text now: {updated}");
    assert_eq!(updated["update_fields"], json!(["qty"]), "{updated}");
    case.daemon.stop().await;
}

/// Saves of a renamed table keep reaching the handlers of the configured name; `triggers check`
/// says where the table went.
async fn renaming_the_table(mode: &str) {
    let mut case = running(mode, "", &[]).await;
    let events = after(
        &mut case,
        "ALTER TABLE item RENAME TO item_archive",
        &["INSERT INTO item_archive (id, name) VALUES (2, 'second')", "UPDATE item_archive SET qty = 3 WHERE id = 1"],
        ("INSERT INTO item_archive (id, name) VALUES (1000, 'marker')", json!({"id": 1000})),
        &[("insert", json!({"id": 2})), ("update", json!({"id": 1}))],
    )
    .await;
    assert!(events.iter().all(|e| e["sender"] == "public.item"), "the configured name: {}", shown(&events));
    assert_check_says_where_it_went(&case, "public.item_archive");
    case.daemon.stop().await;
}

/// As for a rename, after `SET SCHEMA`.
async fn moving_the_table_to_another_schema(mode: &str) {
    let mut case = running(mode, "CREATE SCHEMA archive", &[]).await;
    let events = after(
        &mut case,
        "ALTER TABLE item SET SCHEMA archive",
        &["INSERT INTO archive.item (id, name) VALUES (2, 'second')", "UPDATE archive.item SET qty = 3 WHERE id = 1"],
        ("INSERT INTO archive.item (id, name) VALUES (1000, 'marker')", json!({"id": 1000})),
        &[("insert", json!({"id": 2})), ("update", json!({"id": 1}))],
    )
    .await;
    assert!(events.iter().all(|e| e["sender"] == "public.item"), "the configured name: {}", shown(&events));
    assert_check_says_where_it_went(&case, "archive.item");
    case.daemon.stop().await;
}

/// `post-save triggers check` exits 1 and a line of its output names the table's new name and
/// says that it was renamed or moved.
fn assert_check_says_where_it_went(case: &Case, new_name: &str) {
    let out = post_save_on(&case.daemon.config, &case.db, &["triggers", "check"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "triggers check:\n{stdout}{stderr}");
    let said = format!("{stdout}{stderr}");
    assert!(
        said.lines().any(|l| l.contains(new_name) && (l.contains("renamed") || l.contains("moved"))),
        "triggers check does not say that public.item was renamed or moved to {new_name}:\n{said}"
    );
}

/// DROP TABLE of a watched table succeeds; the other watched table's saves keep arriving.
async fn dropping_another_watched_table(mode: &str) {
    let mut case = running(mode, "CREATE TABLE other (id integer PRIMARY KEY, label text)", &["public.other"]).await;
    let failed = write_all(&case.writer, &["INSERT INTO other VALUES (1, 'before the drop')"]).await;
    assert!(failed.is_empty(), "{failed:#?}");
    let other = case.daemon.next().await;
    assert_eq!((other["sender"].as_str(), other["op"].as_str()), (Some("public.other"), Some("insert")));
    let events = after(
        &mut case,
        "DROP TABLE other",
        &["INSERT INTO item (id, name) VALUES (2, 'second')", "UPDATE item SET qty = 3 WHERE id = 1"],
        marker(),
        &[("insert", json!({"id": 2})), ("update", json!({"id": 1}))],
    )
    .await;
    assert!(events.iter().all(|e| e["sender"] == "public.item"), "{}", shown(&events));
    case.daemon.stop().await;
}
