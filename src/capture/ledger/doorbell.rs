//! The doorbell: armed (durable captures NOTIFY) while the daemon waits idle; silenced while it
//! is busy, when it polls the ledger every `busy_poll` instead and most commits carry no NOTIFY.
//! Busy means: more than `daemon.doorbell_rate` events per second, or commits queueing for
//! NOTIFY's lock (with a slow disk that happens well below any fixed rate, and the queue itself
//! keeps the rate down). It is armed again below a quarter of the rate.

use std::time::{Duration, Instant};

use super::SessionError;
use super::query;
use crate::config::Config;
use crate::db::{DbError, Work};

/// The rate is measured over windows this long.
const RATE_WINDOW: Duration = Duration::from_millis(200);

/// Below this rate NOTIFY's lock is not worth looking at.
const LOCK_CHECK_RATE: f64 = 100.0;

/// This many writers queueing for NOTIFY's lock silence the doorbell.
const LOCK_WAITERS: i64 = 2;

pub(super) struct Bell {
    pub(super) armed: bool,
    high: f64,
    window_start: Instant,
    window_events: usize,
}

impl Bell {
    pub(super) fn new(config: &Config) -> Self {
        Bell::with_rate(config.daemon.doorbell_rate as f64, Instant::now())
    }

    fn with_rate(high: f64, now: Instant) -> Self {
        Bell { armed: false, high, window_start: now, window_events: 0 }
    }

    pub(super) async fn arm(&mut self, work: &Work) -> Result<(), SessionError> {
        query::set_doorbell(&work.client, true).await.map_err(DbError::Query)?;
        self.armed = true;
        Ok(())
    }

    /// Counts `got` events; at the end of each window, decides whether to ring or poll.
    pub(super) async fn observe(&mut self, work: &Work, got: usize) -> Result<(), SessionError> {
        let Some(rate) = self.count(got, Instant::now()) else { return Ok(()) };
        let waiters = if self.asks_lock(rate) {
            Some(query::notify_lock_waiters(&work.client).await.map_err(DbError::Query)?)
        } else {
            None
        };
        match self.decide(rate, waiters) {
            Some(false) => {
                query::set_doorbell(&work.client, false).await.map_err(DbError::Query)?;
                self.armed = false;
                tracing::debug!(rate, "busy: polling the ledger; captures stop notifying");
            }
            Some(true) => {
                self.arm(work).await?;
                tracing::debug!(rate, "idle: captures notify again");
            }
            None => {}
        }
        Ok(())
    }

    /// Counts `got` events at `now`; the rate of the window, once it is over (a new one starts).
    fn count(&mut self, got: usize, now: Instant) -> Option<f64> {
        self.window_events += got;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < RATE_WINDOW {
            return None;
        }
        let rate = self.window_events as f64 / elapsed.as_secs_f64();
        self.window_start = now;
        self.window_events = 0;
        Some(rate)
    }

    /// Whether deciding at `rate` needs the count of writers queueing for NOTIFY's lock.
    fn asks_lock(&self, rate: f64) -> bool {
        self.armed && rate <= self.high && rate > LOCK_CHECK_RATE
    }

    /// The doorbell's new state at `rate` (`waiters` queueing for NOTIFY's lock, when asked),
    /// or `None` to leave it as it is.
    fn decide(&self, rate: f64, waiters: Option<i64>) -> Option<bool> {
        if self.armed {
            let busy = rate > self.high || waiters.is_some_and(|w| w >= LOCK_WAITERS);
            busy.then_some(false)
        } else {
            (rate < self.high / 4.0).then_some(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bell(high: f64, armed: bool) -> (Bell, Instant) {
        let now = Instant::now();
        let mut bell = Bell::with_rate(high, now);
        bell.armed = armed;
        (bell, now)
    }

    #[test]
    fn the_rate_is_measured_over_whole_windows() {
        let (mut bell, start) = bell(1000.0, true);
        assert_eq!(bell.count(50, start + Duration::from_millis(100)), None);
        assert_eq!(bell.count(50, start + Duration::from_millis(150)), None);
        // 100 events (of both calls) over 250 ms
        let rate = bell.count(0, start + Duration::from_millis(250)).expect("the window is over");
        assert!((rate - 400.0).abs() < 1e-6, "{rate}");
        // a new window starts empty
        assert_eq!(bell.count(10, start + Duration::from_millis(300)), None);
        let rate = bell.count(0, start + Duration::from_millis(450)).expect("the second window is over");
        assert!((rate - 50.0).abs() < 1e-6, "{rate}");
    }

    #[test]
    fn an_armed_bell_goes_silent_above_the_rate_or_when_writers_queue_for_notify() {
        let (bell, _) = bell(1000.0, true);
        assert_eq!(bell.decide(1001.0, None), Some(false));
        // above the rate the lock is not even looked at
        assert!(!bell.asks_lock(1001.0));
        // between the lock-check rate and the high rate: the queue decides
        assert!(bell.asks_lock(500.0));
        assert_eq!(bell.decide(500.0, Some(LOCK_WAITERS)), Some(false));
        assert_eq!(bell.decide(500.0, Some(LOCK_WAITERS - 1)), None);
        // a quiet database: neither the rate nor the lock
        assert!(!bell.asks_lock(LOCK_CHECK_RATE));
        assert_eq!(bell.decide(LOCK_CHECK_RATE, None), None);
    }

    #[test]
    fn a_silent_bell_rings_again_below_a_quarter_of_the_rate() {
        let (bell, _) = bell(1000.0, false);
        assert!(!bell.asks_lock(10.0));
        assert_eq!(bell.decide(249.0, None), Some(true));
        // between a quarter and the rate: stays silent (no flapping around one threshold)
        assert_eq!(bell.decide(250.0, None), None);
        assert_eq!(bell.decide(999.0, None), None);
    }
}
