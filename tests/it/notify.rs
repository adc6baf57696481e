//! Notify mode end to end: the capture packs a statement's rows into notes under NOTIFY's
//! 8000-byte limit, rows too big for a note travel by reference, and the daemon delivers every
//! row once, against a real PostgreSQL.

use std::collections::HashMap;

use post_save::event::{Op, SaveEvent};

use crate::support;
use crate::support::db::TestDb;
use crate::support::{SHOP_BARRIER, config, install, is_shop_barrier, start};

const SHOP: &str = "CREATE TABLE shop_order (
    id bigserial PRIMARY KEY, user_id bigint NOT NULL, product text NOT NULL,
    quantity integer NOT NULL DEFAULT 1, created_at timestamptz NOT NULL DEFAULT now())";

async fn shop(extra: &str) -> (TestDb, post_save::Config) {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let config = config(&format!(
        "[daemon]\nsweep_interval = \"1h\"\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"notify\"\n{extra}"
    ));
    install(&db, &config).await;
    (db, config)
}

/// The payloads of the notifications that `sql` sends on `post_save`, as a listening psql
/// session in the same database sees them.
fn notes_of(db: &TestDb, sql: &str) -> Vec<String> {
    let out = db.psql_args(&["-c", "LISTEN post_save", "-c", sql, "-c", "SELECT 1"]);
    assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("Asynchronous notification \"post_save\" with payload \""))
        .map(|l| l.rsplit_once("\" received from server process").expect("psql's notification line").0.to_owned())
        .collect()
}

/// Each of `rows` rows (by `id`) exactly once.
fn by_id(events: &[SaveEvent], rows: usize) -> HashMap<i64, &SaveEvent> {
    let mut seen = HashMap::new();
    for e in events {
        assert!(seen.insert(e.pk["id"].as_i64().unwrap(), e).is_none(), "row {} handled twice", e.pk["id"]);
    }
    assert_eq!(seen.len(), rows);
    seen
}

#[tokio::test]
async fn a_statements_rows_travel_in_a_few_notes_each_under_the_limit() {
    let (db, config) = shop("").await;
    let notes = notes_of(
        &db,
        "INSERT INTO shop_order (user_id, product) SELECT g, 'bulk ' || g FROM generate_series(1, 100) g",
    );
    // about 110 bytes a row: 100 rows in two notes, not a hundred
    assert!((1..=3).contains(&notes.len()), "{} notes", notes.len());
    assert!(
        notes.iter().all(|n| n.len() < 8000 && n.starts_with("{\"sender\":\"public.shop_order\",\"op\":\"insert\""))
    );
    let single = notes_of(&db, "INSERT INTO shop_order (user_id, product) VALUES (1, 'one')");
    assert_eq!(single.len(), 1);
    assert!(notes_of(&db, "INSERT INTO shop_order (user_id, product) SELECT 1, 'none' WHERE false").is_empty());

    let mut daemon = start(&db, config).await;
    db.psql_ok("INSERT INTO shop_order (user_id, product) SELECT g, 'bulk ' || g FROM generate_series(1, 10000) g");
    let events = daemon.take(10_000).await;
    let rows = by_id(&events, 10_000);
    for (id, e) in rows {
        assert!(e.created && e.op == Op::Insert && e.id.is_none() && !e.reread);
        assert_eq!(e.instance["id"], id);
        assert_eq!(e.instance["product"], format!("bulk {}", e.instance["user_id"]));
        assert_eq!(e.using, db.name);
        assert_eq!(e.actor.application_name.as_deref(), Some("psql"));
    }
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    assert_eq!(daemon.stats.snapshot().invalid, 0);
    daemon.stop().await;
}

/// Small rows packed together, rows of a few kB in notes of their own, and rows over the limit by
/// reference, all in one statement: each arrives once, whole.
#[tokio::test]
async fn rows_of_every_size_in_one_statement_arrive_once_and_whole() {
    let (db, config) = shop("").await;
    let mut daemon = start(&db, config).await;
    db.psql_ok(
        "INSERT INTO shop_order (user_id, product) \
         SELECT g, CASE WHEN g % 20 = 0 THEN repeat('L', 100000) WHEN g % 7 = 0 THEN repeat('m', 3000) ELSE 's' END \
           FROM generate_series(1, 100) g",
    );
    let events = daemon.take(100).await;
    for (_, e) in by_id(&events, 100) {
        let user = e.instance["user_id"].as_i64().unwrap();
        let (len, reread) = match user {
            u if u % 20 == 0 => (100_000, true),
            u if u % 7 == 0 => (3000, false),
            _ => (1, false),
        };
        assert_eq!(e.instance["product"].as_str().map(str::len), Some(len), "row {user}");
        assert_eq!(e.reread, reread, "row {user}");
    }
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
}

