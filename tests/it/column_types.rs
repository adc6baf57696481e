//! Watched tables whose columns have extension types (hstore, ltree, PostGIS geometry and
//! geography, citext, pgvector) or user types without an `=` operator: INSERT, UPDATE and
//! DELETE all commit, in durable and notify mode, and their events name exactly the columns an
//! UPDATE changed. Runs the real `post-save` binary against the real PostgreSQL; the extensions
//! are created in each test's own database.
//!
//! The capture function runs with a fixed `search_path`, so it cannot find an extension's
//! operators by name (DESIGN.md, "Rules that come from PostgreSQL itself"): an UPDATE of such
//! a table must still commit.

use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::db::TestDb;
use crate::support::logd::{LogDaemon, log_handlers};
use crate::support::post_save_ok;

/// A column of a type under test, with two distinct values as SQL literals.
struct Typed {
    column: &'static str,
    sql_type: &'static str,
    first: &'static str,
    second: &'static str,
}

/// The modes each test watches a table in: one table per mode, one daemon for both.
const MODES: [&str; 2] = ["durable", "notify"];

fn table(mode: &str) -> String {
    format!("typed_{mode}")
}

/// Runs `sql`, panicking with `label` and PostgreSQL's error when it fails: the writer's
/// statement failing is the bug these tests look for.
fn exec(db: &TestDb, label: &str, sql: &str) {
    let out = db.psql(sql);
    assert!(
        out.status.success(),
        "[{label}] the user's statement failed: {sql}\n{}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Creates the tables (`setup` first: extensions, types), installs the capture with the real
/// binary, then checks every save of both tables through a real daemon.
async fn check_types(label: &str, setup: &str, columns: &[Typed]) {
    let db = TestDb::new().await;
    exec(&db, label, setup);
    let typed: Vec<String> = columns.iter().map(|c| format!("{} {}", c.column, c.sql_type)).collect();
    let mut config = String::new();
    for mode in MODES {
        exec(
            &db,
            label,
            &format!("CREATE TABLE {} (id bigint PRIMARY KEY, {}, note text)", table(mode), typed.join(", ")),
        );
        config.push_str(&format!(
            "[[watch]]\ntable = \"public.{}\"\nmode = \"{mode}\"\noperations = [\"insert\", \"update\", \"delete\"]\n",
            table(mode)
        ));
    }
    config.push_str(&log_handlers(true));
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("post-save.toml");
    std::fs::write(&path, &config).unwrap();
    post_save_ok(&path, &db, &["triggers", "install"]);
    let mut daemon = LogDaemon::start(&path, &db).await;
    for mode in MODES {
        saves_of_one_table(&db, &mut daemon, &format!("{label}, {mode}"), &table(mode), columns).await;
    }
    daemon.stop().await;
}

/// INSERT, an UPDATE of each typed column alone, an UPDATE of `note` alone, an UPDATE that
/// changes nothing, and a DELETE of one row of `table`, each checked against its event.
async fn saves_of_one_table(db: &TestDb, daemon: &mut LogDaemon, label: &str, table: &str, columns: &[Typed]) {
    let sender = format!("public.{table}");
    let names: Vec<&str> = columns.iter().map(|c| c.column).collect();
    let firsts: Vec<&str> = columns.iter().map(|c| c.first).collect();
    exec(
        db,
        label,
        &format!("INSERT INTO {table} (id, {}, note) VALUES (1, {}, 'first')", names.join(", "), firsts.join(", ")),
    );
    let event = daemon.next_event(&format!("[{label}] the INSERT")).await;
    assert_event(label, &event, &sender, "insert");
    assert_eq!(event["created"], true, "[{label}] {event}");
    for c in columns {
        assert!(!event["instance"][c.column].is_null(), "[{label}] no `{}` in the instance: {event}", c.column);
    }

    for c in columns {
        exec(db, label, &format!("UPDATE {table} SET {} = {} WHERE id = 1", c.column, c.second));
        let event = daemon.next_event(&format!("[{label}] the UPDATE of {}", c.column)).await;
        assert_event(label, &event, &sender, "update");
        assert_eq!(event["created"], false, "[{label}] {event}");
        assert_eq!(
            event["update_fields"],
            json!([c.column]),
            "[{label}] an UPDATE of `{}` alone must list exactly it: {event}",
            c.column
        );
    }

    exec(db, label, &format!("UPDATE {table} SET note = 'second' WHERE id = 1"));
    let event = daemon.next_event(&format!("[{label}] the UPDATE of note")).await;
    assert_event(label, &event, &sender, "update");
    assert_eq!(event["update_fields"], json!(["note"]), "[{label}] only note changed: {event}");

    // Every column set to the value it has: no event. The next real change shows whether one
    // came (events of one row arrive in commit order).
    let same: Vec<String> = columns.iter().map(|c| format!("{} = {}", c.column, c.second)).collect();
    exec(db, label, &format!("UPDATE {table} SET {}, note = 'second' WHERE id = 1", same.join(", ")));
    exec(db, label, &format!("UPDATE {table} SET note = 'third' WHERE id = 1"));
    let event = daemon.next_event(&format!("[{label}] the UPDATE of note to 'third'")).await;
    assert_eq!(
        event["instance"]["note"], "third",
        "[{label}] an UPDATE that changed nothing produced an event: {event}"
    );
    assert_eq!(event["update_fields"], json!(["note"]), "[{label}] {event}");

    exec(db, label, &format!("DELETE FROM {table} WHERE id = 1"));
    let event = daemon.next_event(&format!("[{label}] the DELETE")).await;
    assert_event(label, &event, &sender, "delete");
    assert_eq!(event["signal"], "post_delete", "[{label}] {event}");
    daemon.assert_quiet(Duration::from_millis(200), &format!("[{label}] the DELETE")).await;
}

fn assert_event(label: &str, event: &Value, sender: &str, op: &str) {
    assert_eq!(event["sender"], sender, "[{label}] wrong sender: {event}");
    assert_eq!(event["op"], op, "[{label}] wrong op: {event}");
    assert_eq!(event["pk"], json!({"id": 1}), "[{label}] wrong pk: {event}");
}

#[tokio::test]
async fn hstore_columns() {
    let tags = Typed { column: "tags", sql_type: "hstore", first: "'a=>1, b=>2'", second: "'a=>1, b=>3'" };
    check_types("hstore", "CREATE EXTENSION hstore", &[tags]).await;
}

/// In a schema of its own, as managed services install extensions (`extensions`).
#[tokio::test]
async fn ltree_columns_of_an_extension_in_another_schema() {
    let path = Typed {
        column: "path",
        sql_type: "extensions.ltree",
        first: "'top.science.astronomy'",
        second: "'top.science.physics'",
    };
    check_types("ltree", "CREATE SCHEMA extensions; CREATE EXTENSION ltree SCHEMA extensions", &[path]).await;
}

/// PostGIS is required of the distribution's server (`.ci/run` installs
/// `postgresql-NN-postgis-3`); the server builds `.ci/run` tests other versions with
/// (`POST_SAVE_PG_BINDIR`) carry no PostGIS, and there this test says so and checks nothing.
#[tokio::test]
async fn postgis_geometry_and_geography_columns() {
    if std::env::var_os(post_save::testing::cluster::BINDIR_ENV).is_some_and(|v| !v.is_empty()) {
        let probe = TestDb::new().await;
        let available = probe.query_i64("SELECT count(*) FROM pg_available_extensions WHERE name = 'postgis'").await;
        drop(probe);
        if available == 0 {
            eprintln!("note: skipping the PostGIS check: the server in POST_SAVE_PG_BINDIR has no `postgis` extension");
            return;
        }
    }
    let geom = Typed {
        column: "geom",
        sql_type: "geometry(Point, 4326)",
        first: "'SRID=4326;POINT(1 2)'",
        second: "'SRID=4326;POINT(3 4)'",
    };
    let geog = Typed {
        column: "geog",
        sql_type: "geography(Point, 4326)",
        first: "'SRID=4326;POINT(5 6)'",
        second: "'SRID=4326;POINT(7 8)'",
    };
    check_types("postgis", "CREATE EXTENSION postgis", &[geom, geog]).await;
}

#[tokio::test]
async fn citext_columns() {
    let email =
        Typed { column: "email", sql_type: "citext", first: "'Alice@Example.com'", second: "'Bob@Example.com'" };
    check_types("citext", "CREATE EXTENSION citext", &[email]).await;
}

/// pgvector is not packaged for every server (Debian bookworm has no `postgresql-15-pgvector`):
/// without it this test prints why and checks nothing.
#[tokio::test]
async fn pgvector_columns() {
    let probe = TestDb::new().await;
    let available = probe.query_i64("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'").await;
    drop(probe);
    if available == 0 {
        eprintln!(
            "note: skipping the pgvector check: the server has no `vector` extension (install pgvector, \
             e.g. the postgresql-NN-pgvector package, to run it)"
        );
        return;
    }
    let embedding = Typed { column: "embedding", sql_type: "vector(3)", first: "'[1,2,3]'", second: "'[1,2,4]'" };
    check_types("pgvector", "CREATE EXTENSION vector", &[embedding]).await;
}

/// Types with no `=` operator: a composite type with a json member, a domain over json, and
/// the built-in `point`.
#[tokio::test]
async fn user_types_without_an_equality_operator() {
    let setup = "CREATE TYPE priced AS (amount numeric, meta json); CREATE DOMAIN settings AS json";
    let priced = Typed {
        column: "price",
        sql_type: "priced",
        first: r#"ROW(1.5, '{"currency": "EUR"}')::priced"#,
        second: r#"ROW(1.5, '{"currency": "USD"}')::priced"#,
    };
    let settings = Typed {
        column: "settings",
        sql_type: "settings",
        first: r#"'{"theme": "dark"}'"#,
        second: r#"'{"theme": "light"}'"#,
    };
    let spot = Typed { column: "spot", sql_type: "point", first: "'(1,2)'", second: "'(3,4)'" };
    check_types("user types", setup, &[priced, settings, spot]).await;
}
