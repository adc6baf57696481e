//! The real `post-save` binary as a child process: SIGKILL in the middle of a stream of saves
//! loses nothing (at least once, in commit order per row), and SIGTERM stops promptly with
//! exit 0, letting a running handler finish within the grace period or handing its event back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::support::child::Daemon;
use crate::support::db::TestDb;
use crate::support::{PATIENCE, config, install, wait_for_sql};

const SHOP: &str = "CREATE TABLE shop_order (
    id bigserial PRIMARY KEY, user_id bigint NOT NULL, product text NOT NULL,
    quantity integer NOT NULL DEFAULT 1)";

const WATCH: &str = "[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n";

/// What a daemon wrote on stderr, one JSON log line at a time.
#[derive(Debug)]
enum Line {
    /// `"message":"listening"`: LISTEN works and the backlog is caught up.
    Listening,
    /// `"message":"save event"` of the log handler.
    Handled { id: i64, row: i64, quantity: i64 },
    /// Anything else, kept for failure messages.
    Other(String),
}

fn parse_line(text: &str) -> Line {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else { return Line::Other(text.to_owned()) };
    match json["message"].as_str() {
        Some("listening") => Line::Listening,
        Some("save event") => {
            let event: serde_json::Value = json["event"]
                .as_str()
                .and_then(|e| serde_json::from_str(e).ok())
                .unwrap_or_else(|| panic!("a save event line without an event field: {text}"));
            let number = |v: &serde_json::Value| v.as_i64().unwrap_or_else(|| panic!("not an integer in {text}"));
            Line::Handled {
                id: number(&event["id"]),
                row: number(&event["pk"]["id"]),
                quantity: number(&event["instance"]["quantity"]),
            }
        }
        _ => Line::Other(text.to_owned()),
    }
}

/// The last few lines of `seen`, for a failure message.
fn tail(seen: &[(usize, Line)]) -> String {
    let last: Vec<String> = seen
        .iter()
        .rev()
        .take(20)
        .rev()
        .map(|(daemon, line)| match line {
            Line::Other(text) => format!("[{daemon}] {text}"),
            line => format!("[{daemon}] {line:?}"),
        })
        .collect();
    last.join("\n")
}

/// Receives lines until `daemon`'s "listening", keeping what else arrives in `seen`.
async fn wait_listening(
    lines: &mut mpsc::UnboundedReceiver<(usize, Line)>,
    daemon: usize,
    seen: &mut Vec<(usize, Line)>,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some((i, Line::Listening))) if i == daemon => return,
            Ok(Some(line)) => seen.push(line),
            Ok(None) => panic!("daemon {daemon} exited before listening:\n{}", tail(seen)),
            Err(_) => panic!("daemon {daemon} did not start listening:\n{}", tail(seen)),
        }
    }
}

