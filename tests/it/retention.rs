//! Ledger retention by rotating partitions: bounded while an old snapshot stops vacuum, pending
//! events carried over rather than emptied, a reader's lock waited for, and an upgrade from the
//! single-table ledger keeps every event.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use post_save::handler::{HandlerError, handler_fn};
use post_save::testing::install;
use post_save::{Receiver, Registry, db};
use tokio_postgres::Client;

use crate::support::db::{TestDb, query_i64};
use crate::support::{PATIENCE, config, install, start, start_with, wait_for_sql};

const SHOP: &str = "CREATE TABLE shop_order (
    id bigserial PRIMARY KEY, user_id bigint NOT NULL, product text NOT NULL,
    quantity integer NOT NULL DEFAULT 1, created_at timestamptz NOT NULL DEFAULT now())";

const WATCH: &str = "[[watch]]\ntable = \"public.shop_order\"\n";

/// The ledger's size on disk: every partition with its indexes and TOAST.
const LEDGER_BYTES: &str = "SELECT sum(pg_total_relation_size(relid))::int8 FROM pg_partition_tree('post_save.event')";

/// When the current partition took over the writes, as text (changes at every rotation).
async fn rotated_at(client: &Client) -> String {
    client.query_one("SELECT since::text FROM post_save.ledger_rotation", &[]).await.expect("rotation row").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_stays_bounded_while_an_old_snapshot_stops_vacuum() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    db.psql_ok("CREATE TABLE control (id int)");
    let config = config(&format!("[daemon]\nkeep_handled = \"1s\"\n{WATCH}"));
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;

    // A session holding an old snapshot and a transaction id, as a long report or pg_dump does.
    // It reads a user table, not the ledger, so it holds no lock that retention would wait for.
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT txid_current(); SELECT count(*) FROM shop_order")
        .await
        .expect("holder");
    let holder_pid = query_i64(&holder, "SELECT pg_backend_pid()::int8").await;
    // The control: rows deleted now cannot be vacuumed while it holds the snapshot.
    db.psql_ok("INSERT INTO control SELECT generate_series(1, 1000); DELETE FROM control");
    let vacuum = db.psql("VACUUM (VERBOSE) control");
    let report = String::from_utf8_lossy(&vacuum.stderr);
    // PostgreSQL 15 and later say "1000 are dead but not yet removable", 14 "1000 dead row
    // versions cannot be removed yet".
    assert!(
        report.contains("1000 are dead but not yet removable")
            || report.contains("1000 dead row versions cannot be removed yet"),
        "the old snapshot does not hold vacuum back: {report}"
    );

    // 200 single-row saves a second for 20 s, the ledger's size sampled every half second.
    let writer = db.client().await;
    let sampler = db.client().await;
    let insert =
        writer.prepare("INSERT INTO shop_order (user_id, product) VALUES ($1::int8, 'p' || $1::int8)").await.unwrap();
    let (rows, per_second, seconds) = (4_000i64, 200i64, 20i64);
    let mut tick = tokio::time::interval(Duration::from_millis(1_000 / u64::try_from(per_second).unwrap()));
    let mut samples: Vec<(f64, i64)> = Vec::new();
    let mut rotations = HashSet::new();
    let began = tokio::time::Instant::now();
    for i in 1..=rows {
        tick.tick().await;
        writer.execute(&insert, &[&i]).await.expect("insert");
        if i % (per_second / 2) == 0 {
            samples.push((began.elapsed().as_secs_f64(), query_i64(&sampler, LEDGER_BYTES).await));
            rotations.insert(rotated_at(&sampler).await);
        }
    }
    assert!(began.elapsed() < Duration::from_secs(u64::try_from(seconds).unwrap() + 10), "the writer fell far behind");

    let events = daemon.take(usize::try_from(rows).unwrap()).await;
    let products: HashSet<String> = events.iter().map(|e| e.instance["product"].as_str().unwrap().to_owned()).collect();
    assert_eq!(products.len(), usize::try_from(rows).unwrap(), "every save arrives once");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;

    let still_held: bool = sampler
        .query_one(
            "SELECT backend_xmin IS NOT NULL FROM pg_stat_activity WHERE pid = $1::int4",
            &[&(holder_pid as i32)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(still_held, "the holder let its snapshot go during the run");
    assert!(rotations.len() >= 8, "only {} rotations in {seconds} s with keep_handled = 1s", rotations.len());

    // Flat: past the first 5 s, the second half of the run never needs much more room than the
    // first. Growing with the writes, it would need twice as much.
    let settled: Vec<&(f64, i64)> = samples.iter().filter(|(t, _)| *t >= 5.0).collect();
    let (early, late) = settled.split_at(settled.len() / 2);
    let early_max = early.iter().map(|(_, b)| *b).max().unwrap();
    let late_max = late.iter().map(|(_, b)| *b).max().unwrap();
    let table: Vec<String> = samples.iter().map(|(t, b)| format!("{t:.1}s {} kB", b / 1024)).collect();
    eprintln!("ledger size while writing: {}", table.join(", "));
    assert!(
        late_max <= early_max + early_max / 2,
        "the ledger grew from {early_max} to {late_max} bytes: {}",
        table.join(", ")
    );
    let live = query_i64(&sampler, "SELECT count(*) FROM post_save.event").await;
    assert!(live < rows / 2, "{live} of {rows} ledger rows are still there");

    holder.batch_execute("COMMIT").await.unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_still_pending_when_its_partition_is_emptied_is_kept_and_delivered_once() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let config = config(&format!("[daemon]\nkeep_handled = \"1s\"\n{WATCH}"));
    install(&db, &config).await;

    // A handler that holds the event of product "held" until released.
    let release = Arc::new(tokio::sync::Notify::new());
    let held_calls = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    {
        let (release, calls) = (Arc::clone(&release), Arc::clone(&held_calls));
        registry
            .register(
                Receiver::new("slow"),
                handler_fn(move |event| {
                    let (release, calls) = (Arc::clone(&release), Arc::clone(&calls));
                    async move {
                        if event.instance["product"] == "held" {
                            calls.fetch_add(1, Ordering::SeqCst);
                            release.notified().await;
                        }
                        Ok::<(), HandlerError>(())
                    }
                }),
            )
            .unwrap();
    }
    let mut daemon = start_with(&db, config, &mut registry).await;
    let client = db.client().await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'held')");
    let first = daemon.next().await;
    assert_eq!(first.instance["product"], "held");
    let held_slot = query_i64(&client, "SELECT slot::int8 FROM post_save.event WHERE handled_at IS NULL").await;

    // Four rotations, so every partition was emptied once, with saves going on meanwhile.
    let mut seen = HashSet::from([rotated_at(&client).await]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut saved = 0;
    while seen.len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "only {} rotations", seen.len() - 1);
        db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (2, 'other')");
        saved += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen.insert(rotated_at(&client).await);
    }
    daemon.take(saved).await;
    let pending = client
        .query_one(
            "SELECT count(*), min(slot)::int8 FROM post_save.event \
              WHERE handled_at IS NULL AND rows::text LIKE '%\"held\"%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(pending.get::<_, i64>(0), 1, "the pending event was emptied with its partition");
    assert_ne!(pending.get::<_, Option<i64>>(1), Some(held_slot), "the event was never carried over");

    // Released, it is acknowledged where it now is, and delivered no second time.
    release.notify_waiters();
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(held_calls.load(Ordering::SeqCst), 1, "the held event ran twice");
    daemon.assert_quiet(Duration::from_millis(200)).await;
    // And then it goes the way of every acknowledged event.
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE rows::text LIKE '%\"held\"%'", 0).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_holding_a_ledger_lock_delays_retention_without_stopping_delivery() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let config = config(&format!("[daemon]\nkeep_handled = \"1s\"\n{WATCH}"));
    install(&db, &config).await;
    let client = db.client().await;
    // An analyst's open transaction that read the ledger: its locks last until it ends.
    let reader = db.client().await;
    reader.batch_execute("BEGIN; SELECT count(*) FROM post_save.event").await.unwrap();
    let before = rotated_at(&client).await;
    let mut daemon = start(&db, config).await;

    for i in 0..20 {
        db.psql_ok(&format!("INSERT INTO shop_order (user_id, product) VALUES ({i}, 'while read')"));
        let event = tokio::time::timeout(Duration::from_secs(5), daemon.next()).await.expect("delivery stalled");
        assert_eq!(event.instance["product"], "while read");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rotated_at(&client).await, before, "a partition was emptied under a reader's lock");

    reader.batch_execute("COMMIT").await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while rotated_at(&client).await == before {
        assert!(tokio::time::Instant::now() < deadline, "retention did not resume after the reader ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_from_the_single_table_ledger_keeps_every_event_and_its_state() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let config = config(WATCH);
    let mut admin = db.client().await;
    db::migrate_to(&mut admin, Some(4)).await.expect("migrate to V4");
    // The ledger rows a V4-era capture wrote (a capture is generated for the schema it runs
    // with, so today's would not run on V4): one single-row statement, one of three rows.
    let head = r#"{"raw":false,"txid":7,"at":"2026-12-01T00:00:00+00:00","actor":{"role":"app","application_name":"psql","client_addr":null,"pid":1,"actor":null},"origin":null,"keys":["id"]}"#;
    db.psql_ok(&format!(
        "INSERT INTO post_save.event (sender, op, n, head, rows) VALUES \
         ('public.shop_order', 'insert', 1, '{head}', '[{{\"id\":1,\"user_id\":1,\"product\":\"acknowledged before\"}}]'), \
         ('public.shop_order', 'insert', 3, '{head}', \
          '[{{\"id\":2,\"user_id\":1,\"product\":\"pending 1\"}},{{\"id\":3,\"user_id\":2,\"product\":\"pending 2\"}},{{\"id\":4,\"user_id\":3,\"product\":\"pending 3\"}}]')"
    ));
    db.psql_ok("SELECT setval('shop_order_id_seq', 4)");
    db.psql_ok("UPDATE post_save.event SET handled_at = now() WHERE rows::text LIKE '%acknowledged before%'");
    let old_ids: Vec<i64> = admin
        .query("SELECT id FROM post_save.event ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(old_ids.len(), 2);

    let applied = db::migrate(&mut admin).await.expect("migrate to the latest");
    assert!(applied.iter().any(|m| m.contains("rotating_ledger")), "{applied:?}");
    let new_ids: Vec<i64> = admin
        .query("SELECT id FROM post_save.event ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(new_ids, old_ids, "the ledger rows kept their ids");
    install::install(&mut admin, &config).await.expect("install triggers");

    let mut daemon = start(&db, config).await;
    let mut products: Vec<String> =
        daemon.take(3).await.iter().map(|e| e.instance["product"].as_str().unwrap().to_owned()).collect();
    products.sort();
    assert_eq!(products, ["pending 1", "pending 2", "pending 3"]);
    // A later save arrives next, and nothing else.
    daemon
        .assert_quiet_until(&db, "INSERT INTO shop_order (user_id, product) VALUES (9, 'after')", |e| {
            e.instance["product"] == "after"
        })
        .await;
    let newest = query_i64(&admin, "SELECT max(id) FROM post_save.event").await;
    assert!(newest > *old_ids.last().unwrap(), "ids went back: {newest} after {old_ids:?}");
    daemon.stop().await;
}
