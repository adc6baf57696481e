//! Decoding of `pgoutput` messages (logical replication protocol version 1) and of the text
//! values in them into the JSON that `row_to_json` would have written. No I/O.
//!
//! A message is untrusted only in the sense that it may be cut short or come from a newer
//! server: decoding never panics, and every rejection says what was wrong.

use serde_json::{Map, Number, Value};

/// A pgoutput message that post-save uses; the others decode as [`Message::Other`].
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A transaction starts.
    Begin {
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time: i64,
        /// Its transaction id.
        xid: u32,
    },
    /// The transaction commits.
    Commit {
        /// The end of the commit record: confirming it means the transaction is consumed.
        end_lsn: u64,
    },
    /// The transaction was replicated from elsewhere (its replication origin).
    Origin(String),
    /// A table's columns, sent before its first change in a session and after schema changes.
    Relation(Relation),
    /// A row was inserted.
    Insert {
        /// The table.
        rel: u32,
        /// The new row.
        new: Tuple,
    },
    /// A row was updated.
    Update {
        /// The table.
        rel: u32,
        /// The old row (with `REPLICA IDENTITY FULL`) or its key (when the key changed).
        old: Option<Tuple>,
        /// The new row.
        new: Tuple,
    },
    /// A row was deleted.
    Delete {
        /// The table.
        rel: u32,
        /// The old row (with `REPLICA IDENTITY FULL`) or its key.
        old: Tuple,
    },
    /// A transactional `pg_logical_emit_message`.
    Note {
        /// The message's prefix.
        prefix: String,
        /// Its content.
        content: Vec<u8>,
    },
    /// Type, truncate, and messages of later protocol versions: nothing to do.
    Other(u8),
}

/// A table as the stream describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// The table's OID: how changes name it.
    pub id: u32,
    /// Schema.
    pub schema: String,
    /// Table.
    pub name: String,
    /// Columns in table order.
    pub columns: Vec<RelColumn>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct RelColumn {
    /// Its name.
    pub name: String,
    /// Its type's OID.
    pub type_oid: u32,
}

/// One value of a row in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// An out-of-line (TOASTed) value the statement did not change: not sent.
    Unchanged,
    /// The value's text output.
    Text(String),
}

/// The values of one row, in column order.
pub type Tuple = Vec<Datum>;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError(format!("cut short in {what}")));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        self.u32(what).map(|v| v as i32)
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or_else(|| DecodeError(format!("unterminated {what}")))?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| DecodeError(format!("{what} is not UTF-8")))?;
        self.buf = &self.buf[end + 1..];
        Ok(s.to_owned())
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("column count")?;
        let n = usize::try_from(n).map_err(|_| DecodeError("negative column count".into()))?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.i32("value length")?;
                    let len = usize::try_from(len).map_err(|_| DecodeError("negative value length".into()))?;
                    let bytes = self.take(len, "value")?;
                    let text = std::str::from_utf8(bytes).map_err(|_| DecodeError("a value is not UTF-8".into()))?;
                    Datum::Text(text.to_owned())
                }
                other => return Err(DecodeError(format!("unknown column kind {:?}", char::from(other)))),
            });
        }
        Ok(values)
    }
}

/// Decodes one pgoutput message (the payload of an XLogData frame).
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf };
    let tag = r.u8("message type")?;
    Ok(match tag {
        b'B' => {
            let _final_lsn = r.u64("begin")?;
            let commit_time = r.u64("begin")? as i64;
            let xid = r.u32("begin")?;
            Message::Begin { commit_time, xid }
        }
        b'C' => {
            let _flags = r.u8("commit")?;
            let _commit_lsn = r.u64("commit")?;
            let end_lsn = r.u64("commit")?;
            Message::Commit { end_lsn }
        }
        b'O' => {
            let _lsn = r.u64("origin")?;
            Message::Origin(r.cstr("origin name")?)
        }
        b'R' => {
            let id = r.u32("relation")?;
            let schema = r.cstr("schema")?;
            let name = r.cstr("table name")?;
            let _identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            let n = usize::try_from(n).map_err(|_| DecodeError("negative column count".into()))?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let _flags = r.u8("column flags")?;
                let name = r.cstr("column name")?;
                let type_oid = r.u32("column type")?;
                let _typmod = r.i32("column type modifier")?;
                columns.push(RelColumn { name, type_oid });
            }
            Message::Relation(Relation { id, schema, name, columns })
        }
        b'I' => {
            let rel = r.u32("insert")?;
            match r.u8("insert")? {
                b'N' => Message::Insert { rel, new: r.tuple()? },
                other => return Err(DecodeError(format!("insert without a new row ({:?})", char::from(other)))),
            }
        }
        b'U' => {
            let rel = r.u32("update")?;
            let mut old = None;
            let mut kind = r.u8("update")?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8("update")?;
            }
            if kind != b'N' {
                return Err(DecodeError(format!("update without a new row ({:?})", char::from(kind))));
            }
            Message::Update { rel, old, new: r.tuple()? }
        }
        b'D' => {
            let rel = r.u32("delete")?;
            match r.u8("delete")? {
                b'K' | b'O' => Message::Delete { rel, old: r.tuple()? },
                other => return Err(DecodeError(format!("delete without the old row ({:?})", char::from(other)))),
            }
        }
        b'M' => {
            let _flags = r.u8("message")?;
            let _lsn = r.u64("message")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.i32("message length")?;
            let len = usize::try_from(len).map_err(|_| DecodeError("negative message length".into()))?;
            let content = r.take(len, "message content")?.to_vec();
            Message::Note { prefix, content }
        }
        other => Message::Other(other),
    })
}