#[tokio::test]
async fn updates_and_deletes_carry_their_fields_and_old_row_and_redact() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE payment (id int PRIMARY KEY, card_number text, amount int, memo text)");
    let config = config(
        "[[watch]]\ntable = \"payment\"\nmode = \"notify\"\noperations = [\"insert\", \"update\", \"delete\"]\n\
         redact = [\"card_number\"]\ninclude_old = true\n",
    );
    install(&db, &config).await;
    let saves = "INSERT INTO payment VALUES (1, '4242424242424242', 10, 'a'); \
                 UPDATE payment SET amount = 11, card_number = '5555'; \
                 UPDATE payment SET memo = repeat('z', 20000)";
    let notes = notes_of(&db, &format!("{saves}; DELETE FROM payment"));
    // the 20 kB row deleted travels in parts of under 8000 bytes
    assert_eq!(notes.len(), 3 + 4, "{} notes", notes.len());
    assert!(notes.iter().all(|n| n.len() < 8000));
    // what the notes carry of the row (not their heads, whose txids and times can hold any
    // digits), part data decoded
    let rows: Vec<String> = notes.iter().map(|n| row_text(n)).collect();
    assert!(rows.iter().all(|r| !r.contains("4242") && !r.contains("5555")), "a card number was sent");
    let mut daemon = start(&db, config).await;
    db.psql_ok(saves);
    let mut events = daemon.take(3).await;
    // the row is re-read after its transaction commits: change it only once that is done
    db.psql_ok("UPDATE payment SET memo = 'short'");
    let shrunk = daemon.next().await;
    assert!(shrunk.reread, "its old row is over the limit");
    assert_eq!(shrunk.instance["memo"], "short");
    db.psql_ok("DELETE FROM payment");
    events.extend(daemon.take(1).await);
    assert!(events.iter().all(|e| e.instance.get("card_number").is_none() && e.old.get("card_number").is_none()));
    assert_eq!(events[0].op, Op::Insert);
    assert_eq!(events[1].update_fields, Some(vec!["card_number".to_owned(), "amount".to_owned()]));
    assert_eq!(events[1].old["amount"], 10);
    assert_eq!(events[1].instance["amount"], 11);
    // the 20 kB memo is over the limit: the row is read back by its key, update_fields kept
    assert!(events[2].reread);
    assert_eq!(events[2].update_fields, Some(vec!["memo".to_owned()]));
    assert_eq!(events[2].instance["memo"].as_str().map(str::len), Some(20_000));
    assert!(events[2].instance.get("card_number").is_none(), "redacted after the re-read too");
    assert_eq!(events[3].op, Op::Delete);
    assert_eq!(events[3].signal, post_save::Signal::PostDelete);
    assert_eq!(events[3].instance["amount"], 11);
    daemon.stop().await;
}

/// The part of a note that carries rows: without its head, a part's data decoded.
fn row_text(note: &str) -> String {
    use base64::Engine as _;
    let mut value: serde_json::Value = serde_json::from_str(note).expect("a note is JSON");
    let map = value.as_object_mut().expect("a note is an object");
    map.remove("head");
    match map.remove("data") {
        Some(data) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(data.as_str().unwrap()).unwrap();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        None => value.to_string(),
    }
}

/// A deleted row over NOTIFY's limit cannot be read again by its key: it travels in parts, and
/// its event carries the whole row.
#[tokio::test]
async fn a_deleted_row_over_the_limit_arrives_whole() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE doc (id int PRIMARY KEY, body text, tag text)");
    let config = config(
        "[[watch]]\ntable = \"doc\"\nmode = \"notify\"\noperations = [\"insert\", \"delete\"]\nredact = [\"tag\"]\n",
    );
    install(&db, &config).await;
    // 20 kB of multi-byte text (parts split it inside characters), then one row of 200 kB
    db.psql_ok(
        "INSERT INTO doc VALUES (1, repeat('é', 10000), 'secret'), (2, repeat('x', 200000), 'secret'), (3, 'small', 'secret')",
    );
    let mut daemon = start(&db, config).await;
    db.psql_ok("DELETE FROM doc WHERE id IN (1, 2); DELETE FROM doc WHERE id = 3");
    let events = daemon.take(3).await;
    let by_id: HashMap<i64, &SaveEvent> = events.iter().map(|e| (e.pk["id"].as_i64().unwrap(), e)).collect();
    for e in &events {
        assert_eq!(e.op, Op::Delete);
        assert!(!e.reread, "a deleted row is never re-read");
        assert!(e.instance.get("tag").is_none(), "redacted");
    }
    assert_eq!(by_id[&1].instance["body"].as_str().map(|b| b.chars().count()), Some(10_000));
    assert!(by_id[&1].instance["body"].as_str().unwrap().chars().all(|c| c == 'é'));
    assert_eq!(by_id[&2].instance["body"].as_str().map(str::len), Some(200_000));
    assert_eq!(by_id[&3].instance["body"], "small");
    daemon.assert_quiet_until(&db, "INSERT INTO doc VALUES (4, 'barrier', NULL)", |e| e.pk["id"] == 4).await;
    daemon.stop().await;
}

