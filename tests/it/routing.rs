//! Routing options common to every handler kind: CEL filters, and loop prevention for handlers
//! that save to watched tables (`origin`, `max_depth`). Real PostgreSQL, embedded daemon.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use post_save::handler::{HandlerError, handler_fn, origin_for};
use post_save::testing::Expr;
use post_save::{Receiver, Registry, SaveEvent};
use tokio::sync::mpsc;

use crate::support::db::TestDb;
use crate::support::{config, install, start_with, wait_for_sql};

const TABLES: &str = "CREATE TABLE shop_order (id bigserial PRIMARY KEY, status text NOT NULL, total int NOT NULL);
    CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)";

const CONFIG: &str = "[daemon]\nsweep_interval = \"1h\"\n\
    [[watch]]\ntable = \"public.shop_order\"\n\
    [[watch]]\ntable = \"public.counter\"\n";

async fn setup() -> (TestDb, post_save::Config) {
    let db = TestDb::new().await;
    db.psql_ok(TABLES);
    let config = config(CONFIG);
    install(&db, &config).await;
    (db, config)
}

fn collect(name: &str, tx: mpsc::UnboundedSender<SaveEvent>) -> (Receiver, impl post_save::handler::Handler) {
    let receiver = Receiver::new(name);
    let handler = handler_fn(move |event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(event);
            Ok::<(), HandlerError>(())
        }
    });
    (receiver, handler)
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<SaveEvent>) -> SaveEvent {
    tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("an event in time").expect("channel open")
}

