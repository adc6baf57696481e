//! PostgreSQL itself crashes and recovers (`pg_ctl restart -m immediate`) while 10,000 inserts,
//! and updates of some of those rows, stream in from 4 clients, with the real `post-save` binary
//! running against a private cluster of this test's own. After recovery every committed save is
//! handled at least once, the duplicates are counted and reported, and each row's events reach
//! the handler in commit order.
//!
//! The writers survive the restart as an application would: on an error they reconnect, and a
//! save whose outcome is unknown (the server died around its COMMIT) is resolved by reading the
//! row back through its client-generated key before it is retried. "Committed" is what the
//! table holds after recovery.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use post_save::testing::cluster::{ClusterOptions, StopMode, TempCluster};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls, Statement};

use crate::support::child::Daemon;
use crate::support::db::{error_chain, query_i64};
use crate::support::{PATIENCE, config};

const SHOP: &str = "CREATE TABLE shop_order (
    id bigserial PRIMARY KEY, client_key text NOT NULL UNIQUE, writer integer NOT NULL,
    quantity integer NOT NULL DEFAULT 1)";

const WRITERS: usize = 4;
const ROWS_PER_WRITER: usize = 2500;
const TOTAL_INSERTS: usize = WRITERS * ROWS_PER_WRITER;
/// Rows whose index is a multiple of this are updated twice after their insert: quantity 1 → 2
/// → 3, each update its own transaction, interleaved with later inserts.
const UPDATED_EVERY: usize = 5;
/// (how many saves of later rows after the insert, new quantity) of those updates.
const UPDATES: [(usize, i32); 2] = [(7, 2), (13, 3)];
/// Most failed attempts at one save before the test gives up on it.
const MAX_ERRORS_PER_SAVE: usize = 20;

/// What the daemon wrote on stderr, one JSON log line at a time.
#[derive(Debug)]
enum Line {
    /// `"message":"listening"`: a session is caught up and live.
    Listening,
    /// `"database connection lost; reconnecting"`.
    Reconnecting(String),
    /// `"message":"save event"` of the log handler.
    Handled(Handled),
    /// Anything else, kept for the report and failure messages.
    Other(String),
}

/// One event as the log handler saw it.
#[derive(Debug, Clone)]
struct Handled {
    id: i64,
    row: i64,
    key: String,
    quantity: i64,
}

