//! The Prometheus endpoint of a running daemon: per-handler delivery counts and durations, the
//! ledger backlog, the NOTIFY queue; loopback only. (The rogue-listener case is in doctor.rs,
//! on a private cluster.)

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use post_save::config::RetryPolicy;
use post_save::handler::{HandlerError, handler_fn};
use post_save::{Config, Receiver, Registry, SaveEvent, db};

use crate::support::db::TestDb;
use crate::support::{PATIENCE, config, free_port, http_get, install, sample, start_via};

const TABLE: &str = "CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)";

#[tokio::test]
async fn deliveries_per_handler_and_the_backlog_are_exposed() {
    let db = TestDb::new().await;
    db.psql_ok(TABLE);
    let port = free_port();
    let text = format!(
        "[daemon]\nmetrics = \"127.0.0.1:{port}\"\n\n[[watch]]\ntable = \"public.item\"\n\n\
         [[handler]]\nname = \"flaky\"\nsender = \"public.item\"\nkind = \"log\"\n"
    );
    let cfg: Config = config(&text);
    install(&db, &cfg).await;
    // A handler whose first attempt at each event fails.
    let mut registry = Registry::new();
    let seen: Arc<Mutex<HashSet<i64>>> = Arc::default();
    let policy =
        RetryPolicy { attempts: 3, backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(50) };
    registry
        .register(
            Receiver::new("flaky").retry(policy),
            handler_fn(move |e: SaveEvent| {
                let first = seen.lock().unwrap().insert(e.id.unwrap_or_default());
                async move { if first { Err(HandlerError::retry("first attempt fails")) } else { Ok(()) } }
            }),
        )
        .unwrap();
    let pg = db::resolve(Some(&db.conninfo)).unwrap();
    let mut daemon = start_via(pg, cfg, &mut registry).await;
    db.psql_ok("INSERT INTO item (name) SELECT 'n' || g FROM generate_series(1, 3) g");
    daemon.take(3).await;

    let deadline = Instant::now() + PATIENCE;
    let metrics = loop {
        let response = http_get(port, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        let handled = sample(&body, "post_save_deliveries_total{handler=\"flaky\",outcome=\"handled\"}");
        let backlog = sample(&body, "post_save_ledger_backlog_events ");
        if handled == Some(3.0) && backlog == Some(0.0) {
            break body;
        }
        assert!(Instant::now() < deadline, "metrics never settled:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sample(&metrics, "post_save_deliveries_total{handler=\"flaky\",outcome=\"failed\"}"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "post_save_deliveries_total{handler=\"flaky\",outcome=\"retried\"}"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "post_save_handler_duration_seconds_count{handler=\"flaky\"}"), Some(6.0), "{metrics}");
    assert_eq!(sample(&metrics, "post_save_listening "), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "post_save_database_up "), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "post_save_ledger_oldest_unacknowledged_seconds "), Some(0.0), "{metrics}");
    assert!(sample(&metrics, "post_save_notify_queue_usage_ratio ").is_some(), "{metrics}");
    assert!(sample(&metrics, "post_save_events_received_total ").unwrap() >= 3.0, "{metrics}");
    assert!(sample(&metrics, "post_save_ledger_bytes ").unwrap() > 0.0, "{metrics}");
    let age = sample(&metrics, "post_save_ledger_partition_age_seconds ").unwrap();
    assert!((0.0..600.0).contains(&age), "{metrics}");
    assert!(http_get(port, "/").await.starts_with("HTTP/1.1 404"));
    daemon.stop().await;
}

/// An event still running is unacknowledged: the backlog and the age of its oldest event.
#[tokio::test]
async fn a_held_event_is_backlog_until_it_is_acknowledged() {
    let db = TestDb::new().await;
    db.psql_ok(TABLE);
    let port = free_port();
    let cfg = config(&format!("[daemon]\nmetrics = \"127.0.0.1:{port}\"\n\n[[watch]]\ntable = \"public.item\"\n"));
    install(&db, &cfg).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let open = Arc::clone(&gate);
    let mut registry = Registry::new();
    registry
        .register(
            Receiver::new("held"),
            handler_fn(move |_| {
                let gate = Arc::clone(&open);
                async move {
                    let _ = gate.acquire().await;
                    Ok::<(), HandlerError>(())
                }
            }),
        )
        .unwrap();
    let pg = db::resolve(Some(&db.conninfo)).unwrap();
    let daemon = start_via(pg, cfg, &mut registry).await;
    db.psql_ok("INSERT INTO item (name) VALUES ('held')");
    let settled = |want_backlog: f64| async move {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let response = http_get(port, "/metrics").await;
            let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
            if sample(&body, "post_save_ledger_backlog_events ") == Some(want_backlog) {
                return body;
            }
            assert!(Instant::now() < deadline, "backlog never {want_backlog}:\n{body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = settled(1.0).await;
    let age = sample(&body, "post_save_ledger_oldest_unacknowledged_seconds ").expect("age");
    assert!(age >= 0.2, "oldest unacknowledged {age} s:\n{body}");
    gate.add_permits(1);
    let body = settled(0.0).await;
    assert_eq!(sample(&body, "post_save_ledger_oldest_unacknowledged_seconds "), Some(0.0), "{body}");
    daemon.stop().await;
}

#[test]
fn the_endpoint_listens_on_loopback_only() {
    let e = Config::parse("[daemon]\nliveness = \"5s\"\nmetrics = \"0.0.0.0:9187\"\n").unwrap_err();
    assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("daemon.metrics")), "{e}");
    assert!(e.message.contains("not a loopback address"), "{e}");
    let e = Config::parse("[daemon]\nmetrics = \"localhost\"\n").unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert!(Config::parse("[daemon]\nmetrics = \"[::1]:9187\"\n").is_ok());
}
