//! `kind = "exec"`: run a program for each event.
//!
//! The program gets argv as configured (no shell), the event JSON on stdin and `POST_SAVE_*`
//! environment variables. Exit 0 = done, 75 (`EX_TEMPFAIL`) = retry later, anything else =
//! failed, reported with the tail of its stderr. It runs in its own process group; when its
//! attempt times out or the daemon gives up on it, the whole group is killed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Delivery, Handler, HandlerError};
use crate::config::{ConfigError, Section};
use crate::event::SaveEvent;

/// Exit code that asks for a later retry (`EX_TEMPFAIL` of sysexits.h).
pub const EXIT_RETRY: i32 = 75;

/// How much of the program's stderr is kept for the log and the dead-letter list.
const TAIL_BYTES: usize = 2048;

/// After the program exits, how long its output is still read: a background process it left
/// behind may hold the pipes open, and must not keep the attempt running.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);

/// Variables passed from the daemon's environment to every program (the rest is not: the
/// daemon's may hold `DATABASE_URL` or `PGPASSWORD`). `inherit_env` adds more.
const INHERITED: [&str; 8] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR"];

/// Options of an `exec` handler.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Log the program's stdout at info level (else at debug).
    pub log_output: bool,
    /// More variables passed on from the daemon's environment.
    pub inherit_env: Vec<String>,
}

impl ExecOptions {
    /// Where events go, for `handlers list`.
    pub fn target(&self) -> String {
        self.command.first().cloned().unwrap_or_default()
    }

    /// Builds the handler.
    pub fn build(&self, _name: &str) -> Result<std::sync::Arc<dyn super::Handler>, super::BuildError> {
        Ok(std::sync::Arc::new(ExecHandler::new(self.clone())))
    }

    /// Every key [`Self::parse`] reads: anything else in the table is an unknown key.
    pub(crate) const KEYS: &[&str] = &["command", "env", "cwd", "log_output", "inherit_env"];

    /// Reads the options from the handler's table.
    pub fn parse(s: &mut Section) -> Result<Self, ConfigError> {
        let command: Vec<String> = s.require("command")?;
        if command.first().is_none_or(|p| p.is_empty()) {
            return Err(s.error("command", "needs at least the program to run"));
        }
        let env = s.take::<BTreeMap<String, String>>("env")?.unwrap_or_default();
        if let Some(k) = env.keys().find(|k| k.is_empty() || k.contains('=')) {
            return Err(s.error("env", &format!("`{k}` is not a valid variable name")));
        }
        let cwd = s.take::<PathBuf>("cwd")?;
        let log_output = s.take::<bool>("log_output")?.unwrap_or(false);
        let inherit_env = s.take::<Vec<String>>("inherit_env")?.unwrap_or_default();
        Ok(ExecOptions { command, env, cwd, log_output, inherit_env })
    }
}

/// Runs a program per event.
pub struct ExecHandler {
    options: ExecOptions,
}

impl ExecHandler {
    /// An exec handler with these options.
    pub fn new(options: ExecOptions) -> Self {
        ExecHandler { options }
    }

    fn command(&self, event: &SaveEvent, delivery: &Delivery) -> Command {
        let mut cmd = Command::new(&self.options.command[0]);
        let inherited = INHERITED.iter().copied().chain(self.options.inherit_env.iter().map(String::as_str));
        cmd.env_clear()
            .envs(inherited.filter_map(|k| std::env::var_os(k).map(|v| (k.to_owned(), v))))
            .args(&self.options.command[1..])
            .envs(&self.options.env)
            .env("POST_SAVE_HANDLER", &delivery.handler)
            .env("POST_SAVE_ATTEMPT", delivery.attempt.to_string())
            .env("POST_SAVE_MAX_ATTEMPTS", delivery.max_attempts.to_string())
            .env("POST_SAVE_EVENT_ID", event.id.map(|i| i.to_string()).unwrap_or_default())
            .env("POST_SAVE_SIGNAL", event.signal.as_str())
            .env("POST_SAVE_SENDER", &event.sender)
            .env(
                "POST_SAVE_OP",
                serde_json::to_value(event.op).map(|v| v.as_str().unwrap_or("").to_owned()).unwrap_or_default(),
            )
            .env("POST_SAVE_CREATED", if event.created { "true" } else { "false" })
            .env("POST_SAVE_PK", serde_json::Value::Object(event.pk.clone()).to_string())
            .env("POST_SAVE_TXID", event.txid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.options.cwd {
            cmd.current_dir(dir);
        }
        cmd
    }
}

/// Kills the program's process group unless disarmed: dropping a running attempt (timeout,
/// shutdown) leaves no process behind.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

#[async_trait]
impl Handler for ExecHandler {
    async fn handle(&self, event: &SaveEvent, delivery: &Delivery) -> Result<(), HandlerError> {
        let program = &self.options.command[0];
        let mut child = self
            .command(event, delivery)
            .spawn()
            .map_err(|e| HandlerError::failed(format!("cannot start `{program}`: {e}")).with_source(e))?;
        let mut guard = GroupGuard(child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw));
        let input = event.to_json();
        let mut stdin = child.stdin.take();
        let write = async {
            if let Some(stdin) = stdin.as_mut() {
                // A program that exits without reading stdin is not an error.
                let _ = stdin.write_all(input.as_bytes()).await;
                let _ = stdin.shutdown().await;
            }
            drop(stdin);
        };
        let stdout = Tail::spawn(child.stdout.take());
        let stderr = Tail::spawn(child.stderr.take());
        let (_, status) = tokio::join!(write, child.wait());
        guard.0 = None;
        let (out, err) = tokio::join!(stdout.finish(), stderr.finish());
        let status =
            status.map_err(|e| HandlerError::failed(format!("waiting for `{program}`: {e}")).with_source(e))?;
        if !out.is_empty() {
            if self.options.log_output {
                tracing::info!(handler = %delivery.handler, output = %out, "exec handler output");
            } else {
                tracing::debug!(handler = %delivery.handler, output = %out, "exec handler output");
            }
        }
        match status.code() {
            Some(0) => Ok(()),
            Some(EXIT_RETRY) => Err(HandlerError::retry(format!("`{program}` exited 75 (retry later); stderr: {err}"))),
            Some(code) => Err(HandlerError::failed(format!("`{program}` exited {code}; stderr: {err}"))),
            None => Err(HandlerError::failed(format!("`{program}` was killed by a signal; stderr: {err}"))),
        }
    }
}

/// The last [`TAIL_BYTES`] of a stream, read on a task.
struct Tail {
    kept: Arc<Mutex<Vec<u8>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Only a panic while the lock was held poisons it: a bug, said loudly.
const POISONED: &str = "the output tail's lock, poisoned by an earlier panic (a bug in post-save)";

impl Tail {
    fn spawn(stream: Option<impl AsyncRead + Unpin + Send + 'static>) -> Tail {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let task = stream.map(|mut stream| {
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    let mut kept = kept.lock().expect(POISONED);
                    kept.extend_from_slice(&buf[..n]);
                    let excess = kept.len().saturating_sub(TAIL_BYTES);
                    kept.drain(..excess);
                }
            })
        });
        Tail { kept, task }
    }

    /// Waits [`DRAIN_AFTER_EXIT`] at most for the stream's end, then returns what was read.
    async fn finish(mut self) -> String {
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(DRAIN_AFTER_EXIT, &mut task).await.is_err()
        {
            // Something the program left behind holds the pipe: stop reading it.
            task.abort();
        }
        let kept = self.kept.lock().expect(POISONED).clone();
        String::from_utf8_lossy(&kept).trim().to_owned()
    }
}
