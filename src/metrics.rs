//! The Prometheus endpoint: `GET /metrics` on the address of `daemon.metrics` (loopback only).
//!
//! Counters come from the daemon's [`Stats`]; the ledger backlog, its oldest unacknowledged
//! event, the NOTIFY queue usage and the oldest backend idling in a transaction are read from
//! the database at scrape time, on a connection of the endpoint's own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::capture::wal::{Blocked, Blocker};
use crate::daemon::State;
use crate::db;
use crate::stats::Stats;

/// Longest a scrape's database queries may take; a slow database gives a scrape without them.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a scrape reads.
pub(crate) struct Endpoint {
    pub stats: Arc<Stats>,
    pub state: watch::Receiver<State>,
    /// What blocks the WAL reader, when the config captures from the WAL.
    pub wal: Option<watch::Receiver<Option<Blocked>>>,
    pub pg: crate::db::Settings,
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl Endpoint {
    pub(crate) fn new(
        stats: Arc<Stats>,
        state: watch::Receiver<State>,
        wal: Option<watch::Receiver<Option<Blocked>>>,
        pg: crate::db::Settings,
    ) -> Self {
        Endpoint { stats, state, wal, pg, client: Mutex::new(None) }
    }
}

/// Serves scrapes until `stop`.
pub(crate) async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &endpoint).await {
                tracing::debug!(error = %e, "metrics endpoint: request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, endpoint: &Endpoint) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(endpoint).await),
        ("GET", _) => ("404 Not Found", "text/plain", "not found: the metrics are at /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Gauges read from the database.
#[derive(Debug, Default)]
struct FromDb {
    queue_usage: f64,
    backlog: Option<i64>,
    oldest_age: Option<f64>,
    idle_in_transaction: Option<(i32, String, String, f64)>,
    /// The ledger's size on disk, and how long its current partition has taken the writes.
    ledger: Option<(i64, f64)>,
}

async fn read_db(endpoint: &Endpoint) -> Result<FromDb, db::DbError> {
    let mut slot = endpoint.client.lock().await;
    if slot.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
        let (client, _task) = db::connect(&endpoint.pg).await?;
        *slot = Some(client);
    }
    let Some(client) = slot.as_ref() else { return Ok(FromDb::default()) };
    let q = |e| db::DbError::Query(e);
    let usage: f64 = client.query_one("SELECT pg_notification_queue_usage()", &[]).await.map_err(q)?.get(0);
    let ledger = client
        .query_one(
            "SELECT CASE WHEN to_regclass('post_save.event') IS NULL THEN NULL ELSE \
                (SELECT coalesce(sum(n), 0)::bigint FROM post_save.event WHERE handled_at IS NULL) END",
            &[],
        )
        .await
        .map_err(q)?;
    let backlog: Option<i64> = ledger.get(0);
    let oldest_age = match backlog {
        Some(n) if n > 0 => client
            .query_opt(
                "SELECT extract(epoch FROM clock_timestamp() - (head->>'at')::timestamptz)::float8 \
                   FROM post_save.event WHERE handled_at IS NULL ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .map_err(q)?
            .map(|r| r.get::<_, f64>(0)),
        _ => None,
    };
    let idle = client
        .query_opt(
            "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, ''), \
                    extract(epoch FROM now() - xact_start)::float8 \
               FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND backend_type = 'client backend' \
              ORDER BY xact_start LIMIT 1",
            &[],
        )
        .await
        .map_err(q)?
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)));
    let ledger = client
        .query_one(
            "SELECT CASE WHEN to_regclass('post_save.ledger_rotation') IS NOT NULL THEN \
                (SELECT sum(pg_total_relation_size(relid))::int8 FROM pg_partition_tree('post_save.event')) END, \
                    CASE WHEN to_regclass('post_save.ledger_rotation') IS NOT NULL THEN \
                (SELECT extract(epoch FROM clock_timestamp() - since)::float8 FROM post_save.ledger_rotation) END",
            &[],
        )
        .await
        .map_err(q)?;
    let ledger = ledger.get::<_, Option<i64>>(0).zip(ledger.get::<_, Option<f64>>(1));
    Ok(FromDb { queue_usage: usage, backlog, oldest_age, idle_in_transaction: idle, ledger })
}

