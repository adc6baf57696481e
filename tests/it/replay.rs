//! `post-save backfill` and `post-save replay`, run by the real binary beside a running daemon.

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use post_save::handler::{HandlerError, handler_fn};
use post_save::{Receiver, Registry};
use tempfile::TempDir;

use crate::support::db::TestDb;
use crate::support::{config, install, post_save_ok, start_with, wait_for_sql};

const WATCH: &str = "[[watch]]\ntable = \"public.item\"\nredact = [\"secret\"]\n";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn backfill_sends_existing_rows_and_replay_sends_handled_events_again() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL, secret text)");
    // Rows that exist before post-save: no event was ever captured for them.
    db.psql_ok("INSERT INTO item (name, secret) SELECT 'old-' || g, 'hunter2' FROM generate_series(1, 5) g");
    let cfg = config(WATCH);
    install(&db, &cfg).await;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, WATCH).unwrap();

    let other_calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&other_calls);
    let mut registry = Registry::new();
    registry
        .register(
            Receiver::new("other"),
            handler_fn(move |_| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Ok::<(), HandlerError>(()) }
            }),
        )
        .unwrap();
    let mut daemon = start_with(&db, cfg, &mut registry).await;

    // Dry run: counted, nothing written.
    let out = post_save_ok(&path, &db, &["backfill", "--table", "public.item", "--dry-run"]);
    assert!(stderr(&out).contains("5 rows"), "{}", stderr(&out));
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event", 0).await;

    let out = post_save_ok(&path, &db, &["backfill", "--table", "public.item", "--where", "id <= 3"]);
    assert!(stderr(&out).contains("3 raw insert events"), "{}", stderr(&out));
    let events = daemon.take(3).await;
    let mut names: Vec<&str> = events.iter().map(|e| e.instance["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["old-1", "old-2", "old-3"]);
    for e in &events {
        assert!(e.raw && e.created, "backfill events are raw creations: {}", e.to_json());
        assert_eq!(e.actor.actor.as_deref(), Some("post-save backfill"));
        assert!(e.instance.get("secret").is_none(), "redacted column left the database: {}", e.to_json());
    }
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    assert_eq!(other_calls.load(Ordering::SeqCst), 3);

    // Replay to every handler: the same events (same ids) again.
    let out = post_save_ok(&path, &db, &["replay", "--since", "1h", "--dry-run"]);
    assert!(stderr(&out).contains("3 acknowledged events would be delivered again"), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    let out = post_save_ok(&path, &db, &["replay", "--since", "1h"]);
    assert!(stderr(&out).contains("3 events queued"), "{}", stderr(&out));
    let again = daemon.take(3).await;
    let mut first: Vec<i64> = events.iter().map(|e| e.id.unwrap()).collect();
    let mut second: Vec<i64> = again.iter().map(|e| e.id.unwrap()).collect();
    first.sort_unstable();
    second.sort_unstable();
    assert_eq!(first, second, "a replay delivers the same events, ids and all");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    assert_eq!(other_calls.load(Ordering::SeqCst), 6);

    // Replay to one handler: the collector gets them, `other` does not.
    let out = post_save_ok(&path, &db, &["replay", "--since", "1h", "--handler", "collector-post_save"]);
    assert!(stderr(&out).contains("3 events queued"), "{}", stderr(&out));
    daemon.take(3).await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 0).await;
    assert_eq!(other_calls.load(Ordering::SeqCst), 6, "the replay went to one handler only");
    // Nothing older than the window.
    let out = post_save_ok(
        &path,
        &db,
        &["replay", "--since", "2000-01-01T00:00:00Z", "--until", "2000-01-02T00:00:00Z", "--dry-run"],
    );
    assert!(stderr(&out).contains("0 acknowledged events"), "{}", stderr(&out));
    daemon
        .assert_quiet_until(&db, "INSERT INTO item (name) VALUES ('barrier')", |e| e.instance["name"] == "barrier")
        .await;
    daemon.stop().await;
}
