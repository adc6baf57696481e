//! Reads of the ledger (`post_save.event`): pages past the cursor, its gaps, the sweep; the
//! doorbell's switch; the partitions' rotation.

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::db::{Param, Work};

use crate::event::{DecodeError, SaveEvent, decode_ledger_row};

/// A ledger row that did not decode; only possible if someone wrote the ledger by hand.
#[derive(Debug)]
pub(crate) struct BadRow {
    pub id: i64,
    pub error: DecodeError,
}

/// The snapshot `s` as text and the next transaction id, as [`Snapshot::parse`] takes them.
///
/// PostgreSQL has no function that reads the next transaction id without taking one, but
/// `age(xid)` counts from it (read once per transaction, after the statement's snapshot was
/// taken, so it is never below the snapshot's): the next id is the snapshot's xmin plus its age.
/// The 32-bit xid of the xmin is its 64-bit value modulo 2^32. On the three xids that are not
/// normal `age` answers `INT_MAX`: the next id then comes out too high, which only keeps gaps
/// longer.
macro_rules! snapshot_columns {
    () => {
        "s::text, pg_catalog.pg_snapshot_xmin(s)::text::int8 \
           + pg_catalog.age((pg_catalog.pg_snapshot_xmin(s)::text::int8 % 4294967296)::text::xid)"
    };
}

/// A page holds at most $2 ledger rows and, counting each row's events, about $3 events (a row
/// is never split): a 100-event row counts as 100 against the page, so memory stays bounded.
///
/// One more row, with a null id, carries the statement's snapshot (see [`Snapshot`]): the same
/// snapshot the page was read with, so that an id missing from the page is known to belong to a
/// transaction that snapshot saw running (or rolled back).
pub(crate) const FETCH_NEW: &str = concat!(
    "(SELECT id, sender, op, head::text, rows::text, NULL::text, NULL::int8 FROM ( \
       SELECT id, sender, op, head, rows, sum(n) OVER (ORDER BY id) - n AS before FROM post_save.event \
        WHERE handled_at IS NULL AND id > $1 ORDER BY id LIMIT $2) page \
     WHERE before < $3 ORDER BY id) \
     UNION ALL \
     SELECT NULL, NULL, NULL, NULL, NULL, ",
    snapshot_columns!(),
    " FROM pg_catalog.pg_current_snapshot() s"
);

/// A page of the pending rows among the ids $1 (the cursor's gaps), as [`FETCH_PENDING`]. Not a
/// branch of [`FETCH_NEW`]: with `id > $1 OR id = ANY($2)` in one condition the page became a
/// bitmap scan of every pending row, sorted, on every fetch.
pub(crate) const FETCH_GAPS: &str = "SELECT id, sender, op, head::text, rows::text FROM ( \
       SELECT id, sender, op, head, rows, sum(n) OVER (ORDER BY id) - n AS before FROM post_save.event \
        WHERE handled_at IS NULL AND id = ANY($1) ORDER BY id LIMIT $2) page \
     WHERE before < $3 ORDER BY id";

/// What a ledger read's snapshot says about transactions, in 64-bit transaction ids (which never
/// wrap): every transaction below `xmin` had ended; of those from `xmin` up to `xmax`, the ones in
/// `running` had not; those from `xmax` up had not ended, or not begun. `next` is above every id
/// handed out before the read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub xmin: i64,
    pub xmax: i64,
    /// In ascending order.
    pub running: Vec<i64>,
    pub next: i64,
}

impl Snapshot {
    /// From `pg_current_snapshot()::text` (`xmin:xmax:xip,xip,…`) and the next transaction id.
    pub(crate) fn parse(text: &str, next: i64) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = parts.next()?;
        let mut running: Vec<i64> =
            xip.split(',').filter(|x| !x.is_empty()).map(str::parse).collect::<Result<_, _>>().ok()?;
        running.sort_unstable();
        (parts.next().is_none() && xmin <= xmax).then_some(Snapshot { xmin, xmax, running, next: next.max(xmax) })
    }

    /// Whether transaction `xid` had not ended at this snapshot (or not begun).
    pub(crate) fn runs(&self, xid: i64) -> bool {
        xid >= self.xmax || self.running.binary_search(&xid).is_ok()
    }
}

