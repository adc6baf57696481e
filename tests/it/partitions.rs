//! A watched partitioned table: saves through the parent and straight into a partition, a row
//! moved to another partition by an UPDATE, and partitions added after the daemon started all
//! arrive with the parent as `sender`; `triggers check` is clean right after `triggers install`.
//! Runs the real `post-save` binary against the real PostgreSQL.
//!
//! PostgreSQL fires a table's statement-level triggers only for statements that name it, and
//! runs a row move as a DELETE from one partition and an INSERT into another, firing neither
//! side's UPDATE triggers (CREATE TRIGGER, "Notes"): what a capture on the parent alone misses.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support;
use crate::support::db::TestDb;
use crate::support::logd::{LogDaemon, log_handlers};
use crate::support::post_save_ok;

const MEASURE: &str = "CREATE TABLE measure (
        id bigint NOT NULL, bucket integer NOT NULL, value text,
        PRIMARY KEY (id, bucket)
    ) PARTITION BY RANGE (bucket);
    CREATE TABLE measure_low PARTITION OF measure FOR VALUES FROM (0) TO (100);
    CREATE TABLE measure_high PARTITION OF measure FOR VALUES FROM (100) TO (200)";

const SENDER: &str = "public.measure";

/// How long a statement's other events (if any) may take to follow the one awaited.
const STRAGGLERS: Duration = Duration::from_millis(500);

/// A database with `measure` and its two partitions, the capture installed by the real binary
/// for `mode`, and the config's path (in the returned directory).
async fn measure(mode: &str) -> (TestDb, TempDir, PathBuf) {
    let db = TestDb::new().await;
    db.psql_ok(MEASURE);
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("post-save.toml");
    let config = format!(
        "[[watch]]\ntable = \"{SENDER}\"\nmode = \"{mode}\"\noperations = [\"insert\", \"update\", \"delete\"]\n{}",
        log_handlers(true)
    );
    std::fs::write(&path, config).unwrap();
    post_save_ok(&path, &db, &["triggers", "install"]);
    (db, dir, path)
}

/// Runs `sql`, awaits its event and checks it is `op` of row (`id`, `bucket`) of the parent.
async fn save(db: &TestDb, daemon: &mut LogDaemon, sql: &str, op: &str, id: i64, bucket: i64) -> Value {
    db.psql_ok(sql);
    let event = daemon.next_event(&format!("`{sql}`")).await;
    assert_eq!(event["sender"], SENDER, "`{sql}`: the sender must be the parent: {event}");
    assert_eq!(event["op"], op, "`{sql}`: {event}");
    assert_eq!(event["pk"], json!({"id": id, "bucket": bucket}), "`{sql}`: {event}");
    event
}

async fn saves_through_the_parent_and_into_a_partition(mode: &str) {
    let (db, _dir, config) = measure(mode).await;
    let mut daemon = LogDaemon::start(&config, &db).await;
    let e = save(&db, &mut daemon, "INSERT INTO measure VALUES (1, 10, 'a')", "insert", 1, 10).await;
    assert_eq!(e["created"], true, "{e}");
    let e = save(&db, &mut daemon, "INSERT INTO measure_high VALUES (2, 150, 'b')", "insert", 2, 150).await;
    assert_eq!(e["instance"]["value"], "b", "{e}");
    let e = save(&db, &mut daemon, "UPDATE measure SET value = 'a2' WHERE id = 1", "update", 1, 10).await;
    assert_eq!(e["update_fields"], json!(["value"]), "{e}");
    let e = save(&db, &mut daemon, "UPDATE measure_high SET value = 'b2' WHERE id = 2", "update", 2, 150).await;
    assert_eq!(e["update_fields"], json!(["value"]), "{e}");
    assert_eq!(e["instance"]["value"], "b2", "{e}");
    let e = save(&db, &mut daemon, "UPDATE measure_low SET value = 'a3' WHERE id = 1", "update", 1, 10).await;
    assert_eq!(e["update_fields"], json!(["value"]), "{e}");
    save(&db, &mut daemon, "DELETE FROM measure WHERE id = 1", "delete", 1, 10).await;
    save(&db, &mut daemon, "DELETE FROM measure_high WHERE id = 2", "delete", 2, 150).await;
    daemon.assert_quiet(STRAGGLERS, "the last DELETE").await;
    daemon.stop().await;
}

#[tokio::test]
async fn saves_through_the_parent_and_into_a_partition_arrive_as_the_parent_durable() {
    saves_through_the_parent_and_into_a_partition("durable").await;
}

#[tokio::test]
async fn saves_through_the_parent_and_into_a_partition_arrive_as_the_parent_notify() {
    saves_through_the_parent_and_into_a_partition("notify").await;
}