/// Writes `text` as the config file in `dir`.
fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A small xorshift generator: random enough to pick rows, without another dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const ROWS: usize = 500;
const UPDATES: usize = 4500;
const WRITERS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_saves_stream_in_loses_nothing_and_keeps_row_order() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let dir = TempDir::new().expect("tempdir");
    let text = format!(
        "[daemon]\nsweep_interval = \"1h\"\n\n{WATCH}\n[[handler]]\nname = \"order-log\"\nsender = \"public.shop_order\"\n\
         kind = \"log\"\nlevel = \"info\"\nfields = [\"id\", \"pk\", \"instance\", \"op\"]\n"
    );
    install(&db, &config(&text)).await;
    let config_path = write_config(dir.path(), &text);

    let (tx, mut lines) = mpsc::unbounded_channel();
    let mut seen = Vec::new();
    let mut first = Daemon::spawn(&config_path, &db.conninfo, tx.clone(), |text| (0, parse_line(text)));
    wait_listening(&mut lines, 0, &mut seen).await;

    // The writers: 500 inserts, then 4,500 single-row updates from concurrent clients, each
    // statement its own transaction.
    let progress = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..WRITERS {
        clients.push(db.client().await);
    }
    let writers = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(ROWS);
            for i in 0..ROWS {
                let user = i64::try_from(i).unwrap();
                let row = clients[0]
                    .query_one("INSERT INTO shop_order (user_id, product) VALUES ($1, 'item') RETURNING id", &[&user])
                    .await
                    .expect("insert");
                ids.push(row.get::<_, i64>(0));
                progress.fetch_add(1, Ordering::Relaxed);
            }
            let ids = Arc::new(ids);
            let mut tasks = Vec::new();
            for (w, client) in clients.into_iter().enumerate() {
                let (ids, progress) = (Arc::clone(&ids), Arc::clone(&progress));
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((w as u64 + 1) * 0x2545_F491_4F6C_DD1D));
                    let update = client
                        .prepare("UPDATE shop_order SET quantity = quantity + 1 WHERE id = $1")
                        .await
                        .expect("prepare");
                    for _ in 0..UPDATES / WRITERS {
                        let id = ids[usize::try_from(rng.below(ids.len() as u64)).unwrap()];
                        assert_eq!(client.execute(&update, &[&id]).await.expect("update"), 1);
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            for task in tasks {
                task.await.expect("writer panicked");
            }
        })
    };
    let total = ROWS + UPDATES;
    let wait_progress = |at: usize| {
        let progress = Arc::clone(&progress);
        async move {
            let deadline = Instant::now() + PATIENCE;
            while progress.load(Ordering::Relaxed) < at {
                assert!(Instant::now() < deadline, "the writers are stuck at {}", progress.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    // About halfway: SIGKILL. Saves go on with no daemon, then a second one starts.
    wait_progress(total / 2).await;
    first.signal(Signal::SIGKILL);
    let status = first.wait(PATIENCE).await;
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status:?}");
    let killed_at = progress.load(Ordering::Relaxed);
    wait_progress(total * 6 / 10).await;
    let mut second = Daemon::spawn(&config_path, &db.conninfo, tx.clone(), |text| (1, parse_line(text)));
    drop(tx);
    let second_started_at = progress.load(Ordering::Relaxed);
    writers.await.expect("writers panicked");
    eprintln!("killed at {killed_at} saves, second daemon started at {second_started_at}");

    // Everything in the ledger gets handled and acknowledged.
    assert_eq!(db.query_i64("SELECT sum(n) FROM post_save.event").await, i64::try_from(total).unwrap());
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    let ledger: HashMap<i64, (i64, i64)> = db
        .client()
        .await
        .query(
            "SELECT e.id + r.ord - 1, (i.row->>'id')::bigint, (i.row->>'quantity')::bigint \
               FROM post_save.event e, json_array_elements(e.rows) WITH ORDINALITY AS r(item, ord), \
                    LATERAL (SELECT CASE json_typeof(r.item) WHEN 'array' THEN r.item->1 ELSE r.item END) AS i(row)",
            &[],
        )
        .await
        .expect("ledger")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut handled: Vec<(usize, i64, i64, i64)> = Vec::new();
    let mut ids_seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while ids_seen.len() < ledger.len() {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some((daemon, Line::Handled { id, row, quantity }))) => {
                ids_seen.insert(id);
                handled.push((daemon, id, row, quantity));
            }
            Ok(Some(other)) => seen.push(other),
            Ok(None) | Err(_) => {
                let missing = ledger.keys().filter(|id| !ids_seen.contains(id)).count();
                panic!("{missing} of {} events were never handled; last other lines:\n{}", ledger.len(), tail(&seen));
            }
        }
    }
    // Any stragglers of the second daemon (duplicates) arrive before it stops.
    second.signal(Signal::SIGTERM);
    let status = second.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "the second daemon exited with {status}");
    while let Some((daemon, line)) = lines.recv().await {
        match line {
            Line::Handled { id, row, quantity } => handled.push((daemon, id, row, quantity)),
            other => seen.push((daemon, other)),
        }
    }

    // Every event handled at least once, as it is in the ledger.
    for &(daemon, id, row, quantity) in &handled {
        assert_eq!(ledger.get(&id), Some(&(row, quantity)), "daemon {daemon} handled event {id} as it is not");
    }
    let distinct: HashSet<i64> = handled.iter().map(|h| h.1).collect();
    assert_eq!(distinct.len(), ledger.len(), "events lost");
    let by_daemon = |d: usize| handled.iter().filter(|h| h.0 == d).count();
    let duplicates = handled.len() - distinct.len();
    eprintln!(
        "{} events; handled {} times by the first daemon, {} by the second; {duplicates} duplicates",
        ledger.len(),
        by_daemon(0),
        by_daemon(1)
    );
    assert!(by_daemon(0) > 0 && by_daemon(1) > 0, "both daemons did part of the work");
    for d in 0..2 {
        let mine: Vec<i64> = handled.iter().filter(|h| h.0 == d).map(|h| h.1).collect();
        let unique: HashSet<i64> = mine.iter().copied().collect();
        assert_eq!(unique.len(), mine.len(), "daemon {d} handled an event twice");
    }

    // Per row: ledger-id order is commit order (quantity 1, 2, 3, …), and each daemon handled
    // the row's events in that order.
    let mut rows: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
    for (&id, &(row, quantity)) in &ledger {
        rows.entry(row).or_default().push((id, quantity));
    }
    let finals: HashMap<i64, i64> = db
        .client()
        .await
        .query("SELECT id, quantity::bigint FROM shop_order", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), ROWS);
    for (row, events) in &mut rows {
        events.sort_unstable();
        let quantities: Vec<i64> = events.iter().map(|e| e.1).collect();
        let expected: Vec<i64> = (1..=i64::try_from(events.len()).unwrap()).collect();
        assert_eq!(quantities, expected, "row {row}: quantities by ledger id");
        assert_eq!(finals.get(row), expected.last(), "row {row}: final quantity");
    }
    for d in 0..2 {
        let mut last: HashMap<i64, i64> = HashMap::new();
        for &(_, id, row, _) in handled.iter().filter(|h| h.0 == d) {
            if let Some(previous) = last.insert(row, id) {
                assert!(previous < id, "daemon {d} handled event {id} of row {row} after event {previous}");
            }
        }
    }
    assert_eq!(db.query_i64("SELECT count(*) FROM post_save.dead_letter").await, 0);
}

