//! `post-save demo`, run as a real process, as the README tells a newcomer to: with no
//! `DATABASE_URL` it starts a throwaway PostgreSQL, prints a `psql` line, shows the events of
//! that insert, and on Ctrl-C exits 0 and removes the cluster. With a database given, it uses it.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::child::binary;
use crate::support::db::TestDb;

/// How long the demo may take to reach a point (starting a cluster takes a few seconds).
const PATIENCE: Duration = Duration::from_secs(60);

/// How long the demo may take to exit after Ctrl-C.
const EXIT_PATIENCE: Duration = Duration::from_secs(30);

const INSERT: &str = "INSERT INTO shop_order (user_id, product, quantity) VALUES (42, 'espresso machine', 1)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

enum Message {
    Line(Stream, String),
    Closed,
    Exited(std::io::Result<ExitStatus>),
}

/// A running `post-save demo`: its output lines arrive on a channel, read by threads, so every
/// wait has a deadline. Dropping it stops the demo (Ctrl-C first, so the cluster is removed).
struct Demo {
    pid: Pid,
    messages: Receiver<Message>,
    stdout: Vec<String>,
    stderr: Vec<String>,
    open_streams: usize,
    status: Option<ExitStatus>,
}

impl Demo {
    /// Starts `post-save demo <args>` with a clean environment plus `env`.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Demo {
        let mut cmd = binary();
        cmd.arg("demo").args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.envs(env.iter().copied());
        let mut child: Child = cmd.spawn().expect("spawning post-save demo");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let (tx, messages) = channel();
        for (stream, pipe) in [
            (Stream::Stdout, Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>),
            (Stream::Stderr, Box::new(child.stderr.take().unwrap())),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(Message::Line(stream, line)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Message::Closed);
            });
        }
        std::thread::spawn(move || {
            let _ = tx.send(Message::Exited(child.wait()));
        });
        Demo { pid, messages, stdout: Vec::new(), stderr: Vec::new(), open_streams: 2, status: None }
    }

    /// Receives one message, waiting until `deadline`. False when the deadline passed or
    /// nothing more can arrive.
    fn pump(&mut self, deadline: Instant) -> bool {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.messages.recv_timeout(wait) {
            Ok(Message::Line(Stream::Stdout, line)) => self.stdout.push(line),
            Ok(Message::Line(Stream::Stderr, line)) => self.stderr.push(line),
            Ok(Message::Closed) => self.open_streams -= 1,
            Ok(Message::Exited(status)) => self.status = Some(status.expect("waiting for the demo")),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return false,
        }
        true
    }

    /// Waits for a line of `stream` that `matches`, and returns it.
    fn wait_for(&mut self, stream: Stream, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = 0;
        loop {
            let lines = match stream {
                Stream::Stdout => &self.stdout,
                Stream::Stderr => &self.stderr,
            };
            if let Some(line) = lines[seen..].iter().find(|l| matches(l)) {
                return line.clone();
            }
            seen = lines.len();
            if self.status.is_some() && self.open_streams == 0 {
                panic!("the demo exited ({:?}) before {what}\n{}", self.status, self.transcript());
            }
            if !self.pump(deadline) {
                panic!("no {what} within {PATIENCE:?}\n{}", self.transcript());
            }
        }
    }

    fn wait_for_stderr(&mut self, needle: &str) -> String {
        self.wait_for(Stream::Stderr, &format!("stderr line with {needle:?}"), |l| l.contains(needle))
    }

    /// Sends Ctrl-C (SIGINT) and waits for the exit and the end of both streams.
    fn interrupt(&mut self) -> ExitStatus {
        kill(self.pid, Signal::SIGINT).expect("sending SIGINT");
        let deadline = Instant::now() + EXIT_PATIENCE;
        while self.status.is_none() || self.open_streams > 0 {
            if !self.pump(deadline) {
                panic!("the demo did not exit within {EXIT_PATIENCE:?} of SIGINT\n{}", self.transcript());
            }
        }
        self.status.unwrap()
    }

    /// Sends `signal` and waits for the exit and the end of both streams.
    fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        kill(self.pid, signal).unwrap_or_else(|e| panic!("sending {signal}: {e}"));
        let deadline = Instant::now() + EXIT_PATIENCE;
        while self.status.is_none() || self.open_streams > 0 {
            if !self.pump(deadline) {
                panic!("the demo did not exit within {EXIT_PATIENCE:?} of {signal}\n{}", self.transcript());
            }
        }
        self.status.unwrap()
    }

    fn transcript(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout.join("\n"), self.stderr.join("\n"))
    }

    fn stderr_has(&self, needle: &str) -> bool {
        self.stderr.iter().any(|l| l.contains(needle))
    }
}