/// An UPDATE of the partition key that moves a row from `measure_low` to `measure_high` is one
/// update event of the row as it is now, not a delete and an insert.
async fn a_row_moved_to_another_partition(mode: &str) {
    let (db, _dir, config) = measure(mode).await;
    let mut daemon = LogDaemon::start(&config, &db).await;
    save(&db, &mut daemon, "INSERT INTO measure VALUES (3, 20, 'c')", "insert", 3, 20).await;
    db.psql_ok("UPDATE measure SET bucket = 120 WHERE id = 3");
    // A save of another row after the move: once its event is in (and stragglers had time),
    // every event of the move is too.
    db.psql_ok("INSERT INTO measure VALUES (9, 30, 'after the move')");
    let mut events = daemon.events_until("the row moved to another partition", |e| e["pk"]["id"] == 9).await;
    events.extend(daemon.drain(STRAGGLERS).await);
    let moved: Vec<&Value> = events.iter().filter(|e| e["pk"]["id"] == 3).collect();
    let ops: Vec<&str> = moved.iter().map(|e| e["op"].as_str().unwrap_or("?")).collect();
    let split = match ops.as_slice() {
        ["delete", "insert"] => Some("a delete then an insert"),
        ["insert", "delete"] => Some("an insert and a delete"),
        ["delete"] => Some("a delete alone (the insert into the new partition was not captured)"),
        ["insert"] => Some("an insert alone (created = true for a row that existed)"),
        _ => None,
    };
    if let Some(split) = split {
        panic!("the row move arrived as {split}, not as one update event: {moved:?}");
    }
    assert_eq!(ops, ["update"], "the row move must be exactly one update event; got {ops:?}: {moved:?}");
    let e = moved[0];
    assert_eq!(e["sender"], SENDER, "{e}");
    assert_eq!(e["created"], false, "{e}");
    assert_eq!(e["signal"], "post_save", "{e}");
    assert_eq!(e["pk"], json!({"id": 3, "bucket": 120}), "the pk of the row as it is now: {e}");
    assert_eq!(e["instance"]["bucket"], 120, "the instance is the new row: {e}");
    assert_eq!(e["instance"]["value"], "c", "{e}");
    let fields = e["update_fields"].as_array().cloned().unwrap_or_default();
    assert!(fields.contains(&json!("bucket")), "update_fields must name the partition key: {e}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_row_moved_to_another_partition_is_one_update_durable() {
    a_row_moved_to_another_partition("durable").await;
}

#[tokio::test]
async fn a_row_moved_to_another_partition_is_one_update_notify() {
    a_row_moved_to_another_partition("notify").await;
}

/// Partitions made after the daemon started, by `CREATE TABLE ... PARTITION OF` and by
/// `ATTACH PARTITION` of a table created on its own, are captured with no `triggers install`.
async fn partitions_added_while_running(mode: &str) {
    let (db, _dir, config) = measure(mode).await;
    let mut daemon = LogDaemon::start(&config, &db).await;

    db.psql_ok("CREATE TABLE measure_more PARTITION OF measure FOR VALUES FROM (200) TO (300)");
    save(&db, &mut daemon, "INSERT INTO measure VALUES (4, 250, 'd')", "insert", 4, 250).await;
    save(&db, &mut daemon, "INSERT INTO measure_more VALUES (5, 260, 'e')", "insert", 5, 260).await;
    let e = save(&db, &mut daemon, "UPDATE measure_more SET value = 'e2' WHERE id = 5", "update", 5, 260).await;
    assert_eq!(e["update_fields"], json!(["value"]), "{e}");

    db.psql_ok(
        "CREATE TABLE measure_attached (id bigint NOT NULL, bucket integer NOT NULL, value text, PRIMARY KEY (id, bucket));
         ALTER TABLE measure ATTACH PARTITION measure_attached FOR VALUES FROM (300) TO (400)",
    );
    save(&db, &mut daemon, "INSERT INTO measure VALUES (6, 350, 'f')", "insert", 6, 350).await;
    save(&db, &mut daemon, "INSERT INTO measure_attached VALUES (7, 360, 'g')", "insert", 7, 360).await;
    let e = save(&db, &mut daemon, "UPDATE measure_attached SET value = 'g2' WHERE id = 7", "update", 7, 360).await;
    assert_eq!(e["update_fields"], json!(["value"]), "{e}");
    save(&db, &mut daemon, "DELETE FROM measure_attached WHERE id = 6", "delete", 6, 350).await;
    daemon.assert_quiet(STRAGGLERS, "the last DELETE").await;
    daemon.stop().await;
}

#[tokio::test]
async fn partitions_added_after_the_daemon_started_are_captured_durable() {
    partitions_added_while_running("durable").await;
}

#[tokio::test]
async fn partitions_added_after_the_daemon_started_are_captured_notify() {
    partitions_added_while_running("notify").await;
}

#[tokio::test]
async fn triggers_check_exits_0_right_after_install_on_a_partitioned_table() {
    for mode in ["durable", "notify"] {
        let (db, _dir, config) = measure(mode).await;
        let out = support::post_save_on(&config, &db, &["triggers", "check"]);
        assert!(
            out.status.success(),
            "{mode}: `triggers check` right after `triggers install` exited with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
