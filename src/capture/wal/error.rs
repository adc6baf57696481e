//! Why the WAL reader could not stream, and whether trying again can help.
//!
//! Most failures pass: the network drops, the server restarts, a failover moves the primary.
//! A few do not, however often the reader reconnects: the server does not write logical WAL,
//! the publication is gone, the slot lost the WAL it needs, another process streams the slot,
//! the role may not do what the reader needs. Those are [`Blocker`]s: the reader says so once,
//! with what to do, publishes it (`STATUS=`, the metrics) and checks again quietly until an
//! operator fixes it (see `retry.rs`).

use crate::db::DbError;

use super::stream::StreamError;

/// Why the WAL reader stopped or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// The catalog connection failed.
    #[error(transparent)]
    Connect(#[from] DbError),
    /// A catalog query failed.
    #[error("{doing}")]
    Query {
        /// What the query was for.
        doing: &'static str,
        /// What the server or the connection said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication connection failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The server does not write logical WAL.
    #[error("the server runs with wal_level = {level}, not logical")]
    WalLevel {
        /// `wal_level` as the server has it.
        level: String,
    },
    /// Neither publication of `triggers install` exists.
    #[error("the `post_save` publication does not exist")]
    NoPublication,
    /// The server removed WAL the slot still needed (`max_slot_wal_keep_size`, or an
    /// invalidation on a standby): it can no longer stream from where it was.
    #[error("replication slot `{slot}` was invalidated ({reason})")]
    SlotInvalidated {
        /// The slot.
        slot: String,
        /// `invalidation_reason` (PostgreSQL 17 and later), else `wal_status`.
        reason: String,
        /// Where its reader had confirmed it: saves after this may be gone.
        confirmed: Option<String>,
    },
    /// The slot does not exist on this server: it was dropped, or a standby without it was
    /// promoted. The daemon does not make it again (see `slot.rs`).
    #[error("replication slot `{slot}` does not exist on this server")]
    SlotMissing {
        /// The slot.
        slot: String,
        /// What `post_save.wal_slot` remembers of it: since when saves may be missing.
        record: Option<super::slot::Record>,
        /// The watched tables of `capture = "wal"`, for the backfill advice.
        tables: Vec<String>,
    },
    /// Another process streams the slot.
    #[error("replication slot `{slot}` is streamed by another process ({})", process(*pid, holder.as_deref()))]
    SlotInUse {
        /// The slot.
        slot: String,
        /// The other process's pid, when the server said it.
        pid: Option<i32>,
        /// Its `application_name` and client address, when it could be read.
        holder: Option<String>,
    },
}

/// A condition retrying cannot fix: an operator must act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Blocker {
    /// `wal_level` is not `logical`.
    WalLevel,
    /// The publication is missing.
    NoPublication,
    /// The slot was invalidated.
    SlotInvalidated,
    /// The slot is missing (dropped, or lost in a failover).
    SlotMissing,
    /// Another process streams the slot (for longer than a hand-over takes).
    SlotInUse,
    /// The role may not connect, replicate or read what it needs.
    Denied,
}

impl Blocker {
    /// Every blocker, in the order the metrics list them.
    pub const ALL: [Blocker; 6] = [
        Blocker::WalLevel,
        Blocker::NoPublication,
        Blocker::SlotInvalidated,
        Blocker::SlotMissing,
        Blocker::SlotInUse,
        Blocker::Denied,
    ];

