//! Decoding of `pgoutput` messages (logical replication protocol version 1), and rows of their
//! text values as the JSON that `row_to_json` would have written (see [`super::values`]). No I/O.
//!
//! A message is untrusted only in the sense that it may be cut short or come from a newer
//! server: decoding never panics, and every rejection says what was wrong.

use serde_json::{Map, Value};

pub use super::values::Shape;

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
    /// How its values become JSON: the built-in scalar's until the catalog says more (arrays,
    /// domains, composites; see `super::types`).
    pub shape: Shape,
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
                columns.push(RelColumn { name, type_oid, shape: Shape::scalar(type_oid) });
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

/// Takes each value the stream left out of `new` ([`Datum::Unchanged`]: an out-of-line value
/// the statement did not change) from `old`, the row before the change.
pub fn fill_unchanged(new: &mut [Datum], old: &[Datum]) {
    for (value, was) in new.iter_mut().zip(old) {
        if *value == Datum::Unchanged {
            value.clone_from(was);
        }
    }
}

/// Whether two values of `column` are the same to the trigger capture, which compares columns
/// as jsonb: `1.50` and `1.5` are one number, `{"a":1,"b":2}` and `{"b": 2, "a": 1}` one object.
pub fn same_value(column: &RelColumn, a: &Datum, b: &Datum) -> bool {
    match (a, b) {
        (Datum::Text(a), Datum::Text(b)) => column.shape.same(a, b),
        _ => a == b,
    }
}

/// A row as a JSON object: each column's value converted by its [`Shape`]; a value the stream left
/// out ([`Datum::Unchanged`], see [`fill_unchanged`]) is left out.
pub fn row_json(rel: &Relation, tuple: &[Datum]) -> Map<String, Value> {
    let mut map = Map::with_capacity(rel.columns.len());
    for (column, datum) in rel.columns.iter().zip(tuple) {
        let value = match datum {
            Datum::Text(t) => column.shape.json(t),
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

    fn relation_message() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(16384u32.to_be_bytes());
        m.extend(b"public\0shop_order\0");
        m.push(b'f');
        m.extend(2i16.to_be_bytes());
        m.push(1);
        m.extend(b"id\0");
        m.extend(23u32.to_be_bytes());
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
