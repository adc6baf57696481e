//! `kind = "sql"`: run one SQL statement per event, in a transaction of its own.
//!
//! ```toml
//! [[handler]]
//! name = "count-orders"
//! sender = "public.shop_order"
//! created = true
//! kind = "sql"
//! statement = "UPDATE shop_customer SET order_count = order_count + 1 WHERE id = $1"
//! # One CEL expression over the event per placeholder, $1 first.
//! params = ["instance.customer_id"]
//! # Where to run it; default: the daemon's database. A URL holding a password belongs in
//! # `url_env` or `url_file` instead (a variable or a file holding the URL).
//! # url = "postgres://shop@db.internal/shop"
//! # Connections kept open at most, opened on the first events, not at start; attempts beyond
//! # it (see `concurrency`) wait for a free one.
//! pool_size = 4
//! ```
//!
//! Each event runs `BEGIN`, `SELECT post_save.set_origin('<handler>@<depth>')` (or `set_config`
//! where the handler's role may not run it),
//! the statement (prepared once per connection), `COMMIT`. The origin marks the saves the
//! statement causes, so when the handler writes to a table it watches, the resulting events do
//! not come back to it (or only `max_depth` levels deep): no loops.
//!
//! # Parameters
//!
//! Each value is checked against the type PostgreSQL inferred for its placeholder, then sent in
//! text format and parsed by the server:
//!
//! | parameter type | accepts |
//! |---|---|
//! | `int2`, `int4`, `int8` | whole numbers, or strings holding one; range-checked |
//! | `float4`, `float8` | numbers, or strings holding one (`NaN`, `Infinity`) |
//! | `bool` | `true`, `false` |
//! | `json`, `jsonb` | any value |
//! | arrays (`int8[]`, `text[]`, …) | lists (nested lists for more dimensions), or an array literal string |
//! | anything else: `text`, `varchar`, `numeric`, `uuid`, `timestamptz`, `date`, enums, … | strings, numbers, booleans, as text |
//!
//! JSON null is SQL NULL for every type (write `'null'::jsonb` in the statement for a JSON null).
//! A placeholder whose type PostgreSQL infers from context needs no cast; give one when it
//! cannot (`$1::numeric`, `$1::timestamptz`). A value that does not fit, or an expression that
//! fails on the event, kills the delivery at once with a message naming the parameter: the same
//! event would fail the same way on every retry.
//!
//! # Errors
//!
//! * Retried: no connection, a lost connection, serialization failures and deadlocks (`40…`), a
//!   cancelled statement, lock timeouts, a server shutting down or out of resources (`08…`,
//!   `53…`, `55P03`, `57…`), a read-only server (`25006`, after a failover).
//! * Dead at once: the statement does not fit the database (`42…`: syntax, unknown table or
//!   column, no privilege) or a value does not fit its column (`22…`), features not supported
//!   (`0A…`). Fix the statement or the schema, then retry the dead letters.
//! * Failed, retried by the policy: everything else, notably constraint violations (`23…`), which
//!   may come from a concurrent write that a later attempt no longer meets, and errors raised by
//!   triggers.
//!
//! Delivery is at least once: when the connection drops during `COMMIT` the outcome is unknown
//! and the event is retried, so a statement that must not run twice for one event should be
//! idempotent (an upsert keyed on the event's `pk` or `id`).

mod param;

use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio_postgres::config::Host;

use super::{BuildError, Delivery, Failure, Handler, HandlerError, SecretSource, origin_for};
use crate::config::{ConfigError, Section};
use crate::db::{Settings, Tls};
use crate::event::SaveEvent;
use crate::expr::{EventContext, Expr};

/// Connections per handler when `pool_size` is not given.
const DEFAULT_POOL_SIZE: usize = 4;

