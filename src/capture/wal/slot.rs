//! The replication slot: made by `post-save triggers install`, never by the daemon.
//!
//! A slot lives only on the server that made it. After a failover to a standby that does not
//! have it, or once someone drops it, a slot made again would stream from *now*: every save
//! between the last confirmation and that moment would be gone without a word. So the daemon
//! refuses to stream without its slot, and the `post_save.wal_slot` row (a table, replicated
//! like the rest of the database) says since which save the stream may have a gap, for the
//! operator to send those saves again (`post-save backfill`).
//!
//! On PostgreSQL 17 and later the slot is made as a failover slot: a standby with
//! `sync_replication_slots = on` keeps a copy, and the daemon resumes on it after a promotion.

use tokio_postgres::GenericClient;

/// What `post_save.wal_slot` remembers of a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When `triggers install` made the slot, as text.
    pub created_at: String,
    /// How far the daemon had confirmed the slot, as text (`0/16B3748`).
    pub confirmed_lsn: Option<String>,
    /// The commit time of the last save delivered there, as text: saves committed after it
    /// may be missing once the slot is lost.
    pub confirmed_commit: Option<String>,
}

impl Record {
    /// Since when saves may be missing: the last delivered commit, else the slot's making.
    pub fn since(&self) -> &str {
        self.confirmed_commit.as_deref().unwrap_or(&self.created_at)
    }
}

/// Whether the server makes failover slots (PostgreSQL 17 and later).
async fn has_failover_slots(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    Ok(version >= 170_000)
}

/// Makes `slot` when it is missing (a failover slot where the server has them) and records it.
/// Returns whether it was made now.
pub async fn make(client: &impl GenericClient, slot: &str) -> Result<bool, tokio_postgres::Error> {
    let exists = client.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?.is_some();
    if !exists {
        if has_failover_slots(client).await? {
            // slot_name, plugin, temporary, twophase, failover
            client
                .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)", &[&slot])
                .await?;
        } else {
            client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await?;
        }
        tracing::info!(slot = %slot, "logical replication slot created");
        // a new slot starts a new record: what the old one had confirmed is history
        client.execute("DELETE FROM post_save.wal_slot WHERE slot_name = $1", &[&slot]).await?;
    }
    adopt(client, slot).await?;
    Ok(!exists)
}

/// Writes the slot's row when it has none (a slot made before the table existed).
pub async fn adopt(client: &impl GenericClient, slot: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute("INSERT INTO post_save.wal_slot (slot_name) VALUES ($1) ON CONFLICT (slot_name) DO NOTHING", &[&slot])
        .await?;
    Ok(())
}

/// What is recorded of `slot`; `None` when nothing is (never made, or a schema before the
/// table).
pub async fn record(client: &impl GenericClient, slot: &str) -> Result<Option<Record>, tokio_postgres::Error> {
    let table: bool = client.query_one("SELECT to_regclass('post_save.wal_slot') IS NOT NULL", &[]).await?.get(0);
    if !table {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT created_at::text, confirmed_lsn::text, confirmed_commit::text \
               FROM post_save.wal_slot WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| Record { created_at: r.get(0), confirmed_lsn: r.get(1), confirmed_commit: r.get(2) }))
}

/// Records that the daemon confirmed `slot` up to `lsn`, where the last delivered save committed
/// at `commit` (microseconds since 2000-01-01, PostgreSQL's epoch).
pub async fn remember(
    client: &impl GenericClient,
    slot: &str,
    lsn: u64,
    commit: Option<i64>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE post_save.wal_slot SET confirmed_lsn = $2::text::pg_lsn, \
                    confirmed_commit = coalesce(timestamptz '2000-01-01 00:00:00+00' + $3::int8 * interval '1 microsecond', \
                                                confirmed_commit), \
                    recorded_at = clock_timestamp() \
              WHERE slot_name = $1",
            &[&slot, &super::stream::format_lsn(lsn), &commit],
        )
        .await?;
    Ok(())
}
