//! The integration tests' database harness: every test gets a database of its own.
//!
//! The server is the one named by `POST_SAVE_TEST_DATABASE_URL` (a libpq URL or `key=value`
//! string for its admin database, e.g. `host=127.0.0.1 port=5432 user=postgres
//! dbname=postgres`; the role must be allowed to create databases). Without it, the tests use a
//! private cluster of their own (see [`private_cluster`]), which needs only the PostgreSQL
//! server binaries.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use post_save::testing::cluster::{ClusterOptions, TempCluster, find_bindir};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

/// The environment variable naming the server the tests use.
pub const DATABASE_URL_ENV: &str = "POST_SAVE_TEST_DATABASE_URL";
/// Prefix of every test database's name: `t_<pid>_<sequence>_<random>`.
const DB_PREFIX: &str = "t_";

/// A database of its own for one test, dropped (with its connections) when this is dropped.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// A libpq `key=value` connection string for the database, for tokio-postgres and `psql`.
    pub conninfo: String,
    /// The connection string of the server's admin database.
    admin: String,
}

impl TestDb {
    /// Creates a new, empty database on the test server.
    pub async fn new() -> TestDb {
        let admin = tokio::task::spawn_blocking(server_conninfo).await.expect("starting the test server panicked");
        let name = unique_name();
        let client = connect(&admin).await;
        create_database(&client, &name).await;
        TestDb { conninfo: conninfo_with_dbname(&admin, Some(&name)), name, admin }
    }

    /// Creates a new, empty database on a private cluster that writes logical WAL
    /// (`wal_level = logical`), for `capture = "wal"`: a server named by
    /// `POST_SAVE_TEST_DATABASE_URL` is used only if it already does.
    pub async fn new_logical() -> TestDb {
        let admin =
            tokio::task::spawn_blocking(logical_server_conninfo).await.expect("starting the test server panicked");
        let name = unique_name();
        let client = connect(&admin).await;
        create_database(&client, &name).await;
        TestDb { conninfo: conninfo_with_dbname(&admin, Some(&name)), name, admin }
    }

    /// Creates a new, empty database on a server that does not write logical WAL
    /// (`wal_level = replica`): the one named by `POST_SAVE_TEST_DATABASE_URL` unless it does,
    /// else a private cluster.
    pub async fn new_without_logical_wal() -> TestDb {
        let admin =
            tokio::task::spawn_blocking(replica_server_conninfo).await.expect("starting the test server panicked");
        let name = unique_name();
        let client = connect(&admin).await;
        create_database(&client, &name).await;
        TestDb { conninfo: conninfo_with_dbname(&admin, Some(&name)), name, admin }
    }

    /// Creates a new, empty database on the server of the admin connection string `admin`
    /// (a [`TempCluster`] of the test's own, say); drop it before that server stops.
    pub async fn new_on(admin: &str) -> TestDb {
        let name = unique_name();
        let client = connect(admin).await;
        create_database(&client, &name).await;
        TestDb { conninfo: conninfo_with_dbname(admin, Some(&name)), name, admin: admin.to_owned() }
    }

    /// A new connection to this database (its connection task spawned on the current runtime).
    pub async fn client(&self) -> Client {
        connect(&self.conninfo).await
    }

    /// The one bigint that `sql` returns, over a new connection; panics naming the statement.
    pub async fn query_i64(&self, sql: &str) -> i64 {
        query_i64(&self.client().await, sql).await
    }

    /// Runs `psql -X -v ON_ERROR_STOP=1 -c <sql>` against this database.
    pub fn psql(&self, sql: &str) -> Output {
        self.psql_args(&["-c", sql])
    }

    /// Runs `psql -X -v ON_ERROR_STOP=1 <args>` against this database.
    pub fn psql_args(&self, args: &[&str]) -> Output {
        Command::new(psql_program())
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", &self.conninfo])
            .args(args)
            .output()
            .expect("could not run psql")
    }

