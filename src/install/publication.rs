//! What `capture = "wal"` puts in the database: the tables in the publications the slot streams,
//! each with the replica identity its watch needs, and the checks that refuse a table whose
//! own UPDATE or DELETE PostgreSQL would reject once it is published.
//!
//! Two publications, so that a table is published only for what is watched: `post_save`
//! publishes INSERT, UPDATE and DELETE and holds the tables watched for an UPDATE or a DELETE
//! (their replica identity is made FULL, which every table can have); `post_save_inserts`
//! publishes INSERT only and holds insert-only watches, whose tables need no replica identity
//! at all. PostgreSQL refuses an UPDATE or DELETE of a table without a usable replica identity
//! in a publication that publishes them (CheckCmdReplicaIdentity): a keyless table watched for
//! inserts only keeps working. Both publish partitions through their root
//! (`publish_via_partition_root`), so a save into any partition, one attached later included,
//! arrives as a save of the watched parent; on PostgreSQL 18 both publish stored generated
//! columns, as the trigger capture's `row_to_json` has them.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::GenericClient;

use super::{TriggerError, drop_ddl};
use crate::config::{Capture, Config, Watch};
use crate::name::{TableName, quote_ident};

/// The publication of tables watched for an UPDATE or a DELETE.
pub const ALL: &str = "post_save";
/// The publication of tables watched for INSERT only.
pub const INSERTS: &str = "post_save_inserts";

/// Which publication a watch belongs in.
pub fn of(watch: &Watch) -> &'static str {
    if full_identity(watch) { ALL } else { INSERTS }
}

/// Whether a watch needs the old row in the WAL (and so `REPLICA IDENTITY FULL`).
fn full_identity(watch: &Watch) -> bool {
    watch.operations.update || watch.operations.delete
}

fn wal_watches(config: &Config) -> impl Iterator<Item = &Watch> {
    config.watches.iter().filter(|w| w.capture == Capture::Wal)
}

/// What the server is and has, as far as the publications go.
#[derive(Debug, Default)]
pub struct Published {
    /// `server_version_num / 10000`.
    pub major: i32,
    /// Each existing publication's tables, by publication name.
    pub members: BTreeMap<String, BTreeSet<TableName>>,
    /// Existing publications whose options are not the ones post-save makes.
    pub stale_options: BTreeSet<String>,
}

impl Published {
    /// Reads both publications.
    pub async fn read(client: &impl GenericClient) -> Result<Published, tokio_postgres::Error> {
        let major = server_major(client).await?;
        let gencols = if major >= 18 { "p.pubgencols::text = 's'" } else { "true" };
        let rows = client
            .query(
                &format!(
                    "SELECT p.pubname::text, p.pubviaroot AND {gencols} \
                       AND p.pubinsert AND (p.pubupdate AND p.pubdelete) = (p.pubname = $1) \
                       FROM pg_publication p WHERE p.pubname IN ($1, $2)"
                ),
                &[&ALL, &INSERTS],
            )
            .await?;
        let mut published = Published { major, ..Published::default() };
        for row in rows {
            let name: String = row.get(0);
            if !row.get::<_, bool>(1) {
                published.stale_options.insert(name.clone());
            }
            published.members.insert(name, BTreeSet::new());
        }
        let rows = client
            .query(
                "SELECT pubname::text, schemaname::text, tablename::text FROM pg_publication_tables \
                  WHERE pubname IN ($1, $2)",
                &[&ALL, &INSERTS],
            )
            .await?;
        for row in rows {
            let table = TableName::new(row.get::<_, String>(1), row.get::<_, String>(2));
            published.members.entry(row.get(0)).or_default().insert(table);
        }
        Ok(published)
    }

    /// Whether either publication exists.
    pub fn exists(&self) -> bool {
        !self.members.is_empty()
    }

    /// Every published table.
    pub fn tables(&self) -> BTreeSet<TableName> {
        self.members.values().flatten().cloned().collect()
    }

    /// The publication `table` is in, if any.
    pub fn holding(&self, table: &TableName) -> Option<&str> {
        self.members.iter().find(|(_, tables)| tables.contains(table)).map(|(name, _)| name.as_str())
    }
}

/// `server_version_num / 10000`: 14, 15, ... 18.
pub async fn server_major(client: &impl GenericClient) -> Result<i32, tokio_postgres::Error> {
    let num: String = client.query_one("SELECT current_setting('server_version_num')", &[]).await?.get(0);
    Ok(num.parse::<i32>().unwrap_or(0) / 10_000)
}

/// The options a publication is made with on PostgreSQL `major`.
fn options(name: &str, major: i32) -> String {
    let publish = if name == ALL { "insert, update, delete" } else { "insert" };
    let gencols = if major >= 18 { ", publish_generated_columns = stored" } else { "" };
    format!("publish = '{publish}', publish_via_partition_root = true{gencols}")
}

