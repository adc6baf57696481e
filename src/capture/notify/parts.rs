//! Notes sent in parts: a notify-mode row too big for one NOTIFY that cannot be read again
//! (a deleted row) travels as numbered parts, `{"sender":…,"op":…,"head":{…},"part":[i,n,"id"],
//! "data":"<base64>"}`, which [`Joiner`] puts back together into one note.
//!
//! PostgreSQL delivers a transaction's notifications together and in order, so the parts of
//! one row arrive one after the other; a row whose parts stop coming (a listener that
//! reconnected in the middle) is dropped, counted, and logged by the caller, never delivered
//! half.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::DecodeError;

/// Most bytes of rows waiting for their parts at once.
const MAX_PENDING_BYTES: usize = 64 << 20;

/// One part of a row, as decoded from its note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// What the note starts with: `{"sender":…,"op":…,"head":{…}`.
    start: String,
    /// Which part this is.
    index: u32,
    /// How many parts the row has.
    count: u32,
    /// The row's id: `<txid>.<n>`.
    id: String,
    /// This part's bytes of the row's item text.
    data: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartNote<'a> {
    #[serde(borrow)]
    sender: &'a RawValue,
    #[serde(borrow)]
    op: &'a RawValue,
    #[serde(borrow)]
    head: &'a RawValue,
    part: (u32, u32, String),
    data: &'a str,
}

impl Part {
    /// Reads a part note (`payload` holds `"part":`).
    pub fn decode(payload: &str) -> Result<Part, DecodeError> {
        let note: PartNote = serde_json::from_str(payload).map_err(|e| DecodeError::NotAnEvent(e.to_string()))?;
        let (index, count, id) = note.part;
        if count == 0 || index >= count {
            return Err(DecodeError::NotAnEvent(format!("part {index} of {count}")));
        }
        let data = base64::engine::general_purpose::STANDARD
            .decode(note.data)
            .map_err(|e| DecodeError::NotAnEvent(format!("part data: {e}")))?;
        let start = format!("{{\"sender\":{},\"op\":{},\"head\":{}", note.sender.get(), note.op.get(), note.head.get());
        Ok(Part { start, index, count, id, data })
    }
}

/// The parts of the row being put together.
#[derive(Debug)]
struct Pending {
    id: String,
    count: u32,
    /// Parts received.
    seen: u32,
    start: String,
    data: Vec<u8>,
}

/// Puts the parts of rows back together.
#[derive(Debug, Default)]
pub struct Joiner {
    pending: Option<Pending>,
}

/// What one part completed.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// The row needs more parts.
    More,
    /// The row's whole note: `{"sender":…,"op":…,"head":{…},"rows":[<item>]}`.
    Note(String),
}

impl Joiner {
    /// Adds `part`. The first element reports a row dropped because its parts stopped coming
    /// (this part belongs to another row); the second is what this part made.
    pub fn push(&mut self, part: Part) -> (Option<DecodeError>, Result<Joined, DecodeError>) {
        let mut lost = None;
        if let Some(p) = &self.pending
            && (p.id != part.id || p.count != part.count || part.index == 0)
        {
            lost = Some(DecodeError::NotAnEvent(format!(
                "row {} lost parts: {} of its {} parts came",
                p.id, p.seen, p.count
            )));
            self.pending = None;
        }
        (lost, self.add(part))
    }

    fn add(&mut self, part: Part) -> Result<Joined, DecodeError> {
        match &mut self.pending {
            None if part.index == 0 => {
                self.pending =
                    Some(Pending { id: part.id, count: part.count, seen: 1, start: part.start, data: part.data });
            }
            None => {
                return Err(DecodeError::NotAnEvent(format!(
                    "part {} of row {} without the parts before it",
                    part.index, part.id
                )));
            }
            Some(p) if p.seen != part.index => {
                let why = format!("row {}: part {} came after part {}", p.id, part.index, p.seen - 1);
                self.pending = None;
                return Err(DecodeError::NotAnEvent(why));
            }
            Some(p) => {
                if p.data.len() + part.data.len() > MAX_PENDING_BYTES {
                    self.pending = None;
                    return Err(DecodeError::NotAnEvent(format!("row {} is over {MAX_PENDING_BYTES} bytes", part.id)));
                }
                p.data.extend_from_slice(&part.data);
                p.seen += 1;
            }
        }
        match self.pending.take_if(|p| p.seen == p.count) {
            None => Ok(Joined::More),
            Some(p) => {
                let item =
                    String::from_utf8(p.data).map_err(|e| DecodeError::NotAnEvent(format!("row {}: {e}", p.id)))?;
                Ok(Joined::Note(format!("{},\"rows\":[{item}]}}", p.start)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(index: u32, count: u32, id: &str, data: &[u8]) -> String {
        format!(
            r#"{{"sender":"public.t","op":"delete","head":{{"raw":false}},"part":[{index},{count},"{id}"],"data":"{}"}}"#,
            base64::engine::general_purpose::STANDARD.encode(data)
        )
    }

    #[test]
    fn parts_in_order_make_the_row_again() {
        let mut j = Joiner::default();
        let item = r#"[{"id":1},{"id":1,"memo":"é…"},null,null]"#.as_bytes();
        let (a, b) = item.split_at(17); // inside a multi-byte character is fine: bytes are joined
        let (lost, joined) = j.push(Part::decode(&note(0, 2, "7.1", a)).unwrap());
        assert!(lost.is_none());
        assert_eq!(joined.unwrap(), Joined::More);
        let Joined::Note(whole) = j.push(Part::decode(&note(1, 2, "7.1", b)).unwrap()).1.unwrap() else {
            panic!("not joined")
        };
        assert_eq!(
            whole,
            r#"{"sender":"public.t","op":"delete","head":{"raw":false},"rows":[[{"id":1},{"id":1,"memo":"é…"},null,null]]}"#
        );
    }

    #[test]
    fn a_row_missing_a_part_is_reported_and_the_next_row_still_joins() {
        let mut j = Joiner::default();
        assert!(j.push(Part::decode(&note(0, 3, "7.1", b"[1,")).unwrap()).1.is_ok());
        // the next row starts before the first one ended: the first is reported, the next joins
        let (lost, joined) = j.push(Part::decode(&note(0, 1, "7.2", b"[2]")).unwrap());
        assert!(lost.unwrap().to_string().contains("7.1"));
        assert_eq!(
            joined.unwrap(),
            Joined::Note(r#"{"sender":"public.t","op":"delete","head":{"raw":false},"rows":[[2]]}"#.into())
        );
        let (lost, joined) = j.push(Part::decode(&note(1, 2, "7.3", b"x")).unwrap());
        assert!(lost.is_none() && joined.is_err(), "no first part");
        j.push(Part::decode(&note(0, 3, "7.5", b"[5")).unwrap()).1.unwrap();
        assert!(j.push(Part::decode(&note(2, 3, "7.5", b"]")).unwrap()).1.is_err(), "a part skipped");
        let Joined::Note(n) = j.push(Part::decode(&note(0, 1, "7.4", b"[4]")).unwrap()).1.unwrap() else { panic!() };
        assert!(n.ends_with(r#""rows":[[4]]}"#), "{n}");
    }

    #[test]
    fn bad_parts_are_rejected() {
        assert!(Part::decode(&note(2, 2, "1.1", b"x")).is_err());
        assert!(Part::decode(&note(0, 0, "1.1", b"x")).is_err());
        assert!(Part::decode(r#"{"sender":"a","op":"delete","head":{},"part":[0,1,"1.1"],"data":"!!"}"#).is_err());
    }
}
