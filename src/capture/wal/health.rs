//! What the catalog says about the WAL reader's prerequisites: `wal_level`, the slot's
//! state and who streams it. Read by the reader before it streams (so the conditions a retry
//! cannot fix are found by state, not by the wording of an error message) and by `doctor`.

use tokio_postgres::GenericClient;

/// The database's replication slot as `pg_replication_slots` has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Why it was invalidated (PostgreSQL 17 and later).
    pub invalidation_reason: Option<String>,
    /// Where its reader confirmed it had everything before (kept when it is invalidated).
    pub confirmed: Option<String>,
    /// The process streaming it now.
    pub active_pid: Option<i32>,
}

impl Slot {
    /// Reads slot `name`; `None` when there is no such slot.
    pub async fn read(client: &impl GenericClient, name: &str) -> Result<Option<Slot>, tokio_postgres::Error> {
        // to_jsonb: invalidation_reason exists from PostgreSQL 17 on, and this reads it on
        // every version without asking which one runs
        let row = client
            .query_opt(
                "SELECT to_jsonb(s) ->> 'wal_status', to_jsonb(s) ->> 'invalidation_reason', \
                        confirmed_flush_lsn::text, active_pid \
                   FROM pg_replication_slots s WHERE slot_name = $1",
                &[&name],
            )
            .await?;
        Ok(row.map(|r| Slot {
            wal_status: r.get(0),
            invalidation_reason: r.get(1),
            confirmed: r.get(2),
            active_pid: r.get(3),
        }))
    }

    /// Why the slot can no longer stream, when it cannot: its invalidation reason, or
    /// `wal_status = lost` where the server does not give one.
    pub fn invalidated(&self) -> Option<String> {
        match (&self.invalidation_reason, self.wal_status.as_deref()) {
            (Some(reason), _) => Some(reason.clone()),
            (None, Some("lost")) => Some("wal_status = lost".into()),
            _ => None,
        }
    }
}

/// The server's `wal_level`.
pub async fn wal_level(client: &impl GenericClient) -> Result<String, tokio_postgres::Error> {
    Ok(client.query_one("SELECT current_setting('wal_level')", &[]).await?.get(0))
}

/// A backend as an operator recognises it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Its `application_name`.
    pub application: String,
    /// Where it connects from; `None` for a Unix socket.
    pub client_addr: Option<String>,
}

impl Backend {
    /// The backend of `pid`, if it still runs.
    pub async fn of(client: &impl GenericClient, pid: i32) -> Result<Option<Backend>, tokio_postgres::Error> {
        let row = client
            .query_opt(
                "SELECT coalesce(application_name, ''), host(client_addr) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await?;
        Ok(row.map(|r| Backend { application: r.get(0), client_addr: r.get(1) }))
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.application.is_empty() {
            f.write_str("no application_name")?;
        } else {
            write!(f, "application {:?}", self.application)?;
        }
        match &self.client_addr {
            Some(addr) => write!(f, ", from {addr}"),
            None => f.write_str(", over a Unix socket"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(wal_status: Option<&str>, reason: Option<&str>) -> Slot {
        Slot {
            wal_status: wal_status.map(Into::into),
            invalidation_reason: reason.map(Into::into),
            confirmed: None,
            active_pid: None,
        }
    }

    #[test]
    fn a_slot_is_invalidated_when_it_lost_its_wal_or_says_why() {
        assert_eq!(slot(Some("reserved"), None).invalidated(), None);
        assert_eq!(slot(Some("unreserved"), None).invalidated(), None, "not yet");
        assert_eq!(slot(Some("lost"), None).invalidated().as_deref(), Some("wal_status = lost"));
        assert_eq!(slot(Some("lost"), Some("wal_removed")).invalidated().as_deref(), Some("wal_removed"));
        assert_eq!(slot(Some("reserved"), Some("idle_timeout")).invalidated().as_deref(), Some("idle_timeout"));
    }

    #[test]
    fn backends_read_as_an_operator_names_them() {
        let b = Backend { application: "pg_recvlogical".into(), client_addr: Some("10.0.0.7".into()) };
        assert_eq!(b.to_string(), "application \"pg_recvlogical\", from 10.0.0.7");
        let b = Backend { application: String::new(), client_addr: None };
        assert_eq!(b.to_string(), "no application_name, over a Unix socket");
    }
}