    /// The metric label: `wal_level`, `publication_missing`, `slot_invalidated`,
    /// `slot_missing`, `slot_in_use`, `permission_denied`.
    pub fn label(self) -> &'static str {
        match self {
            Blocker::WalLevel => "wal_level",
            Blocker::NoPublication => "publication_missing",
            Blocker::SlotInvalidated => "slot_invalidated",
            Blocker::SlotMissing => "slot_missing",
            Blocker::SlotInUse => "slot_in_use",
            Blocker::Denied => "permission_denied",
        }
    }

    /// What an operator should do about this kind of blocker.
    pub fn fix(self) -> &'static str {
        match self {
            Blocker::WalLevel => {
                "set `wal_level = logical` in postgresql.conf and restart PostgreSQL (or use the trigger capture)"
            }
            Blocker::NoPublication => "run `post-save triggers install`",
            Blocker::SlotInvalidated => {
                "see `post-save doctor`, then drop the slot (SELECT pg_drop_replication_slot(…)) and run \
                 `post-save triggers install` to make a new one; send the missed saves again with \
                 `post-save backfill`"
            }
            Blocker::SlotMissing => {
                "see `post-save doctor`: run `post-save triggers install` to make a new slot, then send the \
                 saves made since the old one was lost again with `post-save backfill`"
            }
            Blocker::SlotInUse => {
                "stop the other process streaming the slot (see `post-save doctor`); if it is another \
                 post-save daemon, run one daemon per database, or give them all a `daemon.lease`"
            }
            Blocker::Denied => {
                "check the role's password and pg_hba.conf (the WAL reader needs a `replication` entry), and \
                 give the role REPLICATION and what `post-save grants` prints"
            }
        }
    }
}

/// What the WAL reader is blocked on, as published for `STATUS=` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The kind of condition.
    pub reason: Blocker,
    /// What was found, in a line.
    pub detail: String,
}

/// SQLSTATEs of a role refused: a wrong password, no `pg_hba.conf` entry, no right.
const DENIED: [&str; 3] = ["28P01", "28000", "42501"];

impl WalError {
    /// The condition retrying cannot fix, if this is one; `None`: a retry may succeed.
    ///
    /// [`Blocker::SlotInUse`] is one only once it lasts: a daemon that restarts, or takes
    /// over the lease, may find the slot still held by its predecessor for a moment.
    pub fn blocker(&self) -> Option<Blocker> {
        match self {
            WalError::WalLevel { .. } => Some(Blocker::WalLevel),
            WalError::NoPublication => Some(Blocker::NoPublication),
            WalError::SlotInvalidated { .. } => Some(Blocker::SlotInvalidated),
            WalError::SlotMissing { .. } => Some(Blocker::SlotMissing),
            WalError::SlotInUse { .. } => Some(Blocker::SlotInUse),
            WalError::Connect(DbError::Auth { .. }) => Some(Blocker::Denied),
            WalError::Connect(DbError::Connect(source) | DbError::Query(source)) | WalError::Query { source, .. } => {
                let db = source.as_db_error()?;
                classify(db.code().code(), db.message())
            }
            WalError::Connect(_) => None,
            WalError::Stream(StreamError::Server { code, message, .. }) => classify(code, message),
            WalError::Stream(_) => None,
        }
    }

    /// What an operator should do about a blocker, for the log: this error's own advice, else
    /// its kind's.
    pub fn fix(&self) -> String {
        match self {
            WalError::SlotInvalidated { slot, confirmed, .. } => format!(
                "saves after LSN {} may be missing from the stream: drop the slot \
                 (SELECT pg_drop_replication_slot('{slot}')), run `post-save triggers install` to make a new \
                 one (saves are captured again from then on), then send the missed saves again with \
                 `post-save backfill`; raise max_slot_wal_keep_size so it does not happen again",
                confirmed.as_deref().unwrap_or("?")
            ),
            WalError::SlotMissing { record, tables, .. } => missing_fix(record.as_ref(), tables),
            WalError::SlotInUse { pid: Some(pid), .. } => format!(
                "stop the other process (SELECT pg_terminate_backend({pid})); if it is another post-save \
                 daemon, run one daemon per database, or give them all a `daemon.lease`"
            ),
            _ => self.blocker().map_or("none needed: the reader reconnects", Blocker::fix).to_owned(),
        }
    }

    /// The error of a `START_REPLICATION` of `slot` that failed: a slot in use becomes
    /// [`WalError::SlotInUse`], with the pid the server names.
    pub(crate) fn start(error: StreamError, slot: &str) -> WalError {
        match &error {
            StreamError::Server { code, message, .. } if code == "55006" => {
                WalError::SlotInUse { slot: slot.to_owned(), pid: last_number(message), holder: None }
            }
            _ => WalError::Stream(error),
        }
    }
}