    /// Runs `sql` with [`TestDb::psql`], asserts that it succeeded and returns its output.
    pub fn psql_ok(&self, sql: &str) -> String {
        let out = self.psql(sql);
        assert!(
            out.status.success(),
            "psql failed ({}) on {sql:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("psql printed invalid UTF-8")
    }
}

impl Drop for TestDb {
    /// Drops the database on a thread of its own: this may run inside a tokio runtime, where
    /// blocking on another runtime is not allowed.
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&name));
        // A database with a replication slot cannot be dropped.
        let slots = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = {} AND NOT active",
            quote_literal(&name)
        );
        match std::thread::spawn(move || execute_blocking(&admin, &slots).and_then(|()| execute_blocking(&admin, &sql)))
            .join()
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("warning: could not drop test database {name}: {error}"),
            Err(_) => eprintln!("warning: dropping test database {name} panicked"),
        }
    }
}

/// The one bigint that `sql` returns on `client`; panics naming the statement.
pub async fn query_i64(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// The connection string of the test server's admin database (`dbname=postgres` for the
/// private cluster). Starts the private cluster on first use; blocks while doing so.
pub fn server_conninfo() -> String {
    static ADMIN: OnceLock<String> = OnceLock::new();
    ADMIN
        .get_or_init(|| match std::env::var(DATABASE_URL_ENV) {
            Ok(url) if !url.trim().is_empty() => conninfo_with_dbname(&url, None),
            _ => private_cluster(),
        })
        .clone()
}

/// The `wal_level` of the server at `conninfo`; `None` when it cannot be read.
fn wal_level(conninfo: &str) -> Option<String> {
    block_on(async {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.ok()?;
        tokio::spawn(connection);
        client.query_one("SELECT current_setting('wal_level')", &[]).await.ok().map(|r| r.get::<_, String>(0))
    })
}

/// The admin connection string of a server with `wal_level = logical`: the one named by
/// `POST_SAVE_TEST_DATABASE_URL` when it writes logical WAL, else a second private cluster
/// (`post-save-test-logical-<major>-<bindir hash>-<uid>`, kept running like the first).
pub fn logical_server_conninfo() -> String {
    static ADMIN: OnceLock<String> = OnceLock::new();
    ADMIN
        .get_or_init(|| {
            let shared = server_conninfo();
            let level = wal_level(&shared);
            if level.as_deref() == Some("logical") {
                return shared;
            }
            private_cluster_named(
                "post-save-test-logical",
                &[("wal_level", "logical"), ("max_replication_slots", "100"), ("max_wal_senders", "100")],
            )
        })
        .clone()
}

/// The admin connection string of a server with `wal_level = replica`: the one named by
/// `POST_SAVE_TEST_DATABASE_URL` (or the private test cluster) unless it writes logical WAL,
/// else a private cluster `post-save-test-replica-<major>-<bindir hash>-<uid>`.
pub fn replica_server_conninfo() -> String {
    static ADMIN: OnceLock<String> = OnceLock::new();
    ADMIN
        .get_or_init(|| {
            let shared = server_conninfo();
            let level = wal_level(&shared);
            if level.as_deref() == Some("replica") {
                return shared;
            }
            private_cluster_named("post-save-test-replica", &[("wal_level", "replica")])
        })
        .clone()
}

/// Starts (or reuses) the private test cluster and returns its admin connection string.
///
/// nextest runs every test in a process of its own, so a cluster per process would cost
/// seconds per test. Instead all test processes share one cluster in a fixed directory,
/// `$TMPDIR/post-save-test-cluster-<major>-<bindir hash>-<uid>`: the first process to get there
/// creates and starts it (under a lock, see [`TempCluster::start_persistent`]) and it is **left
/// running** after the tests, to be reused by the next run. Stop it with `pg_ctl stop -D <that
/// directory>/data` (as the `postgres` user when root), or just remove the directory after
/// stopping it.
fn private_cluster() -> String {
    private_cluster_named("post-save-test-cluster", &[])
}

/// Starts (or reuses) the shared private cluster in `$TMPDIR/<name>-<major>-<bindir hash>-<uid>`
/// with `settings` on top of the common ones, sweeps abandoned test databases, and returns its
/// admin connection string.
fn private_cluster_named(name: &str, settings: &[(&str, &str)]) -> String {
    let uid = nix::unistd::geteuid();
    // One kept cluster per major version and binary directory: a run against other binaries
    // (POST_SAVE_PG_BINDIR) never tests the server a previous run left behind.
    let bindir = find_bindir()
        .unwrap_or_else(|e| panic!("no PostgreSQL server binaries for the test cluster: {}", error_chain(&e)));
    let major = post_save::testing::cluster::server_major(&bindir)
        .unwrap_or_else(|e| panic!("no PostgreSQL server binaries for the test cluster: {}", error_chain(&e)));
    // FNV-1a of the binaries' directory: two builds of one major version keep a cluster each.
    let place = bindir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    let dir = std::env::temp_dir().join(format!("{name}-{major}-{:08x}-{uid}", place as u32));
    let opts = ClusterOptions {
        settings: [("max_connections", "200")]
            .iter()
            .chain(settings)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..ClusterOptions::default()
    };
    let cluster = TempCluster::start_persistent(&dir, opts)
        .unwrap_or_else(|e| panic!("could not start the test cluster {name}: {}", error_chain(&e)));
    let admin = cluster.conninfo("postgres");
    drop_abandoned_databases(&admin);
    admin
}

/// Drops test databases whose creating process is gone (a test killed before its `Drop` ran).
/// Only for the private cluster: its databases were all made by processes on this machine.
fn drop_abandoned_databases(admin: &str) {
    let admin = admin.to_owned();
    let sweep = move || -> Result<(), tokio_postgres::Error> {
        block_on(async {
            let client = connect(&admin).await;
            let rows = client.query("SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'", &[]).await?;
            for name in rows.iter().map(|row| row.get::<_, String>(0)) {
                if creator_pid(&name).is_some_and(|pid| !process_exists(pid)) {
                    let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&name));
                    let slots = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                                 WHERE database = $1 AND NOT active";
                    // Another process may be dropping it too.
                    let _ = client.execute(slots, &[&name]).await;
                    let _ = client.batch_execute(&sql).await;
                }
            }
            Ok(())
        })
    };
    if let Ok(Err(error)) = std::thread::spawn(sweep).join() {
        eprintln!("warning: could not drop abandoned test databases: {error}");
    }
}

