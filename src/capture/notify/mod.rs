//! Notify-mode captures: the save travels inside the NOTIFY itself, so nothing waits in a
//! table and nothing is acknowledged. A row too big for one note is re-read by its key (or, when
//! it cannot be, a deleted row, sent in [`parts`]). A save made while no daemon listens is lost:
//! that is the mode's contract, and the README's.

pub(crate) mod parts;

use tokio_postgres::types::Type;

use crate::config::{Config, Mode};
use crate::db::Work;
use crate::event::SaveEvent;
use crate::name::{TableName, quote_ident};
use crate::stats::Stats;

/// The events of one notification (all of one table), made ready for dispatch: rows too big
/// for their note read again, redacted columns taken out. `None` when no notify-mode watch
/// names their table (counted and logged).
pub(crate) async fn prepare(
    work: &Work,
    config: &Config,
    stats: &Stats,
    mut events: Vec<SaveEvent>,
) -> Result<Option<Vec<SaveEvent>>, tokio_postgres::Error> {
    let Some(first) = events.first() else { return Ok(None) };
    // by the sender's text, which is all a note says of its table (a name may hold dots and
    // quotes, so it is not parsed)
    let watch = config.watches.iter().find(|w| w.mode == Mode::Notify && w.table.is_sender(&first.sender));
    let Some(watch) = watch else {
        stats.unknown_sender.fetch_add(events.len() as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(sender = %first.sender, events = events.len(), "skipped a notification of a table not watched in notify mode");
        return Ok(None);
    };
    for event in events.iter_mut().filter(|e| e.reread) {
        event.instance = reread(work, &watch.table, event).await?.into();
        if let serde_json::Value::Object(row) = &mut *event.instance {
            watch.redact.iter().for_each(|c| {
                row.remove(c);
            });
        }
        crate::event::exact_numbers(&mut event.instance);
    }
    Ok(Some(events))
}

/// Re-reads a row too big for its notification, by primary key. `null` when it is gone.
async fn reread(work: &Work, table: &TableName, event: &SaveEvent) -> Result<serde_json::Value, tokio_postgres::Error> {
    if event.op == crate::event::Op::Delete {
        return Ok(serde_json::Value::Null);
    }
    let cols: Vec<String> = event.pk.keys().map(|k| quote_ident(k)).collect();
    let t = table.quoted();
    let sql = format!(
        "SELECT row_to_json(t)::text FROM {t} t WHERE ({tc}) = (SELECT {pc} FROM json_populate_record(NULL::{t}, $1::text::json) p)",
        tc = cols.iter().map(|c| format!("t.{c}")).collect::<Vec<_>>().join(", "),
        pc = cols.iter().map(|c| format!("p.{c}")).collect::<Vec<_>>().join(", "),
    );
    let pk = serde_json::Value::Object(event.pk.clone()).to_string();
    let row = work.client.query_typed_opt(&sql, &[(&pk, Type::TEXT)]).await?;
    Ok(row.and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok()).unwrap_or(serde_json::Value::Null))
}
