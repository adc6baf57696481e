//! How long the WAL reader waits before it connects again, and what it says meanwhile.
//!
//! A failure a retry may fix is retried with the daemon's reconnect backoff
//! (`reconnect_min` doubling to `reconnect_max`, with jitter), a warning each time. A
//! [`Blocker`] is said once, at error level with what to do, and published (`STATUS=`, the
//! metrics); then the reader checks again every `reconnect_max` without a word, so an
//! operator's fix is picked up without a restart, and says at info level when it streams again.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::watch;

use super::error::{Blocked, Blocker, WalError};
use crate::config::DaemonConfig;

/// The reader's reconnect state, between sessions.
pub(crate) struct Reconnect {
    backoff: ExponentialBuilder,
    delays: ExponentialBackoff,
    /// Failed attempts since the reader last streamed.
    attempt: u32,
    /// How often a blocked reader checks again: `reconnect_max`.
    recheck: Duration,
    /// How long another process may hold the slot before that is a blocker: the lease (a
    /// daemon taking over may find its predecessor's stream still open until then), else
    /// `reconnect_max` (a restarted daemon's old stream ends as soon as the server notices).
    patience: Duration,
    /// Since when the slot has been found in use, without a stream in between.
    in_use_since: Option<Instant>,
    /// The blocker already told.
    told: Option<Blocker>,
    publish: watch::Sender<Option<Blocked>>,
}

/// What to do after a failure.
#[derive(Debug, PartialEq, Eq)]
enum Judged {
    /// Retry with backoff.
    Retry,
    /// Blocked: tell it when `first`, then check again quietly.
    Blocked { first: bool },
}

impl Reconnect {
    pub(crate) fn new(daemon: &DaemonConfig, publish: watch::Sender<Option<Blocked>>) -> Reconnect {
        let backoff = crate::db::reconnect_backoff(daemon);
        Reconnect {
            delays: backoff.build(),
            backoff,
            attempt: 0,
            recheck: daemon.reconnect_max,
            patience: daemon.lease.unwrap_or(daemon.reconnect_max),
            in_use_since: None,
            told: None,
            publish,
        }
    }