// Type OIDs of the built-in types whose JSON is not a string (`pg_type.dat`).
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const DATE: u32 = 1082;
const TIME: u32 = 1083;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const TIMETZ: u32 = 1266;
const NUMERIC: u32 = 1700;
const JSONB: u32 = 3802;

/// The element type of the built-in array types, by the array type's OID.
fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => BOOL,
        1005 => INT2,
        1007 => INT4,
        1016 => INT8,
        1028 => OID,
        199 => JSON,
        1021 => FLOAT4,
        1022 => FLOAT8,
        1182 => DATE,
        1183 => TIME,
        1115 => TIMESTAMP,
        1185 => TIMESTAMPTZ,
        1270 => TIMETZ,
        1231 => NUMERIC,
        3807 => JSONB,
        // text, varchar, bpchar, name, uuid, bytea, inet, cidr, interval: strings
        1009 | 1015 | 1014 | 1003 | 2951 | 1001 | 1041 | 651 | 1187 => 25,
        _ => return None,
    })
}

/// The JSON of one value of type `type_oid`, as `row_to_json` writes it: numbers, booleans and
/// JSON as themselves, date/time values in ISO 8601 with a `T`, arrays of built-in types as
/// JSON arrays, anything else as its text. The walsender's session runs with `DateStyle = ISO`
/// and `TimeZone = UTC` (see the stream's start-up), which the date/time rewrite relies on.
pub fn to_json(type_oid: u32, text: &str) -> Value {
    match type_oid {
        BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.to_owned()),
        },
        // the usual key: an integer read as one, without the number parser
        INT2 | INT4 | INT8 | OID if let Ok(n) = text.parse::<i64>() => Value::from(n),
        INT2 | INT4 | INT8 | OID | FLOAT4 | FLOAT8 | NUMERIC => match text.parse::<Number>() {
            // NaN and Infinity are not JSON numbers: row_to_json writes them as strings
            Ok(n) => Value::Number(n),
            Err(_) => Value::String(text.to_owned()),
        },
        JSON | JSONB => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned())),
        TIMESTAMP | TIMESTAMPTZ => Value::String(iso_timestamp(text)),
        TIME | TIMETZ => Value::String(with_colon_offset(text)),
        _ => match array_element(type_oid) {
            Some(element) => parse_array(text, element).unwrap_or_else(|| Value::String(text.to_owned())),
            None => Value::String(text.to_owned()),
        },
    }
}

/// `2026-12-02 10:14:20.5+00` → `2026-12-02T10:14:20.5+00:00`; `infinity` stays.
fn iso_timestamp(text: &str) -> String {
    match text.split_once(' ') {
        Some((date, time)) if !time.ends_with("BC") => {
            let mut iso = String::with_capacity(text.len() + 3);
            iso.push_str(date);
            iso.push('T');
            push_time(&mut iso, time);
            iso
        }
        _ => text.to_owned(),
    }
}

/// A time's `+HH` offset written as `+HH:MM`, as JSON (XSD) wants it.
fn with_colon_offset(time: &str) -> String {
    let mut iso = String::with_capacity(time.len() + 3);
    push_time(&mut iso, time);
    iso
}

fn push_time(out: &mut String, time: &str) {
    out.push_str(time);
    if hours_only_offset(time) {
        out.push_str(":00");
    }
}

/// Whether the time ends in an offset of whole hours written without minutes (`+05`).
fn hours_only_offset(time: &str) -> bool {
    let Some(sign) = time.rfind(['+', '-']) else { return false };
    let offset = &time[sign + 1..];
    offset.len() == 2 && offset.bytes().all(|b| b.is_ascii_digit())
}

/// A PostgreSQL array literal (`{1,2,NULL}`, `{{1,2},{3,4}}`, `{"a b",c}`) of `element` values;
/// `None` when the text is not one (a lower bound decoration such as `[0:1]={…}`, say).
fn parse_array(text: &str, element: u32) -> Option<Value> {
    let mut chars = text.char_indices().peekable();
    let value = parse_level(text, &mut chars, element)?;
    chars.next().is_none().then_some(value)
}

