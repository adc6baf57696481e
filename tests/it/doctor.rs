//! `post-save doctor`, with the real binary: a healthy setup exits 0; drift exits 1 with the
//! fix; a role that LISTENs and idles in a transaction shows up as a filling NOTIFY queue, with
//! its backend named.

use post_save::testing::cluster::{ClusterOptions, TempCluster};
use serde_json::Value;
use tempfile::TempDir;
use tokio_postgres::NoTls;

use crate::support;
use crate::support::child::doctor;
use crate::support::db::TestDb;
use crate::support::{config, free_port, install, sample, scrape};

const TABLE: &str = "CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)";
const WATCH: &str = "[[watch]]\ntable = \"public.item\"\n";

fn write_config(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.path().join("config.toml");
    std::fs::write(&path, WATCH).expect("write config");
    path
}

#[tokio::test]
async fn a_healthy_setup_passes_every_check() {
    let db = TestDb::new().await;
    db.psql_ok(TABLE);
    install(&db, &config(WATCH)).await;
    let dir = TempDir::new().unwrap();
    let (code, checks) = doctor(&write_config(&dir), &db.conninfo);
    for name in [
        "connect",
        "standby",
        "listen",
        "schema",
        "triggers",
        "notify_queue",
        "backlog",
        "retention",
        "dead_letters",
        "rights",
    ] {
        // The NOTIFY queue is the cluster's, shared with tests running beside this one.
        if name != "notify_queue" {
            assert_eq!(checks[name]["verdict"], "ok", "{name}: {}", checks[name]);
        }
    }
    if checks["notify_queue"]["verdict"] == "ok" {
        assert_eq!(code, 0, "{checks}");
    }
}

#[tokio::test]
async fn drift_and_a_missing_schema_are_failures_with_their_fix() {
    let db = TestDb::new().await;
    db.psql_ok(TABLE);
    let dir = TempDir::new().unwrap();
    let (code, checks) = doctor(&write_config(&dir), &db.conninfo);
    assert_eq!(code, 1);
    assert_eq!(checks["schema"]["verdict"], "fail");
    assert!(checks["schema"]["fix"].as_str().unwrap().contains("post-save migrate"), "{}", checks["schema"]);
    assert_eq!(checks["triggers"]["verdict"], "fail");
    assert!(checks["triggers"]["fix"].as_str().unwrap().contains("post-save triggers install"));

    install(&db, &config(WATCH)).await;
    db.psql_ok("DROP TRIGGER post_save_insert ON item");
    let (code, checks) = doctor(&write_config(&dir), &db.conninfo);
    assert_eq!(code, 1);
    assert_eq!(checks["schema"]["verdict"], "ok");
    assert_eq!(checks["triggers"]["verdict"], "fail", "{}", checks["triggers"]);
    assert!(checks["triggers"]["detail"].as_str().unwrap().contains("item"), "{}", checks["triggers"]);
}

#[tokio::test]
async fn held_up_retention_is_a_warning_naming_the_transaction_that_holds_it() {
    let db = TestDb::new().await;
    db.psql_ok(TABLE);
    install(&db, &config(WATCH)).await;
    let dir = TempDir::new().unwrap();
    // The current partition took over two days ago (keep_handled is 24 h), and a session left
    // idle in a transaction that read the ledger holds the lock rotation needs.
    db.psql_ok("UPDATE post_save.ledger_rotation SET since = now() - interval '2 days'");
    let reader = db.client().await;
    reader.batch_execute("SET application_name = 'report'; BEGIN; SELECT count(*) FROM post_save.event").await.unwrap();
    let pid: i32 = reader.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let (code, checks) = doctor(&write_config(&dir), &db.conninfo);
    assert_eq!(code, 1, "{checks}");
    let check = &checks["retention"];
    assert_eq!(check["verdict"], "warn", "{check}");
    let fix = check["fix"].as_str().unwrap();
    assert!(fix.contains(&format!("pid {pid}")) && fix.contains("'report'"), "{check}");

    reader.batch_execute("COMMIT").await.unwrap();
    let (_, checks) = doctor(&write_config(&dir), &db.conninfo);
    assert!(checks["retention"]["fix"].as_str().unwrap().contains("start the daemon"), "{}", checks["retention"]);
    db.psql_ok("UPDATE post_save.ledger_rotation SET since = now()");
    let (_, checks) = doctor(&write_config(&dir), &db.conninfo);
    assert_eq!(checks["retention"]["verdict"], "ok", "{}", checks["retention"]);
}

