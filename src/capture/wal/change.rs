//! A change of the stream made into a save event.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::event::{Actor, Op, RowImage, SaveEvent};
use crate::stats::Stats;

use super::pgoutput::{self, Datum, Message, Relation};
use super::relations::{Described, Relations};

/// Events of one transaction on their way to the router.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) events: Vec<SaveEvent>,
    /// Saves of published tables no watch names, kept as dead letters.
    pub(super) unwatched: Vec<SaveEvent>,
    /// The bytes of the messages they were made from.
    pub(super) bytes: usize,
}

impl Batch {
    pub(super) fn len(&self) -> usize {
        self.events.len() + self.unwatched.len()
    }
}

/// Adds the event of one change (`size` bytes of stream) to `out` when its table is watched for
/// it, or to its unwatched saves; whether it did.
pub(super) fn change_event(
    relations: &Relations,
    change: Message,
    lsn: u64,
    size: usize,
    out: &mut Batch,
    stats: &Stats,
) -> bool {
    let (rel_id, op) = match &change {
        Message::Insert { rel, .. } => (*rel, Op::Insert),
        Message::Update { rel, .. } => (*rel, Op::Update),
        Message::Delete { rel, .. } => (*rel, Op::Delete),
        _ => return false,
    };
    let Some(Described { rel, watched: Some((table, key_at)) }) = relations.by_oid.get(&rel_id) else {
        if !relations.by_oid.contains_key(&rel_id) {
            Stats::bump(&stats.invalid);
            tracing::error!(relation = rel_id, "WAL capture: a change of a table the stream never described; skipped");
        }
        return false;
    };
    let table = &relations.tables[*table];
    let watch = &table.watch;
    let ops = watch.operations;
    let (new, old, update_fields) = match change {
        Message::Insert { new, .. } if ops.insert => (new, None, None),
        Message::Update { old, mut new, .. } if ops.update => {
            let changed = old.as_deref().map(|old| changed_columns(rel, old, &new));
            if let Some(changed) = &changed {
                let watched = watch.columns.is_empty() || changed.iter().any(|c| watch.columns.contains(c));
                if changed.is_empty() || !watched {
                    return false;
                }
            }
            if let Some(old) = old.as_deref() {
                pgoutput::fill_unchanged(&mut new, old);
            }
            (new, old.filter(|_| watch.include_old), changed)
        }
        Message::Delete { old, .. } if ops.delete => (old, None, None),
        _ => return false,
    };
    let mut pk = Map::with_capacity(table.pk.len());
    for (key, at) in table.pk.iter().zip(key_at) {
        let value = at.and_then(|i| match new.get(i) {
            Some(Datum::Text(text)) => Some(rel.columns[i].shape.json(text)),
            Some(Datum::Null) => Some(Value::Null),
            Some(Datum::Unchanged) | None => None,
        });
        let Some(value) = value else {
            Stats::bump(&stats.invalid);
            tracing::error!(sender = %table.sender, column = %key, "WAL capture: a change without its primary key; skipped");
            return false;
        };
        pk.insert(key.clone(), value);
    }
    pk.values_mut().for_each(crate::event::exact_numbers);
    // The row images are built into JSON when something reads them: a handler that only needs
    // the key, or a filter on other fields, never pays for it.
    let image = |tuple: Vec<Datum>| {
        let rel = Arc::clone(rel);
        RowImage::lazy(move || Value::Object(pgoutput::row_json(&rel, &tuple)))
    };
    let instance = image(new);
    let old = old.map(image).unwrap_or_default();
    out.bytes += size;
    let events = if table.unwatched { &mut out.unwatched } else { &mut out.events };
    events.push(SaveEvent {
        id: i64::try_from(lsn).ok(),
        signal: if op == Op::Delete { crate::config::Signal::PostDelete } else { crate::config::Signal::PostSave },
        sender: table.sender.clone(),
        op,
        created: op == Op::Insert,
        pk,
        instance,
        old,
        update_fields,
        raw: false,
        using: String::new(),
        txid: 0,
        at: String::new(),
        actor: Actor { role: String::new(), application_name: None, client_addr: None, pid: 0, actor: None },
        origin: None,
        reread: false,
    });
    true
}

/// The columns whose values differ between the old and the new row (an unchanged out-of-line
/// value is not a change, nor is a value written differently that jsonb holds equal).
fn changed_columns(rel: &Relation, old: &[Datum], new: &[Datum]) -> Vec<String> {
    rel.columns
        .iter()
        .enumerate()
        .filter(|(i, c)| match (old.get(*i), new.get(*i)) {
            (_, Some(Datum::Unchanged)) | (None, _) => false,
            (Some(a), Some(b)) => !pgoutput::same_value(c, a, b),
            (Some(_), None) => false,
        })
        .map(|(_, c)| c.name.clone())
        .collect()
}
