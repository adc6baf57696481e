//! `kind = "exec"` handlers in the embedded daemon against a real PostgreSQL: what the program
//! receives, timeouts that kill its whole process group, exit 75 versus other exit codes, dead
//! letters, the concurrency limit and per-row order under retries.
//!
//! The programs are small shell scripts written into a temporary directory; they report what
//! they saw through files in that directory (`OUT_DIR`, set with the handler's `env`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use post_save::SaveEvent;
use tempfile::TempDir;

use crate::support;
use crate::support::db::TestDb;
use crate::support::{PATIENCE, Running, config, eventually, file_lines, install, start, wait_for_sql};

const SHOP: &str = "CREATE TABLE shop_order (
    id bigserial PRIMARY KEY, user_id bigint NOT NULL, product text NOT NULL,
    quantity integer NOT NULL DEFAULT 1)";

/// Fast retries for tests.
const FAST_RETRY: &str = "{ attempts = 3, backoff = \"20ms\", max_backoff = \"100ms\" }";

/// A TOML basic string holding `s` (a JSON string literal is one).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// Writes an executable script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
    path
}

/// A `[[handler]]` table of kind exec on `public.shop_order`, running `command` with
/// `OUT_DIR=<out>` and `EXTRA=from config` in its environment; `extra` adds keys (timeout,
/// retry, …).
fn exec_handler(name: &str, command: &[&str], out: &Path, extra: &str) -> String {
    let command: Vec<String> = command.iter().map(|a| toml_str(a)).collect();
    format!(
        "[[handler]]\nname = {}\nsender = \"public.shop_order\"\nkind = \"exec\"\ncommand = [{}]\n\
         env = {{ OUT_DIR = {}, EXTRA = \"from config\" }}\n{extra}\n",
        toml_str(name),
        command.join(", "),
        toml_str(&out.to_string_lossy()),
    )
}

/// The daemon config watching `shop_order` (durable) with these handler tables.
fn config_text(handlers: &str) -> String {
    format!(
        "[daemon]\nsweep_interval = \"1h\"\n\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n\n{handlers}"
    )
}

/// A database with `shop_order`, the triggers of `config_text`, and a daemon running it.
async fn shop_with(config_text: &str) -> (TestDb, Running) {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let config = config(config_text);
    install(&db, &config).await;
    let daemon = start(&db, config).await;
    (db, daemon)
}

/// Waits until `path` has at least `n` lines and returns them.
async fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    let what = format!("{n} lines in {}", path.display());
    eventually(&what, || Some(file_lines(path)).filter(|l| l.len() >= n)).await
}

