//! Log lines of the real daemon: text with timestamps on a plain stderr, without timestamps or
//! colour under journald (`JOURNAL_STREAM`, which adds its own), one JSON object per line with
//! `--log-format json`, and `RUST_LOG` filtering.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use tempfile::TempDir;

use crate::support;
use crate::support::child::binary;
use crate::support::db::TestDb;
use crate::support::{config, install};

const WATCH: &str = "[[watch]]\ntable = \"public.item\"\n";

/// The daemon's stderr lines up to and including the one saying it listens.
fn lines_until_listening(db: &TestDb, config: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let mut cmd = binary();
    cmd.arg("--config").arg(config).args(["--database-url", &db.conninfo]).args(extra).arg("run");
    cmd.env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start post-save");
    let stderr = child.stderr.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let done = line.contains("listening");
        lines.push(line);
        if done || lines.len() > 50 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(lines.iter().any(|l| l.contains("listening")), "never listened: {lines:?}");
    lines
}

#[tokio::test]
async fn text_json_and_journald_log_lines() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)");
    install(&db, &config(WATCH)).await;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, WATCH).unwrap();

    let plain = lines_until_listening(&db, &path, &[], &[]);
    let last = plain.last().unwrap();
    assert!(last.starts_with("20") && last.contains(" INFO "), "a timestamp first: {last:?}");
    assert!(!last.contains('\u{1b}'), "no colour when stderr is not a terminal: {last:?}");

    let journal = lines_until_listening(&db, &path, &[], &[("JOURNAL_STREAM", "8:12345")]);
    let last = journal.last().unwrap();
    assert!(last.trim_start().starts_with("INFO "), "no timestamp under journald: {last:?}");
    assert!(!last.contains('\u{1b}'));

    let json = lines_until_listening(&db, &path, &["--log-format", "json"], &[]);
    for line in &json {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    let listening: serde_json::Value = serde_json::from_str(json.last().unwrap()).unwrap();
    assert_eq!(listening["tables"], 1, "structured fields: {listening}");

    // RUST_LOG=warn hides the info lines: the daemon still starts, silently. (The daemons
    // above were killed, leaving the doorbell armed.)
    db.psql_ok("SELECT setval('post_save.doorbell', 0)");
    let child = binary()
        .arg("--config")
        .arg(&path)
        .args(["--database-url", &db.conninfo, "run"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It listens once it has armed the doorbell (and silences it again when it stops).
    support::wait_for_sql(&db, "SELECT last_value FROM post_save.doorbell", 1).await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("INFO"), "RUST_LOG=warn still printed info: {text}");
}
