//! The `wal` check: what the WAL capture (`capture = "wal"`) needs and retrying cannot bring,
//! and whether its slot survives a failover.

use tokio_postgres::Client;

use super::{Check, Verdict, query_failed};
use crate::capture::wal::health;
use crate::install;

/// What the WAL reader needs (`capture = "wal"`) and retrying cannot bring: `wal_level =
/// logical`, a publication, a slot that still has its WAL and that no other process streams.
/// Which tables are published, and whether the slot exists, is the `triggers` check's.
pub(super) async fn wal(pg: &crate::db::Settings, client: &Client) -> Check {
    match wal_findings(pg, client).await {
        Ok(check) => check,
        Err(e) => query_failed("wal", &e),
    }
}

async fn wal_findings(pg: &crate::db::Settings, client: &Client) -> Result<Check, tokio_postgres::Error> {
    let level = health::wal_level(client).await?;
    if level != "logical" {
        return Ok(Check::bad(
            "wal",
            Verdict::Fail,
            format!("wal_level is {level}, and capture = \"wal\" needs logical: no save is captured from the WAL"),
            "set `wal_level = logical` in postgresql.conf and restart PostgreSQL (or use the trigger capture)",
        ));
    }
    if !install::publication::Published::read(client).await?.exists() {
        return Ok(Check::bad(
            "wal",
            Verdict::Fail,
            "the `post_save` publication does not exist: the daemon's WAL reader cannot stream",
            "run `post-save triggers install`",
        ));
    }
    let dbname: String = client.query_one("SELECT current_database()::text", &[]).await?.get(0);
    let slot = crate::capture::wal::slot_name(&dbname);
    let Some(found) = health::Slot::read(client, &slot).await? else {
        let Some(record) = crate::capture::wal::slot::record(client, &slot).await? else {
            return Ok(Check::ok(
                "wal",
                format!("wal_level is logical; slot `{slot}` is not made yet (see `triggers`)"),
            ));
        };
        return Ok(Check::bad(
            "wal",
            Verdict::Fail,
            format!(
                "slot `{slot}` does not exist on this server (made {}): the daemon does not stream, and saves \
                 committed after {} may not have been delivered",
                record.created_at,
                record.since()
            ),
            crate::capture::wal::error::missing_fix(Some(&record), &[]),
        ));
    };
    if let Some(reason) = found.invalidated() {
        let since = found.confirmed.as_deref().unwrap_or("?");
        return Ok(Check::bad(
            "wal",
            Verdict::Fail,
            format!("slot `{slot}` was invalidated ({reason}): saves after LSN {since} may be missing from the stream"),
            format!(
                "drop it (SELECT pg_drop_replication_slot('{slot}')); the daemon makes a new one and streams \
                 saves from then on; recover the missed saves from the tables; raise max_slot_wal_keep_size"
            ),
        ));
    }
    let check = slot_state(pg, client, &slot, &found).await?;
    if check.verdict != Verdict::Ok {
        return Ok(check);
    }
    Ok(match failover_findings(pg, client, &slot).await? {
        Ok(note) => Check { detail: format!("{}{note}", check.detail), ..check },
        Err(warning) => warning,
    })
}

/// Whether the slot streams, or could.
async fn slot_state(
    pg: &crate::db::Settings,
    client: &Client,
    slot: &str,
    found: &health::Slot,
) -> Result<Check, tokio_postgres::Error> {
    if let Some(pid) = found.active_pid {
        return slot_streamed(pg, client, slot, pid).await;
    }
    if found.wal_status.as_deref() == Some("unreserved") {
        return Ok(Check::bad(
            "wal",
            Verdict::Warn,
            format!(
                "slot `{slot}` holds more WAL than max_slot_wal_keep_size: it is invalidated at a coming checkpoint"
            ),
            "start the daemon (`post-save run`) so it catches up, or raise max_slot_wal_keep_size",
        ));
    }
    Ok(Check::ok("wal", format!("wal_level is logical; slot `{slot}` has its WAL; no process streams it now")))
}

