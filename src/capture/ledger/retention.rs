//! Ledger retention: acknowledged rows are kept `daemon.keep_handled`, then the partition that
//! holds them is emptied at once (the ledger rotates over three partitions) rather than deleted
//! row by row.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::query::{self, Rotation};
use crate::db;

/// Deletes acknowledged ledger rows handled more than `keep` ago, every minute (or every `keep`,
/// when shorter), on a connection of its own so a long DELETE never delays the listener.
pub(crate) async fn keep_small(pg: crate::db::Settings, keep: Duration, stop: CancellationToken) {
    let period = query::rotation_period(keep);
    let every = (period / 2).clamp(Duration::from_millis(250), Duration::from_secs(60));
    let mut client = None;
    let mut not_before = tokio::time::Instant::now();
    let mut blocked = Duration::ZERO;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        if tokio::time::Instant::now() < not_before {
            continue;
        }
        if client.is_none() {
            match db::connect(&pg).await {
                Ok(connected) => client = Some(connected),
                Err(e) => {
                    tracing::warn!(error = %e, "ledger retention cannot connect; will retry");
                    continue;
                }
            }
        }
        let Some((c, _)) = client.as_mut() else { continue };
        match query::rotate(c, keep, period).await {
            Ok(Rotation::NotDue { wait }) => not_before = tokio::time::Instant::now() + wait,
            Ok(Rotation::Rotated { slot, freed, moved }) => {
                blocked = Duration::ZERO;
                tracing::debug!(slot, freed_bytes = freed, moved, "ledger partition emptied; writes go to it now");
            }
            Ok(Rotation::Blocked { slot, holders }) => {
                // Checked again after 1 s, 2 s, 4 s … up to a minute: a warning each time.
                blocked = (blocked * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                not_before = tokio::time::Instant::now() + blocked;
                tracing::warn!(
                    partition = %format!("post_save.event_{slot}"),
                    holders = %holders,
                    retry_in = ?blocked,
                    "ledger retention waits: another session holds a lock on the partition to be \
                     emptied (an open transaction that read the ledger); the ledger grows until it ends"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "ledger retention failed; will retry");
                if let Some((_, task)) = client.take() {
                    task.abort();
                }
            }
        }
    }
}
