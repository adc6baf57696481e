//! Tests of `post_save::testing::cluster` (a private PostgreSQL cluster) and of the test harness.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use post_save::testing::cluster::{BINDIR_ENV, ClusterError, ClusterOptions, StopMode, TempCluster, find_bindir};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

use crate::support;
use crate::support::db::{TestDb, conninfo_with_dbname, server_conninfo};

const WAIT: Duration = Duration::from_secs(10);

fn start(opts: ClusterOptions) -> TempCluster {
    TempCluster::start(opts).unwrap_or_else(|e| panic!("{}", support::db::error_chain(&e)))
}

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// A connection whose notifications arrive on the returned channel.
async fn connect_listening(conninfo: &str) -> (Client, mpsc::UnboundedReceiver<Notification>) {
    let (client, mut connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

async fn select_one(client: &Client) -> i32 {
    client.query_one("SELECT 1", &[]).await.expect("select").get(0)
}

#[tokio::test]
async fn notifications_round_trip_over_the_socket() {
    let cluster = start(ClusterOptions::default());
    assert!(cluster.conninfo("postgres").contains("host=/"));
    let (listener, mut notifications) = connect_listening(&cluster.conninfo("postgres")).await;
    listener.batch_execute("LISTEN post_save").await.expect("listen");

    let sender = connect(&cluster.conninfo("postgres")).await;
    sender.batch_execute("SELECT pg_notify('post_save', 'hello')").await.expect("notify");

    let n = tokio::time::timeout(WAIT, notifications.recv())
        .await
        .expect("no notification in time")
        .expect("listener connection ended");
    assert_eq!((n.channel(), n.payload()), ("post_save", "hello"));
}

#[tokio::test]
async fn a_restarted_cluster_accepts_new_connections() {
    let cluster = start(ClusterOptions::default());
    let before = connect(&cluster.conninfo("postgres")).await;
    assert_eq!(select_one(&before).await, 1);

    cluster.restart(StopMode::Immediate).expect("restart");
    assert!(before.query_one("SELECT 1", &[]).await.is_err());
    let after = connect(&cluster.conninfo("postgres")).await;
    assert_eq!(select_one(&after).await, 1);

    cluster.stop(StopMode::Fast).expect("stop");
    assert!(tokio_postgres::connect(&cluster.conninfo("postgres"), NoTls).await.is_err());
    cluster.start_again().expect("start again");
    assert_eq!(select_one(&connect(&cluster.conninfo("postgres")).await).await, 1);
}

#[tokio::test]
async fn a_tcp_port_of_zero_picks_a_free_port() {
    let cluster = start(ClusterOptions { tcp_port: Some(0), ..ClusterOptions::default() });
    assert_ne!(cluster.port(), 0);
    let tcp = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", cluster.port());
    assert_eq!(select_one(&connect(&tcp).await).await, 1);
}

#[tokio::test]
async fn settings_reach_the_server() {
    let cluster =
        start(ClusterOptions { settings: vec![("work_mem".into(), "7MB".into())], ..ClusterOptions::default() });
    let client = connect(&cluster.conninfo("postgres")).await;
    let show = |name: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one(&format!("SHOW {name}"), &[]).await.expect("show");
            row.get::<_, String>(0)
        }
    };
    assert_eq!(show("work_mem").await, "7MB");
    assert_eq!(show("fsync").await, "off");
    assert_eq!(show("listen_addresses").await, "");
}

#[test]
fn dropping_the_cluster_removes_its_directory() {
    let cluster = start(ClusterOptions::default());
    let (dir, data_dir) = (cluster.socket_dir().to_owned(), cluster.data_dir().to_owned());
    assert!(data_dir.join("PG_VERSION").is_file());
    assert!(cluster.log_path().starts_with(&dir));
    assert!(cluster.bindir().join("pg_ctl").is_file());
    drop(cluster);
    assert!(!dir.exists(), "{} still exists", dir.display());
}

/// Stops the server of a persistent cluster when a test ends, even by a panic.
struct StopOnDrop(TempCluster);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.stop(StopMode::Immediate);
    }
}

fn postmaster_pid(data_dir: &Path) -> String {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).expect("postmaster.pid");
    text.lines().next().expect("pid line").to_owned()
}

#[tokio::test]
async fn a_persistent_cluster_is_reused_then_restarted() {
    // The directory itself, not a subdirectory: the server user (when running as root) must be
    // able to enter it, and a temporary directory is private to its creator.
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = tmp.path().to_owned();
    let persistent =
        |opts| TempCluster::start_persistent(&dir, opts).unwrap_or_else(|e| panic!("{}", support::db::error_chain(&e)));
    let first = StopOnDrop(persistent(ClusterOptions::default()));
    let (port, pid) = (first.0.port(), postmaster_pid(first.0.data_dir()));

    let reused = persistent(ClusterOptions::default());
    assert_eq!((reused.port(), postmaster_pid(reused.data_dir())), (port, pid.clone()));
    drop(reused);
    assert!(dir.join("data").is_dir(), "a persistent cluster outlives its handle");

    first.0.stop(StopMode::Fast).expect("stop");
    let started = persistent(ClusterOptions::default());
    assert_eq!(started.port(), port);
    assert_ne!(postmaster_pid(started.data_dir()), pid);

    let opts = ClusterOptions { settings: vec![("max_connections".into(), "42".into())], ..ClusterOptions::default() };
    let changed = persistent(opts);
    let client = connect(&changed.conninfo("postgres")).await;
    let row = client.query_one("SHOW max_connections", &[]).await.expect("show");
    assert_eq!(row.get::<_, String>(0), "42");
}