/// Whether a process runs: `/proc/<pid>` exists and is not a zombie (a killed process whose
/// parent has not reaped it yet is dead; in a container PID 1 may never reap orphans).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) != Some('Z'),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_program_gets_the_event_on_stdin_env_vars_and_literal_argv() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    let work = out.join("work dir");
    std::fs::create_dir(&work).expect("mkdir");
    let spy = script(
        out,
        "spy.sh",
        r#"#!/bin/sh
cat > "$OUT_DIR/stdin.json"
env | grep '^POST_SAVE_' > "$OUT_DIR/env.txt"
env | cut -d= -f1 > "$OUT_DIR/env_names.txt"
for a in "$@"; do printf '%s\n' "$a"; done > "$OUT_DIR/argv.txt"
pwd > "$OUT_DIR/cwd.txt"
echo "$EXTRA" > "$OUT_DIR/extra.txt"
touch "$OUT_DIR/done"
"#,
    );
    let args = ["$HOME; echo pwned", "two words", "*", "`id`", "'quoted'", "a\"b"];
    let mut command = vec![spy.to_str().unwrap()];
    command.extend(args);
    let extra = format!("cwd = {}\nretry = {FAST_RETRY}", toml_str(work.to_str().unwrap()));
    let handler = exec_handler("spy", &command, out, &extra);
    let (db, mut daemon) = shop_with(&config_text(&handler)).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product, quantity) VALUES (7, 'espresso machine', 2)");
    let collected = daemon.next().await;
    eventually("the script to finish", || out.join("done").exists().then_some(())).await;

    // stdin: exactly the event the daemon routed, as JSON.
    let stdin = std::fs::read_to_string(out.join("stdin.json")).expect("stdin.json");
    let event: SaveEvent =
        serde_json::from_str(&stdin).unwrap_or_else(|e| panic!("stdin is not an event ({e}): {stdin}"));
    assert_eq!(stdin, collected.to_json());
    assert_eq!(event, collected);
    assert_eq!(event.sender, "public.shop_order");
    assert!(event.created);
    assert_eq!(event.instance["product"], "espresso machine");
    assert_eq!(event.instance["quantity"], 2);
    let id = event.id.expect("a durable event has a ledger id");

    // The daemon's own environment (which may hold DATABASE_URL or PGPASSWORD) is not passed
    // on: only an allow-list (PATH, HOME, LANG, …), the configured `env` and POST_SAVE_*.
    let allowed =
        ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR", "OUT_DIR", "EXTRA", "PWD", "SHLVL", "_"];
    for name in file_lines(&out.join("env_names.txt")) {
        assert!(allowed.contains(&name.as_str()) || name.starts_with("POST_SAVE_"), "leaked variable {name}");
        assert_ne!(name, "POST_SAVE_TEST_DATABASE_URL");
    }
    // Environment: what the daemon set.
    let inherited: BTreeMap<String, String> = std::env::vars().collect();
    let env: BTreeMap<String, String> = file_lines(&out.join("env.txt"))
        .iter()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .filter(|(k, v)| inherited.get(k) != Some(v))
        .collect();
    let expected: BTreeMap<String, String> = [
        ("POST_SAVE_HANDLER", "spy".to_owned()),
        ("POST_SAVE_ATTEMPT", "1".to_owned()),
        ("POST_SAVE_MAX_ATTEMPTS", "3".to_owned()),
        ("POST_SAVE_EVENT_ID", id.to_string()),
        ("POST_SAVE_SIGNAL", "post_save".to_owned()),
        ("POST_SAVE_SENDER", "public.shop_order".to_owned()),
        ("POST_SAVE_OP", "insert".to_owned()),
        ("POST_SAVE_CREATED", "true".to_owned()),
        ("POST_SAVE_PK", r#"{"id":1}"#.to_owned()),
        ("POST_SAVE_TXID", event.txid.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(env, expected);

    // argv verbatim: no shell expanded, split or ran anything.
    assert_eq!(file_lines(&out.join("argv.txt")), args);
    // Extra environment and working directory from the config.
    assert_eq!(file_lines(&out.join("extra.txt")), ["from config"]);
    let cwd = file_lines(&out.join("cwd.txt")).concat();
    assert_eq!(Path::new(&cwd).canonicalize().unwrap(), work.canonicalize().unwrap());

    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_kills_the_whole_process_group() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    let hang = script(
        out,
        "hang.sh",
        r#"#!/bin/sh
sleep 300 &
echo "$$ $! $POST_SAVE_ATTEMPT" >> "$OUT_DIR/pids"
exec sleep 300
"#,
    );
    let extra = "timeout = \"300ms\"\nretry = { attempts = 2, backoff = \"20ms\", max_backoff = \"100ms\" }";
    let (db, daemon) = shop_with(&config_text(&exec_handler("hang", &[hang.to_str().unwrap()], out, extra))).await;

    let started = Instant::now();
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'forever')");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 1).await;
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    let row = db
        .client()
        .await
        .query_one(
            "SELECT d.attempts, d.last_error, d.handler, d.event_id = e.id
             FROM post_save.dead_letter d, post_save.event e",
            &[],
        )
        .await
        .expect("dead letter");
    let (attempts, last_error, handler, same): (i32, String, String, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(attempts, 2);
    assert!(last_error.contains("timed out"), "{last_error}");
    assert_eq!(handler, "hang");
    assert!(same, "the dead letter names the ledger event");

    // Both attempts started a child (the script, then `sleep`) and a background grandchild.
    let runs = file_lines(&out.join("pids"));
    assert_eq!(runs.len(), 2, "{runs:?}");
    let mut pids = Vec::new();
    for (attempt, run) in runs.iter().enumerate() {
        let fields: Vec<&str> = run.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "{run}");
        assert_eq!(fields[2], (attempt + 1).to_string(), "attempt numbers");
        pids.extend(fields[..2].iter().map(|p| p.parse::<i32>().expect("pid")));
    }
    let still = eventually("every process of the group to be killed", || {
        let alive: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        alive.is_empty().then_some(alive)
    })
    .await;
    assert!(still.is_empty());

    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    let stats = daemon.stats.snapshot();
    assert_eq!((stats.dead, stats.failed_attempts, stats.retried), (1, 2, 1), "{stats:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_75_is_retried_until_it_succeeds() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    let flaky = script(
        out,
        "flaky.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$POST_SAVE_ATTEMPT" >> "$OUT_DIR/attempts"
n=$(wc -l < "$OUT_DIR/attempts")
if [ "$n" -le 2 ]; then
    echo "not yet" >&2
    exit 75
fi
exit 0
"#,
    );
    let extra = "retry = { attempts = 5, backoff = \"20ms\", max_backoff = \"100ms\" }";
    let (db, daemon) = shop_with(&config_text(&exec_handler("flaky", &[flaky.to_str().unwrap()], out, extra))).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'eventually')");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NOT NULL", 1).await;
    assert_eq!(file_lines(&out.join("attempts")), ["1", "2", "3"]);
    assert_eq!(db.query_i64("SELECT count(*) FROM post_save.dead_letter").await, 0);
    assert_eq!(db.query_i64("SELECT count(*) FROM post_save.event WHERE handled_at IS NULL").await, 0);
    let stats = daemon.stats.snapshot();
    assert_eq!(stats.retried, 2, "{stats:?}");
    assert_eq!(stats.failed_attempts, 2, "{stats:?}");
    assert_eq!(stats.dead, 0, "{stats:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_exit_codes_end_dead_after_the_configured_attempts_without_blocking_others() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    // Fails for row 1 only. Its first attempt also waits (up to 10 s) until the test releases
    // it: meanwhile the other handler, and other rows, must go on.
    let failing = script(
        out,
        "failing.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$POST_SAVE_EVENT_ID $POST_SAVE_ATTEMPT" >> "$OUT_DIR/failing.runs"
[ "$POST_SAVE_PK" = '{"id":1}' ] || exit 0
if [ "$POST_SAVE_ATTEMPT" = 1 ]; then
    i=0
    while [ ! -e "$OUT_DIR/release" ]; do
        i=$((i + 1))
        if [ "$i" -gt 200 ]; then echo "never released" >&2; exit 4; fi
        sleep 0.05
    done
fi
echo "boom" >&2
exit 3
"#,
    );
    let ok = script(
        out,
        "ok.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$POST_SAVE_EVENT_ID $POST_SAVE_PK" >> "$OUT_DIR/ok.runs"
"#,
    );
    let handlers = [
        exec_handler("failing", &[failing.to_str().unwrap()], out, &format!("timeout = \"20s\"\nretry = {FAST_RETRY}")),
        exec_handler("ok", &[ok.to_str().unwrap()], out, &format!("retry = {FAST_RETRY}")),
    ]
    .concat();
    let text = config_text(&handlers);
    let (db, daemon) = shop_with(&text).await;
    let failing_runs = out.join("failing.runs");
    let ok_runs = out.join("ok.runs");

    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'doomed')");
    let first: i64 = db.query_i64("SELECT min(id) FROM post_save.event").await;
    // The failing handler is stuck in its first attempt, and the other handler already ran.
    wait_for_lines(&failing_runs, 1).await;
    assert_eq!(wait_for_lines(&ok_runs, 1).await, [format!("{first} {{\"id\":1}}")]);
    // Another row flows through both handlers while row 1 is stuck.
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (2, 'fine')");
    let ok_lines = wait_for_lines(&ok_runs, 2).await;
    assert!(ok_lines[1].ends_with(r#" {"id":2}"#), "{ok_lines:?}");
    wait_for_lines(&failing_runs, 2).await;
    assert_eq!(file_lines(&failing_runs).len(), 2, "row 1 is still in its first attempt");
    std::fs::write(out.join("release"), "").expect("release");

    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 1).await;
    let row = db
        .client()
        .await
        .query_one(
            "SELECT event_id, handler, sender, attempts, last_error, event::text, dead_at IS NOT NULL
             FROM post_save.dead_letter",
            &[],
        )
        .await
        .expect("dead letter");
    let event_id: Option<i64> = row.get(0);
    let (handler, sender, attempts, last_error): (String, String, i32, String) =
        (row.get(1), row.get(2), row.get(3), row.get(4));
    let event: SaveEvent = serde_json::from_str(row.get::<_, &str>(5)).expect("the dead letter's event");
    assert_eq!(event_id, Some(first));
    assert_eq!(handler, "failing");
    assert_eq!(sender, "public.shop_order");
    assert_eq!(attempts, 3);
    assert!(last_error.contains("exited 3"), "{last_error}");
    assert!(last_error.contains("boom"), "{last_error}");
    assert_eq!(event.id, Some(first));
    assert_eq!(event.instance["product"], "doomed");
    assert!(row.get::<_, bool>(6));

    // Acknowledged: dead is final.
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    let runs_of_first = |l: &[String]| l.iter().filter(|r| r.starts_with(&format!("{first} "))).count();
    assert_eq!(runs_of_first(&file_lines(&failing_runs)), 3, "{:?}", file_lines(&failing_runs));
    let stats = daemon.stats.snapshot();
    assert_eq!((stats.dead, stats.failed_attempts, stats.retried), (1, 3, 2), "{stats:?}");
    daemon.stop().await;

    // A restart does not deliver it again; new rows still flow.
    let mut daemon = start(&db, config(&text)).await;
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (3, 'after restart')");
    let e = daemon.next().await;
    assert_eq!(e.instance["product"], "after restart", "the dead event is not redelivered");
    wait_for_lines(&ok_runs, 3).await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    assert_eq!(runs_of_first(&file_lines(&failing_runs)), 3);
    assert_eq!(file_lines(&ok_runs).len(), 3, "{:?}", file_lines(&ok_runs));
    assert_eq!(db.query_i64("SELECT count(*) FROM post_save.dead_letter").await, 1);
    assert_eq!(daemon.stats.snapshot().dead, 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limits_running_programs() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    let slow = script(
        out,
        "slow.sh",
        r#"#!/bin/sh
cat > /dev/null
start=$(date +%s%N)
sleep 0.3
end=$(date +%s%N)
echo "$POST_SAVE_EVENT_ID $start $end" >> "$OUT_DIR/spans"
"#,
    );
    let extra = format!("concurrency = 2\nretry = {FAST_RETRY}");
    let (db, daemon) = shop_with(&config_text(&exec_handler("slow", &[slow.to_str().unwrap()], out, &extra))).await;

    db.psql_ok("INSERT INTO shop_order (user_id, product) SELECT g, 'p' FROM generate_series(1, 6) g");
    let spans: Vec<(i64, u128, u128)> = wait_for_lines(&out.join("spans"), 6)
        .await
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    let mut ids: Vec<i64> = spans.iter().map(|s| s.0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 6, "each event ran once: {spans:?}");
    // The most spans running at any one start.
    let most = spans.iter().map(|&(_, s, _)| spans.iter().filter(|&&(_, s2, e2)| s2 <= s && s < e2).count()).max();
    assert_eq!(most, Some(2), "at most 2 at once, and 2 did run together: {spans:?}");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_keep_each_rows_events_in_commit_order() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    let picky = script(
        out,
        "picky.sh",
        r#"#!/bin/sh
echo "$POST_SAVE_EVENT_ID $POST_SAVE_ATTEMPT" >> "$OUT_DIR/attempts"
if [ "$POST_SAVE_ATTEMPT" = 1 ]; then
    cat > /dev/null
    exit 75
fi
cat >> "$OUT_DIR/handled.jsonl"
echo >> "$OUT_DIR/handled.jsonl"
"#,
    );
    // A backoff long enough that the later saves queue up behind the retried one.
    let extra = "retry = { attempts = 3, backoff = \"150ms\", max_backoff = \"300ms\" }";
    let (db, daemon) = shop_with(&config_text(&exec_handler("picky", &[picky.to_str().unwrap()], out, extra))).await;

    let update = "UPDATE shop_order SET quantity = quantity + 1 WHERE id = 1";
    let out_psql = db.psql_args(&[
        "-c",
        "INSERT INTO shop_order (user_id, product) VALUES (1, 'ordered')",
        "-c",
        update,
        "-c",
        update,
        "-c",
        update,
        "-c",
        update,
        "-c",
        update,
    ]);
    assert!(out_psql.status.success(), "{}", String::from_utf8_lossy(&out_psql.stderr));
    let handled: Vec<SaveEvent> = wait_for_lines(&out.join("handled.jsonl"), 6)
        .await
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let quantities: Vec<i64> = handled.iter().map(|e| e.instance["quantity"].as_i64().unwrap()).collect();
    assert_eq!(quantities, [1, 2, 3, 4, 5, 6], "handled in commit order");
    let ids: Vec<i64> = handled.iter().map(|e| e.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ledger ids in order: {ids:?}");
    let mut txids: Vec<i64> = handled.iter().map(|e| e.txid).collect();
    txids.dedup();
    assert_eq!(txids.len(), 6, "six transactions");

    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    // Every event failed once, then succeeded; attempts of one row never interleave.
    let attempts = file_lines(&out.join("attempts"));
    let expected: Vec<String> = ids.iter().flat_map(|id| [format!("{id} 1"), format!("{id} 2")]).collect();
    assert_eq!(attempts, expected);
    assert_eq!(daemon.stats.snapshot().retried, 6);
    daemon.stop().await;
}

// Regression tests of product bugs found while writing this file (a background child holding
// the pipes, work started after stop, an acknowledged event dispatched again), all fixed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_exits_0_leaving_a_background_child_is_done() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    let spawner = script(
        out,
        "spawner.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$POST_SAVE_ATTEMPT" >> "$OUT_DIR/runs"
sleep 20 &
exit 0
"#,
    );
    let extra = "timeout = \"10s\"\nretry = { attempts = 1 }";
    let (db, daemon) =
        shop_with(&config_text(&exec_handler("spawner", &[spawner.to_str().unwrap()], out, extra))).await;
    let started = Instant::now();
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'x')");
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NOT NULL", 1).await;
    let dead = db.psql_ok("SELECT attempts, last_error FROM post_save.dead_letter");
    assert_eq!(db.query_i64("SELECT count(*) FROM post_save.dead_letter").await, 0, "{dead}");
    assert!(started.elapsed() < Duration::from_secs(5), "done only after {:?}", started.elapsed());
    assert_eq!(file_lines(&out.join("runs")), ["1"]);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_starts_no_new_programs() {
    let dir = TempDir::new().expect("tempdir");
    let out = dir.path();
    let slow = script(
        out,
        "slow.sh",
        r#"#!/bin/sh
cat > /dev/null
echo "$POST_SAVE_EVENT_ID" >> "$OUT_DIR/runs"
sleep 1
"#,
    );
    let extra = format!("concurrency = 1\nretry = {FAST_RETRY}");
    let (db, daemon) = shop_with(&config_text(&exec_handler("slow", &[slow.to_str().unwrap()], out, &extra))).await;
    db.psql_ok("INSERT INTO shop_order (user_id, product) SELECT g, 'x' FROM generate_series(1, 5) g");
    wait_for_lines(&out.join("runs"), 1).await;
    let stopping = Instant::now();
    daemon.stop().await;
    let took = stopping.elapsed();
    // The running program finishes (grace 10 s); the 4 queued events are handed back: their
    // statement's ledger row (all 5 events) stays pending, delivered again after a restart.
    assert_eq!(
        file_lines(&out.join("runs")).len(),
        1,
        "programs started after stop: {:?}",
        file_lines(&out.join("runs"))
    );
    assert_eq!(db.query_i64("SELECT sum(n) FROM post_save.event WHERE handled_at IS NULL").await, 5);
    assert!(took < Duration::from_secs(3), "stop took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_never_dispatches_an_acknowledged_event_again() {
    use post_save::handler::{HandlerError, handler_fn};
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let text = "[daemon]\nsweep_interval = \"1h\"\nmax_in_flight = 1\nreconnect_min = \"10ms\"\n\n\
                [[watch]]\ntable = \"public.shop_order\"\n";
    let cfg = config(text);
    install(&db, &cfg).await;
    // Ledger ids step by 1000: the next statement's row (and event) id is 101000.
    db.psql_ok("SELECT setval(pg_get_serial_sequence('post_save.event', 'id'), 100000)");
    // A handler that holds the events in `held` until the test lets them go.
    let held: Arc<Mutex<HashSet<i64>>> = Arc::new(Mutex::new(HashSet::from([101_000, 50_000, 51_000])));
    let calls: Arc<Mutex<Vec<i64>>> = Arc::default();
    let mut registry = post_save::Registry::from_config(&cfg).expect("handlers build");
    let (gate, record) = (Arc::clone(&held), Arc::clone(&calls));
    let handler = handler_fn(move |e: SaveEvent| {
        let (gate, record) = (Arc::clone(&gate), Arc::clone(&record));
        async move {
            let id = e.id.unwrap_or_default();
            record.lock().unwrap().push(id);
            while gate.lock().unwrap().contains(&id) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<(), HandlerError>(())
        }
    });
    registry.register(post_save::Receiver::new("gate"), handler).unwrap();
    let daemon = support::start_with(&db, cfg, &mut registry).await;
    let called = |id: i64| {
        let calls = Arc::clone(&calls);
        move || calls.lock().unwrap().contains(&id).then_some(())
    };

    // Event 101 arrives by notification and holds the only in-flight permit.
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'a')");
    eventually("event 101000 to run", called(101_000)).await;
    // Events 50 and 51 of other rows whose notifications were missed: only a catch-up finds them.
    db.psql_ok(
        "INSERT INTO post_save.event (id, sender, op, n, head, rows) OVERRIDING SYSTEM VALUE \
         SELECT 50000 + g * 1000, sender, op, n, head, \
                json_build_array(json_build_array(json_build_object('id', 10 + g), rows->0, NULL::json, NULL::text[])) \
         FROM post_save.event, generate_series(0, 1) g WHERE id = 101000",
    );
    // The LISTEN connection drops; the new session's catch-up reads [50, 51, 101] and waits
    // for a permit for 50 (101 is still running).
    let client = db.client().await;
    let before: Vec<i32> = client
        .query("SELECT pid FROM pg_stat_activity WHERE datname = current_database()", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.psql_ok(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN \"post_save\"%'",
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let fetched: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> ALL($1) \
                 AND query LIKE '%SELECT id, sender, op, head::text, rows::text%WHERE handled_at IS NULL%'",
                &[&before],
            )
            .await
            .unwrap()
            .get(0);
        if fetched > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the new session never caught up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 101 finishes and is acknowledged while the catch-up walks its page.
    held.lock().unwrap().remove(&101_000);
    eventually("event 50 to run", called(50_000)).await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE id = 101000 AND handled_at IS NOT NULL", 1).await;
    eventually("the acknowledgement of 101", || (daemon.stats.snapshot().acked >= 1).then_some(())).await;
    held.lock().unwrap().remove(&50_000);
    eventually("event 51 to run", called(51_000)).await;
    held.lock().unwrap().remove(&51_000);
    // A new save is consumed only after the catch-up: once it ran, the page is through.
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (2, 'probe')");
    eventually("the probe event 102 to run", called(102_000)).await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    assert_eq!(
        *calls.lock().unwrap(),
        [101_000, 50_000, 51_000, 102_000],
        "an acknowledged event was dispatched again"
    );
    daemon.stop().await;
}
