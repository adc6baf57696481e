//! Late commits: a save whose transaction took its ledger id and then stayed open (15 s, 2
//! minutes) reaches its handlers within 2 s of its commit, while the saves committed meanwhile
//! keep arriving promptly; a long transaction that rolls back leaves no gap behind. The sweep is
//! an hour away in every test here, so only the live fetch can deliver the late save.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use post_save::handler::{HandlerError, handler_fn};
use post_save::{Receiver, Registry, SaveEvent};
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::support;
use crate::support::child;
use crate::support::db::TestDb;
use crate::support::{PATIENCE, SHOP_BARRIER, config, install, is_shop_barrier, start, wait_for_sql};

const SHOP: &str = "CREATE TABLE shop_order (
    id bigserial PRIMARY KEY, user_id bigint NOT NULL, product text NOT NULL,
    quantity integer NOT NULL DEFAULT 1)";

const CONFIG: &str =
    "[daemon]\nsweep_interval = \"1h\"\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n";

/// The promise: a late save, and every save committed while it was open, arrives within this of
/// its commit.
const PROMPT: Duration = Duration::from_secs(2);

/// How often the other writer commits a save while the late transaction is open.
const PACE: Duration = Duration::from_millis(100);

/// Opens a transaction that inserts a row (taking a ledger id) and keeps it open for `open_for`
/// while another client commits a save every [`PACE`], each of which must arrive within
/// [`PROMPT`]; then commits it and asserts that its save arrives within [`PROMPT`] too.
///
/// With `silent_doorbell` the late row is captured while the doorbell is silenced (as while the
/// daemon is busy): its commit sends no NOTIFY, so only the daemon's own polling can find it.
async fn late_commit_arrives(open_for: Duration, silent_doorbell: bool) {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let config = config(CONFIG);
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;

    let late = db.client().await;
    if silent_doorbell {
        db.psql_ok("SELECT setval('post_save.doorbell', 0, true)");
    }
    late.batch_execute("BEGIN; INSERT INTO shop_order (user_id, product) VALUES (0, 'late')").await.unwrap();
    if silent_doorbell {
        db.psql_ok("SELECT setval('post_save.doorbell', 1, true)");
    }

    let writer = db.client().await;
    let insert = writer.prepare("INSERT INTO shop_order (user_id, product) VALUES ($1, 'flowing')").await.unwrap();
    let mut ticks = tokio::time::interval(PACE);
    let deadline = Instant::now() + open_for;
    let (mut saves, mut slowest) = (0i64, Duration::ZERO);
    while Instant::now() < deadline {
        ticks.tick().await;
        saves += 1;
        let committed = Instant::now();
        writer.execute(&insert, &[&saves]).await.unwrap();
        let event = tokio::time::timeout(PROMPT, daemon.events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("save {saves} did not arrive within {PROMPT:?} while the late transaction was open")
            })
            .expect("event channel closed");
        slowest = slowest.max(committed.elapsed());
        assert_eq!(event.instance["product"], "flowing", "only the flowing saves can arrive yet");
        assert_eq!(event.instance["user_id"], saves, "the flowing saves arrive in order, each once");
    }

    let committing = Instant::now();
    late.batch_execute("COMMIT").await.unwrap();
    let event = daemon.next().await;
    let delay = committing.elapsed();
    println!(
        "transaction open {open_for:?} (doorbell {}): its save arrived {delay:?} after COMMIT was sent; \
         {saves} saves committed meanwhile, the slowest arrived after {slowest:?}",
        if silent_doorbell { "silenced" } else { "ringing" }
    );
    assert_eq!(event.instance["product"], "late");
    assert!(delay < PROMPT, "the late save arrived {delay:?} after its commit");

    // Saves keep flowing after it, and nothing arrives twice: the next save is the next event.
    let next = format!("INSERT INTO shop_order (user_id, product) VALUES ({}, 'flowing')", saves + 1);
    daemon.assert_quiet_until(&db, &next, |e| e.instance["user_id"] == saves + 1).await;
    daemon.stop().await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event", saves + 2).await;
}

#[tokio::test]
async fn a_save_whose_transaction_stayed_open_15_seconds_arrives_within_2_seconds_of_its_commit() {
    late_commit_arrives(Duration::from_secs(15), false).await;
}

/// The late row was captured while the doorbell was silenced: no NOTIFY comes with its commit.
#[tokio::test]
async fn a_save_whose_transaction_stayed_open_2_minutes_arrives_within_2_seconds_of_its_commit() {
    late_commit_arrives(Duration::from_secs(120), true).await;
}

