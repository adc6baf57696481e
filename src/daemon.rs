//! The daemon: migrations, the listener, the router and the ledger writer, started and
//! stopped together.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::capture::ledger::Listener;
use crate::capture::ledger::query::Rotation;
use crate::config::Config;
use crate::db::{self, DbError};
use crate::dispatch::claims::InFlight;
use crate::dispatch::outcome::write_outcomes;
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
        let metrics_stop = CancellationToken::new();
        let _metrics_stop = metrics_stop.clone().drop_guard();
        if let Some(addr) = self.config.daemon.metrics {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| DaemonError::Metrics { addr, source })?;
            let wal = crate::capture::wal::wanted(&self.config).then(|| self.wal_blocked());
            let endpoint = crate::metrics::Endpoint::new(Arc::clone(&self.stats), self.state(), wal, self.pg.clone());
            tracing::info!(%addr, "metrics endpoint listening");
            tokio::spawn(crate::metrics::serve(listener, Arc::new(endpoint), metrics_stop));
        }
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

        let lease = self.config.daemon.lease.map(crate::lease::Lease::new);
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let give_up = CancellationToken::new();
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
        let mut router_abort = abort.child_token();
        let (router_tx, router_rx) = watch::channel(Router::new(
            Arc::clone(&self.registry),
            outcome_tx.clone(),
            Arc::clone(&self.stats),
            stop.clone(),
            router_abort.clone(),
            lease.clone(),
        ));
        let retention = tokio::spawn(keep_ledger_small(self.pg.clone(), self.config.daemon.keep_handled, stop.clone()));
        let permits = Arc::new(Semaphore::new(self.config.daemon.max_in_flight.max(1)));
        let wal = crate::capture::wal::wanted(&self.config).then(|| {
            tokio::spawn(
                crate::capture::wal::WalCapture {
                    pg: self.pg.session().clone(),
                    config: Arc::clone(&self.config),
                    router: Some(router_rx.clone()),
                    permits: Arc::clone(&permits),
                    stats: Arc::clone(&self.stats),
                    stop: stop.clone(),
                    lease: lease.clone(),
                    blocked: self.wal_blocked.clone(),
                }
                .run(),
            )
        });
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

        {
            let run = listener.run();
            tokio::pin!(run);
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut run => break,
                    () = &mut shutdown => {
                        self.state.send_replace(State::Stopping);
                        tracing::info!("stopping: no new events; waiting for running handlers");
                        stop.cancel();
                        run.await;
                        break;
                    }
                    Some((registry, done)) = self.reload_rx.recv() => {
                        // The listener is not polled meanwhile: nothing new is dispatched until
                        // the old handlers are done, so one row's events stay in order.
                        let new_abort = abort.child_token();
                        let new = Router::new(
                            Arc::new(registry),
                            outcome_tx.clone(),
                            Arc::clone(&self.stats),
                            stop.clone(),
                            new_abort.clone(),
                            lease.clone(),
                        );
                        let old = router_tx.send_replace(new);
                        let old_abort = std::mem::replace(&mut router_abort, new_abort);
                        self.finish(&old, &old_abort).await;
                        tracing::info!("handlers replaced");
                        let _ = done.send(());
                    }
                }
            }
        }
        self.state.send_replace(State::Stopping);
        stop.cancel();
        let router = router_tx.borrow().clone();
        drop(router_tx);
        self.finish(&router, &router_abort).await;
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
        // The listener (and with it the last sender of outcomes) goes; the writer then flushes.
        drop(listener);
        drop(router);
        drop(outcome_tx);
        let flush = Duration::from_secs(5);
        let give_up_later = give_up.clone();
        tokio::spawn(async move {
            tokio::time::sleep(flush).await;
            give_up_later.cancel();
        });
        let _ = writer.await;
        if let Some(wal) = wal {
            let _ = wal.await;
        }
        let _ = retention.await;
        self.state.send_replace(State::Stopped);
        tracing::info!("stopped");
        Ok(())
    }

    /// Waits for `router`'s deliveries, at most `daemon.shutdown_grace`; then hands the rest
    /// back (they stay pending in the ledger).
    async fn finish(&self, router: &Router, abort: &CancellationToken) {
        let grace = self.config.daemon.shutdown_grace;
        if tokio::time::timeout(grace, router.drained()).await.is_err() {
            tracing::warn!(grace = ?grace, "handlers still running after the grace period; handing their events back");
            abort.cancel();
            router.drained().await;
        }
    }
}

/// The newest migration applied to the `post_save` schema; `None` when there is no schema yet
/// or the role may not read its history.
async fn schema_version(client: &tokio_postgres::Client) -> Option<i64> {
    let sql = "SELECT CASE WHEN to_regclass('post_save.schema_history') IS NULL THEN NULL \
               ELSE (SELECT max(version)::bigint FROM post_save.schema_history) END";
    client.query_one(sql, &[]).await.ok()?.get(0)
}

/// Deletes acknowledged ledger rows handled more than `keep` ago, every minute (or every `keep`,
/// when shorter), on a connection of its own so a long DELETE never delays the listener.
async fn keep_ledger_small(pg: crate::db::Settings, keep: Duration, stop: CancellationToken) {
    let period = crate::capture::ledger::query::rotation_period(keep);
    let every = (period / 2).clamp(Duration::from_millis(250), Duration::from_secs(60));
    let mut client = None;
    let mut not_before = tokio::time::Instant::now();
    let mut blocked = Duration::ZERO;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        if tokio::time::Instant::now() < not_before {
            continue;
        }
        if client.is_none() {
            match db::connect(&pg).await {
                Ok(connected) => client = Some(connected),
                Err(e) => {
                    tracing::warn!(error = %e, "ledger retention cannot connect; will retry");
                    continue;
                }
            }
        }
        let Some((c, _)) = client.as_mut() else { continue };
        match crate::capture::ledger::query::rotate(c, keep, period).await {
            Ok(Rotation::NotDue { wait }) => not_before = tokio::time::Instant::now() + wait,
            Ok(Rotation::Rotated { slot, freed, moved }) => {
                blocked = Duration::ZERO;
                tracing::debug!(slot, freed_bytes = freed, moved, "ledger partition emptied; writes go to it now");
            }
            Ok(Rotation::Blocked { slot, holders }) => {
                // Checked again after 1 s, 2 s, 4 s … up to a minute: a warning each time.
                blocked = (blocked * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                not_before = tokio::time::Instant::now() + blocked;
                tracing::warn!(
                    partition = %format!("post_save.event_{slot}"),
                    holders = %holders,
                    retry_in = ?blocked,
                    "ledger retention waits: another session holds a lock on the partition to be \
                     emptied (an open transaction that read the ledger); the ledger grows until it ends"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "ledger retention failed; will retry");
                if let Some((_, task)) = client.take() {
                    task.abort();
                }
            }
        }
    }
}
