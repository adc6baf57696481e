//! `capture = "wal"` knows tables by identity, not by name: a partitioned parent is published
//! through its root, so saves into any partition (one attached later too) arrive as the
//! parent's; a watched table renamed, moved to another schema, or whose key column is renamed
//! while the daemon runs keeps being captured; dropping one watched table affects no other.
//! And `triggers install` publishes a table only in a way its own UPDATE and DELETE survive.
//! Against a real PostgreSQL with `wal_level = logical`.

use std::time::Duration;

use post_save::event::Op;
use serde_json::{Value, json};

use crate::support;
use crate::support::db::TestDb;
use crate::support::{Running, config, install, start};

/// Runs `sql` and checks its event's sender, operation and key.
async fn save(db: &TestDb, daemon: &mut Running, sql: &str, sender: &str, op: Op, pk: Value) -> post_save::SaveEvent {
    db.psql_ok(sql);
    let e = daemon.next().await;
    assert_eq!((e.sender.as_str(), e.op), (sender, op), "`{sql}`: {}", e.to_json());
    assert_eq!(Value::Object(e.pk.clone()), pk, "`{sql}`: {}", e.to_json());
    e
}

fn wal_watch(table: &str, extra: &str) -> String {
    format!("[[watch]]\ntable = \"{table}\"\ncapture = \"wal\"\n{extra}\n")
}

const ALL_OPS: &str = "operations = [\"insert\", \"update\", \"delete\"]";

#[tokio::test]
async fn a_partitioned_parent_sends_every_save_of_its_partitions_as_its_own() {
    let db = TestDb::new_logical().await;
    db.psql_ok(
        "CREATE TABLE measure (id bigint NOT NULL, bucket integer NOT NULL, value text, PRIMARY KEY (id, bucket))
             PARTITION BY RANGE (bucket);
         CREATE TABLE measure_low PARTITION OF measure FOR VALUES FROM (0) TO (100);
         CREATE TABLE measure_high PARTITION OF measure FOR VALUES FROM (100) TO (200)",
    );
    let config = config(&wal_watch("public.measure", ALL_OPS));
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;
    save(
        &db,
        &mut daemon,
        "INSERT INTO measure VALUES (1, 10, 'a')",
        "public.measure",
        Op::Insert,
        json!({"id": 1, "bucket": 10}),
    )
    .await;
    save(
        &db,
        &mut daemon,
        "INSERT INTO measure_high VALUES (2, 150, 'b')",
        "public.measure",
        Op::Insert,
        json!({"id": 2, "bucket": 150}),
    )
    .await;
    let e = save(
        &db,
        &mut daemon,
        "UPDATE measure_high SET value = 'b2' WHERE id = 2",
        "public.measure",
        Op::Update,
        json!({"id": 2, "bucket": 150}),
    )
    .await;
    assert_eq!(e.update_fields, Some(vec!["value".to_owned()]), "the partition's identity is FULL too");
    // A row moved to another partition: the WAL holds a delete and an insert, both the parent's.
    save(
        &db,
        &mut daemon,
        "UPDATE measure SET bucket = 120 WHERE id = 1",
        "public.measure",
        Op::Delete,
        json!({"id": 1, "bucket": 10}),
    )
    .await;
    let e = daemon.next().await;
    assert_eq!((e.op, e.sender.as_str()), (Op::Insert, "public.measure"), "{}", e.to_json());
    assert_eq!(e.instance["bucket"], 120);
    // Partitions made after the daemon started: by PARTITION OF and by ATTACH.
    db.psql_ok("CREATE TABLE measure_more PARTITION OF measure FOR VALUES FROM (200) TO (300)");
    save(
        &db,
        &mut daemon,
        "INSERT INTO measure_more VALUES (3, 250, 'c')",
        "public.measure",
        Op::Insert,
        json!({"id": 3, "bucket": 250}),
    )
    .await;
    save(
        &db,
        &mut daemon,
        "UPDATE measure_more SET value = 'c2' WHERE id = 3",
        "public.measure",
        Op::Update,
        json!({"id": 3, "bucket": 250}),
    )
    .await;
    db.psql_ok(
        "CREATE TABLE measure_attached (id bigint NOT NULL, bucket integer NOT NULL, value text, PRIMARY KEY (id, bucket));
         ALTER TABLE measure ATTACH PARTITION measure_attached FOR VALUES FROM (300) TO (400)",
    );
    save(
        &db,
        &mut daemon,
        "INSERT INTO measure VALUES (4, 350, 'd')",
        "public.measure",
        Op::Insert,
        json!({"id": 4, "bucket": 350}),
    )
    .await;
    save(
        &db,
        &mut daemon,
        "UPDATE measure_attached SET value = 'd2' WHERE id = 4",
        "public.measure",
        Op::Update,
        json!({"id": 4, "bucket": 350}),
    )
    .await;
    save(
        &db,
        &mut daemon,
        "DELETE FROM measure_attached WHERE id = 4",
        "public.measure",
        Op::Delete,
        json!({"id": 4, "bucket": 350}),
    )
    .await;
    daemon.assert_quiet_until(&db, "INSERT INTO measure VALUES (100, 350, 'barrier')", |e| e.pk["id"] == 100).await;
    daemon.stop().await;
    let client = db.client().await;
    let drift = post_save::testing::install::check(&client, &support::config(&wal_watch("public.measure", ALL_OPS)))
        .await
        .expect("check");
    let text: Vec<String> = drift.iter().map(ToString::to_string).collect();
    assert!(
        text.iter().any(|d| d.contains("REPLICA IDENTITY is not FULL on") && d.contains("public.measure_more")),
        "check names the partitions made since install: {text:?}"
    );
}

