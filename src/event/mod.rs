//! The save event: the contract handlers receive (`DESIGN.md` names its fields), its row
//! images ([`RowImage`]) and the decoders that make it from what the captures wrote.

mod decode;
mod image;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::config::Signal;

pub(crate) use decode::{DecodeError, Notice, decode_ledger_row, decode_notice};
pub use image::RowImage;

/// The operation that produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// INSERT (`created = true`).
    Insert,
    /// UPDATE.
    Update,
    /// DELETE (`signal = post_delete`).
    Delete,
}

/// Who made the save, as the database saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Actor {
    /// The database role (the `SET ROLE` role when one is set, else the session user).
    pub role: String,
    /// The client's `application_name`.
    #[serde(default)]
    pub application_name: Option<String>,
    /// The client's address; `None` over a Unix socket.
    #[serde(default)]
    pub client_addr: Option<String>,
    /// The backend process id.
    pub pid: i64,
    /// What the application set with `SET LOCAL post_save.actor = '…'`.
    #[serde(default)]
    pub actor: Option<String>,
}

/// The fields of a [`SaveEvent`] as handlers see them (`reread` only when true): what a log
/// handler's `fields`, a filter or a template may name.
pub const EVENT_FIELDS: &[&str] = &[
    "id",
    "signal",
    "sender",
    "op",
    "created",
    "pk",
    "instance",
    "old",
    "update_fields",
    "raw",
    "using",
    "txid",
    "at",
    "actor",
    "origin",
];

/// One save, as handlers receive it. Field names are the contract of `DESIGN.md`; it is written
/// field by field in the contract's order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SaveEvent {
    /// Ledger id (durable tables): the idempotency key. `None` for `notify` tables.
    #[serde(default)]
    pub id: Option<i64>,
    /// `post_save` or `post_delete`.
    pub signal: Signal,
    /// `schema.table`.
    pub sender: String,
    /// `insert`, `update` or `delete`.
    pub op: Op,
    /// `true` for an INSERT.
    pub created: bool,
    /// Primary-key columns and values.
    pub pk: Map<String, Value>,
    /// The row after the save (before, for a delete), redacted columns left out.
    #[serde(default)]
    pub instance: RowImage,
    /// The row before an UPDATE, when the table asks for it.
    #[serde(default)]
    pub old: RowImage,
    /// For an UPDATE, the columns whose values changed.
    #[serde(default)]
    pub update_fields: Option<Vec<String>>,
    /// `true` for synthetic events and writes under `session_replication_role = replica`.
    pub raw: bool,
    /// The database name.
    pub using: String,
    /// Transaction id.
    pub txid: i64,
    /// Trigger time, RFC 3339.
    pub at: String,
    /// Who saved it.
    pub actor: Actor,
    /// The post-save handler whose write caused this save, if any (`post_save.origin`).
    #[serde(default)]
    pub origin: Option<String>,
    /// `true` when the row was too big for the notification and `instance` was re-read from the
    /// table by primary key (it may show a later state of the row).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reread: bool,
}

impl SaveEvent {
    /// The identity of the saved row: events with the same key keep their order.
    pub fn row_key(&self) -> String {
        let mut key = Vec::with_capacity(self.sender.len() + 32);
        self.write_row_key(&mut key);
        // the sender and JSON: UTF-8
        String::from_utf8(key).unwrap_or_default()
    }

    /// A 64-bit digest of [`row_key`](Self::row_key), computed without building the key: events
    /// with the same key have the same digest (distinct keys rarely do).
    pub(crate) fn row_digest(&self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        struct Digest<H: Hasher>(H);
        impl<H: Hasher> std::io::Write for Digest<H> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.write(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut digest = Digest(foldhash::fast::FixedState::with_seed(0x5057_5341_5645).build_hasher());
        self.write_row_key(&mut digest);
        digest.0.finish()
    }

    /// The bytes of [`row_key`](Self::row_key): the sender, a NUL, the primary key as JSON.
    /// Written to memory or a hasher, which cannot fail.
    fn write_row_key(&self, out: &mut impl std::io::Write) {
        let _ = out.write_all(self.sender.as_bytes());
        let _ = out.write_all(&[0]);
        let _ = serde_json::to_writer(out, &self.pk);
    }

    /// The event as JSON, as handlers receive it. Row images read from the ledger are written
    /// as PostgreSQL wrote them when no number in them needs rewriting (see [`RowImage`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Wire::of(self, true)).unwrap_or_else(|_| String::from("{}"))
    }
}