/// A head over the limit (an enormous `post_save.actor`) cannot travel: the write commits and
/// the client is warned; later saves arrive.
#[tokio::test]
async fn a_save_whose_head_is_over_the_limit_commits_with_a_warning() {
    let (db, config) = shop("operations = [\"insert\", \"update\"]\n").await;
    let mut daemon = start(&db, config).await;
    let out = db.psql(
        "BEGIN; SELECT set_config('post_save.actor', repeat('a', 9000), true); \
         INSERT INTO shop_order (user_id, product) VALUES (1, 'huge actor'); \
         UPDATE shop_order SET quantity = 2; COMMIT",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert_eq!(warnings.matches("over NOTIFY's 8000-byte limit").count(), 2, "{warnings}");
    assert_eq!(db.query_i64("SELECT count(*) FROM shop_order").await, 1);
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (2, 'normal')");
    assert_eq!(daemon.next().await.instance["product"], "normal");
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
}

/// Anyone who can connect can NOTIFY: a note for a table not watched in notify mode counts its
/// events as `unknown_sender`, a malformed one as `invalid`, and real saves keep flowing.
#[tokio::test]
async fn forged_notes_are_counted_and_skipped() {
    let (db, config) = shop("").await;
    let mut daemon = start(&db, config).await;
    let head = r#"{"raw":false,"txid":1,"at":"2026-12-06T00:00:00+00:00","actor":{"role":"r","pid":1},"origin":null,"keys":["id"]}"#;
    let forged = [
        format!(r#"{{"sender":"public.other","op":"insert","head":{head},"rows":[{{"id":1}},{{"id":2}},{{"id":3}}]}}"#),
        format!(r#"{{"sender":"public.shop_order","op":"insert","head":{head},"rows":[[{{"id":1}},5,null,null]]}}"#),
        format!(r#"{{"sender":"public.shop_order","op":"insert","head":{head}}}"#),
    ];
    let sql: String =
        forged.iter().map(|f| format!("SELECT pg_notify('post_save', {});", support::db::quote_literal(f))).collect();
    db.psql_ok(&sql);
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (3, 'still works')");
    assert_eq!(daemon.next().await.instance["product"], "still works");
    let stats = daemon.stats.snapshot();
    assert_eq!((stats.unknown_sender, stats.invalid), (3, 2), "{stats:?}");
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
}

/// Rows around the packing bound (about 1 kB of JSON, multi-byte text): every note stays under
/// the limit and every row arrives once.
#[tokio::test]
async fn notes_of_rows_near_the_packing_bound_stay_under_the_limit() {
    let (db, config) = shop("").await;
    // 'é' is two bytes: product lengths from 420 to 540 characters put the rows' JSON on both
    // sides of 1000 bytes
    let sql = "INSERT INTO shop_order (user_id, product) \
               SELECT g, repeat('é', 420 + g % 121) FROM generate_series(1, 300) g";
    let notes = notes_of(&db, sql);
    assert!(notes.iter().all(|n| n.len() < 8000), "{:?}", notes.iter().map(String::len).max());
    assert!(notes.iter().any(|n| n.contains("\"rows\":[{") && n.matches("\"user_id\"").count() > 1), "packed notes");
    let rows: usize = notes.iter().map(|n| n.matches("\"user_id\"").count()).sum();
    assert_eq!(rows, 300, "every row in exactly one note");
    let mut daemon = start(&db, config).await;
    db.psql_ok(sql);
    let events = daemon.take(300).await;
    for (_, e) in by_id(&events, 300) {
        let user = e.instance["user_id"].as_i64().unwrap();
        assert_eq!(e.instance["product"].as_str().map(|p| p.chars().count()), Some(420 + (user % 121) as usize));
        assert!(!e.reread);
    }
    daemon.stop().await;
}
