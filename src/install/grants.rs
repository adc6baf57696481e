//! What the daemon's role needs to run, apart from what installing needs.
//!
//! Installing (`post-save migrate`, `post-save triggers install`) is the owner's work: the owner
//! of the watched tables creates the `post_save` schema and the capture functions, which run as
//! that owner (`SECURITY DEFINER`), so writers need no rights on the schema. Running
//! (`post-save run`) needs much less: reading and acknowledging the ledger, the dead letters,
//! the doorbell, ledger retention, and for `capture = "wal"` the `REPLICATION` attribute.
//! [`needed`] lists those rights for a configuration; `post-save grants --role NAME` prints them
//! as statements and `post-save doctor` names the ones the configured role lacks.

use tokio_postgres::GenericClient;

use crate::config::{Capture, Config, Mode};
use crate::name::quote_ident;

/// The kind of object a [`Right`] is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A schema (`USAGE`).
    Schema,
    /// A table or partition.
    Table,
    /// A sequence.
    Sequence,
    /// A function, named with its argument types (`EXECUTE`).
    Function,
    /// The role's `REPLICATION` attribute: no object.
    Replication,
}

/// Rights on one object, and why the daemon needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Right {
    /// What the object is.
    pub kind: Kind,
    /// The object, as SQL (`post_save.event`, `"public"."item"`); empty for [`Kind::Replication`].
    pub object: String,
    /// The privileges (`SELECT`, `UPDATE`, …), each checked on its own.
    pub privileges: Vec<&'static str>,
    /// What the daemon does with them.
    pub why: &'static str,
}

