//! Exit codes of the real binary when it cannot use the database: 69 (`EX_UNAVAILABLE`) when
//! the server cannot be reached, 77 (`EX_NOPERM`) when it refuses the role, for `run` as for
//! every other command that connects. A refusal names the role and never the password.

use std::path::{Path, PathBuf};
use std::time::Duration;

use post_save::testing::cluster::{ClusterOptions, StopMode, TempCluster};
use tokio_postgres::NoTls;

use crate::support;
use crate::support::child::binary;

/// The longest any command here may run; each finishes in well under a second normally.
const PATIENCE: Duration = Duration::from_secs(60);

/// A closed port: connecting fails at once (connection refused).
const UNREACHABLE: &str = "host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=2";

/// The role of the password tests, and its password.
const ROLE: &str = "shop_app";
const PASSWORD: &str = "correct-horse-battery";
/// What the tests send instead; must never be echoed back.
const WRONG_PASSWORD: &str = "tr0ub4dor-and-3";

const CONFIG: &str = "[[watch]]\ntable = \"public.item\"\n";

/// Every command that connects, with the arguments it needs.
const CONNECTING: &[&[&str]] = &[
    &["run"],
    &["migrate"],
    &["triggers", "install"],
    &["triggers", "check"],
    &["doctor"],
    &["doctor", "--json"],
    &["events", "list"],
    &["dead", "list"],
    &["backfill", "--table", "public.item"],
];

/// What a finished command left behind.
struct Run {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn code(&self, want: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(want),
            "{}: exit code {:?} (want {want})\n--- stdout\n{}--- stderr\n{}",
            self.what,
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    fn stderr_has(&self, needle: &str) -> &Run {
        assert!(self.stderr.contains(needle), "{}: stderr lacks {needle:?}:\n{}", self.what, self.stderr);
        self
    }

    #[track_caller]
    fn never_shows(&self, secret: &str) -> &Run {
        assert!(!self.stderr.contains(secret), "{}: stderr shows the password:\n{}", self.what, self.stderr);
        assert!(!self.stdout.contains(secret), "{}: stdout shows the password:\n{}", self.what, self.stdout);
        self
    }
}

/// Runs `post-save --config <config> --database-url <url> <args>` with a clean environment and
/// `env` set.
fn post_save(config: &Path, url: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = assert_cmd::Command::from_std(binary());
    cmd.arg("--config").arg(config).args(["--database-url", url]).args(args).timeout(PATIENCE);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("could not run post-save");
    Run {
        what: format!("post-save {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write_config(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("config.toml");
    std::fs::write(&path, CONFIG).expect("write the config");
    path
}

#[test]
fn an_unreachable_database_exits_69_for_run_and_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir);
    for args in [&["run"][..], &["migrate"]] {
        post_save(&config, UNREACHABLE, args, &[]).code(69).stderr_has("cannot connect to the database");
    }
}

/// A role the (trust) test server does not know: SQLSTATE 28000, "role does not exist".
#[tokio::test]
async fn a_role_the_server_does_not_know_exits_77() {
    let admin = tokio::task::spawn_blocking(support::db::server_conninfo).await.unwrap();
    let mut url: tokio_postgres::Config = admin.parse().unwrap();
    url.user("no_such_role_here");
    let url = conninfo(&url);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir);
    for args in CONNECTING {
        post_save(&config, &url, args, &[]).code(77).stderr_has("no_such_role_here");
    }
}

/// A cluster of its own that checks passwords on TCP (scram-sha-256), with the role
/// [`ROLE`] and a role `turned_away` that `pg_hba.conf` rejects.
async fn password_cluster() -> TempCluster {
    let cluster = tokio::task::spawn_blocking(|| {
        TempCluster::start(ClusterOptions { tcp_port: Some(0), ..ClusterOptions::default() })
            .unwrap_or_else(|e| panic!("{}", support::db::error_chain(&e)))
    })
    .await
    .unwrap();
    let (client, connection) = tokio_postgres::connect(&cluster.conninfo("postgres"), NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}';
             CREATE ROLE turned_away LOGIN PASSWORD '{PASSWORD}';
             CREATE TABLE public.item (id bigserial PRIMARY KEY)"
        ))
        .await
        .expect("create the roles");
    drop(client);
    // The superuser keeps trust on the Unix socket; TCP asks for a password. Written while the
    // server is down, so it starts with these rules (a reload would apply them at some later
    // moment).
    let hba = "local all all trust\n\
               host all turned_away 127.0.0.1/32 reject\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    tokio::task::spawn_blocking(move || {
        cluster.stop(StopMode::Fast).expect("stop the cluster");
        std::fs::write(cluster.data_dir().join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        cluster.start_again().expect("start the cluster again");
        cluster
    })
    .await
    .unwrap()
}

/// A key=value connection string for `config` (TCP host, port, user, password, dbname).
fn conninfo(config: &tokio_postgres::Config) -> String {
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let mut text = format!(
        "host={host} port={} user={} dbname={} connect_timeout=10",
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("postgres"),
    );
    if let Some(pw) = config.get_password() {
        text.push_str(&format!(" password={}", String::from_utf8_lossy(pw)));
    }
    text
}

#[tokio::test]
async fn a_refused_login_exits_77_naming_the_role_and_never_the_password() {
    let cluster = password_cluster().await;
    let tcp = |user: &str, password: Option<&str>| {
        let mut text = format!("host=127.0.0.1 port={} user={user} dbname=postgres connect_timeout=10", cluster.port());
        if let Some(pw) = password {
            text.push_str(&format!(" password={pw}"));
        }
        text
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir);

    // The right password works, so what follows is about the password alone.
    post_save(&config, &tcp(ROLE, Some(PASSWORD)), &["migrate"], &[]).code(0);

    // A wrong password, in the connection string or in PGPASSWORD (SQLSTATE 28P01).
    let wrong = tcp(ROLE, Some(WRONG_PASSWORD));
    for args in CONNECTING {
        post_save(&config, &wrong, args, &[])
            .code(77)
            .stderr_has(&format!("authentication failed for role `{ROLE}`"))
            .never_shows(WRONG_PASSWORD);
    }
    post_save(&config, &tcp(ROLE, None), &["run"], &[("PGPASSWORD", WRONG_PASSWORD)])
        .code(77)
        .stderr_has(ROLE)
        .never_shows(WRONG_PASSWORD);

    // A role that does not exist: the server answers as for a wrong password (28P01).
    post_save(&config, &tcp("nobody_at_all", Some(WRONG_PASSWORD)), &["run"], &[])
        .code(77)
        .stderr_has("nobody_at_all")
        .never_shows(WRONG_PASSWORD);

    // `pg_hba.conf` rejects the role (28000), even with its right password.
    for args in [&["run"][..], &["migrate"]] {
        post_save(&config, &tcp("turned_away", Some(PASSWORD)), args, &[])
            .code(77)
            .stderr_has("turned_away")
            .never_shows(PASSWORD);
    }

    // No password at all where the server asks for one.
    for args in [&["run"][..], &["migrate"]] {
        post_save(&config, &tcp(ROLE, None), args, &[]).code(77).stderr_has(ROLE);
    }
}
