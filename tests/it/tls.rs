//! TLS on every connection, against private PostgreSQL clusters with `ssl = on`, a CA and
//! certificates made by the test, and a `pg_hba.conf` that accepts TCP connections only over
//! TLS (`hostssl` with scram-sha-256, `hostssl … cert` for the client-certificate role,
//! `hostnossl … reject`): libpq's meaning for each `sslmode`, root certificates, host names,
//! client certificates, the `PGSSL*` variables, channel binding, a server without TLS, and the
//! daemon delivering over TLS through both captures. Self-contained: it starts its own
//! clusters (which need only the server binaries) and runs the real `post-save` binary.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use post_save::db::{self, DbError, TlsFailure};
use post_save::testing::cluster::{ClusterOptions, TempCluster};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::support::child::{self, binary};

/// The longest anything here waits; each step takes well under a second normally.
const PATIENCE: Duration = Duration::from_secs(30);
/// The password of the role `app`.
const PASSWORD: &str = "tls-Secret-42";

/// A CA and the certificates it signed, plus a second CA nobody trusts, in a directory of
/// their own (also the `HOME` of the binaries run here, so no `~/.postgresql` of the machine
/// plays a part).
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// `ca.pem` and `other-ca.pem`; the server's certificate for `localhost` only; a client
    /// certificate for `certuser` from the CA (`client.pem`) and one from the other CA
    /// (`foreign.pem`).
    fn new() -> Pki {
        let dir = tempfile::Builder::new().prefix("post-save-tls-").tempdir().expect("tempdir");
        let (ca_pem, issuer) = ca("post-save test CA");
        let (other_ca, other_issuer) = ca("nobody's CA");
        let pki = Pki { dir, issuer };
        pki.write("ca.pem", &ca_pem, 0o644);
        pki.write("other-ca.pem", &other_ca, 0o644);
        pki.server_certificate(&["localhost"]);
        pki.client_certificate("client", "certuser", &pki.issuer);
        pki.client_certificate("foreign", "certuser", &other_issuer);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn text(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8 path").to_owned()
    }

    fn write(&self, name: &str, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(self.path(name), text).expect("write");
        std::fs::set_permissions(self.path(name), std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// `server.pem` and `server.key`, naming `names`, readable by the server's user only.
    fn server_certificate(&self, names: &[&str]) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("names");
        params.distinguished_name.push(DnType::CommonName, "post-save test server");
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        self.write("server.pem", &cert.pem(), 0o644);
        self.write("server.key", &key.serialize_pem(), 0o600);
        for file in ["server.pem", "server.key"] {
            give_to_server_user(&self.path(file));
        }
    }

    /// `<name>.pem` and `<name>.key`: a client certificate for role `cn`.
    fn client_certificate(&self, name: &str, cn: &str, issuer: &Issuer<'static, KeyPair>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, issuer).expect("sign");
        self.write(&format!("{name}.pem"), &cert.pem(), 0o644);
        self.write(&format!("{name}.key"), &key.serialize_pem(), 0o600);
    }
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    (cert.pem(), Issuer::new(params, key))
}

/// PostgreSQL runs as the `postgres` user when the tests run as root: its key must be its own.
fn give_to_server_user(path: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let user = nix::unistd::User::from_name("postgres").expect("users").expect("a postgres user");
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).expect("chown");
}

/// A private cluster listening on 127.0.0.1, with the roles `app` (password, superuser,
/// replication), `certuser` (client certificate) and `plain` (which `pg_hba.conf` lets in
/// only unencrypted), and the database `shop`.
struct Server {
    cluster: TempCluster,
    pki: Pki,
}

