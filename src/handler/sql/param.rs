//! Values of an event bound to the parameters of an `sql` handler's statement.
//!
//! Every value is checked against the parameter's type here, so a value that cannot fit fails
//! with a message naming the parameter, and is then sent in PostgreSQL's text format: the server
//! parses it with the type's own input function. That is how `numeric`, `uuid`, `timestamptz`,
//! enums and every other type work without a Rust type for each.

use std::error::Error;

use serde_json::Value;
use tokio_postgres::types::{Format, IsNull, Kind, ToSql, Type, to_sql_checked};
use tokio_util::bytes::BytesMut;

/// One parameter's value in PostgreSQL's text format; `None` is NULL.
pub(super) struct TextParam(Option<String>);

impl std::fmt::Debug for TextParam {
    /// Never the value: it is the application's data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "TextParam(..)" } else { "TextParam(NULL)" })
    }
}

impl ToSql for TextParam {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }
}

/// Converts `value` for a parameter of type `ty`; the error says why it does not fit.
///
/// JSON null is NULL for every type. Integers take whole numbers (or strings holding one),
/// range-checked; floats take numbers or numeric strings; `bool` takes only true and false;
/// `json`/`jsonb` take any value; arrays take JSON lists (or a string holding an array
/// literal); every other type takes a string, a number or a boolean, as its text.
pub(super) fn bind(ty: &Type, value: &Value) -> Result<TextParam, String> {
    if value.is_null() {
        return Ok(TextParam(None));
    }
    text_of(ty, value).map(|text| TextParam(Some(text)))
}

/// The text form of a non-null `value` for type `ty`.
fn text_of(ty: &Type, value: &Value) -> Result<String, String> {
    match ty.kind() {
        Kind::Domain(base) => return text_of(base, value),
        Kind::Array(element) => return array_literal(element, value),
        _ => {}
    }
    match *ty {
        Type::BOOL => match value {
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!("{} is not true or false", describe(other))),
        },
        Type::INT2 => integer(value, i64::from(i16::MIN), i64::from(i16::MAX)),
        Type::INT4 => integer(value, i64::from(i32::MIN), i64::from(i32::MAX)),
        Type::INT8 => integer(value, i64::MIN, i64::MAX),
        Type::FLOAT4 | Type::FLOAT8 => float(value),
        Type::JSON | Type::JSONB => Ok(value.to_string()),
        _ => match value {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!(
                "{} has no text form for this type (bind it to a json or jsonb parameter, e.g. `$1::jsonb`)",
                describe(other)
            )),
        },
    }
}

/// A whole number within `min..=max`, from a number or a string holding one.
fn integer(value: &Value, min: i64, max: i64) -> Result<String, String> {
    let n = match value {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Some(i128::from(i)),
            (None, Some(u), _) => Some(i128::from(u)),
            // 3.0, 1e3: whole, and small enough to be exact.
            (None, None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => Some(f as i128),
            _ => None,
        },
        Value::String(s) => s.trim().parse::<i128>().ok(),
        _ => None,
    };
    let Some(n) = n else {
        return Err(format!("{} is not a whole number", describe(value)));
    };
    if n < i128::from(min) || n > i128::from(max) {
        return Err(format!("{n} is out of range ({min} to {max})"));
    }
    Ok(n.to_string())
}

/// A number, from a number or a string holding one (`NaN` and `Infinity` too).
fn float(value: &Value) -> Result<String, String> {
    match value {
        Value::Number(n) => Ok(n.to_string()),
        Value::String(s) if s.trim().parse::<f64>().is_ok() => Ok(s.trim().to_owned()),
        other => Err(format!("{} is not a number", describe(other))),
    }
}

