//! Failover: a primary and a streaming standby made with `pg_basebackup`, four writers saving
//! through a multi-host connection string (`target_session_attrs=read-write`), the primary
//! stopped `-m immediate` and the standby promoted. The daemon, given both hosts, goes on on
//! the new primary. Replication is synchronous, so every save a writer saw committed is on the
//! new primary: the trigger capture delivers every one of them; the WAL capture without a
//! failover slot (before PostgreSQL 17) refuses to make a new slot and names the saves to send
//! again; with a synchronised failover slot (17 and later) it delivers every one of them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use post_save::testing::cluster::{ClusterOptions, StopMode, TempCluster};

use crate::support;
use crate::support::db::TestDb;
use crate::support::{BinaryDaemon, PATIENCE, observer_handlers, wait_for_count};

const WRITERS: i64 = 4;

fn settings(pairs: &[(&str, &str)]) -> ClusterOptions {
    ClusterOptions {
        settings: pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..ClusterOptions::default()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a blocking step panicked")
}

/// The server's major version, from the binaries the tests use.
fn major() -> u32 {
    let bindir = post_save::testing::cluster::find_bindir().expect("server binaries");
    post_save::testing::cluster::server_major(&bindir).expect("server version")
}

/// A primary writing logical WAL, a database with table `item` on it, and a standby following
/// it synchronously (a writer's commit returns once the standby has it). `failover_slots`: the standby
/// synchronises the primary's failover slots (PostgreSQL 17 and later).
struct Pair {
    primary: Option<TempCluster>,
    standby: TempCluster,
    /// Both servers, the writable one chosen at connection time.
    db: TestDb,
}

impl Pair {
    async fn start(failover_slots: bool) -> Pair {
        // the standby has the same (a hot standby needs at least the primary's limits, and
        // logical WAL to synchronise slots and to decode once promoted)
        const BOTH: [(&str, &str); 3] =
            [("wal_level", "logical"), ("max_wal_senders", "20"), ("max_replication_slots", "20")];
        let primary = blocking(|| TempCluster::start(settings(&BOTH)))
            .await
            .unwrap_or_else(|e| panic!("{}", support::db::error_chain(&e)));
        let mut db = TestDb::new_on(&primary.conninfo("postgres")).await;
        db.psql_ok("CREATE TABLE item (id bigint PRIMARY KEY, name text NOT NULL)");
        let mut standby_settings = BOTH.to_vec();
        if failover_slots {
            db.psql_ok("SELECT pg_create_physical_replication_slot('standby')");
            standby_settings.extend([
                ("primary_slot_name", "standby"),
                ("hot_standby_feedback", "on"),
                ("sync_replication_slots", "on"),
            ]);
        }
        let opts = settings(&standby_settings);
        let standby = {
            let primary = &primary;
            // pg_basebackup from the primary; it must finish before the primary waits for it
            std::thread::scope(|s| s.spawn(|| primary.start_standby(opts)).join())
                .expect("standby panicked")
                .unwrap_or_else(|e| panic!("{}", support::db::error_chain(&e)))
        };
        // Only the writers' commits wait for the standby (they set synchronous_commit = on):
        // a test that fails with the standby gone must not leave the rest hanging on it.
        db.psql_ok("ALTER SYSTEM SET synchronous_standby_names = '*'");
        db.psql_ok("ALTER SYSTEM SET synchronous_commit = 'local'");
        if failover_slots {
            db.psql_ok("ALTER SYSTEM SET synchronized_standby_slots = 'standby'");
        }
        db.psql_ok("SELECT pg_reload_conf()");
        support::wait_for_sql(&db, "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'", 1).await;
        db.conninfo = format!(
            "host={},{} port={},{} user=postgres dbname={} target_session_attrs=read-write",
            primary.socket_dir().display(),
            standby.socket_dir().display(),
            primary.port(),
            standby.port(),
            db.name
        );
        Pair { primary: Some(primary), standby, db }
    }

    /// Stops the primary at once, as a crash would, and promotes the standby.
    async fn fail_over(&mut self) {
        let primary = self.primary.take().expect("a primary");
        let standby_dir = self.standby.data_dir().to_path_buf();
        blocking(move || {
            primary.stop(StopMode::Immediate).expect("stopping the primary");
            // the cluster's directory goes with it
            drop(primary);
        })
        .await;
        let standby = &self.standby;
        std::thread::scope(|s| s.spawn(|| standby.promote()).join())
            .expect("promote panicked")
            .unwrap_or_else(|e| panic!("promoting {}: {}", standby_dir.display(), support::db::error_chain(&e)));
    }
}

/// Writers saving rows of their own through `conninfo`, each row id remembered once its
/// INSERT returned: a lost connection (the failover) is reconnected, the row whose commit it
/// cut is not counted.
struct Writers {
    running: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<i64>>>,
}

impl Writers {
    fn start(conninfo: &str) -> Writers {
        let running = Arc::new(AtomicBool::new(true));
        let tasks = (0..WRITERS)
            .map(|w| {
                let conninfo = format!("{conninfo} options='-c synchronous_commit=on'");
                let running = Arc::clone(&running);
                tokio::spawn(async move {
                    let mut saved = Vec::new();
                    let mut client = None;
                    let mut id = w * 1_000_000;
                    while running.load(Ordering::Relaxed) {
                        if client.is_none() {
                            match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                                Ok((c, connection)) => {
                                    tokio::spawn(connection);
                                    client = Some(c);
                                }
                                Err(_) => {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            }
                        }
                        id += 1;
                        let c = client.as_ref().expect("connected");
                        match c.execute("INSERT INTO item (id, name) VALUES ($1, 'saved')", &[&id]).await {
                            Ok(_) => saved.push(id),
                            Err(_) => client = None,
                        }
                    }
                    saved
                })
            })
            .collect();
        Writers { running, tasks }
    }

    async fn stop(self) -> BTreeSet<i64> {
        self.running.store(false, Ordering::Relaxed);
        let mut all = BTreeSet::new();
        for task in self.tasks {
            all.extend(task.await.expect("writer"));
        }
        all
    }
}

fn daemon_toml(capture: &str) -> String {
    format!(
        "[daemon]\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n\n\
         [[watch]]\ntable = \"public.item\"\ncapture = \"{capture}\"\n{}",
        observer_handlers(false)
    )
}

/// Saves a while, fails over, saves a while on the new primary; returns the ids committed and
/// the events delivered before the failover.
async fn save_through_a_failover(
    pair: &mut Pair,
    daemon: &mut BinaryDaemon,
) -> (BTreeSet<i64>, Vec<serde_json::Value>) {
    let started = std::time::Instant::now();
    let writers = Writers::start(&pair.db.conninfo);
    // some saves delivered before the failover
    let before = daemon.until("saves before the failover", |e| e.len() >= 200).await;
    println!("{:?}: 200 saves delivered; failing over", started.elapsed());
    pair.fail_over().await;
    println!("{:?}: the standby is promoted", started.elapsed());
    // and some after: the writers are on the new primary
    let after = Writers::start(&pair.db.conninfo);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut saved = writers.stop().await;
    saved.extend(after.stop().await);
    println!("{:?}: the writers stopped", started.elapsed());
    (saved, before)
}

/// Every id of `saved` among the events of `daemon` (taking them until all are there); returns
/// how many were delivered more than once.
async fn delivered_all(daemon: &mut BinaryDaemon, saved: &BTreeSet<i64>, first: Vec<serde_json::Value>) -> usize {
    fn count(times: &mut BTreeMap<i64, usize>, e: &serde_json::Value) {
        *times.entry(e["pk"]["id"].as_i64().expect("id")).or_default() += 1;
    }
    let mut times: BTreeMap<i64, usize> = BTreeMap::new();
    first.iter().for_each(|e| count(&mut times, e));
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    while !saved.iter().all(|id| times.contains_key(id)) {
        let Some(e) = daemon.next_before(deadline).await else {
            let missing: Vec<_> = saved.iter().filter(|id| !times.contains_key(id)).take(20).collect();
            panic!("saves not delivered after the failover (first 20): {missing:?}\n{}", daemon.log_text());
        };
        count(&mut times, &e);
    }
    times.values().filter(|n| **n > 1).count()
}

#[tokio::test]
async fn the_trigger_capture_goes_on_on_the_promoted_standby_and_loses_nothing() {
    let mut pair = Pair::start(false).await;
    let mut daemon = BinaryDaemon::install_and_start(&pair.db, &daemon_toml("trigger")).await;
    let (saved, before) = save_through_a_failover(&mut pair, &mut daemon).await;
    let repeated = delivered_all(&mut daemon, &saved, before).await;
    println!("trigger capture through a failover: {} saves committed, all delivered, {repeated} twice", saved.len());
    daemon.stop().await;
}

#[tokio::test]
async fn the_wal_capture_without_a_failover_slot_refuses_a_new_slot_and_names_the_saves_to_send_again() {
    if major() >= 17 {
        // from 17 on `triggers install` makes a failover slot; the test below runs instead
        println!("PostgreSQL {}: its slot is a failover slot; see the next test", major());
        return;
    }
    let mut pair = Pair::start(false).await;
    let mut daemon = BinaryDaemon::install_and_start(&pair.db, &daemon_toml("wal")).await;
    let (saved, _) = save_through_a_failover(&mut pair, &mut daemon).await;
    assert!(!saved.is_empty());
    // the reader finds no slot on the new primary: it says so, once, and makes none
    let blocked = daemon.wait_logged("WAL capture blocked").await;
    assert_eq!(blocked["reason"].as_str(), Some("slot_missing"), "{blocked}");
    let fix = blocked["fix"].as_str().expect("fix");
    assert!(
        fix.contains("saves committed after") && fix.contains("post-save backfill --table public.item"),
        "the fix names the saves to send again: {fix}"
    );
    assert!(fix.contains("post-save triggers install"), "{fix}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pair.db.query_i64("SELECT count(*) FROM pg_replication_slots").await, 0, "no slot made silently");
    // the time it names is before every save it did not deliver
    let since: String = pair
        .db
        .client()
        .await
        .query_one("SELECT coalesce(confirmed_commit, created_at)::text FROM post_save.wal_slot", &[])
        .await
        .expect("the slot's record")
        .get(0);
    assert!(fix.contains(&since), "{fix} names {since}");
    daemon.stop().await;
}

#[tokio::test]
async fn the_wal_capture_with_a_synchronised_failover_slot_goes_on_and_loses_nothing() {
    if major() < 17 {
        println!("PostgreSQL {}: no failover slots before 17", major());
        return;
    }
    let mut pair = Pair::start(true).await;
    let mut daemon = BinaryDaemon::install_and_start(&pair.db, &daemon_toml("wal")).await;
    let slot = post_save::testing::slot_name(&pair.db.name);
    // the standby has the slot, synchronised, before the primary goes
    let standby = support::db::connect_to(&pair.standby.conninfo(&pair.db.name)).await;
    let synced =
        format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND synced AND NOT temporary");
    wait_for_count(&standby, &synced, 1, PATIENCE * 2).await;
    drop(standby);
    let doctor = support::post_save_on(&daemon.config, &pair.db, &["doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&doctor.stdout).expect("doctor --json");
    let wal = checks.as_array().expect("checks").iter().find(|c| c["name"] == "wal").expect("wal check").clone();
    assert_eq!(wal["verdict"].as_str(), Some("ok"), "{wal}");
    assert!(wal["detail"].as_str().is_some_and(|d| d.contains("synchronised")), "{wal}");
    let (saved, before) = save_through_a_failover(&mut pair, &mut daemon).await;
    let repeated = delivered_all(&mut daemon, &saved, before).await;
    println!("WAL capture through a failover: {} saves committed, all delivered, {repeated} twice", saved.len());
    daemon.stop().await;
}
