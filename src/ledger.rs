//! Queries against the ledger (`post_save.event`) and the dead-letter list.

use tokio_postgres::{Client, Statement};

use crate::event::{DecodeError, SaveEvent, decode_ledger_row};

/// A delivery that gave up.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    pub event_id: Option<i64>,
    pub handler: String,
    pub sender: String,
    pub event: String,
    pub attempts: i32,
    pub last_error: String,
}

/// A ledger row that did not decode; only possible if someone wrote the ledger by hand.
#[derive(Debug)]
pub(crate) struct BadRow {
    pub id: i64,
    pub error: DecodeError,
}

/// A page holds at most $3 ledger rows and, counting each row's events, about $3 events (a row
/// is never split): a 100-event row counts as 100 against the page, so memory stays bounded.
const FETCH_NEW: &str = "SELECT id, sender, op, head::text, rows::text FROM ( \
       SELECT id, sender, op, head, rows, sum(n) OVER (ORDER BY id) - n AS before FROM post_save.event \
        WHERE handled_at IS NULL AND (id > $1 OR id = ANY($2)) ORDER BY id LIMIT $3) page \
     WHERE before < $3 ORDER BY id";

const FETCH_PENDING: &str = "SELECT id, sender, op, head::text, rows::text FROM ( \
       SELECT id, sender, op, head, rows, sum(n) OVER (ORDER BY id) - n AS before FROM post_save.event \
        WHERE handled_at IS NULL AND id > $1 ORDER BY id LIMIT $2) page \
     WHERE before < $2 ORDER BY id";

const WRITE_OUTCOMES: &str = "WITH dead AS ( \
       INSERT INTO post_save.dead_letter (event_id, handler, sender, event, attempts, last_error) \
       SELECT e, h, s, ev::json, a, l FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[]) \
         AS u(e, h, s, ev, a, l) \
     ) \
     UPDATE post_save.event SET handled_at = clock_timestamp() WHERE id = ANY($7) AND handled_at IS NULL";

/// The events of one ledger row (one captured statement, or a chunk of one).
#[derive(Debug)]
pub(crate) struct LedgerRow {
    pub id: i64,
    pub events: Vec<SaveEvent>,
}

/// The daemon's working connection, with its statements prepared once (a query by text would
/// be parsed and planned on every call).
pub(crate) struct Work {
    pub client: Client,
    fetch_new: Statement,
    fetch_pending: Statement,
    write_outcomes: Statement,
}

impl Work {
    /// Prepares the statements on `client`.
    pub(crate) async fn new(client: Client) -> Result<Work, tokio_postgres::Error> {
        let fetch_new = client.prepare(FETCH_NEW).await?;
        let fetch_pending = client.prepare(FETCH_PENDING).await?;
        let write_outcomes = client.prepare(WRITE_OUTCOMES).await?;
        Ok(Work { client, fetch_new, fetch_pending, write_outcomes })
    }
}

/// A page of pending ledger rows with ids above `after` or among `gaps`, in id order, at most
/// `limit` rows and about `limit` events. `more` is true when the page was cut short by a limit.
pub(crate) async fn fetch_new(
    work: &Work,
    after: i64,
    gaps: &[i64],
    limit: i64,
    using: &str,
) -> Result<(Vec<LedgerRow>, Vec<BadRow>, bool), tokio_postgres::Error> {
    let rows = work.client.query(&work.fetch_new, &[&after, &gaps, &limit]).await?;
    let (good, bad) = decode_rows(rows, using);
    let more = page_full(&good, &bad, limit);
    Ok((good, bad, more))
}

fn page_full(good: &[LedgerRow], bad: &[BadRow], limit: i64) -> bool {
    let rows = good.len() + bad.len();
    let events: usize = good.iter().map(|r| r.events.len()).sum::<usize>() + bad.len();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    rows >= limit || events >= limit
}