/// The pid in a test database's name `t_<pid>_...`.
fn creator_pid(name: &str) -> Option<i32> {
    name.strip_prefix(DB_PREFIX)?.split('_').next()?.parse().ok()
}

fn process_exists(pid: i32) -> bool {
    use nix::errno::Errno;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// A database name no other test (in any process, on any run) uses at the same time.
fn unique_name() -> String {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{DB_PREFIX}{}_{seq}_{nanos:x}", std::process::id())
}

/// `CREATE DATABASE`, retried while the template is busy: it fails with "source database
/// "template1" is being accessed by other users" when anyone else is connected to it.
async fn create_database(client: &Client, name: &str) {
    let sql = format!("CREATE DATABASE {}", quote_ident(name));
    let mut delay = Duration::from_millis(50);
    for attempt in 1.. {
        match client.batch_execute(&sql).await {
            Ok(()) => return,
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && attempt < 10 => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => panic!("could not create test database {name}: {}", error_chain(&e)),
        }
    }
}

/// A new connection to `conninfo` (its connection task spawned on the current runtime).
pub async fn connect_to(conninfo: &str) -> Client {
    connect(conninfo).await
}

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.unwrap_or_else(|e| {
        let shown = redacted(conninfo);
        panic!("could not connect to {shown}: {}", error_chain(&e))
    });
    tokio::spawn(async move {
        // The error, if any, surfaces on the client's next call.
        let _ = connection.await;
    });
    client
}

/// Runs `sql` on a runtime of its own; call it from a thread outside any runtime.
fn execute_blocking(conninfo: &str, sql: &str) -> Result<(), tokio_postgres::Error> {
    block_on(async {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute(sql).await
    })
}

fn block_on<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("could not build a tokio runtime")
        .block_on(future)
}

/// Rewrites a libpq URL or `key=value` string as a `key=value` string for database `dbname`
/// (or for the string's own database when `None`).
pub fn conninfo_with_dbname(conninfo: &str, dbname: Option<&str>) -> String {
    let config = Config::from_str(conninfo).unwrap_or_else(|e| panic!("invalid {DATABASE_URL_ENV}: {e}"));
    render_conninfo(&config, dbname, true)
}

