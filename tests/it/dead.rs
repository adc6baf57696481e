//! `post-save dead list|retry|purge` against a running daemon: dead letters are listed with
//! their filters, a requested retry runs the event through its handler again (recording a new
//! failure on the same dead letter, removing it once delivered), and purge needs a filter.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use post_save::config::RetryPolicy;
use post_save::handler::{HandlerError, handler_fn};
use post_save::{Receiver, Registry, SaveEvent};
use serde_json::Value;
use tempfile::TempDir;

use crate::support::db::TestDb;
use crate::support::{config, install, post_save_on, start_with, wait_for_sql};

const WATCH: &str = "[[watch]]\ntable = \"public.item\"\n";

fn list(config: &Path, db: &TestDb, filter: &[&str]) -> Vec<Value> {
    let out = post_save_on(config, db, &[&["dead", "list", "--json"], filter].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).expect("JSON").as_array().expect("array").clone()
}

#[tokio::test]
async fn dead_letters_are_listed_retried_and_purged() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)");
    let cfg = config(WATCH);
    install(&db, &cfg).await;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, WATCH).unwrap();

    // `mailer` fails (one attempt, then dead) until `up` is set.
    let up = Arc::new(AtomicBool::new(false));
    let delivered: Arc<Mutex<Vec<String>>> = Arc::default();
    let (is_up, record) = (Arc::clone(&up), Arc::clone(&delivered));
    let mut registry = Registry::new();
    let once = RetryPolicy { attempts: 1, backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(10) };
    registry
        .register(
            Receiver::new("mailer").retry(once),
            handler_fn(move |e: SaveEvent| {
                let ok = is_up.load(Ordering::SeqCst);
                if ok {
                    record.lock().unwrap().push(e.instance["name"].as_str().unwrap_or_default().to_owned());
                }
                async move { if ok { Ok(()) } else { Err(HandlerError::retry("smtp server unreachable")) } }
            }),
        )
        .unwrap();
    let daemon = start_with(&db, cfg, &mut registry).await;

    db.psql_ok("INSERT INTO item (name) VALUES ('alpha'), ('beta')");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 2).await;
    let letters = list(&path, &db, &[]);
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["handler"], "mailer");
        assert_eq!(letter["sender"], "public.item");
        assert_eq!(letter["attempts"], 1);
        assert!(letter["last_error"].as_str().unwrap().contains("smtp server unreachable"), "{letter}");
        assert!(letter["event_id"].is_i64(), "{letter}");
    }
    let names: Vec<&str> = letters.iter().map(|l| l["event"]["instance"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert!(list(&path, &db, &["--handler", "audit"]).is_empty());
    assert!(list(&path, &db, &["--sender", "public.other"]).is_empty());
    assert!(list(&path, &db, &["--older-than", "1h"]).is_empty());
    assert_eq!(list(&path, &db, &["--newer-than", "1h"]).len(), 2);
    let alpha = letters[0]["id"].as_i64().unwrap().to_string();

    // A retry while the handler still fails: the same dead letter, one attempt more.
    let out = post_save_on(&path, &db, &["dead", "retry", "--id", &alpha]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 dead letters queued"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_sql(
        &db,
        &format!("SELECT count(*) FROM post_save.dead_letter WHERE id = {alpha} AND attempts = 2 AND retry_requested_at IS NULL"),
        1,
    )
    .await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 2).await;

    // The handler is back: a retry of every mailer dead letter delivers both and removes them.
    up.store(true, Ordering::SeqCst);
    let out = post_save_on(&path, &db, &["dead", "retry", "--handler", "mailer"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 0).await;
    let mut got = delivered.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, ["alpha", "beta"]);

    // Purge: never everything by accident.
    up.store(false, Ordering::SeqCst);
    db.psql_ok("INSERT INTO item (name) VALUES ('gamma')");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 1).await;
    let out = post_save_on(&path, &db, &["dead", "purge"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--all"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = post_save_on(&path, &db, &["dead", "purge", "--sender", "public.item"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 0).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_retry_for_a_handler_that_no_longer_exists_is_cleared_with_the_reason() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)");
    let cfg = config(WATCH);
    install(&db, &cfg).await;
    // A dead letter of handler `gone`, made by a daemon that had it…
    let mut registry = Registry::new();
    let once = RetryPolicy { attempts: 1, backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(10) };
    registry
        .register(
            Receiver::new("gone").retry(once),
            handler_fn(|_| async { Err::<(), _>(HandlerError::retry("boom")) }),
        )
        .unwrap();
    let daemon = start_with(&db, cfg.clone(), &mut registry).await;
    db.psql_ok("INSERT INTO item (name) VALUES ('x')");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter WHERE handler = 'gone'", 1).await;
    daemon.stop().await;
    // …and a retry requested of one that does not.
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, WATCH).unwrap();
    let out = post_save_on(&path, &db, &["dead", "retry", "--handler", "gone"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let daemon = start_with(&db, cfg, &mut Registry::new()).await;
    wait_for_sql(
        &db,
        "SELECT count(*) FROM post_save.dead_letter WHERE retry_requested_at IS NULL AND last_error LIKE '%no handler named \"gone\"%'",
        1,
    )
    .await;
    daemon.stop().await;
}
