//! Table names and SQL quoting.
//!
//! Identifiers reach SQL text only through [`quote_ident`] and [`quote_literal`], never by
//! concatenation.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

/// A schema-qualified table name, exactly as PostgreSQL stores it (no case folding).
///
/// Two names are equal when their `schema.table` texts are: that text is an event's `sender`,
/// all that a save's event or note says of its table, so `"a.b"."c"` and `"a"."b.c"` could not
/// be told apart by their events anyway (and a config cannot watch both). It is also what lets
/// a sender be parsed back ([`TableName::parse`]) to find its watch, whichever dot separates
/// the schema from the table.
#[derive(Debug, Clone)]
pub struct TableName {
    /// The schema; `public` when the config names none.
    pub schema: String,
    /// The table.
    pub name: String,
}

impl TableName {
    /// Builds a name from its parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName { schema: schema.into(), name: name.into() }
    }

    /// Parses `table`, `schema.table`, or SQL-quoted parts (`"Sales"."Order Items"`).
    ///
    /// Unquoted parts are taken verbatim, whitespace included, so `Sales.Order Items` names the
    /// same table; quote a part that itself contains a dot. Text that is none of these but can
    /// be a sender (`sales.eu.orders`, `public."draft`: a part with a dot, or starting with a
    /// double quote) names the table whose sender it is: it is split at its first dot, which
    /// makes a name equal to the watched one whichever dot that was.
    pub fn parse(text: &str) -> Result<TableName, String> {
        let parsed = split_parts(text).and_then(|parts| match parts.as_slice() {
            [name] => Ok(TableName::new("public", name.clone())),
            [schema, name] => Ok(TableName::new(schema.clone(), name.clone())),
            _ => Err(format!("`{text}` is not a table name; expected `schema.table`")),
        });
        parsed.or_else(|error| match text.split_once('.') {
            Some((schema, name)) if !schema.is_empty() && !name.is_empty() => Ok(TableName::new(schema, name)),
            _ => Err(error),
        })
    }

    /// The bytes of `schema.table`, the sender text, without building it.
    fn sender_bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.schema.bytes().chain([b'.']).chain(self.name.bytes())
    }

    /// Whether `sender` (an event's `sender`, `schema.table`) names this table.
    pub fn is_sender(&self, sender: &str) -> bool {
        sender.len() == self.schema.len() + 1 + self.name.len()
            && sender.starts_with(self.schema.as_str())
            && sender[self.schema.len()..].starts_with('.')
            && sender.ends_with(self.name.as_str())
    }

    /// The name quoted for SQL: `"schema"."table"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl PartialEq for TableName {
    fn eq(&self, other: &Self) -> bool {
        self.schema.len() + self.name.len() == other.schema.len() + other.name.len()
            && self.sender_bytes().eq(other.sender_bytes())
    }
}

impl Eq for TableName {}

/// Hashes the sender text byte by byte: equal texts split at different dots must hash alike,
/// whichever way a hasher treats the boundaries of its writes.
impl Hash for TableName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.sender_bytes().for_each(|b| state.write_u8(b));
    }
}

impl PartialOrd for TableName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// In the order of the sender texts, to agree with equality.
impl Ord for TableName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.sender_bytes().cmp(other.sender_bytes())
    }
}

/// `schema.table`, the event's `sender`.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

fn split_parts(text: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quote in `{text}`")),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                }
            }
            match chars.peek() {
                None | Some('.') => {}
                Some(_) => return Err(format!("unexpected text after a quoted name in `{text}`")),
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
        }
        if part.is_empty() {
            return Err(format!("empty name part in `{text}`"));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some(_) => continue,
        }
    }
}

