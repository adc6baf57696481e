//! Per-row order across a primary-key change, in the embedded daemon against a real
//! PostgreSQL: an UPDATE that moves a row to a new key carries the new key, yet it reaches a
//! handler only after the row's earlier events under the old key, even with the handler running
//! several events at once. Other rows still run beside a slow one.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use post_save::event::Op;
use tempfile::TempDir;

use crate::support::db::TestDb;
use crate::support::{config, eventually, file_lines, install, start};

/// Records `<op> <key>` per event in `$OUT_DIR/order`. The insert of row 1 first marks
/// `$OUT_DIR/started`, then holds until `$OUT_DIR/release` exists (at most 30 s).
const RECORDER: &str = r#"#!/bin/sh
cat > /dev/null
row=$(printf %s "$POST_SAVE_PK" | tr -dc 0-9)
if [ "$POST_SAVE_OP" = insert ] && [ "$row" = 1 ]; then
  : > "$OUT_DIR/started"
  n=0
  while [ ! -e "$OUT_DIR/release" ] && [ $n -lt 1500 ]; do sleep 0.02; n=$((n + 1)); done
fi
echo "$POST_SAVE_OP $row" >> "$OUT_DIR/order"
"#;

/// How long the held insert gives an update that jumped the queue to show itself: without the
/// barrier, its program starts as soon as the router has it and writes its line within
/// milliseconds.
const QUIET: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_changes_the_key_waits_for_the_rows_earlier_events() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    let recorder = out.join("recorder.sh");
    std::fs::write(&recorder, RECORDER).expect("write script");
    std::fs::set_permissions(&recorder, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
    let order = out.join("order");
    let toml = format!(
        "[daemon]\nsweep_interval = \"1h\"\n\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n\n\
         [[handler]]\nname = \"recorder\"\nsender = \"public.shop_order\"\nkind = \"exec\"\ncommand = [{}]\n\
         env = {{ OUT_DIR = {} }}\nconcurrency = 4\ntimeout = \"60s\"\n",
        serde_json::to_string(&recorder.to_string_lossy()).expect("a path serializes"),
        serde_json::to_string(&out.to_string_lossy()).expect("a path serializes"),
    );
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE shop_order (id bigint PRIMARY KEY, product text NOT NULL)");
    let config = config(&toml);
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;

    // Row 1's insert is held in its program.
    db.psql_ok("INSERT INTO shop_order VALUES (1, 'espresso machine')");
    eventually("the insert of row 1 to start", || out.join("started").exists().then_some(())).await;
    // Another row runs beside it: no key change, no waiting.
    db.psql_ok("INSERT INTO shop_order VALUES (10, 'grinder')");
    eventually("the insert of row 10 to be recorded", || {
        file_lines(&order).contains(&"insert 10".to_owned()).then_some(())
    })
    .await;

    // Row 1 becomes row 2, in a later transaction.
    db.psql_ok("UPDATE shop_order SET id = 2 WHERE id = 1");
    let events = daemon.take(3).await;
    let update = &events[2];
    assert_eq!(update.op, Op::Update);
    assert_eq!(update.pk["id"], 2, "the update carries the new key");
    assert!(update.update_fields.as_deref().unwrap_or_default().contains(&"id".to_owned()), "{}", update.to_json());
    // The router has the update (the collector got it), and it must not run while row 1's insert
    // is held.
    let deadline = Instant::now() + QUIET;
    while Instant::now() < deadline {
        let got = file_lines(&order);
        assert!(!got.iter().any(|l| l.starts_with("update")), "the update ran before row 1's insert finished: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    std::fs::write(out.join("release"), "").expect("release the insert");
    eventually("three events recorded", || (file_lines(&order).len() >= 3).then_some(())).await;
    assert_eq!(file_lines(&order), ["insert 10", "insert 1", "update 2"]);
    daemon.stop().await;
}
