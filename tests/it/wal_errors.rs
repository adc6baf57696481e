//! `capture = "wal"` when something only an operator can fix stops the WAL reader: a slot
//! another process streams, a server without logical WAL, a missing publication. The real
//! `post-save run` says so once in its log, `STATUS=` and the metrics show it, `doctor` names
//! it, the reader does not spin, and it streams again once the cause is gone, without a restart.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use post_save::testing::cluster::{ClusterOptions, TempCluster};
use serde_json::Value;

use crate::support;
use crate::support::db::TestDb;
use crate::support::{
    BinaryDaemon, PATIENCE, config, free_port, install, observer_handlers, post_save_ok, sample, scrape,
};

const TABLE: &str = "CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)";
/// How often a blocked reader checks again (`reconnect_max` in [`toml`]).
const RECHECK: Duration = Duration::from_millis(500);

fn toml(metrics_port: u16) -> String {
    format!(
        "[daemon]\nreconnect_min = \"50ms\"\nreconnect_max = \"{}ms\"\nmetrics = \"127.0.0.1:{metrics_port}\"\n\n\
         [[watch]]\ntable = \"public.item\"\ncapture = \"wal\"\n{}",
        RECHECK.as_millis(),
        observer_handlers(false)
    )
}

/// The value of the sample line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    sample(text, prefix).unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
}

