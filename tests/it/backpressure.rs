//! Backpressure, with the real `post-save` binary as a child process: for 60 s a writer saves
//! 2,000 rows/s (each a single-row INSERT in its own transaction) into a durable table whose
//! only handler is slower than that, an `sql` handler that sleeps 2 ms per event on a few
//! connections. The backlog grows in the ledger, not in the daemon: its resident memory, sampled
//! every 500 ms from `/proc/<pid>/status`, stays under 100 MB the whole time, and once the writer
//! stops the backlog drains to zero within a deadline set by the handler's measured rate, with
//! every saved row handled at least once and nothing dead.
//!
//! The writer's and the handler's sessions run with `synchronous_commit = off` (a WAL flush per
//! commit caps this machine at about 500 commits/s); the daemon's own connections keep the
//! server's settings.
#![cfg(feature = "sql")]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_postgres::Client;

use crate::support::child::Daemon;
use crate::support::db::TestDb;
use crate::support::{PATIENCE, config, install};

/// The watched table, and the table the handler writes each handled row's id into (unwatched,
/// no key: a duplicate delivery shows as a second row).
const SCHEMA: &str = "CREATE TABLE item (id bigserial PRIMARY KEY, payload text NOT NULL);
    CREATE TABLE seen (id bigint NOT NULL)";

/// Rows saved per second, and for how long.
const WRITE_RATE: u64 = 2_000;
const WRITE_FOR: Duration = Duration::from_secs(60);
/// The writer's pace: every `TICK`, `WRITE_RATE × TICK` single-row INSERTs, pipelined on one
/// connection, each its own transaction.
const TICK: Duration = Duration::from_millis(10);
/// The writer may fall this far below `WRITE_RATE` before the test says the machine could not
/// produce the load it claims.
const WRITE_RATE_TOLERANCE: f64 = 0.95;

/// The handler: 2 ms asleep in the database per event (plus its transaction's round trips), on
/// `HANDLER_CONCURRENCY` connections at once: at most 2,000 events/s in theory, about half in
/// practice, so slower than the writer.
const HANDLER_STATEMENT: &str = "INSERT INTO seen SELECT $1::int8 FROM pg_sleep(0.002)";
const HANDLER_CONCURRENCY: usize = 4;

/// The bound under test.
const RSS_LIMIT_KB: u64 = 100 * 1024;
const RSS_EVERY: Duration = Duration::from_millis(500);
/// How often progress is printed.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Events not yet acknowledged.
const PENDING: &str = "SELECT coalesce(sum(n), 0)::int8 FROM post_save.event WHERE handled_at IS NULL";

/// What the daemon wrote on stderr, one JSON log line at a time.
#[derive(Debug)]
enum Line {
    /// `"message":"listening"`: LISTEN works and the backlog is caught up.
    Listening,
    /// A warning or an error, kept for the report and failure messages.
    Problem(String),
    /// Anything else.
    Other(String),
}

fn parse_line(text: &str) -> Line {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else { return Line::Problem(text.to_owned()) };
    if json["message"].as_str() == Some("listening") {
        return Line::Listening;
    }
    match json["level"].as_str() {
        Some("WARN" | "ERROR") => Line::Problem(text.to_owned()),
        _ => Line::Other(text.to_owned()),
    }
}

/// Everything the daemon has written so far.
#[derive(Default)]
struct Log {
    listening: usize,
    problems: Vec<String>,
    other: Vec<String>,
}

impl Log {
    fn push(&mut self, line: Line) {
        match line {
            Line::Listening => self.listening += 1,
            Line::Problem(text) => self.problems.push(text),
            Line::Other(text) => self.other.push(text),
        }
    }

    /// Takes whatever lines have arrived, without waiting.
    fn pump(&mut self, lines: &mut mpsc::UnboundedReceiver<Line>) {
        while let Ok(line) = lines.try_recv() {
            self.push(line);
        }
    }