/// Quotes an identifier for SQL text: `Order Items` → `"Order Items"`, `a"b` → `"a""b"`.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a string literal for SQL text (`standard_conforming_strings = on`, the default since
/// PostgreSQL 9.1): `it's` → `'it''s'`.
pub fn quote_literal(text: &str) -> String {
    // With a backslash, an E'' string whose backslashes are doubled (as PostgreSQL's own
    // quote_literal writes it) means the same text whatever `standard_conforming_strings` says.
    // Line breaks are escaped too, so a literal never spans lines of generated code.
    if text.contains(['\\', '\n', '\r']) {
        let escaped = text.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r").replace('\'', "''");
        format!("E'{escaped}'")
    } else {
        format!("'{}'", text.replace('\'', "''"))
    }
}

/// A `text[]` array literal (`{"a","b c"}`), for trigger arguments.
pub fn array_literal(items: &[String]) -> String {
    let quoted: Vec<String> =
        items.iter().map(|i| format!("\"{}\"", i.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("{{{}}}", quoted.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(TableName::parse("shop_order").unwrap(), TableName::new("public", "shop_order"));
        assert_eq!(TableName::parse("Sales.Order Items").unwrap(), TableName::new("Sales", "Order Items"));
        assert_eq!(TableName::parse(r#""Sales"."Order Items""#).unwrap(), TableName::new("Sales", "Order Items"));
        assert_eq!(TableName::parse(r#""a.b"."c""d""#).unwrap(), TableName::new("a.b", "c\"d"));
        assert!(TableName::parse("a.").is_err());
        assert!(TableName::parse(".a").is_err());
        assert!(TableName::parse("\"a").is_err());
        assert!(TableName::parse("").is_err());
    }

    #[test]
    fn literals_never_span_lines_and_keep_backslashes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b"), r"E'a\\b'");
        assert_eq!(quote_literal("a\nb\r'"), r"E'a\nb\r'''");
        assert!(TableName::new("a.b", "\"c\"").is_sender("a.b.\"c\""));
        assert!(!TableName::new("a", "b.c").is_sender("a.b"));
        assert!(!TableName::new("a", "b").is_sender("ab.b"));
    }

    /// A sender, `schema.table` as events carry it, parses to a name equal to its table's,
    /// however many dots and quotes its parts hold.
    #[test]
    fn parses_senders_back_to_their_table() {
        let tables = [
            TableName::new("sales.eu", "orders"),
            TableName::new("sales", "order.items"),
            TableName::new("a.b", "c.d"),
            TableName::new("public", "\"draft"),
            TableName::new("public", "it's \"x\" y"),
            TableName::new("$capture$", "x$capture$; DROP TABLE t; --"),
            TableName::new(" padded", "name\n"),
            TableName::new("雪", "🦀.é"),
        ];
        for table in &tables {
            let sender = table.to_string();
            let parsed = TableName::parse(&sender).unwrap_or_else(|e| panic!("{sender:?}: {e}"));
            assert_eq!(&parsed, table, "{sender:?}");
            assert_eq!(parsed.to_string(), sender);
        }
    }

    #[test]
    fn names_are_equal_hashed_and_ordered_by_their_sender_text() {
        use std::collections::{BTreeSet, HashSet};
        let (a, b) = (TableName::new("a.b", "c"), TableName::new("a", "b.c"));
        assert_eq!(a, b);
        assert_eq!(HashSet::from([a.clone(), b.clone()]).len(), 1);
        assert_eq!(BTreeSet::from([a.clone(), b.clone()]).len(), 1);
        assert_eq!(a.cmp(&b), Ordering::Equal);
        assert_ne!(TableName::new("a", "b"), TableName::new("a", "bc"));
        assert_ne!(TableName::new("ab", "c"), TableName::new("a", "bc"));
        assert!(TableName::new("public", "a") < TableName::new("public", "b"));
        assert!(TableName::new("a", "z") < TableName::new("b", "a"));
    }

    #[test]
    fn quotes() {
        assert_eq!(quote_ident(r#"Unit "€""#), r#""Unit ""€""""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(array_literal(&["a".into(), "b \"c\\".into()]), r#"{"a","b \"c\\"}"#);
        assert_eq!(array_literal(&[]), "{}");
        assert_eq!(TableName::new("Sales", "Order Items").quoted(), r#""Sales"."Order Items""#);
    }
}
