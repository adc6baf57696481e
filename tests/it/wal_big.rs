//! One transaction bigger than a daemon should hold: a million-row `INSERT … SELECT` on a table
//! captured from the WAL, delivered completely by the real binary with its peak RSS (VmHWM)
//! printed and under 100 MB; and the same with the daemon SIGKILLed halfway through delivery
//! and started again: every row arrives, the repeats are counted.
//!
//! `a_five_million_row_transaction…` is the same at five times the size; it takes minutes, so
//! it runs on demand: `cargo nextest run --run-ignored all -E 'binary(it) & test(/^wal_big::/)'`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use post_save::SaveEvent;
use post_save::event::Op;
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::support;
use crate::support::child::Daemon;
use crate::support::db::TestDb;
use crate::support::{config, install};

const LIMIT_MB: u64 = 100;

/// A log line of the daemon: the key of a delivered save, or anything else.
enum Line {
    Saved(i64),
    Other(String),
}

/// Reads the key straight out of the line: a million lines through two JSON parses each would
/// make the test, not the daemon, the slow side.
fn parse(text: &str) -> Line {
    const KEY: &str = r#"{\"pk\":{\"id\":"#;
    if !text.contains(r#""message":"save event""#) {
        return Line::Other(text.to_owned());
    }
    let id = text.find(KEY).map(|at| &text[at + KEY.len()..]).and_then(|rest| {
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        rest[..end].parse().ok()
    });
    Line::Saved(id.unwrap_or_else(|| panic!("a save event line without its key: {text}")))
}

/// The daemon's config: the table captured from the WAL, each save logged with its key.
fn setup(dir: &Path) -> PathBuf {
    let text = "[[watch]]\ntable = \"public.bulk\"\ncapture = \"wal\"\noperations = [\"insert\"]\n\n\
                [[handler]]\nname = \"bulk-log\"\nsender = \"public.bulk\"\nkind = \"log\"\nlevel = \"info\"\n\
                fields = [\"pk\"]\n";
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Peak resident set of a process, in MB, from `/proc/<pid>/status`.
fn peak_rss_mb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
    let kb: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM in kB");
    kb / 1024
}

/// Receives delivered keys until `wanted` distinct ones have arrived (or `stop_at` of them,
/// when given); returns how many deliveries it counted in all.
async fn collect(
    lines: &mut mpsc::UnboundedReceiver<Line>,
    seen: &mut HashSet<i64>,
    until: usize,
    patience: Duration,
    others: &mut Vec<String>,
) -> u64 {
    let deadline = tokio::time::Instant::now() + patience;
    let mut deliveries = 0;
    while seen.len() < until {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(Line::Saved(id))) => {
                deliveries += 1;
                seen.insert(id);
            }
            Ok(Some(Line::Other(text))) => {
                if others.len() < 200 {
                    others.push(text);
                }
            }
            Ok(None) => panic!("the daemon exited after {} of {until} rows:\n{}", seen.len(), others.join("\n")),
            Err(_) => panic!("{} of {until} rows arrived within {patience:?}:\n{}", seen.len(), others.join("\n")),
        }
    }
    deliveries
}

