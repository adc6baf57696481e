//! `[[handler]]`: the keys every handler has (senders, signal, filters, retries, chain depth);
//! its kind reads the rest.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Section, Watch};
use crate::handler::KindOptions;
use crate::name::TableName;

/// `post_save` or `post_delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// INSERT and UPDATE.
    PostSave,
    /// DELETE.
    PostDelete,
}

impl Signal {
    /// The signal's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::PostSave => "post_save",
            Signal::PostDelete => "post_delete",
        }
    }
}

/// Retries of a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last the delivery is dead.
    pub attempts: u32,
    /// Delay before the second attempt; doubles each time, with jitter.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 5, backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(300) }
    }
}

/// No handler receives a save caused by a chain of handler writes deeper than this.
pub const MAX_CHAIN_DEPTH: u32 = 16;

/// One `[[handler]]` entry.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Unique name.
    pub name: String,
    /// Senders it receives; empty: every watched table.
    pub senders: Vec<TableName>,
    /// The signal it receives.
    pub signal: Signal,
    /// `Some(true)`: creations only; `Some(false)`: updates only; `None`: both.
    pub created: Option<bool>,
    /// An UPDATE reaches it only if one of these columns changed; empty: any.
    pub columns: Vec<String>,
    /// Longest one attempt may run.
    pub timeout: Duration,
    /// Most attempts running at once for this handler.
    pub concurrency: usize,
    /// Retries.
    pub retry: RetryPolicy,
    /// Only events for which this CEL expression is true reach the handler.
    pub filter: Option<crate::expr::Expr>,
    /// How deep a chain of saves caused by this handler's own writes may go before they stop
    /// reaching it (1: never receives the saves it caused).
    pub max_depth: u32,
    /// The kind and its options.
    pub kind: KindOptions,
}

/// The keys every `[[handler]]` may have, whatever its kind.
pub(super) const HANDLER_KEYS: &[&str] = &[
    "name",
    "sender",
    "signal",
    "created",
    "columns",
    "timeout",
    "concurrency",
    "retry",
    "filter",
    "max_depth",
    "kind",
];

pub(super) fn parse_handler(s: &mut Section, watches: &[Watch]) -> Result<HandlerConfig, ConfigError> {
    // The kind's keys when the kind is known; any kind's while it is missing or misspelt, which
    // the `kind` key itself reports below.
    let kind_keys = s.peek_str("kind").and_then(KindOptions::keys).unwrap_or_else(KindOptions::all_keys);
    s.check_keys(HANDLER_KEYS.iter().chain(&kind_keys).copied().collect())?;
    let name: String = s.require("name")?;
    if name.trim().is_empty() {
        return Err(s.error("name", "a handler name cannot be empty"));
    }
    let senders = match s.take::<OneOrMany>("sender")? {
        None => Vec::new(),
        Some(list) => {
            let mut out = Vec::new();
            for raw in list.into_vec() {
                let table = TableName::parse(&raw).map_err(|m| s.error("sender", &m))?;
                if !watches.iter().any(|w| w.table == table) {
                    let msg = format!("sender `{table}` is not a watched table; add a [[watch]] for it");
                    return Err(s.error("sender", &msg));
                }
                out.push(table);
            }
            out
        }
    };
    let signal = s.take::<Signal>("signal")?.unwrap_or(Signal::PostSave);
    if signal == Signal::PostDelete {
        let deletes = |w: &&Watch| w.operations.delete;
        let ok = if senders.is_empty() {
            watches.iter().any(|w| deletes(&w))
        } else {
            senders.iter().all(|t| watches.iter().filter(deletes).any(|w| &w.table == t))
        };
        if !ok {
            return Err(s.error(
                "signal",
                "post_delete never fires: no watched sender captures \"delete\" (add it to the watch's operations)",
            ));
        }
    }
    let created = s.take::<bool>("created")?;
    if created.is_some() && signal == Signal::PostDelete {
        return Err(s.error("created", "`created` applies to post_save handlers only"));
    }
    let columns = s.take::<Vec<String>>("columns")?.unwrap_or_default();
    let timeout = s.take_duration("timeout")?.unwrap_or(Duration::from_secs(30));
    let concurrency = s.take::<usize>("concurrency")?.unwrap_or(16);
    if concurrency == 0 {
        return Err(s.error("concurrency", "must be at least 1"));
    }
    let retry = parse_retry(s)?;
    let filter = match s.take::<String>("filter")? {
        None => None,
        Some(text) => Some(crate::expr::Expr::compile(&text).map_err(|m| s.error("filter", &m))?),
    };
    let max_depth = s.take::<u32>("max_depth")?.unwrap_or(1);
    if max_depth == 0 || max_depth > MAX_CHAIN_DEPTH {
        return Err(s.error("max_depth", &format!("must be between 1 and {MAX_CHAIN_DEPTH}")));
    }
    let kind_name: String = s.require("kind")?;
    let kind = KindOptions::parse(&kind_name, s)?;
    s.finish()?;
    Ok(HandlerConfig { name, senders, signal, created, columns, timeout, concurrency, retry, filter, max_depth, kind })
}

fn parse_retry(s: &mut Section) -> Result<RetryPolicy, ConfigError> {
    let mut policy = RetryPolicy::default();
    let Some(table) = s.take::<toml::Table>("retry")? else {
        return Ok(policy);
    };
    let mut r = s.child("retry", table);
    if let Some(n) = r.take::<u32>("attempts")? {
        if n == 0 {
            return Err(r.error("attempts", "must be at least 1"));
        }
        policy.attempts = n;
    }
    if let Some(d) = r.take_duration("backoff")? {
        policy.backoff = d;
    }
    if let Some(d) = r.take_duration("max_backoff")? {
        policy.max_backoff = d;
    }
    r.finish()?;
    Ok(policy)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}
