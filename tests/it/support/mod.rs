//! An embedded daemon for integration tests: real PostgreSQL, the real listener, router and
//! ledger writer, with a collecting handler registered through the library API.
//!
//! The other helpers are its modules: [`db`] (a database of each test's own), [`child`] (the
//! real binary as a child process), [`logd`] (the real binary as a peer).
#![allow(dead_code)]

pub mod child;
pub mod db;
pub mod logd;

use std::sync::Arc;
use std::time::Duration;

use post_save::handler::{HandlerError, handler_fn};
use post_save::{Config, Daemon, DaemonError, Receiver, Registry, SaveEvent, State, Stats, triggers};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::support::db::TestDb;

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
    post_save::db::migrate(&mut client).await.expect("migrate");
    triggers::install(&mut client, config).await.expect("install triggers");
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

    /// Stops the daemon gracefully and waits for it.
    pub async fn stop(mut self) {
        self.stop_inner().await;
    }

    /// Stops the daemon gracefully and returns the events delivered and not yet taken.
    #[allow(dead_code)]
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

/// The `[[handler]]`s a [`BinaryDaemon`] reads events from: `log` handlers writing every field
/// the tests look at, for post_save and, with `deletes`, post_delete (which needs a watch that
/// captures deletes).
pub fn observer_handlers(deletes: bool) -> String {
    let handler = |signal: &str| {
        format!(
            "\n[[handler]]\nname = \"observer-{signal}\"\nsignal = \"{signal}\"\nkind = \"log\"\n\
             fields = [\"id\", \"signal\", \"sender\", \"op\", \"created\", \"pk\", \"instance\", \"update_fields\"]\n"
        )
    };
    let mut text = handler("post_save");
    if deletes {
        text.push_str(&handler("post_delete"));
    }
    text
}

/// Runs the real `post-save` binary as [`post_save_on`] does and panics, with its output, unless
/// it exits 0.
pub fn post_save_ok(config: &std::path::Path, db: &TestDb, args: &[&str]) -> std::process::Output {
    let out = post_save_on(config, db, args);
    assert!(
        out.status.success(),
        "post-save {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `post-save run` process: the real binary with `--log-format json`, its stderr read by a
/// thread of its own. Every line a `log` handler writes ("save event", see [`observer_handlers`])
/// is an event, as that handler saw it. Dropping it kills the process.
pub struct BinaryDaemon {
    child: Option<std::process::Child>,
    events: mpsc::UnboundedReceiver<serde_json::Value>,
    /// Every line the daemon logged that is not an event, for failure messages.
    log: Arc<std::sync::Mutex<Vec<String>>>,
    /// The config file the daemon runs.
    pub config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Environment variables that would change what the binary does if inherited from the test run.
const BINARY_SCRUBBED_ENV: &[&str] = &[
    "POST_SAVE_CONFIG",
    "POST_SAVE_LOG_FORMAT",
    "POST_SAVE_THREADS",
    "DATABASE_URL",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGSERVICE",
    "RUST_LOG",
    "JOURNAL_STREAM",
];

impl BinaryDaemon {
    /// Writes `toml` to a config file, creates the `post_save` schema and installs the triggers
    /// with the binary (`migrate`, `triggers install`), then starts `post-save run` and waits
    /// until it listens.
    pub async fn install_and_start(db: &TestDb, toml: &str) -> BinaryDaemon {
        BinaryDaemon::launch(db, toml, &["migrate", "triggers install"], &[]).await
    }

    /// As [`BinaryDaemon::install_and_start`], running only the commands of `setup` first (each
    /// split on spaces: `migrate`, `triggers install`), and `post-save run` with `env` added.
    pub async fn launch(db: &TestDb, toml: &str, setup: &[&str], env: &[(&str, &str)]) -> BinaryDaemon {
        let dir = tempfile::Builder::new().prefix("post-save-daemon-").tempdir().expect("temp dir");
        let config = dir.path().join("post-save.toml");
        std::fs::write(&config, toml).expect("writing the config");
        for command in setup {
            post_save_ok(&config, db, &command.split(' ').collect::<Vec<_>>());
        }
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_post-save"));
        command.arg("--config").arg(&config).args(["--database-url", &db.conninfo, "--log-format", "json", "run"]);
        for var in BINARY_SCRUBBED_ENV {
            command.env_remove(var);
        }
        command.envs(env.iter().copied());
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("could not start post-save run");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, events) = mpsc::unbounded_channel();
        let (listening_tx, mut listening) = watch::channel(false);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = Arc::clone(&log);
        // A thread, not a task: the daemon must never block on a full pipe while the test's
        // runtime is busy in a blocking call (psql, a Python process).
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                match parsed["message"].as_str() {
                    Some("save event") => {
                        let text = parsed["event"].as_str().unwrap_or_default();
                        let event = serde_json::from_str(text)
                            .unwrap_or_else(|e| panic!("a log handler wrote an event that is not JSON ({e}): {line}"));
                        let _ = tx.send(event);
                    }
                    Some("listening") => {
                        let _ = listening_tx.send(true);
                        kept.lock().expect("log lock").push(line);
                    }
                    _ => kept.lock().expect("log lock").push(line),
                }
            }
        });
        let mut daemon = BinaryDaemon { child: Some(child), events, log, config, _dir: dir };
        if tokio::time::timeout(PATIENCE, listening.wait_for(|l| *l)).await.map(|r| r.is_ok()) != Ok(true) {
            daemon.exited_or_kill();
            panic!("post-save run did not start listening within {PATIENCE:?}:\n{}", daemon.log_text());
        }
        daemon
    }

    /// The next event, or a panic (with the daemon's log) after [`PATIENCE`].
    pub async fn next(&mut self) -> serde_json::Value {
        match tokio::time::timeout(PATIENCE, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("post-save run stopped:\n{}", self.log_text()),
            Err(_) => panic!("no event within {PATIENCE:?}; the daemon's log:\n{}", self.log_text()),
        }
    }

    /// Events until `done` holds for all received so far, or a panic after [`PATIENCE`] naming
    /// `what`, with the events received and the daemon's log.
    pub async fn until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut events = Vec::new();
        while !done(&events) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => events.push(event),
                outcome => {
                    let why = if outcome.is_ok() { "the daemon stopped" } else { "timed out" };
                    let last = &events[events.len().saturating_sub(20)..];
                    let shown: Vec<String> = last.iter().map(serde_json::Value::to_string).collect();
                    panic!(
                        "{why} waiting for {what}; {} events, the last {}:\n{}\nthe daemon's log:\n{}",
                        events.len(),
                        last.len(),
                        shown.join("\n"),
                        self.log_text()
                    );
                }
            }
        }
        events
    }

    /// The next event, or `None` once `deadline` has passed (or the daemon has stopped).
    pub async fn next_before(&mut self, deadline: tokio::time::Instant) -> Option<serde_json::Value> {
        tokio::time::timeout_at(deadline, self.events.recv()).await.ok().flatten()
    }

    /// The events already received and not yet taken, without waiting.
    pub fn drain(&mut self) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    /// Everything the daemon logged but its events.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Stops the daemon with SIGTERM and asserts that it exits 0.
    pub async fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let waited = tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || child.wait())).await;
        let status = waited.expect("post-save run did not stop on SIGTERM").expect("wait panicked").expect("wait");
        assert!(status.success(), "post-save run exited {status}:\n{}", self.log_text());
    }

    /// Kills the process unless it has exited already.
    fn exited_or_kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for BinaryDaemon {
    fn drop(&mut self) {
        self.exited_or_kill();
    }
}