    async fn wait_listening(&mut self, lines: &mut mpsc::UnboundedReceiver<Line>) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.listening == 0 {
            match tokio::time::timeout_at(deadline, lines.recv()).await {
                Ok(Some(line)) => self.push(line),
                Ok(None) => panic!("the daemon exited before listening:\n{}", self.tail()),
                Err(_) => panic!("the daemon did not start listening:\n{}", self.tail()),
            }
        }
    }

    /// The last lines, problems first, for a failure message.
    fn tail(&self) -> String {
        let mut last: Vec<&str> = self.problems.iter().rev().take(20).rev().map(String::as_str).collect();
        last.extend(self.other.iter().rev().take(10).rev().map(String::as_str));
        last.join("\n")
    }
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The resident set size of process `pid` in kB (`VmRSS` of `/proc/<pid>/status`); `None` once
/// it is gone.
async fn pending_now(client: &Client) -> i64 {
    client.query_one(PENDING, &[]).await.expect("pending").get(0)
}

async fn seen_now(client: &Client) -> i64 {
    client.query_one("SELECT count(*) FROM seen", &[]).await.expect("seen").get(0)
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Samples a process's RSS every [`RSS_EVERY`] on a task of its own; the peak of each phase.
struct RssSampler {
    /// Peak in kB while writing (phase 0) and while draining (phase 1).
    peaks: Arc<[AtomicU64; 2]>,
    last: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    draining: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peaks = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let last = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let draining = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (peaks, last, samples, draining, stop) =
                (Arc::clone(&peaks), Arc::clone(&last), Arc::clone(&samples), Arc::clone(&draining), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut every = tokio::time::interval(RSS_EVERY);
                every.set_missed_tick_behavior(MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    every.tick().await;
                    let Some(kb) = rss_kb(pid) else { return };
                    let phase = usize::from(draining.load(Ordering::Relaxed));
                    peaks[phase].fetch_max(kb, Ordering::Relaxed);
                    last.store(kb, Ordering::Relaxed);
                    samples.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        RssSampler { peaks, last, samples, draining, stop, task }
    }

    fn last(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    fn peak(&self, phase: usize) -> u64 {
        self.peaks[phase].load(Ordering::Relaxed)
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the RSS sampler panicked");
        self.samples.load(Ordering::Relaxed)
    }
}

/// What the writer did.
struct Written {
    rows: u64,
    took: Duration,
    /// Ticks that started more than one tick late (the writer fell behind its pace).
    late_ticks: u64,
}

/// Saves `WRITE_RATE` rows/s for `WRITE_FOR`, one single-row INSERT per transaction, pipelined
/// on one connection, paced by an interval (a late tick is made up at once, so the average
/// holds while the database keeps up). `progress` counts rows committed.
async fn write(client: Client, progress: Arc<AtomicU64>) -> Written {
    // The commits do not wait for their WAL flush: at 2,000 transactions/s a flush per commit
    // is more than this machine's disk does, and durability is not what is under test.
    client.batch_execute("SET synchronous_commit = off").await.expect("SET synchronous_commit");
    let insert = client.prepare("INSERT INTO item (payload) VALUES ($1)").await.expect("prepare");
    let per_tick = WRITE_RATE * u64::try_from(TICK.as_millis()).unwrap() / 1000;
    let ticks = u64::try_from(WRITE_FOR.as_millis() / TICK.as_millis()).unwrap();
    let payload = "x".repeat(100);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&payload];
    let mut pace = tokio::time::interval(TICK);
    pace.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let start = tokio::time::Instant::now();
    let mut late_ticks = 0;
    for _ in 0..ticks {
        let due = pace.tick().await;
        if due.elapsed() > TICK {
            late_ticks += 1;
        }
        let saves = (0..per_tick).map(|_| client.execute(&insert, &params));
        let counts = try_join_all(saves).await.expect("insert");
        assert!(counts.iter().all(|&n| n == 1));
        progress.fetch_add(per_tick, Ordering::Relaxed);
    }
    Written { rows: ticks * per_tick, took: start.elapsed(), late_ticks }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_writes_keeps_rss_under_100_mb_and_the_backlog_drains() {
    let test_start = Instant::now();
    let db = TestDb::new().await;
    db.psql_ok(SCHEMA);
    let dir = TempDir::new().expect("tempdir");
    let text = format!(
        "[daemon]\nsweep_interval = \"1h\"\n\n\
         [[watch]]\ntable = \"public.item\"\nmode = \"durable\"\noperations = [\"insert\"]\n\n\
         [[handler]]\nname = \"slow-sql\"\nsender = \"public.item\"\nkind = \"sql\"\n\
         statement = {}\nparams = [\"instance.id\"]\nconcurrency = {HANDLER_CONCURRENCY}\n\
         pool_size = {HANDLER_CONCURRENCY}\ntimeout = \"30s\"\nurl = {}\n\
         retry = {{ attempts = 5, backoff = \"100ms\", max_backoff = \"1s\" }}\n",
        toml_str(HANDLER_STATEMENT),
        // As for the writer: the handler's commits do not wait for their WAL flush, so its pace
        // is set by its sleep and its concurrency, not by the disk.
        toml_str(&format!("{} options='-c synchronous_commit=off'", db.conninfo)),
    );
    install(&db, &config(&text)).await;
    let config_path: PathBuf = dir.path().join("config.toml");
    std::fs::write(&config_path, &text).expect("write config");

    let (tx, mut lines) = mpsc::unbounded_channel();
    let mut log = Log::default();
    let mut daemon = Daemon::spawn(&config_path, &db.conninfo, tx, parse_line);
    log.wait_listening(&mut lines).await;
    let pid = u32::try_from(daemon.pid().as_raw()).expect("pid");
    let rss_at_start = rss_kb(pid).expect("the daemon's VmRSS");
    eprintln!("daemon pid {pid} listening; RSS {:.1} MB", mb(rss_at_start));
    let rss = RssSampler::start(pid);

    // Writing: 60 s at 2,000 rows/s.
    let progress = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write(db.client().await, Arc::clone(&progress)));
    let watcher = db.client().await;
    let write_start = Instant::now();
    let mut report = tokio::time::interval_at(tokio::time::Instant::now() + REPORT_EVERY, REPORT_EVERY);
    tokio::pin!(writer);
    let written = loop {
        tokio::select! {
            result = &mut writer => break result.expect("the writer panicked"),
            _ = report.tick() => {
                log.pump(&mut lines);
                assert!(daemon.exited().is_none(), "the daemon exited while writing:\n{}", log.tail());
                eprintln!(
                    "writing {:>3.0} s: {} rows saved, {} handled, {} pending; RSS {:.1} MB (peak {:.1})",
                    write_start.elapsed().as_secs_f64(),
                    progress.load(Ordering::Relaxed),
                    seen_now(&watcher).await,
                    pending_now(&watcher).await,
                    mb(rss.last()),
                    mb(rss.peak(0)),
                );
            }
        }
    };
    let backlog = pending_now(&watcher).await;
    let handled_while_writing = seen_now(&watcher).await;
    rss.draining.store(true, Ordering::Relaxed);
    let peak_writing = rss.peak(0);
    let write_rate = written.rows as f64 / written.took.as_secs_f64();
    let handler_rate = handled_while_writing as f64 / written.took.as_secs_f64();
    eprintln!(
        "wrote {} rows in {:.1} s: {write_rate:.0} rows/s ({} late ticks of {} ms); handled {handled_while_writing} \
         meanwhile: {handler_rate:.0} events/s; backlog at the end of writing: {backlog} events; \
         peak RSS while writing {:.1} MB",
        written.rows,
        written.took.as_secs_f64(),
        written.late_ticks,
        TICK.as_millis(),
        mb(peak_writing),
    );
    assert!(
        write_rate >= WRITE_RATE as f64 * WRITE_RATE_TOLERANCE,
        "the writer managed only {write_rate:.0} rows/s of {WRITE_RATE}"
    );
    assert!(backlog > 0, "nothing pending at the end of writing: the handler kept up ({handler_rate:.0}/s)");
    assert!(peak_writing < RSS_LIMIT_KB, "peak RSS while writing {:.1} MB", mb(peak_writing));

    // Draining: the backlog goes to zero within 3× the time the handler's rate says, plus 60 s.
    let drain_limit = Duration::from_secs_f64(backlog as f64 / handler_rate.max(1.0) * 3.0) + Duration::from_secs(60);
    let drain_start = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let pending = pending_now(&watcher).await;
        if pending == 0 {
            break;
        }
        log.pump(&mut lines);
        assert!(daemon.exited().is_none(), "the daemon exited while draining:\n{}", log.tail());
        assert!(
            drain_start.elapsed() < drain_limit,
            "{pending} events still pending {drain_limit:?} after the writer stopped (backlog was {backlog}):\n{}",
            log.tail()
        );
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            eprintln!(
                "draining {:>3.0} s: {pending} pending; RSS {:.1} MB (peak {:.1})",
                drain_start.elapsed().as_secs_f64(),
                mb(rss.last()),
                mb(rss.peak(1)),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_time = drain_start.elapsed();
    let peak_draining = rss.peak(1);
    let samples = rss.finish().await;
    let drain_rate = backlog as f64 / drain_time.as_secs_f64();
    eprintln!(
        "drained {backlog} events in {:.1} s ({drain_rate:.0} events/s, limit {:.0} s); peak RSS while draining \
         {:.1} MB; {samples} RSS samples",
        drain_time.as_secs_f64(),
        drain_limit.as_secs_f64(),
        mb(peak_draining),
    );
    assert!(peak_draining < RSS_LIMIT_KB, "peak RSS while draining {:.1} MB", mb(peak_draining));

    // Every saved row was handled at least once, and only saved rows were.
    let rows = i64::try_from(written.rows).unwrap();
    assert_eq!(db.query_i64("SELECT count(*) FROM item").await, rows);
    assert_eq!(db.query_i64("SELECT sum(n)::int8 FROM post_save.event").await, rows, "events in the ledger");
    let distinct = db.query_i64("SELECT count(DISTINCT id) FROM seen").await;
    let strangers =
        db.query_i64("SELECT count(*) FROM seen s WHERE NOT EXISTS (SELECT FROM item i WHERE i.id = s.id)").await;
    let handled = db.query_i64("SELECT count(*) FROM seen").await;
    let dead = db.query_i64("SELECT count(*) FROM post_save.dead_letter").await;
    eprintln!("{rows} rows saved; {distinct} handled, {} duplicates; {dead} dead letters", handled - distinct);
    assert_eq!(strangers, 0, "the handler saw ids that were never saved");
    assert_eq!(distinct, rows, "rows never handled: {}", rows - distinct);
    assert_eq!(dead, 0, "dead letters");

    // And it still stops cleanly.
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait(Duration::from_secs(15)).await;
    while let Some(line) = lines.recv().await {
        log.push(line);
    }
    assert!(status.success(), "the daemon exited with {status}:\n{}", log.tail());
    if !log.problems.is_empty() {
        eprintln!("{} warnings or errors from the daemon; the last ones:", log.problems.len());
        for line in log.problems.iter().rev().take(10).rev() {
            eprintln!("  {line}");
        }
    }
    eprintln!(
        "summary: peak RSS {:.1} MB (start {:.1}); backlog {backlog}; handler {handler_rate:.0}/s while writing, \
         {drain_rate:.0}/s draining; drain {:.1} s; test {:.1} s",
        mb(peak_writing.max(peak_draining)),
        mb(rss_at_start),
        drain_time.as_secs_f64(),
        test_start.elapsed().as_secs_f64(),
    );
}
