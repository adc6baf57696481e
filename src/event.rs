//! The save event and the decoding of NOTIFY payloads and ledger rows into it. No I/O.
//!
//! Anyone who can connect can NOTIFY the channel, so a payload is untrusted input: decoding
//! never panics, and every rejection says why.

use std::cell::Cell;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use serde::de::{self, DeserializeSeed};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::Signal;

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

/// One save, as handlers receive it. Field names are the contract of `DESIGN.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        VERBATIM.set(true);
        let json = serde_json::to_string(self);
        VERBATIM.set(false);
        json.unwrap_or_else(|_| String::from("{}"))
    }
}

thread_local! {
    /// Set while [`SaveEvent::to_json`] runs: the serializer is serde_json's, so a row image may
    /// be written as its captured text. Any other serializer gets the decoded value.
    static VERBATIM: Cell<bool> = const { Cell::new(false) };
}

/// A row image (`instance`, `old`): JSON that reads as a [`Value`] — `event.instance["id"]`,
/// `event.old.is_null()`. An image read from the ledger keeps the text PostgreSQL wrote and is
/// decoded the first time something reads it, so an event that a handler only forwards (or that
/// no filter looks into) is never built into a tree of maps. Numbers that a reader using IEEE
/// doubles would read inexactly become strings, as [`exact_numbers`] says, whichever way the
/// image is read or written.
#[derive(Clone, Default)]
pub struct RowImage {
    /// The captured JSON text while it is still what the image holds (dropped on mutable
    /// access).
    raw: Option<Box<str>>,
    /// Or what builds the value from the values as captured (the WAL's), the same way.
    build: Option<Arc<dyn Fn() -> Value + Send + Sync>>,
    value: OnceLock<Value>,
}

impl RowImage {
    /// An image that `build` makes the first time something reads it (numbers made exact).
    pub(crate) fn lazy(build: impl Fn() -> Value + Send + Sync + 'static) -> RowImage {
        RowImage { raw: None, build: Some(Arc::new(build)), value: OnceLock::new() }
    }

    fn make(&self) -> Value {
        match (&self.raw, &self.build) {
            (Some(raw), _) => RowImage::decode(raw),
            (None, Some(build)) => {
                let mut value = build();
                exact_numbers(&mut value);
                value
            }
            (None, None) => Value::Null,
        }
    }

    /// An image of captured JSON text (checked by PostgreSQL or by the parser).
    fn captured(text: &str) -> RowImage {
        if text == "null" {
            return RowImage::default();
        }
        RowImage { raw: Some(text.into()), build: None, value: OnceLock::new() }
    }

    fn decode(raw: &str) -> Value {
        // `raw` is checked JSON; were it not, null is safe
        let mut value = serde_json::from_str(raw).unwrap_or(Value::Null);
        exact_numbers(&mut value);
        value
    }
}

impl From<Value> for RowImage {
    fn from(value: Value) -> RowImage {
        RowImage { raw: None, build: None, value: OnceLock::from(value) }
    }
}

impl Deref for RowImage {
    type Target = Value;

    fn deref(&self) -> &Value {
        self.value.get_or_init(|| self.make())
    }
}

impl DerefMut for RowImage {
    fn deref_mut(&mut self) -> &mut Value {
        let value = match self.value.take() {
            Some(value) => value,
            None => self.make(),
        };
        self.raw = None;
        self.build = None;
        self.value = OnceLock::from(value);
        self.value.get_mut().unwrap_or_else(|| unreachable!("the value was just set"))
    }
}

impl PartialEq for RowImage {
    fn eq(&self, other: &RowImage) -> bool {
        **self == **other
    }
}

impl fmt::Debug for RowImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl Serialize for RowImage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The scan runs only when the event is written, not for every event read.
        if let (Some(raw), None) = (&self.raw, self.value.get())
            && VERBATIM.get()
            && !may_hold_inexact_numbers(raw)
            && let Ok(raw) = serde_json::from_str::<&RawValue>(raw)
        {
            return raw.serialize(s);
        }
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for RowImage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RowImage, D::Error> {
        Value::deserialize(d).map(RowImage::from)
    }
}

/// Whether JSON `text` may hold a number that [`exact_numbers`] rewrites: more than 15 digits in
/// a row (a decimal point between them included), or a digit followed by an exponent mark.
/// Strings are scanned too: a long run of digits in one only costs a full decode.
fn may_hold_inexact_numbers(text: &str) -> bool {
    let mut digits = 0;
    let mut after_digit = false;
    for b in text.bytes() {
        match b {
            b'0'..=b'9' => {
                digits += 1;
                if digits > 15 {
                    return true;
                }
                after_digit = true;
            }
            b'.' if after_digit => after_digit = false,
            b'e' | b'E' if after_digit => return true,
            _ => {
                digits = 0;
                after_digit = false;
            }
        }
    }
    false
}