fn parse_line(text: &str) -> Line {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else { return Line::Other(text.to_owned()) };
    match json["message"].as_str() {
        Some("listening") => Line::Listening,
        Some("database connection lost; reconnecting") => Line::Reconnecting(text.to_owned()),
        Some("save event") => {
            let event: serde_json::Value = json["event"]
                .as_str()
                .and_then(|e| serde_json::from_str(e).ok())
                .unwrap_or_else(|| panic!("a save event line without an event field: {text}"));
            let number = |v: &serde_json::Value| v.as_i64().unwrap_or_else(|| panic!("not an integer in {text}"));
            Line::Handled(Handled {
                id: number(&event["id"]),
                row: number(&event["pk"]["id"]),
                key: event["instance"]["client_key"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no client_key in {text}"))
                    .to_owned(),
                quantity: number(&event["instance"]["quantity"]),
            })
        }
        _ => Line::Other(text.to_owned()),
    }
}

/// Everything the daemon has written so far, sorted by kind; `handled` in stderr order.
#[derive(Default)]
struct Log {
    handled: Vec<Handled>,
    listening: usize,
    reconnecting: Vec<String>,
    other: Vec<String>,
}

impl Log {
    fn push(&mut self, line: Line) {
        match line {
            Line::Listening => self.listening += 1,
            Line::Reconnecting(text) => self.reconnecting.push(text),
            Line::Handled(h) => self.handled.push(h),
            Line::Other(text) => self.other.push(text),
        }
    }

    /// Takes whatever lines have arrived, without waiting.
    fn pump(&mut self, lines: &mut mpsc::UnboundedReceiver<Line>) {
        while let Ok(line) = lines.try_recv() {
            self.push(line);
        }
    }

    /// Receives lines until the `n`th "listening".
    async fn wait_listening(&mut self, lines: &mut mpsc::UnboundedReceiver<Line>, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.listening < n {
            match tokio::time::timeout_at(deadline, lines.recv()).await {
                Ok(Some(line)) => self.push(line),
                Ok(None) => panic!("the daemon exited before listening:\n{}", self.tail()),
                Err(_) => panic!("the daemon did not start listening:\n{}", self.tail()),
            }
        }
    }

    /// The last non-event lines, for a failure message.
    fn tail(&self) -> String {
        let mut last: Vec<&str> = self.other.iter().chain(&self.reconnecting).map(String::as_str).collect();
        last.drain(..last.len().saturating_sub(30));
        last.join("\n")
    }
}

fn client_key(writer: usize, row: usize) -> String {
    format!("w{writer}-r{row}")
}

/// One save a writer makes, each its own single-row transaction.
#[derive(Debug, Clone, Copy)]
enum Save {
    Insert { writer: usize, row: usize },
    Update { writer: usize, row: usize, quantity: i32 },
}

/// Writer `writer`'s saves in order: its rows' inserts, each updated row's updates a few saves
/// after its insert (so a restart can fall between a row's events).
fn plan(writer: usize) -> Vec<Save> {
    let mut saves = Vec::new();
    for i in 0..ROWS_PER_WRITER + UPDATES[UPDATES.len() - 1].0 + 1 {
        if i < ROWS_PER_WRITER {
            saves.push(Save::Insert { writer, row: i });
        }
        for (lag, quantity) in UPDATES {
            if let Some(row) = i.checked_sub(lag)
                && row < ROWS_PER_WRITER
                && row.is_multiple_of(UPDATED_EVERY)
            {
                saves.push(Save::Update { writer, row, quantity });
            }
        }
    }
    saves
}

/// The quantity a row ends with when every save of the plan has committed once.
fn final_quantity(row: usize) -> i32 {
    if row.is_multiple_of(UPDATED_EVERY) { UPDATES[UPDATES.len() - 1].1 } else { 1 }
}

/// A writer's connection with its statements prepared.
struct Conn {
    client: Client,
    insert: Statement,
    update: Statement,
    read: Statement,
}

impl Conn {
    async fn open(conninfo: &str) -> Result<Conn, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
        tokio::spawn(async move {
            // The error, if any, surfaces on the client's next call.
            let _ = connection.await;
        });
        let insert = client.prepare("INSERT INTO shop_order (client_key, writer) VALUES ($1, $2)").await?;
        let update =
            client.prepare("UPDATE shop_order SET quantity = $2 WHERE client_key = $1 AND quantity = $2 - 1").await?;
        let read = client.prepare("SELECT quantity FROM shop_order WHERE client_key = $1").await?;
        Ok(Conn { client, insert, update, read })
    }

    /// Connects, retrying while the server is down or in recovery, for at most [`PATIENCE`].
    async fn open_retrying(conninfo: &str) -> Conn {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let error = match tokio::time::timeout(PATIENCE, Conn::open(conninfo)).await {
                Ok(Ok(conn)) => return conn,
                Ok(Err(e)) => error_chain(&e),
                Err(_) => "no answer".to_owned(),
            };
            assert!(Instant::now() < deadline, "could not reconnect within {PATIENCE:?}: {error}");
            // Polling for the server to come back, not a wait for correctness.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn apply(&self, save: Save) -> Result<(), tokio_postgres::Error> {
        let n = match save {
            Save::Insert { writer, row } => {
                let w = i32::try_from(writer).expect("writer");
                self.client.execute(&self.insert, &[&client_key(writer, row), &w]).await?
            }
            Save::Update { writer, row, quantity } => {
                self.client.execute(&self.update, &[&client_key(writer, row), &quantity]).await?
            }
        };
        assert_eq!(n, 1, "{save:?} changed {n} rows");
        Ok(())
    }

    /// Whether `save` is in the table: its row exists, with at least its quantity.
    async fn applied(&self, save: Save) -> Result<bool, tokio_postgres::Error> {
        let (writer, row, quantity) = match save {
            Save::Insert { writer, row } => (writer, row, 1),
            Save::Update { writer, row, quantity } => (writer, row, quantity),
        };
        let got = self.client.query_opt(&self.read, &[&client_key(writer, row)]).await?;
        Ok(got.is_some_and(|r| r.get::<_, i32>(0) >= quantity))
    }
}

/// What a writer went through.
#[derive(Debug, Default)]
struct WriterReport {
    /// Failed statements (the restart, and connecting while the server recovers).
    errors: usize,
    /// Saves whose statement failed but which the table shows committed.
    committed_unseen: usize,
    /// Saves whose statement failed and which had not committed: made again.
    redone: usize,
    first_error: Option<String>,
}