/// Marks the saves of the handler's transaction with its origin, in a database without
/// post-save's schema (or where the handler's role may not run `post_save.set_origin`).
/// On a server that writes logical WAL, the origin also goes into the WAL as a transactional
/// message, which is how `capture = "wal"` learns it (the function is found by name: its
/// signature gained an argument in PostgreSQL 17).
const SET_ORIGIN: &str = "SELECT set_config('post_save.origin', $1::text, true), \
     CASE WHEN current_setting('wal_level') = 'logical' \
          AND (SELECT coalesce(bool_or(has_function_privilege(p.oid, 'execute')), false) \
            FROM pg_proc p WHERE p.proname = 'pg_logical_emit_message' \
             AND p.pronamespace = 'pg_catalog'::regnamespace AND p.proargtypes[2] = 'text'::regtype) \
          THEN pg_logical_emit_message(true, 'post_save.origin', $1::text) END";

/// The same where `post_save.set_origin` may be run: it also sets the key the trigger capture
/// asks for before it believes a save's origin (a plain writer cannot forge the mark).
const SET_KEYED_ORIGIN: &str = "SELECT post_save.set_origin($1::text), \
     CASE WHEN current_setting('wal_level') = 'logical' \
          AND (SELECT coalesce(bool_or(has_function_privilege(p.oid, 'execute')), false) \
            FROM pg_proc p WHERE p.proname = 'pg_logical_emit_message' \
             AND p.pronamespace = 'pg_catalog'::regnamespace AND p.proargtypes[2] = 'text'::regtype) \
          THEN pg_logical_emit_message(true, 'post_save.origin', $1::text) END";

/// Whether the handler's role may run `post_save.set_origin` in its database.
const CAN_SET_KEYED_ORIGIN: &str =
    "SELECT coalesce(has_function_privilege(to_regprocedure('post_save.set_origin(text)'), 'execute'), false)";

/// Options of an `sql` handler.
#[derive(Debug, Clone)]
pub struct SqlOptions {
    /// The statement, with placeholders `$1`…`$n`.
    pub statement: String,
    /// One expression per placeholder, `$1` first.
    pub params: Vec<Expr>,
    /// Where the statement runs.
    pub database: SqlDatabase,
    /// Most connections open at once.
    pub pool_size: usize,
}

/// Where an `sql` handler connects.
#[derive(Debug, Clone)]
pub enum SqlDatabase {
    /// No `url`: the daemon's database. `None` until [`SqlOptions::default_database`] gives
    /// the daemon's settings; then `DATABASE_URL` and the `PG*` variables are used.
    Daemon(Option<Box<Settings>>),
    /// `url`.
    Url(DatabaseUrl),
    /// `url_file` or `url_env`, read when the handler is built.
    Secret(SecretSource),
}

/// A connection string given as `url`; neither its `Debug` nor the handler's target shows the
/// password.
#[derive(Clone)]
pub struct DatabaseUrl {
    text: SecretString,
    parsed: Box<tokio_postgres::Config>,
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres redacts the password.
        self.parsed.fmt(f)
    }
}

impl SqlOptions {
    /// Every key [`Self::parse`] reads: anything else in the table is an unknown key.
    pub(crate) const KEYS: &[&str] = &["statement", "params", "url", "url_file", "url_env", "pool_size"];