/// The blocked reader checks again, quietly, and no faster than every `reconnect_max`:
/// three more connection attempts (counted by the metrics) take at least two rechecks, and
/// leave no line in the log.
async fn assert_rechecks_quietly(daemon: &BinaryDaemon, port: u16) {
    let lines = daemon.log_text().lines().count();
    let from = metric(&scrape(port).await, "post_save_reconnects_total");
    let started = Instant::now();
    while metric(&scrape(port).await, "post_save_reconnects_total") < from + 3.0 {
        assert!(started.elapsed() < PATIENCE, "the blocked reader stopped checking:\n{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    assert!(took >= 2 * RECHECK, "3 attempts in {took:?}: the blocked reader spins");
    let new: Vec<String> = daemon.log_text().lines().skip(lines).map(str::to_owned).collect();
    assert!(new.is_empty(), "a blocked reader's rechecks log nothing, got:\n{}", new.join("\n"));
}

/// Runs `post-save doctor --json` with the daemon's config; returns the exit code and the
/// `wal` check.
fn doctor_wal(daemon: &BinaryDaemon, db: &TestDb) -> (i32, Value) {
    let out = support::post_save_on(&daemon.config, db, &["doctor", "--json"]);
    let checks: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let wal = checks.as_array().expect("an array").iter().find(|c| c["name"] == "wal").cloned();
    (out.status.code().expect("exit code"), wal.unwrap_or_else(|| panic!("no wal check in {checks}")))
}

/// A `pg_recvlogical` streaming the database's slot; killed when dropped.
struct Recvlogical(Child);

impl Recvlogical {
    /// Starts it, and waits until the slot is active for it.
    async fn hold(db: &TestDb) -> Recvlogical {
        let slot = post_save::testing::slot_name(&db.name);
        let child = Command::new(support::db::client_program("pg_recvlogical"))
            .args(["-d", &db.conninfo, "--slot", &slot, "--start", "-f", "/dev/null"])
            .args(["-o", "proto_version=1", "-o", "publication_names=post_save"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start pg_recvlogical");
        let pid = i32::try_from(child.id()).expect("pid");
        let held = Recvlogical(child);
        let client = db.client().await;
        let deadline = Instant::now() + PATIENCE;
        // the walsender is a backend of its own: the slot is held once it is active at all
        while client
            .query_one("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("slot")
            .get::<_, bool>(0)
            .eq(&false)
        {
            assert!(Instant::now() < deadline, "pg_recvlogical (pid {pid}) did not take the slot");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        held
    }

    /// The pid of the server process streaming for it.
    async fn walsender(db: &TestDb) -> i32 {
        let slot = post_save::testing::slot_name(&db.name);
        let client = db.client().await;
        client
            .query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("slot")
            .get(0)
    }
}

impl Drop for Recvlogical {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_slot_another_process_streams_is_said_once_named_by_doctor_and_not_spun_on() {
    let db = TestDb::new_logical().await;
    db.psql_ok(TABLE);
    let port = free_port();
    let text = toml(port);
    install(&db, &config(&text)).await;
    let other = Recvlogical::hold(&db).await;
    let walsender = Recvlogical::walsender(&db).await;

    let mut daemon = BinaryDaemon::launch(&db, &text, &[], &[]).await;
    let said = daemon.wait_logged("WAL capture blocked").await;
    assert_eq!(said["level"], "ERROR", "{said}");
    assert_eq!(said["reason"], "slot_in_use", "{said}");
    let error = said["error"].as_str().expect("error");
    assert!(error.contains(&format!("pid {walsender}")) && error.contains("pg_recvlogical"), "{said}");
    let fix = said["fix"].as_str().expect("fix");
    assert!(fix.contains(&format!("pg_terminate_backend({walsender})")), "{said}");
    let scraped = scrape(port).await;
    assert_eq!(metric(&scraped, "post_save_wal_blocked{reason=\"slot_in_use\"}"), 1.0, "{scraped}");
    assert_eq!(metric(&scraped, "post_save_wal_blocked{reason=\"wal_level\"}"), 0.0, "{scraped}");

    let (code, wal) = doctor_wal(&daemon, &db);
    assert_eq!((code, wal["verdict"].as_str()), (1, Some("fail")), "{wal}");
    let detail = wal["detail"].as_str().expect("detail");
    assert!(detail.contains(&format!("pid {walsender}")) && detail.contains("pg_recvlogical"), "{wal}");

    assert_rechecks_quietly(&daemon, port).await;
    assert_eq!(daemon.logged("WAL capture blocked").len(), 1, "said once:\n{}", daemon.log_text());

    // the other process lets go: the daemon streams again without a restart
    drop(other);
    db.psql_ok("INSERT INTO item (name) VALUES ('after the other reader')");
    let event = daemon.next().await;
    assert_eq!(event["instance"]["name"], "after the other reader", "{event}");
    let recovered = daemon.logged("WAL capture unblocked");
    assert_eq!(recovered.len(), 1, "{}", daemon.log_text());
    assert_eq!(recovered[0]["level"], "INFO");
    let scraped = scrape(port).await;
    assert_eq!(metric(&scraped, "post_save_wal_blocked{reason=\"slot_in_use\"}"), 0.0, "{scraped}");
    let (_, wal) = doctor_wal(&daemon, &db);
    assert_eq!(wal["verdict"], "ok", "the daemon's own stream is fine: {wal}");
    daemon.stop().await;
}

/// The service manager's end of `NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Manager {
    fn bind() -> Manager {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Manager { socket, path, _dir: dir }
    }

    /// The first `STATUS=` line containing `part`, or a panic naming those seen.
    fn status_with(&self, part: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.socket.set_read_timeout(Some(left.max(Duration::from_millis(1)))).expect("timeout");
            let Ok(n) = self.socket.recv(&mut buf) else { break };
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Some(status) = message.lines().find_map(|l| l.strip_prefix("STATUS=")).filter(|s| s.contains(part)) {
                return status.to_owned();
            }
            seen.push(message);
        }
        panic!("no STATUS= with {part:?}; got {seen:?}");
    }
}

#[tokio::test]
async fn a_server_without_logical_wal_is_said_once_and_shown_in_status_metrics_and_doctor() {
    let db = TestDb::new_without_logical_wal().await;
    db.psql_ok(TABLE);
    let port = free_port();
    let manager = Manager::bind();
    let socket = manager.path.to_str().expect("a UTF-8 path").to_owned();
    // `triggers install` refuses this server: the daemon meets it as after wal_level was lowered
    let daemon = BinaryDaemon::launch(&db, &toml(port), &["migrate"], &[("NOTIFY_SOCKET", &socket)]).await;
    let said = daemon.wait_logged("WAL capture blocked").await;
    assert_eq!((said["level"].as_str(), said["reason"].as_str()), (Some("ERROR"), Some("wal_level")), "{said}");
    assert!(said["error"].as_str().is_some_and(|e| e.contains("wal_level = replica")), "{said}");
    assert!(said["fix"].as_str().is_some_and(|f| f.contains("wal_level = logical")), "{said}");

    let status = tokio::task::spawn_blocking(move || manager.status_with("WAL capture blocked")).await.expect("status");
    assert!(status.ends_with("WAL capture blocked: the server runs with wal_level = replica, not logical"), "{status}");
    let scraped = scrape(port).await;
    assert_eq!(metric(&scraped, "post_save_wal_blocked{reason=\"wal_level\"}"), 1.0, "{scraped}");
    assert_eq!(metric(&scraped, "post_save_listening"), 1.0, "trigger captures still run: {scraped}");

    let (code, wal) = doctor_wal(&daemon, &db);
    assert_eq!((code, wal["verdict"].as_str()), (1, Some("fail")), "{wal}");
    assert!(wal["detail"].as_str().is_some_and(|d| d.contains("wal_level is replica")), "{wal}");
    assert!(wal["fix"].as_str().is_some_and(|f| f.contains("wal_level = logical")), "{wal}");

    assert_rechecks_quietly(&daemon, port).await;
    assert_eq!(daemon.logged("WAL capture blocked").len(), 1, "said once:\n{}", daemon.log_text());
    assert!(daemon.logged("WAL capture: cannot stream").is_empty(), "not retried as a passing failure");
    daemon.stop().await;
}

#[tokio::test]
async fn a_missing_publication_blocks_until_triggers_install_makes_it() {
    let db = TestDb::new_logical().await;
    db.psql_ok(TABLE);
    let port = free_port();
    let text = toml(port);
    install(&db, &config(&text)).await;
    db.psql_ok("DROP PUBLICATION IF EXISTS post_save, post_save_inserts");
    let mut daemon = BinaryDaemon::launch(&db, &text, &[], &[]).await;
    let said = daemon.wait_logged("WAL capture blocked").await;
    assert_eq!(said["reason"], "publication_missing", "{said}");
    assert!(said["fix"].as_str().is_some_and(|f| f.contains("post-save triggers install")), "{said}");
    let (_, wal) = doctor_wal(&daemon, &db);
    assert!(wal["detail"].as_str().is_some_and(|d| d.contains("publication does not exist")), "{wal}");

    post_save_ok(&daemon.config, &db, &["triggers", "install"]);
    daemon.wait_logged("WAL capture unblocked").await;
    db.psql_ok("INSERT INTO item (name) VALUES ('after install')");
    let event = daemon.next().await;
    assert_eq!(event["instance"]["name"], "after install", "{event}");
    assert_eq!(daemon.logged("WAL capture blocked").len(), 1, "{}", daemon.log_text());
    daemon.stop().await;
}

#[tokio::test]
async fn an_invalidated_slot_is_said_once_named_by_doctor_and_dropping_it_lets_saves_flow() {
    // a cluster of its own: a slot kept to 1 MB of WAL is invalidated at the next checkpoint
    let settings = [("wal_level", "logical"), ("max_slot_wal_keep_size", "1MB"), ("max_wal_size", "64MB")];
    let opts = ClusterOptions {
        settings: settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..ClusterOptions::default()
    };
    let cluster = tokio::task::spawn_blocking(move || TempCluster::start(opts))
        .await
        .expect("starting panicked")
        .unwrap_or_else(|e| panic!("{}", support::db::error_chain(&e)));
    let db = TestDb::new_on(&cluster.conninfo("postgres")).await;
    db.psql_ok(TABLE);
    let port = free_port();
    let text = toml(port);
    install(&db, &config(&text)).await;
    let client = db.client().await;
    let slot_text = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.expect(sql).get::<_, String>(0) }
    };
    let confirmed = slot_text("SELECT confirmed_flush_lsn::text FROM pg_replication_slots").await;
    for _ in 0..2 {
        db.psql_ok("INSERT INTO item (name) SELECT repeat('x', 1000) FROM generate_series(1, 3000)");
        db.psql_ok("SELECT pg_switch_wal()");
    }
    db.psql_ok("CHECKPOINT");
    assert_eq!(slot_text("SELECT wal_status FROM pg_replication_slots").await, "lost", "the slot lost its WAL");

    let mut daemon = BinaryDaemon::launch(&db, &text, &[], &[]).await;
    let said = daemon.wait_logged("WAL capture blocked").await;
    assert_eq!((said["level"].as_str(), said["reason"].as_str()), (Some("ERROR"), Some("slot_invalidated")), "{said}");
    let slot = post_save::testing::slot_name(&db.name);
    let fix = said["fix"].as_str().expect("fix");
    assert!(fix.contains(&format!("after LSN {confirmed}")), "{said}");
    assert!(fix.contains(&format!("pg_drop_replication_slot('{slot}')")), "{said}");
    let (code, wal) = doctor_wal(&daemon, &db);
    assert_eq!((code, wal["verdict"].as_str()), (1, Some("fail")), "{wal}");
    assert!(wal["detail"].as_str().is_some_and(|d| d.contains("invalidated")), "{wal}");
    let scraped = scrape(port).await;
    assert_eq!(metric(&scraped, "post_save_wal_blocked{reason=\"slot_invalidated\"}"), 1.0, "{scraped}");
    assert_rechecks_quietly(&daemon, port).await;

    // the operator drops the slot: the daemon does not make a new one on its own, and says
    // since when saves may be missing and how to send them again
    db.psql_ok(&format!("SELECT pg_drop_replication_slot('{slot}')"));
    let missing = daemon.wait_logged_times("WAL capture blocked", 2).await;
    assert_eq!(missing["reason"].as_str(), Some("slot_missing"), "{missing}");
    let fix = missing["fix"].as_str().expect("fix");
    assert!(
        fix.contains("post-save triggers install") && fix.contains("post-save backfill --table public.item"),
        "{missing}"
    );
    let (code, wal) = doctor_wal(&daemon, &db);
    assert_eq!((code, wal["verdict"].as_str()), (1, Some("fail")), "{wal}");
    assert!(wal["detail"].as_str().is_some_and(|d| d.contains("does not exist")), "{wal}");
    assert_eq!(
        db.query_i64("SELECT count(*) FROM pg_replication_slots").await,
        0,
        "no slot made behind the operator's back"
    );

    // the operator's fix: `triggers install` makes a new slot; the daemon streams from then on
    install(&db, &config(&text)).await;
    daemon.wait_logged("WAL capture unblocked").await;
    db.psql_ok("INSERT INTO item (name) VALUES ('after the new slot')");
    let event = daemon.next().await;
    assert_eq!(event["instance"]["name"], "after the new slot", "{event}");
    assert_eq!(daemon.logged("WAL capture blocked").len(), 2, "{}", daemon.log_text());
    daemon.stop().await;
    drop(client);
    drop(db);
}