#[tokio::test]
async fn a_filter_lets_only_matching_events_through() {
    let (db, config) = setup().await;
    let (tx, mut paid) = mpsc::unbounded_channel();
    let mut registry = Registry::new();
    let (receiver, handler) = collect("paid-orders", tx);
    let filter =
        Expr::compile(r#"sender == "public.shop_order" && instance.status == "paid" && instance.total >= 100"#)
            .expect("filter compiles");
    registry.register(receiver.filter(filter), handler).unwrap();
    let mut daemon = start_with(&db, config, &mut registry).await;

    db.psql_ok(
        "INSERT INTO shop_order (status, total) VALUES ('new', 500), ('paid', 50), ('paid', 150);
         UPDATE shop_order SET status = 'paid' WHERE id = 1",
    );
    // The collector sees all four saves; the filtered handler two: id 3 (insert), id 1 (update).
    let all = daemon.take(4).await;
    assert_eq!(all.len(), 4);
    let first = recv(&mut paid).await;
    let second = recv(&mut paid).await;
    let mut ids = [first.pk["id"].as_i64().unwrap(), second.pk["id"].as_i64().unwrap()];
    ids.sort_unstable();
    assert_eq!(ids, [1, 3]);
    // A later save that passes the filter comes next, and nothing else by the time the ledger is
    // empty.
    db.psql_ok("INSERT INTO shop_order (status, total) VALUES ('paid', 1000)");
    assert_eq!(recv(&mut paid).await.instance["total"], 1000, "no other event passes the filter");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    assert!(paid.try_recv().is_err(), "no other event passes the filter");
    daemon.stop().await;
}

#[tokio::test]
async fn a_filter_that_fails_on_an_event_skips_it_and_keeps_running() {
    let (db, config) = setup().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut registry = Registry::new();
    let (receiver, handler) = collect("counter-only", tx);
    // `instance.status` does not exist on counter rows: an evaluation error, not a match.
    registry.register(receiver.filter(Expr::compile(r#"instance.status == "paid""#).unwrap()), handler).unwrap();
    let mut daemon = start_with(&db, config, &mut registry).await;
    db.psql_ok("INSERT INTO counter (id) VALUES (1)");
    db.psql_ok("INSERT INTO shop_order (status, total) VALUES ('paid', 1)");
    let _ = daemon.take(2).await;
    let e = recv(&mut rx).await;
    assert_eq!(e.sender, "public.shop_order");
    daemon.stop().await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
}

/// A Rust handler that saves to the table it watches, tagging its write with `origin_for`.
async fn bump_counter(db: &TestDb, max_depth: Option<u32>) -> (Vec<SaveEvent>, i32, usize) {
    let (db_config, config) = (db, config(CONFIG));
    let runs = Arc::new(AtomicUsize::new(0));
    let client = Arc::new(db_config.client().await);
    let mut registry = Registry::new();
    let mut receiver = Receiver::new("bump").sender(&post_save::TableName::parse("public.counter").unwrap());
    if let Some(d) = max_depth {
        receiver = receiver.max_depth(d);
    }
    let handler = {
        let runs = runs.clone();
        let client = client.clone();
        handler_fn(move |event: SaveEvent| {
            let runs = runs.clone();
            let client = client.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let origin = origin_for("bump", &event);
                let id = event.pk["id"].as_i64().unwrap_or_default() as i32;
                client
                    .batch_execute(&format!(
                        "BEGIN; SELECT post_save.set_origin('{origin}');
                         UPDATE counter SET n = n + 1 WHERE id = {id}; COMMIT;"
                    ))
                    .await
                    .map_err(|e| HandlerError::retry(e.to_string()))
            }
        })
    };
    registry.register(receiver, handler).unwrap();
    let mut daemon = start_with(db, config, &mut registry).await;
    db.psql_ok("INSERT INTO counter (id) VALUES (1)");
    let depth = max_depth.unwrap_or(1) as usize;
    // The insert plus one update per level the handler is allowed to go.
    let events = daemon.take(1 + depth).await;
    daemon.assert_quiet(Duration::from_millis(1500)).await;
    daemon.stop().await;
    let n: i32 = db.client().await.query_one("SELECT n FROM counter WHERE id = 1", &[]).await.unwrap().get(0);
    (events, n, runs.load(Ordering::SeqCst))
}

#[tokio::test]
async fn a_handler_saving_to_its_own_table_does_not_loop() {
    let db = TestDb::new().await;
    db.psql_ok(TABLES);
    install(&db, &config(CONFIG)).await;
    let (events, n, runs) = bump_counter(&db, None).await;
    assert_eq!(n, 1, "the handler ran for the insert only, not for its own update");
    assert_eq!(runs, 1);
    assert_eq!(events[0].origin, None);
    assert_eq!(events[1].origin.as_deref(), Some("bump@1"), "the handler's save carries its origin");
    let ledger: i64 = db.client().await.query_one("SELECT count(*) FROM post_save.event", &[]).await.unwrap().get(0);
    assert_eq!(ledger, 2);
}

#[tokio::test]
async fn max_depth_lets_a_handler_recurse_exactly_that_deep() {
    let db = TestDb::new().await;
    db.psql_ok(TABLES);
    install(&db, &config(CONFIG)).await;
    let (events, n, runs) = bump_counter(&db, Some(3)).await;
    assert_eq!(n, 3, "insert → bump@1 → bump@2 → bump@3, which is not routed back");
    assert_eq!(runs, 3);
    let origins: Vec<_> = events.iter().map(|e| e.origin.clone()).collect();
    assert_eq!(origins, [None, Some("bump@1".into()), Some("bump@2".into()), Some("bump@3".into())]);
}

#[test]
fn filter_errors_name_the_key_and_line() {
    let text = format!("{CONFIG}\n[[handler]]\nname = \"h\"\nkind = \"log\"\nfilter = 'instanse.status == \"paid\"'\n");
    let e = post_save::Config::parse(&text).unwrap_err().to_string();
    assert!(e.contains("handler[0].filter"), "{e}");
    assert!(e.contains("`instanse`"), "{e}");
    assert!(e.contains(&format!("{}", text.lines().position(|l| l.starts_with("filter")).unwrap() + 1)), "{e}");
    let bad = format!("{CONFIG}\n[[handler]]\nname = \"h\"\nkind = \"log\"\nmax_depth = 0\n");
    assert!(post_save::Config::parse(&bad).unwrap_err().to_string().contains("max_depth"));
}
