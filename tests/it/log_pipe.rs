//! The daemon's logs going into a pipe whose reader dies (`post-save run 2>&1 | tee log`, then
//! Ctrl-C in `tee`'s terminal): the daemon keeps delivering saves and still stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::child::binary;
use crate::support::db::TestDb;
use crate::support::{config, install};

/// How long anything here may take; each step takes well under a second normally.
const PATIENCE: Duration = Duration::from_secs(30);

/// How long the daemon may take to stop after SIGTERM: its shutdown grace is cut to one second
/// below, so a healthy daemon is gone well within this.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// A log handler (so every save writes a log line) and an exec handler appending each event to
/// a file (so the test sees what was delivered).
fn config_text(out: &Path) -> String {
    format!(
        r#"[daemon]
shutdown_grace = "1s"

[[watch]]
table = "public.item"

[[handler]]
name = "log-items"
sender = "public.item"
kind = "log"

[[handler]]
name = "record-items"
sender = "public.item"
kind = "exec"
command = ["sh", "-c", "cat >> \"$0\" && echo >> \"$0\"", "{}"]
retry = {{ attempts = 3, backoff = "10ms" }}
"#,
        out.display()
    )
}

/// The `name` of every event in the exec handler's file.
fn delivered(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let event: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            event["instance"]["name"].as_str().expect("instance.name").to_owned()
        })
        .collect()
}

/// Waits until the exec handler has recorded every one of `names`, or panics.
fn wait_delivered(out: &Path, names: &[&str]) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = delivered(out);
        if names.iter().all(|n| got.iter().any(|g| g == n)) {
            return;
        }
        assert!(Instant::now() < deadline, "delivered {got:?}, waiting for {names:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when the test fails before it is reaped.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child` on a thread of its own; the receiver gets its exit status.
fn reap(mut child: Child) -> mpsc::Receiver<ExitStatus> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().expect("wait for the daemon"));
    });
    rx
}

#[tokio::test]
async fn a_dead_log_reader_neither_stops_deliveries_nor_blocks_the_shutdown() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)");
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("delivered.jsonl");
    let text = config_text(&out);
    install(&db, &config(&text)).await;
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &text).unwrap();

    // One pipe for both streams, read by `cat`, as with `post-save run 2>&1 | tee log`.
    let (pipe_reader, pipe_writer) = std::io::pipe().expect("pipe");
    let reader =
        Command::new("cat").stdin(pipe_reader).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start cat");
    let daemon = binary()
        .arg("--config")
        .arg(&path)
        .args(["--database-url", &db.conninfo, "run"])
        .stdin(Stdio::null())
        .stdout(pipe_writer.try_clone().expect("clone the pipe"))
        .stderr(pipe_writer)
        .spawn()
        .expect("start post-save");
    let mut daemon = Guard(Some(daemon));
    let mut reader = Guard(Some(reader));
    // `cat` reads the daemon's log lines on its own thread until it dies; this side only waits
    // for the line saying the daemon listens.
    let cat_out = reader.0.as_mut().and_then(|r| r.stdout.take()).unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(cat_out).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("listening")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("the daemon never said it listens: {seen:?}"),
        }
    }

    db.psql_ok("INSERT INTO item (name) VALUES ('before')");
    wait_delivered(&out, &["before"]);

    // The reader dies; from here every log line the daemon writes meets a closed pipe.
    let mut cat = reader.0.take().unwrap();
    cat.kill().expect("kill cat");
    cat.wait().expect("reap cat");
    db.psql_ok("INSERT INTO item (name) VALUES ('after-1')");
    db.psql_ok("INSERT INTO item (name) VALUES ('after-2')");
    db.psql_ok("UPDATE item SET name = 'after-3' WHERE name = 'before'");
    wait_delivered(&out, &["after-1", "after-2", "after-3"]);

    let daemon = daemon.0.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.id()).expect("pid"));
    let exited = reap(daemon);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = exited.recv_timeout(STOP_WITHIN).unwrap_or_else(|_| {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        panic!("the daemon did not stop within {STOP_WITHIN:?} of SIGTERM")
    });
    assert_eq!(status.code(), Some(0), "the daemon's exit: {status}");
}
