//! The configuration file: database, daemon tuning, watched tables and handlers.
//!
//! One TOML file. Unknown keys are errors, named with the nearest valid key when one is close
//! (``config.toml:12: key `handler[0].comand`: unknown key; did you mean `command`?``), and every
//! error names the file, the line and the key.

mod section;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use section::Section;
use section::{error_at, toml_error};

use crate::handler::KindOptions;
use crate::name::TableName;

/// A configuration that could not be read or is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when the configuration came from one.
    pub file: Option<PathBuf>,
    /// The 1-based line the problem is on, when known.
    pub line: Option<usize>,
    /// The key at fault, as a path (`handler[2].command`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}", file.display())?,
            None => f.write_str("config")?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The whole configuration, validated.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Where to connect.
    pub database: DatabaseConfig,
    /// Daemon tuning.
    pub daemon: DaemonConfig,
    /// Watched tables, in file order.
    pub watches: Vec<Watch>,
    /// Handlers declared in the file, in file order.
    pub handlers: Vec<HandlerConfig>,
}

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

/// How a table's saves are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Ledger row + NOTIFY: at-least-once, survives the daemon being down.
    Durable,
    /// NOTIFY only: at-most-once, nothing written.
    Notify,
}

impl Mode {
    /// The name used in the trigger arguments and the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Durable => "durable",
            Mode::Notify => "notify",
        }
    }
}

/// How INSERTs are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InsertCapture {
    /// Once per statement: a multi-row INSERT is one set-based ledger write (the default).
    Statement,
    /// Once per row: cheaper for single-row INSERTs, costlier for multi-row ones.
    Row,
}

impl InsertCapture {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            InsertCapture::Statement => "statement",
            InsertCapture::Row => "row",
        }
    }
}

/// Where a durable watch's saves are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capture {
    /// A trigger writes each save to the ledger in the writer's transaction (the default).
    Trigger,
    /// No trigger: the daemon reads committed saves from the write-ahead log through a logical
    /// replication slot (needs `wal_level = logical`). The writer pays nothing extra; the event
    /// carries no actor, unless the transaction emits one (see the capture docs, docs/capture.md).
    Wal,
}

impl Capture {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Capture::Trigger => "trigger",
            Capture::Wal => "wal",
        }
    }
}

/// Which statements a watch captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operations {
    /// INSERT.
    pub insert: bool,
    /// UPDATE.
    pub update: bool,
    /// DELETE (`post_delete`).
    pub delete: bool,
}

/// One `[[watch]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// The table.
    pub table: TableName,
    /// Captured operations.
    pub operations: Operations,
    /// Capture mode.
    pub mode: Mode,
    /// An UPDATE counts only if one of these changed; empty: any column.
    pub columns: Vec<String>,
    /// Columns whose values never leave the database.
    pub redact: Vec<String>,
    /// Include the row before an UPDATE as `old`.
    pub include_old: bool,
    /// Primary-key columns, when the table has no primary key constraint to read them from.
    pub pk: Option<Vec<String>>,
    /// How INSERTs are captured.
    pub insert_capture: InsertCapture,
    /// Where the saves are read from: a trigger, or the write-ahead log.
    pub capture: Capture,
}

/// `post_save` or `post_delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// INSERT and UPDATE.
    PostSave,
    /// DELETE.
    PostDelete,
}

impl Signal {
    /// The signal's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::PostSave => "post_save",
            Signal::PostDelete => "post_delete",
        }
    }
}

/// Retries of a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last the delivery is dead.
    pub attempts: u32,
    /// Delay before the second attempt; doubles each time, with jitter.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 5, backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(300) }
    }
}

/// No handler receives a save caused by a chain of handler writes deeper than this.
pub const MAX_CHAIN_DEPTH: u32 = 16;

