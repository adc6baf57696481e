//! The real `post-save run` binary as a child process of a test, its JSON log lines parsed on a
//! thread of their own and sent into a channel.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc;

/// `post-save --config <config> --database-url <conninfo> --log-format json run` with `RUST_LOG`
/// and `JOURNAL_STREAM` removed, stdin and stdout null and stderr piped: the child every
/// process-level test starts (some add environment of their own).
pub fn command(config: &Path, conninfo: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_post-save"));
    command
        .arg("--config")
        .arg(config)
        .args(["--database-url", conninfo, "--log-format", "json", "run"])
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// A running `post-save run`; killed when dropped, so a failing test leaves none behind.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `post-save --config <config> --database-url <conninfo> --log-format json run`
    /// with `RUST_LOG` and `JOURNAL_STREAM` removed; each stderr line goes through `parse` into
    /// `lines` until the process ends or the receiver is gone.
    pub fn spawn<T: Send + 'static>(
        config: &Path,
        conninfo: &str,
        lines: mpsc::UnboundedSender<T>,
        parse: impl Fn(&str) -> T + Send + 'static,
    ) -> Daemon {
        let mut child = command(config, conninfo).spawn().expect("start post-save");
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for text in BufReader::new(stderr).lines() {
                let Ok(text) = text else { return };
                if lines.send(parse(&text)).is_err() {
                    return;
                }
            }
        });
        Daemon { child }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap_or_else(|e| panic!("kill {signal}: {e}"));
    }

    /// Whether the process has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits (polling) for the process to exit, at most `limit`.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(Instant::now() < deadline, "post-save did not exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
