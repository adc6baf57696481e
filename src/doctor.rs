//! `post-save doctor`: checks of everything the daemon relies on, each with a verdict and, when
//! it is not fine, what to do about it.
//!
//! The checks need nothing but a connection: the daemon may be running or not.

mod wal;

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client};

use crate::config::{Config, Mode};
use crate::db::{self, DbError};
use crate::install;
use crate::name::quote_ident;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works now, but needs attention.
    Warn,
    /// Broken: events are or will be lost or stuck.
    Fail,
}

impl Verdict {
    /// `ok`, `warn` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable name (`listen`, `standby`, `triggers`, …).
    pub name: &'static str,
    /// How it came out.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do, when the verdict is not `ok`.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, verdict: Verdict::Ok, detail: detail.into(), fix: None }
    }

    fn bad(name: &'static str, verdict: Verdict, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, verdict, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// NOTIFY queue usage (a fraction of its 8 GB) from which it is worth a warning: about 8 MB,
/// which a healthy listener never lets pile up.
const QUEUE_WARN: f64 = 0.001;
/// From here notifying commits are close to failing.
const QUEUE_FAIL: f64 = 0.5;
/// An unacknowledged event older than this is a warning: the daemon is down or falling behind.
const BACKLOG_WARN: Duration = Duration::from_secs(300);
/// How long the LISTEN round trip may take.
const ECHO_WAIT: Duration = Duration::from_secs(5);

/// The one check there is when connecting failed with `e`.
pub fn connect_failed(e: &DbError) -> Check {
    let fix = match e {
        DbError::Tls { .. } | DbError::TlsSetup(_) => {
            "check the TLS settings (sslmode, sslrootcert, sslcert, sslkey in database.url, [database] or PGSSL* variables), the server's certificate and pg_hba.conf"
        }
        _ => "check database.url (or DATABASE_URL / PG* variables), the server and pg_hba.conf",
    };
    Check::bad("connect", Verdict::Fail, format!("{e}: {}", source_text(e)), fix)
}

/// Runs every check on `client`, already connected to the database of `pg`.
pub async fn run_on(pg: &crate::db::Settings, client: &Client, config: &Config) -> Vec<Check> {
    let mut checks = vec![Check::ok("connect", "connected")];
    checks.push(standby(client).await);
    checks.push(listen_round_trip(pg).await);
    let schema = schema(client).await;
    let migrated = schema.verdict == Verdict::Ok;
    checks.push(schema);
    checks.push(trigger_sync(client, config).await);
    if crate::capture::wal::wanted(config) {
        checks.push(wal::wal(pg, client).await);
    }
    checks.push(notify_queue(client).await);
    if migrated {
        checks.push(backlog(client, config).await);
        checks.push(retention(client, config).await);
        checks.push(dead_letters(client).await);
    }
    checks.push(rights(client, config).await);
    checks
}

fn source_text(e: &DbError) -> String {
    let mut text = String::new();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

async fn standby(client: &Client) -> Check {
    match client.query_one("SELECT pg_is_in_recovery()", &[]).await {
        Ok(row) if !row.get::<_, bool>(0) => Check::ok("standby", "the server is a primary"),
        Ok(_) => Check::bad(
            "standby",
            Verdict::Fail,
            "the server is a hot standby: LISTEN does not work there and nothing can be captured",
            "point database.url at the primary",
        ),
        Err(e) => query_failed("standby", &e),
    }
}

/// A NOTIFY sent the way the daemon's work connection sends it (`database.url`) must come back
/// on a connection listening the way the daemon listens (`database.listen_url` when set). Fails
/// behind a transaction-mode pooler (the LISTEN lands on a server connection the client does
/// not keep) and behind proxies that drop asynchronous messages; then names the pooler when the
/// server's port is not the one connected to.
async fn listen_round_trip(pg: &crate::db::Settings) -> Check {
    let channel = format!("post_save_doctor_{}", uuid::Uuid::new_v4().simple());
    let (listener, mut connection) = match db::start_up(pg.session()).await {
        Ok(pair) => pair,
        Err(e) => return Check::bad("listen", Verdict::Fail, e.to_string(), "see the connect check"),
    };
    let (sender, _sender_task) = match db::connect(pg).await {
        Ok(pair) => pair,
        Err(e) => return Check::bad("listen", Verdict::Fail, e.to_string(), "see the connect check"),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().to_owned());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let result = async {
        listener.batch_execute(&format!("LISTEN {}", quote_ident(&channel))).await?;
        // one round trip, no named statement: it works through a transaction pooler
        sender.query_typed("SELECT pg_notify($1, 'echo')", &[(&channel, Type::TEXT)]).await?;
        Ok::<_, tokio_postgres::Error>(tokio::time::timeout(ECHO_WAIT, rx.recv()).await.ok().flatten())
    }
    .await;
    task.abort();
    match result {
        Ok(Some(_)) if pg.pooled() => Check::ok(
            "listen",
            "a NOTIFY sent through database.url came back on a connection listening through database.listen_url",
        ),
        Ok(Some(_)) => Check::ok("listen", "a NOTIFY from a second connection came back on a listening one"),
        Ok(None) => {
            let between = pooler_in_between(pg, &sender).await.unwrap_or_default();
            let fix = if pg.pooled() {
                "database.listen_url must reach PostgreSQL directly (or through a session-mode pool), not \
                 through the transaction pooler"
            } else {
                "set [database] listen_url to a direct connection string (LISTEN and the replication stream \
                 need a session of their own; the work connection may stay on the pooler), or connect \
                 post-save directly or through a session-mode pool: a transaction-mode pooler \
                 (PgBouncer pool_mode = transaction) or a proxy breaks LISTEN"
            };
            Check::bad(
                "listen",
                Verdict::Fail,
                format!("a NOTIFY from a second connection did not come back within {ECHO_WAIT:?}{between}"),
                fix,
            )
        }
        Err(e) => query_failed("listen", &e),
    }
}

/// `; connected to port 6432, the server listens on 5432: …` when the server's own port is not
/// the one the connection string names, the mark of a pooler or proxy in between.
async fn pooler_in_between(pg: &crate::db::Settings, client: &Client) -> Option<String> {
    let connected = *pg.get_ports().first()?;
    let row = client.query_typed_one("SELECT current_setting('port')", &[]).await.ok()?;
    let listens: u16 = row.get::<_, String>(0).parse().ok()?;
    (listens != connected).then(|| {
        format!(
            "; connected to port {connected}, but the server listens on {listens}: a connection pooler or \
             proxy is in between (PgBouncer in pool_mode = transaction?)"
        )
    })
}

async fn schema(client: &Client) -> Check {
    let sql = "SELECT CASE WHEN to_regclass('post_save.schema_history') IS NULL THEN NULL \
               ELSE (SELECT max(version)::bigint FROM post_save.schema_history) END";
    let latest = db::latest_migration();
    match client.query_one(sql, &[]).await {
        Ok(row) => match row.get::<_, Option<i64>>(0) {
            Some(v) if v >= latest => Check::ok("schema", format!("post_save schema at version {v}")),
            Some(v) => Check::bad(
                "schema",
                Verdict::Fail,
                format!("post_save schema at version {v}, this build needs {latest}"),
                "run `post-save migrate` (the daemon also migrates when it starts)",
            ),
            None => Check::bad(
                "schema",
                Verdict::Fail,
                "no post_save schema",
                "run `post-save migrate` (the daemon also migrates when it starts)",
            ),
        },
        Err(e) => query_failed("schema", &e),
    }
}

async fn trigger_sync(client: &Client, config: &Config) -> Check {
    match install::check(client, config).await {
        Ok(drift) if drift.is_empty() => {
            Check::ok("triggers", format!("{} watched tables, triggers match the config", config.watches.len()))
        }
        Ok(drift) => Check::bad(
            "triggers",
            Verdict::Fail,
            drift.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            "run `post-save triggers install`",
        ),
        Err(e) => Check::bad("triggers", Verdict::Fail, e.to_string(), "run `post-save migrate`, then check again"),
    }
}

/// The NOTIFY queue is shared by the cluster. It only grows when some listening backend does
/// not read: most often one that LISTENs and then stays inside a transaction. When full, every
/// notifying commit fails.
async fn notify_queue(client: &Client) -> Check {
    let usage: f64 = match client.query_one("SELECT pg_notification_queue_usage()", &[]).await {
        Ok(row) => row.get(0),
        Err(e) => return query_failed("notify_queue", &e),
    };
    let shown = format!("NOTIFY queue {:.3} % full", usage * 100.0);
    if usage < QUEUE_WARN {
        return Check::ok("notify_queue", shown);
    }
    let suspects = match long_transactions(client).await {
        Ok(s) if !s.is_empty() => format!("; oldest open transactions: {}", s.join(", ")),
        Ok(_) => String::new(),
        Err(e) => format!("; could not list transactions: {e}"),
    };
    let verdict = if usage >= QUEUE_FAIL { Verdict::Fail } else { Verdict::Warn };
    Check::bad(
        "notify_queue",
        verdict,
        format!("{shown}: a listening backend is not reading{suspects}"),
        "end the session that LISTENs and idles in a transaction (pg_terminate_backend(pid)); \
         set idle_in_transaction_session_timeout for that role",
    )
}

/// Backends of the cluster inside a transaction: idle ones first (a listener inside a
/// transaction reads nothing), then the oldest.
async fn long_transactions(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT pid, coalesce(usename::text, '?'), coalesce(datname::text, '?'), coalesce(application_name, ''), \
                    coalesce(state, ''), extract(epoch FROM now() - xact_start)::float8 \
               FROM pg_stat_activity \
              WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend' \
              ORDER BY state LIKE 'idle in transaction%' DESC, xact_start LIMIT 5",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            format!(
                "pid {} (role {}, database {}, application {:?}, {} for {:.0} s)",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4),
                r.get::<_, f64>(5)
            )
        })
        .collect())
}

