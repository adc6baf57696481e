//! Logical replication: a table watched on a subscriber (durable, the default statement-level
//! INSERT capture) yields events for the rows that replication applies there, marked `raw`
//! (DESIGN.md: saves under `session_replication_role = replica`, which apply workers run
//! with). The publisher and the subscriber are two databases of a cluster with
//! `wal_level = logical` ([`TestDb::new_logical`]); the real `post-save` binary watches the
//! subscriber.
//!
//! PostgreSQL does not fire statement-level triggers for rows applied by logical replication;
//! row-level triggers enabled ALWAYS do fire (DESIGN.md, "Rules that come from PostgreSQL
//! itself").

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio_postgres::NoTls;

use crate::support;
use crate::support::db::{TestDb, error_chain, quote_ident, quote_literal};
use crate::support::logd::{LogDaemon, log_handlers};
use crate::support::{post_save_ok, wait_for_sql};

const ITEM: &str = "CREATE TABLE item (id bigint PRIMARY KEY, name text NOT NULL)";

/// A subscription and the slot it reads on the publisher, both dropped when this is dropped
/// (before the databases: neither a database with a subscription nor one with a slot can be
/// dropped).
struct Subscription {
    name: String,
    subscriber: String,
    publisher: String,
}

impl Drop for Subscription {
    /// Runs on a thread with a runtime of its own: this may run inside a tokio runtime.
    fn drop(&mut self) {
        let (name, subscriber, publisher) = (self.name.clone(), self.subscriber.clone(), self.publisher.clone());
        let cleanup = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async move {
                let quoted = quote_ident(&name);
                // Detached from its slot first, so DROP SUBSCRIPTION need not reach the
                // publisher; the slot is dropped below once its walsender is gone.
                let statements = [
                    format!("ALTER SUBSCRIPTION {quoted} DISABLE"),
                    format!("ALTER SUBSCRIPTION {quoted} SET (slot_name = NONE)"),
                    format!("DROP SUBSCRIPTION {quoted}"),
                ];
                let (client, connection) = tokio_postgres::connect(&subscriber, NoTls).await?;
                tokio::spawn(connection);
                for sql in statements {
                    client.batch_execute(&sql).await?;
                }
                let (client, connection) = tokio_postgres::connect(&publisher, NoTls).await?;
                tokio::spawn(connection);
                let deadline = tokio::time::Instant::now() + support::PATIENCE;
                loop {
                    client
                        .execute(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                                  WHERE slot_name = $1 AND NOT active",
                            &[&name],
                        )
                        .await?;
                    let left = client
                        .query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&name])
                        .await?
                        .get::<_, i64>(0);
                    if left == 0 || tokio::time::Instant::now() > deadline {
                        return Ok::<_, tokio_postgres::Error>(());
                    }
                    // The apply worker's walsender exits shortly after DISABLE.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop subscription {}: {}", self.name, error_chain(&e)),
            Err(_) => eprintln!("warning: dropping subscription {} panicked", self.name),
        }
    }
}

/// A publisher and a subscriber of `item`, the subscriber's copy watched by post-save, and
/// the subscription between them (dropped first: fields drop in order).
struct Replica {
    _subscription: Subscription,
    publisher: TestDb,
    subscriber: TestDb,
    _dir: TempDir,
    config: PathBuf,
}