/// Makes `writer`'s saves one by one, surviving connection loss; counts inserts in `inserted`.
async fn write(conninfo: String, writer: usize, inserted: Arc<AtomicUsize>) -> WriterReport {
    let mut report = WriterReport::default();
    let mut conn = Conn::open_retrying(&conninfo).await;
    for save in plan(writer) {
        let mut errors = 0;
        let mut fail = |report: &mut WriterReport, e: tokio_postgres::Error| {
            errors += 1;
            report.errors += 1;
            let text = error_chain(&e);
            assert!(errors < MAX_ERRORS_PER_SAVE, "writer {writer}: {save:?} keeps failing: {text}");
            report.first_error.get_or_insert(text);
        };
        loop {
            match tokio::time::timeout(PATIENCE, conn.apply(save)).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => fail(&mut report, e),
                Err(_) => panic!("writer {writer}: {save:?} got no answer within {PATIENCE:?}"),
            }
            // The outcome is unknown: reconnect and look.
            let applied = loop {
                conn = Conn::open_retrying(&conninfo).await;
                match tokio::time::timeout(PATIENCE, conn.applied(save)).await {
                    Ok(Ok(applied)) => break applied,
                    Ok(Err(e)) => fail(&mut report, e),
                    Err(_) => panic!("writer {writer}: reading back {save:?} got no answer within {PATIENCE:?}"),
                }
            };
            if applied {
                report.committed_unseen += 1;
                break;
            }
            report.redone += 1;
        }
        if matches!(save, Save::Insert { .. }) {
            inserted.fetch_add(1, Ordering::Relaxed);
        }
    }
    report
}

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("could not connect to {conninfo}: {}", error_chain(&e)));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Waits until `inserted` reaches `at`; panics when it stops moving for [`PATIENCE`].
async fn wait_inserted(inserted: &AtomicUsize, at: usize) {
    let mut last = (inserted.load(Ordering::Relaxed), Instant::now());
    while last.0 < at {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = inserted.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        assert!(last.1.elapsed() < PATIENCE, "the writers are stuck at {now} inserts");
    }
}