async fn backlog(client: &Client, config: &Config) -> Check {
    if !config.watches.iter().any(|w| w.mode == Mode::Durable) {
        return Check::ok("backlog", "no durable tables: nothing is kept to fall behind on");
    }
    let sql = "SELECT coalesce(sum(n), 0)::bigint, \
                      extract(epoch FROM clock_timestamp() - min((head->>'at')::timestamptz))::float8 \
                 FROM post_save.event WHERE handled_at IS NULL";
    match client.query_one(sql, &[]).await {
        Ok(row) => {
            let pending: i64 = row.get(0);
            let age: Option<f64> = row.get(1);
            match age {
                None => Check::ok("backlog", "no unacknowledged events"),
                Some(age) if age < BACKLOG_WARN.as_secs_f64() => {
                    Check::ok("backlog", format!("{pending} unacknowledged events, oldest {age:.0} s"))
                }
                Some(age) => Check::bad(
                    "backlog",
                    Verdict::Warn,
                    format!("{pending} unacknowledged events, oldest {age:.0} s"),
                    "start the daemon (`post-save run`), or look at why it falls behind (its log, slow handlers)",
                ),
            }
        }
        Err(e) => query_failed("backlog", &e),
    }
}

/// Whether ledger retention keeps up: the current partition should not take the writes for
/// much longer than `keep_handled` (it rotates after half of it, once the next partition's
/// events are old enough). Longer means something holds a lock on a partition, or no daemon
/// has run for a while.
async fn retention(client: &Client, config: &Config) -> Check {
    let keep = config.daemon.keep_handled;
    let overdue =
        keep.max(crate::capture::ledger::query::rotation_period(keep) * 2) + std::time::Duration::from_secs(60);
    let sql = "SELECT extract(epoch FROM clock_timestamp() - since)::float8, pg_size_pretty( \
                      (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('post_save.event'))) \
                 FROM post_save.ledger_rotation";
    match client.query_one(sql, &[]).await {
        Ok(row) => {
            let (age, size): (f64, Option<String>) = (row.get(0), row.get(1));
            let size = size.unwrap_or_else(|| "0 bytes".into());
            let detail = format!("the ledger takes {size}; its current partition has taken the writes for {age:.0} s");
            if age <= overdue.as_secs_f64() {
                return Check::ok("retention", detail);
            }
            let holders =
                match crate::capture::ledger::query::lock_holders(client, &crate::capture::ledger::query::PARTITIONS)
                    .await
                {
                    Ok(holders) => holders,
                    Err(e) => return query_failed("retention", &e),
                };
            let fix = match Some(holders).filter(|h| !h.is_empty()) {
                Some(holders) => format!(
                    "end the open transaction of {holders}: it read the ledger and holds a lock the \
                     partition rotation waits for"
                ),
                None => "start the daemon (`post-save run`): it empties and rotates the partitions".into(),
            };
            Check::bad("retention", Verdict::Warn, format!("{detail}, longer than keep_handled allows"), fix)
        }
        Err(e) => query_failed("retention", &e),
    }
}

