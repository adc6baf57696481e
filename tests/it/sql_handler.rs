//! `kind = "sql"` handlers in the embedded daemon against a real PostgreSQL: exact counts in
//! durable mode, no loops when a handler writes to a table it watches (and exactly `max_depth`
//! levels when allowed), the `origin` other handlers see, dead letters for values that do not
//! fit and statements that cannot run, the types a parameter takes, and `handlers list`.
#![cfg(feature = "sql")]

use std::time::Duration;

use post_save::SaveEvent;

use crate::support::child::binary;
use crate::support::db::TestDb;
use crate::support::{Running, config, install, start, wait_for_sql};

const SHOP: &str = "
    CREATE TABLE shop_customer (
        id bigint PRIMARY KEY, name text NOT NULL,
        order_count integer NOT NULL DEFAULT 0 CHECK (order_count >= 0));
    CREATE TABLE shop_order (
        id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES shop_customer,
        product text NOT NULL, quantity integer NOT NULL DEFAULT 1);
    INSERT INTO shop_customer (id, name) VALUES (1, 'Ada'), (2, 'Grace');";

const COUNT_ORDERS: &str = "UPDATE shop_customer SET order_count = order_count + 1 WHERE id = $1";

/// Every ledger row handled.
const SETTLED: &str = "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL";

/// A TOML basic string holding `s` (a JSON string literal is one).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A `[[handler]]` of kind sql on `db`; `extra` adds keys (sender, created, retry, …).
fn sql_handler(db: &TestDb, name: &str, statement: &str, params: &[&str], extra: &str) -> String {
    let params: Vec<String> = params.iter().map(|p| toml_str(p)).collect();
    format!(
        "[[handler]]\nname = {}\nkind = \"sql\"\nstatement = {}\nparams = [{}]\nurl = {}\n{extra}\n",
        toml_str(name),
        toml_str(statement),
        params.join(", "),
        toml_str(&db.conninfo),
    )
}

/// The config: the test database, these watch tables (durable) and handlers.
fn config_text(db: &TestDb, watches: &[&str], handlers: &str) -> String {
    let watches: String =
        watches.iter().map(|t| format!("[[watch]]\ntable = {}\nmode = \"durable\"\n\n", toml_str(t))).collect();
    format!("[database]\nurl = {}\n\n[daemon]\nsweep_interval = \"1h\"\n\n{watches}{handlers}", toml_str(&db.conninfo))
}

