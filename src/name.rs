//! Table names and SQL quoting.
//!
//! Identifiers reach SQL text only through [`quote_ident`] and [`quote_literal`], never by
//! concatenation.

use std::fmt;

/// A schema-qualified table name, exactly as PostgreSQL stores it (no case folding).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Unquoted parts are taken verbatim, so `Sales.Order Items` names the same table; quote a
    /// part that itself contains a dot.
    pub fn parse(text: &str) -> Result<TableName, String> {
        let parts = split_parts(text)?;
        match parts.as_slice() {
            [name] => Ok(TableName::new("public", name.clone())),
            [schema, name] => Ok(TableName::new(schema.clone(), name.clone())),
            _ => Err(format!("`{text}` is not a table name; expected `schema.table`")),
        }
    }

    /// The name quoted for SQL: `"schema"."table"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
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
    let mut chars = text.trim().chars().peekable();
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
    // As PostgreSQL's own quote_literal: with a backslash, an E'' string whose backslashes are
    // doubled means the same text whatever `standard_conforming_strings` says.
    if text.contains('\\') {
        format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
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
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("a.").is_err());
        assert!(TableName::parse("\"a").is_err());
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