/// One `[[handler]]` entry.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Unique name.
    pub name: String,
    /// Senders it receives; empty: every watched table.
    pub senders: Vec<TableName>,
    /// The signal it receives.
    pub signal: Signal,
    /// `Some(true)`: creations only; `Some(false)`: updates only; `None`: both.
    pub created: Option<bool>,
    /// An UPDATE reaches it only if one of these columns changed; empty: any.
    pub columns: Vec<String>,
    /// Longest one attempt may run.
    pub timeout: Duration,
    /// Most attempts running at once for this handler.
    pub concurrency: usize,
    /// Retries.
    pub retry: RetryPolicy,
    /// Only events for which this CEL expression is true reach the handler.
    pub filter: Option<crate::expr::Expr>,
    /// How deep a chain of saves caused by this handler's own writes may go before they stop
    /// reaching it (1: never receives the saves it caused).
    pub max_depth: u32,
    /// The kind and its options.
    pub kind: KindOptions,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let mut watches = Vec::with_capacity(raw.watch.len());
        for (i, w) in raw.watch.into_iter().enumerate() {
            let span = w.span();
            let key = format!("watch[{i}]");
            let watch = w.into_inner().validate(text, span.clone(), &key)?;
            if watches.iter().any(|o: &Watch| o.table == watch.table) {
                return Err(error_at(text, span, &key, "table", "table is watched twice"));
            }
            watches.push(watch);
        }
        let mut handlers: Vec<HandlerConfig> = Vec::with_capacity(raw.handler.len());
        for (i, h) in raw.handler.into_iter().enumerate() {
            let span = h.span();
            let mut section = Section::new(text, span.clone(), format!("handler[{i}]"), h.into_inner());
            let handler = parse_handler(&mut section, &watches)?;
            if handlers.iter().any(|o| o.name == handler.name) {
                return Err(section.error("name", "two handlers have this name"));
            }
            handlers.push(handler);
        }
        Ok(Config { database: raw.database, daemon: raw.daemon, watches, handlers })
    }

    /// The watch of `table`, if it is watched.
    pub fn watch(&self, table: &TableName) -> Option<&Watch> {
        self.watches.iter().find(|w| &w.table == table)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    database: DatabaseConfig,
    #[serde(default)]
    daemon: DaemonConfig,
    #[serde(default)]
    watch: Vec<Spanned<RawWatch>>,
    #[serde(default)]
    handler: Vec<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    table: String,
    #[serde(default)]
    operations: Option<Vec<String>>,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    redact: Vec<String>,
    #[serde(default)]
    include_old: bool,
    #[serde(default)]
    pk: Option<Vec<String>>,
    #[serde(default)]
    insert_capture: Option<InsertCapture>,
    #[serde(default)]
    capture: Option<Capture>,
}

impl RawWatch {
    fn validate(self, src: &str, span: Range<usize>, key: &str) -> Result<Watch, ConfigError> {
        let err = |field: &str, msg: &str| error_at(src, span.clone(), key, field, msg);
        let table = TableName::parse(&self.table).map_err(|m| err("table", &m))?;
        let mut operations = Operations { insert: false, update: false, delete: false };
        let ops = self.operations.unwrap_or_else(|| vec!["insert".into(), "update".into()]);
        if ops.is_empty() {
            return Err(err("operations", "at least one operation is needed"));
        }
        for op in &ops {
            match op.as_str() {
                "insert" => operations.insert = true,
                "update" => operations.update = true,
                "delete" => operations.delete = true,
                other => {
                    let msg = format!("unknown operation `{other}`; expected insert, update or delete");
                    return Err(err("operations", &msg));
                }
            }
        }
        if let Some(pk) = &self.pk {
            if pk.is_empty() {
                return Err(err("pk", "an empty primary key cannot identify a row"));
            }
            if let Some(c) = pk.iter().find(|c| self.redact.contains(c)) {
                return Err(err("redact", &format!("primary-key column `{c}` cannot be redacted")));
            }
        }
        let capture = self.capture.unwrap_or(Capture::Trigger);
        if capture == Capture::Wal {
            if self.mode == Some(Mode::Notify) {
                return Err(err(
                    "capture",
                    "capture = \"wal\" is durable by nature (the slot keeps every save until the daemon confirms it); \
                     drop `mode = \"notify\"` or use the trigger capture",
                ));
            }
            if !self.redact.is_empty() {
                return Err(err(
                    "redact",
                    "redacted columns cannot be kept in the database with capture = \"wal\": the replication \
                     stream carries the whole row; use the trigger capture for this table",
                ));
            }
            if self.insert_capture.is_some() {
                return Err(err("insert_capture", "insert_capture applies to the trigger capture only"));
            }
        }
        Ok(Watch {
            table,
            operations,
            capture,
            mode: self.mode.unwrap_or(Mode::Durable),
            columns: self.columns,
            redact: self.redact,
            include_old: self.include_old,
            pk: self.pk,
            insert_capture: self.insert_capture.unwrap_or(InsertCapture::Statement),
        })
    }
}

