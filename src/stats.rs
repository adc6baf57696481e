//! Counters of what the daemon did, readable while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters. Cheap to bump from any task.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) notifications: AtomicU64,
    pub(crate) invalid: AtomicU64,
    pub(crate) unknown_sender: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) failed_attempts: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) liveness_failures: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Notifications received on the channel.
    pub notifications: u64,
    /// Payloads that did not decode (logged and skipped).
    pub invalid: u64,
    /// Events of tables this daemon does not watch in `notify` mode (logged and skipped).
    pub unknown_sender: u64,
    /// Events seen again while in flight or after being handled, and not dispatched twice.
    pub duplicates: u64,
    /// Events dispatched to the router.
    pub events: u64,
    /// Successful handler deliveries.
    pub handled: u64,
    /// Failed handler attempts.
    pub failed_attempts: u64,
    /// Attempts scheduled again after a failure.
    pub retried: u64,
    /// Deliveries that gave up into the dead-letter list.
    pub dead: u64,
    /// Ledger events acknowledged.
    pub acked: u64,
    /// Reconnections to the database.
    pub reconnects: u64,
    /// Liveness pings not answered in time (each dropped the connections).
    pub liveness_failures: u64,
}

impl Stats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            notifications: get(&self.notifications),
            invalid: get(&self.invalid),
            unknown_sender: get(&self.unknown_sender),
            duplicates: get(&self.duplicates),
            events: get(&self.events),
            handled: get(&self.handled),
            failed_attempts: get(&self.failed_attempts),
            retried: get(&self.retried),
            dead: get(&self.dead),
            acked: get(&self.acked),
            reconnects: get(&self.reconnects),
            liveness_failures: get(&self.liveness_failures),
        }
    }
}