/// The DDL that makes both publications hold exactly the WAL-captured tables, each in the one
/// its watch belongs in, with post-save's options; drops them when no table is captured from
/// the WAL. `all_of_it`: every statement, as for a database with nothing installed.
pub fn ddl(config: &Config, have: &Published, all_of_it: bool) -> String {
    let mut want: BTreeMap<&str, BTreeSet<TableName>> =
        BTreeMap::from([(ALL, BTreeSet::new()), (INSERTS, BTreeSet::new())]);
    for watch in wal_watches(config) {
        want.entry(of(watch)).or_default().insert(watch.table.clone());
    }
    let mut sql = String::new();
    if want.values().all(BTreeSet::is_empty) {
        for name in have.members.keys() {
            sql.push_str(&format!("DROP PUBLICATION IF EXISTS {};\n", quote_ident(name)));
        }
        return sql;
    }
    let empty = BTreeSet::new();
    // tables leave their old publication before joining the other one
    let mut joins = String::new();
    for (name, tables) in &want {
        let ident = quote_ident(name);
        let current = if all_of_it { &empty } else { have.members.get(*name).unwrap_or(&empty) };
        if all_of_it || !have.members.contains_key(*name) {
            sql.push_str(&format!("CREATE PUBLICATION {ident} WITH ({});\n", options(name, have.major)));
        } else if have.stale_options.contains(*name) {
            sql.push_str(&format!("ALTER PUBLICATION {ident} SET ({});\n", options(name, have.major)));
        }
        let leaving: Vec<String> = current.difference(tables).map(TableName::quoted).collect();
        if !leaving.is_empty() {
            sql.push_str(&format!("ALTER PUBLICATION {ident} DROP TABLE {};\n", leaving.join(", ")));
        }
        let joining: Vec<String> = tables.difference(current).map(TableName::quoted).collect();
        if !joining.is_empty() {
            joins.push_str(&format!("ALTER PUBLICATION {ident} ADD TABLE {};\n", joining.join(", ")));
        }
    }
    sql.push_str(&joins);
    sql
}

/// A partition of a watched table, and whether its replica identity is FULL.
struct Partition {
    table: TableName,
    full: bool,
}

/// The table and every partition under it (tables only), with their replica identity.
async fn tree(client: &impl GenericClient, table: &TableName) -> Result<Vec<Partition>, tokio_postgres::Error> {
    let rows = client
        .query(
            // pg_partition_tree has no row for a table that is not partitioned
            "WITH tree AS ( \
                 SELECT relid, level FROM pg_partition_tree(to_regclass($1)) \
                 UNION SELECT to_regclass($1), 0) \
             SELECT n.nspname::text, c.relname::text, c.relreplident = 'f' \
               FROM tree t JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind IN ('r', 'p') ORDER BY t.level, c.relname",
            &[&table.quoted()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Partition { table: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)), full: r.get(2) })
        .collect())
}

/// The tables (the watched one and its partitions) whose replica identity is not FULL though
/// the watch needs it.
pub async fn identity_missing(
    client: &impl GenericClient,
    watch: &Watch,
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    if !full_identity(watch) {
        return Ok(Vec::new());
    }
    Ok(tree(client, &watch.table).await?.into_iter().filter(|p| !p.full).map(|p| p.table).collect())
}

fn identity_ddl(tables: &[TableName]) -> String {
    tables.iter().map(|t| format!("ALTER TABLE {} REPLICA IDENTITY FULL;\n", t.quoted())).collect()
}

/// The DDL of a table captured from the WAL: no trigger; the old row in the WAL of an UPDATE or
/// DELETE when either is captured (`update_fields`, `columns` and `include_old` need it), on the
/// table and each of its partitions. Its place in a publication is set by [`ddl`].
pub async fn wal_ddl(client: &impl GenericClient, watch: &Watch) -> Result<String, tokio_postgres::Error> {
    let mut sql =
        format!("-- post-save capture for {}: read from the WAL (capture = \"wal\"); no trigger.\n", watch.table);
    sql.push_str(&drop_ddl(&watch.table));
    if full_identity(watch) {
        let all: Vec<TableName> = tree(client, &watch.table).await?.into_iter().map(|p| p.table).collect();
        sql.push_str(&identity_ddl(&all));
    }
    Ok(sql)
}

/// What a WAL-captured table still needs: its old capture trigger dropped, its replica
/// identity (and its partitions') made FULL. Empty when it has both.
pub async fn wal_changes(
    client: &impl GenericClient,
    watch: &Watch,
    has_trigger: bool,
) -> Result<String, TriggerError> {
    let mut sql = String::new();
    if has_trigger {
        sql.push_str(&drop_ddl(&watch.table));
    }
    sql.push_str(&identity_ddl(&identity_missing(client, watch).await?));
    Ok(sql)
}

