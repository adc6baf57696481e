//! `[database]` and `[daemon]`: where to connect, and the daemon's tuning with its defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `[database]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// A libpq URL or key=value string; else `DATABASE_URL`, else the `PG*` variables.
    pub url: Option<String>,
    /// A direct connection string, not through a pooler, for the connections that need a
    /// session of their own (LISTEN, the replication stream of `capture = "wal"`, migrations and
    /// the CLI): set it when `url` goes through a transaction-pooling PgBouncer.
    pub listen_url: Option<String>,
    /// libpq's `sslmode`, when the URL has none; else `PGSSLMODE`, else `prefer`.
    pub sslmode: Option<crate::db::SslMode>,
    /// libpq's `sslrootcert` (a PEM file of trusted CAs, or `system`), when the URL has none;
    /// else `PGSSLROOTCERT`, else `~/.postgresql/root.crt` when it exists.
    pub sslrootcert: Option<String>,
    /// libpq's `sslcert`, the client certificate, when the URL has none; else `PGSSLCERT`,
    /// else `~/.postgresql/postgresql.crt` when it exists.
    pub sslcert: Option<PathBuf>,
    /// libpq's `sslkey`, the client certificate's key, when the URL has none; else
    /// `PGSSLKEY`, else `~/.postgresql/postgresql.key`.
    pub sslkey: Option<PathBuf>,
}

impl DatabaseConfig {
    /// The TLS parameters of this section.
    pub fn tls(&self) -> crate::db::TlsParams {
        crate::db::TlsParams {
            sslmode: self.sslmode,
            sslrootcert: self.sslrootcert.clone(),
            sslcert: self.sslcert.clone(),
            sslkey: self.sslkey.clone(),
        }
    }
}

/// `[daemon]`: tuning with safe defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Events held in memory at once (fetched, queued or running); the rest waits in the ledger.
    pub max_in_flight: usize,
    /// How long SIGTERM waits for running handlers before handing their events back.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often the ledger is swept for events whose notification was missed.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay; also how often a WAL reader blocked by what retrying cannot fix
    /// checks again.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Most acknowledgements written in one statement.
    pub ack_batch: usize,
    /// Longest an acknowledgement waits for its batch to fill.
    #[serde(with = "humantime_serde")]
    pub ack_interval: Duration,
    /// Most ledger rows read in one query.
    pub fetch_batch: usize,
    /// While idle (the doorbell armed), how often the ledger is read anyway: picks up an event
    /// whose commit raced with arming the doorbell.
    #[serde(with = "humantime_serde")]
    pub idle_poll: Duration,
    /// While busy (the doorbell silenced), how often the ledger is read.
    #[serde(with = "humantime_serde")]
    pub busy_poll: Duration,
    /// Events per second above which the daemon silences the doorbell and polls instead, so
    /// writers' commits stop taking NOTIFY's cluster-wide lock; armed again below a quarter.
    pub doorbell_rate: usize,
    /// How long acknowledged events stay in the ledger: at least this, and at most about 1.5
    /// times it. The ledger has three partitions taking the writes in turn for half of this
    /// each (a second at least); one is emptied with TRUNCATE before it takes them again.
    #[serde(with = "humantime_serde")]
    pub keep_handled: Duration,
    /// A ping goes through both database connections every half interval; one not answered
    /// within half an interval drops them and reconnects. So a dead connection, even one that
    /// never errors (a half-open TCP connection, a proxy that stopped forwarding), is found
    /// within this.
    #[serde(with = "humantime_serde")]
    pub liveness: Duration,
    /// Where the Prometheus endpoint (`GET /metrics`) listens: a loopback address and port,
    /// such as `127.0.0.1:9187`. No endpoint when unset.
    #[serde(deserialize_with = "loopback")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Run several daemons on one database: the one holding this lease dispatches, the others
    /// wait and take over once it has not been renewed for this long. Unset: a single daemon.
    #[serde(with = "humantime_serde")]
    pub lease: Option<Duration>,
}

/// A socket address on a loopback interface.
fn loopback<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<std::net::SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    let addr: std::net::SocketAddr = text.parse().map_err(|_| {
        serde::de::Error::custom(format!("{text:?} is not an address and port like \"127.0.0.1:9187\""))
    })?;
    if !addr.ip().is_loopback() {
        return Err(serde::de::Error::custom(format!(
            "{addr} is not a loopback address: the endpoint listens on 127.0.0.0/8 or [::1] only; \
             put a proxy in front of it to expose it further"
        )));
    }
    Ok(Some(addr))
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            max_in_flight: 4_000,
            shutdown_grace: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            ack_batch: 1_000,
            ack_interval: Duration::from_millis(20),
            fetch_batch: 1_000,
            idle_poll: Duration::from_millis(250),
            busy_poll: Duration::from_millis(2),
            doorbell_rate: 2_000,
            keep_handled: Duration::from_secs(24 * 3600),
            liveness: Duration::from_secs(10),
            metrics: None,
            lease: None,
        }
    }
}
