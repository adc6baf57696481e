//! `capture = "wal"`: saves read from the write-ahead log through a logical replication slot,
//! no trigger on the table, against a real PostgreSQL with `wal_level = logical`.

use std::time::Duration;

use post_save::event::Op;
use post_save::handler::{HandlerError, handler_fn};
use post_save::{Receiver, Registry, TableName};

use crate::support::db::TestDb;
use crate::support::{SHOP_BARRIER, config, install, is_shop_barrier, start, start_with, wait_for_sql};

const SHOP: &str = "CREATE TABLE shop_order (
    id bigserial PRIMARY KEY, user_id bigint NOT NULL, product text NOT NULL,
    quantity integer NOT NULL DEFAULT 1, paid boolean NOT NULL DEFAULT false,
    price numeric(10,2), tags text[], meta jsonb,
    created_at timestamptz NOT NULL DEFAULT now())";

fn wal_config(extra: &str) -> post_save::Config {
    config(&format!(
        "[daemon]\nsweep_interval = \"1h\"\n[[watch]]\ntable = \"public.shop_order\"\ncapture = \"wal\"\n{extra}"
    ))
}

async fn shop(extra: &str) -> (TestDb, post_save::Config) {
    let db = TestDb::new_logical().await;
    db.psql_ok(SHOP);
    let config = wal_config(extra);
    install(&db, &config).await;
    (db, config)
}

/// The confirmed position of the database's slot, as text.
async fn slot_position(db: &TestDb) -> String {
    let client = db.client().await;
    let slot = post_save::testing::slot_name(&db.name);
    client
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot")
        .get(0)
}

#[tokio::test]
async fn saves_from_psql_arrive_with_their_values_and_no_trigger_is_installed() {
    let (db, config) = shop("operations = [\"insert\", \"update\", \"delete\"]\ninclude_old = true\n").await;
    let triggers = db.query_i64("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'shop_order'::regclass").await;
    assert_eq!(triggers, 0, "capture = \"wal\" installs no trigger");
    let client = db.client().await;
    assert!(
        post_save::testing::install::check(&client, &config).await.expect("check").is_empty(),
        "in sync after install"
    );

    let mut daemon = start(&db, config).await;
    db.psql_ok(
        "INSERT INTO shop_order (user_id, product, quantity, price, tags, meta) \
         VALUES (7, 'espresso machine', 2, 249.90, '{gift,\"red one\"}', '{\"k\": [1, 2]}')",
    );
    let e = daemon.next().await;
    assert_eq!((e.op, e.created, e.sender.as_str()), (Op::Insert, true, "public.shop_order"));
    assert_eq!(e.pk.get("id").and_then(|v| v.as_i64()), Some(1));
    assert_eq!(e.instance["product"], "espresso machine");
    assert_eq!(e.instance["quantity"], 2);
    assert_eq!(e.instance["paid"], false);
    assert_eq!(e.instance["price"].to_string(), "249.90");
    assert_eq!(e.instance["tags"], serde_json::json!(["gift", "red one"]));
    assert_eq!(e.instance["meta"], serde_json::json!({"k": [1, 2]}));
    let created = e.instance["created_at"].as_str().expect("created_at").to_owned();
    assert!(created.contains('T') && created.ends_with("+00:00"), "{created}");
    assert_eq!(e.using, db.name);
    assert!(e.txid > 0);
    assert!(e.at.ends_with("+00:00"), "{}", e.at);
    let first_id = e.id.expect("an id");

    db.psql_ok("UPDATE shop_order SET quantity = 5 WHERE id = 1");
    let e = daemon.next().await;
    assert_eq!(e.op, Op::Update);
    assert_eq!(e.update_fields, Some(vec!["quantity".to_owned()]));
    assert_eq!(e.instance["quantity"], 5);
    assert_eq!(e.old["quantity"], 2, "include_old");
    assert!(e.id.expect("an id") > first_id, "ids follow the WAL");
    // No value changed: no event; the next real change proves the stream still flows.
    db.psql_ok("UPDATE shop_order SET quantity = 5 WHERE id = 1");
    db.psql_ok("DELETE FROM shop_order WHERE id = 1");
    let e = daemon.next().await;
    assert_eq!((e.op, e.signal), (Op::Delete, post_save::Signal::PostDelete));
    assert_eq!(e.instance["product"], "espresso machine", "the deleted row, from REPLICA IDENTITY FULL");

    // A multi-row statement in one transaction, and a transaction naming its actor.
    db.psql_ok(
        "BEGIN; SELECT pg_logical_emit_message(true, 'post_save.actor', 'user:42'); \
         INSERT INTO shop_order (user_id, product) SELECT g, 'book' FROM generate_series(1, 100) g; COMMIT",
    );
    let events = daemon.take(100).await;
    assert!(events.iter().all(|e| e.actor.actor.as_deref() == Some("user:42")));
    let txids: std::collections::HashSet<i64> = events.iter().map(|e| e.txid).collect();
    assert_eq!(txids.len(), 1, "one transaction");
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
    assert_eq!(
        db.query_i64("SELECT count(*) FROM post_save.event").await,
        0,
        "the writer's transaction wrote nothing to the ledger"
    );
}