impl Server {
    /// With `ssl = on` and a TLS-only `pg_hba.conf` when `tls`; with `wal_level = logical`
    /// when `logical`.
    async fn start(tls: bool, logical: bool) -> Server {
        let pki = Pki::new();
        let mut settings = vec![("password_encryption", "scram-sha-256".to_owned())];
        if tls {
            pki.write(
                "pg_hba.conf",
                "local all all trust\n\
                 hostssl all plain 127.0.0.1/32 reject\n\
                 hostnossl all plain 127.0.0.1/32 scram-sha-256\n\
                 hostnossl all all 0.0.0.0/0 reject\n\
                 hostssl all certuser 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n",
                0o644,
            );
            settings.extend([
                ("ssl", "on".to_owned()),
                ("ssl_cert_file", pki.text("server.pem")),
                ("ssl_key_file", pki.text("server.key")),
                ("ssl_ca_file", pki.text("ca.pem")),
                ("hba_file", pki.text("pg_hba.conf")),
            ]);
        }
        if logical {
            settings.extend([("wal_level", "logical".to_owned()), ("max_replication_slots", "4".to_owned())]);
        }
        // The server's user must reach the files.
        std::fs::set_permissions(pki.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let opts = ClusterOptions {
            tcp_port: Some(0),
            settings: settings.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            ..ClusterOptions::default()
        };
        let cluster = tokio::task::spawn_blocking(move || TempCluster::start(opts))
            .await
            .expect("starting the cluster panicked")
            .expect("the cluster starts");
        let server = Server { cluster, pki };
        let admin = server.admin("postgres").await;
        admin
            .batch_execute(&format!(
                "CREATE ROLE app LOGIN SUPERUSER REPLICATION PASSWORD '{PASSWORD}';
                 CREATE ROLE certuser LOGIN SUPERUSER;
                 CREATE ROLE plain LOGIN PASSWORD '{PASSWORD}';"
            ))
            .await
            .expect("roles");
        admin.batch_execute("CREATE DATABASE shop OWNER app").await.expect("database");
        server
            .admin("shop")
            .await
            .batch_execute(
                "CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL);
                 CREATE TABLE ware (id bigserial PRIMARY KEY, name text NOT NULL);
                 CREATE TABLE audit (id bigint PRIMARY KEY);
                 ALTER TABLE item OWNER TO app; ALTER TABLE ware OWNER TO app; ALTER TABLE audit OWNER TO app;",
            )
            .await
            .expect("tables");
        server
    }

    /// A superuser connection over the Unix socket (no TLS there).
    async fn admin(&self, dbname: &str) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.cluster.conninfo(dbname), tokio_postgres::NoTls).await.expect("admin");
        tokio::spawn(connection);
        client
    }

    /// A `key=value` connection string to `shop` as `app` at `host`, with `extra`.
    fn url(&self, host: &str, extra: &str) -> String {
        format!("host={host} port={} user=app password={PASSWORD} dbname=shop {extra}", self.cluster.port())
    }

    /// `sslrootcert=<file> ` for one of the PKI's files.
    fn root(&self, file: &str) -> String {
        format!("sslrootcert='{}'", self.pki.text(file))
    }

    /// Runs the real binary with `args`, the config `config.toml`, `HOME` in the PKI's
    /// directory and `env`.
    fn post_save(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = binary();
        cmd.arg("--config").arg(self.pki.path("config.toml")).args(args);
        cmd.env("HOME", self.pki.dir.path()).envs(env.iter().copied()).stdin(Stdio::null());
        cmd.output().expect("run post-save")
    }
}

/// Connects with the library; says whether the session is encrypted.
async fn session_ssl(url: &str) -> Result<bool, DbError> {
    let settings = db::resolve(Some(url)).expect("valid settings");
    let (client, _task) = db::connect(&settings).await?;
    let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.expect("ssl");
    Ok(row.get(0))
}

/// The TLS failure of a connection that must fail with one.
async fn tls_failure(url: &str) -> (TlsFailure, String) {
    match session_ssl(url).await {
        Err(e @ DbError::Tls { .. }) => {
            let text = e.to_string();
            let DbError::Tls { failure, .. } = e else { unreachable!() };
            (failure, text)
        }
        other => panic!("{url}: wanted a TLS failure, got {other:?}"),
    }
}

#[track_caller]
fn assert_exit(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(code), "exit code\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert!(
        stderr.contains(needle) || stdout.contains(needle),
        "`{needle}` not said\n--- stdout\n{stdout}--- stderr\n{stderr}"
    );
}

