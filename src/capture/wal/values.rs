//! The text values of the stream written as the JSON that `row_to_json` would have written for
//! them (PostgreSQL's `json_categorize_type` and `datum_to_json`): numbers, booleans and JSON as
//! themselves, timestamps in XSD form, arrays as (nested) JSON arrays whatever their bounds,
//! composites as objects; everything else, domains looked through, as its text. No I/O: what a
//! type is comes from the catalog once (see `super::types`).

use std::sync::Arc;

use serde_json::{Map, Number, Value};

// Type OIDs of the built-in types whose JSON is not their text (`pg_type.dat`).
pub(crate) const BOOL: u32 = 16;
pub(crate) const INT8: u32 = 20;
pub(crate) const INT2: u32 = 21;
pub(crate) const INT4: u32 = 23;
pub(crate) const JSON: u32 = 114;
pub(crate) const FLOAT4: u32 = 700;
pub(crate) const FLOAT8: u32 = 701;
pub(crate) const TIMESTAMP: u32 = 1114;
pub(crate) const TIMESTAMPTZ: u32 = 1184;
pub(crate) const NUMERIC: u32 = 1700;
pub(crate) const JSONB: u32 = 3802;

/// How one type's text becomes JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// `t` or `f`.
    Bool,
    /// A JSON number; NaN and the infinities are not JSON numbers, so they stay strings.
    Number,
    /// `json` and `jsonb`: the JSON itself.
    Json,
    /// `timestamp` and `timestamptz`: ISO text rewritten in XSD form, as `row_to_json` writes it.
    Timestamp,
    /// Anything else (`date`, `time`, `timetz`, enums, ranges, `oid`, …): its text.
    Text,
    /// An array of `element`s separated by `delimiter` (`;` for `box`, `,` otherwise).
    Array {
        /// The elements' shape.
        element: Arc<Shape>,
        /// What separates elements in the array's text.
        delimiter: char,
    },
    /// A composite: its attributes' names and shapes, in order, without dropped ones.
    Composite(Arc<[(String, Shape)]>),
}

impl Shape {
    /// The shape of a built-in type that is neither an array nor a composite.
    pub fn scalar(type_oid: u32) -> Shape {
        match type_oid {
            BOOL => Shape::Bool,
            INT2 | INT4 | INT8 | FLOAT4 | FLOAT8 | NUMERIC => Shape::Number,
            JSON | JSONB => Shape::Json,
            TIMESTAMP | TIMESTAMPTZ => Shape::Timestamp,
            _ => Shape::Text,
        }
    }

    /// The JSON of one value's text. The walsender's session runs with `DateStyle = ISO` and
    /// `TimeZone = UTC` (see the stream's start-up), which the timestamp rewrite relies on.
    /// Text that does not parse as the shape says (a composite altered since its attributes
    /// were read, say) stays a string: the value is never lost.
    pub fn json(&self, text: &str) -> Value {
        let parsed = match self {
            Shape::Bool => match text {
                "t" => Some(Value::Bool(true)),
                "f" => Some(Value::Bool(false)),
                _ => None,
            },
            Shape::Number => number(text),
            Shape::Json => serde_json::from_str(text).ok(),
            Shape::Timestamp => Some(Value::String(xsd_timestamp(text))),
            Shape::Text => None,
            Shape::Array { element, delimiter } => parse_array(text, element, *delimiter),
            Shape::Composite(fields) => parse_composite(text, fields),
        };
        parsed.unwrap_or_else(|| Value::String(text.to_owned()))
    }
}

impl Shape {
    /// Whether two texts of this type are one value to jsonb's equality, which the trigger
    /// capture's `update_fields` uses: numbers by value (`1.50` = `1.5`, `-0` = `0`), JSON
    /// objects whatever their key order, spacing and duplicate keys; the same goes inside arrays
    /// and composites. Other values are equal when their text is.
    pub fn same(&self, a: &str, b: &str) -> bool {
        a == b
            || (matches!(self, Shape::Number | Shape::Json | Shape::Array { .. } | Shape::Composite(_))
                && jsonb_equal(&self.json(a), &self.json(b)))
    }
}

fn jsonb_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => decimal(x.as_str()) == decimal(y.as_str()),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| jsonb_equal(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(key, v)| y.get(key).is_some_and(|w| jsonb_equal(v, w)))
        }
        _ => a == b,
    }
}

