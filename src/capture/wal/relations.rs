//! The stream's tables: which watch each relation message is, followed by OID through renames,
//! moves and key-column renames, and published tables no watch names.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Capture, Watch};
use crate::name::TableName;

use super::pgoutput::Relation;
use super::types::UserTypes;

/// A watched table as the stream names it.
pub(super) struct Table {
    pub(super) watch: Watch,
    pub(super) sender: String,
    /// Its OID while it exists: the stream names a table by OID, so a table renamed or moved
    /// to another schema stays this watch's.
    pub(super) oid: Option<u32>,
    pub(super) pk: Vec<String>,
    /// Whether the log already said the table is now called something else.
    pub(super) told_renamed: bool,
    /// A published table no watch names: its saves are kept as dead letters, not routed.
    pub(super) unwatched: bool,
}

impl Table {
    /// The watch's table as it is now; a missing table is kept (it may be made later) and said.
    pub(super) async fn resolve(
        client: &tokio_postgres::Client,
        watch: &Watch,
    ) -> Result<Table, tokio_postgres::Error> {
        let oid = client
            .query_one("SELECT to_regclass($1)::oid::int8", &[&watch.table.quoted()])
            .await?
            .get::<_, Option<i64>>(0)
            .and_then(|o| u32::try_from(o).ok());
        let pk = match (oid, crate::install::table_shape(client, watch).await) {
            (_, Ok(shape)) => shape.pk,
            (None, _) => {
                tracing::warn!(table = %watch.table, "WAL capture: a watched table does not exist; its saves are captured once it does");
                watch.pk.clone().unwrap_or_default()
            }
            (Some(_), Err(crate::install::TriggerError::Query(e))) => return Err(e),
            (Some(_), Err(e)) => {
                tracing::error!(table = %watch.table, error = %e, "WAL capture: cannot read the watched table's key");
                watch.pk.clone().unwrap_or_default()
            }
        };
        Ok(Table {
            watch: watch.clone(),
            sender: watch.table.to_string(),
            oid,
            pk,
            told_renamed: false,
            unwatched: false,
        })
    }

    /// A published table no watch names, keyed by its primary key (or, without one, every
    /// column: its replica identity is FULL or it is published for inserts only).
    pub(super) fn unwatched(name: TableName, oid: u32, pk: Vec<String>, rel: &Relation) -> Table {
        let pk = if pk.is_empty() { rel.columns.iter().map(|c| c.name.clone()).collect() } else { pk };
        let watch = Watch {
            table: name.clone(),
            operations: crate::config::Operations { insert: true, update: true, delete: true },
            mode: crate::config::Mode::Durable,
            columns: Vec::new(),
            redact: Vec::new(),
            include_old: true,
            pk: None,
            insert_capture: crate::config::InsertCapture::Statement,
            capture: Capture::Wal,
        };
        Table { watch, sender: name.to_string(), oid: Some(oid), pk, told_renamed: true, unwatched: true }
    }
}

/// What is known of the stream's tables: the relation messages, by OID.
pub(super) struct Relations {
    pub(super) by_oid: HashMap<u32, Described>,
    pub(super) tables: Vec<Table>,
    pub(super) types: UserTypes,
}

/// A table as its last relation message describes it.
pub(super) struct Described {
    pub(super) rel: Arc<Relation>,
    /// Its index in `Relations::tables` when it is watched, and where each key column is in
    /// its rows (`None`: the stream does not have that column).
    pub(super) watched: Option<(usize, Vec<Option<usize>>)>,
}