#[tokio::test]
async fn each_sslmode_means_what_it_means_in_libpq() {
    let server = Server::start(true, false).await;
    let ca = server.root("ca.pem");
    let other = server.root("other-ca.pem");

    // The server takes only TLS: sslmode=disable is refused, and the error says so.
    let (failure, text) = tls_failure(&server.url("localhost", "sslmode=disable")).await;
    assert_eq!(failure, TlsFailure::ServerRequiresTls);
    assert!(text.contains("accepts only TLS connections") && text.contains("sslmode=disable"), "{text}");
    // allow: unencrypted refused, then TLS; prefer (the default) and require: TLS, nothing checked.
    for mode in ["sslmode=allow", "sslmode=prefer", "", "sslmode=require"] {
        let ssl = session_ssl(&server.url("127.0.0.1", mode)).await.unwrap_or_else(|e| panic!("{mode}: {e:?}"));
        assert!(ssl, "{mode}: encrypted");
    }
    // prefer: when the server refuses the encrypted session, unencrypted.
    let plain = server.url("127.0.0.1", "user=plain");
    assert!(!session_ssl(&plain).await.expect("prefer falls back to unencrypted"));
    assert!(session_ssl(&format!("{plain} sslmode=require")).await.expect_err("require does not").is_auth_failure());
    // require with a root certificate checks the chain, as verify-ca does.
    let (failure, _) = tls_failure(&server.url("localhost", &format!("sslmode=require {other}"))).await;
    assert!(matches!(failure, TlsFailure::NotTrusted { .. }), "{failure:?}");

    // verify-ca: the CA must have signed the certificate; the names in it do not matter.
    assert!(session_ssl(&server.url("127.0.0.1", &format!("sslmode=verify-ca {ca}"))).await.expect("verify-ca"));
    let (failure, text) = tls_failure(&server.url("127.0.0.1", &format!("sslmode=verify-ca {other}"))).await;
    assert!(matches!(failure, TlsFailure::NotTrusted { .. }), "{failure:?}");
    assert!(text.contains("not trusted") && text.contains("other-ca.pem"), "{text}");

    // verify-full: and it must name the host. The certificate names `localhost` only.
    let full = format!("sslmode=verify-full {ca}");
    assert!(session_ssl(&server.url("localhost", &full)).await.expect("verify-full, localhost"));
    let (failure, text) = tls_failure(&server.url("127.0.0.1", &full)).await;
    assert!(matches!(failure, TlsFailure::HostName { .. }), "{failure:?}");
    assert!(
        text.contains("host name mismatch") && text.contains("`127.0.0.1`") && text.contains("localhost"),
        "{text}"
    );
    let (failure, text) = tls_failure(&server.url("db.example.com", &format!("hostaddr=127.0.0.1 {full}"))).await;
    assert!(matches!(failure, TlsFailure::HostName { .. }), "{failure:?}");
    assert!(text.contains("`db.example.com`"), "{text}");

    // A certificate naming the address too (the server reloads it): 127.0.0.1 passes.
    server.pki.server_certificate(&["localhost", "127.0.0.1"]);
    server.admin("postgres").await.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while session_ssl(&server.url("127.0.0.1", &full)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the server never took the new certificate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The URL form, percent-encoded, and SCRAM with channel binding over TLS.
    let url = format!(
        "postgres://app:{PASSWORD}@localhost:{}/shop?sslmode=verify-full&sslrootcert={}&channel_binding=require",
        server.cluster.port(),
        server.pki.text("ca.pem").replace('/', "%2F")
    );
    assert!(session_ssl(&url).await.expect("URL with channel binding"));
}

#[tokio::test]
async fn client_certificates_authenticate_and_a_refused_one_is_named() {
    let server = Server::start(true, false).await;
    let url = |extra: &str| {
        format!(
            "host=localhost port={} user=certuser dbname=shop sslmode=verify-full {} {extra}",
            server.cluster.port(),
            server.root("ca.pem")
        )
    };
    let client = format!("sslcert='{}' sslkey='{}'", server.pki.text("client.pem"), server.pki.text("client.key"));
    assert!(session_ssl(&url(&client)).await.expect("the client certificate authenticates"));

    // No certificate: the server's pg_hba.conf refuses the role (exit 77 below).
    let e = session_ssl(&url("")).await.expect_err("no certificate");
    assert!(e.is_auth_failure(), "{e:?}");

    // A certificate from a CA the server does not trust: the handshake is refused, and said so.
    let foreign = format!("sslcert='{}' sslkey='{}'", server.pki.text("foreign.pem"), server.pki.text("foreign.key"));
    let (failure, text) = tls_failure(&url(&foreign)).await;
    assert!(failure.is_refusal(), "{failure:?}");
    assert!(text.contains("refused the client certificate"), "{text}");

    // The binary, with the certificate from PGSSLCERT and PGSSLKEY.
    server.pki.write("config.toml", "[[watch]]\ntable = \"public.item\"\n", 0o644);
    let no_cert = url("");
    let env = [("PGSSLCERT", server.pki.text("client.pem")), ("PGSSLKEY", server.pki.text("client.key"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = server.post_save(&["--database-url", &no_cert, "migrate"], &env);
    assert_exit(&out, 0, "");
    let out = server.post_save(&["--database-url", &url(&foreign), "migrate"], &[]);
    assert_exit(&out, 77, "refused the client certificate");
    // A key others can read is refused, as libpq refuses it: a configuration error.
    server.pki.write("open.key", &std::fs::read_to_string(server.pki.path("client.key")).expect("key"), 0o644);
    let open = format!("sslcert='{}' sslkey='{}'", server.pki.text("client.pem"), server.pki.text("open.key"));
    let out = server.post_save(&["--database-url", &url(&open), "migrate"], &[]);
    assert_exit(&out, 78, "group or world access");
}

#[tokio::test]
async fn the_cli_takes_tls_settings_from_url_config_and_environment_and_names_failures() {
    let server = Server::start(true, false).await;
    let config = |database: &str| {
        server.pki.write("config.toml", &format!("{database}\n[[watch]]\ntable = \"public.item\"\n"), 0o644);
    };
    config("");
    let ca = server.root("ca.pem");
    let full = server.url("localhost", &format!("sslmode=verify-full {ca}"));
    assert_exit(&server.post_save(&["--database-url", &full, "migrate"], &[]), 0, "");

    // Failures, in the user's words, with their exit codes.
    let disabled = server.url("localhost", "sslmode=disable");
    assert_exit(&server.post_save(&["--database-url", &disabled, "migrate"], &[]), 77, "accepts only TLS");
    let out = server.post_save(&["--database-url", &disabled, "doctor", "--json"], &[]);
    assert_exit(&out, 77, "accepts only TLS");
    let untrusted = server.url("localhost", &format!("sslmode=verify-full {}", server.root("other-ca.pem")));
    assert_exit(&server.post_save(&["--database-url", &untrusted, "migrate"], &[]), 69, "not trusted");
    let misnamed = server.url("127.0.0.1", &format!("sslmode=verify-full {ca}"));
    assert_exit(&server.post_save(&["--database-url", &misnamed, "triggers", "check"], &[]), 69, "host name");
    // verify-ca without a root certificate (HOME has no ~/.postgresql/root.crt).
    let rootless = server.url("localhost", "sslmode=verify-ca");
    assert_exit(&server.post_save(&["--database-url", &rootless, "migrate"], &[]), 78, "needs a root certificate");

    // The PGSSL* variables, when the URL says nothing; the URL wins over them.
    let plain = server.url("localhost", "");
    let (other_ca, right_ca) = (server.pki.text("other-ca.pem"), server.pki.text("ca.pem"));
    let env = [("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", other_ca.as_str())];
    assert_exit(&server.post_save(&["--database-url", &plain, "migrate"], &env), 69, "not trusted");
    let env = [("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", right_ca.as_str())];
    assert_exit(&server.post_save(&["--database-url", &plain, "migrate"], &env), 0, "");
    assert_exit(&server.post_save(&["--database-url", &disabled, "migrate"], &env), 77, "accepts only TLS");

    // [database] in the config, between the URL and the variables.
    config(&format!("[database]\nsslmode = \"verify-full\"\nsslrootcert = \"{}\"", server.pki.text("other-ca.pem")));
    assert_exit(&server.post_save(&["--database-url", &plain, "migrate"], &env), 69, "not trusted");
    config(&format!("[database]\nsslmode = \"verify-full\"\nsslrootcert = \"{}\"", server.pki.text("ca.pem")));
    assert_exit(&server.post_save(&["--database-url", &plain, "migrate"], &[]), 0, "");
    config("[database]\nsslmode = \"verify-everything\"");
    assert_exit(&server.post_save(&["--database-url", &plain, "migrate"], &[]), 78, "sslmode");

    // sslrootcert=system: the platform's roots (here the test CA, through SSL_CERT_FILE), and
    // verify-full unless told otherwise; a weaker mode is refused.
    config("");
    let system = server.url("localhost", "sslrootcert=system");
    let env = [("SSL_CERT_FILE", server.pki.text("ca.pem"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_exit(&server.post_save(&["--database-url", &system, "migrate"], &env), 0, "");
    let system_misnamed = server.url("127.0.0.1", "sslrootcert=system");
    assert_exit(&server.post_save(&["--database-url", &system_misnamed, "migrate"], &env), 69, "host name");
    let weak = server.url("localhost", "sslrootcert=system sslmode=require");
    assert_exit(&server.post_save(&["--database-url", &weak, "migrate"], &env), 78, "weak sslmode");
}

#[tokio::test]
async fn a_server_without_tls_is_named_when_tls_is_required() {
    let server = Server::start(false, false).await;
    let (failure, text) = tls_failure(&server.url("127.0.0.1", "sslmode=require")).await;
    assert!(matches!(failure, TlsFailure::ServerWithoutTls { .. }), "{failure:?}");
    assert!(text.contains("does not accept TLS connections"), "{text}");
    assert!(!session_ssl(&server.url("127.0.0.1", "sslmode=prefer")).await.expect("prefer falls back"));
    server.pki.write("config.toml", "[[watch]]\ntable = \"public.item\"\n", 0o644);
    let out = server.post_save(&["--database-url", &server.url("127.0.0.1", "sslmode=verify-full"), "migrate"], &[]);
    assert_exit(&out, 69, "does not accept TLS connections");
}

#[tokio::test]
async fn the_daemon_delivers_over_tls_through_both_captures() {
    let server = Server::start(true, true).await;
    let url = server.url("localhost", "channel_binding=require");
    let sql_handler = if cfg!(feature = "sql") {
        "[[handler]]\nname = \"audit\"\nsender = \"public.item\"\nkind = \"sql\"\n\
         statement = \"INSERT INTO audit (id) VALUES ($1)\"\nparams = [\"instance.id\"]\n"
    } else {
        ""
    };
    let toml = format!(
        "[database]\nurl = \"{url}\"\nsslmode = \"verify-full\"\nsslrootcert = \"{}\"\n\
         [[watch]]\ntable = \"public.item\"\n\
         [[watch]]\ntable = \"public.ware\"\ncapture = \"wal\"\n\
         [[handler]]\nname = \"saves\"\nkind = \"log\"\nfields = [\"sender\", \"instance\"]\n{sql_handler}",
        server.pki.text("ca.pem")
    );
    server.pki.write("config.toml", &toml, 0o644);
    assert_exit(&server.post_save(&["migrate"], &[]), 0, "");
    assert_exit(&server.post_save(&["triggers", "install"], &[]), 0, "");
    let doctor = server.post_save(&["doctor", "--json"], &[]);
    let checks: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("doctor's JSON");
    for name in ["connect", "listen"] {
        let check = checks.as_array().expect("checks").iter().find(|c| c["name"] == name).expect("check");
        assert_eq!(check["verdict"], "ok", "{check}");
    }

    let mut daemon = Daemon::start(&server);
    daemon.wait_for_lines(&["listening", "WAL capture streaming"]);
    let admin = server.admin("shop").await;
    admin
        .batch_execute("INSERT INTO item (name) VALUES ('by trigger'); INSERT INTO ware (name) VALUES ('by wal')")
        .await
        .expect("saves");
    let mut senders: Vec<String> =
        (0..2).map(|_| daemon.next_event()["sender"].as_str().expect("sender").to_owned()).collect();
    senders.sort();
    assert_eq!(senders, ["public.item", "public.ware"]);
    if cfg!(feature = "sql") {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while admin.query_one("SELECT count(*) FROM audit", &[]).await.expect("audit").get::<_, i64>(0) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the sql handler never wrote:\n{}", daemon.tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every connection of the daemon is encrypted: work, LISTEN, the replication stream, the
    // sql handler's pool.
    let rows = admin
        .query(
            "SELECT a.backend_type, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename = 'app'",
            &[],
        )
        .await
        .expect("sessions");
    let sessions: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(sessions.iter().any(|(kind, _)| kind == "walsender"), "{sessions:?}");
    assert!(sessions.len() >= 3, "{sessions:?}");
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    daemon.stop().await;
}

/// The real `post-save run`: its log handler's events read from its stderr (JSON lines).
struct Daemon {
    process: child::Daemon,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    fn start(server: &Server) -> Daemon {
        let mut cmd = binary();
        cmd.arg("--config").arg(server.pki.path("config.toml")).args(["--log-format", "json", "run"]);
        cmd.env("HOME", server.pki.dir.path()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let (tx, lines) = std::sync::mpsc::channel();
        let process = child::Daemon::start(cmd, move |line| tx.send(line).is_ok());
        Daemon { process, lines, seen: Vec::new() }
    }

    fn next_line(&mut self) -> serde_json::Value {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(text) => {
                self.seen.push(text.clone());
                serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "message": text }))
            }
            Err(_) => panic!("post-save said nothing more:\n{}", self.tail()),
        }
    }

    /// Waits until each of `messages` was logged, in any order.
    fn wait_for_lines(&mut self, messages: &[&str]) {
        let mut missing: Vec<&str> = messages.to_vec();
        while !missing.is_empty() {
            let line = self.next_line();
            missing.retain(|m| line["message"] != *m);
        }
    }

    fn next_event(&mut self) -> serde_json::Value {
        loop {
            let line = self.next_line();
            if line["message"] == "save event" {
                return serde_json::from_str(line["event"].as_str().expect("event")).expect("event JSON");
            }
        }
    }

    fn tail(&self) -> String {
        self.seen.iter().rev().take(30).rev().cloned().collect::<Vec<_>>().join("\n")
    }

    async fn stop(mut self) {
        let status = self.process.terminate(PATIENCE).await;
        assert!(status.success(), "post-save exited with {status}:\n{}", self.tail());
    }
}
