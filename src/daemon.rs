//! The daemon: wires the capture sources, dispatch and the handlers together, and runs them in
//! phases: the metrics endpoint, the schema, the parts started, serving until told to stop,
//! and one way to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::capture::ledger::Listener;
use crate::config::Config;
use crate::db::{self, DbError};
use crate::dispatch::claims::InFlight;
use crate::dispatch::outcome::{Outcome, write_outcomes};
use crate::dispatch::router::Router;
use crate::install;
use crate::registry::Registry;
use crate::stats::Stats;

/// What the daemon is doing, for readiness and status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Connecting and migrating.
    Starting,
    /// LISTEN works and the backlog has been caught up.
    Listening {
        /// Watched tables in the config.
        tables: usize,
    },
    /// Another daemon holds the dispatch lease (`daemon.lease`); this one waits to take over.
    Standby,
    /// The connection was lost; waiting to reconnect.
    Reconnecting {
        /// Consecutive failed attempts.
        attempt: u32,
    },
    /// Shutting down.
    Stopping,
    /// Stopped.
    Stopped,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Connecting, migrating or checking the database failed at start.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The metrics endpoint could not listen on `daemon.metrics`.
    #[error("the metrics endpoint cannot listen on {addr}")]
    Metrics {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The post-save daemon: build it from a config and a registry, then [`Daemon::run`] it.
///
/// ```no_run
/// use post_save::{Config, Daemon, Receiver, Registry, TableName};
/// use post_save::handler::{handler_fn, HandlerError};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::parse(r#"
///     [[watch]]
///     table = "public.shop_order"
/// "#)?;
/// let mut registry = Registry::from_config(&config)?;
/// // The `@receiver(post_save, sender=Order)` of Rust programs:
/// let orders = TableName::new("public", "shop_order");
/// registry.register(
///     Receiver::new("send-confirmation").sender(&orders).created(true),
///     handler_fn(|event| async move {
///         println!("new order {}", event.instance["id"]);
///         Ok::<(), HandlerError>(())
///     }),
/// )?;
/// let pg = post_save::db::resolve(None)?;
/// Daemon::new(config, registry, pg).run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(())
/// # }
/// ```
pub struct Daemon {
    config: Arc<Config>,
    registry: Arc<Registry>,
    pg: crate::db::Settings,
    stats: Arc<Stats>,
    state: watch::Sender<State>,
    /// What blocks the WAL reader, while something does.
    wal_blocked: watch::Sender<Option<crate::capture::wal::Blocked>>,
    alive: watch::Sender<Instant>,
    heartbeat: Duration,
    reload_tx: mpsc::UnboundedSender<Reload>,
    reload_rx: mpsc::UnboundedReceiver<Reload>,
}

/// A new handler set, and who to tell once it is in use.
type Reload = (Registry, oneshot::Sender<()>);

/// Longest idle wait between two round trips with the database, by default.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Replaces a running daemon's handlers; see [`Daemon::reloader`].
#[derive(Debug, Clone)]
pub struct Reloader(mpsc::UnboundedSender<Reload>);

impl Reloader {
    /// Routes events dispatched from now on to the handlers of `registry`. Deliveries already
    /// running finish on the old handlers first (so one row's events stay in order); returns
    /// when the new handlers are in use, or `false` when the daemon has stopped.
    pub async fn replace(&self, registry: Registry) -> bool {
        let (done, applied) = oneshot::channel();
        self.0.send((registry, done)).is_ok() && applied.await.is_ok()
    }
}

impl Daemon {
    /// A daemon for `config`, running the handlers of `registry`, connecting with `pg`.
    pub fn new(config: Config, registry: Registry, pg: impl Into<crate::db::Settings>) -> Self {
        let (reload_tx, reload_rx) = mpsc::unbounded_channel();
        Daemon {
            config: Arc::new(config),
            registry: Arc::new(registry),
            pg: pg.into(),
            stats: Arc::new(Stats::default()),
            state: watch::Sender::new(State::Starting),
            wal_blocked: watch::Sender::new(None),
            alive: watch::Sender::new(Instant::now()),
            heartbeat: HEARTBEAT,
            reload_tx,
            reload_rx,
        }
    }

    /// The longest the listener stays idle without a round trip to the database (default 1 s);
    /// keep it well below a watchdog interval.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every.max(Duration::from_millis(10));
        self
    }

    /// Follows when the listener last completed a round trip with the database (or, while the
    /// handlers are saturated, last checked in): the proof of life for a watchdog.
    pub fn alive(&self) -> watch::Receiver<Instant> {
        self.alive.subscribe()
    }

    /// A handle that swaps the handlers of the running daemon.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.reload_tx.clone())
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Follows the daemon's state.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Follows what blocks the WAL reader (`capture = "wal"`): something retrying cannot fix,
    /// such as `wal_level` not logical or a slot another process streams; `None` while
    /// nothing does.
    pub fn wal_blocked(&self) -> watch::Receiver<Option<crate::capture::wal::Blocked>> {
        self.wal_blocked.subscribe()
    }

    /// Runs until `shutdown` completes, then stops taking new work, lets running handlers
    /// finish within `daemon.shutdown_grace`, hands back the rest (they stay pending in the
    /// ledger) and writes the last acknowledgements.
    ///
    /// Fails only at start: when the database cannot be reached or migrated. Later connection
    /// losses are retried forever.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        // served until `run` returns, whichever way
        let _metrics = self.serve_metrics().await?;
        self.prepare_schema().await?;
        let running = self.start();
        self.serve(&running, shutdown).await;
        self.stop(running).await;
        Ok(())
    }

    /// Starts the metrics endpoint, when one is configured; it stops when the guard drops.
    async fn serve_metrics(&self) -> Result<Option<DropGuard>, DaemonError> {
        let Some(addr) = self.config.daemon.metrics else { return Ok(None) };
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| DaemonError::Metrics { addr, source })?;
        let wal = crate::capture::wal::wanted(&self.config).then(|| self.wal_blocked());
        let endpoint = crate::metrics::Endpoint::new(Arc::clone(&self.stats), self.state(), wal, self.pg.clone());
        tracing::info!(%addr, "metrics endpoint listening");
        let stop = CancellationToken::new();
        tokio::spawn(crate::metrics::serve(listener, Arc::new(endpoint), stop.clone()));
        Ok(Some(stop.drop_guard()))
    }

    /// Migrates the `post_save` schema when it is behind, and warns of triggers that differ
    /// from the config.
    async fn prepare_schema(&self) -> Result<(), DaemonError> {
        // on the direct connection: migrating holds a session lock
        let (mut client, task) = db::connect(self.pg.session()).await?;
        // A role that runs without owning the schema (`post-save grants`) may read its version
        // but not migrate it: only a schema that is behind is migrated.
        if schema_version(&client).await.is_some_and(|v| v >= db::latest_migration()) {
            tracing::debug!("post_save schema is up to date");
        } else {
            tracing::info!("applying post_save schema migrations");
            let applied = db::migrate(&mut client).await.inspect_err(|_| {
                tracing::error!(
                    "the post_save schema is missing, behind, or unreadable for this role: run `post-save migrate` \
                     as the schema's owner, and grant this role what `post-save grants --role` prints"
                );
            })?;
            if !applied.is_empty() {
                tracing::info!(applied = ?applied, "migrations applied");
            }
        }
        match install::check(&client, &self.config).await {
            Ok(drift) => drift.iter().for_each(
                |d| tracing::warn!(drift = %d, "triggers differ from the config; run `post-save triggers install`"),
            ),
            Err(e) => tracing::warn!(error = %e, "could not compare triggers with the config"),
        }
        drop(client);
        task.abort();
        Ok(())
    }

    /// Wires the parts and starts them: the outcome writer, the router, ledger retention, the
    /// WAL reader (when a watch asks for it) and the ledger session.
    fn start(&self) -> Running {
        let lease = self.config.daemon.lease.map(crate::lease::Lease::new);
        let stop = CancellationToken::new();
        let give_up = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();
        let (client_tx, client_rx) = watch::channel(None);
        let in_flight = Arc::new(InFlight::default());
        let writer = tokio::spawn(write_outcomes(
            outcome_rx,
            client_rx,
            Arc::clone(&in_flight),
            self.config.daemon.clone(),
            Arc::clone(&self.stats),
            give_up.clone(),
        ));
        let router = self.router(Arc::clone(&self.registry), &outcome_tx, &stop, lease.as_ref());
        let (router_tx, router_rx) = watch::channel(router);
        tasks.spawn(crate::capture::ledger::retention::keep_small(
            self.pg.clone(),
            self.config.daemon.keep_handled,
            stop.clone(),
        ));
        let permits = Arc::new(Semaphore::new(self.config.daemon.max_in_flight.max(1)));
        if crate::capture::wal::wanted(&self.config) {
            let wal = crate::capture::wal::WalCapture {
                pg: self.pg.session().clone(),
                config: Arc::clone(&self.config),
                router: Some(router_rx.clone()),
                permits: Arc::clone(&permits),
                stats: Arc::clone(&self.stats),
                stop: stop.clone(),
                lease: lease.clone(),
                blocked: self.wal_blocked.clone(),
            };
            tasks.spawn(wal.run());
        }
        let listener = Listener {
            pg: self.pg.clone(),
            config: Arc::clone(&self.config),
            router: router_rx,
            in_flight,
            permits,
            stats: Arc::clone(&self.stats),
            work_client: client_tx,
            outcomes: outcome_tx.clone(),
            state: self.state.clone(),
            stop: stop.clone(),
            alive: self.alive.clone(),
            heartbeat: self.heartbeat,
            retries: Arc::default(),
            lease: lease.clone(),
            parts: std::sync::Mutex::default(),
        };
        Running { stop, give_up, tasks, writer, router_tx, outcome_tx, lease, listener }
    }

    fn router(
        &self,
        registry: Arc<Registry>,
        outcomes: &mpsc::UnboundedSender<Outcome>,
        stop: &CancellationToken,
        lease: Option<&Arc<crate::lease::Lease>>,
    ) -> Arc<Router> {
        Router::new(registry, outcomes.clone(), Arc::clone(&self.stats), stop.clone(), lease.cloned())
    }

    /// Runs the ledger session until `shutdown` (or until it ends by itself), replacing the
    /// handlers when asked.
    async fn serve(&mut self, running: &Running, shutdown: impl Future<Output = ()>) {
        let session = running.listener.run();
        tokio::pin!(session);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut session => return,
                () = &mut shutdown => {
                    self.state.send_replace(State::Stopping);
                    tracing::info!("stopping: no new events; waiting for running handlers");
                    running.stop.cancel();
                    session.await;
                    return;
                }
                Some((registry, done)) = self.reload_rx.recv() => {
                    // The session is not polled meanwhile: nothing new is dispatched until the
                    // old handlers are done, so one row's events stay in order.
                    let new = self.router(Arc::new(registry), &running.outcome_tx, &running.stop, running.lease.as_ref());
                    let old = running.router_tx.send_replace(new);
                    old.finish(self.config.daemon.shutdown_grace).await;
                    tracing::info!("handlers replaced");
                    let _ = done.send(());
                }
            }
        }
    }

    /// The one way out: stop taking work, let the handlers finish (or hand their events back),
    /// give the lease up, flush the last outcomes, and wait for every task.
    async fn stop(&self, running: Running) {
        let Running { stop, give_up, tasks, writer, router_tx, outcome_tx, lease, listener } = running;
        self.state.send_replace(State::Stopping);
        stop.cancel();
        let router = router_tx.borrow().clone();
        drop(router_tx);
        router.finish(self.config.daemon.shutdown_grace).await;
        // Only now that nothing runs here any more may a standby take over.
        if let Some(lease) = lease.as_ref().filter(|l| l.held()) {
            let released = async {
                let (client, _task) = db::connect(&self.pg).await.ok()?;
                lease.release(&client).await.ok()
            };
            if tokio::time::timeout(Duration::from_secs(2), released).await.ok().flatten().is_some() {
                tracing::info!("lease released");
            }
        }
        // The session, the router and this last sender of outcomes go; the writer then writes
        // what is left and ends. What it cannot write within FLUSH stays pending: given up.
        drop((listener, router, outcome_tx));
        tokio::pin!(writer);
        if tokio::time::timeout(FLUSH, &mut writer).await.is_err() {
            give_up.cancel();
            let _ = writer.await;
        }
        tasks.close();
        tasks.wait().await;
        self.state.send_replace(State::Stopped);
        tracing::info!("stopped");
    }
}

/// How long the outcome writer may take to write the last outcomes when stopping.
const FLUSH: Duration = Duration::from_secs(5);

/// The parts of a started daemon, and what stops them.
struct Running {
    /// Stops taking new work (the one signal to stop).
    stop: CancellationToken,
    /// Tells the outcome writer to stop retrying a write.
    give_up: CancellationToken,
    /// Retention and the WAL reader: waited for at the end (the one signal that all is done).
    tasks: TaskTracker,
    writer: tokio::task::JoinHandle<()>,
    router_tx: watch::Sender<Arc<Router>>,
    outcome_tx: mpsc::UnboundedSender<Outcome>,
    lease: Option<Arc<crate::lease::Lease>>,
    listener: Listener,
}

/// The newest migration applied to the `post_save` schema; `None` when there is no schema yet
/// or the role may not read its history.
async fn schema_version(client: &tokio_postgres::Client) -> Option<i64> {
    let sql = "SELECT CASE WHEN to_regclass('post_save.schema_history') IS NULL THEN NULL \
               ELSE (SELECT max(version)::bigint FROM post_save.schema_history) END";
    client.query_one(sql, &[]).await.ok()?.get(0)
}