    /// Reads the options from the handler's table.
    pub fn parse(s: &mut Section) -> Result<Self, ConfigError> {
        let statement: String = s.require("statement")?;
        if statement.trim().is_empty() {
            return Err(s.error("statement", "cannot be empty"));
        }
        let mut params = Vec::new();
        for (i, source) in s.take::<Vec<String>>("params")?.unwrap_or_default().iter().enumerate() {
            let expr = Expr::compile(source).map_err(|m| s.error("params", &format!("${}: {m}", i + 1)))?;
            params.push(expr);
        }
        let highest = param::highest_placeholder(&statement);
        if highest != params.len() {
            let msg = format!(
                "the statement's placeholders go up to ${highest} but `params` has {} expression(s); give one per placeholder, $1 first",
                params.len()
            );
            return Err(s.error("params", &msg));
        }
        let url = s.take::<String>("url")?;
        let secret = SecretSource::parse(s, "url")?;
        let database = match (url, secret) {
            (Some(_), Some(_)) => return Err(s.error("url", "give `url`, `url_file` or `url_env`, only one")),
            (Some(url), None) => SqlDatabase::Url(DatabaseUrl {
                parsed: Box::new(
                    crate::db::parse(&url).map_err(|e| s.error("url", &format!("invalid connection string: {e}")))?.0,
                ),
                text: SecretString::from(url),
            }),
            (None, Some(secret)) => SqlDatabase::Secret(secret),
            (None, None) => SqlDatabase::Daemon(None),
        };
        let pool_size = s.take::<usize>("pool_size")?.unwrap_or(DEFAULT_POOL_SIZE);
        if pool_size == 0 {
            return Err(s.error("pool_size", "must be at least 1"));
        }
        Ok(SqlOptions { statement, params, database, pool_size })
    }

    /// Gives the daemon's connection settings, used when the options name no database. Call it
    /// before [`SqlOptions::build`]; without it such a handler connects per `DATABASE_URL` and
    /// the `PG*` variables.
    pub fn default_database(&mut self, pg: &Settings) {
        if let SqlDatabase::Daemon(own) = &mut self.database {
            *own = Some(Box::new(pg.clone()));
        }
    }

    /// Where events go, for `handlers list`: the statement's first words and the database's
    /// host and name, never a password.
    pub fn target(&self) -> String {
        let place = match &self.database {
            SqlDatabase::Daemon(None) => "the daemon's database".to_owned(),
            SqlDatabase::Daemon(Some(pg)) => describe_database(pg),
            SqlDatabase::Url(url) => describe_database(&url.parsed),
            SqlDatabase::Secret(SecretSource::Env(var)) => format!("url from ${var}"),
            SqlDatabase::Secret(SecretSource::File(path)) => format!("url from {}", path.display()),
        };
        format!("{} @ {place}", summary(&self.statement))
    }

    /// Builds the handler. Nothing connects: connections open on the first events.
    pub fn build(&self, name: &str) -> Result<Arc<dyn Handler>, BuildError> {
        let bad_url = |e: crate::db::BadConnectionString| {
            BuildError::new(name, format!("invalid connection string: {}", e.source))
        };
        let pg = match &self.database {
            SqlDatabase::Daemon(Some(pg)) => (**pg).clone(),
            SqlDatabase::Daemon(None) => crate::db::resolve(None).map_err(bad_url)?,
            // What the URL leaves out comes from the `PG*` variables, as for the daemon.
            SqlDatabase::Url(url) => crate::db::resolve(Some(url.text.expose_secret())).map_err(bad_url)?,
            SqlDatabase::Secret(source) => {
                let url = source.read().map_err(|m| BuildError::new(name, m))?;
                crate::db::resolve(Some(url.expose_secret())).map_err(bad_url)?
            }
        };
        let tls = Arc::new(pg.tls().clone());
        let manager = Manager::from_connect(
            (*pg).clone(),
            PoolConnect(Arc::clone(&tls)),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .build()
            .map_err(|e| BuildError::new(name, format!("cannot build the connection pool: {e}")))?;
        Ok(Arc::new(SqlHandler {
            name: name.to_owned(),
            statement: self.statement.clone(),
            params: self.params.clone(),
            pool,
            tls,
            keyed_origin: tokio::sync::OnceCell::new(),
        }))
    }
}

/// The statement's first three words, e.g. `UPDATE shop_customer SET …`.
fn summary(statement: &str) -> String {
    let words: Vec<&str> = statement.split_whitespace().collect();
    let mut text: String = words.iter().take(3).copied().collect::<Vec<_>>().join(" ");
    if text.chars().count() > 60 {
        text = text.chars().take(60).collect();
        text.push_str(" …");
    } else if words.len() > 3 {
        text.push_str(" …");
    }
    text
}

/// `host[:port]/dbname`, without user or password.
fn describe_database(pg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(h) => h.clone(),
                Host::Unix(p) => p.display().to_string(),
            };
            let port = pg.get_ports().get(i).or_else(|| pg.get_ports().first());
            port.map_or(name.clone(), |p| format!("{name}:{p}"))
        })
        .collect();
    let host = if hosts.is_empty() { "default host".to_owned() } else { hosts.join(",") };
    match pg.get_dbname() {
        Some(db) => format!("{host}/{db}"),
        None => host,
    }
}

