//! The real `post-save` binary as a child process of a test: one command with nothing inherited
//! that would change what it does, its output for the CLI tests, and `post-save run` with its
//! stderr lines read on a thread of their own.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::support::db::TestDb;

/// The built `post-save` binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_post-save");

/// Environment variables that would change what the binary does if inherited from the test run:
/// where its config and database are, how it logs, its TLS settings.
pub const SCRUBBED_ENV: &[&str] = &[
    "POST_SAVE_CONFIG",
    "POST_SAVE_LOG_FORMAT",
    "POST_SAVE_THREADS",
    "POST_SAVE_TEST_DATABASE_URL",
    "CONFIGURATION_DIRECTORY",
    "DATABASE_URL",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGSERVICE",
    "PGAPPNAME",
    "PGCONNECT_TIMEOUT",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "RUST_LOG",
    "JOURNAL_STREAM",
];

/// `post-save` with none of [`SCRUBBED_ENV`] inherited; the caller adds arguments, environment
/// and pipes.
pub fn binary() -> Command {
    let mut command = Command::new(BIN);
    for var in SCRUBBED_ENV {
        command.env_remove(var);
    }
    command
}

/// `post-save --config <config> --database-url <conninfo> --log-format json run`, stdin and
/// stdout null and stderr piped: the child every process-level test starts (some add
/// environment of their own).
pub fn command(config: &Path, conninfo: &str) -> Command {
    let mut command = binary();
    command
        .arg("--config")
        .arg(config)
        .args(["--database-url", conninfo, "--log-format", "json", "run"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Runs `post-save --config <config> --database-url <conninfo> <args>` to its end.
pub fn post_save_at(config: &Path, conninfo: &str, args: &[&str]) -> Output {
    binary().arg("--config").arg(config).args(["--database-url", conninfo]).args(args).output().expect("run post-save")
}

/// Runs `post-save --config <config> --database-url <db> <args>` to its end.
pub fn post_save_on(config: &Path, db: &TestDb, args: &[&str]) -> Output {
    post_save_at(config, &db.conninfo, args)
}

/// As [`post_save_on`], panicking with its output unless it exits 0.
pub fn post_save_ok(config: &Path, db: &TestDb, args: &[&str]) -> Output {
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

/// Runs `post-save doctor --json` on `conninfo`; returns the exit code and the checks by name.
pub fn doctor(config: &Path, conninfo: &str) -> (i32, Value) {
    let out = post_save_at(config, conninfo, &["doctor", "--json"]);
    let checks: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let by_name = checks
        .as_array()
        .expect("an array")
        .iter()
        .map(|c| (c["name"].as_str().expect("a check's name").to_owned(), c.clone()))
        .collect();
    (out.status.code().expect("exit code"), Value::Object(by_name))
}

/// A running `post-save`, its stderr read line by line on a thread of its own; killed when
/// dropped, so a failing test leaves none behind.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `post-save --config <config> --database-url <conninfo> --log-format json run`
    /// ([`command`]); each stderr line goes through `parse` into `lines` until the process ends
    /// or the receiver is gone.
    pub fn spawn<T: Send + 'static>(
        config: &Path,
        conninfo: &str,
        lines: mpsc::UnboundedSender<T>,
        parse: impl Fn(&str) -> T + Send + 'static,
    ) -> Daemon {
        Daemon::start(command(config, conninfo), move |text| lines.send(parse(&text)).is_ok())
    }

    /// Starts `command`, which must pipe stderr; each stderr line goes to `line` until the
    /// process ends or `line` returns false.
    pub fn start(mut command: Command, mut line: impl FnMut(String) -> bool + Send + 'static) -> Daemon {
        let mut child = command.spawn().expect("start post-save");
        let stderr = child.stderr.take().expect("stderr piped");
        // A thread, not a task: the daemon must never block on a full pipe while the test's
        // runtime is busy in a blocking call (psql, a Python process).
        std::thread::spawn(move || {
            for text in BufReader::new(stderr).lines() {
                let Ok(text) = text else { return };
                if !line(text) {
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

    /// Stops the process with SIGTERM and waits for it, at most `limit`.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait(limit).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // a frozen (SIGSTOP) one too
            let _ = kill(self.pid(), Signal::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
