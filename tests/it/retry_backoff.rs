//! Retry delays in the embedded daemon against a real PostgreSQL: an `exec` handler that
//! always fails is retried with growing, jittered waits, none of them longer than the policy's
//! `max_backoff`, and then dead-lettered.

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use crate::support::db::TestDb;
use crate::support::{config, install, start, wait_for_sql};

/// Attempts in all: seven waits, the last four at the cap.
const ATTEMPTS: usize = 8;
const BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// What a gap between two attempts may add to the wait: starting `sh` and `date` on a busy
/// machine. Below the jitter's reach: before the fix, a capped wait was anywhere up to twice
/// `max_backoff`, so a run of these attempts almost always had a gap past this allowance.
const PROCESS_START: Duration = Duration::from_millis(400);

/// The attempts' start times, in seconds since the epoch, as the script wrote them.
fn attempt_times(path: &Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|e| panic!("not a timestamp {l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_wait_between_attempts_exceeds_max_backoff() {
    let dir = TempDir::new().expect("tempdir");
    let times = dir.path().join("attempts.txt");
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE shop_order (id bigserial PRIMARY KEY, product text NOT NULL)");
    let toml = format!(
        "[daemon]\nsweep_interval = \"1h\"\n\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n\n\
         [[handler]]\nname = \"always-fails\"\nsender = \"public.shop_order\"\nkind = \"exec\"\n\
         command = [\"sh\", \"-c\", \"date +%s.%N >> \\\"$TIMES\\\"; exit 1\"]\n\
         env = {{ TIMES = {} }}\ntimeout = \"10s\"\n\
         retry = {{ attempts = {ATTEMPTS}, backoff = \"{}ms\", max_backoff = \"{}ms\" }}\n",
        serde_json::to_string(&times.to_string_lossy()).expect("a path serializes"),
        BACKOFF.as_millis(),
        MAX_BACKOFF.as_millis(),
    );
    let config = config(&toml);
    install(&db, &config).await;
    let mut daemon = start(&db, config).await;

    db.psql_ok("INSERT INTO shop_order (product) VALUES ('espresso machine')");
    daemon.next().await;
    // the last attempt fails, the delivery is dead, and its dead letter is written: every
    // attempt's script has exited by then, its line written
    wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter WHERE handler = 'always-fails'", 1).await;
    daemon.stop().await;

    let times = attempt_times(&times);
    assert_eq!(times.len(), ATTEMPTS, "one line per attempt: {times:?}");
    let gaps: Vec<Duration> = times.windows(2).map(|w| Duration::from_secs_f64((w[1] - w[0]).max(0.0))).collect();
    println!("gaps between attempts: {gaps:?}");
    let allowed = MAX_BACKOFF + PROCESS_START;
    for (n, gap) in gaps.iter().enumerate() {
        assert!(
            *gap <= allowed,
            "gap {n} is {gap:?}, more than max_backoff {MAX_BACKOFF:?} + {PROCESS_START:?}: {gaps:?}"
        );
        // a retry never comes sooner than the smallest wait (a little less: the scripts' own
        // start-up may be shorter for the second of two)
        assert!(*gap >= BACKOFF / 2, "gap {n} is {gap:?}, shorter than backoff {BACKOFF:?}: {gaps:?}");
    }
    // the waits grew: the last ones are longer than the first
    assert!(gaps[gaps.len() - 1] > gaps[0], "{gaps:?}");
    let letter = db.client().await.query_one("SELECT attempts FROM post_save.dead_letter", &[]).await.expect("query");
    assert_eq!(letter.get::<_, i32>(0), i32::try_from(ATTEMPTS).unwrap());
}