/// What to do about a lost slot: make a new one, then send again what may be missing.
pub(crate) fn missing_fix(record: Option<&super::slot::Record>, tables: &[String]) -> String {
    let Some(record) = record else {
        return "run `post-save triggers install`, which makes the slot; if the daemon ran with a slot before, \
                send the saves made since it was lost again with `post-save backfill`"
            .to_owned();
    };
    let since = record.since();
    let at =
        record.confirmed_lsn.as_deref().map_or_else(String::new, |lsn| format!(" (after LSN {lsn} of the old slot)"));
    let backfill: Vec<String> = tables
        .iter()
        .map(|t| format!("`post-save backfill --table {t} --where \"<its last-changed column> >= '{since}'\"`"))
        .collect();
    format!(
        "saves committed after {since}{at} may not have been delivered (the slot was dropped, or this server \
         is a promoted standby that did not have it). Run `post-save triggers install` to make a new slot \
         (saves are captured again from then on), then send the rows changed since then again: {}; \
         deletes in that time cannot be found in the tables",
        if backfill.is_empty() {
            "`post-save backfill` for each watched table".to_owned()
        } else {
            backfill.join(", ")
        }
    )
}

/// A server error by SQLSTATE. 55000 (object not in prerequisite state) covers both
/// `wal_level` and an invalidated slot ("cannot read from logical replication slot" up to
/// PostgreSQL 16, "can no longer get changes from replication slot" from 17, the reason in
/// the detail); only the message tells them apart. The reader checks
/// both in the catalog before it streams, so an untranslated message is only the fallback
/// for a change between that check and `START_REPLICATION`.
fn classify(code: &str, message: &str) -> Option<Blocker> {
    match code {
        c if DENIED.contains(&c) => Some(Blocker::Denied),
        "55006" => Some(Blocker::SlotInUse),
        "42704" if message.contains("replication slot") => Some(Blocker::SlotMissing),
        "55000" if message.contains("wal_level") => Some(Blocker::WalLevel),
        "55000"
            if ["can no longer get changes", "cannot read from logical replication slot", "invalidated"]
                .iter()
                .any(|m| message.contains(m)) =>
        {
            Some(Blocker::SlotInvalidated)
        }
        _ => None,
    }
}

/// `pid 42, application "pg_recvlogical", from 10.0.0.7`.
fn process(pid: Option<i32>, holder: Option<&str>) -> String {
    let pid = pid.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"));
    holder.map_or_else(|| pid.clone(), |h| format!("{pid}, {h}"))
}