/// On PostgreSQL 17 and later, whether the slot survives a failover: it must be a failover
/// slot, and every standby the connection string names must have it synchronised. `Ok` is a
/// note for the detail; `Err` a warning.
async fn failover_findings(
    pg: &crate::db::Settings,
    client: &Client,
    slot: &str,
) -> Result<Result<String, Check>, tokio_postgres::Error> {
    let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    if version < 170_000 {
        return Ok(Ok(String::new()));
    }
    let failover: bool = client
        .query_one(
            "SELECT (to_jsonb(s) ->> 'failover')::bool FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .get::<_, Option<bool>>(0)
        .unwrap_or(false);
    if !failover {
        return Ok(Err(Check::bad(
            "wal",
            Verdict::Warn,
            format!(
                "slot `{slot}` is not a failover slot: a promoted standby will not have it, and the WAL capture stops there"
            ),
            format!(
                "make it one, over a replication connection: psql \"dbname=<db> replication=database\" -c \
                 'ALTER_REPLICATION_SLOT {slot} (FAILOVER true)'"
            ),
        )));
    }
    let mut synced = Vec::new();
    let mut lacking = Vec::new();
    for (host, one) in pg.each_host() {
        let Ok((other, _task)) = crate::db::connect(&one).await else { continue };
        let Ok(row) = other.query_one("SELECT pg_is_in_recovery()", &[]).await else { continue };
        if !row.get::<_, bool>(0) {
            continue;
        }
        let has = other
            .query_opt(
                "SELECT 1 FROM pg_replication_slots s WHERE slot_name = $1                     AND (to_jsonb(s) ->> 'synced')::bool AND NOT temporary",
                &[&slot],
            )
            .await
            .is_ok_and(|r| r.is_some());
        if has { synced.push(host) } else { lacking.push(host) }
    }
    if !lacking.is_empty() {
        return Ok(Err(Check::bad(
            "wal",
            Verdict::Warn,
            format!(
                "standby {} does not have failover slot `{slot}` synchronised: promoted, it could not stream the saves",
                lacking.join(", ")
            ),
            "on the standby set sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name, and \
             dbname in primary_conninfo; on the primary list that physical slot in synchronized_standby_slots",
        )));
    }
    if synced.is_empty() {
        let standbys: i64 = client.query_one("SELECT count(*) FROM pg_stat_replication", &[]).await?.get(0);
        return Ok(Ok(if standbys > 0 {
            format!(
                "; a failover slot; {standbys} standby(s) stream from this server but the connection string names none \
                 (list them, with target_session_attrs=read-write, so the daemon follows a failover and doctor checks them)"
            )
        } else {
            "; a failover slot".to_owned()
        }));
    }
    Ok(Ok(format!("; a failover slot, synchronised on standby {}", synced.join(", "))))
}

/// The slot is streamed by `pid`. By a post-save daemon (its replication connection's
/// `application_name`) that is the normal state of a running daemon, so it is `ok`, not a
/// warning: a doctor run beside a healthy daemon must pass. A second daemon of the same
/// database would not show here but in its own log and `STATUS=`. Any other program streaming
/// the slot takes the saves from the daemon (it confirms them): `fail`.
async fn slot_streamed(
    pg: &crate::db::Settings,
    client: &Client,
    slot: &str,
    pid: i32,
) -> Result<Check, tokio_postgres::Error> {
    let backend = health::Backend::of(client, pid).await?;
    let who = backend.as_ref().map_or_else(|| format!("pid {pid}"), |b| format!("pid {pid}, {b}"));
    let ours = backend.as_ref().is_some_and(|b| {
        b.application == crate::capture::wal::stream::application_name(pg) || b.application.starts_with("post-save")
    });
    if ours {
        return Ok(Check::ok(
            "wal",
            format!("wal_level is logical; slot `{slot}` is streamed by a post-save daemon ({who})"),
        ));
    }
    Ok(Check::bad(
        "wal",
        Verdict::Fail,
        format!("slot `{slot}` is streamed by another process ({who}): the daemon cannot stream it meanwhile"),
        format!(
            "stop that process (SELECT pg_terminate_backend({pid})): a post-save daemon (or the daemons sharing \
             a `daemon.lease`) must be the slot's only reader"
        ),
    ))
}