/// Runs the statement for each event.
pub struct SqlHandler {
    name: String,
    statement: String,
    params: Vec<Expr>,
    pool: Pool,
    /// The pool's TLS settings, for what a failed connection says.
    tls: Arc<Tls>,
    /// Whether the database has `post_save.set_origin` for this role: asked once.
    keyed_origin: tokio::sync::OnceCell<bool>,
}

impl SqlHandler {
    /// The parameters' values for `event`. An expression that fails now fails on every retry.
    fn values(&self, event: &SaveEvent) -> Result<Vec<Value>, HandlerError> {
        let ctx = EventContext::new(event);
        self.params
            .iter()
            .enumerate()
            .map(|(i, p)| p.eval(&ctx).map_err(|e| HandlerError::permanent(format!("param ${}: {e}", i + 1))))
            .collect()
    }

    /// One transaction: origin, statement, commit. Returns the rows the statement affected.
    async fn run(&self, client: &mut Object, event: &SaveEvent, values: &[Value]) -> Result<u64, HandlerError> {
        let tx = client.transaction().await.map_err(|e| db_failure("BEGIN", e))?;
        let keyed = *self
            .keyed_origin
            .get_or_try_init(|| async { tx.query_one(CAN_SET_KEYED_ORIGIN, &[]).await.map(|r| r.get::<_, bool>(0)) })
            .await
            .map_err(|e| db_failure("setting the origin", e))?;
        let sql = if keyed { SET_KEYED_ORIGIN } else { SET_ORIGIN };
        let set_origin = tx.prepare_cached(sql).await.map_err(|e| db_failure("setting the origin", e))?;
        tx.execute(&set_origin, &[&origin_for(&self.name, event)])
            .await
            .map_err(|e| db_failure("setting the origin", e))?;
        let statement =
            tx.prepare_cached(&self.statement).await.map_err(|e| db_failure("preparing the statement", e))?;
        let types = statement.params();
        if types.len() != values.len() {
            return Err(HandlerError::permanent(format!(
                "the statement has {} parameter(s) but `params` has {} expression(s)",
                types.len(),
                values.len()
            )));
        }
        let mut bound = Vec::with_capacity(values.len());
        for (i, ((ty, value), expr)) in types.iter().zip(values).zip(&self.params).enumerate() {
            let p = param::bind(ty, value).map_err(|why| {
                HandlerError::permanent(format!(
                    "param ${} (`{}`): {} cannot be bound to type {}: {why}",
                    i + 1,
                    expr.source(),
                    param::describe(value),
                    ty.name()
                ))
            })?;
            bound.push(p);
        }
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            bound.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let rows = tx.execute(&statement, &refs).await.map_err(|e| db_failure("the statement", e))?;
        tx.commit().await.map_err(|e| db_failure("COMMIT", e))?;
        Ok(rows)
    }
}

#[async_trait]
impl Handler for SqlHandler {
    async fn handle(&self, event: &SaveEvent, delivery: &Delivery) -> Result<(), HandlerError> {
        let values = self.values(event)?;
        let mut client = self.pool.get().await.map_err(|e| pool_failure(e, &self.tls))?;
        match self.run(&mut client, event, &values).await {
            Ok(rows) => {
                tracing::debug!(handler = %delivery.handler, rows, "sql handler ran");
                Ok(())
            }
            Err(e) => {
                if e.message.contains("cached plan must not change result type") {
                    // The table changed under a prepared statement: prepare afresh next time.
                    client.statement_cache.clear();
                }
                Err(e)
            }
        }
    }
}