/// Inserts `rows` rows in one statement, captured from the WAL; kills the daemon once `kill_at`
/// of them have arrived (when given) and starts another; checks that every row arrives, the
/// daemons' peak RSS, and that the slot is confirmed past the transaction at the end.
async fn one_big_transaction(rows: i64, kill_at: Option<usize>) {
    let db = TestDb::new_logical().await;
    db.psql_ok("CREATE TABLE bulk (id bigint PRIMARY KEY, label text NOT NULL, at timestamptz NOT NULL DEFAULT now())");
    let dir = TempDir::new().expect("tempdir");
    let path = setup(dir.path());
    install(&db, &config(&std::fs::read_to_string(&path).expect("config"))).await;

    let (tx, mut lines) = mpsc::unbounded_channel();
    let mut daemon = Daemon::spawn(&path, &db.conninfo, tx.clone(), parse);
    let started = Instant::now();
    let mut client = db.client().await;
    let writer = client.transaction().await.expect("begin");
    let insert = format!("INSERT INTO bulk (id, label) SELECT g, 'row ' || g FROM generate_series(1, {rows}) g");
    writer.batch_execute(&insert).await.expect("insert");
    // before its commit record: a slot confirmed this far is past the whole transaction
    let before_commit: i64 =
        writer.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8", &[]).await.expect("lsn").get(0);
    writer.commit().await.expect("commit");
    let written = started.elapsed();
    let wanted = usize::try_from(rows).expect("rows");
    let patience = Duration::from_secs(60 + 150 * u64::try_from(rows / 500_000).expect("rows"));
    let (mut seen, mut others) = (HashSet::with_capacity(wanted), Vec::new());
    let mut deliveries = 0;
    let mut peaks = Vec::new();
    if let Some(kill_at) = kill_at {
        deliveries += collect(&mut lines, &mut seen, kill_at, patience, &mut others).await;
        peaks.push(peak_rss_mb(daemon.pid().as_raw()));
        daemon.signal(Signal::SIGKILL);
        daemon.wait(Duration::from_secs(10)).await;
        println!("killed after {} of {rows} rows had arrived", seen.len());
        daemon = Daemon::spawn(&path, &db.conninfo, tx, parse);
    }
    deliveries += collect(&mut lines, &mut seen, wanted, patience, &mut others).await;
    let delivered = started.elapsed();
    peaks.push(peak_rss_mb(daemon.pid().as_raw()));

    // the slot moves past the transaction once its last batch is done
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let confirmed: i64 = client
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE database = current_database()",
                &[],
            )
            .await
            .expect("slot")
            .get(0);
        if confirmed > before_commit {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot was not confirmed past the transaction: {confirmed} <= {before_commit}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.signal(Signal::SIGTERM);
    daemon.wait(Duration::from_secs(30)).await;

    let repeats = deliveries - u64::try_from(wanted).expect("rows");
    println!(
        "{rows} rows in one transaction: written in {:.1} s, all delivered {:.1} s after the statement began; \
         daemon peak RSS (VmHWM) {peaks:?} MB; {repeats} delivered twice",
        written.as_secs_f64(),
        delivered.as_secs_f64(),
    );
    assert_eq!(seen.len(), wanted);
    assert!(seen.iter().all(|id| (1..=rows).contains(id)));
    assert!(peaks.iter().all(|mb| *mb < LIMIT_MB), "peak RSS {peaks:?} MB, over {LIMIT_MB} MB");
    if kill_at.is_none() {
        assert_eq!(repeats, 0, "no repeats without a crash");
    }
}

/// A transaction past the size that goes to a temporary file, which changes its table half way
/// and names its actor at the end: each row arrives with the columns it was written with, in
/// order, every event with the actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_transaction_that_alters_its_table_half_way_arrives_row_by_row_as_written() {
    let db = TestDb::new_logical().await;
    db.psql_ok("CREATE TABLE bulk (id bigint PRIMARY KEY, label text NOT NULL)");
    let config =
        config("[[watch]]\ntable = \"public.bulk\"\ncapture = \"wal\"\noperations = [\"insert\", \"update\"]\n");
    install(&db, &config).await;
    let mut daemon = support::start(&db, config).await;
    db.psql_ok(
        "BEGIN;
         INSERT INTO bulk SELECT g, 'row ' || g FROM generate_series(1, 30000) g;
         ALTER TABLE bulk ADD COLUMN size integer NOT NULL DEFAULT 7;
         INSERT INTO bulk SELECT g, 'row ' || g, g FROM generate_series(30001, 40000) g;
         UPDATE bulk SET label = 'changed' WHERE id = 1;
         SELECT pg_logical_emit_message(true, 'post_save.actor', 'loader');
         COMMIT",
    );
    // rows are delivered in parallel, each row's saves in order
    let mut by_row: BTreeMap<i64, Vec<SaveEvent>> = BTreeMap::new();
    for e in daemon.take(40_001).await {
        by_row.entry(e.pk["id"].as_i64().expect("an integer key")).or_default().push(e);
    }
    assert_eq!(by_row.len(), 40_000);
    for (id, saves) in &by_row {
        let insert = &saves[0];
        assert_eq!(insert.op, Op::Insert, "row {id}");
        assert_eq!(insert.instance.get("size").is_some(), *id > 30_000, "row {id}: {}", *insert.instance);
        assert!(saves.iter().all(|e| e.actor.actor.as_deref() == Some("loader")), "row {id}");
    }
    let first = &by_row[&1];
    assert_eq!(first.len(), 2);
    assert_eq!((first[1].op, first[1].update_fields.clone()), (Op::Update, Some(vec!["label".to_owned()])));
    assert_eq!(first[1].instance["size"], 7);
    daemon.assert_quiet_until(&db, "INSERT INTO bulk VALUES (100000, 'barrier', 7)", |e| e.pk["id"] == 100_000).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_arrives_whole_in_bounded_memory() {
    one_big_transaction(1_000_000, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_survives_a_sigkill_halfway_through_delivery() {
    one_big_transaction(1_000_000, Some(500_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run on demand with --run-ignored all"]
async fn a_five_million_row_transaction_arrives_whole_in_bounded_memory() {
    one_big_transaction(5_000_000, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run on demand with --run-ignored all"]
async fn a_five_million_row_transaction_survives_a_sigkill_halfway_through_delivery() {
    one_big_transaction(5_000_000, Some(2_500_000)).await;
}
