//! systemd integration, with the real binary: the unit file's hardening score, `READY=1` after
//! LISTEN, watchdog pings only while the database answers, and SIGHUP reloads.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::support::child;
use crate::support::db::TestDb;
use crate::support::{PATIENCE, config, install};

const TABLE: &str = "CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)";

fn config_text(handler: &str) -> String {
    format!(
        r#"
[daemon]
reconnect_min = "100ms"
reconnect_max = "500ms"

[[watch]]
table = "public.item"

[[handler]]
name = "{handler}"
sender = "public.item"
kind = "log"
fields = ["id", "sender", "pk"]
"#
    )
}

/// The service manager's end: a datagram socket the daemon's `NOTIFY_SOCKET` points at.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Manager { socket, path }
    }

    /// The next message, or `None` after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).expect("set timeout");
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Waits for a message containing the line `line`; returns it.
    fn wait_for(&self, line: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(m) if m.lines().any(|l| l == line) => return m,
                Some(m) => seen.push(m),
                None => break,
            }
        }
        panic!("no {line:?} within {within:?}; got {seen:?}");
    }

    /// Every message received during `window`.
    fn collect(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(m) = self.recv(left) {
                got.push(m);
            }
        }
        got
    }
}

fn watchdog_pings(messages: &[String]) -> usize {
    messages.iter().filter(|m| m.lines().any(|l| l == "WATCHDOG=1")).count()
}

/// `post-save run` under a fake service manager, its JSON log lines on `lines`.
struct Daemon {
    process: child::Daemon,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Daemon {
    fn spawn(config: &Path, db: &TestDb, manager: &Manager) -> Daemon {
        let mut command = child::command(config, &db.conninfo);
        command.env("NOTIFY_SOCKET", &manager.path).env("WATCHDOG_USEC", "1000000").env_remove("WATCHDOG_PID");
        let (tx, lines) = mpsc::channel();
        let process = child::Daemon::start(command, move |text| {
            let line = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            tx.send(line).is_ok()
        });
        Daemon { process, lines }
    }

    fn signal(&self, signal: Signal) {
        self.process.signal(signal);
    }

    /// Waits for a log line for which `pred` holds; returns it.
    fn wait_line(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + PATIENCE;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no log line {what} within {PATIENCE:?}");
    }

    /// Waits for the log handler `handler` to log the event of row `id`.
    fn wait_handled(&self, handler: &str, id: i64) {
        self.wait_line(&format!("of {handler} handling row {id}"), |l| {
            l["message"] == "save event"
                && l["handler"] == handler
                && l["event"].as_str().is_some_and(|e| e.contains(&format!("\"pk\":{{\"id\":{id}}}")))
        });
    }
}

async fn setup(handler: &str) -> (TestDb, TempDir, PathBuf) {
    let db = TestDb::new().await;
    db.psql_ok(TABLE);
    let text = config_text(handler);
    install(&db, &config(&text)).await;
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("write config");
    (db, dir, path)
}

fn insert(db: &TestDb, name: &str) -> i64 {
    let out = db.psql_ok(&format!("INSERT INTO item (name) VALUES ('{name}') RETURNING id"));
    out.lines().find_map(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("no id in {out:?}"))
}

#[tokio::test]
async fn ready_after_listen_and_watchdog_only_while_the_database_answers() {
    let (db, dir, path) = setup("first").await;
    let manager = Manager::bind(dir.path());
    let mut daemon = Daemon::spawn(&path, &db, &manager);

    let ready = manager.wait_for("READY=1", PATIENCE);
    assert!(ready.contains("STATUS=listening on 1 tables"), "{ready:?}");
    // Ready means listening: a save right now is handled.
    let id = insert(&db, "a");
    daemon.wait_handled("first", id);

    let healthy = manager.collect(Duration::from_secs(3));
    assert!(watchdog_pings(&healthy) >= 2, "too few pings while healthy: {healthy:?}");

    // Cut the database off: no new connections, the daemon's killed.
    // From another database: a database cannot lock itself out.
    let (admin, connection) =
        tokio_postgres::connect(&format!("{} dbname=postgres", db.conninfo), tokio_postgres::NoTls)
            .await
            .expect("connect to postgres");
    tokio::spawn(connection);
    admin.batch_execute(&format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false", db.name)).await.expect("alter");
    admin
        .batch_execute(&format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'", db.name))
        .await
        .expect("terminate");
    manager.wait_for("STATUS=reconnecting, attempt 1", PATIENCE);
    let down = manager.collect(Duration::from_secs(3));
    assert_eq!(watchdog_pings(&down), 0, "pinged while the database was gone: {down:?}");

    admin.batch_execute(&format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true", db.name)).await.expect("alter");
    manager.wait_for("READY=1", PATIENCE);
    manager.wait_for("WATCHDOG=1", Duration::from_secs(10));

    daemon.signal(Signal::SIGTERM);
    manager.wait_for("STOPPING=1", PATIENCE);
    let status = daemon.process.wait(PATIENCE).await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn sighup_keeps_the_old_handlers_on_a_bad_config_and_applies_a_good_one() {
    let (db, dir, path) = setup("first").await;
    let manager = Manager::bind(dir.path());
    let daemon = Daemon::spawn(&path, &db, &manager);
    manager.wait_for("READY=1", PATIENCE);

    // A broken file: an unknown key on line 14.
    std::fs::write(&path, format!("{}colour = \"red\"\n", config_text("second"))).expect("write");
    daemon.signal(Signal::SIGHUP);
    manager.wait_for("RELOADING=1", PATIENCE);
    let error = daemon.wait_line("of the failed reload", |l| l["level"] == "ERROR");
    assert_eq!(error["key"], "handler[0].colour", "{error}");
    assert_eq!(error["line"], 14, "{error}");
    manager.wait_for("READY=1", PATIENCE);
    let id = insert(&db, "b");
    daemon.wait_handled("first", id);

    // A good one: the new handler takes the new events.
    std::fs::write(&path, config_text("second")).expect("write");
    daemon.signal(Signal::SIGHUP);
    manager.wait_for("RELOADING=1", PATIENCE);
    daemon.wait_line("configuration reloaded", |l| l["message"] == "configuration reloaded");
    manager.wait_for("READY=1", PATIENCE);
    let id = insert(&db, "c");
    daemon.wait_handled("second", id);
}

#[test]
fn unit_file_is_hardened() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(analyze.exists(), "/usr/bin/systemd-analyze is missing: install Debian's systemd package (.ci/run does)");
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/post-save.service");
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| {
        panic!("no exposure level: {text}{}", String::from_utf8_lossy(&out.stderr));
    });
    let score: f64 = line
        .split(": ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    assert!(score <= 2.0, "exposure {score} > 2.0: {text}");
}