#[tokio::test]
async fn renamed_moved_rekeyed_and_dropped_tables_leave_every_other_save_delivered() {
    let db = TestDb::new_logical().await;
    db.psql_ok(
        "CREATE TABLE item (id bigint PRIMARY KEY, name text);
         CREATE TABLE note (id bigint PRIMARY KEY, body text);
         CREATE SCHEMA archive",
    );
    let config = config(&format!("{}{}", wal_watch("public.item", ALL_OPS), wal_watch("public.note", ALL_OPS)));
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;
    save(&db, &mut daemon, "INSERT INTO item VALUES (1, 'a')", "public.item", Op::Insert, json!({"id": 1})).await;
    db.psql_ok("ALTER TABLE item RENAME TO product");
    save(&db, &mut daemon, "INSERT INTO product VALUES (2, 'b')", "public.item", Op::Insert, json!({"id": 2})).await;
    save(&db, &mut daemon, "UPDATE product SET name = 'b2' WHERE id = 2", "public.item", Op::Update, json!({"id": 2}))
        .await;
    db.psql_ok("ALTER TABLE product SET SCHEMA archive");
    save(&db, &mut daemon, "INSERT INTO archive.product VALUES (3, 'c')", "public.item", Op::Insert, json!({"id": 3}))
        .await;
    db.psql_ok("ALTER TABLE archive.product RENAME COLUMN id TO product_id");
    let e = save(
        &db,
        &mut daemon,
        "INSERT INTO archive.product VALUES (4, 'd')",
        "public.item",
        Op::Insert,
        json!({"product_id": 4}),
    )
    .await;
    assert_eq!(e.instance["name"], "d");
    save(
        &db,
        &mut daemon,
        "DELETE FROM archive.product WHERE product_id = 1",
        "public.item",
        Op::Delete,
        json!({"product_id": 1}),
    )
    .await;
    save(&db, &mut daemon, "INSERT INTO note VALUES (1, 'x')", "public.note", Op::Insert, json!({"id": 1})).await;
    db.psql_ok("DROP TABLE note");
    save(
        &db,
        &mut daemon,
        "INSERT INTO archive.product VALUES (5, 'e')",
        "public.item",
        Op::Insert,
        json!({"product_id": 5}),
    )
    .await;
    // In one transaction with a drop: the other table's save still arrives.
    db.psql_ok("BEGIN; INSERT INTO archive.product VALUES (6, 'f'); COMMIT");
    assert_eq!(daemon.next().await.pk["product_id"], 6);
    // A watched table dropped and made again under its watched name is that watch's again.
    db.psql_ok("CREATE TABLE note (id bigint PRIMARY KEY, body text)");
    db.psql_ok("ALTER TABLE note REPLICA IDENTITY FULL; ALTER PUBLICATION post_save ADD TABLE note");
    save(&db, &mut daemon, "INSERT INTO note VALUES (2, 'y')", "public.note", Op::Insert, json!({"id": 2})).await;
    daemon.assert_quiet_until(&db, "INSERT INTO note VALUES (100, 'barrier')", |e| e.pk["id"] == 100).await;
    daemon.stop().await;

    // A restarted daemon with the old config: the renamed table's saves are kept as dead letters
    // (not delivered, not lost), and the other table still delivers.
    let config =
        support::config(&format!("{}{}", wal_watch("public.item", ALL_OPS), wal_watch("public.note", ALL_OPS)));
    let mut daemon = start(&db, config).await;
    db.psql_ok("INSERT INTO archive.product VALUES (7, 'g')");
    save(&db, &mut daemon, "INSERT INTO note VALUES (3, 'z')", "public.note", Op::Insert, json!({"id": 3})).await;
    daemon.stop().await;
    let kept = "SELECT count(*) FROM post_save.dead_letter WHERE handler = '(unwatched)' AND sender = 'archive.product' \
                AND (event -> 'pk' ->> 'product_id') = '7' AND (event -> 'instance' ->> 'name') = 'g'";
    assert_eq!(db.query_i64(kept).await, 1, "the unwatched table's save is kept");

    // Watched under its new name, the kept save is retried to the handlers that receive it now.
    let config = support::config(&wal_watch("archive.product", ALL_OPS));
    let mut daemon = start(&db, config).await;
    db.psql_ok("UPDATE post_save.dead_letter SET retry_requested_at = clock_timestamp() WHERE handler = '(unwatched)'");
    let e = daemon.next().await;
    assert_eq!((e.sender.as_str(), e.pk["product_id"].as_i64(), e.op), ("archive.product", Some(7), Op::Insert));
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while db.query_i64("SELECT count(*) FROM post_save.dead_letter").await > 0 {
        let left =
            db.psql("SELECT handler, sender, attempts, last_error, retry_requested_at FROM post_save.dead_letter");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retried dead letter stayed: {}",
            String::from_utf8_lossy(&left.stdout)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon
        .assert_quiet_until(&db, "INSERT INTO archive.product VALUES (100, 'barrier')", |e| e.pk["product_id"] == 100)
        .await;
    daemon.stop().await;
}

/// Runs `sql` as the application would and fails the test with PostgreSQL's error.
fn app(db: &TestDb, sql: &str) {
    let out = db.psql(sql);
    assert!(out.status.success(), "the application's `{sql}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn insert_only_watches_leave_the_applications_updates_and_deletes_working() {
    let db = TestDb::new_logical().await;
    db.psql_ok(
        "CREATE TABLE keyless (n integer, label text);
         CREATE TABLE nothing (id bigint PRIMARY KEY, label text);
         ALTER TABLE nothing REPLICA IDENTITY NOTHING",
    );
    let config = config(&format!(
        "{}{}",
        wal_watch("public.keyless", "pk = [\"n\"]\noperations = [\"insert\"]"),
        wal_watch("public.nothing", "operations = [\"insert\"]")
    ));
    install(&db, &config).await;
    let identity = db
        .query_i64("SELECT count(*) FROM pg_class WHERE relname IN ('keyless', 'nothing') AND relreplident <> 'f'")
        .await;
    assert_eq!(identity, 2, "an insert-only watch leaves the replica identity as it was");
    let mut daemon = start(&db, config).await;
    app(&db, "INSERT INTO keyless VALUES (1, 'a'), (2, 'b')");
    app(&db, "UPDATE keyless SET label = 'c' WHERE n = 1");
    app(&db, "DELETE FROM keyless WHERE n = 2");
    app(&db, "INSERT INTO nothing VALUES (1, 'a')");
    app(&db, "UPDATE nothing SET label = 'b'");
    app(&db, "DELETE FROM nothing");
    let events = daemon.take(3).await;
    assert!(events.iter().all(|e| e.op == Op::Insert), "only the inserts are captured");
    daemon.assert_quiet_until(&db, "INSERT INTO keyless VALUES (100, 'barrier')", |e| e.pk["n"] == 100).await;
    daemon.stop().await;
}

#[tokio::test]
async fn install_refuses_a_table_whose_updates_would_fail_once_published_and_changes_nothing() {
    let db = TestDb::new_logical().await;
    db.psql_ok(
        "CREATE TABLE reading (at timestamptz NOT NULL, value float8) PARTITION BY RANGE (at);
         CREATE TABLE reading_2026 PARTITION OF reading FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
    );
    let config = config(&wal_watch("public.reading", "pk = [\"at\"]\noperations = [\"insert\", \"update\"]"));
    let mut client = db.client().await;
    post_save::db::migrate(&mut client).await.expect("migrate");
    let e = post_save::testing::install::install(&mut client, &config).await.expect_err("install must refuse");
    let text = e.to_string();
    assert!(text.contains("public.reading is partitioned and has no primary key"), "{text}");
    assert!(text.contains("nothing was changed"), "{text}");
    let published = db.query_i64("SELECT count(*) FROM pg_publication").await;
    let full = db.query_i64("SELECT count(*) FROM pg_class WHERE relname LIKE 'reading%' AND relreplident = 'f'").await;
    assert_eq!((published, full), (0, 0), "nothing in the database changed");
    app(&db, "INSERT INTO reading VALUES ('2026-05-01', 1)");
    app(&db, "UPDATE reading SET value = 2");
    // Watched for inserts only, the same table installs.
    let inserts = support::config(&wal_watch("public.reading", "pk = [\"at\"]\noperations = [\"insert\"]"));
    post_save::testing::install::install(&mut client, &inserts).await.expect("an insert-only watch installs");
    app(&db, "UPDATE reading SET value = 3");
    app(&db, "DELETE FROM reading");
}

#[tokio::test]
async fn a_watch_that_gains_updates_moves_its_table_to_the_full_publication() {
    let db = TestDb::new_logical().await;
    db.psql_ok("CREATE TABLE item (id bigint PRIMARY KEY, name text)");
    install(&db, &config(&wal_watch("public.item", "operations = [\"insert\"]"))).await;
    let in_publication = async |name: &str| {
        db.query_i64(&format!(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = '{name}' AND tablename = 'item'"
        ))
        .await
    };
    assert_eq!((in_publication("post_save_inserts").await, in_publication("post_save").await), (1, 0));
    let config = config(&wal_watch("public.item", ALL_OPS));
    install(&db, &config).await;
    assert_eq!((in_publication("post_save_inserts").await, in_publication("post_save").await), (0, 1));
    let client = db.client().await;
    assert!(post_save::testing::install::check(&client, &config).await.expect("check").is_empty(), "in sync");
    let mut daemon = start(&db, config).await;
    db.psql_ok("INSERT INTO item VALUES (1, 'a'); UPDATE item SET name = 'b'");
    let events = daemon.take(2).await;
    assert_eq!(events[1].update_fields, Some(vec!["name".to_owned()]));
    daemon.stop().await;
}

/// PostgreSQL 18's generated columns: a stored one under `REPLICA IDENTITY FULL` keeps the
/// application's UPDATE working (install publishes stored generated columns) and arrives in the
/// event; a virtual one, which a publication cannot carry, makes install refuse an update watch.
#[tokio::test]
async fn on_postgresql_18_stored_generated_columns_publish_and_virtual_ones_are_refused() {
    let db = TestDb::new_logical().await;
    if db.query_i64("SELECT current_setting('server_version_num')::int8").await < 180_000 {
        eprintln!("PostgreSQL before 18: no virtual generated columns, stored ones are not published");
        return;
    }
    db.psql_ok(
        "CREATE TABLE priced (id bigint PRIMARY KEY, net numeric NOT NULL,
                              gross numeric GENERATED ALWAYS AS (net * 1.2) STORED);
         CREATE TABLE sized (id bigint PRIMARY KEY, w int NOT NULL, area int GENERATED ALWAYS AS (w * w) VIRTUAL)",
    );
    let config = config(&wal_watch("public.priced", ALL_OPS));
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;
    app(&db, "INSERT INTO priced (id, net) VALUES (1, 10)");
    app(&db, "UPDATE priced SET net = 20 WHERE id = 1");
    let events = daemon.take(2).await;
    assert_eq!(events[0].instance["gross"], json!(12.0), "{}", *events[0].instance);
    assert_eq!(events[1].instance["gross"], json!(24.0), "{}", *events[1].instance);
    daemon.stop().await;

    let mut client = db.client().await;
    let sized = support::config(&wal_watch("public.sized", ALL_OPS));
    let e = post_save::testing::install::install(&mut client, &sized).await.expect_err("install must refuse");
    assert!(e.to_string().contains("public.sized has virtual generated columns (area)"), "{e}");
    let published = db.query_i64("SELECT count(*) FROM pg_publication_tables WHERE tablename = 'sized'").await;
    assert_eq!(published, 0, "nothing changed");
    app(&db, "INSERT INTO sized (id, w) VALUES (1, 2)");
    app(&db, "UPDATE sized SET w = 3");
}
