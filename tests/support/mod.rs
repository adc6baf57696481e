//! An embedded daemon for integration tests: real PostgreSQL, the real listener, router and
//! ledger writer, with a collecting handler registered through the library API.
//!
//! Use from a test crate with `mod common; mod support;`.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use post_save::handler::{HandlerError, handler_fn};
use post_save::{Config, Daemon, DaemonError, Receiver, Registry, SaveEvent, State, Stats, db, triggers};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::common::TestDb;

/// How long a test waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running embedded daemon.
pub struct Running {
    pub events: mpsc::UnboundedReceiver<SaveEvent>,
    pub stats: Arc<Stats>,
    pub state: watch::Receiver<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), DaemonError>>>,
}

/// Migrates the database and installs the triggers of `config`.
pub async fn install(db: &TestDb, config: &Config) {
    let mut client = db.client().await;
    db::migrate(&mut client).await.expect("migrate");
    triggers::install(&mut client, config).await.expect("install triggers");
}

/// Parses `toml` (panicking on errors) with fast retries for tests.
pub fn config(toml: &str) -> Config {
    Config::parse(toml).unwrap_or_else(|e| panic!("test config: {e}"))
}

/// Starts a daemon on `db` running the config's handlers plus a `collector` that receives every
/// post_save and post_delete event, and waits until it listens.
pub async fn start(db: &TestDb, mut config: Config) -> Running {
    let pg = db::resolve(Some(&db.conninfo)).expect("conninfo");
    config.handlers.iter_mut().for_each(|h| h.kind.default_database(&pg));
    let mut registry = Registry::from_config(&config).expect("handlers build");
    start_with(db, config, &mut registry).await
}

/// As [`start`], with extra handlers already in `registry`.
pub async fn start_with(db: &TestDb, config: Config, registry: &mut Registry) -> Running {
    let pg = db::resolve(Some(&db.conninfo)).expect("conninfo");
    start_via(pg, config, registry).await
}

/// As [`start_with`], connecting with `pg` (through a proxy, say).
pub async fn start_via(pg: tokio_postgres::Config, config: Config, registry: &mut Registry) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "post_save=info".into()),
        )
        .with_test_writer()
        .try_init();
    let (tx, events) = mpsc::unbounded_channel();
    for signal in [post_save::Signal::PostSave, post_save::Signal::PostDelete] {
        let tx = tx.clone();
        registry
            .register(
                Receiver::new(format!("collector-{}", signal.as_str())).signal(signal),
                handler_fn(move |event| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(event);
                        Ok::<(), HandlerError>(())
                    }
                }),
            )
            .expect("register collector");
    }
    let registry = std::mem::take(registry);
    let daemon = Daemon::new(config, registry, pg);
    let stats = daemon.stats();
    let mut state = daemon.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(daemon.run(async move {
        let _ = stopped.await;
    }));
    let listening = tokio::time::timeout(PATIENCE, state.wait_for(|s| matches!(s, State::Listening { .. })))
        .await
        .map(|r| r.map(drop));
    assert!(matches!(listening, Ok(Ok(_))), "daemon did not start listening");
    Running { events, stats, state, stop: Some(stop), task: Some(task) }
}

impl Running {
    /// The next event, or a panic after [`PATIENCE`].
    pub async fn next(&mut self) -> SaveEvent {
        tokio::time::timeout(PATIENCE, self.events.recv())
            .await
            .expect("timed out waiting for an event")
            .expect("event channel closed")
    }

    /// Exactly the next `n` events.
    pub async fn take(&mut self, n: usize) -> Vec<SaveEvent> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match tokio::time::timeout(PATIENCE, self.events.recv()).await {
                Ok(Some(e)) => out.push(e),
                _ => panic!("got {} of {n} events", out.len()),
            }
        }
        out
    }

    /// Asserts no event arrives within `quiet`.
    pub async fn assert_quiet(&mut self, quiet: Duration) {
        if let Ok(Some(e)) = tokio::time::timeout(quiet, self.events.recv()).await {
            panic!("unexpected event: {}", e.to_json());
        }
    }

    /// Stops the daemon gracefully and waits for it.
    pub async fn stop(mut self) {
        self.stop_inner().await;
    }

    async fn stop_inner(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(PATIENCE, task).await.expect("daemon did not stop");
            result.expect("daemon panicked").expect("daemon failed");
        }
    }
}

/// Waits until `check` holds for the ledger (polling a query), or panics after [`PATIENCE`].
pub async fn wait_for_sql(db: &TestDb, sql: &str, expected: i64) {
    let client = db.client().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got: i64 = client.query_one(sql, &[]).await.expect("query").get(0);
        if got == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "`{sql}` stayed {got}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the real `post-save` binary with `--config config --database-url <db>` and `args`,
/// `RUST_LOG` unset.
pub fn post_save_on(config: &std::path::Path, db: &TestDb, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_post-save"))
        .arg("--config")
        .arg(config)
        .args(["--database-url", &db.conninfo])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run post-save")
}