async fn dead_letters(client: &Client) -> Check {
    match client.query_one("SELECT count(*) FROM post_save.dead_letter", &[]).await {
        Ok(row) => match row.get::<_, i64>(0) {
            0 => Check::ok("dead_letters", "no dead letters"),
            n => Check::bad(
                "dead_letters",
                Verdict::Warn,
                format!("{n} deliveries gave up"),
                "inspect with `post-save dead list`, then `post-save dead retry` or `post-save dead purge`",
            ),
        },
        Err(e) => query_failed("dead_letters", &e),
    }
}

/// The rights the daemon's role needs to run (`post-save grants` prints them): each one the
/// connected role lacks is named, with the statement that grants it. Installing is the owner's
/// work and is not checked here (see the `schema` and `triggers` checks).
async fn rights(client: &Client, config: &Config) -> Check {
    let missing = match crate::install::grants::missing(client, config).await {
        Ok(missing) => missing,
        Err(e) => return query_failed("rights", &e),
    };
    if missing.is_empty() {
        return Check::ok("rights", "the role holds every right `post-save grants` lists for this config");
    }
    let role = match client.query_one("SELECT current_user::text", &[]).await {
        Ok(row) => row.get::<_, String>(0),
        Err(e) => return query_failed("rights", &e),
    };
    let lacks: Vec<String> = missing.iter().map(|r| format!("{} ({})", r.describe(), r.why)).collect();
    let grants: Vec<String> = missing.iter().map(|r| r.statement(&role)).collect();
    Check::bad(
        "rights",
        Verdict::Fail,
        format!("role {role} lacks {}", lacks.join("; ")),
        format!("as the owner of the post_save schema (or an admin), run: {}", grants.join(" ")),
    )
}

fn query_failed(name: &'static str, e: &tokio_postgres::Error) -> Check {
    let text = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned());
    Check::bad(
        name,
        Verdict::Fail,
        format!("query failed: {text}"),
        "see the error; run `post-save migrate` if the schema is missing",
    )
}

/// Whether any check found a problem (`warn` or `fail`).
pub fn problems(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.verdict != Verdict::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_and_fail_are_problems_ok_is_not() {
        let ok = Check::ok("a", "fine");
        let warn = Check::bad("b", Verdict::Warn, "meh", "do this");
        assert!(!problems(std::slice::from_ref(&ok)));
        assert!(problems(&[ok, warn]));
        assert!(Verdict::Fail > Verdict::Warn && Verdict::Warn > Verdict::Ok);
    }
}