/// A PostgreSQL array literal (`{"1","2"}`) of a JSON list; nested lists are dimensions. A
/// string is taken as an array literal already.
fn array_literal(element: &Type, value: &Value) -> Result<String, String> {
    let items = match value {
        Value::Array(items) => items,
        Value::String(s) => return Ok(s.clone()),
        other => return Err(format!("{} is not a list", describe(other))),
    };
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(_) if !matches!(*element, Type::JSON | Type::JSONB) => {
                out.push_str(&array_literal(element, item)?);
            }
            _ => {
                let text = text_of(element, item).map_err(|e| format!("element {}: {e}", i + 1))?;
                out.push('"');
                for c in text.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
    Ok(out)
}

/// What kind of JSON value this is, for error messages (never the value: it is the
/// application's data).
pub(super) fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The highest `$n` placeholder of `sql` (0 when there is none), outside string literals,
/// quoted identifiers, dollar-quoted bodies and comments.
pub(super) fn highest_placeholder(sql: &str) -> usize {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    let (mut i, mut highest) = (0, 0);
    while i < b.len() {
        i = match b[i] {
            b'\'' => {
                // E'…' strings escape with backslashes.
                let escapes = i > 0 && matches!(b[i - 1], b'e' | b'E') && (i < 2 || !ident(b[i - 2]));
                skip_quoted(b, i, b'\'', escapes)
            }
            b'"' => skip_quoted(b, i, b'"', false),
            b'-' if b.get(i + 1) == Some(&b'-') => b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p),
            b'/' if b.get(i + 1) == Some(&b'*') => skip_block_comment(b, i),
            b'$' if i == 0 || !ident(b[i - 1]) => {
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                if digits > 0 {
                    let n = sql[i + 1..i + 1 + digits].parse().unwrap_or(usize::MAX);
                    highest = highest.max(n);
                    i + 1 + digits
                } else {
                    skip_dollar_quoted(sql, i)
                }
            }
            _ => i + 1,
        };
    }
    highest
}

/// The index after the literal or identifier opened by the quote at `start`.
fn skip_quoted(b: &[u8], start: usize, quote: u8, escapes: bool) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if escapes && b[i] == b'\\' {
            i += 2;
        } else if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// The index after the (nestable) comment opened at `start`.