/// The last decimal number in `text`: the pid in "replication slot … is active for PID 42".
fn last_number(text: &str) -> Option<i32> {
    text.rsplit(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty())?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str) -> WalError {
        WalError::Stream(StreamError::Server { severity: "ERROR".into(), code: code.into(), message: message.into() })
    }

    #[test]
    fn a_missing_slot_blocks_and_names_the_saves_to_send_again() {
        let record = crate::capture::wal::slot::Record {
            created_at: "2026-12-01 09:00:00+00".into(),
            confirmed_lsn: Some("0/16B3748".into()),
            confirmed_commit: Some("2026-12-07 10:11:12.345678+00".into()),
        };
        let missing = WalError::SlotMissing {
            slot: "post_save_shop".into(),
            record: Some(record.clone()),
            tables: vec!["public.item".into(), "shop.\"Order\"".into()],
        };
        assert_eq!(missing.blocker(), Some(Blocker::SlotMissing));
        let fix = missing.fix();
        assert!(fix.contains("saves committed after 2026-12-07 10:11:12.345678+00 (after LSN 0/16B3748"), "{fix}");
        assert!(fix.starts_with("saves committed after") && fix.contains("`post-save triggers install`"), "{fix}");
        for table in ["public.item", "shop.\"Order\""] {
            assert!(fix.contains(&format!("post-save backfill --table {table} --where")), "{fix}");
        }
        // never confirmed: since the slot was made
        let fresh = crate::capture::wal::slot::Record { confirmed_lsn: None, confirmed_commit: None, ..record };
        assert!(missing_fix(Some(&fresh), &[]).contains("after 2026-12-01 09:00:00+00"));
        assert!(missing_fix(None, &[]).starts_with("run `post-save triggers install`"));
        // START_REPLICATION of a slot dropped after the catalog check
        let dropped = server("42704", "replication slot \"post_save_shop\" does not exist");
        assert_eq!(dropped.blocker(), Some(Blocker::SlotMissing));
    }

    #[test]
    fn the_network_and_a_restarting_server_are_retried() {
        let io = WalError::Stream(StreamError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
        assert!(io.blocker().is_none());
        for code in ["57P01", "57P02", "57P03", "08006", "53300"] {
            assert!(server(code, "terminating connection").blocker().is_none(), "{code}");
        }
        assert!(
            WalError::Stream(StreamError::Protocol("the server ended the replication stream".into()))
                .blocker()
                .is_none()
        );
    }

    #[test]
    fn what_an_operator_must_fix_is_not_retried() {
        let level = server("55000", "logical decoding requires wal_level >= logical");
        assert_eq!(level.blocker(), Some(Blocker::WalLevel));
        assert!(level.fix().contains("wal_level = logical"), "{}", level.fix());
        let lost = server("55000", "can no longer get changes from replication slot \"post_save_x\"");
        assert_eq!(lost.blocker(), Some(Blocker::SlotInvalidated));
        let lost_15 = server("55000", "cannot read from logical replication slot \"post_save_x\"");
        assert_eq!(lost_15.blocker(), Some(Blocker::SlotInvalidated));
        assert_eq!(server("55000", "some other prerequisite").blocker(), None);
        for code in DENIED {
            assert_eq!(server(code, "no").blocker(), Some(Blocker::Denied), "{code}");
        }
        assert!(server("28000", "no pg_hba.conf entry").fix().contains("pg_hba.conf"));
        assert!(lost_15.fix().contains("pg_drop_replication_slot"), "{}", lost_15.fix());
        assert_eq!(WalError::NoPublication.blocker(), Some(Blocker::NoPublication));
        assert!(WalError::NoPublication.fix().contains("triggers install"));
        let level = WalError::WalLevel { level: "replica".into() };
        assert_eq!(level.to_string(), "the server runs with wal_level = replica, not logical");
        assert!(level.blocker().is_some());
    }

    #[test]
    fn a_slot_in_use_names_the_process_holding_it() {
        let e = StreamError::Server {
            severity: "ERROR".into(),
            code: "55006".into(),
            message: "replication slot \"post_save_shop\" is active for PID 22196".into(),
        };
        let e = WalError::start(e, "post_save_shop");
        assert!(matches!(&e, WalError::SlotInUse { pid: Some(22196), .. }), "{e:?}");
        assert_eq!(e.blocker(), Some(Blocker::SlotInUse));
        assert!(e.to_string().contains("pid 22196"), "{e}");
        assert!(e.fix().contains("pg_terminate_backend(22196)"), "{}", e.fix());
        let other = WalError::start(StreamError::Protocol("x".into()), "s");
        assert!(matches!(other, WalError::Stream(_)));
    }

    #[test]
    fn an_invalidated_slot_says_where_saves_may_be_missing_from() {
        let e = WalError::SlotInvalidated {
            slot: "post_save_shop".into(),
            reason: "wal_removed".into(),
            confirmed: Some("0/16B3A58".into()),
        };
        assert_eq!(e.blocker(), Some(Blocker::SlotInvalidated));
        assert!(e.fix().contains("0/16B3A58") && e.fix().contains("pg_drop_replication_slot('post_save_shop')"));
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> = Blocker::ALL.iter().map(|b| b.label()).collect();
        assert_eq!(labels.len(), Blocker::ALL.len());
    }
}
