//! `kind = "log"`: one structured tracing line per event.

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::{Delivery, Handler, HandlerError};
use crate::config::{ConfigError, Section};
use crate::event::{EVENT_FIELDS, SaveEvent};

const DEFAULT_FIELDS: [&str; 6] = ["id", "sender", "op", "created", "pk", "update_fields"];

/// Options of a `log` handler.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: tracing::Level,
    /// Event fields written on the line (`event` field, as JSON).
    pub fields: Vec<String>,
}

impl LogOptions {
    /// Where events go, for `handlers list`.
    pub fn target(&self) -> String {
        format!("log at {}", self.level)
    }

    /// Builds the handler.
    pub fn build(&self, _name: &str) -> Result<std::sync::Arc<dyn super::Handler>, super::BuildError> {
        Ok(std::sync::Arc::new(LogHandler::new(self.clone())))
    }

    /// Every key [`Self::parse`] reads: anything else in the table is an unknown key.
    pub(crate) const KEYS: &[&str] = &["level", "fields"];

    /// Reads the options from the handler's table.
    pub fn parse(s: &mut Section) -> Result<Self, ConfigError> {
        let level = match s.take::<String>("level")? {
            None => tracing::Level::INFO,
            Some(text) => text.parse().map_err(|_| {
                s.error("level", &format!("unknown level `{text}`; expected trace, debug, info, warn or error"))
            })?,
        };
        let fields = match s.take::<Vec<String>>("fields")? {
            None => DEFAULT_FIELDS.iter().map(|f| f.to_string()).collect(),
            Some(fields) => {
                if let Some(f) = fields.iter().find(|f| !EVENT_FIELDS.contains(&f.as_str())) {
                    return Err(s.error("fields", &format!("`{f}` is not an event field")));
                }
                fields
            }
        };
        Ok(LogOptions { level, fields })
    }
}

/// Writes each event to the log.
pub struct LogHandler {
    options: LogOptions,
}

impl LogHandler {
    /// A log handler with these options.
    pub fn new(options: LogOptions) -> Self {
        LogHandler { options }
    }
}

#[async_trait]
impl Handler for LogHandler {
    async fn handle(&self, event: &SaveEvent, delivery: &Delivery) -> Result<(), HandlerError> {
        if !level_enabled(self.options.level) {
            // Filtered out (RUST_LOG): nothing to build.
            return Ok(());
        }
        let Ok(Value::Object(all)) = serde_json::to_value(event) else {
            return Err(HandlerError::permanent("event does not serialize"));
        };
        let chosen: Map<String, Value> =
            self.options.fields.iter().filter_map(|f| all.get(f).map(|v| (f.clone(), v.clone()))).collect();
        let fields = Value::Object(chosen).to_string();
        let handler = delivery.handler.as_str();
        let sender = event.sender.as_str();
        match self.options.level {
            tracing::Level::TRACE => tracing::trace!(handler, sender, event = %fields, "save event"),
            tracing::Level::DEBUG => tracing::debug!(handler, sender, event = %fields, "save event"),
            tracing::Level::INFO => tracing::info!(handler, sender, event = %fields, "save event"),
            tracing::Level::WARN => tracing::warn!(handler, sender, event = %fields, "save event"),
            tracing::Level::ERROR => tracing::error!(handler, sender, event = %fields, "save event"),
        }
        Ok(())
    }
}

fn level_enabled(level: tracing::Level) -> bool {
    match level {
        tracing::Level::TRACE => tracing::enabled!(tracing::Level::TRACE),
        tracing::Level::DEBUG => tracing::enabled!(tracing::Level::DEBUG),
        tracing::Level::INFO => tracing::enabled!(tracing::Level::INFO),
        tracing::Level::WARN => tracing::enabled!(tracing::Level::WARN),
        tracing::Level::ERROR => tracing::enabled!(tracing::Level::ERROR),
    }
}