/// What a notification on the channel says.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Durable events were committed: read the ledger. A wake-up is only a hint (anyone can
    /// NOTIFY); the ledger, which only its owner can write, is the truth.
    Wake,
    /// Events below the daemon's cursor were made pending again (`post-save replay`): sweep
    /// the whole ledger now rather than at the next `sweep_interval`.
    Sweep,
    /// A `notify`-mode event, complete in the payload, or one whose row was too big for it
    /// (`reread`: the daemon reads the row by its key).
    Event(Box<SaveEvent>),
    /// The events of one `notify`-mode note: rows of one captured statement, packed under
    /// NOTIFY's payload limit (or the one row of a row-level capture).
    Events(Vec<SaveEvent>),
    /// One part of a `notify`-mode row too big for one note (see [`crate::parts`]).
    Part(crate::parts::Part),
}

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not JSON at all.
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an event.
    #[error("payload is not an event: {0}")]
    NotAnEvent(String),
    /// An `id` that cannot be a ledger id.
    #[error("payload has an invalid ledger id")]
    BadId,
}

/// Decodes a NOTIFY payload from the `post_save` channel. `using` is the database name (a
/// notification reaches only listeners of its own database).
///
/// A notify-mode capture writes notes shaped as ledger rows, `{"sender":…,"op":…,"head":{…},
/// "rows":[…]}`, or for a row too big for NOTIFY `{"sender":…,"op":…,"head":{…},"reread":true,
/// "pk":{…},"update_fields":…}`. A capture generated by an earlier version writes each event
/// whole; both are read.
pub fn decode_notice(payload: &str, using: &str) -> Result<Notice, DecodeError> {
    if payload.starts_with("{\"sender\":")
        && payload.contains(",\"part\":[")
        && payload.ends_with("\"}")
        && let Ok(part) = crate::parts::Part::decode(payload)
    {
        return Ok(Notice::Part(part));
    }
    if payload.starts_with("{\"sender\":") {
        return decode_note(payload, using);
    }
    let value: Value = serde_json::from_str(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(DecodeError::NotAnEvent("not a JSON object".into()));
    };
    if map.get("wake").is_some_and(|w| w == "ledger") {
        return Ok(Notice::Wake);
    }
    if map.get("wake").is_some_and(|w| w == "sweep") {
        return Ok(Notice::Sweep);
    }
    if let Some(id) = map.get("id") {
        return match id.as_i64() {
            Some(id) if id > 0 => Ok(Notice::Wake),
            _ => Err(DecodeError::BadId),
        };
    }
    event_from_map(map).map(|e| Notice::Event(Box::new(e)))
}

/// A notify-mode note, as the capture writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Note<'a> {
    sender: String,
    op: Op,
    #[serde(borrow)]
    head: &'a RawValue,
    #[serde(borrow, default)]
    rows: Option<&'a RawValue>,
    #[serde(default)]
    reread: bool,
    #[serde(default)]
    pk: Option<Map<String, Value>>,
    #[serde(default)]
    update_fields: Option<Vec<String>>,
}

fn decode_note(payload: &str, using: &str) -> Result<Notice, DecodeError> {
    let note: Note = serde_json::from_str(payload).map_err(|e| DecodeError::NotAnEvent(e.to_string()))?;
    match (note.rows, note.reread, note.pk) {
        (Some(rows), false, None) => {
            decode_rows(None, &note.sender, note.op, note.head.get(), rows.get(), using).map(Notice::Events)
        }
        (None, true, Some(mut pk)) => {
            if pk.is_empty() {
                return Err(DecodeError::NotAnEvent("empty pk".into()));
            }
            pk.values_mut().for_each(exact_numbers);
            let head: Head =
                serde_json::from_str(note.head.get()).map_err(|e| DecodeError::NotAnEvent(format!("head: {e}")))?;
            Ok(Notice::Event(Box::new(SaveEvent {
                id: None,
                signal: if note.op == Op::Delete { Signal::PostDelete } else { Signal::PostSave },
                sender: note.sender,
                op: note.op,
                created: note.op == Op::Insert,
                pk,
                instance: RowImage::default(),
                old: RowImage::default(),
                update_fields: note.update_fields,
                raw: head.raw,
                using: using.to_owned(),
                txid: head.txid,
                at: head.at,
                actor: head.actor,
                origin: head.origin,
                reread: true,
            })))
        }
        _ => Err(DecodeError::NotAnEvent("a note carries either `rows` or `reread` with `pk`".into())),
    }
}

