//! Counters of what the daemon did, readable while it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;

/// Per-handler delivery counts (`outcome` = `handled`, `failed`, `retried` or `dead`).
pub(crate) type Deliveries = Family<Vec<(&'static str, String)>, Counter>;
/// Per-handler attempt durations.
pub(crate) type Durations = Family<Vec<(&'static str, String)>, Histogram, fn() -> Histogram>;

fn duration_buckets() -> Histogram {
    // 0.5 ms … about 65 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// One handler's series in [`Stats::deliveries`] and [`Stats::durations`] (handles onto the
/// same values the families export), with the daemon's counters.
#[derive(Clone)]
pub(crate) struct HandlerMetrics {
    pub stats: Arc<Stats>,
    pub handled: Counter,
    pub failed: Counter,
    pub retried: Counter,
    pub dead: Counter,
    pub durations: Histogram,
}

/// Live counters. Cheap to bump from any task.
#[derive(Debug)]
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
    pub(crate) deliveries: Deliveries,
    pub(crate) durations: Durations,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            notifications: AtomicU64::default(),
            invalid: AtomicU64::default(),
            unknown_sender: AtomicU64::default(),
            duplicates: AtomicU64::default(),
            events: AtomicU64::default(),
            handled: AtomicU64::default(),
            failed_attempts: AtomicU64::default(),
            retried: AtomicU64::default(),
            dead: AtomicU64::default(),
            acked: AtomicU64::default(),
            reconnects: AtomicU64::default(),
            liveness_failures: AtomicU64::default(),
            deliveries: Deliveries::default(),
            durations: Durations::new_with_constructor(duration_buckets),
        }
    }
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

    /// The delivery counters and the attempt histogram of `handler`. Looked up once per
    /// handler, not per delivery: a lookup builds the label set and hashes it, which cost more
    /// than the no-op handler's whole delivery.
    pub(crate) fn handler_metrics(self: &Arc<Self>, handler: &str) -> HandlerMetrics {
        let outcome = |o: &str| {
            self.deliveries.get_or_create(&vec![("handler", handler.to_owned()), ("outcome", o.to_owned())]).clone()
        };
        HandlerMetrics {
            stats: Arc::clone(self),
            handled: outcome("handled"),
            failed: outcome("failed"),
            retried: outcome("retried"),
            dead: outcome("dead"),
            durations: self.durations.get_or_create(&vec![("handler", handler.to_owned())]).clone(),
        }
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
