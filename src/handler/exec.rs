//! `kind = "exec"`: run a program for each event.
//!
//! The program gets argv as configured (no shell), the event JSON on stdin and `POST_SAVE_*`
//! environment variables. Exit 0 = done, 75 (`EX_TEMPFAIL`) = retry later, anything else =
//! failed, reported with the tail of its stderr. It runs in its own process group; when its
//! attempt times out or the daemon gives up on it, the whole group is killed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

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
}

impl ExecOptions {
    pub(super) fn parse(s: &mut Section) -> Result<Self, ConfigError> {
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
        Ok(ExecOptions { command, env, cwd, log_output })
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
        cmd.args(&self.options.command[1..])
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
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let write = async {
            if let Some(stdin) = stdin.as_mut() {
                // A program that exits without reading stdin is not an error.
                let _ = stdin.write_all(input.as_bytes()).await;
                let _ = stdin.shutdown().await;
            }
            drop(stdin);
        };
        let (_, out, err, status) = tokio::join!(write, tail(stdout), tail(stderr), child.wait());
        guard.0 = None;
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

/// Reads a stream to its end, keeping only its last [`TAIL_BYTES`] as text.
async fn tail(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else { return String::new() };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > TAIL_BYTES {
                    kept.drain(..kept.len() - TAIL_BYTES);
                }
            }
        }
    }
    String::from_utf8_lossy(&kept).trim().to_owned()
}