/// A JSON number's value: its sign, its significant digits and the power of ten of the last
/// one (`1.50` → `(false, "15", -1)`); every zero is `(false, "", 0)`.
fn decimal(text: &str) -> (bool, String, i64) {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(unsigned) => (true, unsigned),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], unsigned[i + 1..].parse::<i64>().unwrap_or(0)),
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let significant = digits.trim_end_matches('0');
    if significant.is_empty() {
        return (false, String::new(), 0);
    }
    let power = exponent - frac.len() as i64 + (digits.len() - significant.len()) as i64;
    (negative, significant.to_owned(), power)
}

/// A number as JSON; `None` for `NaN`, `Infinity` and `-Infinity`.
fn number(text: &str) -> Option<Value> {
    // the usual value, an integer, read without the number parser; not `-0` (a float8), whose
    // sign the integer would lose
    if text != "-0"
        && let Ok(n) = text.parse::<i64>()
    {
        return Some(Value::from(n));
    }
    text.parse::<Number>().ok().map(Value::Number)
}

/// `2026-12-02 10:14:20.5+00` → `2026-12-02T10:14:20.5+00:00`, `0044-03-15 12:00:00 BC` →
/// `0044-03-15T12:00:00 BC`; `infinity` and `-infinity` stay.
fn xsd_timestamp(text: &str) -> String {
    let (body, era) = match text.strip_suffix(" BC") {
        Some(body) => (body, " BC"),
        None => (text, ""),
    };
    let Some((date, time)) = body.split_once(' ') else { return text.to_owned() };
    // XSD writes a whole-hour offset with its minutes; ISO leaves them out
    let minutes = if hours_only_offset(time) { ":00" } else { "" };
    format!("{date}T{time}{minutes}{era}")
}

/// Whether the time ends in an offset of whole hours written without minutes (`+05`).
fn hours_only_offset(time: &str) -> bool {
    let Some(sign) = time.rfind(['+', '-']) else { return false };
    let offset = &time[sign + 1..];
    offset.len() == 2 && offset.bytes().all(|b| b.is_ascii_digit())
}

/// An array's text (`{1,2,NULL}`, `{{1,2},{3,4}}`, `{"a b",c}`, `[0:1]={1,2}`) as nested JSON
/// arrays: `row_to_json` drops the lower bounds.
fn parse_array(text: &str, element: &Shape, delimiter: char) -> Option<Value> {
    let body = if text.starts_with('[') { &text[text.find('=')? + 1..] } else { text };
    let mut chars = body.char_indices().peekable();
    let value = parse_level(body, &mut chars, element, delimiter)?;
    chars.next().is_none().then_some(value)
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

fn parse_level(text: &str, chars: &mut Chars<'_>, element: &Shape, delimiter: char) -> Option<Value> {
    if chars.next()?.1 != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek()?.1 == '}' {
        chars.next();
        return Some(Value::Array(items));
    }
    loop {
        let item = match chars.peek()?.1 {
            '{' => parse_level(text, chars, element, delimiter)?,
            '"' => element.json(&quoted_element(chars)?),
            _ => {
                let raw = unquoted_element(text, chars, delimiter)?;
                // only an unquoted NULL is one: a quoted "NULL" is the text
                if raw.eq_ignore_ascii_case("NULL") { Value::Null } else { element.json(raw) }
            }
        };
        items.push(item);
        match chars.next()?.1 {
            '}' => return Some(Value::Array(items)),
            c if c == delimiter => {}
            _ => return None,
        }
    }
}

/// A double-quoted array element, its backslash escapes undone.
fn quoted_element(chars: &mut Chars<'_>) -> Option<String> {
    chars.next();
    let mut s = String::new();
    loop {
        match chars.next()?.1 {
            '\\' => s.push(chars.next()?.1),
            '"' => return Some(s),
            c => s.push(c),
        }
    }
}

fn unquoted_element<'t>(text: &'t str, chars: &mut Chars<'_>, delimiter: char) -> Option<&'t str> {
    let start = chars.peek()?.0;
    let mut end = start;
    while let Some(&(i, c)) = chars.peek() {
        if c == delimiter || c == '}' {
            break;
        }
        end = i + c.len_utf8();
        chars.next();
    }
    Some(text[start..end].trim())
}

/// A composite's text (`(1,"a b",,"x""y")`) as an object of its attributes; `None` when the
/// number of fields is not the number of attributes.
fn parse_composite(text: &str, fields: &[(String, Shape)]) -> Option<Value> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?;
    let values = if fields.is_empty() && inner.is_empty() { Vec::new() } else { composite_fields(inner)? };
    if values.len() != fields.len() {
        return None;
    }
    let mut object = Map::with_capacity(fields.len());
    for ((name, shape), value) in fields.iter().zip(values) {
        object.insert(name.clone(), value.map_or(Value::Null, |v| shape.json(&v)));
    }
    Some(Value::Object(object))
}

