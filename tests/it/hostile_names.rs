//! Hostile identifiers: schema, table and column names holding quotes, double quotes,
//! semicolons, `--`, dots, `$$`, `$capture$` and other dollar tags, backslashes, newlines,
//! non-ASCII text, and names of exactly 63 bytes (PostgreSQL's limit). For each, the real
//! `post-save` binary installs the capture (`triggers sql` piped into `psql`, then
//! `triggers install`), leaves every other table alone, and the table's saves reach handlers
//! with the right `sender` in durable and notify mode. DESIGN.md: nothing post-save does may
//! make a user's write fail, "not a hostile name".
//!
//! Each case is a database round trip, so the property runs a modest number of cases.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::json;
use tempfile::TempDir;

use crate::support;
use crate::support::db::{TestDb, quote_ident};
use crate::support::logd::{LogDaemon, log_handlers, toml_string};
use crate::support::post_save_ok;

/// PostgreSQL's identifier limit (NAMEDATALEN - 1): a longer name is truncated.
const MAX_NAME: usize = 63;

/// What hostile names are made of: SQL and PL/pgSQL syntax, quoting of every kind, and text
/// outside ASCII.
const FRAGMENTS: &[&str] = &[
    "'",
    "\"",
    "\"\"",
    ";",
    "--",
    "/*",
    "*/",
    ".",
    "..",
    "$",
    "$$",
    "$capture$",
    "$body$",
    "$x$",
    "\\",
    "\\n",
    "\n",
    "\t",
    " ",
    "é",
    "雪",
    "🦀",
    "Ω",
    "%s",
    "{}",
    "a",
    "Z",
    "_",
    "x9",
    "'); DROP TABLE canary; --",
    "$capture$; DROP TABLE canary; --",
];

/// The names of one case: a schema holding a durable and a notify table, each with the same
/// two columns.
#[derive(Debug, Clone)]
struct Names {
    schema: String,
    durable: String,
    notify: String,
    pk: String,
    column: String,
}

/// `name` cut to at most [`MAX_NAME`] bytes (on a character boundary), then padded with `x` to
/// exactly that many when `exact`.
fn fit(name: &str, exact: bool) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if out.len() + c.len_utf8() > MAX_NAME {
            break;
        }
        out.push(c);
    }
    while exact && out.len() < MAX_NAME {
        out.push('x');
    }
    out
}

/// One hostile name. It never starts with a double quote: a sender such as `public."t"` reads
/// as SQL quoting, which [`names_that_read_as_sql_quoting`] covers on its own.
fn name() -> impl Strategy<Value = String> {
    (prop::collection::vec(prop::sample::select(FRAGMENTS), 1..7), any::<bool>()).prop_map(|(parts, exact)| {
        let joined = parts.concat();
        let joined = if joined.starts_with('"') { format!("q{joined}") } else { joined };
        fit(&joined, exact)
    })
}

fn names() -> impl Strategy<Value = Names> {
    (name(), name(), name(), name(), name()).prop_map(|(schema, durable, notify, pk, column)| {
        // Two tables or two columns of one name cannot be created.
        let notify = if notify == durable { fit(&format!("n{notify}"), false) } else { notify };
        let column = if column == pk { fit(&format!("c{column}"), false) } else { column };
        Names { schema, durable, notify, pk, column }
    })
}

/// `"schema"."table"`, SQL-quoted.
fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// The config watching both tables, their `table` keys SQL-quoted and then TOML-escaped.
fn config_text(n: &Names) -> String {
    let mut toml = String::new();
    for (table, mode) in [(&n.durable, "durable"), (&n.notify, "notify")] {
        toml.push_str(&format!(
            "[[watch]]\ntable = {}\nmode = \"{mode}\"\noperations = [\"insert\", \"update\", \"delete\"]\n",
            toml_string(&qualified(&n.schema, table))
        ));
    }
    toml.push_str(&log_handlers(true));
    toml
}

/// Asserts that the canary table still exists and holds its three rows.
async fn assert_canary(db: &TestDb, label: &str, after: &str) {
    let client = db.client().await;
    let exists: bool = client.query_one("SELECT to_regclass('public.canary') IS NOT NULL", &[]).await.unwrap().get(0);
    assert!(exists, "{label}: the canary table is gone after {after}");
    let rows = support::db::query_i64(&client, "SELECT count(*) FROM public.canary").await;
    assert_eq!(rows, 3, "{label}: the canary table lost rows after {after}");
}

