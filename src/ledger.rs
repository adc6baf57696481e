//! Queries against the ledger (`post_save.event`) and the dead-letter list.

use tokio_postgres::Client;

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

const FETCH_NEW: &str = "SELECT id, sender, op, head::text, rows::text FROM post_save.event \
     WHERE handled_at IS NULL AND (id > $1 OR id = ANY($2)) ORDER BY id LIMIT $3";

const FETCH_PENDING: &str = "SELECT id, sender, op, head::text, rows::text FROM post_save.event \
     WHERE handled_at IS NULL AND id > $1 ORDER BY id LIMIT $2";

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

/// Up to `limit` pending ledger rows with ids above `after` or among `gaps`, in id order.
pub(crate) async fn fetch_new(
    client: &Client,
    after: i64,
    gaps: &[i64],
    limit: i64,
    using: &str,
) -> Result<(Vec<LedgerRow>, Vec<BadRow>), tokio_postgres::Error> {
    let rows = client.query(FETCH_NEW, &[&after, &gaps, &limit]).await?;
    Ok(decode_rows(rows, using))
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

/// Up to `limit` pending ledger rows with ids above `after`, in id order.
pub(crate) async fn fetch_pending(
    client: &Client,
    after: i64,
    limit: i64,
    using: &str,
) -> Result<(Vec<LedgerRow>, Vec<BadRow>, Option<i64>), tokio_postgres::Error> {
    let rows = client.query(FETCH_PENDING, &[&after, &limit]).await?;
    let last = rows.last().map(|r| r.get::<_, i64>(0));
    let (events, bad) = decode_rows(rows, using);
    Ok((events, bad, last))
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
    client: &Client,
    dead: &[DeadLetter],
    acks: &[i64],
) -> Result<u64, tokio_postgres::Error> {
    let event_ids: Vec<Option<i64>> = dead.iter().map(|d| d.event_id).collect();
    let handlers: Vec<&str> = dead.iter().map(|d| d.handler.as_str()).collect();
    let senders: Vec<&str> = dead.iter().map(|d| d.sender.as_str()).collect();
    let events: Vec<&str> = dead.iter().map(|d| d.event.as_str()).collect();
    let attempts: Vec<i32> = dead.iter().map(|d| d.attempts).collect();
    let errors: Vec<&str> = dead.iter().map(|d| d.last_error.as_str()).collect();
    client.execute(WRITE_OUTCOMES, &[&event_ids, &handlers, &senders, &events, &attempts, &errors, &acks]).await
}
