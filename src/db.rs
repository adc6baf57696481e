//! Connecting to PostgreSQL and migrating the `post_save` schema.
//!
//! Every connection the daemon and the CLI make is opened here (the `sql` handler's pools and
//! the replication stream use the same TLS), with libpq's meaning for `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey` ([`Settings`]).

mod connector;
mod conninfo;
mod tls;
mod work;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

pub(crate) use connector::TlsStream;
pub(crate) use connector::{handshake, open, server_end_point};
pub use tls::{SslMode, Tls, TlsFailure, TlsParams, TlsSetupError};
pub(crate) use work::{Param, Work};

/// The channel every capture trigger notifies.
pub const CHANNEL: &str = "post_save";

/// Where to connect could not be worked out.
#[derive(Debug, thiserror::Error)]
#[error("invalid connection settings ({origin})")]
pub struct BadConnectionString {
    /// Which setting held it.
    pub origin: &'static str,
    /// What is wrong.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl BadConnectionString {
    fn new(origin: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BadConnectionString { origin, source: source.into() }
    }
}

/// Where and how to connect: tokio-postgres's settings, and the TLS settings it does not know
/// (libpq's `sslmode` in full, `sslrootcert`, `sslcert`, `sslkey`). Reads as the
/// [`tokio_postgres::Config`] it holds.
#[derive(Debug, Clone)]
pub struct Settings {
    pg: tokio_postgres::Config,
    tls: Arc<Tls>,
    /// A direct connection (`database.listen_url`) for what needs a session of its own, when
    /// `pg` goes through a transaction-pooling proxy.
    session: Option<Arc<Settings>>,
}

impl Settings {
    /// `pg` with the TLS settings `tls`.
    pub fn new(mut pg: tokio_postgres::Config, tls: Tls) -> Self {
        // What tokio-postgres shows of it; connecting goes by `tls`.
        pg.ssl_mode(match tls.mode() {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        Settings { pg, tls: Arc::new(tls), session: None }
    }

    /// These settings, with `direct` for the connections that need a session of their own (LISTEN,
    /// the replication stream, migrations, the CLI): `self` then goes through a pooler and
    /// carries only statements that stand alone, each in one round trip.
    pub fn with_session(mut self, direct: Settings) -> Settings {
        self.session = Some(Arc::new(Settings { session: None, ..direct }));
        self
    }

    /// The settings of the connections that need a session of their own: the direct ones
    /// when `database.listen_url` is set, else these.
    pub fn session(&self) -> &Settings {
        self.session.as_deref().unwrap_or(self)
    }

    /// Whether these settings go through a pooler (`database.listen_url` is set).
    pub fn pooled(&self) -> bool {
        self.session.is_some()
    }

    /// The TLS settings.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// Each server of a multi-host connection string on its own (`host:port`, and settings
    /// naming only it, whatever its role), for checks that look at the standbys too.
    pub(crate) fn each_host(&self) -> Vec<(String, Settings)> {
        use tokio_postgres::config::Host;
        let ports = self.pg.get_ports();
        self.pg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                let mut one = tokio_postgres::Config::new();
                let label = match host {
                    Host::Tcp(name) => {
                        one.host(name);
                        format!("{name}:{port}")
                    }
                    Host::Unix(dir) => {
                        one.host_path(dir);
                        format!("{}:{port}", dir.display())
                    }
                };
                one.port(port);
                if let Some(user) = self.pg.get_user() {
                    one.user(user);
                }
                if let Some(password) = self.pg.get_password() {
                    one.password(password);
                }
                if let Some(dbname) = self.pg.get_dbname() {
                    one.dbname(dbname);
                }
                if let Some(name) = self.pg.get_application_name() {
                    one.application_name(name);
                }
                if let Some(options) = self.pg.get_options() {
                    one.options(options);
                }
                one.connect_timeout(
                    self.pg.get_connect_timeout().copied().unwrap_or(std::time::Duration::from_secs(5)),
                );
                one.channel_binding(self.pg.get_channel_binding());
                (label, Settings { pg: one, tls: Arc::clone(&self.tls), session: None })
            })
            .collect()
    }
}

impl Deref for Settings {
    type Target = tokio_postgres::Config;

    fn deref(&self) -> &tokio_postgres::Config {
        &self.pg
    }
}

impl From<tokio_postgres::Config> for Settings {
    /// TLS as the config's own `sslmode` says (`disable`, `prefer` or `require`), with
    /// libpq's default files under `~/.postgresql`.
    fn from(pg: tokio_postgres::Config) -> Self {
        let mode = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        let tls = Tls::resolve(TlsParams { sslmode: Some(mode), ..TlsParams::default() }).unwrap_or_default();
        Settings::new(pg, tls)
    }
}