pub(crate) const FETCH_PENDING: &str = "SELECT id, sender, op, head::text, rows::text FROM ( \
       SELECT id, sender, op, head, rows, sum(n) OVER (ORDER BY id) - n AS before FROM post_save.event \
        WHERE handled_at IS NULL AND id > $1 ORDER BY id LIMIT $2) page \
     WHERE before < $3 ORDER BY id";

/// The size of a page: at most `rows` ledger rows and about `events` events.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PageLimit {
    pub rows: i64,
    pub events: i64,
}

impl PageLimit {
    /// A page of about `events` events, reading no more ledger rows than it takes when rows
    /// carry `per_row` events each (as the last page's did). Reading more would fetch rows only
    /// to drop them: with 100-event rows, a 1000-row page keeps 10.
    pub(crate) fn for_events(events: i64, per_row: i64) -> PageLimit {
        let events = events.max(1);
        // twice the estimate, so that a page of slightly smaller rows is not cut short
        let rows = (events / per_row.max(1)).saturating_mul(2).saturating_add(1).min(events);
        PageLimit { rows, events }
    }
}

/// The events of one ledger row (one captured statement, or a chunk of one).
#[derive(Debug)]
pub(crate) struct LedgerRow {
    pub id: i64,
    pub events: Vec<SaveEvent>,
}

/// What [`fetch_new`] read.
#[derive(Debug)]
pub(crate) struct NewPage {
    pub rows: Vec<LedgerRow>,
    pub bad: Vec<BadRow>,
    /// The page was cut short by a limit.
    pub more: bool,
    /// The snapshot the page was read with; `None` only if the server sent something unexpected.
    pub snapshot: Option<Snapshot>,
}

/// A page of pending ledger rows with ids above `after`, in id order, within `limit`, and the
/// snapshot it was read with.
pub(crate) async fn fetch_new(
    work: &Work,
    after: i64,
    limit: PageLimit,
    using: &str,
) -> Result<NewPage, tokio_postgres::Error> {
    let params: [Param; 3] = [(&after, Type::INT8), (&limit.rows, Type::INT8), (&limit.events, Type::INT8)];
    let mut rows = work.query(FETCH_NEW, &params).await?;
    // UNION ALL keeps its branches' order in practice, but nothing promises it: the snapshot
    // row is looked for anywhere.
    let marker = rows.iter().position(|r| r.get::<_, Option<i64>>(0).is_none());
    let snapshot = marker.map(|i| rows.remove(i)).and_then(|r| Snapshot::parse(r.get(5), r.get(6)));
    let (good, bad) = decode_rows(rows, using);
    let more = page_full(&good, &bad, limit);
    Ok(NewPage { rows: good, bad, more, snapshot })
}

/// A page of the pending ledger rows among `ids`, in id order, within `limit`; `more` is true
/// when the page was cut short by a limit.
pub(crate) async fn fetch_gaps(
    work: &Work,
    ids: &[i64],
    limit: PageLimit,
    using: &str,
) -> Result<(Vec<LedgerRow>, Vec<BadRow>, bool), tokio_postgres::Error> {
    let params: [Param; 3] = [(&ids, Type::INT8_ARRAY), (&limit.rows, Type::INT8), (&limit.events, Type::INT8)];
    let rows = work.query(FETCH_GAPS, &params).await?;
    let (good, bad) = decode_rows(rows, using);
    let more = page_full(&good, &bad, limit);
    Ok((good, bad, more))
}

fn page_full(good: &[LedgerRow], bad: &[BadRow], limit: PageLimit) -> bool {
    let rows = good.len() + bad.len();
    let events: usize = good.iter().map(|r| r.events.len()).sum::<usize>() + bad.len();
    let cap = |n: i64| usize::try_from(n).unwrap_or(usize::MAX);
    rows >= cap(limit.rows) || events >= cap(limit.events)
}

