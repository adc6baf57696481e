//! systemd integration (`Type=notify`): readiness, status lines, the watchdog, reloads and
//! stops, over `$NOTIFY_SOCKET`. Everything here does nothing when that variable is unset.
//!
//! `READY=1` is sent when the daemon first reaches [`State::Listening`] — migrated, LISTENing
//! and caught up. `WATCHDOG=1` is sent every half watchdog interval, but only while the daemon
//! is listening and its listener has completed a round trip with the database within the
//! interval: a daemon stuck on a dead connection stops pinging and systemd restarts it.
//! `STATUS=` also says what blocks the WAL reader, while something does: a restart would not
//! fix that, so the watchdog pings go on.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::capture::wal::Blocked;
use crate::daemon::State;

/// True when a service manager listens (`$NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The watchdog interval systemd expects pings within (`$WATCHDOG_USEC`), when it is on for
/// this process.
pub fn watchdog() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Tells systemd the configuration is being reloaded (`RELOADING=1`).
pub fn reloading() {
    let now = NotifyState::monotonic_usec_now().ok();
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading the configuration")];
    states.extend(now);
    send(&states);
}

/// Tells systemd the daemon is ready again after a reload (`READY=1`), with `status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Reports the daemon's state, and what blocks its WAL reader (see
/// [`crate::Daemon::wal_blocked`]), to systemd until it stops: `READY=1`, `STATUS=`,
/// `WATCHDOG=1` and `STOPPING=1` (see the module documentation). Returns at once without
/// `$NOTIFY_SOCKET`.
pub async fn supervise(
    mut state: watch::Receiver<State>,
    mut wal: watch::Receiver<Option<Blocked>>,
    alive: watch::Receiver<Instant>,
) {
    if !enabled() {
        return;
    }
    let interval = watchdog();
    let mut ticks = interval.map(|i| tokio::time::interval((i / 2).max(Duration::from_millis(1))));
    let mut last = None;
    let mut wal_open = true;
    loop {
        let current = (state.borrow_and_update().clone(), wal.borrow_and_update().clone());
        if last.as_ref() != Some(&current) {
            announce(&current.0, &status(&current.0, current.1.as_ref()));
            if current.0 == State::Stopped {
                return;
            }
            last = Some(current);
        }
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            // the WAL reader ends before the daemon does: its last word stands
            changed = wal.changed(), if wal_open => wal_open = changed.is_ok(),
            _ = tick(&mut ticks) => {
                let healthy = interval.is_some_and(|i| healthy(&state.borrow(), *alive.borrow(), Instant::now(), i));
                if healthy {
                    send(&[NotifyState::Watchdog]);
                } else {
                    tracing::debug!("not healthy: no watchdog ping");
                }
            }
        }
    }
}

async fn tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn announce(state: &State, status: &str) {
    match state {
        State::Listening { .. } | State::Standby => send(&[NotifyState::Ready, NotifyState::Status(status)]),
        State::Stopping => send(&[NotifyState::Stopping, NotifyState::Status(status)]),
        _ => send(&[NotifyState::Status(status)]),
    }
}

/// The `STATUS=` line for a state, followed by what blocks the WAL reader, if anything.
pub fn status(state: &State, wal: Option<&Blocked>) -> String {
    let line = status_line(state);
    match wal {
        Some(blocked) => format!("{line}; WAL capture blocked: {}", blocked.detail),
        None => line,
    }
}

/// The `STATUS=` line for a state.
pub fn status_line(state: &State) -> String {
    match state {
        State::Starting => "starting".into(),
        State::Listening { tables } => format!("listening on {tables} tables"),
        State::Standby => "standby: another instance holds the lease".into(),
        State::Reconnecting { attempt } => format!("reconnecting, attempt {attempt}"),
        State::Stopping => "stopping".into(),
        State::Stopped => "stopped".into(),
    }
}

/// Listening, and the listener proved the connection alive within `interval`.
fn healthy(state: &State, alive: Instant, now: Instant, interval: Duration) -> bool {
    matches!(state, State::Listening { .. } | State::Standby) && now.saturating_duration_since(alive) < interval
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_name_the_state() {
        assert_eq!(status_line(&State::Listening { tables: 3 }), "listening on 3 tables");
        assert_eq!(status_line(&State::Reconnecting { attempt: 4 }), "reconnecting, attempt 4");
        assert_eq!(status_line(&State::Stopping), "stopping");
    }

    #[test]
    fn status_says_what_blocks_the_wal_reader() {
        let listening = State::Listening { tables: 2 };
        assert_eq!(status(&listening, None), "listening on 2 tables");
        let blocked = Blocked {
            reason: crate::capture::wal::Blocker::WalLevel,
            detail: "the server runs with wal_level = replica, not logical".into(),
        };
        assert_eq!(
            status(&listening, Some(&blocked)),
            "listening on 2 tables; WAL capture blocked: the server runs with wal_level = replica, not logical"
        );
    }

    #[test]
    fn healthy_only_when_listening_and_recently_alive() {
        let now = Instant::now();
        let second = Duration::from_secs(1);
        let listening = State::Listening { tables: 1 };
        assert!(healthy(&listening, now, now, second));
        assert!(!healthy(&listening, now, now + 2 * second, second));
        assert!(!healthy(&State::Reconnecting { attempt: 1 }, now, now, second));
        assert!(!healthy(&State::Starting, now, now, second));
    }
}
