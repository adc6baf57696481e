//! The dispatch lease (`daemon.lease`): several daemons may run against one database, and the
//! one holding the lease is the only one that dispatches.
//!
//! The lease is a row of `post_save.lease` with an expiry in the server's clock. The holder
//! renews it every third of its length. Each renewal gives the holder a local deadline: the
//! moment it sent the renewal plus nine tenths of the lease. The server's expiry is later than
//! that (it is computed when the renewal arrives), so a holder that cannot renew — cut off,
//! frozen by SIGSTOP, its database gone — stops dispatching at its deadline, before any standby
//! can take the lease over. Every delivery attempt checks the deadline before it starts and is
//! dropped when the deadline passes while it runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::types::Type;

/// The lease's row name.
const NAME: &str = "dispatcher";

/// A daemon's hold on the lease, shared by the listener (which takes and renews it) and every
/// delivery (which checks it).
#[derive(Debug)]
pub(crate) struct Lease {
    /// How long a renewal lasts.
    pub length: Duration,
    /// This daemon's name in `post_save.lease.holder`.
    pub holder: String,
    deadline: Mutex<Option<Instant>>,
}

impl Lease {
    pub(crate) fn new(length: Duration) -> Arc<Lease> {
        let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        let holder = format!("{host}:{}:{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Arc::new(Lease { length, holder, deadline: Mutex::new(None) })
    }

    /// When this daemon must stop dispatching, if it holds the lease now.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let deadline = (*self.deadline.lock().ok()?)?;
        (Instant::now() < deadline).then_some(deadline)
    }

    /// True while the lease is held.
    pub(crate) fn held(&self) -> bool {
        self.deadline().is_some()
    }

    fn set(&self, deadline: Option<Instant>) {
        if let Ok(mut d) = self.deadline.lock() {
            *d = deadline;
        }
    }

    /// Resolves when the lease is no longer held (now, if it is not).
    pub(crate) async fn lost(&self) {
        while let Some(deadline) = self.deadline() {
            tokio::time::sleep_until(deadline.into()).await;
        }
    }

    /// Takes the lease if it is free or expired (or already ours); true when held after.
    pub(crate) async fn try_acquire(&self, client: &Client) -> Result<bool, tokio_postgres::Error> {
        let sent = Instant::now();
        let row = client
            .query_typed_opt(
                "INSERT INTO post_save.lease AS l (name, holder, expires_at) \
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
                 ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at, \
                        acquired_at = CASE WHEN l.holder = EXCLUDED.holder THEN l.acquired_at ELSE clock_timestamp() END \
                  WHERE l.expires_at < clock_timestamp() OR l.holder = EXCLUDED.holder \
                 RETURNING holder",
                &[(&NAME, Type::TEXT), (&self.holder, Type::TEXT), (&self.length.as_secs_f64(), Type::FLOAT8)],
            )
            .await?;
        let held = row.is_some();
        self.set(held.then(|| sent + self.length.mul_f64(0.9)));
        Ok(held)
    }

    /// Extends the lease; false when another daemon holds it now (it expired meanwhile).
    pub(crate) async fn renew(&self, client: &Client) -> Result<bool, tokio_postgres::Error> {
        let sent = Instant::now();
        let n = client
            .execute_typed(
                "UPDATE post_save.lease SET expires_at = clock_timestamp() + make_interval(secs => $3) \
                  WHERE name = $1 AND holder = $2",
                &[(&NAME, Type::TEXT), (&self.holder, Type::TEXT), (&self.length.as_secs_f64(), Type::FLOAT8)],
            )
            .await?;
        if n == 1 {
            // Never later than the deadline the previous renewal gave, plus this one's.
            self.set(Some(sent + self.length.mul_f64(0.9)));
            Ok(true)
        } else {
            self.set(None);
            Ok(false)
        }
    }

    /// Gives the lease up at a clean stop, so a standby takes over at once.
    pub(crate) async fn release(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        self.set(None);
        client
            .execute_typed(
                "DELETE FROM post_save.lease WHERE name = $1 AND holder = $2",
                &[(&NAME, Type::TEXT), (&self.holder, Type::TEXT)],
            )
            .await?;
        Ok(())
    }

    /// Who holds the lease now, and for how much longer (seconds; negative: expired).
    pub(crate) async fn current(client: &Client) -> Result<Option<(String, f64)>, tokio_postgres::Error> {
        let row = client
            .query_typed_opt(
                "SELECT holder, extract(epoch FROM expires_at - clock_timestamp())::float8 FROM post_save.lease WHERE name = $1",
                &[(&NAME, Type::TEXT)],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }
}

/// Renews `lease` on `client` every third of its length until it is lost; then returns.
pub(crate) async fn keep(lease: Arc<Lease>, client: Arc<crate::db::Work>) {
    let every = lease.length / 3;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = lease.lost() => return,
        }
        let renewed = tokio::select! {
            r = lease.renew(&client.client) => r,
            () = lease.lost() => return,
        };
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(holder = %lease.holder, "the lease was taken over; stopping dispatch");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the lease; retrying until it runs out"),
        }
    }
}