/// Failures talking to the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to the database")]
    Connect(#[source] tokio_postgres::Error),
    /// The server was reached but did not let the role in: a wrong password, a role that does
    /// not exist, no `pg_hba.conf` entry for it (SQLSTATE 28P01, 28000), or a server that asks
    /// for a password when none is set. Names the role, never the password.
    #[error("authentication failed for role `{user}`")]
    Auth {
        /// The role (user) the connection tried.
        user: String,
        /// What the server (or the client, for a missing password) said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A query failed.
    #[error("database query failed")]
    Query(#[source] tokio_postgres::Error),
    /// A migration failed.
    #[error("migrating the post_save schema failed")]
    Migrate(#[source] refinery::Error),
    /// The server did not finish the connection start-up in time (a dead proxy, a hung
    /// server): the `connect_timeout` covers the whole start-up, not only the TCP handshake.
    #[error("connecting to the database timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// TLS failed: the server's certificate is not trusted or names another host, the server
    /// has no TLS and `sslmode` requires it (or the reverse), or it refused the client
    /// certificate.
    #[error("cannot connect to the database: {failure}")]
    Tls {
        /// What failed, in the user's words.
        failure: TlsFailure,
        /// What tokio-postgres said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The TLS settings cannot be used: a certificate or key file missing, unreadable or
    /// malformed.
    #[error("cannot connect to the database: the TLS settings cannot be used")]
    TlsSetup(#[source] tokio_postgres::Error),
}

impl DbError {
    /// Whether the failure is the server being unreachable (exit code 69).
    pub fn is_unreachable(&self) -> bool {
        match self {
            DbError::Connect(e) => e.as_db_error().is_none(),
            DbError::Auth { .. } => false,
            DbError::Query(e) => e.is_closed(),
            DbError::Migrate(_) | DbError::TlsSetup(_) => false,
            DbError::ConnectTimeout(_) => true,
            // Not a server to trust (or to talk TLS with): as good as none.
            DbError::Tls { failure, .. } => !failure.is_refusal(),
        }
    }

    /// Whether the server refused the credentials (exit code 77): the role or its password,
    /// the client certificate, or an unencrypted connection where only TLS is accepted.
    pub fn is_auth_failure(&self) -> bool {
        match self {
            DbError::Auth { .. } => true,
            DbError::Tls { failure, .. } => failure.is_refusal(),
            _ => false,
        }
    }

    /// Whether the settings themselves cannot be used (exit code 78): TLS files missing,
    /// unreadable or malformed.
    pub fn is_misconfigured(&self) -> bool {
        matches!(self, DbError::TlsSetup(_))
    }

    /// Classifies a failed connection start-up with `settings`.
    fn start_up_failed(source: tokio_postgres::Error, settings: &Settings) -> DbError {
        if find_cause::<TlsSetupError>(&source) {
            return DbError::TlsSetup(source);
        }
        if let Some(failure) = settings.tls.failure(&source) {
            return DbError::Tls { failure, source };
        }
        if settings.tls.mode() == SslMode::Disable && refused_unencrypted(&source) {
            return DbError::Tls { failure: TlsFailure::ServerRequiresTls, source };
        }
        if is_auth_error(&source) {
            return DbError::Auth { user: settings.get_user().unwrap_or_default().to_owned(), source };
        }
        DbError::Connect(source)
    }
}

/// Whether `T` is among the causes of `error`.
fn find_cause<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<T>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The server's `pg_hba.conf` has no entry for this role without encryption (its message ends
/// "no encryption", in English).
fn refused_unencrypted(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            && db.message().ends_with("no encryption")
    })
}

/// Whether a connection start-up failed at authentication. The server says so with SQLSTATE
/// class 28; a password it asks for and the settings lack is caught by tokio-postgres before
/// anything is sent, as a configuration error with no code of its own, recognised by its text.
fn is_auth_error(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(code) => *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        None => std::error::Error::source(e).is_some_and(|cause| cause.to_string() == "password missing"),
    }
}

/// The connection settings: `url` from the config, else `DATABASE_URL`, else the libpq `PG*`
/// variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGAPPNAME`,
/// `PGCONNECT_TIMEOUT`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`), with libpq's
/// defaults for what is unset.
pub fn resolve(config_url: Option<&str>) -> Result<Settings, BadConnectionString> {
    resolve_with(config_url, &TlsParams::default())
}

/// As [`resolve`], with TLS parameters from the config (`[database]`) for those the URL leaves
/// unset; the `PGSSL*` variables come after them.
pub fn resolve_with(config_url: Option<&str>, config_tls: &TlsParams) -> Result<Settings, BadConnectionString> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (mut config, url_tls) = if let Some(url) = config_url {
        parse(url).map_err(|source| BadConnectionString::new("database.url", source))?
    } else if let Some(url) = env("DATABASE_URL") {
        parse(&url).map_err(|source| BadConnectionString::new("DATABASE_URL", source))?
    } else {
        (tokio_postgres::Config::new(), TlsParams::default())
    };
    if config.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(hosts) => hosts.split(',').for_each(|h| {
                config.host(h);
            }),
            None => {
                let socket = std::path::Path::new("/var/run/postgresql");
                config.host(if socket.exists() { "/var/run/postgresql" } else { "localhost" });
            }
        }
    }
    if config.get_ports().is_empty()
        && let Some(port) = env("PGPORT").and_then(|p| p.parse().ok())
    {
        config.port(port);
    }
    if config.get_user().is_none() {
        let user = env("PGUSER").or_else(|| env("USER")).unwrap_or_else(|| "postgres".into());
        config.user(&user);
    }
    if config.get_password().is_none()
        && let Some(pw) = env("PGPASSWORD")
    {
        config.password(pw);
    }
    if config.get_dbname().is_none()
        && let Some(db) = env("PGDATABASE")
    {
        config.dbname(&db);
    }
    if config.get_application_name().is_none() {
        config.application_name(env("PGAPPNAME").unwrap_or_else(|| "post-save".into()));
    }
    if config.get_connect_timeout().is_none() {
        let secs = env("PGCONNECT_TIMEOUT").and_then(|s| s.parse().ok()).unwrap_or(10);
        config.connect_timeout(Duration::from_secs(secs));
    }
    config.keepalives_idle(Duration::from_secs(30));
    let env_tls = TlsParams::from_env().map_err(|m| BadConnectionString::new("PGSSLMODE", m))?;
    let tls = Tls::resolve(url_tls.or(config_tls.clone()).or(env_tls))
        .map_err(|m| BadConnectionString::new("sslmode and sslrootcert", m))?;
    Ok(Settings::new(config, tls))
}