fn skip_block_comment(b: &[u8], start: usize) -> usize {
    let (mut i, mut depth) = (start + 2, 1);
    while i < b.len() {
        if b[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if b[i..].starts_with(b"*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// The index after the `$tag$…$tag$` body opened at `start`, or just past the `$` when it does
/// not open one.
fn skip_dollar_quoted(sql: &str, start: usize) -> usize {
    let rest = &sql[start + 1..];
    let tag_len = rest.bytes().take_while(|&c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80).count();
    if rest.as_bytes().get(tag_len) != Some(&b'$') || rest.as_bytes().first().is_some_and(u8::is_ascii_digit) {
        return start + 1;
    }
    let tag = &sql[start..start + tag_len + 2];
    let body = start + tag.len();
    sql[body..].find(tag).map_or(sql.len(), |p| body + p + tag.len())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn text(ty: &Type, value: Value) -> Result<Option<String>, String> {
        bind(ty, &value).map(|p| p.0)
    }

    #[test]
    fn integers_are_range_checked_and_may_come_as_strings() {
        assert_eq!(text(&Type::INT8, json!(42)).unwrap().as_deref(), Some("42"));
        assert_eq!(text(&Type::INT8, json!("9007199254740993")).unwrap().as_deref(), Some("9007199254740993"));
        assert_eq!(text(&Type::INT4, json!(3.0)).unwrap().as_deref(), Some("3"));
        assert!(text(&Type::INT2, json!(40000)).unwrap_err().contains("out of range"));
        assert!(text(&Type::INT4, json!(1.5)).unwrap_err().contains("not a whole number"));
        assert!(text(&Type::INT8, json!("book")).unwrap_err().contains("a string is not a whole number"));
        assert!(text(&Type::INT8, json!(true)).is_err());
    }

    #[test]
    fn null_is_null_for_every_type() {
        for ty in [Type::INT4, Type::BOOL, Type::JSONB, Type::TEXT, Type::NUMERIC, Type::INT4_ARRAY] {
            assert_eq!(text(&ty, Value::Null).unwrap(), None, "{ty}");
        }
    }

    #[test]
    fn floats_bools_and_json() {
        assert_eq!(text(&Type::FLOAT8, json!(1.25)).unwrap().as_deref(), Some("1.25"));
        assert_eq!(text(&Type::FLOAT4, json!("NaN")).unwrap().as_deref(), Some("NaN"));
        assert!(text(&Type::FLOAT8, json!("x")).is_err());
        assert_eq!(text(&Type::BOOL, json!(false)).unwrap().as_deref(), Some("false"));
        assert!(text(&Type::BOOL, json!("true")).unwrap_err().contains("not true or false"));
        assert_eq!(text(&Type::JSONB, json!({"a": [1, "x"]})).unwrap().as_deref(), Some(r#"{"a":[1,"x"]}"#));
        assert_eq!(text(&Type::JSON, json!("s")).unwrap().as_deref(), Some(r#""s""#));
    }

    #[test]
    fn other_types_take_their_text() {
        assert_eq!(
            text(&Type::NUMERIC, json!("12345678901234567890.5")).unwrap().as_deref(),
            Some("12345678901234567890.5")
        );
        assert_eq!(text(&Type::NUMERIC, json!(9.99)).unwrap().as_deref(), Some("9.99"));
        assert_eq!(text(&Type::TEXT, json!(7)).unwrap().as_deref(), Some("7"));
        assert_eq!(
            text(&Type::UUID, json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")).unwrap().as_deref(),
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        let e = text(&Type::TEXT, json!({"a": 1})).unwrap_err();
        assert!(e.contains("an object") && e.contains("jsonb"), "{e}");
    }

    #[test]
    fn lists_become_array_literals() {
        assert_eq!(text(&Type::INT4_ARRAY, json!([1, null, "3"])).unwrap().as_deref(), Some(r#"{"1",NULL,"3"}"#));
        assert_eq!(
            text(&Type::TEXT_ARRAY, json!(["a\"b", "c\\d", "x,y"])).unwrap().as_deref(),
            Some(r#"{"a\"b","c\\d","x,y"}"#)
        );
        assert_eq!(
            text(&Type::INT8_ARRAY, json!([[1, 2], [3, 4]])).unwrap().as_deref(),
            Some(r#"{{"1","2"},{"3","4"}}"#)
        );
        assert_eq!(
            text(&Type::JSONB_ARRAY, json!([[1], {"a": 1}])).unwrap().as_deref(),
            Some(r#"{"[1]","{\"a\":1}"}"#)
        );
        assert_eq!(text(&Type::INT4_ARRAY, json!("{1,2}")).unwrap().as_deref(), Some("{1,2}"));
        assert!(text(&Type::INT4_ARRAY, json!([1, "x"])).unwrap_err().contains("element 2"));
        assert!(text(&Type::INT4_ARRAY, json!(1)).unwrap_err().contains("not a list"));
    }

    #[test]
    fn placeholders_outside_literals_and_comments() {
        assert_eq!(highest_placeholder("UPDATE t SET n = n + 1 WHERE id = $1"), 1);
        assert_eq!(highest_placeholder("SELECT $2, $10::int, $3"), 10);
        assert_eq!(highest_placeholder("SELECT 1"), 0);
        assert_eq!(highest_placeholder("SELECT '$5', \"$6\", $1 -- $7\n /* $8 /* $9 */ */"), 1);
        assert_eq!(highest_placeholder("SELECT $$ $4 $$, $tag$ $5 $tag$, $2"), 2);
        assert_eq!(highest_placeholder(r"SELECT E'it\'s $3', $1"), 1);
        assert_eq!(highest_placeholder("SELECT 'it''s $3', $1"), 1);
        assert_eq!(highest_placeholder("SELECT a$1 FROM t WHERE x = $2"), 2);
    }
}
