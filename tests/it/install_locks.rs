//! `triggers install` and the user's transactions: an unchanged config changes nothing and takes
//! no lock; a change waits for a long transaction a little at a time, never queueing the
//! table's readers behind it for long.

use std::time::{Duration, Instant};

use post_save::db;
use post_save::testing::install;

use crate::support::config;
use crate::support::db::TestDb;

const TABLE: &str = "CREATE TABLE shop_order (id bigserial PRIMARY KEY, product text)";
const WATCH: &str = "[[watch]]\ntable = \"shop_order\"\n";

/// A transaction that wrote to the table and stays open: it holds a ROW EXCLUSIVE lock, which
/// CREATE TRIGGER and DROP TRIGGER must wait for.
async fn open_writer(db: &TestDb) -> tokio_postgres::Client {
    let client = db.client().await;
    client.batch_execute("BEGIN; INSERT INTO shop_order (product) VALUES ('held')").await.expect("open writer");
    client
}

#[tokio::test]
async fn installing_an_unchanged_config_runs_no_ddl_and_waits_for_nobody() {
    let db = TestDb::new().await;
    db.psql_ok(TABLE);
    let config = config(WATCH);
    let mut client = db.client().await;
    db::migrate(&mut client).await.unwrap();
    let first = install::install(&mut client, &config).await.unwrap();
    assert!(first.contains("CREATE TRIGGER"), "{first}");

    let writer = open_writer(&db).await;
    let started = Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(10), install::install(&mut client, &config))
        .await
        .expect("a no-op install does not wait for the open transaction")
        .unwrap();
    assert_eq!(second, "", "no DDL the second time");
    println!("second install took {:?} beside an open writer", started.elapsed());
    // nothing waited on a lock while it ran, and it left no lock behind
    let waiting = db
        .query_i64(
            "SELECT count(*) FROM pg_locks WHERE NOT granted \
              AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await;
    assert_eq!(waiting, 0);
    writer.batch_execute("COMMIT").await.unwrap();
    assert!(install::check(&client, &config).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_change_waits_for_a_long_transaction_without_holding_readers_back() {
    let db = TestDb::new().await;
    db.psql_ok(TABLE);
    let mut client = db.client().await;
    db::migrate(&mut client).await.unwrap();
    install::install(&mut client, &config(WATCH)).await.unwrap();

    let writer = open_writer(&db).await;
    let changed = config(&format!("{WATCH}operations = [\"insert\", \"update\", \"delete\"]\n"));
    let install = tokio::spawn(async move {
        let sql = install::install(&mut client, &changed).await;
        (sql, client)
    });
    // While install keeps trying, the table's readers get through: a pending DDL lock queues
    // them only until its lock_timeout, then gets out of their way.
    let reader = db.client().await;
    let mut slowest = Duration::ZERO;
    for _ in 0..6 {
        let started = Instant::now();
        reader.query_one("SELECT count(*) FROM shop_order", &[]).await.unwrap();
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("slowest read beside the waiting install: {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "a reader waited {slowest:?} behind install");
    assert!(!install.is_finished(), "install cannot finish while the writer holds the table");

    writer.batch_execute("COMMIT").await.unwrap();
    let (sql, client) = tokio::time::timeout(Duration::from_secs(30), install).await.expect("install ends").unwrap();
    let sql = sql.expect("install succeeds once the writer is gone");
    assert!(sql.contains("CREATE TRIGGER \"post_save_delete\""), "{sql}");
    assert!(!sql.contains("DROP TRIGGER IF EXISTS \"post_save_update\""), "unchanged triggers stay: {sql}");
    let watched = config(&format!("{WATCH}operations = [\"insert\", \"update\", \"delete\"]\n"));
    assert!(install::check(&client, &watched).await.unwrap().is_empty());
}
