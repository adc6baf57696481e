//! The row images of an event (`instance`, `old`): JSON that reads as a [`Value`], built only
//! when something reads it.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

use super::exact_numbers;

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
    pub(super) fn captured(text: &str) -> RowImage {
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
pub(super) fn may_hold_inexact_numbers(text: &str) -> bool {
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

/// A row image as [`super::SaveEvent::to_json`] writes it: as captured when it was read from the
/// ledger and nothing in it needs rewriting, without ever decoding it. Only serde_json's
/// serializer can take captured text as it is, so only `to_json` uses this.
pub(super) struct Verbatim<'a>(pub(super) &'a RowImage);

impl Serialize for Verbatim<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let image = self.0;
        // The scan runs only when the event is written, not for every event read.
        if let (Some(raw), None) = (&image.raw, image.value.get())
            && !may_hold_inexact_numbers(raw)
            && let Ok(raw) = serde_json::from_str::<&RawValue>(raw)
        {
            return raw.serialize(s);
        }
        (**image).serialize(s)
    }
}