/// The fields between a composite's parentheses, as `record_in` reads them: nothing at all is
/// NULL (`""` is the empty string); inside quotes `""` is a quote; a backslash escapes the next
/// character anywhere.
fn composite_fields(inner: &str) -> Option<Vec<Option<String>>> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let (mut quoted, mut in_quotes) = (false, false);
    let mut chars = inner.chars().peekable();
    loop {
        match chars.next() {
            None if in_quotes => return None,
            None => {
                fields.push((quoted || !field.is_empty()).then_some(field));
                return Some(fields);
            }
            Some('"') if in_quotes && chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            Some('"') => {
                in_quotes = !in_quotes;
                quoted = true;
            }
            Some('\\') => field.push(chars.next()?),
            Some(',') if !in_quotes => {
                fields.push((quoted || !field.is_empty()).then(|| std::mem::take(&mut field)));
                quoted = false;
            }
            Some(c) => field.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn array_of(element: Shape) -> Shape {
        Shape::Array { element: Arc::new(element), delimiter: ',' }
    }

    fn exact(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn scalars_are_written_as_row_to_json_writes_them() {
        assert_eq!(Shape::scalar(BOOL).json("t"), json!(true));
        assert_eq!(Shape::scalar(INT8).json("9007199254740993"), exact("9007199254740993"));
        assert_eq!(Shape::scalar(NUMERIC).json("12.50"), exact("12.50"));
        let forty = "1234567890123456789012345678901234567890.5";
        assert_eq!(Shape::scalar(NUMERIC).json(forty), exact(forty));
        assert_eq!(Shape::scalar(FLOAT8).json("1e+30"), exact("1e+30"));
        assert_eq!(Shape::scalar(FLOAT8).json("-0"), exact("-0"));
        for not_a_number in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(Shape::scalar(NUMERIC).json(not_a_number), json!(not_a_number));
        }
        // oid and the other integer-like types are not numbers to row_to_json
        assert_eq!(Shape::scalar(26).json("12345"), json!("12345"));
        assert_eq!(Shape::scalar(JSONB).json(r#"{"a": [1, "é"]}"#), json!({"a": [1, "é"]}));
        assert_eq!(Shape::scalar(JSON).json(r#"{"a":1,  "a":2}"#), json!({"a": 2}));
        assert_eq!(Shape::scalar(25).json("plain text"), json!("plain text"));
    }

    #[test]
    fn dates_and_times_are_written_as_row_to_json_writes_them() {
        let ts = Shape::scalar(TIMESTAMPTZ);
        assert_eq!(ts.json("2026-12-02 10:14:20.123+00"), json!("2026-12-02T10:14:20.123+00:00"));
        assert_eq!(ts.json("2026-12-02 10:14:20+05:30"), json!("2026-12-02T10:14:20+05:30"));
        assert_eq!(ts.json("0044-03-15 12:00:00+00 BC"), json!("0044-03-15T12:00:00+00:00 BC"));
        assert_eq!(ts.json("-infinity"), json!("-infinity"));
        let ts = Shape::scalar(TIMESTAMP);
        assert_eq!(ts.json("2026-12-02 10:14:20"), json!("2026-12-02T10:14:20"));
        assert_eq!(ts.json("0044-03-15 12:00:00 BC"), json!("0044-03-15T12:00:00 BC"));
        assert_eq!(ts.json("infinity"), json!("infinity"));
        // date, time and timetz are written as their text
        assert_eq!(Shape::scalar(1082).json("0044-03-15 BC"), json!("0044-03-15 BC"));
        assert_eq!(Shape::scalar(1266).json("10:11:12-03"), json!("10:11:12-03"));
    }

    #[test]
    fn arrays_become_json_arrays_whatever_their_bounds_and_elements() {
        let ints = array_of(Shape::Number);
        assert_eq!(ints.json("{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(ints.json("{{1,NULL},{3,4}}"), json!([[1, null], [3, 4]]));
        assert_eq!(ints.json("{{{1}}}"), json!([[[1]]]));
        assert_eq!(ints.json("[2:3]={1,2}"), json!([1, 2]));
        assert_eq!(ints.json("[0:1][1:1]={{1},{2}}"), json!([[1], [2]]));
        assert_eq!(ints.json("{}"), json!([]));
        let texts = array_of(Shape::Text);
        let odd = r#"{happy,"very \"odd\", {mood}","NULL","",NULL,"back\\slash"}"#;
        assert_eq!(texts.json(odd), json!(["happy", "very \"odd\", {mood}", "NULL", "", null, "back\\slash"]));
        let boxes = Shape::Array { element: Arc::new(Shape::Text), delimiter: ';' };
        assert_eq!(boxes.json("{(3,4),(1,2);(1,1),(0,0)}"), json!(["(3,4),(1,2)", "(1,1),(0,0)"]));
        assert_eq!(array_of(Shape::Number).json("{NaN,Infinity,1.5}"), json!(["NaN", "Infinity", 1.5]));
        assert_eq!(array_of(Shape::Json).json(r#"{"{\"a\": 1}","\"s\""}"#), json!([{"a": 1}, "s"]));
        // an array of a domain over int[]: its elements are arrays in quotes
        assert_eq!(array_of(ints).json(r#"{"{1,2}","{3}"}"#), json!([[1, 2], [3]]));
        assert_eq!(array_of(Shape::Number).json("{1,2"), json!("{1,2"), "not an array: its text");
    }

    #[test]
    fn values_written_differently_are_the_same_when_jsonb_says_so() {
        let numbers = array_of(Shape::Number);
        assert!(Shape::Number.same("12.50", "12.5"));
        assert!(Shape::Number.same("-0", "0"));
        assert!(Shape::Number.same("1e+30", "1000000000000000000000000000000"));
        assert!(Shape::Number.same("0.00100", "1e-3"));
        assert!(!Shape::Number.same("12.5", "1.25"));
        assert!(!Shape::Number.same("-1", "1"));
        assert!(Shape::Number.same("NaN", "NaN"));
        assert!(numbers.same("{1.50,NULL}", "{1.5,NULL}"));
        assert!(!numbers.same("{1,NULL}", "{1}"));
        assert!(Shape::Json.same(r#"{"a": 1,  "a": 2, "b": [1.50]}"#, r#"{"b":[1.5],"a":2}"#));
        assert!(!Shape::Json.same(r#"{"a": 1}"#, r#"{"a": 1, "b": null}"#));
        assert!(pair().same("(1,a,{},,[1.0])", "(1.0,a,{},,[1])"));
        assert!(!Shape::Text.same("1.50", "1.5"), "text is compared as text");
    }

    fn pair() -> Shape {
        Shape::Composite(Arc::from(vec![
            ("a".to_owned(), Shape::Number),
            ("b".to_owned(), Shape::Text),
            ("d".to_owned(), array_of(Shape::Text)),
            ("e".to_owned(), Shape::Timestamp),
            ("f".to_owned(), Shape::Json),
        ]))
    }

    #[test]
    fn composites_become_objects_of_their_attributes() {
        let text = r#"(1,"x,""y"" \\z",{sad},"2020-01-01 00:00:00+00","{""z"": ""é""}")"#;
        let want = json!({"a": 1, "b": "x,\"y\" \\z", "d": ["sad"], "e": "2020-01-01T00:00:00+00:00", "f": {"z": "é"}});
        assert_eq!(pair().json(text), want);
        assert_eq!(pair().json(r#"(,"",,,)"#), json!({"a": null, "b": "", "d": null, "e": null, "f": null}));
        let nest = Shape::Composite(Arc::from(vec![("p".to_owned(), pair()), ("q".to_owned(), array_of(pair()))]));
        let text = r#"("(1,a,{},,[1])","{""(2,b,,,)"",NULL}")"#;
        let inner = |a, b: &str, d| json!({"a": a, "b": b, "d": d, "e": null, "f": null});
        let want =
            json!({"p": {"a": 1, "b": "a", "d": [], "e": null, "f": [1]}, "q": [inner(2, "b", Value::Null), null]});
        assert_eq!(nest.json(text), want);
        assert_eq!(Shape::Composite(Arc::from(vec![])).json("()"), json!({}));
        // a composite altered since its attributes were read: its text, not a wrong object
        assert_eq!(pair().json("(1,a)"), json!("(1,a)"));
    }
}