/// What the events of one captured statement share (the ledger's `head` column).
#[derive(Deserialize)]
struct Head {
    raw: bool,
    txid: i64,
    #[serde(deserialize_with = "utc_time")]
    at: String,
    actor: Actor,
    #[serde(default)]
    origin: Option<String>,
    /// The primary-key columns, for rows written as the instance alone.
    #[serde(default)]
    keys: Option<Vec<String>>,
}

/// The capture writes its clock as a UTC `timestamp`, which JSON writes without an offset:
/// `2026-12-07T00:54:48.113572` becomes `2026-12-07T00:54:48.113572+00:00`. A time that has an
/// offset (a ledger row written by an older capture) is kept as it is.
fn utc_time<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let mut at = String::deserialize(d)?;
    let time = at.split_once('T').map_or("", |(_, time)| time);
    if !time.is_empty() && !time.contains(['+', '-', 'Z']) {
        at.push_str("+00:00");
    }
    Ok(at)
}

/// One saved row of a ledger row, in full: `[pk, instance, old, update_fields]`; the row images
/// stay text. A set-based INSERT capture writes the instance alone (`{…}`), its key columns
/// named by the head's `keys`.
type Item<'a> = (Map<String, Value>, &'a RawValue, &'a RawValue, Option<Vec<String>>);

/// The primary key of an instance, read from its text: the `keys` columns in key order, the
/// other columns skipped without being built.
struct KeyOf<'k>(&'k [String]);

impl<'de> de::DeserializeSeed<'de> for KeyOf<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> de::Visitor<'de> for KeyOf<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a row as a JSON object")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: Vec<Option<Value>> = vec![None; self.0.len()];
        while let Some(position) = map.next_key_seed(KeyPosition(self.0))? {
            match position {
                Some(i) => found[i] = Some(map.next_value()?),
                None => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        let mut pk = Map::new();
        for (key, value) in self.0.iter().zip(found) {
            let value = value.ok_or_else(|| de::Error::custom(format!("key column `{key}` missing")))?;
            pk.insert(key.clone(), value);
        }
        Ok(pk)
    }
}

/// The elements of the JSON array `text`, as text, read as PostgreSQL's `json` type has checked
/// it: strings are passed over by their quotes and escapes, nesting by its brackets, and nothing
/// else is checked. `None` when `text` is not an array of that form (the parser then says why).
/// The parser took a fifth of the daemon's instructions per ledger event for this.
fn array_elements(text: &str) -> Option<Vec<&str>> {
    let bytes = text.as_bytes();
    let skip = |mut i: usize| {
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let mut i = skip(0);
    if bytes.get(i) != Some(&b'[') {
        return None;
    }
    let mut items = Vec::new();
    i = skip(i + 1);
    if bytes.get(i) == Some(&b']') {
        return (skip(i + 1) == bytes.len()).then_some(items);
    }
    loop {
        let start = i;
        let mut depth = 0usize;
        loop {
            // numbers, literals and whitespace: nothing to look at
            while i < bytes.len() && !STRUCTURAL[usize::from(bytes[i])] {
                i += 1;
            }
            match *bytes.get(i)? {
                b'"' => loop {
                    i += 1 + memchr::memchr2(b'"', b'\\', bytes.get(i + 1..)?)?;
                    if bytes[i] == b'"' {
                        break;
                    }
                    i += 1;
                },
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth > 0 => depth -= 1,
                b',' | b']' if depth == 0 => break,
                b'}' => return None,
                _ => {}
            }
            i += 1;
        }
        let mut end = i;
        while end > start && bytes[end - 1].is_ascii_whitespace() {
            end -= 1;
        }
        if end == start {
            return None;
        }
        items.push(text.get(start..end)?);
        if bytes[i] == b']' {
            return (skip(i + 1) == bytes.len()).then_some(items);
        }
        i = skip(i + 1);
    }
}

/// The bytes [`array_elements`] stops at.
static STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut k = 0;
    let marks = *b"\"{}[],";
    while k < marks.len() {
        table[marks[k] as usize] = true;
        k += 1;
    }
    table
};

/// The key of a row image (checked JSON) whose first member is its only key column and holds
/// an integer of at most 15 digits, as `row_to_json` writes a table keyed by its first column
/// (`{"id":42,…}`): read without a parser, the same value [`KeyOf`] reads. `None` for any
/// other shape, which the parser reads.
fn leading_integer_key(keys: &[String], text: &str) -> Option<Map<String, Value>> {
    let [key] = keys else { return None };
    if key.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        return None;
    }
    let rest = text.strip_prefix("{\"")?.strip_prefix(key.as_str())?.strip_prefix("\":")?;
    let digits = &rest[..rest.find([',', '}'])?];
    let unsigned = digits.strip_prefix('-').unwrap_or(digits);
    // canonical (no `-0`, no leading zero) and exact as a double: nothing for `exact_numbers`
    let canonical = match unsigned.as_bytes() {
        [b'0'] => digits.len() == 1,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !canonical || unsigned.len() > 15 {
        return None;
    }
    let mut pk = Map::new();
    pk.insert(key.clone(), Value::from(digits.parse::<i64>().ok()?));
    Some(pk)
}