/// Backends of this database waiting for the lock every notifying commit takes: commits are
/// queueing behind NOTIFY.
pub(crate) async fn notify_lock_waiters(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
              WHERE wait_event_type = 'Lock' AND wait_event = 'object' AND datname = current_database()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Rings (armed) or silences the doorbell: whether durable captures NOTIFY.
pub(crate) async fn set_doorbell(client: &Client, armed: bool) -> Result<(), tokio_postgres::Error> {
    client.query_one("SELECT setval('post_save.doorbell', $1, true)", &[&i64::from(armed)]).await.map(drop)
}

/// A page of pending ledger rows with ids above `after` (as [`fetch_new`]), the last id read,
/// and whether the page was cut short by a limit.
pub(crate) async fn fetch_pending(
    work: &Work,
    after: i64,
    limit: i64,
    using: &str,
) -> Result<(Vec<LedgerRow>, Vec<BadRow>, Option<i64>, bool), tokio_postgres::Error> {
    let rows = work.client.query(&work.fetch_pending, &[&after, &limit]).await?;
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

/// Records dead letters and acknowledges events, in one statement (so one commit).
pub(crate) async fn write_outcomes(
    work: &Work,
    dead: &[DeadLetter],
    acks: &[i64],
) -> Result<u64, tokio_postgres::Error> {
    let event_ids: Vec<Option<i64>> = dead.iter().map(|d| d.event_id).collect();
    let handlers: Vec<&str> = dead.iter().map(|d| d.handler.as_str()).collect();
    let senders: Vec<&str> = dead.iter().map(|d| d.sender.as_str()).collect();
    let events: Vec<&str> = dead.iter().map(|d| d.event.as_str()).collect();
    let attempts: Vec<i32> = dead.iter().map(|d| d.attempts).collect();
    let errors: Vec<&str> = dead.iter().map(|d| d.last_error.as_str()).collect();
    work.client
        .execute(&work.write_outcomes, &[&event_ids, &handlers, &senders, &events, &attempts, &errors, &acks])
        .await
}

/// Ledger rows examined per retention statement.
const RETENTION_BATCH: i64 = 10_000;

/// Deletes acknowledged ledger rows handled more than `keep` ago, walking ids upward from
/// `*from` until it reaches rows handled recently. Pending rows are stepped over (they are
/// deleted on a later run, once handled). Returns the number deleted; `*from` becomes the oldest
/// row still kept, where the next run starts.
pub(crate) async fn delete_handled(
    client: &Client,
    keep: std::time::Duration,
    from: &mut i64,
) -> Result<u64, tokio_postgres::Error> {
    let keep = f64::max(keep.as_secs_f64(), 0.0);
    let mut deleted = 0;
    let mut start = *from;
    let mut oldest_pending: Option<i64> = None;
    loop {
        let row = client
            .query_one(
                "WITH batch AS ( \
                     SELECT id, handled_at FROM post_save.event WHERE id >= $1 ORDER BY id LIMIT $2 \
                 ), gone AS ( \
                     DELETE FROM post_save.event e USING batch b \
                      WHERE e.id = b.id AND b.handled_at < clock_timestamp() - make_interval(secs => $3) \
                     RETURNING e.id \
                 ) \
                 SELECT (SELECT count(*) FROM gone), \
                        (SELECT max(id) FROM batch), \
                        (SELECT min(id) FROM batch WHERE handled_at >= clock_timestamp() - make_interval(secs => $3)), \
                        (SELECT min(id) FROM batch WHERE handled_at IS NULL)",
                &[&start, &RETENTION_BATCH, &keep],
            )
            .await?;
        deleted += u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        let last: Option<i64> = row.get(1);
        let recent: Option<i64> = row.get(2);
        if oldest_pending.is_none() {
            oldest_pending = row.get(3);
        }
        match (last, recent) {
            (Some(last), None) => start = last + 1,
            (None, _) => {
                *from = oldest_pending.unwrap_or(start);
                return Ok(deleted);
            }
            (Some(_), Some(recent)) => {
                *from = oldest_pending.map_or(recent, |p| p.min(recent));
                return Ok(deleted);
            }
        }
    }
}

/// A dead letter whose retry was requested (`post-save dead retry`).
#[derive(Debug)]
pub(crate) struct RetryRequest {
    pub id: i64,
    pub handler: String,
    pub event: String,
}

/// Dead letters waiting for a retry, oldest first, leaving out `busy` (already running).
pub(crate) async fn retry_requests(client: &Client, busy: &[i64]) -> Result<Vec<RetryRequest>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, handler, event::text FROM post_save.dead_letter \
              WHERE retry_requested_at IS NOT NULL AND id <> ALL($1) ORDER BY id LIMIT 100",
            &[&busy],
        )
        .await?;
    Ok(rows.iter().map(|r| RetryRequest { id: r.get(0), handler: r.get(1), event: r.get(2) }).collect())
}

/// Records how a requested retry ended: `None` (delivered) deletes the dead letter; a failure
/// adds its attempts, keeps its error and clears the request.
pub(crate) async fn retry_done(
    client: &Client,
    id: i64,
    failure: Option<(i32, &str)>,
) -> Result<(), tokio_postgres::Error> {
    match failure {
        None => client.execute("DELETE FROM post_save.dead_letter WHERE id = $1", &[&id]).await?,
        Some((attempts, error)) => {
            client
                .execute(
                    "UPDATE post_save.dead_letter SET attempts = attempts + $2, last_error = $3, \
                            dead_at = clock_timestamp(), retry_requested_at = NULL WHERE id = $1",
                    &[&id, &attempts, &error],
                )
                .await?
        }
    };
    Ok(())
}