impl Right {
    fn new(kind: Kind, object: impl Into<String>, privileges: &[&'static str], why: &'static str) -> Right {
        Right { kind, object: object.into(), privileges: privileges.to_vec(), why }
    }

    /// The statement that grants this right to `role`.
    pub fn statement(&self, role: &str) -> String {
        let role = quote_ident(role);
        let privileges = self.privileges.join(", ");
        let object = &self.object;
        match self.kind {
            Kind::Schema => format!("GRANT {privileges} ON SCHEMA {object} TO {role};"),
            Kind::Table => format!("GRANT {privileges} ON TABLE {object} TO {role};"),
            Kind::Sequence => format!("GRANT {privileges} ON SEQUENCE {object} TO {role};"),
            Kind::Function => format!("GRANT {privileges} ON FUNCTION {object} TO {role};"),
            Kind::Replication => format!("ALTER ROLE {role} WITH REPLICATION;"),
        }
    }

    /// `SELECT, UPDATE on post_save.event`, for people.
    pub fn describe(&self) -> String {
        match self.kind {
            Kind::Replication => "the REPLICATION attribute".to_owned(),
            _ => format!("{} on {}", self.privileges.join(", "), self.object),
        }
    }

    /// This right with only `privileges`.
    fn only(&self, privileges: Vec<&'static str>) -> Right {
        Right { privileges, ..self.clone() }
    }
}

/// The ledger's partitions: retention reads, locks, moves and empties them by name.
const PARTITIONS: [&str; 3] = ["post_save.event_0", "post_save.event_1", "post_save.event_2"];

/// Every right the daemon's role needs to run `config`, in the order `grants` prints them.
///
/// The list follows what the running daemon reads and writes (see `src/ledger.rs`,
/// `src/lease.rs`, `src/listener.rs`, `src/wal/`): nothing that installing needs (creating the
/// schema, functions, triggers, the publication and the slot), and nothing on the watched tables
/// but `SELECT` on those of `mode = "notify"`.
pub fn needed(config: &Config) -> Vec<Right> {
    use Kind::{Function, Replication, Schema, Sequence, Table};
    let mut rights = vec![
        Right::new(Schema, "post_save", &["USAGE"], "reaching every object of the post_save schema"),
        Right::new(
            Table,
            "post_save.schema_history",
            &["SELECT"],
            "checking at start that the schema is migrated, so the daemon leaves it alone",
        ),
        Right::new(
            Table,
            "post_save.event",
            &["SELECT", "INSERT", "UPDATE"],
            "reading pending events, acknowledging them, and moving events still pending out of a \
             partition that retention empties",
        ),
    ];
    for partition in PARTITIONS {
        rights.push(Right::new(
            Table,
            partition,
            &["SELECT", "DELETE", "TRUNCATE"],
            "ledger retention: reading, locking and emptying the partition by name",
        ));
    }
    rights.extend([
        Right::new(
            Sequence,
            "post_save.event_id_seq",
            &["SELECT"],
            "reading the last ledger id handed out, to find transactions not committed yet",
        ),
        Right::new(
            Table,
            "post_save.ledger_rotation",
            &["SELECT", "UPDATE"],
            "ledger retention: which partition takes the writes, locked while it switches",
        ),
        Right::new(
            Sequence,
            "post_save.ledger_slot",
            &["SELECT", "UPDATE"],
            "ledger retention: moving the writers to the next partition",
        ),
        Right::new(Sequence, "post_save.doorbell", &["UPDATE"], "arming and silencing the doorbell"),
        Right::new(
            Table,
            "post_save.dead_letter",
            &["SELECT", "INSERT", "UPDATE", "DELETE"],
            "writing dead letters and running the retries `post-save dead retry` requests",
        ),
    ]);
    if config.daemon.lease.is_some() {
        rights.push(Right::new(
            Table,
            "post_save.lease",
            &["SELECT", "INSERT", "UPDATE", "DELETE"],
            "taking, renewing and releasing the dispatch lease of daemon.lease",
        ));
    }
    for watch in &config.watches {
        if watch.capture == Capture::Trigger && watch.mode == Mode::Notify {
            rights.push(Right::new(
                Table,
                watch.table.quoted(),
                &["SELECT"],
                "re-reading a row too big for its notification, mode = \"notify\"",
            ));
        }
    }
    if writes_with_daemon_role(config) {
        rights.push(Right::new(
            Function,
            "post_save.set_origin(text)",
            &["EXECUTE"],
            "an sql handler without `url` marks its own writes, so the loop guard knows them",
        ));
    }
    if crate::capture::wal::wanted(config) {
        rights.push(Right::new(
            Replication,
            "",
            &["REPLICATION"],
            "streaming the logical replication slot of capture = \"wal\"",
        ));
        rights.push(Right::new(
            Table,
            "post_save.wal_slot",
            &["SELECT", "INSERT", "UPDATE"],
            "recording how far the slot is delivered, so a lost slot names the saves to send again",
        ));
    }
    rights
}

/// Whether an `sql` handler runs in the daemon's database as the daemon's role (no `url`).
fn writes_with_daemon_role(config: &Config) -> bool {
    #[cfg(feature = "sql")]
    {
        use crate::handler::KindOptions;
        use crate::handler::sql::SqlDatabase;
        config
            .handlers
            .iter()
            .any(|h| matches!(&h.kind, KindOptions::Sql(o) if matches!(o.database, SqlDatabase::Daemon(_))))
    }
    #[cfg(not(feature = "sql"))]
    {
        let _ = config;
        false
    }
}

/// The statements that grant `role` every right of [`needed`], one per line.
pub fn statements(config: &Config, role: &str) -> Vec<String> {
    needed(config).iter().map(|r| r.statement(role)).collect()
}

/// The rights of [`needed`] that the connected role (`current_user`) lacks, each with only the
/// privileges it lacks. Objects that do not exist (no schema yet, a table not created) are left
/// out: other checks report them.
pub async fn missing(client: &impl GenericClient, config: &Config) -> Result<Vec<Right>, tokio_postgres::Error> {
    let mut missing = Vec::new();
    for right in needed(config) {
        let mut lacking = Vec::new();
        for privilege in &right.privileges {
            if !holds(client, &right, privilege).await? {
                lacking.push(*privilege);
            }
        }
        if !lacking.is_empty() {
            missing.push(right.only(lacking));
        }
    }
    Ok(missing)
}

/// Whether the connected role holds `privilege` of `right`; `true` when the object is missing.
/// One privilege at a time: `has_table_privilege(t, 'SELECT, UPDATE')` is true when either is held.
/// Objects are found in the catalog, not by name lookup, which fails without `USAGE` on their
/// schema.
async fn holds(client: &impl GenericClient, right: &Right, privilege: &str) -> Result<bool, tokio_postgres::Error> {
    let sql = match right.kind {
        Kind::Schema => "SELECT bool_and(has_schema_privilege(n.oid, $2)) FROM pg_namespace n WHERE n.nspname = $1",
        Kind::Table => {
            "SELECT bool_and(has_table_privilege(c.oid, $2)) FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = (parse_ident($1))[1] AND c.relname = (parse_ident($1))[2]"
        }
        Kind::Sequence => {
            "SELECT bool_and(has_sequence_privilege(c.oid, $2)) FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = (parse_ident($1))[1] AND c.relname = (parse_ident($1))[2]"
        }
        Kind::Function => {
            "SELECT bool_and(has_function_privilege(p.oid, $2)) FROM pg_proc p \
               JOIN pg_namespace n ON n.oid = p.pronamespace \
              WHERE n.nspname = (parse_ident(split_part($1, '(', 1)))[1] \
                AND p.proname = (parse_ident(split_part($1, '(', 1)))[2]"
        }
        Kind::Replication => return has_replication(client).await,
    };
    let held: Option<bool> = client.query_one(sql, &[&right.object, &privilege]).await?.get(0);
    Ok(held.unwrap_or(true))
}

/// Whether the connected role may stream a replication slot: a superuser, the `REPLICATION`
/// attribute, or on Amazon RDS membership in `rds_replication`.
async fn has_replication(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    let sql = "SELECT r.rolsuper OR r.rolreplication OR EXISTS (SELECT FROM pg_roles g \
                      WHERE g.rolname = 'rds_replication' AND pg_has_role(r.oid, g.oid, 'MEMBER')) \
                 FROM pg_roles r WHERE r.rolname = current_user";
    client.query_one(sql, &[]).await.map(|r| r.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::parse(toml).expect("valid config")
    }

    #[test]
    fn the_ledger_rights_come_always_the_rest_with_what_needs_them() {
        let plain = statements(&config("[[watch]]\ntable = \"public.item\"\n"), "runner");
        assert_eq!(plain[0], r#"GRANT USAGE ON SCHEMA post_save TO "runner";"#);
        assert!(plain.contains(&r#"GRANT SELECT, INSERT, UPDATE ON TABLE post_save.event TO "runner";"#.to_owned()));
        assert!(
            plain.contains(&r#"GRANT SELECT, DELETE, TRUNCATE ON TABLE post_save.event_2 TO "runner";"#.to_owned())
        );
        assert!(plain.contains(&r#"GRANT UPDATE ON SEQUENCE post_save.doorbell TO "runner";"#.to_owned()));
        assert!(!plain.iter().any(|s| s.contains("lease") || s.contains("item") || s.contains("REPLICATION")));

        let all = statements(
            &config(
                "[daemon]\nlease = \"10s\"\n\
                 [[watch]]\ntable = \"public.item\"\nmode = \"notify\"\n\
                 [[watch]]\ntable = \"public.Odd \\\"name\"\ncapture = \"wal\"\n",
            ),
            "a \"role\"",
        );
        assert!(
            all.contains(
                &r#"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE post_save.lease TO "a ""role""";"#.to_owned()
            )
        );
        assert!(all.contains(&r#"GRANT SELECT ON TABLE "public"."item" TO "a ""role""";"#.to_owned()));
        assert!(!all.iter().any(|s| s.contains("Odd")), "a WAL-captured table needs no grant: {all:?}");
        assert!(all.contains(&r#"ALTER ROLE "a ""role""" WITH REPLICATION;"#.to_owned()));
        assert_eq!(all.last().unwrap(), r#"GRANT SELECT, INSERT, UPDATE ON TABLE post_save.wal_slot TO "a ""role""";"#);
    }

    #[cfg(feature = "sql")]
    #[test]
    fn only_an_sql_handler_on_the_daemons_database_needs_set_origin() {
        let watch = "[[watch]]\ntable = \"public.item\"\n";
        let handler = "[[handler]]\nname = \"audit\"\nkind = \"sql\"\nstatement = \"SELECT 1\"\n";
        let own = statements(&config(&format!("{watch}{handler}")), "r");
        assert!(own.contains(&r#"GRANT EXECUTE ON FUNCTION post_save.set_origin(text) TO "r";"#.to_owned()), "{own:?}");
        let elsewhere = statements(&config(&format!("{watch}{handler}url = \"postgres://other/db\"\n")), "r");
        assert!(!elsewhere.iter().any(|s| s.contains("set_origin")), "{elsewhere:?}");
    }

    #[test]
    fn a_missing_right_is_described_with_only_what_is_missing() {
        let right = Right::new(Kind::Table, "post_save.event", &["SELECT", "UPDATE"], "x").only(vec!["UPDATE"]);
        assert_eq!(right.describe(), "UPDATE on post_save.event");
        assert_eq!(right.statement("r"), r#"GRANT UPDATE ON TABLE post_save.event TO "r";"#);
    }
}