#[tokio::test]
async fn an_unreachable_server_is_a_failed_connect_check() {
    let dir = TempDir::new().unwrap();
    let (code, checks) = doctor(&write_config(&dir), "host=127.0.0.1 port=1 user=postgres dbname=x connect_timeout=2");
    assert_eq!(code, 1);
    assert_eq!(checks["connect"]["verdict"], "fail", "{checks}");
}

/// On a private cluster: the NOTIFY queue is cluster-wide, and this test fills it on purpose.
#[tokio::test]
async fn a_listener_idling_in_a_transaction_is_named_as_the_queue_fills() {
    let cluster = tokio::task::spawn_blocking(|| TempCluster::start(ClusterOptions::default()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{}", support::db::error_chain(&e)));
    let conninfo = cluster.conninfo("postgres");
    let (admin, connection) = tokio_postgres::connect(&conninfo, NoTls).await.expect("connect");
    tokio::spawn(connection);
    admin.batch_execute(TABLE).await.unwrap();
    admin.batch_execute("CREATE ROLE rogue LOGIN").await.unwrap();
    let mut client = admin;
    post_save::db::migrate(&mut client).await.unwrap();
    post_save::testing::install::install(&mut client, &config(WATCH)).await.unwrap();
    let dir = TempDir::new().unwrap();
    let path = write_config(&dir);
    let (code, checks) = doctor(&path, &conninfo);
    assert_eq!((code, &checks["notify_queue"]["verdict"]), (0, &Value::from("ok")), "{checks}");

    // The rogue LISTENs, then stays inside a transaction: it stops reading, and the queue
    // behind it can no longer be cleaned up.
    let rogue_info = conninfo.replace("user=postgres", "user=rogue") + " application_name=rogue-worker";
    let (rogue, connection) = tokio_postgres::connect(&rogue_info, NoTls).await.expect("connect as rogue");
    tokio::spawn(connection);
    rogue.batch_execute("LISTEN post_save").await.unwrap();
    rogue.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let rogue_pid: i32 =
        client.query_one("SELECT pid FROM pg_stat_activity WHERE usename = 'rogue'", &[]).await.unwrap().get(0);

    // About 16 MB of notifications, in transactions of their own.
    for _ in 0..4 {
        client
            .batch_execute(
                "SELECT pg_notify('post_save', g::text || repeat('x', 1000)) FROM generate_series(1, 4000) g",
            )
            .await
            .unwrap();
    }
    let usage: f64 = client.query_one("SELECT pg_notification_queue_usage()", &[]).await.unwrap().get(0);
    assert!(usage > 0.001, "queue usage {usage}");

    let (code, checks) = doctor(&path, &conninfo);
    assert_eq!(code, 1, "{checks}");
    let queue = &checks["notify_queue"];
    assert_eq!(queue["verdict"], "warn", "{queue}");
    let detail = queue["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("pid {rogue_pid}")) && detail.contains("role rogue"), "{detail}");
    assert!(detail.contains("rogue-worker"), "{detail}");

    // The daemon's metrics show the same: the queue usage, and the backend holding it.
    let port = free_port();
    let text = format!("[daemon]\nmetrics = \"127.0.0.1:{port}\"\n\n{WATCH}");
    let pg = post_save::db::resolve(Some(&conninfo)).expect("conninfo");
    let daemon = support::start_via(pg, config(&text), &mut post_save::Registry::new()).await;
    let metrics = scrape(port).await;
    let usage = sample(&metrics, "post_save_notify_queue_usage_ratio ").expect("queue usage metric");
    assert!(usage > 0.001, "{metrics}");
    let idle = format!(
        "post_save_idle_in_transaction_oldest_seconds{{pid=\"{rogue_pid}\",role=\"rogue\",application=\"rogue-worker\"}}"
    );
    assert!(metrics.contains(&idle), "no {idle} in:\n{metrics}");
    daemon.stop().await;

    // Once the rogue's transaction ends it reads, and the queue empties.
    rogue.batch_execute("COMMIT").await.unwrap();
    drop(rogue);
    let deadline = std::time::Instant::now() + support::PATIENCE;
    loop {
        let (_, checks) = doctor(&path, &conninfo);
        if checks["notify_queue"]["verdict"] == "ok" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the queue never emptied: {}", checks["notify_queue"]);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