const PENDING: &str = "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_immediate_postgres_restart_mid_stream_loses_no_committed_event() {
    let started = Instant::now();
    // A cluster of this test's own: restarting the shared one would break other tests.
    let cluster = tokio::task::spawn_blocking(|| TempCluster::start(ClusterOptions::default()))
        .await
        .expect("starting the cluster panicked")
        .unwrap_or_else(|e| panic!("could not start a private cluster: {}", error_chain(&e)));
    let cluster = Arc::new(cluster);
    connect(&cluster.conninfo("postgres")).await.batch_execute("CREATE DATABASE shop").await.expect("create db");
    let conninfo = cluster.conninfo("shop");

    let dir = TempDir::new().expect("tempdir");
    // No sweep: the catch-up after the reconnect must find everything by itself.
    let text = "[daemon]\nsweep_interval = \"1h\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\n\
                [[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n\n\
                [[handler]]\nname = \"order-log\"\nsender = \"public.shop_order\"\nkind = \"log\"\n\
                level = \"info\"\nfields = [\"id\", \"pk\", \"instance\", \"op\"]\n";
    {
        let mut client = connect(&conninfo).await;
        client.batch_execute(SHOP).await.expect("create table");
        post_save::db::migrate(&mut client).await.expect("migrate");
        post_save::testing::install::install(&mut client, &config(text)).await.expect("install triggers");
    }
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, text).expect("write config");

    let (tx, mut lines) = mpsc::unbounded_channel();
    let mut log = Log::default();
    let mut daemon = Daemon::spawn(&config_path, &conninfo, tx, parse_line);
    log.wait_listening(&mut lines, 1).await;

    let inserted = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> =
        (0..WRITERS).map(|w| tokio::spawn(write(conninfo.clone(), w, Arc::clone(&inserted)))).collect();

    // About a third of the way: the server is killed (every backend at once, no checkpoint)
    // and started again, through crash recovery.
    wait_inserted(&inserted, TOTAL_INSERTS / 3).await;
    let restarted_at = inserted.load(Ordering::Relaxed);
    let restart = Instant::now();
    let handle = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || handle.restart(StopMode::Immediate))
        .await
        .expect("restart panicked")
        .unwrap_or_else(|e| panic!("restart: {}", error_chain(&e)));
    let restart_took = restart.elapsed();
    let recovered_at = inserted.load(Ordering::Relaxed);
    eprintln!("restarted (immediate) at {restarted_at} of {TOTAL_INSERTS} inserts; took {restart_took:?}");
    assert!(recovered_at < TOTAL_INSERTS, "the writers had finished before the server was back");

    let mut reports = Vec::new();
    for (w, writer) in writers.into_iter().enumerate() {
        let report = writer.await.unwrap_or_else(|e| panic!("writer {w} panicked: {e}"));
        eprintln!("writer {w}: {report:?}");
        reports.push(report);
    }
    let writes_done = started.elapsed();
    assert!(reports.iter().any(|r| r.errors > 0), "no writer noticed the restart");

    // What committed: the table after recovery. Every planned save committed exactly once.
    let client = connect(&conninfo).await;
    let table: Vec<(i64, String, i32)> = client
        .query("SELECT id, client_key, quantity FROM shop_order", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(table.len(), TOTAL_INSERTS, "rows in the table");
    let quantities: HashMap<&str, i32> = table.iter().map(|(_, key, q)| (key.as_str(), *q)).collect();
    for w in 0..WRITERS {
        for row in 0..ROWS_PER_WRITER {
            let key = client_key(w, row);
            assert_eq!(quantities.get(key.as_str()), Some(&final_quantity(row)), "row {key}");
        }
    }
    // Every committed save, as (row id, quantity): the insert (1), then each update.
    let committed: HashSet<(i64, i64)> =
        table.iter().flat_map(|(id, _, q)| (1..=i64::from(*q)).map(move |quantity| (*id, quantity))).collect();
    let keys: HashMap<i64, &str> = table.iter().map(|(id, key, _)| (*id, key.as_str())).collect();

    // The ledger holds one event per committed save, none for a save that did not commit.
    let ledger: BTreeMap<i64, (i64, i64)> = client
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
    let in_ledger: HashSet<(i64, i64)> = ledger.values().copied().collect();
    assert_eq!(ledger.len(), committed.len(), "ledger events vs committed saves");
    assert_eq!(in_ledger, committed, "the ledger's events are exactly the committed saves");

    // The daemon, reconnected, catches up and acknowledges everything. Fails when the pending
    // count stops going down for PATIENCE.
    let mut last = (i64::MAX, Instant::now());
    loop {
        log.pump(&mut lines);
        let pending = query_i64(&client, PENDING).await;
        if pending == 0 {
            break;
        }
        if pending < last.0 {
            last = (pending, Instant::now());
        }
        if last.1.elapsed() > PATIENCE {
            let ids: Vec<i64> = client
                .query("SELECT id FROM post_save.event WHERE handled_at IS NULL ORDER BY id LIMIT 20", &[])
                .await
                .expect("pending ids")
                .iter()
                .map(|r| r.get(0))
                .collect();
            panic!(
                "{pending} ledger rows stay pending (first ids {ids:?}); {} sessions; daemon log:\n{}",
                log.listening,
                log.tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = started.elapsed();

    // Their log lines follow (a line is written before its acknowledgement).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen: HashSet<i64> = log.handled.iter().map(|h| h.id).collect();
        let missing: Vec<(i64, &str, i64)> = ledger
            .iter()
            .filter(|(id, _)| !seen.contains(id))
            .map(|(id, (row, q))| (*id, keys.get(row).copied().unwrap_or("?"), *q))
            .collect();
        if missing.is_empty() {
            break;
        }
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => log.push(line),
            Ok(None) | Err(_) => panic!(
                "{} of {} committed events were acknowledged but never handled, e.g. (event id, row, quantity) \
                 {:?}; daemon log:\n{}",
                missing.len(),
                ledger.len(),
                &missing[..missing.len().min(20)],
                log.tail()
            ),
        }
    }
    // Any straggling duplicates arrive before the daemon exits.
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "the daemon exited with {status}:\n{}", log.tail());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => log.push(line),
            Ok(None) => break,
            Err(_) => panic!("the daemon's stderr stayed open after it exited"),
        }
    }

    // The daemon lost its connection and came back (a session per "listening").
    let sessions = log.listening;
    eprintln!("daemon: {sessions} sessions, {} reconnect warnings", log.reconnecting.len());
    for text in log.reconnecting.iter().take(5) {
        eprintln!("  {text}");
    }
    for text in log.other.iter().filter(|t| t.contains("caught up on pending ledger events")) {
        eprintln!("  {text}");
    }
    let warnings: Vec<&String> =
        log.other.iter().filter(|t| t.contains("\"level\":\"WARN\"") || t.contains("\"level\":\"ERROR\"")).collect();
    eprintln!("daemon: {} other warnings/errors", warnings.len());
    for text in warnings.iter().take(10) {
        eprintln!("  {text}");
    }
    assert!(sessions >= 2 && !log.reconnecting.is_empty(), "the daemon never reconnected:\n{}", log.tail());

    // Every committed event handled at least once, as the ledger has it.
    for h in &log.handled {
        let expected = ledger.get(&h.id).unwrap_or_else(|| panic!("handled an event not in the ledger: {h:?}"));
        assert_eq!((h.row, h.quantity), *expected, "handled {h:?}, the ledger has (row, quantity) {expected:?}");
        assert_eq!(keys.get(&h.row).copied(), Some(h.key.as_str()), "handled {h:?}: wrong row key");
    }
    let mut times: BTreeMap<i64, usize> = BTreeMap::new();
    for h in &log.handled {
        *times.entry(h.id).or_default() += 1;
    }
    assert_eq!(times.len(), ledger.len(), "events handled vs events committed");

    // Duplicates are allowed (at least once), and reported.
    let duplicates: Vec<(i64, usize)> = times.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (*id, *n)).collect();
    let extra: usize = duplicates.iter().map(|(_, n)| n - 1).sum();
    eprintln!(
        "{} committed events ({} inserts, {} updates); {} handlings; {extra} duplicates ({} events handled more than \
         once)",
        ledger.len(),
        TOTAL_INSERTS,
        ledger.len() - TOTAL_INSERTS,
        log.handled.len(),
        duplicates.len()
    );
    for (id, n) in duplicates.iter().take(20) {
        let (row, quantity) = ledger[id];
        eprintln!("  duplicate: event {id} (row {}, quantity {quantity}) handled {n} times", keys[&row]);
    }

    // Per row: ledger-id order is commit order (quantity 1, 2, 3), each event's first handling
    // comes after its predecessors' (the handler never sees a later state of a row first), and a
    // row is handled in at most one increasing run per session (a redelivery starts over at
    // most once per reconnect; never two deliveries of the row interleaved).
    let mut by_row: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
    for (&id, &(row, quantity)) in &ledger {
        by_row.entry(row).or_default().push((id, quantity));
    }
    for (row, events) in &by_row {
        let quantities: Vec<i64> = events.iter().map(|e| e.1).collect();
        let expected: Vec<i64> = (1..=i64::try_from(events.len()).unwrap()).collect();
        assert_eq!(quantities, expected, "row {}: quantities by ledger id", keys[row]);
    }
    let mut seen_by_row: HashMap<i64, Vec<(i64, i64)>> = HashMap::new();
    for h in &log.handled {
        seen_by_row.entry(h.row).or_default().push((h.id, h.quantity));
    }
    let mut rows_with_replays = 0;
    for (row, seen) in &seen_by_row {
        let mut firsts = Vec::new();
        let mut ids = HashSet::new();
        for &(id, quantity) in seen {
            if ids.insert(id) {
                firsts.push(quantity);
            }
        }
        let expected: Vec<i64> = (1..=i64::try_from(firsts.len()).unwrap()).collect();
        assert_eq!(firsts, expected, "row {}: first handlings out of commit order; handled {seen:?}", keys[row]);
        let runs = 1 + seen.windows(2).filter(|w| w[1].0 <= w[0].0).count();
        assert!(runs <= sessions, "row {}: {runs} runs in {sessions} sessions; handled {seen:?}", keys[row]);
        if runs > 1 {
            rows_with_replays += 1;
        }
    }
    eprintln!("{rows_with_replays} rows had some of their events handled again, in order");
    assert_eq!(query_i64(&client, "SELECT count(*) FROM post_save.dead_letter").await, 0, "dead letters");
    eprintln!(
        "wall time: writes done after {writes_done:?}, ledger drained after {drained:?}, test {:?}",
        started.elapsed()
    );
    drop(client);
    drop(daemon);
    // Stops the server and removes its directory.
    drop(Arc::into_inner(cluster));
}