/// The last ledger id handed out, or one step below the first id when none was yet. Ids step by
/// the sequence's increment, so gaps computed from it line up with real ids.
pub(crate) async fn last_id(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_typed_one(
            "SELECT coalesce(pg_catalog.pg_sequence_last_value(q.seqrelid), q.seqstart - q.seqincrement) \
               FROM pg_catalog.pg_sequence q \
              WHERE q.seqrelid = pg_catalog.pg_get_serial_sequence('post_save.event', 'id')::regclass",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Of the `window` ledger ids up to and including `last` (ids step by `step`), those no row
/// holds, in ascending order: ids that a transaction took before `last` was read and has not
/// committed yet (or that were rolled back, or whose rows are gone). Ids are positive. With the
/// snapshot they were looked for with (`None` only if the server sent something unexpected).
pub(crate) async fn absent_ids(
    client: &Client,
    last: i64,
    window: i64,
    step: i64,
) -> Result<(Vec<i64>, Option<Snapshot>), tokio_postgres::Error> {
    let row = client
        .query_typed_one(
            concat!(
                "SELECT ARRAY(SELECT g FROM (SELECT $1::int8 - k * $3::int8 AS g \
                                              FROM generate_series(0, $2::int8 - 1) k) ids \
                               WHERE g > 0 AND NOT EXISTS (SELECT FROM post_save.event e WHERE e.id = ids.g) \
                               ORDER BY g), ",
                snapshot_columns!(),
                " FROM pg_catalog.pg_current_snapshot() s"
            ),
            &[(&last, Type::INT8), (&window, Type::INT8), (&step, Type::INT8)],
        )
        .await?;
    Ok((row.get(0), Snapshot::parse(row.get(1), row.get(2))))
}

/// The 32-bit ids of this database's transactions that have one: backends' and then prepared
/// transactions'. In that order, because `PREPARE TRANSACTION` puts the transaction among the
/// prepared ones before it leaves its backend, so one being prepared is never missed by both.
/// (Any role may read `backend_xid` of any backend.)
pub(crate) async fn local_xids(client: &Client) -> Result<Vec<u32>, tokio_postgres::Error> {
    let backends = client
        .query_typed(
            "SELECT backend_xid::text::int8 FROM pg_catalog.pg_stat_activity \
              WHERE datname = current_database() AND backend_xid IS NOT NULL",
            &[],
        )
        .await?;
    let prepared = client
        .query_typed(
            "SELECT transaction::text::int8 FROM pg_catalog.pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await?;
    Ok(backends.iter().chain(&prepared).filter_map(|r| u32::try_from(r.get::<_, i64>(0)).ok()).collect())
}

/// Backends of this database waiting for the lock every notifying commit takes: commits are
/// queueing behind NOTIFY.
pub(crate) async fn notify_lock_waiters(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_typed_one(
            "SELECT count(*) FROM pg_stat_activity \
              WHERE wait_event_type = 'Lock' AND wait_event = 'object' AND datname = current_database()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Rings (armed) or silences the doorbell: whether durable captures NOTIFY.
pub(crate) async fn set_doorbell(client: &Client, armed: bool) -> Result<(), tokio_postgres::Error> {
    client
        .query_typed_one("SELECT setval('post_save.doorbell', $1, true)", &[(&i64::from(armed), Type::INT8)])
        .await
        .map(drop)
}

/// A page of pending ledger rows with ids above `after` (as [`fetch_new`]), the last id read,
/// and whether the page was cut short by a limit.
pub(crate) async fn fetch_pending(
    work: &Work,
    after: i64,
    limit: PageLimit,
    using: &str,
) -> Result<(Vec<LedgerRow>, Vec<BadRow>, Option<i64>, bool), tokio_postgres::Error> {
    let params: [Param; 3] = [(&after, Type::INT8), (&limit.rows, Type::INT8), (&limit.events, Type::INT8)];
    let rows = work.query(FETCH_PENDING, &params).await?;
    let last = rows.last().map(|r| r.get::<_, i64>(0));
    let (good, bad) = decode_rows(rows, using);
    let more = page_full(&good, &bad, limit);
    Ok((good, bad, last, more))
}

fn decode_rows(rows: Vec<tokio_postgres::Row>, using: &str) -> (Vec<LedgerRow>, Vec<BadRow>) {
    let mut out = Vec::with_capacity(rows.len());
    let mut bad = Vec::new();
    for row in rows {
        let id: i64 = row.get(0);
        match decode_ledger_row(id, row.get(1), row.get(2), row.get(3), row.get(4), using) {
            Ok(events) => out.push(LedgerRow { id, events }),
            Err(error) => bad.push(BadRow { id, error }),
        }
    }
    (out, bad)
}

/// The ledger's partitions, `post_save.event_0` to `post_save.event_2`: one takes the writes,
/// one waits to be emptied, one is the newest history.
pub(crate) const SLOTS: i16 = 3;

/// How long a rotation waits for the lock on the partition it empties before it gives up until
/// the next check. The daemon's own ledger reads queue behind that wait, so it stays short.
const ROTATION_LOCK_TIMEOUT: &str = "200ms";

/// What one retention check did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Rotation {
    /// The current partition is not old enough yet, or the next still holds events acknowledged
    /// less than `keep_handled` ago: `wait` is how long until the newest of them is.
    NotDue { wait: std::time::Duration },
    /// Writes go to `slot` now; its partition was emptied first. `freed` is the bytes the old
    /// contents took; `moved` counts still-pending ledger rows carried over to the partition
    /// that was current, so they stay pending.
    Rotated { slot: i16, freed: i64, moved: u64 },
    /// Another session holds a lock on the partition to be emptied (an open transaction that
    /// read the ledger). Tried again at the next check.
    Blocked { slot: i16, holders: String },
}

/// How long a partition takes the writes before the next one does: half of `keep_handled`, so
/// an acknowledged event stays between `keep_handled` and about 1.5 times it (three partitions),
/// and never less than a second.
pub(crate) fn rotation_period(keep: std::time::Duration) -> std::time::Duration {
    (keep / 2).max(std::time::Duration::from_secs(1))
}

/// One retention check. When the current partition has taken the writes for `period` and every
/// event in the next one was acknowledged more than `keep` ago, the next partition is emptied
/// with TRUNCATE (pending rows in it, if any, are first moved to the current one) and writes
/// switch to it. TRUNCATE needs no vacuum, so an old snapshot held elsewhere cannot make the
/// ledger grow. Safe to run from several daemons at once: the rotation row is locked.
pub(crate) async fn rotate(
    client: &mut Client,
    keep: std::time::Duration,
    period: std::time::Duration,
) -> Result<Rotation, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{ROTATION_LOCK_TIMEOUT}'")).await?;
    let row = tx
        .query_one(
            "SELECT slot, clock_timestamp() - since >= make_interval(secs => $1), \
                    coalesce(pg_sequence_last_value('post_save.ledger_slot'), 0)::int2 \
               FROM post_save.ledger_rotation FOR UPDATE",
            &[&period.as_secs_f64()],
        )
        .await?;
    let (current, due, writing): (i16, bool, i16) = (row.get(0), row.get(1), row.get(2));
    if writing != current {
        // A rotation committed and its daemon stopped before it moved the writers over.
        tx.query_one("SELECT setval('post_save.ledger_slot', $1, true)", &[&i64::from(current)]).await?;
    }
    if !due {
        tx.commit().await?;
        return Ok(Rotation::NotDue { wait: std::time::Duration::ZERO });
    }
    let next = (current + 1) % SLOTS;
    let partition = PARTITIONS[usize::try_from(next).unwrap_or(0)];
    // One scan of the partition, once it is due: when its last acknowledgement is old enough.
    let left: Option<f64> = tx
        .query_one(
            &format!(
                "SELECT extract(epoch FROM max(handled_at) + make_interval(secs => $1) - clock_timestamp())::float8 \
                   FROM {partition}"
            ),
            &[&keep.as_secs_f64()],
        )
        .await?
        .get(0);
    if let Some(left) = left.filter(|s| *s > 0.0) {
        tx.commit().await?;
        return Ok(Rotation::NotDue { wait: std::time::Duration::from_secs_f64(left) });
    }
    // A session idling in a transaction that read the ledger keeps its lock until it ends:
    // queueing behind it would hold up the daemon's own reads, which would queue behind us.
    let holders = lock_holders(&tx, &[partition]).await?;
    if !holders.is_empty() {
        return Ok(Rotation::Blocked { slot: next, holders });
    }
    if let Err(e) = tx.batch_execute(&format!("LOCK TABLE {partition} IN ACCESS EXCLUSIVE MODE")).await {
        if e.code() != Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
            return Err(e);
        }
        return Ok(Rotation::Blocked { slot: next, holders: "a lock that was not released in time".into() });
    }
    // Under the lock nobody writes the partition any more: what is pending now is all there is.
    let moved = tx
        .execute(
            &format!(
                "WITH gone AS (DELETE FROM {partition} WHERE handled_at IS NULL \
                                RETURNING id, sender, op, n, head, rows) \
                 INSERT INTO post_save.event (id, slot, sender, op, n, head, rows) OVERRIDING SYSTEM VALUE \
                 SELECT id, $1, sender, op, n, head, rows FROM gone"
            ),
            &[&current],
        )
        .await?;
    let freed: i64 = tx.query_one(&format!("SELECT pg_total_relation_size('{partition}')"), &[]).await?.get(0);
    tx.batch_execute(&format!("TRUNCATE {partition}")).await?;
    tx.execute("UPDATE post_save.ledger_rotation SET slot = $1, since = clock_timestamp()", &[&next]).await?;
    tx.commit().await?;
    // Not transactional: only after the commit, so writers never go to a partition that is
    // about to be emptied. A crash right here is mended at the next check (above).
    client
        .query_typed_one("SELECT setval('post_save.ledger_slot', $1, true)", &[(&i64::from(next), Type::INT8)])
        .await?;
    Ok(Rotation::Rotated { slot: next, freed, moved })
}

/// The other backends holding a lock on any of `relations` that will not let go soon (idle in a
/// transaction, or running a statement for more than a second), for the log and for `doctor`:
/// pid, role, application, state. Empty when there are none.
pub(crate) async fn lock_holders(
    client: &impl tokio_postgres::GenericClient,
    relations: &[&str],
) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(string_agg(DISTINCT format('pid %s (role %s, application %L, %s)', \
                      a.pid, a.usename, a.application_name, a.state), '; '), '') \
               FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
              WHERE l.relation = ANY($1::text[]::regclass[]) AND l.granted AND l.pid <> pg_backend_pid() \
                AND (a.state <> 'active' OR a.query_start < clock_timestamp() - interval '1 second')",
            &[&relations],
        )
        .await?;
    Ok(row.get(0))
}

