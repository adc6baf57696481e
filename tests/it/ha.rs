//! Several daemons on one database (`daemon.lease`): exactly one dispatches; when it is
//! SIGKILLed a standby takes over within 10 s; when the next one is SIGSTOPped past its lease,
//! another takes over, and the frozen one, resumed, dispatches nothing more. Every save is
//! handled. Who delivered what, and when, comes from the daemons' JSON log lines, read as they
//! are written.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::support;
use crate::support::child::{self, Daemon};
use crate::support::db::TestDb;
use crate::support::{PATIENCE, config, install};

const LEASE: Duration = Duration::from_secs(3);

fn config_text() -> String {
    format!(
        "[daemon]\nlease = \"{}s\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\n\
         [[watch]]\ntable = \"public.item\"\n\n\
         [[handler]]\nname = \"record\"\nsender = \"public.item\"\nkind = \"log\"\nfields = [\"id\", \"pk\"]\n",
        LEASE.as_secs()
    )
}

/// A line of one daemon, as the test read it.
#[derive(Debug)]
enum Seen {
    Delivered { row: i64 },
    Dispatching,
    Standby,
    Other(String),
}

/// Starts daemon `index`: each line it logs goes to `tx` with the index and when it was read.
fn spawn(index: usize, config: &std::path::Path, db: &TestDb, tx: mpsc::Sender<(usize, Instant, Seen)>) -> Daemon {
    Daemon::start(child::command(config, &db.conninfo), move |text| {
        let at = Instant::now();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let seen = match v["message"].as_str() {
            Some("save event") => {
                let event: serde_json::Value =
                    serde_json::from_str(v["event"].as_str().unwrap_or("{}")).unwrap_or_default();
                Seen::Delivered { row: event["pk"]["id"].as_i64().unwrap_or(-1) }
            }
            Some("lease acquired: dispatching") => Seen::Dispatching,
            Some("standby: another instance holds the lease") => Seen::Standby,
            _ => Seen::Other(v["message"].as_str().unwrap_or_default().to_owned()),
        };
        tx.send((index, at, seen)).is_ok()
    })
}

/// Everything the daemons said, in the order the test read it.
struct Log {
    rx: mpsc::Receiver<(usize, Instant, Seen)>,
    lines: Vec<(usize, Instant, Seen)>,
}

