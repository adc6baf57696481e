//! Behind a transaction-mode PgBouncer (Debian's `pgbouncer`): `doctor` fails the NOTIFY round
//! trip and names the pooler; with a direct `database.listen_url` for the connections that need
//! a session, the daemon's work connection goes through the pooler and every save arrives.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use post_save::testing::cluster::{ClusterOptions, TempCluster};
use serde_json::Value;

use crate::support;
use crate::support::db::TestDb;
use crate::support::{BinaryDaemon, PATIENCE, free_port, observer_handlers, post_save_on, wait_for_count};

const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// A PgBouncer in `pool_mode = transaction` in front of a cluster's socket; stopped when dropped.
/// Its server connections last a second (`server_lifetime`): what a client leaves on one (a
/// prepared statement, a LISTEN) is soon gone, as it is on a busy pooler.
struct Bouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Bouncer {
    fn start(socket_dir: &Path, server_port: u16) -> Bouncer {
        assert!(
            Path::new(PGBOUNCER).exists(),
            "{PGBOUNCER} is missing: the pooler tests need Debian's pgbouncer (apt-get install pgbouncer; .ci/run installs it)"
        );
        let dir = tempfile::Builder::new().prefix("post-save-pgbouncer-").tempdir().expect("temp dir").keep();
        let port = free_port();
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").expect("users");
        let ini = format!(
            "[databases]\n* = host={} port={server_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {dir}/users.txt\npool_mode = transaction\n\
             default_pool_size = 4\nmax_client_conn = 200\nserver_lifetime = 1\nadmin_users = postgres\n\
             ignore_startup_parameters = extra_float_digits,options,search_path\n\
             logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
            socket_dir.display(),
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("ini");
        let mut command = Command::new(PGBOUNCER);
        command.arg(dir.join("pgbouncer.ini")).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // PgBouncer refuses to run as root: as root, it runs as the server's user
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres").expect("users").expect("a postgres user");
            for entry in std::fs::read_dir(&dir).expect("dir").map(|e| e.expect("entry").path()).chain([dir.clone()]) {
                std::os::unix::fs::chown(&entry, Some(user.uid.as_raw()), Some(user.gid.as_raw())).expect("chown");
            }
            use std::os::unix::process::CommandExt;
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let child = command.spawn().expect("start pgbouncer");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default();
            assert!(std::time::Instant::now() < deadline, "pgbouncer did not listen on {port}:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Bouncer { child, port, dir }
    }

    /// `SHOW CLIENTS` on the admin console: one line per client connection.
    fn clients(&self) -> String {
        let out = Command::new(support::db::client_program("psql"))
            .args(["-XAtq", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "pgbouncer"])
            .args(["-c", "SHOW CLIENTS"])
            .output()
            .expect("psql");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private cluster, a database on it, and a PgBouncer in front: `db.conninfo` goes through the
/// pooler; the direct string is returned beside it.
async fn behind_a_pooler() -> (TempCluster, Bouncer, TestDb, String) {
    let cluster = tokio::task::spawn_blocking(|| TempCluster::start(ClusterOptions::default()))
        .await
        .expect("starting panicked")
        .unwrap_or_else(|e| panic!("{}", support::db::error_chain(&e)));
    let mut db = TestDb::new_on(&cluster.conninfo("postgres")).await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)");
    let direct = db.conninfo.clone();
    let bouncer = Bouncer::start(cluster.socket_dir(), cluster.port());
    db.conninfo = format!("host=127.0.0.1 port={} user=postgres dbname={}", bouncer.port, db.name);
    (cluster, bouncer, db, direct)
}

fn doctor_listen(config: &Path, db: &TestDb) -> (i32, Value) {
    let out = post_save_on(config, db, &["doctor", "--json"]);
    let checks: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let listen = checks.as_array().expect("checks").iter().find(|c| c["name"] == "listen").cloned();
    (out.status.code().expect("exit code"), listen.unwrap_or_else(|| panic!("no listen check in {checks}")))
}

const WATCH: &str = "[[watch]]\ntable = \"public.item\"\n";

#[tokio::test]
async fn doctor_through_a_transaction_pooler_fails_the_notify_round_trip_and_names_the_pooler() {
    let (_cluster, bouncer, db, direct) = behind_a_pooler().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("post-save.toml");
    std::fs::write(&config, WATCH).expect("config");
    let (code, listen) = doctor_listen(&config, &db);
    assert_eq!((code, listen["verdict"].as_str()), (1, Some("fail")), "{listen}");
    let detail = listen["detail"].as_str().expect("detail");
    assert!(detail.contains("did not come back"), "{listen}");
    assert!(detail.contains(&format!("connected to port {}", bouncer.port)) && detail.contains("pooler"), "{listen}");
    assert!(listen["fix"].as_str().is_some_and(|f| f.contains("listen_url")), "{listen}");

    // with a direct listen_url the round trip works, the NOTIFY still sent through the pooler
    std::fs::write(&config, format!("[database]\nlisten_url = \"{direct}\"\n{WATCH}")).expect("config");
    let (_, listen) = doctor_listen(&config, &db);
    assert_eq!(listen["verdict"].as_str(), Some("ok"), "{listen}");
    assert!(listen["detail"].as_str().is_some_and(|d| d.contains("database.listen_url")), "{listen}");
}

#[tokio::test]
async fn with_a_direct_listen_url_the_daemon_works_through_a_transaction_pooler() {
    let (_cluster, bouncer, db, direct) = behind_a_pooler().await;
    let toml = format!(
        "[database]\nlisten_url = \"{direct}\"\n\n[daemon]\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n\n{WATCH}{}",
        observer_handlers(false)
    );
    let mut daemon = BinaryDaemon::install_and_start(&db, &toml).await;
    // saves through the pooler too, in transactions of one and of many rows
    db.psql_ok("INSERT INTO item (name) VALUES ('one')");
    db.psql_ok("INSERT INTO item (name) SELECT 'many ' || g FROM generate_series(1, 200) g");
    // after the pooler has replaced its server connections
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for i in 0..50 {
        db.psql_ok(&format!("INSERT INTO item (name) VALUES ('single {i}')"));
    }
    let events = daemon.until("all 251 saves", |e| e.len() >= 251).await;
    let ids: std::collections::BTreeSet<i64> = events.iter().map(|e| e["pk"]["id"].as_i64().expect("id")).collect();
    assert_eq!(ids.len(), 251, "each save once");
    // every event acknowledged, through the pooler
    let client = support::db::connect_to(&direct).await;
    let pending = "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL";
    wait_for_count(&client, pending, 0, PATIENCE).await;
    // and without a lost session on the way (a statement prepared on a server connection the
    // pooler has since closed fails, and the daemon would reconnect and read again)
    let log = daemon.log_text();
    let troubles: Vec<&str> =
        log.lines().filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\"")).collect();
    assert!(troubles.is_empty(), "the daemon had trouble through the pooler:\n{}", troubles.join("\n"));
    let clients = bouncer.clients();
    assert!(clients.contains("post-save"), "the daemon's work connection goes through the pooler:\n{clients}");
    daemon.stop().await;
}