/// A connection string fit for an error message: without its password.
fn redacted(conninfo: &str) -> String {
    Config::from_str(conninfo)
        .map_or_else(|_| "(an invalid connection string)".to_owned(), |config| render_conninfo(&config, None, false))
}

fn render_conninfo(config: &Config, dbname: Option<&str>, with_password: bool) -> String {
    let list = |items: Vec<String>| (!items.is_empty()).then(|| items.join(","));
    let hosts = config.get_hosts().iter().map(|host| match host {
        Host::Tcp(name) => name.clone(),
        Host::Unix(path) => path.to_string_lossy().into_owned(),
    });
    let addrs = config.get_hostaddrs().iter().map(ToString::to_string);
    let ports = config.get_ports().iter().map(ToString::to_string);
    let password = config.get_password().filter(|_| with_password).map(|p| String::from_utf8_lossy(p).into_owned());
    let sslmode = match config.get_ssl_mode() {
        SslMode::Disable => Some("disable"),
        SslMode::Require => Some("require"),
        _ => None,
    };
    let pairs = [
        ("host", list(hosts.collect())),
        ("hostaddr", list(addrs.collect())),
        ("port", list(ports.collect())),
        ("user", config.get_user().map(str::to_owned)),
        ("password", password),
        ("options", config.get_options().map(str::to_owned)),
        ("sslmode", sslmode.map(str::to_owned)),
        ("dbname", dbname.or(config.get_dbname()).map(str::to_owned)),
    ];
    pairs
        .into_iter()
        .filter_map(|(key, value)| Some(format!("{key}={}", quote_conninfo(&value?))))
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote_conninfo(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Quotes an SQL identifier.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `psql` from `PATH`, else from the server's bindir.
fn psql_program() -> PathBuf {
    client_program("psql")
}

/// A PostgreSQL client program (`psql`, `pg_recvlogical`): on `PATH`, else beside the server.
pub fn client_program(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()));
    on_path.or_else(|| find_bindir().ok().map(|dir| dir.join(name))).unwrap_or_else(|| PathBuf::from(name))
}

/// An error with its sources: "a: b: c".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// The Python of a private virtualenv with `tests/python/requirements.txt` installed (PyPI),
/// created on first use and shared by every test process: `$POST_SAVE_TEST_VENV`, else
/// `$TMPDIR/post-save-test-venv-<uid>`. A file lock keeps concurrent test processes from
/// installing at the same time; a stamp holding the requirements makes later calls instant.
#[cfg_attr(not(any(feature = "email", feature = "celery")), allow(dead_code))]
pub fn python_venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let requirements = root.join("tests/python/requirements.txt");
        let wanted = std::fs::read_to_string(&requirements).expect("reading tests/python/requirements.txt");
        let dir = std::env::var_os("POST_SAVE_TEST_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join(format!("post-save-test-venv-{}", nix::unistd::getuid())));
        let python = dir.join("bin/python");
        let stamp = dir.join("post-save-requirements.txt");
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
            return python;
        }
        std::fs::create_dir_all(dir.parent().unwrap_or(&dir)).expect("creating the venv's parent");
        let lock_path = dir.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .expect("opening the venv lock");
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("locking the venv");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            if !python.exists() {
                let out =
                    Command::new("python3").args(["-m", "venv"]).arg(&dir).output().expect("running python3 -m venv");
                assert!(out.status.success(), "python3 -m venv failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let out = Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(&requirements)
                .output()
                .expect("running pip");
            assert!(
                out.status.success(),
                "pip install -r tests/python/requirements.txt failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&stamp, &wanted).expect("writing the venv stamp");
        }
        drop(lock);
        python
    })
    .clone()
}

impl TestDb {
    /// Runs `psql -X <args>` against this database with `input` piped into its stdin (no
    /// `ON_ERROR_STOP` unless `args` asks for it, so a caller can see what a script does on
    /// its own).
    pub fn psql_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = Command::new(psql_program())
            .args(["-X", "-d", &self.conninfo])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("could not run psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        let input = input.to_vec();
        // A thread of its own: psql may fill its output pipes before it has read all the input.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("waiting for psql");
        let _ = writer.join();
        out
    }
}
