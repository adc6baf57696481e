//! The outcome writer: dead letters and acknowledgements of ledger rows, written in batches in
//! one statement each; then the sources that asked hear that their batches are settled.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use super::claims::InFlight;
use super::{Notice, Settled};
use crate::config::DaemonConfig;
use crate::db::{Param, Work};
use crate::stats::Stats;

/// What became of one batch or delivery, for the outcome writer.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Every handler finished (done or dead): acknowledge.
    Done(i64),
    /// The daemon stopped before every handler finished: leave it pending, redelivered later.
    HandedBack(i64),
    /// A delivery gave up.
    Dead(DeadLetter),
    /// Every handler finished a batch whose source wants to hear of it (or, when `true`, some
    /// were handed back): the source hears once the dead letters before it are written.
    Notify(Notice, bool),
}

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

/// Dead letters inserted and ledger rows acknowledged in one statement (so one commit).
pub(crate) const WRITE_OUTCOMES: &str = "WITH dead AS ( \
       INSERT INTO post_save.dead_letter (event_id, handler, sender, event, attempts, last_error) \
       SELECT e, h, s, ev::json, a, l FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[]) \
         AS u(e, h, s, ev, a, l) \
     ) \
     UPDATE post_save.event SET handled_at = clock_timestamp() WHERE id = ANY($7) AND handled_at IS NULL";

/// Writes outcomes in batches until the channel closes: dead letters and ledger acknowledgements
/// in one statement, then tells the sources that asked.
///
/// A failed write is kept and tried again on the current connection (the listener replaces it
/// after a reconnect) until `give_up` fires; what is not written then stays pending in the
/// ledger and is delivered again: at least once.
pub(crate) async fn write_outcomes(
    mut rx: mpsc::UnboundedReceiver<Outcome>,
    mut client: watch::Receiver<Option<Arc<Work>>>,
    in_flight: Arc<InFlight>,
    config: DaemonConfig,
    stats: Arc<Stats>,
    give_up: CancellationToken,
) {
    let mut dead = Vec::new();
    let mut acks = Vec::new();
    let mut handed_back = Vec::new();
    let mut notify = Vec::new();
    while let Some(first) = rx.recv().await {
        sort(first, &mut dead, &mut acks, &mut handed_back, &mut notify);
        let deadline = tokio::time::Instant::now() + config.ack_interval;
        while acks.len() + dead.len() + notify.len() < config.ack_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(o)) => sort(o, &mut dead, &mut acks, &mut handed_back, &mut notify),
                Ok(None) | Err(_) => break,
            }
        }
        let mut written = true;
        if !acks.is_empty() || !dead.is_empty() {
            written = write_batch(&mut client, &dead, &acks, &give_up).await;
            if !written {
                tracing::warn!(
                    acks = acks.len(),
                    dead = dead.len(),
                    "outcomes not written; these events stay pending and will be delivered again"
                );
            } else {
                stats.acked.fetch_add(acks.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        // A source hears of a batch only after its dead letters are written; when they could
        // not be, the batch counts as handed back (the WAL reader then leaves its transaction
        // unconfirmed and the slot streams it again).
        for (notice, back) in notify.drain(..) {
            let handed_back = back || !written;
            let _ = notice.to.send(Settled { key: notice.key, handed_back });
        }
        in_flight.settle(&acks, &handed_back);
        acks.clear();
        handed_back.clear();
        dead.clear();
    }
}

fn sort(
    outcome: Outcome,
    dead: &mut Vec<DeadLetter>,
    acks: &mut Vec<i64>,
    back: &mut Vec<i64>,
    notify: &mut Vec<(Notice, bool)>,
) {
    match outcome {
        Outcome::Done(id) => acks.push(id),
        Outcome::HandedBack(id) => back.push(id),
        Outcome::Dead(d) => dead.push(d),
        Outcome::Notify(notice, handed_back) => notify.push((notice, handed_back)),
    }
}

async fn write_batch(
    client: &mut watch::Receiver<Option<Arc<Work>>>,
    dead: &[DeadLetter],
    acks: &[i64],
    give_up: &CancellationToken,
) -> bool {
    // Tried every 200 ms until the connection is back: a warning for the first failure and then
    // every 10 s, so an outage does not flood the log.
    let mut failures = 0u64;
    loop {
        let current = client.borrow_and_update().clone();
        if let Some(c) = current {
            match write(&c, dead, acks).await {
                Ok(_) => return true,
                Err(e) => {
                    failures += 1;
                    if failures % 50 == 1 {
                        tracing::warn!(error = %e, failures, "writing acknowledgements failed; retrying every 200 ms");
                    } else {
                        tracing::debug!(error = %e, failures, "writing acknowledgements failed; retrying");
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = give_up.cancelled() => return false,
        }
    }
}

/// Records dead letters and acknowledges events, in one statement (so one commit).
async fn write(work: &Work, dead: &[DeadLetter], acks: &[i64]) -> Result<u64, tokio_postgres::Error> {
    let event_ids: Vec<Option<i64>> = dead.iter().map(|d| d.event_id).collect();
    let handlers: Vec<&str> = dead.iter().map(|d| d.handler.as_str()).collect();
    let senders: Vec<&str> = dead.iter().map(|d| d.sender.as_str()).collect();
    let events: Vec<&str> = dead.iter().map(|d| d.event.as_str()).collect();
    let attempts: Vec<i32> = dead.iter().map(|d| d.attempts).collect();
    let errors: Vec<&str> = dead.iter().map(|d| d.last_error.as_str()).collect();
    let params: [Param; 7] = [
        (&event_ids, Type::INT8_ARRAY),
        (&handlers, Type::TEXT_ARRAY),
        (&senders, Type::TEXT_ARRAY),
        (&events, Type::TEXT_ARRAY),
        (&attempts, Type::INT4_ARRAY),
        (&errors, Type::TEXT_ARRAY),
        (&acks, Type::INT8_ARRAY),
    ];
    work.execute(WRITE_OUTCOMES, &params).await
}