/// Sets up the publication, its slot, the subscriber's table with the capture installed by the
/// real binary (`operations` of the watch), and the subscription. Starts no daemon.
async fn replica(operations: &str) -> Replica {
    let publisher = TestDb::new_logical().await;
    let subscriber = TestDb::new_logical().await;
    // Slot and subscription names are cluster-wide; the subscriber database's name is unique.
    let name = format!("sub_{}", subscriber.name);
    publisher.psql_ok(ITEM);
    publisher.psql_ok("CREATE PUBLICATION shop FOR TABLE item");
    // Made here: CREATE SUBSCRIPTION cannot make a slot in its own cluster (it would wait for
    // its own transaction), hence `create_slot = false` below.
    publisher.psql_ok(&format!("SELECT pg_create_logical_replication_slot({}, 'pgoutput')", quote_literal(&name)));
    let subscription = Subscription {
        name: name.clone(),
        subscriber: subscriber.conninfo.clone(),
        publisher: publisher.conninfo.clone(),
    };

    subscriber.psql_ok(ITEM);
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("post-save.toml");
    let toml = format!(
        "[[watch]]\ntable = \"public.item\"\nmode = \"durable\"\noperations = {operations}\n{}",
        log_handlers(operations.contains("delete"))
    );
    std::fs::write(&config, toml).unwrap();
    post_save_ok(&config, &subscriber, &["triggers", "install"]);
    subscriber.psql_ok(&format!(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION shop \
         WITH (create_slot = false, slot_name = {}, copy_data = false)",
        quote_ident(&name),
        quote_literal(&publisher.conninfo),
        quote_literal(&name)
    ));
    Replica { _subscription: subscription, publisher, subscriber, _dir: dir, config }
}

fn assert_replicated(event: &Value, op: &str, id: i64) {
    assert_eq!(event["sender"], "public.item", "{event}");
    assert_eq!(event["op"], op, "{event}");
    assert_eq!(event["pk"], json!({"id": id}), "{event}");
    assert_eq!(event["raw"], true, "a save applied by replication is raw: {event}");
}

#[tokio::test]
async fn rows_inserted_on_the_publisher_arrive_from_the_subscriber_as_raw() {
    let r = replica(r#"["insert", "update"]"#).await;
    let mut daemon = LogDaemon::start(&r.config, &r.subscriber).await;
    r.publisher.psql_ok("INSERT INTO item VALUES (1, 'espresso machine')");
    r.publisher.psql_ok("INSERT INTO item SELECT g, 'grinder ' || g FROM generate_series(2, 4) g");
    // The rows reached the subscriber: a missing event is the capture's doing, not replication's.
    wait_for_sql(&r.subscriber, "SELECT count(*) FROM item", 4).await;
    let mut events = Vec::new();
    for n in 1..=4 {
        events.push(
            daemon
                .next_event(&format!(
                    "replicated insert {n} of 4 (statement-level triggers do not fire for applied rows)"
                ))
                .await,
        );
    }
    events.sort_by_key(|e| e["pk"]["id"].as_i64());
    for (event, id) in events.iter().zip(1..) {
        assert_replicated(event, "insert", id);
        assert_eq!(event["created"], true, "{event}");
    }
    assert_eq!(events[0]["instance"]["name"], "espresso machine");
    assert_eq!(events[3]["instance"]["name"], "grinder 4");
    daemon.assert_quiet(Duration::from_millis(300), "the replicated inserts").await;
    daemon.stop().await;
}

#[tokio::test]
async fn rows_updated_and_deleted_on_the_publisher_arrive_from_the_subscriber_as_raw() {
    let r = replica(r#"["insert", "update", "delete"]"#).await;
    let mut daemon = LogDaemon::start(&r.config, &r.subscriber).await;
    r.publisher.psql_ok("INSERT INTO item VALUES (1, 'kettle')");
    wait_for_sql(&r.subscriber, "SELECT count(*) FROM item", 1).await;
    r.publisher.psql_ok("UPDATE item SET name = 'tea kettle' WHERE id = 1");
    // The insert's event (if the capture saw it) comes first: same row, commit order.
    let events = daemon.events_until("the replicated update", |e| e["op"] == "update").await;
    let update = events.last().unwrap();
    assert_replicated(update, "update", 1);
    assert_eq!(update["update_fields"], json!(["name"]), "{update}");
    assert_eq!(update["instance"]["name"], "tea kettle", "{update}");
    r.publisher.psql_ok("DELETE FROM item WHERE id = 1");
    let delete = daemon.next_event("the replicated delete").await;
    assert_replicated(&delete, "delete", 1);
    assert_eq!(delete["signal"], "post_delete", "{delete}");
    daemon.stop().await;
}