    /// The wait before the next session after `error`; logs it, or not, as the module says.
    pub(crate) fn failed(&mut self, error: &WalError) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        match self.judge(error, Instant::now()) {
            Judged::Retry => {
                let wait = self.next_delay();
                tracing::warn!(error = %error, attempt = self.attempt, retry_in = ?wait, "WAL capture: cannot stream; reconnecting");
                wait
            }
            Judged::Blocked { first } => {
                let reason = error.blocker().map_or("", Blocker::label);
                if first {
                    tracing::error!(
                        reason, error = %error, fix = %error.fix(), recheck_every = ?self.recheck,
                        "WAL capture blocked: retrying cannot fix this; checking again quietly until it is fixed"
                    );
                } else {
                    tracing::debug!(reason, error = %error, "WAL capture still blocked");
                }
                self.recheck
            }
        }
    }

    /// The wait after a stream lost while it ran: always worth a retry.
    pub(crate) fn lost(&mut self, why: &str) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        let wait = self.next_delay();
        tracing::warn!(error = %why, attempt = self.attempt, retry_in = ?wait, "WAL capture: stream lost; reconnecting");
        wait
    }

    /// The reader streams: the backoff starts over, and a blocker told is over.
    pub(crate) fn streaming(&mut self) {
        self.attempt = 0;
        self.delays = self.backoff.build();
        self.in_use_since = None;
        if let Some(was) = self.told.take() {
            tracing::info!(was = was.label(), "WAL capture unblocked: streaming again");
            self.publish.send_replace(None);
        }
    }

    fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.recheck)
    }

    /// Whether `error` is retried or blocks, and whether it is news.
    fn judge(&mut self, error: &WalError, now: Instant) -> Judged {
        let Some(blocker) = error.blocker() else { return Judged::Retry };
        if blocker == Blocker::SlotInUse {
            let since = *self.in_use_since.get_or_insert(now);
            if now.duration_since(since) < self.patience {
                return Judged::Retry;
            }
        } else {
            self.in_use_since = None;
        }
        let first = self.told != Some(blocker);
        if first {
            self.told = Some(blocker);
            self.publish.send_replace(Some(Blocked { reason: blocker, detail: error.to_string() }));
        }
        Judged::Blocked { first }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconnect(lease: Option<Duration>) -> (Reconnect, watch::Receiver<Option<Blocked>>) {
        let daemon = DaemonConfig {
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            lease,
            ..DaemonConfig::default()
        };
        let (tx, rx) = watch::channel(None);
        (Reconnect::new(&daemon, tx), rx)
    }

    fn in_use() -> WalError {
        WalError::SlotInUse { slot: "post_save_x".into(), pid: Some(7), holder: None }
    }

    #[test]
    fn a_blocker_is_told_once_and_published_until_streaming() {
        let (mut r, rx) = reconnect(None);
        let level = WalError::WalLevel { level: "replica".into() };
        let now = Instant::now();
        assert_eq!(r.judge(&level, now), Judged::Blocked { first: true });
        assert_eq!(r.judge(&level, now), Judged::Blocked { first: false });
        assert_eq!(rx.borrow().as_ref().map(|b| b.reason), Some(Blocker::WalLevel));
        // another blocker is news
        assert_eq!(r.judge(&WalError::NoPublication, now), Judged::Blocked { first: true });
        assert_eq!(rx.borrow().as_ref().map(|b| b.reason), Some(Blocker::NoPublication));
        r.streaming();
        assert_eq!(*rx.borrow(), None);
        assert_eq!(r.judge(&WalError::NoPublication, now), Judged::Blocked { first: true }, "news again");
    }

    #[test]
    fn a_blocked_reader_checks_again_every_reconnect_max() {
        let (mut r, _rx) = reconnect(None);
        let level = WalError::WalLevel { level: "replica".into() };
        assert_eq!(r.failed(&level), Duration::from_secs(2));
        assert_eq!(r.failed(&level), Duration::from_secs(2));
    }

    #[test]
    fn a_slot_in_use_is_retried_for_the_lease_then_blocks() {
        let (mut r, rx) = reconnect(Some(Duration::from_secs(10)));
        let now = Instant::now();
        assert_eq!(r.judge(&in_use(), now), Judged::Retry);
        assert_eq!(r.judge(&in_use(), now + Duration::from_secs(9)), Judged::Retry);
        assert_eq!(*rx.borrow(), None);
        assert_eq!(r.judge(&in_use(), now + Duration::from_secs(10)), Judged::Blocked { first: true });
        r.streaming();
        assert_eq!(r.judge(&in_use(), now + Duration::from_secs(11)), Judged::Retry, "a new episode");
    }

    #[test]
    fn without_a_lease_a_slot_in_use_is_retried_for_reconnect_max() {
        let (mut r, _rx) = reconnect(None);
        let now = Instant::now();
        assert_eq!(r.judge(&in_use(), now), Judged::Retry);
        assert_eq!(r.judge(&in_use(), now + Duration::from_secs(2)), Judged::Blocked { first: true });
    }

    #[test]
    fn passing_failures_back_off_from_reconnect_min_to_reconnect_max() {
        let (mut r, _rx) = reconnect(None);
        let gone =
            WalError::Stream(crate::capture::wal::stream::StreamError::Io(std::io::ErrorKind::ConnectionReset.into()));
        let waits: Vec<Duration> = (0..8).map(|_| r.failed(&gone)).collect();
        assert!(waits[0] >= Duration::from_millis(100) && waits[0] <= Duration::from_millis(200), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(4)), "jitter stays within twice the max: {waits:?}");
        assert!(waits[7] >= Duration::from_secs(2), "{waits:?}");
        r.streaming();
        assert!(r.failed(&gone) <= Duration::from_millis(200), "starts over once streaming");
    }
}