fn parse_level(text: &str, chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>, element: u32) -> Option<Value> {
    if chars.next()?.1 != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek().map(|c| c.1) == Some('}') {
        chars.next();
        return Some(Value::Array(items));
    }
    loop {
        match chars.peek()?.1 {
            '{' => items.push(parse_level(text, chars, element)?),
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()?.1 {
                        '\\' => s.push(chars.next()?.1),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(to_json(element, &s));
            }
            _ => {
                let start = chars.peek()?.0;
                let mut end = start;
                while let Some(&(i, c)) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                let raw = text[start..end].trim();
                items.push(if raw.eq_ignore_ascii_case("NULL") { Value::Null } else { to_json(element, raw) });
            }
        }
        match chars.next()?.1 {
            ',' => continue,
            '}' => return Some(Value::Array(items)),
            _ => return None,
        }
    }
}

/// Takes each value the stream left out of `new` ([`Datum::Unchanged`]: an out-of-line value
/// the statement did not change) from `old`, the row before the change.
pub fn fill_unchanged(new: &mut [Datum], old: &[Datum]) {
    for (value, was) in new.iter_mut().zip(old) {
        if *value == Datum::Unchanged {
            value.clone_from(was);
        }
    }
}

/// A row as a JSON object: each column's value converted by [`to_json`]; a value the stream left
/// out ([`Datum::Unchanged`], see [`fill_unchanged`]) is left out.
pub fn row_json(rel: &Relation, tuple: &[Datum]) -> Map<String, Value> {
    let mut map = Map::with_capacity(rel.columns.len());
    for (column, datum) in rel.columns.iter().zip(tuple) {
        let value = match datum {
            Datum::Text(t) => to_json(column.type_oid, t),
            Datum::Null => Value::Null,
            Datum::Unchanged => continue,
        };
        map.insert(column.name.clone(), value);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_written_as_row_to_json_writes_them() {
        assert_eq!(to_json(BOOL, "t"), json!(true));
        assert_eq!(to_json(INT8, "9007199254740993"), serde_json::from_str::<Value>("9007199254740993").unwrap());
        assert_eq!(to_json(FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(to_json(NUMERIC, "12.50"), serde_json::from_str::<Value>("12.50").unwrap());
        assert_eq!(to_json(JSONB, r#"{"a": [1, 2]}"#), json!({"a": [1, 2]}));
        assert_eq!(to_json(TIMESTAMPTZ, "2026-12-02 10:14:20.123+00"), json!("2026-12-02T10:14:20.123+00:00"));
        assert_eq!(to_json(TIMESTAMP, "2026-12-02 10:14:20"), json!("2026-12-02T10:14:20"));
        assert_eq!(to_json(TIMESTAMPTZ, "infinity"), json!("infinity"));
        assert_eq!(to_json(TIMETZ, "10:00:00+05:30"), json!("10:00:00+05:30"));
        assert_eq!(to_json(DATE, "2026-12-02"), json!("2026-12-02"));
        assert_eq!(to_json(25, "plain text"), json!("plain text"));
        assert_eq!(to_json(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(1009, r#"{"a b","q\"x",c,"NULL"}"#), json!(["a b", "q\"x", "c", "NULL"]));
        assert_eq!(to_json(1009, "{}"), json!([]));
        assert_eq!(to_json(1007, "[0:1]={1,2}"), json!("[0:1]={1,2}"));
    }

    fn relation_message() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(16384u32.to_be_bytes());
        m.extend(b"public\0shop_order\0");
        m.push(b'f');
        m.extend(2i16.to_be_bytes());
        m.push(1);
        m.extend(b"id\0");
        m.extend(INT4.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        m.push(0);
        m.extend(b"note\0");
        m.extend(25u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        m
    }

    #[test]
    fn messages_decode_and_cut_ones_are_rejected() {
        let Message::Relation(rel) = decode(&relation_message()).unwrap() else { panic!("not a relation") };
        assert_eq!((rel.schema.as_str(), rel.name.as_str(), rel.columns.len()), ("public", "shop_order", 2));
        let mut insert = vec![b'I'];
        insert.extend(16384u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(2i16.to_be_bytes());
        insert.push(b't');
        insert.extend(1i32.to_be_bytes());
        insert.push(b'7');
        insert.push(b'u');
        let Message::Insert { rel: 16384, new } = decode(&insert).unwrap() else { panic!("not an insert") };
        let old = vec![Datum::Text("7".into()), Datum::Text("kept".into())];
        let mut filled = new.clone();
        fill_unchanged(&mut filled, &old);
        assert_eq!(Value::Object(row_json(&rel, &filled)), json!({"id": 7, "note": "kept"}));
        assert_eq!(Value::Object(row_json(&rel, &new)), json!({"id": 7}));
        for cut in 1..insert.len() {
            assert!(decode(&insert[..cut]).is_err(), "cut at {cut} decoded");
        }
        assert_eq!(decode(b"Y").unwrap(), Message::Other(b'Y'));
        assert!(decode(&[]).is_err());
    }
}
