//! `post-save run` as a test's peer: the real binary with `--log-format json`, whose `log`
//! handlers ([`observer_handlers`]) write the events the test waits for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::support::PATIENCE;
use crate::support::child::{self, Daemon, post_save_ok};
use crate::support::db::TestDb;

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

/// A `post-save run` process: the real binary with `--log-format json`, its stderr read by a
/// thread of its own. Every line a `log` handler writes ("save event", see [`observer_handlers`])
/// is an event, as that handler saw it. Dropping it kills the process.
pub struct BinaryDaemon {
    process: Option<Daemon>,
    events: mpsc::UnboundedReceiver<Value>,
    /// Every line the daemon logged that is not an event, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
    /// The config file the daemon runs.
    pub config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

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
        let mut command = child::command(&config, &db.conninfo);
        command.envs(env.iter().copied());
        let (tx, events) = mpsc::unbounded_channel();
        let (listening_tx, mut listening) = watch::channel(false);
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&log);
        let process = Daemon::start(command, move |line| {
            let parsed: Value = serde_json::from_str(&line).unwrap_or_default();
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
            true
        });
        let mut daemon = BinaryDaemon { process: Some(process), events, log, config, _dir: dir };
        if tokio::time::timeout(PATIENCE, listening.wait_for(|l| *l)).await.map(|r| r.is_ok()) != Ok(true) {
            daemon.process = None;
            panic!("post-save run did not start listening within {PATIENCE:?}:\n{}", daemon.log_text());
        }
        daemon
    }

    /// The next event, or a panic (with the daemon's log) after [`PATIENCE`].
    pub async fn next(&mut self) -> Value {
        match tokio::time::timeout(PATIENCE, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("post-save run stopped:\n{}", self.log_text()),
            Err(_) => panic!("no event within {PATIENCE:?}; the daemon's log:\n{}", self.log_text()),
        }
    }

    /// Events until `done` holds for all received so far, or a panic after [`PATIENCE`] naming
    /// `what`, with the events received and the daemon's log.
    pub async fn until(&mut self, what: &str, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut events = Vec::new();
        while !done(&events) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => events.push(event),
                outcome => {
                    let why = if outcome.is_ok() { "the daemon stopped" } else { "timed out" };
                    let last = &events[events.len().saturating_sub(20)..];
                    let shown: Vec<String> = last.iter().map(Value::to_string).collect();
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
    pub async fn next_before(&mut self, deadline: tokio::time::Instant) -> Option<Value> {
        tokio::time::timeout_at(deadline, self.events.recv()).await.ok().flatten()
    }

    /// The events already received and not yet taken, without waiting.
    pub fn drain(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    /// Everything the daemon logged but its events.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// The daemon's log lines (JSON) whose message starts with `start`, oldest first.
    pub fn logged(&self, start: &str) -> Vec<Value> {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with(start)))
            .collect()
    }

    /// Waits until the daemon has logged a line starting with `start`; returns the first.
    pub async fn wait_logged(&self, start: &str) -> Value {
        self.wait_logged_times(start, 1).await
    }

    /// Waits until the daemon has logged `times` lines starting with `start`; returns the last
    /// of them.
    pub async fn wait_logged_times(&self, start: &str, times: usize) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self.logged(start).into_iter().nth(times - 1) {
                return line;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {start:?} logged {times} times within {PATIENCE:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the daemon with SIGTERM and asserts that it exits 0.
    pub async fn stop(mut self) {
        let mut process = self.process.take().expect("running");
        process.signal(Signal::SIGTERM);
        let status = process.wait(PATIENCE).await;
        assert!(status.success(), "post-save run exited {status}:\n{}", self.log_text());
    }
}
