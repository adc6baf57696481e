//! Taking a TOML table apart key by key, so every error names its key and line.

use std::ops::Range;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::ConfigError;

/// A TOML table being taken apart key by key, so every error can name its key and line.
///
/// Handler kinds receive one to read their own options; whatever is left when
/// [`Section::finish`] runs is an unknown key.
pub struct Section<'a> {
    src: &'a str,
    span: Range<usize>,
    path: String,
    table: toml::Table,
}

impl<'a> Section<'a> {
    pub(super) fn new(src: &'a str, span: Range<usize>, path: String, table: toml::Table) -> Self {
        Section { src, span, path, table }
    }

    /// Test helper: a section over a whole document.
    #[doc(hidden)]
    pub fn from_document(src: &'a str, path: &str) -> Result<Self, ConfigError> {
        let table: toml::Table = toml::from_str(src).map_err(|e| toml_error(src, &e))?;
        Ok(Section::new(src, 0..src.len(), path.to_owned(), table))
    }

    /// A section over a nested table `key` of this one (errors name `path.key.…`).
    pub fn child(&self, key: &str, table: toml::Table) -> Section<'a> {
        Section::new(self.src, self.span.clone(), format!("{}.{key}", self.path), table)
    }

    /// Removes and decodes an optional key.
    pub fn take<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(value) => T::deserialize(value).map(Some).map_err(|e| self.error(key, e.to_string().trim())),
        }
    }

    /// Removes and decodes a key that must be present.
    pub fn require<T: DeserializeOwned>(&mut self, key: &str) -> Result<T, ConfigError> {
        self.take(key)?.ok_or_else(|| self.error(key, "missing required key"))
    }

    /// Removes and decodes a humantime duration (`"30s"`, `"1m 30s"`).
    pub fn take_duration(&mut self, key: &str) -> Result<Option<Duration>, ConfigError> {
        match self.take::<String>(key)? {
            None => Ok(None),
            Some(text) => humantime::parse_duration(&text)
                .map(Some)
                .map_err(|e| self.error(key, &format!("invalid duration `{text}`: {e}"))),
        }
    }

    /// An error about `key` of this section, located at the key's line.
    pub fn error(&self, key: &str, message: &str) -> ConfigError {
        error_at(self.src, self.span.clone(), &self.path, key, message)
    }

    /// Fails on the first key nobody took.
    pub fn finish(&mut self) -> Result<(), ConfigError> {
        match self.table.keys().next() {
            None => Ok(()),
            Some(key) => Err(self.error(key, "unknown key")),
        }
    }
}

/// Builds an error for `path.key`, finding the key's line inside `span` of `src`.
pub(super) fn error_at(src: &str, span: Range<usize>, path: &str, key: &str, message: &str) -> ConfigError {
    ConfigError {
        file: None,
        line: line_of_key(src, span.clone(), key).or_else(|| Some(line_of(src, span.start))),
        key: Some(format!("{path}.{key}")),
        message: message.to_owned(),
    }
}

/// The 1-based line of `key = …` (or `{ key = …` in an inline table) in the table that starts
/// at `span` (an array-of-tables span covers only its header, so the search runs on to the next
/// table header).
fn line_of_key(src: &str, span: Range<usize>, key: &str) -> Option<usize> {
    let start = src[..span.start.min(src.len())].rfind('\n').map_or(0, |i| i + 1);
    let header = |line: &str| {
        let t = line.trim();
        t.starts_with('[').then(|| t.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
    };
    let own = src[start..].lines().next().and_then(header);
    let mut offset = start;
    for (n, line) in src[start..].split_inclusive('\n').enumerate() {
        if n > 0 && offset >= span.end {
            // Stop at the next table, unless it is a sub-table of this one (`[handler.retry]`).
            if let Some(name) = header(line) {
                let nested = own.as_ref().is_some_and(|own| name.starts_with(&format!("{own}.")));
                if !nested {
                    break;
                }
            }
        }
        for (idx, _) in line.match_indices(key) {
            let before = line[..idx].trim_end().chars().last();
            let after = line[idx + key.len()..].trim_start();
            let starts_key = matches!(before, None | Some('{') | Some(',') | Some('.'));
            if starts_key && (after.starts_with('=') || after.starts_with('.')) {
                return Some(line_of(src, offset));
            }
        }
        offset += line.len();
    }
    None
}

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].matches('\n').count() + 1
}

pub(super) fn toml_error(src: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_of(src, s.start));
    let key = line.and_then(|l| src.lines().nth(l - 1)).and_then(|text| {
        let (k, _) = text.split_once('=')?;
        let k = k.trim();
        (!k.is_empty() && !k.starts_with('[')).then(|| k.to_owned())
    });
    let key = match (key, line) {
        (Some(k), Some(l)) => Some(match table_path(src, l) {
            Some(table) => format!("{table}.{k}"),
            None => k,
        }),
        (k, _) => k,
    };
    ConfigError { file: None, line, key, message: e.message().trim().to_owned() }
}

/// The path of the table that line `line` belongs to: `daemon`, `watch[2]`, or none at the top.
fn table_path(src: &str, line: usize) -> Option<String> {
    let mut current: Option<String> = None;
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for text in src.lines().take(line) {
        let t = text.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split_once("]]")).map(|(n, _)| n.trim().to_owned()) {
            let n = counts.entry(name.clone()).or_insert(0);
            current = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split_once(']')).map(|(n, _)| n.trim().to_owned())
        {
            current = Some(name);
        }
    }
    current
}