/// A late save and the next save of the same row, committed a moment after it (it waited for
/// the late one's row lock), arrive in commit order. Both are read by the same fetch, the later
/// above the cursor and the late one in a gap: the gap must be read and dispatched first.
#[tokio::test]
async fn a_late_save_arrives_before_the_next_save_of_its_row() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let config = config(CONFIG);
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (1, 'contended')");
    assert_eq!(daemon.next().await.instance["quantity"], 1);

    // No NOTIFY with these commits: the daemon's poll finds both, in one fetch.
    db.psql_ok("SELECT setval('post_save.doorbell', 0, true)");
    let late = db.client().await;
    late.batch_execute("BEGIN; UPDATE shop_order SET quantity = 2 WHERE product = 'contended'").await.unwrap();
    db.psql_ok("INSERT INTO shop_order (user_id, product) VALUES (2, 'other')");
    assert_eq!(daemon.next().await.instance["product"], "other", "the late save's id is a gap now");
    let next = db.client().await;
    let waiting = tokio::spawn(async move {
        next.batch_execute("UPDATE shop_order SET quantity = 3 WHERE product = 'contended'").await.unwrap();
    });
    support::wait_for_sql(
        &db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        1,
    )
    .await;
    late.batch_execute("COMMIT").await.unwrap();
    waiting.await.unwrap();
    db.psql_ok("SELECT setval('post_save.doorbell', 1, true)");
    let quantities: Vec<_> = daemon.take(2).await.iter().map(|e| e.instance["quantity"].clone()).collect();
    assert_eq!(quantities, [2, 3], "the row's saves in commit order");
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
}

/// A save whose transaction took its ledger id before the daemon started, and commits while the
/// start-up catch-up is still reading older saves of its row, arrives after them. Its id is a
/// start-of-session gap ahead of the catch-up's cursor: the pages read it in its turn; looked up
/// as soon as its transaction ends, it came before them (the row order the SIGKILL crash test saw
/// broken once). One ledger row per page and one in flight, with the first held by a gate, make
/// the commit land while the catch-up is at its first rows.
#[tokio::test]
async fn a_save_committed_during_the_catch_up_arrives_after_the_older_saves_of_its_row() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let config = config(
        "[daemon]\nsweep_interval = \"1h\"\nfetch_batch = 1\nmax_in_flight = 1\n\
         [[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n",
    );
    install(&db, &config).await;
    db.psql_ok(
        "INSERT INTO shop_order (user_id, product) VALUES (1, 'contended'); \
         INSERT INTO shop_order (user_id, product) VALUES (2, 'other'); \
         INSERT INTO shop_order (user_id, product) VALUES (3, 'other'); \
         UPDATE shop_order SET quantity = 2 WHERE product = 'contended'",
    );
    let late = db.client().await;
    late.batch_execute("BEGIN; UPDATE shop_order SET quantity = 3 WHERE product = 'contended'").await.unwrap();

    // Every event waits at the gate until it opens; the first one to arrive says so.
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let (open, gate) = tokio::sync::watch::channel(false);
    let mut registry = Registry::new();
    registry
        .register(
            Receiver::new("gate"),
            handler_fn(move |_: SaveEvent| {
                let (entered, mut gate) = (entered_tx.clone(), gate.clone());
                async move {
                    let _ = entered.send(());
                    let _ = gate.wait_for(|open| *open).await;
                    Ok::<(), HandlerError>(())
                }
            }),
        )
        .unwrap();
    let pg = post_save::db::resolve(Some(&db.conninfo)).expect("conninfo");
    let starting = tokio::spawn(async move { support::start_via(pg, config, &mut registry).await });
    tokio::time::timeout(PATIENCE, entered.recv()).await.expect("the catch-up did not begin").unwrap();
    late.batch_execute("COMMIT").await.unwrap();
    open.send_replace(true);
    let mut daemon = starting.await.expect("daemon start panicked");

    let events = daemon.take(5).await;
    let row: Vec<_> = events
        .iter()
        .filter(|e| e.instance["product"] == "contended")
        .map(|e| e.instance["quantity"].clone())
        .collect();
    assert_eq!(row, [1, 2, 3], "the row's saves in commit order");
    daemon.assert_quiet_until(&db, SHOP_BARRIER, is_shop_barrier).await;
    daemon.stop().await;
}

/// What the daemon binary wrote on stderr, one JSON log line at a time.
#[derive(Debug)]
enum Line {
    Listening,
    /// The log handler's line: the saved row's `product` and `user_id`.
    Saved {
        product: String,
        user_id: i64,
    },
    /// Gaps dropped because no transaction that could fill them is open: the lowest and highest
    /// ledger id dropped.
    GapsDropped {
        lowest: i64,
        highest: i64,
    },
    Other,
}

fn parse_line(text: &str) -> Line {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else { return Line::Other };
    let field = |name: &str| json[name].as_i64().unwrap_or_else(|| panic!("no integer {name} in {text}"));
    match json["message"].as_str() {
        Some("listening") => Line::Listening,
        Some("save event") => {
            let event: serde_json::Value = json["event"]
                .as_str()
                .and_then(|e| serde_json::from_str(e).ok())
                .unwrap_or_else(|| panic!("a save event line without an event field: {text}"));
            Line::Saved {
                product: event["instance"]["product"].as_str().unwrap_or_default().to_owned(),
                user_id: event["instance"]["user_id"].as_i64().unwrap_or_default(),
            }
        }
        Some("dropped ledger gaps that no open transaction can fill") => {
            Line::GapsDropped { lowest: field("lowest"), highest: field("highest") }
        }
        _ => Line::Other,
    }
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("post-save.toml");
    std::fs::File::create(&path).and_then(|mut f| f.write_all(text.as_bytes())).expect("write config");
    path
}

