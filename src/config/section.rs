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
    /// Every key asked for, present or not: the valid keys an unknown one is compared with.
    asked: Vec<String>,
    /// Every key the section may hold, once [`Section::check_keys`] has run.
    allowed: Option<Vec<&'static str>>,
}

impl<'a> Section<'a> {
    pub(super) fn new(src: &'a str, span: Range<usize>, path: String, table: toml::Table) -> Self {
        Section { src, span, path, table, asked: Vec::new(), allowed: None }
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
        debug_assert!(
            self.allowed.as_ref().is_none_or(|allowed| allowed.contains(&key)),
            "{}: `{key}` is read but missing from the keys declared for this table",
            self.path
        );
        if !self.asked.iter().any(|k| k == key) {
            self.asked.push(key.to_owned());
        }
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

    /// Fails on the first key (in file order) nobody took, suggesting the nearest key that was
    /// asked for.
    pub fn finish(&mut self) -> Result<(), ConfigError> {
        let asked: Vec<&str> = self.asked.iter().map(String::as_str).collect();
        match self.first_key(|_| true) {
            None => Ok(()),
            Some(key) => Err(self.error(&key, &unknown_key(&key, &asked))),
        }
    }

    /// Fails on the first key (in file order) that is not in `allowed`, before anything else is
    /// read: a misspelt key is named as such even when a required key is missing too, which is
    /// what the misspelling usually causes. Later reads of keys outside `allowed` are a bug
    /// (checked in debug builds).
    pub(crate) fn check_keys(&mut self, allowed: Vec<&'static str>) -> Result<(), ConfigError> {
        if let Some(key) = self.first_key(|k| !allowed.contains(&k)) {
            return Err(self.error(&key, &unknown_key(&key, &allowed)));
        }
        self.allowed = Some(allowed);
        Ok(())
    }

    /// The value of `key` as a string, left in place.
    pub(crate) fn peek_str(&self, key: &str) -> Option<&str> {
        self.table.get(key).and_then(toml::Value::as_str)
    }

    /// Every key asked for so far, present or not.
    #[cfg(test)]
    pub(super) fn asked(&self) -> &[String] {
        &self.asked
    }

    /// The key among those matching `wanted` that comes first in the file.
    fn first_key(&self, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let line = |k: &str| line_of_key(self.src, self.span.clone(), k).unwrap_or(usize::MAX);
        self.table.keys().filter(|k| wanted(k)).min_by_key(|k| (line(k), k.as_str())).cloned()
    }
}

/// "unknown key", with the nearest of `valid` when one is close enough to be what was meant.
fn unknown_key(key: &str, valid: &[&str]) -> String {
    match did_you_mean(key, valid.iter().copied()) {
        Some(near) => format!("unknown key; did you mean `{near}`?"),
        None => "unknown key".to_owned(),
    }
}

/// The candidate nearest to `key`, if it is within a third of its length in edits (one edit
/// for short keys): `comand` → `command`, `tabel` → `table`, never `colour` → `columns`.
pub(super) fn did_you_mean<'k>(key: &str, candidates: impl IntoIterator<Item = &'k str>) -> Option<&'k str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(key, c), c))
        .filter(|(distance, c)| *distance <= c.len().max(3) / 3)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
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
    if let Some(error) = line.and_then(|l| field_error(src, l, e.message().trim())) {
        return error;
    }
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

/// Keys an earlier release took, and why they went: a config that still sets one is told so.
const REMOVED: &[(&str, &str)] =
    &[("wal_read_pause", "the WAL reader reads the stream as it comes, and no measured case needed it paced")];

/// serde's unknown- and missing-field errors (from `[database]`, `[daemon]`, `[[watch]]` and the
/// top level) in the words the rest of the configuration uses: the key's path, and for an
/// unknown key the nearest valid one. serde's messages are `` unknown field `x`, expected one of
/// `a`, `b` `` (or `` expected `a` ``) and `` missing field `x` ``.
fn field_error(src: &str, line: usize, message: &str) -> Option<ConfigError> {
    let (name, message) = if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, expected) = rest.split_once('`')?;
        let valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let message = if let Some((_, why)) = REMOVED.iter().find(|(key, _)| *key == name) {
            format!("removed: {why}; delete this line")
        } else if valid.is_empty() || did_you_mean(name, valid.iter().copied()).is_some() {
            unknown_key(name, &valid)
        } else {
            let list: Vec<String> = valid.iter().map(|v| format!("`{v}`")).collect();
            format!("unknown key; expected one of {}", list.join(", "))
        };
        (name, message)
    } else {
        let rest = message.strip_prefix("missing field `")?;
        (rest.split_once('`')?.0, "missing required key".to_owned())
    };
    // An unknown table (`[deamon]`, `[[handlers]]`) is reported on its own header line.
    let key = match table_path(src, line) {
        Some(table) if table != name && !table.starts_with(&format!("{name}[")) => format!("{table}.{name}"),
        _ => name.to_owned(),
    };
    Some(ConfigError { file: None, line: Some(line), key: Some(key), message })
}