/// Installs the triggers of `text` and starts a daemon running it.
async fn run(db: &TestDb, text: &str) -> Running {
    let config = config(text);
    install(db, &config).await;
    start(db, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_order_increments_its_customer_exactly_once_and_the_writes_carry_the_origin() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let handler = sql_handler(
        &db,
        "count-orders",
        COUNT_ORDERS,
        &["instance.customer_id"],
        "sender = \"public.shop_order\"\ncreated = true",
    );
    let mut daemon = run(&db, &config_text(&db, &["public.shop_order", "public.shop_customer"], &handler)).await;

    for i in 0..12 {
        db.psql_ok(&format!("INSERT INTO shop_order (customer_id, product) VALUES (1, 'book {i}')"));
    }
    // One statement, 30 rows: 30 events.
    db.psql_ok("INSERT INTO shop_order (customer_id, product) SELECT 2, 'pen ' || g FROM generate_series(1, 30) g");

    // 42 orders and the 42 customer updates they cause, each seen by the collector.
    let events = daemon.take(84).await;
    wait_for_sql(&db, SETTLED, 0).await;
    assert_eq!(db.query_i64("SELECT order_count::int8 FROM shop_customer WHERE id = 1").await, 12);
    assert_eq!(db.query_i64("SELECT order_count::int8 FROM shop_customer WHERE id = 2").await, 30);

    let (orders, customers): (Vec<&SaveEvent>, Vec<&SaveEvent>) =
        events.iter().partition(|e| e.sender == "public.shop_order");
    assert_eq!((orders.len(), customers.len()), (42, 42));
    assert!(orders.iter().all(|e| e.origin.is_none()), "saves from psql have no origin");
    for e in &customers {
        assert_eq!(e.origin.as_deref(), Some("count-orders@1"), "{}", e.to_json());
        assert_eq!(e.update_fields, Some(vec!["order_count".to_owned()]));
    }
    daemon.assert_quiet(Duration::from_millis(200)).await;
    daemon.stop().await;
}

/// `counter` watched for inserts and updates, with a handler `bump` that increments the row of
/// every update it receives: a loop, unless the origin stops it. Returns `n` once everything has
/// settled, and the origins of the events in ledger order.
async fn bump_chain(max_depth: Option<u32>) -> (i64, Vec<Option<String>>) {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, note text); INSERT INTO counter (id) VALUES (1)");
    let depth = max_depth.map(|d| format!("max_depth = {d}")).unwrap_or_default();
    let extra = format!("sender = \"public.counter\"\ncreated = false\n{depth}");
    let handler = sql_handler(&db, "bump", "UPDATE counter SET n = n + 1 WHERE id = $1", &["instance.id"], &extra);
    let mut daemon = run(&db, &config_text(&db, &["public.counter"], &handler)).await;

    db.psql_ok("UPDATE counter SET note = 'go' WHERE id = 1");
    let levels = max_depth.unwrap_or(1) as usize;
    let seen = daemon.take(1 + levels).await;
    // A handler's write and its event commit before the event that caused it is acknowledged:
    // once nothing is pending, no handler is running and none will.
    wait_for_sql(&db, SETTLED, 0).await;
    let ledger: Vec<Option<String>> = db
        .client()
        .await
        .query("SELECT head->>'origin' FROM post_save.event ORDER BY id", &[])
        .await
        .expect("ledger")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let collected: Vec<Option<String>> = seen.iter().map(|e| e.origin.clone()).collect();
    assert_eq!(collected, ledger, "the collector saw every ledger event, in order");
    daemon.assert_quiet(Duration::from_millis(200)).await;
    let n = db.query_i64("SELECT n::int8 FROM counter WHERE id = 1").await;
    daemon.stop().await;
    (n, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_writing_its_own_table_runs_once_per_outside_save() {
    let (n, origins) = bump_chain(None).await;
    assert_eq!(n, 1);
    assert_eq!(origins, [None, Some("bump@1".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_depth_three_goes_exactly_three_levels_deep() {
    let (n, origins) = bump_chain(Some(3)).await;
    assert_eq!(n, 3);
    let want: Vec<Option<String>> =
        [None, Some("bump@1"), Some("bump@2"), Some("bump@3")].into_iter().map(|o| o.map(str::to_owned)).collect();
    assert_eq!(origins, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_dead_letters_retried_only_when_retrying_can_help() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let retry = "sender = \"public.shop_order\"\nretry = { attempts = 3, backoff = \"20ms\", max_backoff = \"50ms\" }";
    let handlers = [
        // A string for a bigint: dead at once.
        sql_handler(&db, "bad-type", COUNT_ORDERS, &["instance.product"], retry),
        // A field the event does not have: dead at once.
        sql_handler(&db, "bad-field", COUNT_ORDERS, &["instance.nope"], retry),
        // Not SQL: dead at once.
        sql_handler(
            &db,
            "bad-syntax",
            "UPDATE shop_customer SET order_count = WHERE id = $1",
            &["instance.customer_id"],
            retry,
        ),
        // A CHECK violation: may pass later, so retried until the attempts run out.
        sql_handler(
            &db,
            "violates-check",
            "UPDATE shop_customer SET order_count = -1 WHERE id = $1",
            &["instance.customer_id"],
            retry,
        ),
        // Nothing listens on port 1: retried.
        sql_handler(&db, "unreachable", "SELECT $1::int8", &["instance.id"], retry)
            .replace(&toml_str(&db.conninfo), "\"host=127.0.0.1 port=1 connect_timeout=2\""),
    ];
    let mut daemon = run(&db, &config_text(&db, &["public.shop_order"], &handlers.concat())).await;
    db.psql_ok("INSERT INTO shop_order (customer_id, product) VALUES (1, 'book')");
    daemon.next().await;

    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 5).await;
    wait_for_sql(&db, SETTLED, 0).await;
    let rows = db
        .client()
        .await
        .query("SELECT handler, attempts, last_error FROM post_save.dead_letter ORDER BY handler", &[])
        .await
        .expect("dead letters");
    let dead: Vec<(String, i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let find = |name: &str| dead.iter().find(|d| d.0 == name).unwrap_or_else(|| panic!("no dead letter for {name}"));

    let (_, attempts, error) = find("bad-field");
    assert_eq!(*attempts, 1, "{error}");
    assert!(error.contains("param $1") && error.contains("instance.nope"), "{error}");
    let (_, attempts, error) = find("bad-syntax");
    assert_eq!(*attempts, 1, "{error}");
    assert!(error.contains("42601"), "{error}");
    let (_, attempts, error) = find("bad-type");
    assert_eq!(*attempts, 1, "{error}");
    assert!(error.contains("param $1 (`instance.product`): a string cannot be bound to type int8"), "{error}");
    let (_, attempts, error) = find("violates-check");
    assert_eq!(*attempts, 3, "{error}");
    assert!(error.contains("23514"), "{error}");
    let (_, attempts, error) = find("unreachable");
    assert_eq!(*attempts, 3, "{error}");
    assert!(error.contains("cannot connect"), "{error}");

    assert_eq!(db.query_i64("SELECT sum(order_count)::int8 FROM shop_customer").await, 0, "nothing was written");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_type_round_trips() {
    let db = TestDb::new().await;
    let columns = "id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, num numeric, \
                   flag bool, t text, vc varchar(20), ch char(3), j json, jb jsonb, u uuid, ts timestamptz, \
                   d date, tags text[], ids int8[], grid int4[], m mood, small posint";
    db.psql_ok(&format!(
        "CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE TABLE src ({columns}); CREATE TABLE sink ({columns});"
    ));
    let names = [
        "id", "i2", "i4", "i8", "f4", "f8", "num", "flag", "t", "vc", "ch", "j", "jb", "u", "ts", "d", "tags", "ids",
        "grid", "m", "small",
    ];
    let params: Vec<String> = names.iter().map(|c| format!("instance.{c}")).collect();
    let params: Vec<&str> = params.iter().map(String::as_str).collect();
    let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
    let statement = format!("INSERT INTO sink VALUES ({})", placeholders.join(", "));
    let handler = sql_handler(&db, "copy", &statement, &params, "sender = \"public.src\"");
    let mut daemon = run(&db, &config_text(&db, &["public.src"], &handler)).await;

    db.psql_ok(
        r#"INSERT INTO src VALUES (1, -32768, 2147483647, 9007199254740993, 1.5, 0.1,
             12345678901234567890.123456789, true, 'it''s "quoted" \ here', 'varchar', 'ab',
             '{"b":[true,null],"a":1}', '{"z": {"y": [1, 2.5, "x"]}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
             '2026-11-25 02:17:22.59878+00', '2026-11-25', ARRAY['a', 'b,c', 'd"e', NULL], ARRAY[1, 9007199254740993],
             ARRAY[[1, 2], [3, 4]], 'happy', 7);
           INSERT INTO src (id) VALUES (2);"#,
    );
    daemon.take(2).await;
    wait_for_sql(&db, SETTLED, 0).await;
    assert_eq!(db.query_i64("SELECT count(*) FROM post_save.dead_letter").await, 0);
    assert_eq!(db.query_i64("SELECT count(*) FROM sink").await, 2);
    // Row for row, column for column (to_jsonb: `json` has no equality).
    let differ =
        "SELECT count(*) FROM src s FULL JOIN sink k USING (id) WHERE to_jsonb(s) IS DISTINCT FROM to_jsonb(k)";
    assert_eq!(db.query_i64(differ).await, 0, "{}", db.psql_ok("SELECT * FROM src; SELECT * FROM sink"));
    daemon.stop().await;
}

#[test]
fn handlers_list_shows_the_target_without_a_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[handler]]
name = "count-orders"
kind = "sql"
statement = "{COUNT_ORDERS}"
params = ["instance.customer_id"]
url = "postgres://shop:s3cret@db.internal:6432/shop"

[[handler]]
name = "audit"
kind = "sql"
statement = "INSERT INTO audit (event) VALUES ($1)"
params = ["event"]
url_env = "AUDIT_DATABASE_URL"

[[handler]]
name = "local"
kind = "sql"
statement = "DELETE FROM cache WHERE key = $1"
params = ["sender"]
"#
        ),
    )
    .expect("write config");
    let out = assert_cmd::Command::from_std(binary())
        .args(["--config", path.to_str().unwrap(), "--database-url", "host=/nonexistent", "handlers", "list", "--json"])
        .env("AUDIT_DATABASE_URL", "postgres://audit:env-s3cret@elsewhere/audit")
        .timeout(Duration::from_secs(60))
        .output()
        .expect("run post-save");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    let targets: Vec<(&str, &str, &str)> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|h| (h["name"].as_str().unwrap(), h["kind"].as_str().unwrap(), h["target"].as_str().unwrap()))
        .collect();
    assert_eq!(
        targets,
        [
            ("count-orders", "sql", "UPDATE shop_customer SET … @ db.internal:6432/shop"),
            ("audit", "sql", "INSERT INTO audit … @ url from $AUDIT_DATABASE_URL"),
            ("local", "sql", "DELETE FROM cache … @ the daemon's database"),
        ]
    );
    assert!(!stdout.contains("s3cret"), "a password leaked: {stdout}");
}

/// With `capture = "wal"` the handler's origin reaches the daemon through the WAL (a
/// `post_save.origin` message in the handler's transaction): still no loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_writing_its_own_wal_captured_table_runs_once() {
    let db = TestDb::new_logical().await;
    db.psql_ok("CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, note text); INSERT INTO counter (id) VALUES (1)");
    let handler = sql_handler(
        &db,
        "bump",
        "UPDATE counter SET n = n + 1 WHERE id = $1",
        &["instance.id"],
        "sender = \"public.counter\"\ncreated = false",
    );
    let text = format!(
        "[database]\nurl = {}\n\n[daemon]\nsweep_interval = \"1h\"\n\n[[watch]]\ntable = \"public.counter\"\ncapture = \"wal\"\n\n{handler}",
        toml_str(&db.conninfo)
    );
    let mut daemon = run(&db, &text).await;
    db.psql_ok("UPDATE counter SET note = 'go' WHERE id = 1");
    let seen = daemon.take(2).await;
    let origins: Vec<Option<String>> = seen.iter().map(|e| e.origin.clone()).collect();
    assert_eq!(origins, [None, Some("bump@1".to_owned())]);
    daemon.assert_quiet(Duration::from_millis(800)).await;
    assert_eq!(db.query_i64("SELECT n::int8 FROM counter WHERE id = 1").await, 1);
    daemon.stop().await;
}
