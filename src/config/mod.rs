//! The configuration file: database, daemon tuning, watched tables and handlers.
//!
//! One TOML file. Unknown keys are errors, named with the nearest valid key when one is close
//! (``config.toml:12: key `handler[0].comand`: unknown key; did you mean `command`?``), and every
//! error names the file, the line and the key.

mod daemon;
mod handler;
mod section;
#[cfg(test)]
mod tests;
mod watch;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use daemon::{DaemonConfig, DatabaseConfig};
use handler::parse_handler;
pub use handler::{HandlerConfig, MAX_CHAIN_DEPTH, RetryPolicy, Signal};
pub use section::Section;
use section::{error_at, toml_error};
use watch::RawWatch;
pub use watch::{Capture, InsertCapture, Mode, Operations, Watch};

use crate::name::TableName;

/// A configuration that could not be read or is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when the configuration came from one.
    pub file: Option<PathBuf>,
    /// The 1-based line the problem is on, when known.
    pub line: Option<usize>,
    /// The key at fault, as a path (`handler[2].command`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}", file.display())?,
            None => f.write_str("config")?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The whole configuration, validated.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Where to connect.
    pub database: DatabaseConfig,
    /// Daemon tuning.
    pub daemon: DaemonConfig,
    /// Watched tables, in file order.
    pub watches: Vec<Watch>,
    /// Handlers declared in the file, in file order.
    pub handlers: Vec<HandlerConfig>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let mut watches = Vec::with_capacity(raw.watch.len());
        for (i, w) in raw.watch.into_iter().enumerate() {
            let span = w.span();
            let key = format!("watch[{i}]");
            let watch = w.into_inner().validate(text, span.clone(), &key)?;
            if watches.iter().any(|o: &Watch| o.table == watch.table) {
                return Err(error_at(text, span, &key, "table", "table is watched twice"));
            }
            watches.push(watch);
        }
        let mut handlers: Vec<HandlerConfig> = Vec::with_capacity(raw.handler.len());
        for (i, h) in raw.handler.into_iter().enumerate() {
            let span = h.span();
            let mut section = Section::new(text, span.clone(), format!("handler[{i}]"), h.into_inner());
            let handler = parse_handler(&mut section, &watches)?;
            if handlers.iter().any(|o| o.name == handler.name) {
                return Err(section.error("name", "two handlers have this name"));
            }
            handlers.push(handler);
        }
        Ok(Config { database: raw.database, daemon: raw.daemon, watches, handlers })
    }

    /// The watch of `table`, if it is watched.
    pub fn watch(&self, table: &TableName) -> Option<&Watch> {
        self.watches.iter().find(|w| &w.table == table)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    database: DatabaseConfig,
    #[serde(default)]
    daemon: DaemonConfig,
    #[serde(default)]
    watch: Vec<Spanned<RawWatch>>,
    #[serde(default)]
    handler: Vec<Spanned<toml::Table>>,
}

#[cfg(test)]
mod example {
    #[test]
    fn the_example_config_parses_and_sets_every_key() {
        let text = include_str!("../../config.example.toml");
        let c = super::Config::parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.watches.len(), 1);
        assert_eq!(c.handlers.len(), 2);
        assert_eq!(c.handlers[1].retry.attempts, 3);
        assert_eq!(c.database.url.as_deref(), Some("postgres://post_save@localhost/shop"));
    }
}