impl Serialize for SaveEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Wire::of(self, false).serialize(s)
    }
}

/// A [`SaveEvent`] as it is written, field by field in the contract's order: with its row images
/// decoded, or (`verbatim`, serde_json only) as captured.
#[derive(Serialize)]
struct Wire<'a> {
    id: &'a Option<i64>,
    signal: Signal,
    sender: &'a str,
    op: Op,
    created: bool,
    pk: &'a Map<String, Value>,
    instance: Image<'a>,
    old: Image<'a>,
    update_fields: &'a Option<Vec<String>>,
    raw: bool,
    using: &'a str,
    txid: i64,
    at: &'a str,
    actor: &'a Actor,
    origin: &'a Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    reread: bool,
}

/// A row image, decoded or as captured.
enum Image<'a> {
    Decoded(&'a RowImage),
    Verbatim(image::Verbatim<'a>),
}

impl Serialize for Image<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Image::Decoded(image) => image.serialize(s),
            Image::Verbatim(image) => image.serialize(s),
        }
    }
}

impl<'a> Wire<'a> {
    fn of(event: &'a SaveEvent, verbatim: bool) -> Wire<'a> {
        // Destructured in full: a field added to the event must be added here too.
        let SaveEvent {
            id,
            signal,
            sender,
            op,
            created,
            pk,
            instance,
            old,
            update_fields,
            raw,
            using,
            txid,
            at,
            actor,
            origin,
            reread,
        } = event;
        let image = |i: &'a RowImage| if verbatim { Image::Verbatim(image::Verbatim(i)) } else { Image::Decoded(i) };
        Wire {
            id,
            signal: *signal,
            sender,
            op: *op,
            created: *created,
            pk,
            instance: image(instance),
            old: image(old),
            update_fields,
            raw: *raw,
            using,
            txid: *txid,
            at,
            actor,
            origin,
            reread: *reread,
        }
    }
}

/// Rewrites, in place, every number that a JSON reader using IEEE doubles would read inexactly
/// (integers beyond ±2^53, decimals with more than 15 significant digits, huge exponents) as a
/// string holding its exact text.
pub fn exact_numbers(value: &mut Value) {
    match value {
        // `arbitrary_precision`: the number's own text, no formatting
        Value::Number(n) if !fits_double(n.as_str()) => *value = Value::String(n.as_str().to_owned()),
        Value::Array(items) => items.iter_mut().for_each(exact_numbers),
        Value::Object(map) => map.values_mut().for_each(exact_numbers),
        _ => {}
    }
}

fn fits_double(text: &str) -> bool {
    // the usual case first: an integer of at most 15 digits
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    if !unsigned.is_empty() && unsigned.len() <= 15 && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().unwrap_or(i32::MAX)),
        None => (text, 0),
    };
    let mantissa = mantissa.trim_start_matches('-');
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if frac_part.is_empty() && exponent == 0 {
        return match int_part.parse::<u64>() {
            Ok(v) => v <= 1 << 53,
            Err(_) => false,
        };
    }
    // the digits of int_part and frac_part written together, less leading and trailing zeros
    let lead = |s: &str| s.len() - s.trim_start_matches('0').len();
    let trail = |s: &str| s.len() - s.trim_end_matches('0').len();
    let leading = if lead(int_part) == int_part.len() { int_part.len() + lead(frac_part) } else { lead(int_part) };
    let trailing =
        if trail(frac_part) == frac_part.len() { frac_part.len() + trail(int_part) } else { trail(frac_part) };
    let significant = (int_part.len() + frac_part.len()).saturating_sub(leading + trailing);
    significant <= 15 && exponent.unsigned_abs() < 300
}
