//! `post-save events list|show|tail`: the ledger's events with their delivery state, read by
//! the real binary while a daemon handles them.

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use post_save::config::RetryPolicy;
use post_save::handler::{HandlerError, handler_fn};
use post_save::{Receiver, Registry, SaveEvent};
use serde_json::Value;
use tempfile::TempDir;

use crate::support::child::binary;
use crate::support::db::TestDb;
use crate::support::{PATIENCE, config, install, post_save_on, start_with, wait_for_sql};

const WATCH: &str = "[[watch]]\ntable = \"public.item\"\n";

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn events_are_listed_shown_and_followed_with_their_delivery_state() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)");
    let cfg = config(WATCH);
    install(&db, &cfg).await;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, WATCH).unwrap();

    // `picky` gives up at once on rows named 'bad'.
    let mut registry = Registry::new();
    let once = RetryPolicy { attempts: 1, backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(10) };
    registry
        .register(
            Receiver::new("picky").retry(once),
            handler_fn(|e: SaveEvent| async move {
                if e.instance["name"] == "bad" { Err(HandlerError::retry("refused")) } else { Ok(()) }
            }),
        )
        .unwrap();
    let daemon = start_with(&db, cfg, &mut registry).await;
    db.psql_ok("INSERT INTO item (name) VALUES ('one')");
    db.psql_ok("INSERT INTO item (name) VALUES ('two'), ('three'), ('bad')");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    daemon.stop().await;

    let list = json(&post_save_on(&path, &db, &["events", "list", "--json"]));
    let list = list.as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|e| e["event"]["instance"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["one", "two", "three", "bad"], "oldest first");
    assert!(list.iter().all(|e| e["handled_at"].is_string()), "{list:?}");
    let bad = &list[3];
    assert_eq!(bad["dead"][0]["handler"], "picky", "{bad}");
    assert!(bad["dead"][0]["last_error"].as_str().unwrap().contains("refused"));
    assert!(list[0]["dead"].as_array().unwrap().is_empty());
    // The three rows of one statement share a ledger row and have consecutive ids.
    let ids: Vec<i64> = list.iter().map(|e| e["event"]["id"].as_i64().unwrap()).collect();
    assert_eq!((ids[2] - ids[1], ids[3] - ids[2]), (1, 1), "{ids:?}");
    let limited = json(&post_save_on(&path, &db, &["events", "list", "--json", "--limit", "2"]));
    let limited: Vec<&str> =
        limited.as_array().unwrap().iter().map(|e| e["event"]["instance"]["name"].as_str().unwrap()).collect();
    assert_eq!(limited, ["three", "bad"]);

    // One event, from the middle of its statement.
    let shown = json(&post_save_on(&path, &db, &["events", "show", &ids[2].to_string(), "--json"]));
    assert_eq!(shown["event"]["instance"]["name"], "three");
    assert_eq!(shown["event"]["created"], true);
    let missing = post_save_on(&path, &db, &["events", "show", "999999999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no event 999999999"));

    // With no daemon, a new save is pending.
    db.psql_ok("INSERT INTO item (name) VALUES ('waiting')");
    let pending = json(&post_save_on(&path, &db, &["events", "list", "--pending", "--json"]));
    let pending = pending.as_array().unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0]["event"]["instance"]["name"], "waiting");
    assert!(pending[0]["handled_at"].is_null());

    // tail --follow: the last events, then new ones as JSON Lines.
    let mut child = binary()
        .arg("--config")
        .arg(&path)
        .args(["--database-url", &db.conninfo, "events", "tail", "--follow", "--limit", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tail");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = || -> Value {
        serde_json::from_str(&lines.recv_timeout(PATIENCE).expect("a line from tail")).expect("JSON line")
    };
    assert_eq!(next()["instance"]["name"], "waiting");
    db.psql_ok("INSERT INTO item (name) VALUES ('live-1'), ('live-2')");
    assert_eq!(next()["instance"]["name"], "live-1");
    assert_eq!(next()["instance"]["name"], "live-2");
    let _ = child.kill();
    let _ = child.wait();
}
