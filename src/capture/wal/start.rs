//! The start of a replication session: what must hold before the slot can stream, checked in
//! the catalog first, so a condition a retry cannot fix is named by state (see `error.rs`).

use super::error::WalError;
use super::health::{Backend, Slot};
use super::relations::{Catalog, Table};
use super::stream::Replication;
use super::types::UserTypes;
use super::{WalCapture, slot, slot_name};
use crate::config::Capture;

/// What a session knows before it streams.
pub(super) struct Prepared {
    /// The database's name.
    pub(super) using: String,
    pub(super) slot: String,
    pub(super) tables: Vec<Table>,
    pub(super) types: UserTypes,
    /// The publications to stream (at least one).
    pub(super) publications: Vec<String>,
    pub(super) catalog: Catalog,
}

/// A failed catalog query, saying what it was for.
fn query(doing: &'static str) -> impl FnOnce(tokio_postgres::Error) -> WalError {
    move |source| WalError::Query { doing, source }
}

impl WalCapture {
    /// Connects for the catalog, checks the server writes logical WAL and the slot exists and
    /// can stream, and reads the watched tables and the publications.
    pub(super) async fn prepare(&self) -> Result<Prepared, WalError> {
        // an early return drops the client, which ends the connection and its task
        let (client, task) = crate::db::connect(&self.pg).await?;
        let using: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .map_err(query("reading the database name"))?
            .get(0);
        let slot = slot_name(&using);
        let level = super::health::wal_level(&client).await.map_err(query("reading wal_level"))?;
        if level != "logical" {
            return Err(WalError::WalLevel { level });
        }
        let record = slot::record(&client, &slot).await.map_err(query("reading the slot's record"))?;
        let Some(found) = Slot::read(&client, &slot).await.map_err(query("reading the replication slot"))? else {
            // never made again here: a new slot would stream from now, and every save since
            // the last confirmation would be gone without a word (see `slot.rs`)
            let tables = self.config.watches.iter().filter(|w| w.capture == Capture::Wal);
            return Err(WalError::SlotMissing { slot, record, tables: tables.map(|w| w.table.to_string()).collect() });
        };
        if let Some(reason) = found.invalidated() {
            return Err(WalError::SlotInvalidated { slot, reason, confirmed: found.confirmed });
        }
        if record.is_none() {
            slot::adopt(&client, &slot).await.map_err(query("recording the replication slot"))?;
        }
        let mut tables = Vec::new();
        for watch in self.config.watches.iter().filter(|w| w.capture == Capture::Wal) {
            tables.push(Table::resolve(&client, watch).await.map_err(query("reading a watched table"))?);
        }
        let types = UserTypes::load(&client).await.map_err(query("reading the database's types"))?;
        let publications: Vec<String> = client
            .query(
                "SELECT pubname::text FROM pg_publication WHERE pubname IN ($1, $2) ORDER BY pubname",
                &[&crate::install::publication::ALL, &crate::install::publication::INSERTS],
            )
            .await
            .map_err(query("reading the publications"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if publications.is_empty() {
            return Err(WalError::NoPublication);
        }
        let catalog = Catalog { pg: self.pg.clone(), client: Some((client, task)) };
        Ok(Prepared { using, slot, tables, types, publications, catalog })
    }

    /// Opens the replication connection and starts streaming the slot. A slot another
    /// process streams is reported with that process as the catalog knows it.
    pub(super) async fn start_streaming(&self, prepared: &mut Prepared) -> Result<Replication, WalError> {
        let mut conn = Replication::connect(&self.pg).await?;
        let names: Vec<&str> = prepared.publications.iter().map(String::as_str).collect();
        match conn.start(&prepared.slot, &names, 0).await {
            Ok(()) => Ok(conn),
            Err(e) => match WalError::start(e, &prepared.slot) {
                WalError::SlotInUse { slot, pid: Some(pid), .. } => {
                    let holder = match prepared.catalog.client().await {
                        Ok(client) => Backend::of(client, pid).await.ok().flatten().map(|b| b.to_string()),
                        Err(_) => None,
                    };
                    Err(WalError::SlotInUse { slot, pid: Some(pid), holder })
                }
                other => Err(other),
            },
        }
    }
}