/// Opens the pool's connections as the daemon opens its own: with libpq's `sslmode`.
struct PoolConnect(Arc<Tls>);

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        pg: &tokio_postgres::Config,
    ) -> std::pin::Pin<
        Box<
            dyn Future<Output = Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>>
                + Send
                + '_,
        >,
    > {
        let pg = pg.clone();
        Box::pin(async move {
            let (client, connection) = crate::db::open(&pg, &self.0).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "sql handler connection ended");
                }
            });
            Ok((client, task))
        })
    }
}

/// A failure to get a connection: always worth another attempt.
fn pool_failure(e: PoolError, tls: &Tls) -> HandlerError {
    match e {
        PoolError::Backend(e) => {
            let message = match (e.as_db_error(), tls.failure(&e)) {
                (_, Some(failure)) => format!("cannot connect: {failure}"),
                (Some(db), None) => format!("cannot connect: {} {}", db.code().code(), db.message()),
                (None, None) => format!("cannot connect: {e}"),
            };
            HandlerError::retry(message).with_source(e)
        }
        PoolError::Timeout(_) => HandlerError::retry("timed out waiting for a connection"),
        other => HandlerError::retry(format!("no connection: {other}")),
    }
}

/// A failed query, classified by its SQLSTATE (see the module documentation).
fn db_failure(what: &str, e: tokio_postgres::Error) -> HandlerError {
    let (failure, message) = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let mut message = format!("{what} failed: {} {code}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                message.push_str(&format!(" (detail: {detail})"));
            }
            (classify(code, db.message()), message)
        }
        // No answer from the server: the connection is gone or broke.
        None => (Failure::Retry, format!("{what} failed: {e}")),
    };
    HandlerError { failure, message, source: None, retry_after: None }.with_source(e)
}