impl Drop for Demo {
    /// A failed test must not leave a demo (and its cluster) running: Ctrl-C, then SIGKILL.
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = kill(self.pid, Signal::SIGINT);
        let deadline = Instant::now() + EXIT_PATIENCE;
        while self.status.is_none() && self.pump(deadline) {}
        if self.status.is_none() {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }
}

/// The connection string on the banner's `  database:  …` line, and the rest of that line.
fn banner_database(line: &str) -> (String, bool) {
    let value = line.strip_prefix("  database:  ").unwrap_or_else(|| panic!("not the database line: {line:?}"));
    match value.strip_suffix(" (temporary: removed on Ctrl-C)") {
        Some(conninfo) => (conninfo.to_owned(), true),
        None => (value.to_owned(), false),
    }
}

/// The value of `key` in a libpq `key=value` string (values may be single-quoted, with `\'` and
/// `\\` escapes).
fn conninfo_value(conninfo: &str, key: &str) -> Option<String> {
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.peek()?;
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        if name.trim() == key {
            return Some(value);
        }
    }
}

/// `psql` from `PATH`, else from the server's bindir.
fn psql() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("psql")).find(|p| p.is_file()));
    on_path
        .or_else(|| post_save::testing::cluster::find_bindir().ok().map(|d| d.join("psql")))
        .unwrap_or_else(|| PathBuf::from("psql"))
}