/// Set in the child process of [`find_bindir_reports_missing_binaries`].
const CHILD_ENV: &str = "POST_SAVE_TEST_FIND_BINDIR_CHILD";

/// Environment variables are process-global (and setting one is `unsafe`), so this test runs
/// itself again as a child process with `POST_SAVE_PG_BINDIR` pointing at an empty directory.
#[test]
fn find_bindir_reports_missing_binaries() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let error = find_bindir().expect_err("an empty directory holds no server binaries");
        assert!(matches!(error, ClusterError::NotFound), "{error:?}");
        assert_eq!(
            error.to_string(),
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install the \
             `postgresql` package (Debian/Ubuntu: apt-get install postgresql) or set \
             POST_SAVE_PG_BINDIR"
        );
        return;
    }
    let empty = tempfile::tempdir().expect("temporary directory");
    let out = Command::new(std::env::current_exe().expect("test executable"))
        .args(["--exact", "cluster::find_bindir_reports_missing_binaries", "--nocapture"])
        .env(CHILD_ENV, "1")
        .env(BINDIR_ENV, empty.path())
        .output()
        .expect("run the child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn find_bindir_finds_the_installed_server() {
    let bindir = find_bindir().unwrap_or_else(|e| panic!("{e}"));
    for program in ["initdb", "pg_ctl", "postgres"] {
        assert!(bindir.join(program).is_file(), "{program} in {}", bindir.display());
    }
}

#[tokio::test]
async fn test_databases_are_separate_and_dropped() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    assert_ne!(a.name, b.name);

    a.psql_ok("CREATE TABLE only_in_a (id int)");
    let current = a.psql_args(&["-Atc", "SELECT current_database()"]);
    assert_eq!(String::from_utf8_lossy(&current.stdout).trim(), a.name);
    let in_b = "SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'";
    let count: i64 = b.client().await.query_one(in_b, &[]).await.expect("count").get(0);
    assert_eq!(count, 0);
    assert!(!a.psql("SELECT no_such_column").status.success());

    let _held_open = a.client().await;
    let name = a.name.clone();
    drop(a);
    let admin = connect(&server_conninfo()).await;
    let exists = "SELECT count(*) FROM pg_database WHERE datname = $1";
    let count: i64 = admin.query_one(exists, &[&name]).await.expect("count").get(0);
    assert_eq!(count, 0, "{name} was not dropped");
}

#[test]
fn conninfo_from_a_url_keeps_the_connection_parameters() {
    let url = "postgres://bob:s%20cret@db.example:6543/admin?sslmode=disable";
    assert_eq!(
        conninfo_with_dbname(url, Some("t_1")),
        "host=db.example port=6543 user=bob password='s cret' sslmode=disable dbname=t_1"
    );
}

#[test]
fn conninfo_keeps_unix_socket_hosts_and_its_own_dbname() {
    let info = "host=/tmp/pg port=5433 user=postgres dbname=postgres";
    assert_eq!(conninfo_with_dbname(info, None), info);
}

/// Set in the child processes of [`a_run_against_other_binaries_runs_on_them`].
const VERSION_CHILD_ENV: &str = "POST_SAVE_TEST_SERVER_VERSION_CHILD";

/// The bindir of the pinned build of PostgreSQL `major` that `.ci/postgres` installed, if any.
fn installed_build(major: u32) -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("POST_SAVE_PG_CACHE").map(std::path::PathBuf::from).unwrap_or_else(|| {
        if nix::unistd::geteuid().is_root() {
            "/var/cache/post-save/postgresql".into()
        } else {
            let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default();
            home.join(".cache/post-save/postgresql")
        }
    });
    std::fs::read_dir(cache)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{major}.")))
                && p.join("bin/postgres").is_file()
        })
        .map(|p| p.join("bin"))
}

/// A test run with `POST_SAVE_PG_BINDIR` at 17 after one at 16 runs on 17: the kept test
/// cluster is keyed by version and binaries, never the one an earlier run left. Each run is a
/// child process of this test, as a separate `cargo nextest run` would be.
#[tokio::test]
async fn a_run_against_other_binaries_runs_on_them() {
    if std::env::var_os(VERSION_CHILD_ENV).is_some() {
        let admin = tokio::task::spawn_blocking(server_conninfo).await.expect("starting the test server panicked");
        let client = support::db::connect_to(&admin).await;
        let version: String = client.query_one("SHOW server_version_num", &[]).await.expect("version").get(0);
        println!("server_version_num={version}");
        return;
    }
    let (Some(sixteen), Some(seventeen)) = (installed_build(16), installed_build(17)) else {
        eprintln!(
            "note: skipping: needs the PostgreSQL 16 and 17 builds of `.ci/postgres 16` and `.ci/postgres 17` \
             (.ci/run installs them before the tests)"
        );
        return;
    };
    for (major, bindir) in [(16, sixteen), (17, seventeen)] {
        let out = Command::new(std::env::current_exe().expect("test executable"))
            .args(["--exact", "cluster::a_run_against_other_binaries_runs_on_them", "--nocapture"])
            .env(VERSION_CHILD_ENV, "1")
            .env(BINDIR_ENV, &bindir)
            .env_remove("POST_SAVE_TEST_DATABASE_URL")
            .output()
            .expect("run the child test");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let version = stdout
            .lines()
            .find_map(|l| l.strip_prefix("server_version_num="))
            .and_then(|v| v.trim().parse::<u32>().ok());
        assert_eq!(
            version.map(|v| v / 10_000),
            Some(major),
            "a run with {BINDIR_ENV}={} ran on another server:\n{stdout}\n{}",
            bindir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
