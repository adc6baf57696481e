//! Connecting to PostgreSQL and migrating the `post_save` schema.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

/// The channel every capture trigger notifies.
pub const CHANNEL: &str = "post_save";

/// Where to connect could not be worked out.
#[derive(Debug, thiserror::Error)]
#[error("invalid connection string from {origin}")]
pub struct BadConnectionString {
    /// Which setting held it.
    pub origin: &'static str,
    /// The parse error.
    #[source]
    pub source: tokio_postgres::Error,
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
}

impl DbError {
    /// Whether the failure is the server being unreachable (exit code 69).
    pub fn is_unreachable(&self) -> bool {
        match self {
            DbError::Connect(e) => e.as_db_error().is_none(),
            DbError::Auth { .. } => false,
            DbError::Query(e) => e.is_closed(),
            DbError::Migrate(_) => false,
            DbError::ConnectTimeout(_) => true,
        }
    }

    /// Whether the server refused the credentials (exit code 77).
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, DbError::Auth { .. })
    }
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
/// `PGCONNECT_TIMEOUT`), with libpq's defaults for what is unset.
pub fn resolve(config_url: Option<&str>) -> Result<tokio_postgres::Config, BadConnectionString> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut config = if let Some(url) = config_url {
        url.parse().map_err(|source| BadConnectionString { origin: "database.url", source })?
    } else if let Some(url) = env("DATABASE_URL") {
        url.parse().map_err(|source| BadConnectionString { origin: "DATABASE_URL", source })?
    } else {
        tokio_postgres::Config::new()
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
    Ok(config)
}

/// Opens a connection and drives it on a task. The task ends when the connection does.
pub async fn connect(config: &tokio_postgres::Config) -> Result<(Client, tokio::task::JoinHandle<()>), DbError> {
    let (client, connection) = start_up(config).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended");
        }
    });
    Ok((client, task))
}

/// Connects, within the configured `connect_timeout` (10 s when unset) for the whole start-up:
/// tokio-postgres bounds only the TCP handshake, and a proxy that accepts but never answers
/// would otherwise hang the start-up for ever.
pub(crate) async fn start_up(
    config: &tokio_postgres::Config,
) -> Result<(Client, tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>), DbError> {
    let limit = config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10));
    match tokio::time::timeout(limit, config.connect(NoTls)).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(source)) if is_auth_error(&source) => {
            Err(DbError::Auth { user: config.get_user().unwrap_or_default().to_owned(), source })
        }
        Ok(Err(e)) => Err(DbError::Connect(e)),
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
        client.batch_execute("CREATE SCHEMA IF NOT EXISTS post_save").await.map_err(DbError::Query)?;
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