#[tokio::test]
async fn saves_made_while_the_daemon_is_down_arrive_once_after_it_starts() {
    let (db, config) = shop("").await;
    // Saved before the daemon ever ran: the slot made by `triggers install` keeps them.
    db.psql_ok("INSERT INTO shop_order (user_id, product) SELECT g, 'early' FROM generate_series(1, 50) g");
    let mut daemon = start(&db, config.clone()).await;
    let events = daemon.take(50).await;
    assert!(events.iter().all(|e| e.instance["product"] == "early"));
    daemon.assert_quiet(Duration::from_millis(300)).await;
    daemon.stop().await;
    let confirmed = slot_position(&db).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'while down')");
    let mut daemon = start(&db, config).await;
    let e = daemon.next().await;
    assert_eq!(e.instance["product"], "while down", "only what was not confirmed is streamed again");
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
    assert_ne!(slot_position(&db).await, confirmed, "the slot moved on");
}

#[tokio::test]
async fn a_daemon_stopped_while_saves_stream_in_delivers_none_of_them_again() {
    let (db, config) = shop("").await;
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let client = db.client().await;
        let writing = std::sync::Arc::clone(&writing);
        tokio::spawn(async move {
            let mut saved = 0i64;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .execute("INSERT INTO shop_order (user_id, product) VALUES ($1, 'streaming')", &[&saved])
                    .await
                    .expect("insert");
                saved += 1;
            }
            saved
        })
    };
    // Each daemon stops while the server is still sending it saves: what it delivered before
    // stopping must be confirmed, so the next one starts after it.
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut daemon = start(&db, config.clone()).await;
        seen.extend(daemon.take(30).await);
        seen.extend(daemon.stop_collecting().await);
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let saved = usize::try_from(writer.await.expect("writer")).expect("count");
    let mut daemon = start(&db, config).await;
    let mut ids: std::collections::HashSet<i64> = std::collections::HashSet::new();
    let mut repeated = 0;
    for e in &seen {
        if !ids.insert(e.pk["id"].as_i64().expect("id")) {
            repeated += 1;
        }
    }
    while ids.len() < saved {
        let e = daemon.next().await;
        if !ids.insert(e.pk["id"].as_i64().expect("id")) {
            repeated += 1;
        }
    }
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
    assert_eq!(repeated, 0, "saves delivered again after a clean stop ({saved} saved)");
}

/// The slot's walsender for the test's database, ended from outside as a failover or an
/// administrator would end it; returns how many were ended.
async fn end_walsender(db: &TestDb) -> i64 {
    db.query_i64(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE backend_type = 'walsender' AND datname = '{}'",
        db.name
    ))
    .await
}

#[tokio::test]
async fn a_lost_stream_resumes_from_the_slot_without_losing_or_repeating_a_save() {
    // with no read pause: each segment is handed over as it comes
    let db = TestDb::new_logical().await;
    db.psql_ok(SHOP);
    let config = config(
        "[daemon]\nsweep_interval = \"1h\"\n\
         [[watch]]\ntable = \"public.shop_order\"\ncapture = \"wal\"\n",
    );
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'before')");
    assert_eq!(daemon.next().await.instance["product"], "before");
    // Confirmed before the connection goes, so the resumed stream starts after it.
    let lsn_now: String =
        db.client().await.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
    let slot = post_save::testing::slot_name(&db.name);
    wait_for_sql(
        &db,
        &format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' \
             AND confirmed_flush_lsn >= '{lsn_now}'::pg_lsn"
        ),
        1,
    )
    .await;
    assert_eq!(end_walsender(&db).await, 1, "one walsender streams the slot");
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (2, 'while reconnecting')");
    let e = daemon.next().await;
    assert_eq!(e.instance["product"], "while reconnecting", "the save made while the stream was down, once");
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (3, 'after')");
    assert_eq!(daemon.next().await.instance["product"], "after");
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_dead_delivery_is_kept_as_a_dead_letter_and_the_stream_moves_on() {
    let (db, config) = shop("").await;
    let mut registry = Registry::from_config(&config).expect("registry");
    let orders = TableName::new("public", "shop_order");
    registry
        .register(
            Receiver::new("always-fails").sender(&orders).retry(post_save::config::RetryPolicy {
                attempts: 2,
                backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(10),
            }),
            handler_fn(|_event| async { Err::<(), _>(HandlerError::retry("the mail server is down")) }),
        )
        .expect("register");
    let mut daemon = start_with(&db, config.clone(), &mut registry).await;
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'doomed')");
    assert_eq!(daemon.next().await.instance["product"], "doomed");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter WHERE handler = 'always-fails'", 1).await;
    let event: String = db
        .client()
        .await
        .query_one("SELECT event::text FROM post_save.dead_letter WHERE handler = 'always-fails'", &[])
        .await
        .expect("dead letter")
        .get(0);
    assert!(event.contains("doomed"), "{event}");
    daemon.stop().await;
    // Confirmed: a restart does not stream it again.
    let mut daemon = start(&db, config).await;
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
}