/// Where a column name stands among the key columns, without allocating it.
struct KeyPosition<'k>(&'k [String]);

impl<'de> de::DeserializeSeed<'de> for KeyPosition<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> de::Visitor<'de> for KeyPosition<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a column name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|k| k == name))
    }
}

/// Decodes a ledger row — the events of one captured statement — into its events, whose ids are
/// `id`, `id + 1`, … in `rows` order. `using` is the database name. `head` and `rows` are the
/// text of the ledger's `json` columns, which PostgreSQL has checked: a row image that is not
/// JSON reads as null.
pub fn decode_ledger_row(
    id: i64,
    sender: &str,
    op: &str,
    head: &str,
    rows: &str,
    using: &str,
) -> Result<Vec<SaveEvent>, DecodeError> {
    let op: Op =
        serde_json::from_value(Value::String(op.to_owned())).map_err(|e| DecodeError::NotAnEvent(e.to_string()))?;
    decode_rows(Some(id), sender, op, head, rows, using)
}

/// The events of a ledger row (`id` its ledger id) or of a notify-mode note (`id` `None`).
fn decode_rows(
    id: Option<i64>,
    sender: &str,
    op: Op,
    head: &str,
    rows: &str,
    using: &str,
) -> Result<Vec<SaveEvent>, DecodeError> {
    let head: Head = serde_json::from_str(head).map_err(|e| DecodeError::NotAnEvent(format!("head: {e}")))?;
    let items = match array_elements(rows) {
        Some(items) => items,
        None => serde_json::from_str::<Vec<&RawValue>>(rows)
            .map_err(|e| DecodeError::NotAnEvent(format!("rows: {e}")))?
            .into_iter()
            .map(RawValue::get)
            .collect(),
    };
    let signal = if op == Op::Delete { Signal::PostDelete } else { Signal::PostSave };
    let mut events = Vec::with_capacity(items.len());
    for (pos, text) in items.into_iter().enumerate() {
        let (pk, instance, old, update_fields) = if text.starts_with('{') {
            let keys = head.keys.as_deref().filter(|k| !k.is_empty());
            let keys = keys.ok_or_else(|| DecodeError::NotAnEvent("a row without `keys` in the head".into()))?;
            let pk = match leading_integer_key(keys, text) {
                Some(pk) => pk,
                None => {
                    let mut pk = KeyOf(keys)
                        .deserialize(&mut serde_json::Deserializer::from_str(text))
                        .map_err(|e| DecodeError::NotAnEvent(format!("rows: {e}")))?;
                    pk.values_mut().for_each(exact_numbers);
                    pk
                }
            };
            (pk, RowImage::captured(text), RowImage::default(), None)
        } else {
            let (pk, instance, old, update_fields): Item =
                serde_json::from_str(text).map_err(|e| DecodeError::NotAnEvent(format!("rows: {e}")))?;
            // a note can be forged, a ledger row written by hand: row images are rows or nothing
            if !instance.get().starts_with('{') || !(old.get().starts_with('{') || old.get() == "null") {
                return Err(DecodeError::NotAnEvent("a row image is not a JSON object".into()));
            }
            let mut pk: Map<String, Value> = pk;
            pk.values_mut().for_each(exact_numbers);
            (pk, RowImage::captured(instance.get()), RowImage::captured(old.get()), update_fields)
        };
        if pk.is_empty() {
            return Err(DecodeError::NotAnEvent("empty pk".into()));
        }
        events.push(SaveEvent {
            id: id.map(|id| id + i64::try_from(pos).unwrap_or(i64::MAX - id)),
            signal,
            sender: sender.to_owned(),
            op,
            created: op == Op::Insert,
            pk,
            instance,
            old,
            update_fields,
            raw: head.raw,
            using: using.to_owned(),
            txid: head.txid,
            at: head.at.clone(),
            actor: head.actor.clone(),
            origin: head.origin.clone(),
            reread: false,
        });
    }
    Ok(events)
}