/// Creates the tables and a canary, installs the capture through `triggers sql | psql` and
/// `triggers install`, then checks an INSERT, UPDATE and DELETE of each table against its
/// event from a real daemon.
async fn round_trip(n: &Names) {
    let label = format!("{n:?}");
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut ddl = format!("CREATE SCHEMA {};\n", quote_ident(&n.schema));
    for table in [&n.durable, &n.notify] {
        ddl.push_str(&format!(
            "CREATE TABLE {} ({} bigint PRIMARY KEY, {} text);\n",
            qualified(&n.schema, table),
            quote_ident(&n.pk),
            quote_ident(&n.column)
        ));
    }
    ddl.push_str("CREATE TABLE public.canary (id integer); INSERT INTO public.canary VALUES (1), (2), (3);");
    client.batch_execute(&ddl).await.unwrap_or_else(|e| panic!("{n:?}: setting up: {e}"));

    let dir = TempDir::new().unwrap();
    let config = dir.path().join("post-save.toml");
    std::fs::write(&config, config_text(n)).unwrap();
    post_save_ok(&config, &db, &["config", "check"]);
    post_save_ok(&config, &db, &["migrate"]);
    let sql = post_save_ok(&config, &db, &["triggers", "sql"]).stdout;
    let out = db.psql_stdin(&["-v", "ON_ERROR_STOP=1", "-q"], &sql);
    // The error without the notices of DROP TRIGGER IF EXISTS before it.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("NOTICE:")).collect();
    assert!(
        out.status.success(),
        "{n:?}: `post-save triggers sql | psql -v ON_ERROR_STOP=1` failed ({}): {}",
        out.status,
        errors.join("\n")
    );
    assert_canary(&db, &label, "`triggers sql | psql`").await;
    post_save_ok(&config, &db, &["triggers", "check"]);
    post_save_ok(&config, &db, &["triggers", "install"]);
    post_save_ok(&config, &db, &["triggers", "check"]);
    assert_canary(&db, &label, "`triggers install`").await;

    let mut daemon = LogDaemon::start(&config, &db).await;
    for (table, mode) in [(&n.durable, "durable"), (&n.notify, "notify")] {
        let target = qualified(&n.schema, table);
        let (pk, column) = (quote_ident(&n.pk), quote_ident(&n.column));
        let sender = format!("{}.{}", n.schema, table);
        let saves = [
            (format!("INSERT INTO {target} ({pk}, {column}) VALUES (1, 'one')"), "insert"),
            (format!("UPDATE {target} SET {column} = 'two' WHERE {pk} = 1"), "update"),
            (format!("DELETE FROM {target} WHERE {pk} = 1"), "delete"),
        ];
        for (sql, op) in saves {
            client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{n:?}, {mode}: the user's {op} failed: {e}"));
            let event = daemon.next_event(&format!("the {op} of {n:?} in {mode} mode")).await;
            assert_eq!(event["sender"], json!(sender), "{n:?}, {mode}: {event}");
            assert_eq!(event["op"], op, "{n:?}, {mode}: {event}");
            assert_eq!(event["pk"], json!({n.pk.clone(): 1}), "{n:?}, {mode}: {event}");
            if op == "update" {
                assert_eq!(event["update_fields"], json!([n.column]), "{n:?}, {mode}: {event}");
            }
        }
    }
    daemon.stop().await;
    assert_canary(&db, &label, "the saves").await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        // Each shrinking step is a database round trip too.
        max_shrink_iters: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_names_install_and_their_saves_arrive(names in names()) {
        runtime().block_on(round_trip(&names));
    }
}

/// Dots in the schema and the table (a sender, `schema.table`, then has more than one dot),
/// whitespace at a name's edges, a column starting with a double quote, and a long non-ASCII
/// column: every run, whatever the property draws.
#[test]
fn dotted_names_and_names_with_whitespace_at_the_edges() {
    let names = Names {
        schema: "sales.eu".into(),
        durable: "order.items".into(),
        notify: " padded name\n".into(),
        pk: "\"id".into(),
        column: fit(&"é".repeat(40), false),
    };
    runtime().block_on(round_trip(&names));
}

/// `$capture$` (the capture function's own dollar tag), `$$` and an attempt at SQL injection
/// through it, and a column of exactly 63 bytes of non-ASCII text.
#[test]
fn dollar_quoted_and_63_byte_names() {
    let names = Names {
        schema: "$capture$".into(),
        durable: "x$capture$; DROP TABLE canary; --".into(),
        notify: "$$".into(),
        pk: "$capture$id".into(),
        column: fit(&"雪".repeat(30), true),
    };
    assert_eq!(names.column.len(), MAX_NAME);
    runtime().block_on(round_trip(&names));
}

/// Names that are themselves SQL-quoted identifiers: a table called `"orders"` (quotes
/// included) in a schema called `"shop"`. Their sender, `"shop"."orders"`, must not be read as
/// the table `shop.orders`.
#[test]
fn names_that_read_as_sql_quoting() {
    let names = Names {
        schema: "\"shop\"".into(),
        durable: "\"orders\"".into(),
        notify: "\"order items\"".into(),
        pk: "\"id\"".into(),
        column: "\"note\"".into(),
    };
    runtime().block_on(round_trip(&names));
}

/// `triggers sql` piped into a plain `psql` (no ON_ERROR_STOP: psql goes on after an error)
/// runs only the capture's DDL, never SQL taken from a table's name.
#[test]
fn triggers_sql_never_runs_sql_taken_from_a_name() {
    runtime().block_on(async {
        let db = TestDb::new().await;
        let table = "x$capture$; DROP TABLE public.canary; --";
        let client = db.client().await;
        client
            .batch_execute(&format!(
                "CREATE TABLE public.{} (id bigint PRIMARY KEY);
                 CREATE TABLE public.canary (id integer); INSERT INTO public.canary VALUES (1), (2), (3);",
                quote_ident(table)
            ))
            .await
            .unwrap();
        let dir = TempDir::new().unwrap();
        let config = dir.path().join("post-save.toml");
        let toml = format!("[[watch]]\ntable = {}\n", toml_string(&qualified("public", table)));
        std::fs::write(&config, toml).unwrap();
        post_save_ok(&config, &db, &["migrate"]);
        let sql = post_save_ok(&config, &db, &["triggers", "sql"]).stdout;
        let out = db.psql_stdin(&["-q"], &sql);
        assert_canary(&db, &format!("{table:?}"), "`triggers sql | psql` (without ON_ERROR_STOP)").await;
        let errors = String::from_utf8_lossy(&out.stderr);
        assert!(!errors.contains("ERROR"), "`triggers sql | psql` reported errors: {errors}");
        post_save_ok(&config, &db, &["triggers", "check"]);
    });
}