#[tokio::test]
async fn install_refuses_a_server_without_logical_wal_and_says_what_to_change() {
    let db = TestDb::new().await;
    let level: String =
        db.client().await.query_one("SELECT current_setting('wal_level')", &[]).await.expect("wal_level").get(0);
    if level == "logical" {
        eprintln!("the shared test server writes logical WAL; nothing to refuse");
        return;
    }
    db.psql_ok(SHOP);
    let mut client = db.client().await;
    post_save::db::migrate(&mut client).await.expect("migrate");
    let err = post_save::testing::install::install(&mut client, &wal_config("")).await.expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("wal_level = logical") && text.contains(&level), "{text}");
    assert_eq!(db.query_i64("SELECT count(*) FROM pg_publication").await, 0, "nothing was changed");
}

/// The table's only row as `row_to_json` writes it.
async fn row_to_json(db: &TestDb, table: &str) -> serde_json::Value {
    let text: String = db
        .client()
        .await
        .query_one(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
        .await
        .expect("row_to_json")
        .get(0);
    serde_json::from_str(&text).expect("json")
}

#[tokio::test]
async fn domain_values_arrive_as_row_to_json_writes_them_also_for_a_domain_made_while_streaming() {
    let db = TestDb::new_logical().await;
    db.psql_ok(
        "CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0); \
         CREATE DOMAIN small_positive AS positive_int CHECK (VALUE < 100); \
         CREATE DOMAIN price AS numeric(10,2); \
         CREATE TYPE mood AS ENUM ('happy', 'sad'); \
         CREATE TABLE gauge (id bigserial PRIMARY KEY, n positive_int, s small_positive, p price, \
                             ns positive_int[], m mood)",
    );
    let config = config("[daemon]\nsweep_interval = \"1h\"\n[[watch]]\ntable = \"public.gauge\"\ncapture = \"wal\"\n");
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;
    db.psql_ok("INSERT INTO gauge (n, s, p, ns, m) VALUES (5, 7, 2.50, '{1,2}', 'happy')");
    let e = daemon.next().await;
    assert_eq!(e.instance["n"], 5);
    assert_eq!(e.instance["ns"], serde_json::json!([1, 2]));
    assert_eq!(*e.instance, row_to_json(&db, "gauge").await);

    // A domain made after the stream started: the table's new relation message names it.
    db.psql_ok(
        "CREATE DOMAIN flag AS boolean; ALTER TABLE gauge ADD COLUMN f flag; \
         UPDATE gauge SET f = true, n = 6",
    );
    let e = daemon.next().await;
    assert_eq!(e.instance["f"], true);
    assert_eq!(*e.instance, row_to_json(&db, "gauge").await);
    daemon.stop().await;
}

#[tokio::test]
async fn check_names_a_published_table_the_config_no_longer_watches() {
    let (db, _config) = shop("").await;
    let client = db.client().await;
    let unwatched = config("[daemon]\nsweep_interval = \"1h\"\n");
    let drift: Vec<String> = post_save::testing::install::check(&client, &unwatched)
        .await
        .expect("check")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        drift,
        ["public.shop_order: is in a post-save publication but is not watched (the slot still streams its saves; \
             `post-save triggers install` takes it out)"]
    );
}

#[tokio::test]
async fn remove_drops_the_publication_and_the_slot() {
    let (db, _config) = shop("").await;
    let slot = post_save::testing::slot_name(&db.name);
    let slots = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'");
    assert_eq!(db.query_i64(&slots).await, 1);
    let mut client = db.client().await;
    let removed = post_save::testing::install::remove(&mut client).await.expect("remove");
    assert_eq!(removed, vec![TableName::new("public", "shop_order")]);
    assert_eq!(db.query_i64(&slots).await, 0);
    assert_eq!(db.query_i64("SELECT count(*) FROM pg_publication").await, 0);
}