/// The next line that `pick` accepts, within `limit`; lines it rejects are handed to `skipped`.
async fn next_line<T>(
    lines: &mut mpsc::UnboundedReceiver<Line>,
    limit: Duration,
    mut pick: impl FnMut(&Line) -> Option<T>,
    mut skipped: impl FnMut(&Line),
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => match pick(&line) {
                Some(found) => return Some(found),
                None => skipped(&line),
            },
            Ok(None) => panic!("post-save exited"),
            Err(_) => return None,
        }
    }
}

/// Commits save number `n` on `writer` and waits for its log line (at most [`PROMPT`]). With
/// `kept`, asserts that no line on the way says that gap was dropped.
async fn save(
    writer: &tokio_postgres::Client,
    insert: &tokio_postgres::Statement,
    n: i64,
    lines: &mut mpsc::UnboundedReceiver<Line>,
    kept: Option<i64>,
) {
    writer.execute(insert, &[&n]).await.unwrap();
    let saved = next_line(
        lines,
        PROMPT,
        |l| match l {
            Line::Saved { product, user_id } => Some((product.clone(), *user_id)),
            _ => None,
        },
        |l| {
            if let (Line::GapsDropped { lowest, highest }, Some(gap)) = (l, kept) {
                assert!(!(*lowest..=*highest).contains(&gap), "gap {gap} dropped while its transaction is open");
            }
        },
    )
    .await;
    assert_eq!(saved, Some(("flowing".to_owned(), n)), "save {n} did not arrive within {PROMPT:?}");
}

/// A transaction takes a ledger id, stays open past the old 10 s gap timeout while saves flow,
/// then rolls back. The daemon (the real binary) keeps the gap while the transaction is open and
/// drops it soon after the rollback, and the saves before and after are unaffected. An older
/// transaction open in another database all along (it holds the cluster's oldest running
/// transaction id below the gap's) does not keep the gap: it cannot write this ledger.
#[tokio::test]
async fn a_long_transaction_that_rolls_back_leaves_no_gap_behind() {
    let db = TestDb::new().await;
    db.psql_ok(SHOP);
    let dir = TempDir::new().expect("tempdir");
    let text = format!(
        "{CONFIG}\n[[handler]]\nname = \"order-log\"\nsender = \"public.shop_order\"\nkind = \"log\"\n\
         level = \"info\"\nfields = [\"id\", \"instance\"]\n"
    );
    install(&db, &config(&text)).await;
    let path = write_config(dir.path(), &text);
    let (tx, mut lines) = mpsc::unbounded_channel();
    let mut command = child::command(&path, &db.conninfo);
    command.env("RUST_LOG", "post_save=debug");
    let _daemon = child::Daemon::start(command, move |text| tx.send(parse_line(&text)).is_ok());
    let listening = next_line(&mut lines, PATIENCE, |l| matches!(l, Line::Listening).then_some(()), |_| {}).await;
    assert!(listening.is_some(), "post-save did not start listening");

    let elsewhere_db = TestDb::new().await;
    let elsewhere = elsewhere_db.client().await;
    elsewhere.batch_execute("BEGIN; SELECT txid_current()").await.unwrap();
    let doomed = db.client().await;
    doomed.batch_execute("BEGIN; INSERT INTO shop_order (user_id, product) VALUES (0, 'doomed')").await.unwrap();
    let gap: i64 = doomed.query_one("SELECT max(id) FROM post_save.event", &[]).await.unwrap().get(0);

    let writer = db.client().await;
    let insert = writer.prepare("INSERT INTO shop_order (user_id, product) VALUES ($1, 'flowing')").await.unwrap();
    let mut saves = 0i64;

    // Past the 10 s after which gaps used to be given up on.
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline {
        ticks.tick().await;
        saves += 1;
        save(&writer, &insert, saves, &mut lines, Some(gap)).await;
    }

    let rolled_back = Instant::now();
    doomed.batch_execute("ROLLBACK").await.unwrap();
    let dropped = next_line(
        &mut lines,
        PATIENCE,
        |l| match l {
            Line::GapsDropped { lowest, highest } if (*lowest..=*highest).contains(&gap) => Some(()),
            _ => None,
        },
        |l| assert!(!matches!(l, Line::Saved { product, .. } if product == "doomed"), "a rolled-back save arrived"),
    )
    .await;
    assert!(dropped.is_some(), "gap {gap} still remembered {PATIENCE:?} after its transaction rolled back");
    println!("gap {gap} dropped {:?} after its transaction rolled back", rolled_back.elapsed());

    elsewhere.batch_execute("ROLLBACK").await.unwrap();
    for _ in 0..5 {
        saves += 1;
        save(&writer, &insert, saves, &mut lines, None).await;
    }
    wait_for_sql(&db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
}