/// The keys every `[[handler]]` may have, whatever its kind.
const HANDLER_KEYS: &[&str] = &[
    "name",
    "sender",
    "signal",
    "created",
    "columns",
    "timeout",
    "concurrency",
    "retry",
    "filter",
    "max_depth",
    "kind",
];

fn parse_handler(s: &mut Section, watches: &[Watch]) -> Result<HandlerConfig, ConfigError> {
    // The kind's keys when the kind is known; any kind's while it is missing or misspelt, which
    // the `kind` key itself reports below.
    let kind_keys = s.peek_str("kind").and_then(KindOptions::keys).unwrap_or_else(KindOptions::all_keys);
    s.check_keys(HANDLER_KEYS.iter().chain(&kind_keys).copied().collect())?;
    let name: String = s.require("name")?;
    if name.trim().is_empty() {
        return Err(s.error("name", "a handler name cannot be empty"));
    }
    let senders = match s.take::<OneOrMany>("sender")? {
        None => Vec::new(),
        Some(list) => {
            let mut out = Vec::new();
            for raw in list.into_vec() {
                let table = TableName::parse(&raw).map_err(|m| s.error("sender", &m))?;
                if !watches.iter().any(|w| w.table == table) {
                    let msg = format!("sender `{table}` is not a watched table; add a [[watch]] for it");
                    return Err(s.error("sender", &msg));
                }
                out.push(table);
            }
            out
        }
    };
    let signal = s.take::<Signal>("signal")?.unwrap_or(Signal::PostSave);
    if signal == Signal::PostDelete {
        let deletes = |w: &&Watch| w.operations.delete;
        let ok = if senders.is_empty() {
            watches.iter().any(|w| deletes(&w))
        } else {
            senders.iter().all(|t| watches.iter().filter(deletes).any(|w| &w.table == t))
        };
        if !ok {
            return Err(s.error(
                "signal",
                "post_delete never fires: no watched sender captures \"delete\" (add it to the watch's operations)",
            ));
        }
    }
    let created = s.take::<bool>("created")?;
    if created.is_some() && signal == Signal::PostDelete {
        return Err(s.error("created", "`created` applies to post_save handlers only"));
    }
    let columns = s.take::<Vec<String>>("columns")?.unwrap_or_default();
    let timeout = s.take_duration("timeout")?.unwrap_or(Duration::from_secs(30));
    let concurrency = s.take::<usize>("concurrency")?.unwrap_or(16);
    if concurrency == 0 {
        return Err(s.error("concurrency", "must be at least 1"));
    }
    let retry = parse_retry(s)?;
    let filter = match s.take::<String>("filter")? {
        None => None,
        Some(text) => Some(crate::expr::Expr::compile(&text).map_err(|m| s.error("filter", &m))?),
    };
    let max_depth = s.take::<u32>("max_depth")?.unwrap_or(1);
    if max_depth == 0 || max_depth > MAX_CHAIN_DEPTH {
        return Err(s.error("max_depth", &format!("must be between 1 and {MAX_CHAIN_DEPTH}")));
    }
    let kind_name: String = s.require("kind")?;
    let kind = KindOptions::parse(&kind_name, s)?;
    s.finish()?;
    Ok(HandlerConfig { name, senders, signal, created, columns, timeout, concurrency, retry, filter, max_depth, kind })
}