/// Why publishing `watch`'s table would make the application's own UPDATE or DELETE of it fail,
/// with the fix; `None` when it is safe. The same reasons are refused by install and reported
/// by `triggers check` and `doctor` for a table already published.
pub async fn unsafe_to_publish(
    client: &impl GenericClient,
    watch: &Watch,
    major: i32,
) -> Result<Option<String>, tokio_postgres::Error> {
    if !full_identity(watch) {
        // published for INSERT only: PostgreSQL asks nothing of the table
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT c.relkind = 'p', \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute a \
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                        AND a.attgenerated NOT IN ('', 's')) \
               FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&watch.table.quoted()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let (partitioned, keyed, virtual_columns): (bool, bool, Option<String>) = (row.get(0), row.get(1), row.get(2));
    if partitioned && !keyed {
        return Ok(Some(format!(
            "{} is partitioned and has no primary key: a partition attached later would have no replica \
             identity, and PostgreSQL would refuse every UPDATE and DELETE of it once published for them. \
             Add a primary key to {0}, watch it for inserts only, or use the trigger capture",
            watch.table
        )));
    }
    if let Some(columns) = virtual_columns.filter(|_| major >= 18) {
        return Ok(Some(format!(
            "{} has virtual generated columns ({columns}): with the REPLICA IDENTITY FULL an UPDATE or DELETE \
             capture needs, PostgreSQL {major} would refuse the table's UPDATE and DELETE (a publication cannot \
             publish virtual columns). Make them STORED, watch the table for inserts only, or use the trigger \
             capture",
            watch.table
        )));
    }
    Ok(None)
}

/// Refuses, before anything changes, a config whose WAL-captured tables cannot be published
/// without breaking their writers.
pub async fn preflight(client: &impl GenericClient, config: &Config) -> Result<(), TriggerError> {
    if !crate::capture::wal::wanted(config) {
        return Ok(());
    }
    let level: String = client.query_one("SELECT current_setting('wal_level')", &[]).await?.get(0);
    if level != "logical" {
        return Err(TriggerError::WalLevel(level));
    }
    let major = server_major(client).await?;
    for watch in wal_watches(config) {
        if let Some(why) = unsafe_to_publish(client, watch, major).await? {
            return Err(TriggerError::Unpublishable(why));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(watches: &str) -> Config {
        Config::parse(watches).expect("config")
    }

    #[test]
    fn insert_only_watches_are_published_for_inserts_only() {
        let c = config(
            "[[watch]]\ntable = \"public.a\"\ncapture = \"wal\"\noperations = [\"insert\"]\n\
             [[watch]]\ntable = \"public.b\"\ncapture = \"wal\"\noperations = [\"insert\", \"delete\"]\n",
        );
        let sql = ddl(&c, &Published { major: 15, ..Published::default() }, false);
        assert!(sql.contains("CREATE PUBLICATION \"post_save\" WITH (publish = 'insert, update, delete', publish_via_partition_root = true);"), "{sql}");
        assert!(
            sql.contains(
                "CREATE PUBLICATION \"post_save_inserts\" WITH (publish = 'insert', publish_via_partition_root = true);"
            ),
            "{sql}"
        );
        assert!(sql.contains("ALTER PUBLICATION \"post_save_inserts\" ADD TABLE \"public\".\"a\";"), "{sql}");
        assert!(sql.contains("ALTER PUBLICATION \"post_save\" ADD TABLE \"public\".\"b\";"), "{sql}");
        let on_18 = ddl(&c, &Published { major: 18, ..Published::default() }, false);
        assert!(on_18.contains("publish_generated_columns = stored"), "{on_18}");
    }

    #[test]
    fn a_table_moves_between_publications_and_nothing_is_done_when_in_sync() {
        let c = config("[[watch]]\ntable = \"public.a\"\ncapture = \"wal\"\noperations = [\"update\"]\n");
        let mut have = Published { major: 15, ..Published::default() };
        have.members.insert(INSERTS.into(), BTreeSet::from([TableName::new("public", "a")]));
        have.members.insert(ALL.into(), BTreeSet::new());
        let sql = ddl(&c, &have, false);
        let leave = sql.find("ALTER PUBLICATION \"post_save_inserts\" DROP TABLE \"public\".\"a\";").expect(&sql);
        let join = sql.find("ALTER PUBLICATION \"post_save\" ADD TABLE \"public\".\"a\";").expect(&sql);
        assert!(leave < join, "{sql}");
        have.members.insert(INSERTS.into(), BTreeSet::new());
        have.members.insert(ALL.into(), BTreeSet::from([TableName::new("public", "a")]));
        assert_eq!(ddl(&c, &have, false), "");
        have.stale_options.insert(ALL.into());
        assert_eq!(
            ddl(&c, &have, false),
            "ALTER PUBLICATION \"post_save\" SET (publish = 'insert, update, delete', publish_via_partition_root = true);\n"
        );
        let none = config("[[watch]]\ntable = \"public.a\"\n");
        assert_eq!(
            ddl(&none, &have, false),
            "DROP PUBLICATION IF EXISTS \"post_save\";\nDROP PUBLICATION IF EXISTS \"post_save_inserts\";\n"
        );
    }
}