/// Whether an error with SQLSTATE `code` is worth another attempt.
fn classify(code: &str, message: &str) -> Failure {
    let class = code.get(..2).unwrap_or("");
    match (class, code) {
        // A prepared statement outdated by DDL: retried after the cache is cleared.
        ("0A", _) if message.contains("cached plan") => Failure::Retry,
        ("40" | "08" | "53" | "57", _) | (_, "55P03" | "25006") => Failure::Retry,
        ("42" | "22" | "0A", _) => Failure::Permanent,
        _ => Failure::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<SqlOptions, ConfigError> {
        let doc = format!("[[handler]]\nname = \"h\"\nkind = \"sql\"\n{body}\n");
        let table: toml::Table = toml::from_str(&doc).unwrap();
        let inner = table["handler"].as_array().unwrap()[0].as_table().unwrap().clone();
        let text = toml::to_string(&inner).unwrap();
        let mut section = Section::from_document(&text, "handler[0]")?;
        let _ = section.take::<String>("name")?;
        let _ = section.take::<String>("kind")?;
        let options = SqlOptions::parse(&mut section)?;
        section.finish()?;
        Ok(options)
    }

    const COUNT: &str = "statement = \"UPDATE shop_customer SET order_count = order_count + 1 WHERE id = $1\"\n\
                         params = [\"instance.customer_id\"]";

    #[test]
    fn parses_the_documented_example() {
        let o =
            parse(&format!("{COUNT}\nurl = \"postgres://shop:s3cret@db.internal:6432/shop\"\npool_size = 2")).unwrap();
        assert_eq!(o.params.len(), 1);
        assert_eq!(o.pool_size, 2);
        assert_eq!(o.target(), "UPDATE shop_customer SET … @ db.internal:6432/shop");
        assert!(!format!("{o:?}").contains("s3cret"), "Debug shows the password");
    }

    #[test]
    fn the_target_never_shows_a_password() {
        let o = parse(COUNT).unwrap();
        assert_eq!(o.target(), "UPDATE shop_customer SET … @ the daemon's database");
        let o = parse(&format!("{COUNT}\nurl_env = \"SHOP_URL\"")).unwrap();
        assert_eq!(o.target(), "UPDATE shop_customer SET … @ url from $SHOP_URL");
        let mut o = parse(COUNT).unwrap();
        o.default_database(
            &"host=/run/pg port=5433 dbname=shop password=s3cret".parse::<tokio_postgres::Config>().unwrap().into(),
        );
        assert_eq!(o.target(), "UPDATE shop_customer SET … @ /run/pg:5433/shop");
    }

    #[test]
    fn placeholders_and_params_must_match() {
        let e = parse("statement = \"UPDATE t SET a = $2 WHERE id = $1\"\nparams = [\"instance.id\"]").unwrap_err();
        assert!(e.message.contains("up to $2") && e.message.contains("1 expression"), "{e}");
        assert_eq!(e.key.as_deref(), Some("handler[0].params"));
        let e = parse("statement = \"DELETE FROM t\"\nparams = [\"instance.id\"]").unwrap_err();
        assert!(e.message.contains("up to $0"), "{e}");
        assert!(parse("statement = \"DELETE FROM t\"").is_ok());
    }

    #[test]
    fn bad_options_are_config_errors() {
        let e = parse("statement = \"SELECT $1\"\nparams = [\"instanse.id\"]").unwrap_err();
        assert!(e.message.starts_with("$1: unknown variable"), "{e}");
        let e = parse("params = []").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("handler[0].statement"));
        let e = parse(&format!("{COUNT}\nurl = \"postgres://a\"\nurl_env = \"X\"")).unwrap_err();
        assert!(e.message.contains("only one"), "{e}");
        let e = parse(&format!("{COUNT}\nurl = \"host=a port=notaport\"")).unwrap_err();
        assert!(e.message.contains("invalid connection string"), "{e}");
        let e = parse(&format!("{COUNT}\npool_size = 0")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("handler[0].pool_size"));
        assert!(parse(&format!("{COUNT}\nbogus = 1")).is_err());
    }

    #[test]
    fn building_does_not_connect() {
        // Nothing listens on port 1; a connection attempt would fail (or hang) here.
        let o = parse(&format!("{COUNT}\nurl = \"host=127.0.0.1 port=1\"")).unwrap();
        assert!(o.build("h").is_ok());
        let o = parse(&format!("{COUNT}\nurl_env = \"POST_SAVE_SQL_TEST_UNSET_VARIABLE\"")).unwrap();
        let e = o.build("h").err().expect("a missing secret fails the build");
        assert!(e.message.contains("POST_SAVE_SQL_TEST_UNSET_VARIABLE"), "{e}");
    }

    #[test]
    fn errors_are_classified_by_sqlstate() {
        assert_eq!(classify("40001", ""), Failure::Retry);
        assert_eq!(classify("40P01", ""), Failure::Retry);
        assert_eq!(classify("08006", ""), Failure::Retry);
        assert_eq!(classify("57P01", ""), Failure::Retry);
        assert_eq!(classify("25006", ""), Failure::Retry);
        assert_eq!(classify("42601", ""), Failure::Permanent);
        assert_eq!(classify("42P01", ""), Failure::Permanent);
        assert_eq!(classify("22P02", ""), Failure::Permanent);
        assert_eq!(classify("0A000", "cached plan must not change result type"), Failure::Retry);
        assert_eq!(classify("23505", ""), Failure::Failed);
        assert_eq!(classify("P0001", ""), Failure::Failed);
    }

    #[test]
    fn summary_is_short() {
        assert_eq!(summary("DELETE FROM t"), "DELETE FROM t");
        assert_eq!(summary("INSERT INTO audit (a, b) VALUES ($1, $2)"), "INSERT INTO audit …");
        assert_eq!(summary(&"x".repeat(100)).chars().count(), 62);
    }
}
