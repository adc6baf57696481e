//! Least privilege, with the real binary: an owner role that is no superuser installs
//! (`migrate`, `triggers install`); a second role, neither superuser nor owner, granted only what
//! `post-save grants --role` prints, runs the daemon and gets every save through the trigger
//! capture (durable and notify) and through `capture = "wal"`; with one right revoked, `doctor`
//! names it and the GRANT that gives it back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

use crate::support;
use crate::support::child::{doctor, post_save_at};
use crate::support::db::TestDb;
use crate::support::logd::{LogDaemon, log_handlers};
use crate::support::wait_for_sql;

/// Two login roles of the cluster, dropped (after the test's database) when this is dropped:
/// declare it before the [`TestDb`] so that the database goes first.
struct Roles {
    /// Owns the watched tables and the post_save schema; no superuser.
    owner: String,
    /// Runs the daemon: neither superuser nor owner.
    runner: String,
    /// The server's admin connection string.
    admin: String,
}

impl Roles {
    fn new(admin: String) -> Roles {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let tag = format!("{}_{nanos:x}", std::process::id());
        let roles = Roles { owner: format!("ps_owner_{tag}"), runner: format!("ps_runner_{tag}"), admin };
        let out = psql(&roles.admin, &format!("CREATE ROLE {} LOGIN; CREATE ROLE {} LOGIN", roles.owner, roles.runner));
        assert!(out.status.success(), "creating roles: {}", String::from_utf8_lossy(&out.stderr));
        roles
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        let out =
            psql(&self.admin, &format!("DROP ROLE IF EXISTS {}; DROP ROLE IF EXISTS {}", self.owner, self.runner));
        if !out.status.success() {
            eprintln!("warning: could not drop the test roles: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

fn psql(conninfo: &str, sql: &str) -> Output {
    Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-c", sql])
        .output()
        .expect("run psql")
}

fn psql_ok(conninfo: &str, sql: &str) {
    let out = psql(conninfo, sql);
    assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `conninfo` (a `key=value` string) with `user=role`.
fn as_role(conninfo: &str, role: &str) -> String {
    let mut parts: Vec<String> = conninfo
        .split(' ')
        .filter(|kv| !kv.starts_with("user=") && !kv.starts_with("password="))
        .map(String::from)
        .collect();
    parts.push(format!("user={role}"));
    parts.join(" ")
}

fn post_save_ok(config: &Path, conninfo: &str, args: &[&str]) -> String {
    let out = post_save_at(config, conninfo, args);
    assert!(
        out.status.success(),
        "post-save {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn write_config(dir: &TempDir, toml: &str) -> PathBuf {
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// The owner creates `tables` (CREATE statements) and installs as itself; the admin grants the
/// runner what `post-save grants` prints, nothing else. Returns the statements granted.
async fn install_as_owner(db: &TestDb, roles: &Roles, config: &Path, tables: &str, owner_extra: &str) -> String {
    db.psql_ok(&format!(
        "GRANT CREATE ON DATABASE {db} TO {owner}; GRANT CREATE ON SCHEMA public TO {owner}; {owner_extra}",
        db = db.name,
        owner = roles.owner
    ));
    let owner = as_role(&db.conninfo, &roles.owner);
    psql_ok(&owner, tables);
    post_save_ok(config, &owner, &["migrate"]);
    post_save_ok(config, &owner, &["triggers", "install"]);
    post_save_ok(config, &owner, &["triggers", "check"]);

    let grants = post_save_ok(config, &db.conninfo, &["grants", "--role", &roles.runner]);
    assert!(grants.lines().all(|l| l.ends_with(';')), "one statement per line:\n{grants}");
    let out = db.psql_stdin(&["-q", "-v", "ON_ERROR_STOP=1"], grants.as_bytes());
    assert!(out.status.success(), "granting:\n{grants}\n{}", String::from_utf8_lossy(&out.stderr));

    // Neither superuser nor owner of anything here, nor a member of the owner.
    let runner = db.client().await;
    let row = runner
        .query_one(
            "SELECT r.rolsuper, (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid), \
                    pg_has_role(r.oid, (SELECT oid FROM pg_roles WHERE rolname = $2), 'MEMBER'), \
                    (SELECT rolsuper FROM pg_roles WHERE rolname = $2) \
               FROM pg_roles r WHERE r.rolname = $1",
            &[&roles.runner, &roles.owner],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, bool>(0), row.get::<_, i64>(1), row.get::<_, bool>(2)), (false, 0, false));
    assert!(!row.get::<_, bool>(3), "the owner is no superuser");
    grants
}

const TRIGGER_TABLES: &str = "CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL); \
                              CREATE TABLE note (id bigserial PRIMARY KEY, body text NOT NULL)";

#[tokio::test]
async fn a_role_granted_only_what_grants_prints_runs_the_trigger_capture() {
    let roles = Roles::new(tokio::task::spawn_blocking(support::db::server_conninfo).await.unwrap());
    let db = TestDb::new().await;
    let dir = TempDir::new().unwrap();
    // A short keep_handled, so that ledger retention (TRUNCATE of a partition) runs as the runner.
    let config = write_config(
        &dir,
        &format!(
            "[daemon]\nkeep_handled = \"2s\"\nlease = \"5s\"\n\
             [[watch]]\ntable = \"public.item\"\noperations = [\"insert\", \"update\"]\n\
             [[watch]]\ntable = \"public.note\"\nmode = \"notify\"\n{}",
            log_handlers(false)
        ),
    );
    let grants = install_as_owner(&db, &roles, &config, TRIGGER_TABLES, "").await;
    assert!(!grants.contains("\"item\""), "a durable table needs no grant:\n{grants}");
    assert!(grants.contains(r#"GRANT SELECT ON TABLE "public"."note""#), "{grants}");
    assert!(!grants.contains("REPLICATION"), "{grants}");
    assert!(grants.contains("post_save.lease"), "daemon.lease needs the lease table:\n{grants}");

    let runner = as_role(&db.conninfo, &roles.runner);
    let (code, checks) = doctor(&config, &runner);
    assert_eq!(checks["rights"]["verdict"], "ok", "{}", checks["rights"]);
    assert_eq!(checks["schema"]["verdict"], "ok", "{}", checks["schema"]);
    if checks["notify_queue"]["verdict"] == "ok" {
        assert_eq!(code, 0, "{checks}");
    }

    let mut daemon = LogDaemon::start_on(&config, &runner).await;
    let owner = as_role(&db.conninfo, &roles.owner);
    psql_ok(&owner, "INSERT INTO item (name) VALUES ('durable')");
    let e = daemon.next_event("a durable insert").await;
    assert_eq!((e["sender"].as_str(), e["instance"]["name"].as_str()), (Some("public.item"), Some("durable")), "{e}");
    let first = e["id"].as_i64().expect("a ledger id");
    psql_ok(&owner, "UPDATE item SET name = 'updated'");
    let e = daemon.next_event("a durable update").await;
    assert_eq!(e["update_fields"], serde_json::json!(["name"]), "{e}");
    // notify: a small row rides in the note; one too big for it is read back from the table.
    psql_ok(&owner, "INSERT INTO note (body) VALUES ('small')");
    let e = daemon.next_event("a notify insert").await;
    assert_eq!(e["instance"]["body"], "small", "{e}");
    psql_ok(&owner, "INSERT INTO note (body) VALUES (repeat('x', 9000))");
    let e = daemon.next_event("a notify insert too big for its note").await;
    assert_eq!(e["instance"]["body"].as_str().map(str::len), Some(9000), "{e}");
    // Acknowledged as the runner, and emptied away by retention as the runner.
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    wait_for_sql(&db, &format!("SELECT count(*) FROM post_save.event WHERE id = {first}"), 0).await;
    psql_ok(&owner, "INSERT INTO item (name) VALUES ('after retention')");
    let e = daemon.next_event("an insert after retention").await;
    assert_eq!(e["instance"]["name"], "after retention", "{e}");
    daemon.stop().await;

    // One right taken away: doctor names it and the statement that gives it back.
    db.psql_ok(&format!("REVOKE UPDATE ON post_save.event FROM {}", roles.runner));
    let (code, checks) = doctor(&config, &runner);
    assert_eq!(code, 1, "{checks}");
    let rights = &checks["rights"];
    assert_eq!(rights["verdict"], "fail", "{rights}");
    let detail = rights["detail"].as_str().unwrap();
    assert!(detail.contains("UPDATE on post_save.event ") && !detail.contains("SELECT"), "{rights}");
    let fix = rights["fix"].as_str().unwrap();
    let grant = format!("GRANT UPDATE ON TABLE post_save.event TO \"{}\";", roles.runner);
    assert!(fix.contains(&grant), "{rights}");
    db.psql_ok(&grant);
    let (_, checks) = doctor(&config, &runner);
    assert_eq!(checks["rights"]["verdict"], "ok", "{}", checks["rights"]);
    drop(db);
}

#[tokio::test]
async fn a_role_granted_only_what_grants_prints_runs_the_wal_capture() {
    let roles = Roles::new(tokio::task::spawn_blocking(support::db::logical_server_conninfo).await.unwrap());
    let db = TestDb::new_logical().await;
    let dir = TempDir::new().unwrap();
    let config = write_config(
        &dir,
        &format!(
            "[daemon]\nsweep_interval = \"1h\"\n\
             [[watch]]\ntable = \"public.item\"\ncapture = \"wal\"\noperations = [\"insert\", \"update\"]\n{}",
            log_handlers(false)
        ),
    );
    // Installing the WAL capture makes the slot: the owner needs REPLICATION for that.
    let owner_extra = format!("ALTER ROLE {} WITH REPLICATION", roles.owner);
    let tables = "CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)";
    let grants = install_as_owner(&db, &roles, &config, tables, &owner_extra).await;
    assert!(grants.contains(&format!("ALTER ROLE \"{}\" WITH REPLICATION;", roles.runner)), "{grants}");
    assert!(!grants.contains("\"item\""), "{grants}");

    let runner = as_role(&db.conninfo, &roles.runner);
    let (_, checks) = doctor(&config, &runner);
    assert_eq!(checks["rights"]["verdict"], "ok", "{}", checks["rights"]);

    let mut daemon = LogDaemon::start_on(&config, &runner).await;
    let owner = as_role(&db.conninfo, &roles.owner);
    psql_ok(&owner, "INSERT INTO item (name) VALUES ('from the wal')");
    let e = daemon.next_event("a WAL-captured insert").await;
    assert_eq!(
        (e["sender"].as_str(), e["instance"]["name"].as_str()),
        (Some("public.item"), Some("from the wal")),
        "{e}"
    );
    psql_ok(&owner, "UPDATE item SET name = 'changed'");
    let e = daemon.next_event("a WAL-captured update").await;
    assert_eq!(e["update_fields"], serde_json::json!(["name"]), "{e}");
    daemon.stop().await;
    db.psql_ok(&format!("ALTER ROLE {} WITH NOREPLICATION", roles.runner));
    let (code, checks) = doctor(&config, &runner);
    assert_eq!(code, 1, "{checks}");
    let rights = &checks["rights"];
    assert!(rights["detail"].as_str().unwrap().contains("REPLICATION"), "{rights}");
    assert!(
        rights["fix"].as_str().unwrap().contains(&format!("ALTER ROLE \"{}\" WITH REPLICATION;", roles.runner)),
        "{rights}"
    );
    drop(db);
}