fn event_from_map(map: Map<String, Value>) -> Result<SaveEvent, DecodeError> {
    let mut event: SaveEvent =
        serde_json::from_value(Value::Object(map)).map_err(|e| DecodeError::NotAnEvent(e.to_string()))?;
    let consistent = match event.op {
        Op::Insert => event.created && event.signal == Signal::PostSave,
        Op::Update => !event.created && event.signal == Signal::PostSave,
        Op::Delete => !event.created && event.signal == Signal::PostDelete,
    };
    if !consistent {
        return Err(DecodeError::NotAnEvent("op, created and signal disagree".into()));
    }
    if event.pk.is_empty() {
        return Err(DecodeError::NotAnEvent("empty pk".into()));
    }
    if !(event.instance.is_object() || event.instance.is_null() && event.reread) {
        return Err(DecodeError::NotAnEvent("instance is not an object".into()));
    }
    for value in event.pk.values_mut() {
        exact_numbers(value);
    }
    exact_numbers(&mut event.instance);
    exact_numbers(&mut event.old);
    Ok(event)
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

#[cfg(test)]
mod tests {
    use super::*;

    const INSERT: &str = r#"{"instance":{ "id" : 7, "user_id" : 1, "product" : "book" },"old":null,"signal" : "post_save", "sender" : "public.shop_order", "op" : "insert", "created" : true, "pk" : { "id" : 7 }, "update_fields" : null, "raw" : false, "using" : "shop", "txid" : 740, "at" : "2026-11-25T02:17:22.59878+00:00", "actor" : {"role" : "app", "application_name" : "psql", "client_addr" : null, "pid" : 8200, "actor" : null}, "origin" : null}"#;

    #[test]
    fn event_fields_name_every_field_an_event_is_written_with() {
        let Notice::Event(e) = decode_notice(INSERT, "shop").unwrap() else { panic!("not an event") };
        let Value::Object(written) = serde_json::from_str(&e.to_json()).unwrap() else { panic!("not an object") };
        let written: Vec<&str> = written.keys().map(String::as_str).collect();
        assert_eq!(written, EVENT_FIELDS);
        let mut reread = (*e).clone();
        reread.reread = true;
        assert!(serde_json::to_value(&reread).unwrap().get("reread").is_some(), "reread is written only when true");
    }

    #[test]
    fn decodes_a_notify_event() {
        let Notice::Event(e) = decode_notice(INSERT, "shop").unwrap() else { panic!("not an event") };
        assert_eq!(e.sender, "public.shop_order");
        assert!(e.created);
        assert_eq!(e.op, Op::Insert);
        assert_eq!(e.instance["product"], "book");
        assert_eq!(e.id, None);
        assert_eq!(e.row_key(), "public.shop_order\u{0}{\"id\":7}");
    }

    #[test]
    fn events_of_one_row_share_a_digest_and_other_rows_do_not() {
        let Notice::Event(e) = decode_notice(INSERT, "shop").unwrap() else { panic!("not an event") };
        let mut same = e.clone();
        same.instance = RowImage::default();
        same.op = Op::Update;
        assert_eq!(e.row_digest(), same.row_digest());
        let mut other_row = e.clone();
        other_row.pk.insert("id".into(), Value::from(8));
        let mut other_table = e.clone();
        other_table.sender = "public.shop_orders".into();
        let mut digests: Vec<u64> = [&e, &other_row, &other_table].iter().map(|e| e.row_digest()).collect();
        digests.dedup();
        assert_eq!(digests.len(), 3, "{digests:?}");
        // a fixed seed: the same row has the same digest in every decode
        let Notice::Event(again) = decode_notice(INSERT, "shop").unwrap() else { panic!("not an event") };
        assert_eq!(e.row_digest(), again.row_digest());
    }

    #[test]
    fn durable_payloads_are_wake_ups() {
        assert_eq!(decode_notice(r#"{"wake":"ledger"}"#, "shop").unwrap(), Notice::Wake);
        let payload = format!("{{\"id\":42,{}", &INSERT[1..]);
        assert_eq!(decode_notice(&payload, "shop").unwrap(), Notice::Wake);
        assert!(decode_notice(r#"{"wake":"soon"}"#, "shop").is_err());
    }

    #[test]
    fn hostile_payloads_are_rejected() {
        for bad in [
            "",
            "not json",
            "[1,2]",
            "null",
            r#"{"id":"42"}"#,
            r#"{"id":-1}"#,
            r#"{"id":1e400}"#,
            r#"{"id":99999999999999999999999}"#,
            r#"{"sender":5}"#,
            &INSERT.replace("\"created\" : true", "\"created\" : false"),
            &INSERT.replace("\"pk\" : { \"id\" : 7 }", "\"pk\" : {}"),
            &INSERT.replace("\"txid\" : 740", "\"txid\" : 1e999"),
        ] {
            assert!(decode_notice(bad, "shop").is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn inexact_numbers_become_strings() {
        let payload = INSERT.replace(
            "\"user_id\" : 1,",
            "\"user_id\" : 9007199254740993, \"price\" : 12.50, \"big\" : 1234567890.1234567891, \"small\" : -5,",
        );
        let Notice::Event(e) = decode_notice(&payload, "shop").unwrap() else { panic!() };
        assert_eq!(e.instance["user_id"], "9007199254740993");
        assert_eq!(e.instance["big"], "1234567890.1234567891");
        assert!(e.instance["price"].is_number());
        assert_eq!(e.instance["small"], -5);
        assert!(fits_double("9007199254740992"));
        assert!(!fits_double("1e400"));
        // significant digits counted across the point, zeros at either end not counted
        for fits in [
            "0",
            "0.000",
            "-0.5",
            "100000000000000000000e-5",
            "0.000000000000000000123456789012345",
            "1234567.12345678",
        ] {
            assert!(fits_double(fits), "{fits}");
        }
        for inexact in ["1234567.123456789", "0.1234567890123456", "-12345678901234.56", "1000000000000001.0"] {
            assert!(!fits_double(inexact), "{inexact}");
        }
    }

    #[test]
    fn a_lazy_image_is_built_once_when_first_read_with_exact_numbers() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let builds = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&builds);
        let image = RowImage::lazy(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            serde_json::json!({"id": 1, "big": 9_007_199_254_740_993u64})
        });
        let copy = image.clone();
        assert_eq!(builds.load(Ordering::SeqCst), 0, "nothing read yet");
        assert_eq!(image["big"], "9007199254740993");
        assert_eq!(image["id"], 1);
        assert!(serde_json::to_string(&image).unwrap().contains("\"9007199254740993\""));
        assert_eq!(builds.load(Ordering::SeqCst), 1, "built once");
        assert_eq!(*copy, *image);
        assert_eq!(builds.load(Ordering::SeqCst), 2, "a clone read before it was built builds its own");
    }

    #[test]
    fn by_reference_payloads_decode_without_instance() {
        let head = INSERT.split_once(",\"signal\"").unwrap().1;
        let payload = format!("{{\"reread\":true,\"signal\"{head}");
        let Notice::Event(e) = decode_notice(&payload, "shop").unwrap() else { panic!() };
        assert!(e.reread && e.instance.is_null());
        let without_flag = format!("{{\"signal\"{head}");
        assert!(decode_notice(&without_flag, "shop").is_err(), "no instance and not flagged");
    }

    #[test]
    fn row_images_from_the_ledger_are_written_as_captured_and_read_exactly() {
        let head = r#"{"raw" : false, "txid" : 7, "at" : "t", "actor" : {"role" : "app", "pid" : 1}}"#;
        let rows = r#"[[{"id" : 1}, {"id":1,"note":"a  b","q":2}, null, null], [{"id" : 2}, {"id":2,"q":12345678901234567890}, {"id":2,"q":1.5e3}, ["q"]]]"#;
        let events = decode_ledger_row(1, "public.t", "update", head, rows, "shop").unwrap();
        // no number to rewrite: the text PostgreSQL wrote, spacing and key order kept
        assert!(events[0].to_json().contains(r#""instance":{"id":1,"note":"a  b","q":2},"old":null,"#));
        // an inexact number: decoded and rewritten, in JSON as in reads
        let json: Value = serde_json::from_str(&events[1].to_json()).unwrap();
        assert_eq!(json["instance"]["q"], "12345678901234567890");
        assert_eq!(events[1].instance["q"], "12345678901234567890");
        assert_eq!(json["old"]["q"], 1500.0);
        // any other serializer sees the decoded value
        assert_eq!(serde_json::to_value(&events[1]).unwrap()["instance"]["q"], "12345678901234567890");
        assert_eq!(
            serde_json::to_value(&events[0]).unwrap()["instance"],
            serde_json::json!({"id": 1, "note": "a  b", "q": 2})
        );
        assert!(events[0].old.is_null());
        // a change is what is written from then on
        let mut event = events[0].clone();
        event.instance["q"] = serde_json::json!(3);
        assert!(event.to_json().contains(r#""instance":{"id":1,"note":"a  b","q":3}"#));
        assert_ne!(event, events[0]);
        assert_eq!(events[0].clone(), events[0]);
    }

    #[test]
    fn instance_only_rows_take_their_key_from_the_head_keys() {
        let head = r#"{"raw" : false, "txid" : 7, "at" : "t", "actor" : {"role" : "app", "pid" : 1}, "origin" : null, "keys" : ["b", "a"]}"#;
        // json_agg's own spacing between elements
        let rows = "[{\"a\":1,\"b\":\"x\",\"c\":{\"a\":9}}, \n {\"a\":2,\"b\":\"y\",\"c\":null}]";
        let events = decode_ledger_row(5001, "public.t", "insert", head, rows, "shop").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(serde_json::to_string(&events[0].pk).unwrap(), r#"{"b":"x","a":1}"#, "key order, not column order");
        assert_eq!(events[1].pk["a"], 2);
        assert_eq!(events[0].instance["c"]["a"], 9);
        assert!(events[0].old.is_null() && events[0].update_fields.is_none());
        assert_eq!(events[1].id, Some(5002));
        assert_eq!(events[0].row_key(), "public.t\u{0}{\"b\":\"x\",\"a\":1}");
        // no keys, or a key column missing from the row
        let no_keys = head.replace(r#", "keys" : ["b", "a"]"#, "");
        assert!(decode_ledger_row(1, "public.t", "insert", &no_keys, rows, "shop").is_err());
        let missing = r#"[{"a":1,"c":2}]"#;
        let e = decode_ledger_row(1, "public.t", "insert", head, missing, "shop").unwrap_err();
        assert!(e.to_string().contains("key column `b` missing"), "{e}");
        // both shapes in one ledger row
        let mixed = r#"[{"a":1,"b":"x"}, [{"id":3},{"id":3},null,null]]"#;
        let events = decode_ledger_row(1, "public.t", "insert", head, mixed, "shop").unwrap();
        assert_eq!(events[1].pk["id"], 3);
    }

    #[test]
    fn array_elements_are_split_as_the_parser_splits_them() {
        for text in [
            "[]",
            " [ ] ",
            r#"[{"id":1,"a":"x"}, {"id":2,"a":"y, ]}"}]"#,
            r#"[{"s":"a \"quoted\" ] , string\\","n":[1,[2,{"x":[]}]]},null,3,"str",[{"id":1},{"id":1},null,["a"]]]"#,
            "[\n  {\"a\" : 1} ,\n\t{\"b\":\"\\u00e9t\\u00e9 ❄\"}\n]",
            "[-1.5e3, true, false]",
        ] {
            let parsed: Vec<&str> =
                serde_json::from_str::<Vec<&RawValue>>(text).unwrap().into_iter().map(RawValue::get).collect();
            assert_eq!(array_elements(text), Some(parsed), "{text}");
        }
        for text in ["", "{}", "[1,2", "[1,]", "[,1]", "[1}", "[1] x", r#"["open]"#, "[[1]"] {
            assert_eq!(array_elements(text), None, "{text}");
        }
    }

    #[test]
    fn a_leading_integer_key_is_read_as_the_parser_reads_it() {
        let keys = ["id".to_owned()];
        let parsed = |text: &str| KeyOf(&keys).deserialize(&mut serde_json::Deserializer::from_str(text)).unwrap();
        for text in [r#"{"id":42,"a":"b"}"#, r#"{"id":-7}"#, r#"{"id":0,"x":[1]}"#, r#"{"id":999999999999999,"y":1}"#] {
            let fast = leading_integer_key(&keys, text).unwrap_or_else(|| panic!("{text} not read"));
            assert_eq!(fast, parsed(text), "{text}");
            assert_eq!(serde_json::to_string(&fast).unwrap(), serde_json::to_string(&parsed(text)).unwrap());
        }
        // any other shape is left to the parser
        for text in [
            r#"{"a":1,"id":42}"#,
            r#"{"id" : 42}"#,
            r#"{"id":"42"}"#,
            r#"{"id":4.5}"#,
            r#"{"id":1e3}"#,
            r#"{"id":-0}"#,
            r#"{"id":1234567890123456}"#,
            r#"{"idx":1,"id":2}"#,
            r#"{"id":null}"#,
        ] {
            assert_eq!(leading_integer_key(&keys, text), None, "{text}");
        }
        assert_eq!(leading_integer_key(&["a".to_owned(), "b".to_owned()], r#"{"a":1,"b":2}"#), None);
    }

    #[test]
    fn numbers_that_may_be_inexact_are_found_in_text() {
        for text in [
            r#"{"a":9007199254740993}"#,
            r#"{"a":1234567890.1234567891}"#,
            r#"{"a":1e5}"#,
            r#"{"a":2E-3}"#,
            r#"{"s":"1234567890123456"}"#,
        ] {
            assert!(may_hold_inexact_numbers(text), "{text}");
        }
        for text in [
            r#"{"a":900719925474099,"b":-12.5,"c":"2026-12-02T04:47:34.272382+00:00"}"#,
            r#"{"e":"eee","x":"1.2.3"}"#,
            "[]",
        ] {
            assert!(!may_hold_inexact_numbers(text), "{text}");
        }
    }

    #[test]
    fn ledger_rows_expand_into_events() {
        let head = r#"{"raw" : false, "txid" : 7, "at" : "2026-11-25T02:17:22.59878+00:00", "actor" : {"role" : "app", "application_name" : "psql", "client_addr" : null, "pid" : 1, "actor" : "user:1"}, "origin" : null}"#;
        let rows = r#"[[{"id":1},{"id":1,"q":2},{"id":1,"q":1},["q"]], [{"id":2},{"id":2,"q":99999999999999999999},null,["q"]]]"#;
        let events = decode_ledger_row(1001, "public.t", "update", head, rows, "shop").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].id, Some(1001));
        assert_eq!(events[1].id, Some(1002));
        assert_eq!(events[0].signal, Signal::PostSave);
        assert!(!events[0].created);
        assert_eq!(events[0].old["q"], 1);
        assert_eq!(events[1].instance["q"], "99999999999999999999");
        assert_eq!(events[1].update_fields.as_deref(), Some(&["q".to_owned()][..]));
        assert_eq!(events[0].actor.actor.as_deref(), Some("user:1"));
        assert_eq!(events[0].using, "shop");
        assert!(events[0].to_json().starts_with("{\"id\":1001,"));
        assert!(decode_ledger_row(1, "public.t", "upsert", head, rows, "shop").is_err());
        assert!(decode_ledger_row(1, "public.t", "insert", "{}", rows, "shop").is_err());
        assert!(decode_ledger_row(1, "public.t", "insert", head, "[[{}, {}, null, null]]", "shop").is_err());
    }

    const HEAD: &str = r#"{"raw" : false, "txid" : 9, "at" : "2026-12-06T01:00:00+00:00", "actor" : {"role" : "app", "application_name" : "psql", "client_addr" : null, "pid" : 3, "actor" : null}, "origin" : null, "keys" : ["id"]}"#;

    #[test]
    fn a_note_of_a_statement_is_its_events() {
        let note = format!(
            r#"{{"sender":"public.shop_order","op":"insert","head":{HEAD},"rows":[{{"id":1,"product":"a"}},{{"id":2,"product":"b"}}]}}"#
        );
        let Notice::Events(events) = decode_notice(&note, "shop").unwrap() else { panic!("not events") };
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.id.is_none() && e.created && e.using == "shop" && e.txid == 9));
        assert_eq!(events[1].pk["id"], 2);
        assert_eq!(events[1].instance["product"], "b");
        assert_eq!(events[0].sender, "public.shop_order");
        // a row-level note: the full item, update_fields included
        let note = format!(
            r#"{{"sender":"public.shop_order","op":"update","head":{HEAD},"rows":[[{{"id":1}},{{"id":1,"q":2}},{{"id":1,"q":1}},["q"]]]}}"#
        );
        let Notice::Events(events) = decode_notice(&note, "shop").unwrap() else { panic!("not events") };
        assert_eq!(events[0].update_fields.as_deref(), Some(&["q".to_owned()][..]));
        assert_eq!(events[0].old["q"], 1);
        assert!(!events[0].created);
    }

    #[test]
    fn a_reread_note_names_the_row_by_its_key() {
        let note = format!(
            r#"{{"sender":"public.shop_order","op":"update","head":{HEAD},"reread":true,"pk":{{"id":99999999999999999999}},"update_fields":["product"]}}"#
        );
        let Notice::Event(e) = decode_notice(&note, "shop").unwrap() else { panic!("not an event") };
        assert!(e.reread && e.instance.is_null() && e.id.is_none());
        assert_eq!(e.pk["id"], "99999999999999999999");
        assert_eq!(e.update_fields.as_deref(), Some(&["product".to_owned()][..]));
        assert_eq!(e.op, Op::Update);
    }

    #[test]
    fn malformed_notes_are_rejected() {
        let start = format!(r#"{{"sender":"public.t","op":"insert","head":{HEAD}"#);
        for bad in [
            format!("{start}}}"),
            format!(r#"{start},"rows":[{{"id":1}}],"reread":true,"pk":{{"id":1}}}}"#),
            format!(r#"{start},"reread":true}}"#),
            format!(r#"{start},"reread":true,"pk":{{}}}}"#),
            format!(r#"{start},"rows":[{{"no_id":1}}]}}"#),
            format!(r#"{start},"rows":{{"id":1}}}}"#),
            format!(r#"{start},"rows":[{{"id":1}}],"extra":1}}"#),
            format!(r#"{start},"rows":[[{{"id":1}},5,null,null]]}}"#),
            format!(r#"{start},"rows":[[{{"id":1}},{{"id":1}},[],null]]}}"#),
            r#"{"sender":"public.t","op":"upsert","head":{},"rows":[]}"#.to_owned(),
            format!(r#"{start},"rows":[{{"id":1}}]"#),
        ] {
            assert!(decode_notice(&bad, "shop").is_err(), "accepted {bad}");
        }
    }
}