/// Reads a libpq URL or `key=value` string: tokio-postgres's settings, and the TLS parameters
/// it does not know.
pub(crate) fn parse(
    conninfo: &str,
) -> Result<(tokio_postgres::Config, TlsParams), Box<dyn std::error::Error + Send + Sync>> {
    let (rest, tls) = conninfo::split_tls(conninfo)?;
    Ok((rest.parse()?, tls))
}

/// Opens a connection and drives it on a task. The task ends when the connection does.
pub async fn connect(settings: &Settings) -> Result<(Client, tokio::task::JoinHandle<()>), DbError> {
    let (client, connection) = start_up(settings).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended");
        }
    });
    Ok((client, task))
}

/// How the daemon's connections wait between reconnects: `reconnect_min`, doubling up to
/// `reconnect_max`, each delay with jitter up to as much again, for ever.
pub(crate) fn reconnect_backoff(daemon: &crate::config::DaemonConfig) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(daemon.reconnect_min)
        .with_max_delay(daemon.reconnect_max)
        .with_jitter()
        .without_max_times()
}

/// Connects, within the configured `connect_timeout` (10 s when unset) for the whole start-up:
/// tokio-postgres bounds only the TCP handshake, and a proxy that accepts but never answers
/// would otherwise hang the start-up for ever.
pub(crate) async fn start_up(
    settings: &Settings,
) -> Result<(Client, tokio_postgres::Connection<tokio_postgres::Socket, TlsStream>), DbError> {
    let limit = settings.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10));
    match tokio::time::timeout(limit, open(&settings.pg, &settings.tls)).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(source)) => Err(DbError::start_up_failed(source, settings)),
        Err(_) => Err(DbError::ConnectTimeout(limit)),
    }
}

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The table where refinery records applied migrations: ours, so a host application that also
/// uses refinery keeps its own history.
pub const MIGRATION_TABLE: &str = "post_save.schema_history";

/// The newest migration version this build carries.
pub fn latest_migration() -> i64 {
    embedded::migrations::runner().get_migrations().iter().map(|m| i64::from(m.version())).max().unwrap_or(0)
}

/// Creates or upgrades the `post_save` schema. Returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<String>, DbError> {
    migrate_to(client, None).await
}

/// As [`migrate`], stopping at `version` when given: for tests of an upgrade from an older
/// schema with data in it.
#[doc(hidden)]
pub async fn migrate_to(client: &mut Client, version: Option<u32>) -> Result<Vec<String>, DbError> {
    // Two daemons starting together must not both migrate.
    client.batch_execute("SELECT pg_advisory_lock(hashtext('post_save.migrate'))").await.map_err(DbError::Query)?;
    let result = async {
        // Only when missing: PostgreSQL checks CREATE on the database before it looks whether the
        // schema exists, so a schema an admin created for a non-superuser owner would fail here.
        client
            .batch_execute(
                "DO $$ BEGIN IF to_regnamespace('post_save') IS NULL THEN CREATE SCHEMA post_save; END IF; END $$",
            )
            .await
            .map_err(DbError::Query)?;
        let mut runner = embedded::migrations::runner();
        runner.set_migration_table_name(MIGRATION_TABLE);
        runner
            .set_target(version.map_or(refinery::Target::Latest, refinery::Target::Version))
            .run_async(client)
            .await
            .map_err(DbError::Migrate)
    }
    .await;
    client.batch_execute("SELECT pg_advisory_unlock(hashtext('post_save.migrate'))").await.map_err(DbError::Query)?;
    Ok(result?.applied_migrations().iter().map(|m| m.to_string()).collect())
}
