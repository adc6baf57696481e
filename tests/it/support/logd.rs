//! The real `post-save run` binary as a test peer: its `log` handlers write every event field
//! as JSON lines, which [`LogDaemon`] reads as the events a test waits for.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::support::PATIENCE;
use crate::support::child::{self, Daemon};
use crate::support::db::TestDb;

/// The log handlers a [`LogDaemon`] reads events from: one per signal (the `post_delete`
/// one only when `deletes`, as a config without a watch capturing deletes refuses it), each
/// writing every event field.
pub fn log_handlers(deletes: bool) -> String {
    let fields: Vec<String> = post_save::event::EVENT_FIELDS.iter().map(|f| format!("\"{f}\"")).collect();
    let fields = fields.join(", ");
    let mut toml = format!("[[handler]]\nname = \"saves\"\nkind = \"log\"\nfields = [{fields}]\n");
    if deletes {
        toml.push_str(&format!(
            "[[handler]]\nname = \"deletes\"\nsignal = \"post_delete\"\nkind = \"log\"\nfields = [{fields}]\n"
        ));
    }
    toml
}

/// A TOML basic string holding `text`, escaped: quotes, backslashes, newlines and other
/// control characters.
pub fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What a [`LogDaemon`] wrote on stderr: an event of the log handlers, or any other line.
enum DaemonLine {
    Event(serde_json::Value),
    Other(String),
}

/// The real `post-save run` binary (`--log-format json`) against a test database; the events
/// come from the log handlers of [`log_handlers`], parsed from its stderr. Killed when dropped,
/// so a failing test leaves none behind.
pub struct LogDaemon {
    process: Daemon,
    lines: mpsc::UnboundedReceiver<DaemonLine>,
    /// The lines that were not events, kept for failure messages.
    other: Vec<String>,
}

impl LogDaemon {
    /// Starts `post-save --config <config> --database-url <db> --log-format json run` and waits
    /// until it listens (a notify-mode save made before that is lost by design).
    pub async fn start(config: &std::path::Path, db: &TestDb) -> LogDaemon {
        LogDaemon::start_on(config, &db.conninfo).await
    }

    /// As [`LogDaemon::start`], connecting with `conninfo` (another role, for example).
    pub async fn start_on(config: &std::path::Path, conninfo: &str) -> LogDaemon {
        let (tx, lines) = mpsc::unbounded_channel();
        let process =
            Daemon::start(child::command(config, conninfo), move |text| tx.send(parse_daemon_line(text)).is_ok());
        let mut daemon = LogDaemon { process, lines, other: Vec::new() };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, daemon.lines.recv()).await {
                Ok(Some(DaemonLine::Other(text))) => {
                    let listening = serde_json::from_str::<serde_json::Value>(&text)
                        .is_ok_and(|line| line["message"] == "listening");
                    daemon.other.push(text);
                    if listening {
                        return daemon;
                    }
                }
                Ok(Some(DaemonLine::Event(event))) => panic!("an event before the daemon listened: {event}"),
                Ok(None) => panic!("post-save exited before listening:\n{}", daemon.tail()),
                Err(_) => panic!("post-save did not start listening:\n{}", daemon.tail()),
            }
        }
    }

    /// The next event the log handlers wrote, or a panic after [`PATIENCE`] naming `what` was
    /// awaited and showing the daemon's last log lines.
    pub async fn next_event(&mut self, what: &str) -> serde_json::Value {
        let Some(event) = self.next_within(PATIENCE).await else {
            panic!("no event for {what} within {PATIENCE:?}; the daemon's last lines:\n{}", self.tail())
        };
        event
    }

    /// Events until (and including) the first for which `last` holds.
    pub async fn events_until(
        &mut self,
        what: &str,
        last: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let mut events = Vec::new();
        loop {
            let Some(event) = self.next_within(PATIENCE).await else {
                panic!(
                    "no event for {what} within {PATIENCE:?}; events so far: {events:?}; the daemon's last lines:\n{}",
                    self.tail()
                )
            };
            let done = last(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// The events that arrive until none has for `quiet`: what else a statement caused, after
    /// the event awaited.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<serde_json::Value> {
        let mut events = Vec::new();
        while let Some(event) = self.next_within(quiet).await {
            events.push(event);
        }
        events
    }

    /// Asserts that no event arrives within `quiet`.
    pub async fn assert_quiet(&mut self, quiet: Duration, after: &str) {
        if let Some(event) = self.next_within(quiet).await {
            panic!("an unexpected event after {after}: {event}");
        }
    }

    /// The next event within `limit`, keeping the other lines.
    async fn next_within(&mut self, limit: Duration) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(DaemonLine::Event(event))) => return Some(event),
                Ok(Some(DaemonLine::Other(text))) => self.other.push(text),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Stops the daemon with SIGTERM and asserts it exits 0.
    pub async fn stop(mut self) {
        self.process.signal(Signal::SIGTERM);
        let status = self.process.wait(PATIENCE).await;
        while let Ok(line) = self.lines.try_recv() {
            if let DaemonLine::Other(text) = line {
                self.other.push(text);
            }
        }
        assert!(status.success(), "post-save exited with {status}:\n{}", self.tail());
    }

    /// The last lines that were not events, for a failure message.
    pub fn tail(&self) -> String {
        self.other.iter().rev().take(30).rev().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// One stderr line of a [`LogDaemon`]: a log handler's `save event` line becomes its event.
fn parse_daemon_line(text: String) -> DaemonLine {
    let Ok(line) = serde_json::from_str::<serde_json::Value>(&text) else { return DaemonLine::Other(text) };
    if line["message"] != "save event" {
        return DaemonLine::Other(text);
    }
    match line["event"].as_str().map(serde_json::from_str) {
        Some(Ok(event)) => DaemonLine::Event(event),
        _ => panic!("a save event line without an event: {text}"),
    }
}