/// Runs the README's `psql "<conninfo>" -c "<sql>"`.
fn run_psql(conninfo: &str, sql: &str) {
    let out = Command::new(psql())
        .arg(conninfo)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGPASSWORD")
        .output()
        .expect("running psql");
    assert!(out.status.success(), "psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Waits until the demo's own first order has gone through both handlers: after it, a new
/// order is order 2.
fn wait_for_the_demo_order(demo: &mut Demo) {
    demo.wait_for(Stream::Stderr, "the listening log line", |l| {
        l.contains("post_save::capture::ledger") && l.contains("listening")
    });
    let line = demo.wait_for_stderr("demo: first order");
    assert!(line.contains("save event") && line.contains("print-orders"), "{line}");
    demo.wait_for_stderr(r#"confirmation email for order {"id":1}"#);
}

/// Inserts the README's espresso machine and waits for both handlers to report it.
fn insert_and_see_events(demo: &mut Demo, conninfo: &str) {
    run_psql(conninfo, INSERT);
    let line = demo.wait_for_stderr("espresso machine");
    for part in [
        "save event",
        r#"handler="print-orders""#,
        r#"sender="public.shop_order""#,
        r#""op":"insert""#,
        r#""created":true"#,
        r#""pk":{"id":2}"#,
        r#""user_id":42"#,
        r#""application_name":"psql""#,
    ] {
        assert!(line.contains(part), "the log handler's line lacks {part}: {line}");
    }
    let line = demo.wait_for_stderr(r#"confirmation email for order {"id":2}"#);
    assert!(line.contains("exec handler output") && line.contains("order-confirmation"), "{line}");
}

#[test]
fn demo_without_database_url_runs_a_throwaway_postgres_and_removes_it_on_ctrl_c() {
    let mut demo = Demo::start(&[], &[]);
    let line = demo.wait_for(Stream::Stdout, "the banner's database line", |l| l.starts_with("  database:  "));
    let (conninfo, temporary) = banner_database(&line);
    assert!(temporary, "the banner does not say the database is temporary: {line}");
    assert!(conninfo.contains("user=postgres") && conninfo.contains("dbname=postgres"), "{conninfo}");
    let host = PathBuf::from(conninfo_value(&conninfo, "host").unwrap_or_else(|| panic!("no host in {conninfo}")));
    assert!(host.is_absolute(), "the cluster is reached over a Unix socket directory: {conninfo}");
    assert!(host.is_dir(), "{} does not exist while the demo runs", host.display());
    let psql_line = demo.wait_for(Stream::Stdout, "the banner's psql line", |l| l.contains("espresso machine"));
    assert!(psql_line.contains(&format!("psql \"{conninfo}\"")), "{psql_line}");
    assert!(demo.stderr_has("DATABASE_URL is not set: starting a throwaway PostgreSQL"), "{}", demo.transcript());

    wait_for_the_demo_order(&mut demo);
    insert_and_see_events(&mut demo, &conninfo);

    let status = demo.interrupt();
    assert_eq!(status.code(), Some(0), "exit status {status}\n{}", demo.transcript());
    assert!(!host.exists(), "{} is still there after the demo exited", host.display());
    assert!(demo.stderr_has("temporary PostgreSQL stopped and removed"), "{}", demo.transcript());
    assert!(!demo.stderr.iter().any(|l| l.contains("ERROR") || l.starts_with("error:")), "{}", demo.transcript());
}

/// Checks that the demo ran on `db` and left no temporary cluster behind.
async fn assert_ran_on(db: &TestDb, demo: &Demo) {
    assert!(!demo.stderr_has("throwaway"), "{}", demo.transcript());
    assert!(!demo.stderr_has("temporary PostgreSQL"), "{}", demo.transcript());
    let client = db.client().await;
    let products: Vec<String> = client
        .query("SELECT product FROM public.shop_order ORDER BY id", &[])
        .await
        .expect("shop_order was created in the given database")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(products, ["demo: first order", "espresso machine"]);
    let pending: i64 = client
        .query_one("SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", &[])
        .await
        .expect("the ledger is in the given database")
        .get(0);
    assert_eq!(pending, 0, "every event was handled");
}

#[tokio::test]
async fn demo_with_database_url_uses_that_database() {
    let db = TestDb::new().await;
    let mut demo = Demo::start(&["--database-url", &db.conninfo], &[]);
    let line = demo.wait_for(Stream::Stdout, "the banner's database line", |l| l.starts_with("  database:  "));
    let (conninfo, temporary) = banner_database(&line);
    assert!(!temporary, "{line}");
    assert_eq!(conninfo, db.conninfo);

    wait_for_the_demo_order(&mut demo);
    insert_and_see_events(&mut demo, &db.conninfo);
    let status = demo.interrupt();
    assert_eq!(status.code(), Some(0), "exit status {status}\n{}", demo.transcript());
    assert_ran_on(&db, &demo).await;
}

#[tokio::test]
async fn demo_uses_database_url_from_the_environment() {
    let db = TestDb::new().await;
    let mut demo = Demo::start(&[], &[("DATABASE_URL", &db.conninfo)]);
    let line = demo.wait_for(Stream::Stdout, "the banner's database line", |l| l.starts_with("  database:  "));
    assert_eq!(banner_database(&line), (db.conninfo.clone(), false));

    wait_for_the_demo_order(&mut demo);
    insert_and_see_events(&mut demo, &db.conninfo);
    let status = demo.interrupt();
    assert_eq!(status.code(), Some(0), "exit status {status}\n{}", demo.transcript());
    assert_ran_on(&db, &demo).await;
}

/// BUG: the demo installs its SIGINT handler only when the daemon starts. Ctrl-C while the
/// throwaway cluster starts, or after the banner but before the daemon listens, kills the
/// process: the temporary directory, and from the cluster's start on a running `postgres`, are
/// left behind.
#[test]
fn ctrl_c_while_the_cluster_starts_still_removes_it() {
    use std::os::unix::fs::PermissionsExt;
    // A TMPDIR of this test's own, so whatever the demo leaves is ours to see; the server (run
    // as `postgres` when the tests run as root) must be able to reach its directory inside.
    let tmp = tempfile::Builder::new().prefix("post-save-demo-").tempdir().expect("temp dir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tmpdir = tmp.path().to_str().expect("UTF-8 temp path");
    for stop_at in [Stream::Stderr, Stream::Stdout] {
        let mut demo = Demo::start(&[], &[("TMPDIR", tmpdir)]);
        match stop_at {
            // While the cluster is being created and started.
            Stream::Stderr => drop(demo.wait_for_stderr("starting a throwaway PostgreSQL")),
            // Once the banner says "Ctrl-C stops the demo", before the daemon listens.
            Stream::Stdout => drop(demo.wait_for(Stream::Stdout, "the banner", |l| l == "post-save demo")),
        }
        let status = demo.interrupt();
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().path()).collect();
        stop_servers_in(&left);
        assert!(status.code().is_some(), "killed by {status} ({stop_at:?})\n{}", demo.transcript());
        assert!(left.is_empty(), "left behind ({stop_at:?}): {left:?}\n{}", demo.transcript());
    }
}

/// A closed terminal (SIGHUP) and a plain `kill` (SIGTERM) stop the demo as Ctrl-C does: its
/// cluster's server stops and its directory is removed.
#[test]
fn a_closed_terminal_or_sigterm_removes_the_throwaway_cluster() {
    for signal in [Signal::SIGHUP, Signal::SIGTERM] {
        let mut demo = Demo::start(&[], &[]);
        let line = demo.wait_for(Stream::Stdout, "the banner's database line", |l| l.starts_with("  database:  "));
        let (conninfo, _) = banner_database(&line);
        let host = PathBuf::from(conninfo_value(&conninfo, "host").expect("a host"));
        wait_for_the_demo_order(&mut demo);
        let pid = std::fs::read_to_string(host.join("data/postmaster.pid")).expect("the server's pid file");
        let server = Pid::from_raw(pid.lines().next().and_then(|l| l.trim().parse().ok()).expect("a pid"));
        let status = demo.stop_with(signal);
        stop_servers_in(std::slice::from_ref(&host));
        assert_eq!(status.code(), Some(0), "{signal}: exit status {status}\n{}", demo.transcript());
        assert!(!host.exists(), "{signal}: {} is still there\n{}", host.display(), demo.transcript());
        assert!(!runs(server), "{signal}: the server (pid {server}) still runs");
    }
}

/// Whether process `pid` exists and is not a zombie (an exited server whose parent, here
/// whatever adopted it, has not reaped it yet).
fn runs(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Only the invoking user (and the server's, and root) can reach the throwaway cluster: its
/// directory and socket are private, though it trusts whoever connects. Checked by connecting
/// as `nobody`, which needs root to switch to.
#[test]
fn another_local_user_cannot_connect_to_the_throwaway_cluster() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("note: skipping: switching to another user needs root");
        return;
    }
    let mut demo = Demo::start(&[], &[]);
    let line = demo.wait_for(Stream::Stdout, "the banner's database line", |l| l.starts_with("  database:  "));
    let (conninfo, _) = banner_database(&line);
    let host = PathBuf::from(conninfo_value(&conninfo, "host").expect("a host"));
    wait_for_the_demo_order(&mut demo);
    let mode = std::fs::metadata(&host).expect("the cluster directory").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the cluster directory {} has mode {mode:o}", host.display());
    // The owner itself connects.
    run_psql(&conninfo, "SELECT 1");
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(psql())
        .args([conninfo.as_str(), "-XAtc", "SELECT 1"])
        .stdin(Stdio::null())
        .output()
        .expect("running psql as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody connected to the demo's cluster: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("Permission denied") || stderr.contains("permission denied"), "{stderr}");
    assert_eq!(demo.interrupt().code(), Some(0), "{}", demo.transcript());
}

/// Stops (immediate shutdown, SIGQUIT) any server still running in one of these cluster
/// directories, found by its `data/postmaster.pid`.
fn stop_servers_in(dirs: &[PathBuf]) {
    for dir in dirs {
        let pid = std::fs::read_to_string(dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid {
            let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
        }
    }
}

#[test]
fn conninfo_values_are_read_back() {
    let c = "host=/tmp/post-save-pg-ab12 port=5 user=postgres dbname=postgres";
    assert_eq!(conninfo_value(c, "host").as_deref(), Some("/tmp/post-save-pg-ab12"));
    assert_eq!(conninfo_value(c, "dbname").as_deref(), Some("postgres"));
    assert_eq!(conninfo_value(c, "password"), None);
    let q = r"host='/tmp/a dir/it\'s' port=5";
    assert_eq!(conninfo_value(q, "host").as_deref(), Some("/tmp/a dir/it's"));
    assert_eq!(conninfo_value(q, "port").as_deref(), Some("5"));
}