/// A database with `shop_order` and triggers, and a config file for an exec handler running
/// `slow.sh`: its first run sleeps `sleep`, later runs return at once. It records its runs in
/// `runs`, its pids in `pids.<n>`, and touches `started.<n>` and `finished.<n>`.
async fn slow_handler_setup(grace: Option<&str>, sleep: &str) -> (TestDb, TempDir, PathBuf) {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    let script = out.join("slow.sh");
    std::fs::write(
        &script,
        r#"#!/bin/sh
cat > /dev/null
echo "$POST_SAVE_EVENT_ID" >> "$OUT_DIR/runs"
n=$(wc -l < "$OUT_DIR/runs")
if [ "$n" = 1 ]; then
    sleep "$SLEEP" &
    echo "$$ $!" > "$OUT_DIR/pids.$n"
    touch "$OUT_DIR/started.$n"
    wait $!
else
    touch "$OUT_DIR/started.$n"
fi
touch "$OUT_DIR/finished.$n"
"#,
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let daemon = grace.map(|g| format!("shutdown_grace = {}\n", toml_str(g))).unwrap_or_default();
    let text = format!(
        "[daemon]\nsweep_interval = \"1h\"\n{daemon}\n{WATCH}\n[[handler]]\nname = \"slow\"\nkind = \"exec\"\n\
         command = [{}]\nenv = {{ OUT_DIR = {}, SLEEP = {} }}\ntimeout = \"60s\"\n\
         retry = {{ attempts = 3, backoff = \"20ms\", max_backoff = \"100ms\" }}\n",
        toml_str(script.to_str().unwrap()),
        toml_str(out.to_str().unwrap()),
        toml_str(sleep),
    );
    install(&db, &config(&text)).await;
    let path = write_config(out, &text);
    (db, dir, path)
}

/// Polls until `path` exists, or panics after [`PATIENCE`].
async fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + PATIENCE;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process runs (a zombie does not: it is dead, only not reaped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) != Some('Z'),
    }
}

const PENDING: &str = "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_handler_finish_and_exits_0() {
    let (db, dir, config_path) = slow_handler_setup(None, "2").await;
    let out = dir.path();
    let (tx, mut lines) = mpsc::unbounded_channel();
    let mut seen = Vec::new();
    let mut daemon = Daemon::spawn(&config_path, &db.conninfo, tx, |text| (0, parse_line(text)));
    wait_listening(&mut lines, 0, &mut seen).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'slow')");
    wait_for_file(&out.join("started.1")).await;
    let term = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait(Duration::from_secs(10)).await;
    let took = term.elapsed();
    assert!(status.success(), "exit status {status}");
    eprintln!("stopped {took:?} after SIGTERM");
    // The handler finished within the grace period, and the acknowledgement was written
    // before the process exited.
    assert!(out.join("finished.1").exists(), "the handler was not allowed to finish");
    assert_eq!(db.query_i64(PENDING).await, 0, "the finished event is acknowledged");
    assert_eq!(std::fs::read_to_string(out.join("runs")).unwrap().lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_the_grace_period_hands_the_event_back() {
    let (db, dir, config_path) = slow_handler_setup(Some("200ms"), "30").await;
    let out = dir.path();
    let (tx, mut lines) = mpsc::unbounded_channel();
    let mut seen = Vec::new();
    let mut daemon = Daemon::spawn(&config_path, &db.conninfo, tx.clone(), |text| (0, parse_line(text)));
    wait_listening(&mut lines, 0, &mut seen).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'slow')");
    wait_for_file(&out.join("started.1")).await;
    let term = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait(Duration::from_secs(10)).await;
    let took = term.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    eprintln!("stopped {took:?} after SIGTERM");
    assert!(!out.join("finished.1").exists());
    assert_eq!(db.query_i64(PENDING).await, 1, "the event was handed back, not acknowledged");
    assert_eq!(db.query_i64("SELECT count(*) FROM post_save.dead_letter").await, 0);
    // The abandoned program and its child were killed.
    let pids: Vec<i32> = std::fs::read_to_string(out.join("pids.1"))
        .expect("pids")
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "the handler's processes outlived the daemon: {pids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The next daemon delivers it.
    let mut again = Daemon::spawn(&config_path, &db.conninfo, tx, |text| (1, parse_line(text)));
    wait_listening(&mut lines, 1, &mut seen).await;
    wait_for_file(&out.join("finished.2")).await;
    wait_for_sql(&db, PENDING, 0).await;
    let runs = std::fs::read_to_string(out.join("runs")).unwrap();
    let runs: Vec<&str> = runs.lines().collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0], runs[1], "the same event both times");
    again.signal(Signal::SIGTERM);
    assert!(again.wait(Duration::from_secs(10)).await.success());
}