impl Relations {
    /// A relation message: which watch the table is (by OID, or by name for a table made since
    /// the session started), where its key columns are, and its values' types.
    pub(super) async fn learn(&mut self, mut rel: Relation, catalog: &mut Catalog) {
        let relations = self;
        if relations.types.unknown_in(&rel) {
            // a type made since the stream started (new DDL): read them again
            let types = match catalog.client().await {
                Ok(client) => UserTypes::load(client).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match types {
                Ok(types) => relations.types = types,
                Err(e) => {
                    tracing::warn!(error = %e, table = %rel.name, "WAL capture: could not read the database's types; values of new types arrive as text")
                }
            }
        }
        for column in &mut rel.columns {
            column.shape = relations.types.shape(column.type_oid);
        }
        let name = TableName::new(rel.schema.clone(), rel.name.clone());
        let mut index = relations.tables.iter().position(|t| t.oid == Some(rel.id));
        if index.is_none() {
            // a watched table made (or dropped and made again) since its OID was read
            index = relations.tables.iter().position(|t| t.watch.table == name);
            if let Some(i) = index {
                let table = &mut relations.tables[i];
                if let Some(old) = table.oid.filter(|old| *old != rel.id)
                    && catalog.exists(old).await
                {
                    // the watched table still exists under another name: this one is another table
                    index = None;
                } else {
                    table.oid = Some(rel.id);
                    table.told_renamed = false;
                }
            }
        }
        let watched = match index {
            Some(i) => {
                let table = &mut relations.tables[i];
                if table.watch.table != name && !table.told_renamed {
                    table.told_renamed = true;
                    tracing::warn!(
                        watched = %table.watch.table, now = %name,
                        "WAL capture: a watched table was renamed or moved; its saves are still captured with the \
                         watch's sender: set `table` in its [[watch]] (and the handlers' `sender`), then run \
                         `post-save triggers install`"
                    );
                }
                let mut key_at = Relations::key_at(table, &rel);
                if key_at.iter().any(Option::is_none) && table.watch.pk.is_none() {
                    // a key column renamed: its name now, from the catalog
                    match catalog.primary_key(rel.id).await {
                        Ok(pk) if !pk.is_empty() => {
                            tracing::info!(sender = %table.sender, key = ?pk, "WAL capture: the table's key columns are now named differently");
                            table.pk = pk;
                            key_at = Relations::key_at(table, &rel);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(sender = %table.sender, error = %e, "WAL capture: could not read the table's key")
                        }
                    }
                }
                Some((i, key_at))
            }
            None => {
                let pk = catalog.primary_key(rel.id).await.unwrap_or_default();
                tracing::error!(
                    table = %name,
                    "WAL capture: a table in a post-save publication is not watched (renamed while the daemon was \
                     stopped, or dropped from the config?); its saves are kept as dead letters of handler \
                     `(unwatched)`: watch it under this name, then `post-save dead retry --handler '(unwatched)'`, \
                     or run `post-save triggers install` to take it out of the publication"
                );
                let table = Table::unwatched(name, rel.id, pk, &rel);
                let key_at = Relations::key_at(&table, &rel);
                relations.tables.push(table);
                Some((relations.tables.len() - 1, key_at))
            }
        };
        relations.by_oid.insert(rel.id, Described { rel: Arc::new(rel), watched });
    }

    /// Where each of `table`'s key columns is in `rel`'s rows.
    pub(super) fn key_at(table: &Table, rel: &Relation) -> Vec<Option<usize>> {
        table.pk.iter().map(|key| rel.columns.iter().position(|c| &c.name == key)).collect()
    }
}

/// A connection for reading the catalog while streaming, made when first needed and again
/// after it is lost.
pub(super) struct Catalog {
    pub(super) pg: crate::db::Settings,
    pub(super) client: Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>,
}

impl Catalog {
    async fn exists(&mut self, oid: u32) -> bool {
        let Ok(client) = self.client().await else { return true };
        client
            .query_opt("SELECT 1 FROM pg_class WHERE oid = $1::int8::oid", &[&i64::from(oid)])
            .await
            .map_or(true, |row| row.is_some())
    }

    /// The names of a table's primary-key columns, in key order.
    async fn primary_key(&mut self, oid: u32) -> Result<Vec<String>, String> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                  WHERE i.indrelid = $1::int8::oid AND i.indisprimary \
                  ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&i64::from(oid)],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
    pub(super) async fn client(&mut self) -> Result<&tokio_postgres::Client, String> {
        if self.client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            self.client = Some(crate::db::connect(&self.pg).await.map_err(|e| e.to_string())?);
        }
        Ok(&self.client.as_ref().expect("connected above").0)
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        if let Some((_, task)) = self.client.take() {
            task.abort();
        }
    }
}
