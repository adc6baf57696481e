//! What the integration tests share: the database of each test ([`db`]), the daemon embedded
//! through the library API (here), the real binary as a child process ([`child`]) and as a peer
//! whose log handlers write the events ([`binary`], [`logd`]), and waiting for things with a
//! deadline instead of sleeping.

pub mod binary;
pub mod child;
pub mod db;
pub mod logd;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use post_save::handler::{HandlerError, handler_fn};
use post_save::testing::install;
use post_save::{Config, Daemon, DaemonError, Receiver, Registry, SaveEvent, State, Stats};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

pub use binary::{BinaryDaemon, observer_handlers};
pub use child::{post_save_ok, post_save_on};
use db::TestDb;

/// How long a test waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A save into the `shop_order` table most tests watch, for [`Running::assert_quiet_until`].
pub const SHOP_BARRIER: &str = "INSERT INTO shop_order (user_id, product) VALUES (0, 'barrier')";

/// Whether `e` is the event of [`SHOP_BARRIER`].
pub fn is_shop_barrier(e: &SaveEvent) -> bool {
    e.sender == "public.shop_order" && e.instance["product"] == "barrier"
}

/// How often a wait polls.
const POLL: Duration = Duration::from_millis(50);

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
    post_save::db::migrate(&mut client).await.expect("migrate");
    install::install(&mut client, config).await.expect("install triggers");
}

/// Parses `toml` (panicking on errors) with fast retries for tests.
pub fn config(toml: &str) -> Config {
    Config::parse(toml).unwrap_or_else(|e| panic!("test config: {e}"))
}

/// Starts a daemon on `db` running the config's handlers plus a `collector` that receives every
/// post_save and post_delete event, and waits until it listens.
pub async fn start(db: &TestDb, mut config: Config) -> Running {
    let pg = post_save::db::resolve(Some(&db.conninfo)).expect("conninfo");
    config.handlers.iter_mut().for_each(|h| h.kind.default_database(&pg));
    let mut registry = Registry::from_config(&config).expect("handlers build");
    start_with(db, config, &mut registry).await
}

/// As [`start`], with extra handlers already in `registry`.
pub async fn start_with(db: &TestDb, config: Config, registry: &mut Registry) -> Running {
    let pg = post_save::db::resolve(Some(&db.conninfo)).expect("conninfo");
    start_via(pg, config, registry).await
}

/// As [`start_with`], connecting with `pg` (through a proxy, say).
pub async fn start_via(pg: impl Into<post_save::db::Settings>, config: Config, registry: &mut Registry) -> Running {
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

    /// Asserts that nothing arrives but the barrier: runs `barrier` with psql (a save the daemon
    /// delivers, made after everything that must cause no event) and asserts that the next event
    /// is the barrier's (`is_barrier` holds) and that, once the ledger has nothing left to handle,
    /// no other event is waiting.
    ///
    /// The daemon dispatches events in ledger (commit) order, and acknowledges a ledger row only
    /// once its handlers are done: an event of anything saved before the barrier comes before
    /// it, or at the latest by the time the ledger is empty. No fixed wait needed.
    pub async fn assert_quiet_until(&mut self, db: &TestDb, barrier: &str, is_barrier: impl Fn(&SaveEvent) -> bool) {
        db.psql_ok(barrier);
        let e = self.next().await;
        assert!(is_barrier(&e), "unexpected event before the barrier ({barrier}): {}", e.to_json());
        wait_for_sql(db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
        if let Ok(e) = self.events.try_recv() {
            panic!("unexpected event after the barrier ({barrier}): {}", e.to_json());
        }
    }

    /// Stops the daemon gracefully and waits for it.
    pub async fn stop(mut self) {
        self.stop_inner().await;
    }

    /// Stops the daemon gracefully and returns the events delivered and not yet taken.
    pub async fn stop_collecting(mut self) -> Vec<SaveEvent> {
        self.stop_inner().await;
        let mut left = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            left.push(e);
        }
        left
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

/// Waits until the one bigint `sql` returns on `db` is `expected` (polling a query), or panics
/// after [`PATIENCE`].
pub async fn wait_for_sql(db: &TestDb, sql: &str, expected: i64) {
    wait_for_count(&db.client().await, sql, expected, PATIENCE).await;
}

/// Waits until the one bigint `sql` returns on `client` is `expected` (polling a query), or
/// panics after `within`.
pub async fn wait_for_count(client: &Client, sql: &str, expected: i64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = db::query_i64(client, sql).await;
        if got == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "`{sql}` stayed {got}, expected {expected}");
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `check` (polled, async) holds, or panics after [`PATIENCE`] naming `what`.
pub async fn wait_until<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// The first `Some` of `check` (polled), or a panic after [`PATIENCE`] naming `what`.
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The lines of a file; none while it does not exist.
pub fn file_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|t| t.lines().map(str::to_owned).collect()).unwrap_or_default()
}

/// A TCP port on 127.0.0.1 nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// `GET <path>` on 127.0.0.1:`port` (the daemon's metrics endpoint): the whole response.
pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to metrics");
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes()).await.expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response");
    response
}

/// `GET /metrics` on the daemon's endpoint: the body of a 200 answer.
pub async fn scrape(port: u16) -> String {
    let response = http_get(port, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
}

/// The value of the first sample line of `text` starting with `prefix`.
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
}