/// The ledger's partitions, by name.
pub(crate) const PARTITIONS: [&str; SLOTS as usize] = ["post_save.event_0", "post_save.event_1", "post_save.event_2"];

#[cfg(test)]
mod tests {
    use super::{PageLimit, Snapshot};

    #[test]
    fn snapshots_parse_from_their_text() {
        let s = Snapshot::parse("745:760:751,745,758", 770).expect("parses");
        assert_eq!(s, Snapshot { xmin: 745, xmax: 760, running: vec![745, 751, 758], next: 770 });
        assert!(s.runs(745) && s.runs(758) && s.runs(760) && s.runs(10_000));
        assert!(!s.runs(744) && !s.runs(746) && !s.runs(759));
        // nothing running; a next id read below xmax is raised to it
        assert_eq!(
            Snapshot::parse("747:747:", 700),
            Some(Snapshot { xmin: 747, xmax: 747, running: vec![], next: 747 })
        );
        for bad in ["", "1:2", "1:2:x", "3:2:", "1:2:3:4"] {
            assert_eq!(Snapshot::parse(bad, 5), None, "{bad:?}");
        }
    }

    #[test]
    fn a_page_reads_about_the_rows_it_keeps() {
        let p = PageLimit::for_events(1000, 1);
        assert_eq!((p.rows, p.events), (1000, 1000));
        let p = PageLimit::for_events(1000, 100);
        assert_eq!((p.rows, p.events), (21, 1000));
        // rows bigger than the page: one row is still read
        let p = PageLimit::for_events(1000, 5000);
        assert_eq!((p.rows, p.events), (1, 1000));
        // nonsense never makes an empty page
        let p = PageLimit::for_events(0, 0);
        assert_eq!((p.rows, p.events), (1, 1));
    }
}