/// `post_save_wal_blocked{reason}`: 1 for what blocks the WAL reader, 0 for every other
/// reason, so an alert on any reason above 0 never misses a series that is not there yet.
fn register_wal_blocked(registry: &mut Registry, blocked: Option<&Blocked>) {
    let family = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    for reason in Blocker::ALL {
        let on = blocked.is_some_and(|b| b.reason == reason);
        family.get_or_create(&vec![("reason", reason.label())]).set(i64::from(on));
    }
    registry.register(
        "post_save_wal_blocked",
        "1 while the WAL reader is blocked by what retrying cannot fix (see the daemon's log and `post-save doctor`)",
        family,
    );
}

/// The exposition text of one scrape.
pub(crate) async fn render(endpoint: &Endpoint) -> String {
    let mut registry = Registry::default();
    let stats = &endpoint.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let counters: [(&str, &str, u64); 10] = [
        (
            "post_save_notifications_received",
            "Notifications received on the post_save channel",
            get(&stats.notifications),
        ),
        (
            "post_save_notifications_invalid",
            "Notifications that did not decode (logged and skipped)",
            get(&stats.invalid),
        ),
        ("post_save_events_received", "Events dispatched to the handlers' lanes", get(&stats.events)),
        (
            "post_save_events_duplicate",
            "Events seen again while in flight or after handling, not dispatched twice",
            get(&stats.duplicates),
        ),
        ("post_save_events_acknowledged", "Ledger events acknowledged", get(&stats.acked)),
        ("post_save_deliveries_handled", "Successful handler deliveries, all handlers", get(&stats.handled)),
        (
            "post_save_deliveries_dead",
            "Deliveries that gave up into the dead-letter list, all handlers",
            get(&stats.dead),
        ),
        ("post_save_attempts_failed", "Failed handler attempts, all handlers", get(&stats.failed_attempts)),
        ("post_save_reconnects", "Reconnections to the database", get(&stats.reconnects)),
        ("post_save_liveness_failures", "Liveness pings not answered in time", get(&stats.liveness_failures)),
    ];
    for (name, help, value) in counters {
        registry.register(name, help, ConstCounter::new(value));
    }
    registry.register(
        "post_save_deliveries",
        "Handler deliveries by handler and outcome (handled, failed, retried, dead)",
        stats.deliveries.clone(),
    );
    registry.register("post_save_handler_duration_seconds", "Duration of handler attempts", stats.durations.clone());
    let listening = matches!(*endpoint.state.borrow(), State::Listening { .. });
    registry.register(
        "post_save_listening",
        "1 while the daemon listens and dispatches",
        ConstGauge::new(i64::from(listening)),
    );
    if let Some(wal) = &endpoint.wal {
        register_wal_blocked(&mut registry, wal.borrow().as_ref());
    }

    match tokio::time::timeout(QUERY_TIMEOUT, read_db(endpoint)).await {
        Ok(Ok(found)) => {
            registry.register(
                "post_save_database_up",
                "1 when this scrape could query the database",
                ConstGauge::new(1i64),
            );
            registry.register(
                "post_save_notify_queue_usage_ratio",
                "Fraction of the cluster's NOTIFY queue in use (pg_notification_queue_usage)",
                ConstGauge::new(found.queue_usage),
            );
            if let Some(backlog) = found.backlog {
                registry.register(
                    "post_save_ledger_backlog_events",
                    "Unacknowledged ledger events",
                    ConstGauge::new(backlog),
                );
                registry.register(
                    "post_save_ledger_oldest_unacknowledged_seconds",
                    "Age of the oldest unacknowledged ledger event (0 when none)",
                    ConstGauge::new(found.oldest_age.unwrap_or(0.0)),
                );
            }
            if let Some((bytes, age)) = found.ledger {
                registry.register(
                    "post_save_ledger_bytes",
                    "Size of the ledger on disk, every partition with its indexes",
                    ConstGauge::new(bytes),
                );
                registry.register(
                    "post_save_ledger_partition_age_seconds",
                    "How long the current ledger partition has taken the writes; above keep_handled, \
                     retention is held up (see the daemon's warnings)",
                    ConstGauge::new(age),
                );
            }
            let idle = Family::<Vec<(&'static str, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
            if let Some((pid, role, app, age)) = found.idle_in_transaction {
                idle.get_or_create(&vec![("pid", pid.to_string()), ("role", role), ("application", app)]).set(age);
            }
            registry.register(
                "post_save_idle_in_transaction_oldest_seconds",
                "The backend idle in a transaction the longest (a listener there stops the NOTIFY queue from draining)",
                idle,
            );
        }
        _ => {
            *endpoint.client.lock().await = None;
            registry.register(
                "post_save_database_up",
                "1 when this scrape could query the database",
                ConstGauge::new(0i64),
            );
        }
    }
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        text = "# encoding failed\n".into();
    }
    text
}