impl Log {
    /// Reads until `pred` holds for a line; returns that line's daemon and time.
    fn until(&mut self, what: &str, pred: impl Fn(usize, &Seen) -> bool) -> (usize, Instant) {
        let deadline = Instant::now() + PATIENCE;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok((i, at, seen)) => {
                    let hit = pred(i, &seen);
                    self.lines.push((i, at, seen));
                    if hit {
                        return (i, at);
                    }
                }
                Err(_) => break,
            }
        }
        panic!("never saw {what}");
    }

    /// Reads what arrives until `quiet` passes without a line, or `most` in all.
    fn drain(&mut self, quiet: Duration, most: Duration) {
        let end = Instant::now() + most;
        while Instant::now() < end {
            match self.rx.recv_timeout(quiet) {
                Ok(line) => self.lines.push(line),
                Err(_) => return,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dispatcher_at_a_time_through_a_kill_and_a_freeze_and_nothing_lost() {
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE item (id bigserial PRIMARY KEY, name text NOT NULL)");
    let text = config_text();
    install(&db, &config(&text)).await;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &text).unwrap();

    let (tx, rx) = mpsc::channel();
    let mut daemons: Vec<Option<Daemon>> = (0..3).map(|i| Some(spawn(i, &path, &db, tx.clone()))).collect();
    let mut log = Log { rx, lines: Vec::new() };
    let (first, _) = log.until("a daemon taking the lease", |_, s| matches!(s, Seen::Dispatching));

    // A steady stream of saves, one every 20 ms, for the whole test.
    let writer_db = db.conninfo.clone();
    let (stop_writing, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&writer_db, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let mut written = 0i64;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stopped => return written,
            }
            client.execute("INSERT INTO item (name) VALUES ('x')", &[]).await.unwrap();
            written += 1;
        }
    });
    log.until("a first delivery", |i, s| i == first && matches!(s, Seen::Delivered { .. }));

    // 1. The dispatcher dies.
    daemons[first].as_ref().unwrap().signal(Signal::SIGKILL);
    let killed = Instant::now();
    drop(daemons[first].take());
    let (second, took_over) =
        log.until("a takeover after the kill", |i, s| i != first && matches!(s, Seen::Delivered { .. }));
    let takeover = took_over - killed;
    eprintln!("takeover after SIGKILL: {takeover:?} (lease {LEASE:?})");
    assert!(takeover < Duration::from_secs(10), "takeover took {takeover:?}");

    // 2. The new dispatcher freezes past its lease, then resumes. It is frozen once it has
    // caught up and handles the steady stream: a process frozen in the middle of an attempt
    // finishes that attempt when it resumes, which no lease can prevent (see the README).
    log.until("the second dispatcher listening", |i, s| i == second && matches!(s, Seen::Other(m) if m == "listening"));
    log.drain(Duration::from_secs(1), Duration::from_secs(1));
    log.until("the second dispatcher delivering", |i, s| i == second && matches!(s, Seen::Delivered { .. }));
    daemons[second].as_ref().unwrap().signal(Signal::SIGSTOP);
    let frozen = Instant::now();
    let (third, _) = log.until("a takeover from the frozen one", |i, s| {
        i != second && i != first && matches!(s, Seen::Delivered { .. })
    });
    eprintln!("takeover from the frozen dispatcher: {:?}", frozen.elapsed());
    tokio::time::sleep(LEASE).await;
    daemons[second].as_ref().unwrap().signal(Signal::SIGCONT);
    // The resumed one finds its lease gone and stands by.
    log.until("the resumed daemon standing by", |i, s| i == second && matches!(s, Seen::Standby));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let _ = stop_writing.send(());
    let written = writer.await.unwrap();
    support::wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    log.drain(Duration::from_millis(500), Duration::from_secs(3));

    // Never two dispatching at once: once the third delivered, the frozen second never did again,
    // and the killed first never delivered after the second took over.
    let third_start = log.lines.iter().find(|(i, _, s)| *i == third && matches!(s, Seen::Delivered { .. })).unwrap().1;
    let late: Vec<_> = log
        .lines
        .iter()
        .filter(|(i, at, s)| *i == second && *at > third_start && matches!(s, Seen::Delivered { .. }))
        .collect();
    if !late.is_empty() {
        let around: Vec<String> = log
            .lines
            .iter()
            .filter(|(i, at, _)| *at + Duration::from_millis(300) > frozen && (*i == second || *i == third))
            .map(|(i, at, s)| {
                let t = if *at >= frozen {
                    at.duration_since(frozen).as_secs_f64()
                } else {
                    -frozen.duration_since(*at).as_secs_f64()
                };
                format!("{i} {t:+.3}s {s:?}")
            })
            .collect();
        panic!("the frozen daemon {second} delivered after {third} took over: {late:?}\n{}", around.join("\n"));
    }
    let second_start =
        log.lines.iter().find(|(i, _, s)| *i == second && matches!(s, Seen::Delivered { .. })).unwrap().1;
    assert!(
        !log.lines.iter().any(|(i, at, s)| *i == first && *at > second_start && matches!(s, Seen::Delivered { .. })),
        "the killed daemon delivered after the takeover"
    );

    // Nothing lost: every saved row was delivered by someone.
    let mut by_row: BTreeMap<i64, usize> = BTreeMap::new();
    for (_, _, s) in &log.lines {
        if let Seen::Delivered { row } = s {
            *by_row.entry(*row).or_default() += 1;
        }
    }
    let rows: BTreeSet<i64> = by_row.keys().copied().collect();
    let expected: BTreeSet<i64> = (1..=written).collect();
    let missing: Vec<_> = expected.difference(&rows).collect();
    assert!(missing.is_empty(), "rows never delivered: {missing:?}");
    let again = by_row.values().filter(|n| **n > 1).count();
    eprintln!("{written} rows saved, all delivered; {again} delivered more than once (at least once)");
}
