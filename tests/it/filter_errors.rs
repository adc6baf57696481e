//! A handler's filter or template that fails on an event (here: it names a column a migration
//! dropped) makes a dead letter of that delivery, with the reason; it never drops the save
//! silently. Other handlers of the table still receive every save, and the ledger rows are
//! acknowledged once the dead letters are written. A retried dead letter goes through the
//! filter again.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tempfile::TempDir;

use crate::support::db::TestDb;
use crate::support::{Running, config, install, post_save_on, start, wait_for_sql};

const FILTER: &str = "instance.discount > 0";
/// The same filter, made safe for rows without the column.
const FIXED_FILTER: &str = "has(instance.discount) && instance.discount > 0";

/// The config: `shop_order` watched (durable), a `discounts` log handler with `filter`, and,
/// when `publish_key` is given, a `publisher` redis handler whose channel is that template.
fn config_text(filter: &str, publish_key: Option<&str>) -> String {
    let mut text = format!(
        "[daemon]\nsweep_interval = \"1h\"\n\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n\n\
         [[handler]]\nname = \"discounts\"\nsender = \"public.shop_order\"\nkind = \"log\"\nfilter = {}\n",
        serde_json::to_string(filter).expect("a string serializes")
    );
    if let Some(key) = publish_key {
        text.push_str(&format!(
            "\n[[handler]]\nname = \"publisher\"\nsender = \"public.shop_order\"\nkind = \"redis\"\n\
             command = \"publish\"\nkey = {}\nretry = {{ attempts = 3, backoff = \"20ms\", max_backoff = \"50ms\" }}\n",
            serde_json::to_string(key).expect("a string serializes")
        ));
    }
    text
}

/// A database with `shop_order (id, product, discount)`, the config written to `dir` (for the
/// CLI) and its triggers installed, and a daemon running it.
async fn shop(dir: &Path, text: &str) -> (TestDb, PathBuf, Running) {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE shop_order (id bigserial PRIMARY KEY, product text NOT NULL, discount integer NOT NULL DEFAULT 0)");
    let path = dir.join("post-save.toml");
    std::fs::write(&path, text).expect("write config");
    let config = config(text);
    install(&db, &config).await;
    let daemon = start(&db, config).await;
    (db, path, daemon)
}

/// `post-save dead list --json` with `args`, through the real binary.
fn dead_letters(path: &Path, db: &TestDb, args: &[&str]) -> Vec<Value> {
    let out = post_save_on(path, db, &[&["dead", "list", "--json"], args].concat());
    assert!(out.status.success(), "dead list failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).expect("JSON").as_array().expect("an array").clone()
}

/// Waits until every ledger row is acknowledged.
async fn all_handled(db: &TestDb) {
    wait_for_sql(db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
}

/// Saves after `DROP COLUMN discount`: two in one statement, one alone (the products
/// `after-1`..`after-3`). INSERTs only: the generated UPDATE trigger of a table that lost a
/// column is another change's business.
fn saves_after_the_drop(db: &TestDb) {
    db.psql_ok("ALTER TABLE shop_order DROP COLUMN discount");
    db.psql_ok("INSERT INTO shop_order (product) VALUES ('after-1'), ('after-2')");
    db.psql_ok("INSERT INTO shop_order (product) VALUES ('after-3')");
}

#[cfg_attr(not(feature = "redis"), ignore = "needs the redis handler kind")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_filter_or_template_makes_a_dead_letter_for_every_save() {
    let dir = TempDir::new().expect("tempdir");
    let channel = format!("ps_{}_{}:{{{{ instance.discount }}}}", std::process::id(), uuid::Uuid::new_v4().simple());
    let (db, path, mut daemon) = shop(dir.path(), &config_text(FILTER, Some(&channel))).await;

    // Before the migration the filter decides: one save passes, one does not; neither is dead.
    db.psql_ok("INSERT INTO shop_order (product, discount) VALUES ('before-1', 5), ('before-2', 0)");
    daemon.take(2).await;
    all_handled(&db).await;
    assert!(dead_letters(&path, &db, &[]).is_empty(), "no dead letter while the column exists");

    saves_after_the_drop(&db);
    // the collector, another handler of the table, still receives every save
    let products: Vec<String> =
        daemon.take(3).await.iter().map(|e| e.instance["product"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(products, ["after-1", "after-2", "after-3"]);
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 6).await;
    all_handled(&db).await;

    let letters = dead_letters(&path, &db, &["--handler", "discounts"]);
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        let error = letter["last_error"].as_str().unwrap_or_default();
        assert!(error.starts_with(&format!("filter `{FILTER}`: ")), "{letter}");
        assert!(error.contains("discount"), "{letter}");
        // the handler never ran
        assert_eq!(letter["attempts"], 0, "{letter}");
        assert_eq!(letter["sender"], "public.shop_order");
        assert!(letter["event_id"].is_i64(), "{letter}");
    }
    let mut products: Vec<&str> = letters.iter().filter_map(|l| l["event"]["instance"]["product"].as_str()).collect();
    products.sort_unstable();
    assert_eq!(products, ["after-1", "after-2", "after-3"]);

    let letters = dead_letters(&path, &db, &["--handler", "publisher"]);
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        let error = letter["last_error"].as_str().unwrap_or_default();
        assert!(error.starts_with("template `") && error.contains("instance.discount"), "{letter}");
        // retrying cannot help a template: dead at the first attempt
        assert_eq!(letter["attempts"], 1, "{letter}");
    }
    // counted: three dead deliveries for each handler
    assert_eq!(daemon.stats.snapshot().dead, 6);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_filter_dead_letter_goes_through_the_filter_again() {
    let dir = TempDir::new().expect("tempdir");
    let (db, path, daemon) = shop(dir.path(), &config_text(FILTER, None)).await;
    saves_after_the_drop(&db);
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 3).await;
    all_handled(&db).await;

    // The filter still fails: the same dead letters, the reason kept, no attempt counted.
    let out = post_save_on(&path, &db, &["dead", "retry", "--handler", "discounts"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for_sql(
        &db,
        &format!(
            "SELECT count(*) FROM post_save.dead_letter WHERE retry_requested_at IS NULL AND attempts = 0 \
             AND last_error LIKE 'filter `{FILTER}`: %'"
        ),
        3,
    )
    .await;
    daemon.stop().await;

    // Fixed, the filter leaves these rows out: a retry resolves their dead letters without
    // delivering anything.
    let fixed = config_text(FIXED_FILTER, None);
    std::fs::write(&path, &fixed).expect("write config");
    let daemon = start(&db, config(&fixed)).await;
    let out = post_save_on(&path, &db, &["dead", "retry", "--handler", "discounts"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 0).await;
    assert_eq!(daemon.stats.snapshot().handled, 0, "nothing was delivered");
    daemon.stop().await;
}