fn parse_retry(s: &mut Section) -> Result<RetryPolicy, ConfigError> {
    let mut policy = RetryPolicy::default();
    let Some(table) = s.take::<toml::Table>("retry")? else {
        return Ok(policy);
    };
    let mut r = s.child("retry", table);
    if let Some(n) = r.take::<u32>("attempts")? {
        if n == 0 {
            return Err(r.error("attempts", "must be at least 1"));
        }
        policy.attempts = n;
    }
    if let Some(d) = r.take_duration("backoff")? {
        policy.backoff = d;
    }
    if let Some(d) = r.take_duration("max_backoff")? {
        policy.max_backoff = d;
    }
    r.finish()?;
    Ok(policy)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[watch]]
table = "public.shop_order"
redact = ["card"]

[[handler]]
name = "log-orders"
sender = "public.shop_order"
created = true
kind = "log"
"#;

    #[test]
    fn parses_a_small_config() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.watches.len(), 1);
        assert_eq!(c.watches[0].mode, Mode::Durable);
        assert!(c.watches[0].operations.insert && !c.watches[0].operations.delete);
        assert_eq!(c.handlers[0].created, Some(true));
        assert_eq!(c.handlers[0].retry, RetryPolicy::default());
    }

    #[test]
    fn the_removed_read_pause_names_line_and_key_and_says_it_was_removed() {
        let e = Config::parse("[daemon]\nwal_read_pause = \"0s\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("daemon.wal_read_pause"));
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("removed"), "{}", e.message);
        assert!(Config::parse("").is_ok());
    }

    #[test]
    fn unknown_top_level_key_names_line_and_key() {
        let e = Config::parse("[daemon]\nmax_in_flight = 5\nbogus = 1\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.key.as_deref(), Some("daemon.bogus"));
        assert!(e.message.starts_with("unknown key; expected one of `max_in_flight`"), "{e}");
    }

    #[test]
    fn unknown_handler_key_names_line_and_key() {
        let text = format!("{GOOD}colour = \"red\"\n");
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("handler[0].colour"));
        assert_eq!(e.line, Some(text.lines().count()));
        assert_eq!(e.to_string(), format!("config:{}: key `handler[0].colour`: unknown key", e.line.unwrap()));
    }

    #[test]
    fn wrong_type_and_bad_duration() {
        let e = Config::parse(&GOOD.replace("created = true", "created = \"yes\"")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("handler[0].created"));
        assert_eq!(e.line, Some(9));
        let e = Config::parse(&format!("{GOOD}timeout = \"soon\"\n")).unwrap_err();
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn sender_must_be_watched() {
        let e = Config::parse(&GOOD.replace("sender = \"public.shop_order\"", "sender = \"public.nope\"")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("handler[0].sender"));
        assert_eq!(e.line, Some(8));
    }

    #[test]
    fn watch_errors() {
        let e = Config::parse("[[watch]]\ntable = \"t\"\noperations = [\"upsert\"]\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("watch[0].operations")));
        let e = Config::parse("[[watch]]\ntable = \"t\"\n[[watch]]\ntable = \"u\"\nmode = \"fast\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(5), Some("watch[1].mode")), "{e}");
        let e = Config::parse("[[watch]]\ntable = \"t\"\n[[watch]]\ntable = \"public.t\"\n").unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
    }

    /// The error for `text` as `(line, key, message)`.
    fn error_of(text: &str) -> (Option<usize>, Option<String>, String) {
        let e = Config::parse(text).expect_err("the config is invalid");
        (e.line, e.key, e.message)
    }

    fn meant(valid: &str) -> String {
        format!("unknown key; did you mean `{valid}`?")
    }

    const WATCH: &str = "[[watch]]\ntable = \"public.shop_order\"\n";

    #[test]
    fn a_misspelt_required_key_is_named_with_the_nearest_valid_one() {
        for (kind, typo, valid) in [
            ("exec", "comand = [\"/bin/true\"]", "command"),
            ("webhook", "ulr = \"http://127.0.0.1:1/\"", "url"),
            ("sql", "statment = \"SELECT 1\"", "statement"),
            ("nats", "subjct = \"orders\"", "subject"),
            ("redis", "kye = \"orders\"", "key"),
            ("celery", "tasks = \"shop.tasks.confirm\"", "task"),
            ("email", "smpt = \"smtp://127.0.0.1:25\"", "smtp"),
        ] {
            if KindOptions::keys(kind).is_none() {
                continue; // not in this build
            }
            let text = format!("{WATCH}\n[[handler]]\nname = \"h\"\nkind = \"{kind}\"\n{typo}\n");
            let typo_key = typo.split(' ').next().unwrap();
            assert_eq!(
                error_of(&text),
                (Some(7), Some(format!("handler[0].{typo_key}")), meant(valid)),
                "{kind}: {typo}"
            );
        }
    }

    #[test]
    fn a_misspelt_key_is_reported_before_the_required_key_it_hides() {
        // `timout` is a common key, `inherit_envs` an exec one; `command` is missing in both.
        for (typo, valid) in [("timout = \"3s\"", "timeout"), ("inherit_envs = [\"HOME\"]", "inherit_env")] {
            let text = format!("{WATCH}[[handler]]\nname = \"h\"\nkind = \"exec\"\n{typo}\n");
            let (line, key, message) = error_of(&text);
            assert_eq!((line, message), (Some(6), meant(valid)), "{typo}");
            assert_eq!(key.as_deref(), Some(format!("handler[0].{}", typo.split(' ').next().unwrap()).as_str()));
        }
        // The first of two in file order, even with `name` missing too.
        let text = format!("{WATCH}[[handler]]\nkind = \"exec\"\nlog_outptu = true\ncomand = [\"x\"]\n");
        assert_eq!(error_of(&text), (Some(5), Some("handler[0].log_outptu".into()), meant("log_output")));
        // `kind` itself: any kind's keys are valid until the kind is known.
        let text = format!("{WATCH}[[handler]]\nname = \"h\"\nkidn = \"exec\"\ncommand = [\"x\"]\n");
        assert_eq!(error_of(&text), (Some(5), Some("handler[0].kidn".into()), meant("kind")));
        // A key of another kind is unknown for this one.
        let text = format!("{WATCH}[[handler]]\nname = \"h\"\nkind = \"log\"\ncommand = [\"x\"]\n");
        assert_eq!(error_of(&text), (Some(6), Some("handler[0].command".into()), "unknown key".into()));
    }

    #[test]
    fn misspelt_keys_of_the_serde_tables_are_named_with_the_nearest_valid_one() {
        let cases = [
            ("[database]\nulr = \"postgres://x\"\n", 2, "database.ulr", "url"),
            ("[daemon]\nmax_inflight = 5\n", 2, "daemon.max_inflight", "max_in_flight"),
            (
                "[daemon]\nshutdown_grace = \"1s\"\nsweep_intervall = \"1s\"\n",
                3,
                "daemon.sweep_intervall",
                "sweep_interval",
            ),
            // `table` is missing too: the misspelling is what is reported.
            ("[[watch]]\ntabel = \"public.t\"\n", 2, "watch[0].tabel", "table"),
            (
                "[[watch]]\ntable = \"public.t\"\n[[watch]]\ntable = \"public.u\"\nredcat = [\"x\"]\n",
                5,
                "watch[1].redcat",
                "redact",
            ),
            ("[deamon]\nliveness = \"5s\"\n", 1, "deamon", "daemon"),
            ("[[handlers]]\nname = \"h\"\n", 1, "handlers", "handler"),
        ];
        for (text, line, key, valid) in cases {
            assert_eq!(error_of(text), (Some(line), Some(key.to_owned()), meant(valid)), "{text}");
        }
        assert_eq!(
            error_of("[[watch]]\ninclude_old = true\n"),
            (Some(1), Some("watch[0].table".into()), "missing required key".into())
        );
    }

    #[test]
    fn a_retry_key_is_named_with_the_nearest_valid_one() {
        let e = Config::parse(&format!("{GOOD}retry = {{ atempts = 3 }}\n")).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.message.as_str()),
            (Some("handler[0].retry.atempts"), meant("attempts").as_str())
        );
    }

    #[test]
    fn suggestions_are_near_misses_only() {
        use section::did_you_mean;
        let keys = ["command", "columns", "concurrency", "timeout", "url", "kind"];
        assert_eq!(did_you_mean("comand", keys), Some("command"));
        assert_eq!(did_you_mean("Command", keys), Some("command"));
        assert_eq!(did_you_mean("uri", keys), Some("url"));
        assert_eq!(did_you_mean("knid", keys), Some("kind"));
        assert_eq!(did_you_mean("colour", keys), None);
        assert_eq!(did_you_mean("x", keys), None);
    }

    /// Each kind's `KEYS` is exactly what its parser reads: a key read but not declared would be
    /// rejected as unknown before the parser saw it, a key declared but not read would pass the
    /// check and fail as unknown at the end.
    #[test]
    fn every_kind_declares_the_keys_its_parser_reads() {
        let mut seen = std::collections::BTreeMap::<String, Vec<String>>::new();
        for text in [include_str!("../../config.example.toml"), include_str!("../../examples/handlers.toml")] {
            let raw: RawConfig = toml::from_str(text).unwrap();
            let watches: Vec<Watch> = raw
                .watch
                .into_iter()
                .map(|w| {
                    let span = w.span();
                    w.into_inner().validate(text, span, "watch").unwrap()
                })
                .collect();
            for h in raw.handler {
                let span = h.span();
                let mut section = Section::new(text, span, "handler".into(), h.into_inner());
                let Some(kind) = section.peek_str("kind").map(str::to_owned) else { continue };
                if KindOptions::keys(&kind).is_none() {
                    continue; // not in this build
                }
                parse_handler(&mut section, &watches).unwrap_or_else(|e| panic!("{kind}: {e}"));
                let mut read: Vec<String> =
                    section.asked().iter().filter(|k| !HANDLER_KEYS.contains(&k.as_str())).cloned().collect();
                read.sort();
                seen.insert(kind, read);
            }
        }
        for kind in crate::handler::KINDS {
            let read = seen.get(*kind).unwrap_or_else(|| panic!("no example of kind `{kind}`"));
            let mut declared: Vec<String> = KindOptions::keys(kind).unwrap().into_iter().map(str::to_owned).collect();
            declared.sort();
            assert_eq!(&declared, read, "kind `{kind}`");
        }
    }

    #[test]
    fn retry_table() {
        let c = Config::parse(&format!("{GOOD}retry = {{ attempts = 3, backoff = \"10ms\" }}\n")).unwrap();
        assert_eq!(c.handlers[0].retry.attempts, 3);
        assert_eq!(c.handlers[0].retry.backoff, Duration::from_millis(10));
        let e = Config::parse(&format!("{GOOD}retry = {{ tries = 3 }}\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("handler[0].retry.tries"));
    }
}

#[cfg(test)]
mod example {
    #[test]
    fn the_example_config_parses_and_sets_every_key() {
        let text = include_str!("../../config.example.toml");
        let c = super::Config::parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.watches.len(), 1);
        assert_eq!(c.handlers.len(), 2);
        assert_eq!(c.handlers[1].retry.attempts, 3);
        assert_eq!(c.database.url.as_deref(), Some("postgres://post_save@localhost/shop"));
    }
}
