//! The registry: which handlers exist and which events each one receives.
//!
//! Handlers land here two ways: from `[[handler]]` entries of the config, and from Rust code
//! through [`Registry::register`] (the `@receiver` of Django).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::config::{Config, HandlerConfig, MAX_CHAIN_DEPTH, RetryPolicy, Signal};
use crate::event::{Op, SaveEvent};
use crate::expr::{EventContext, Expr};
use crate::handler::Handler;
use crate::handler::{BuildError, parse_origin};
use crate::name::TableName;

/// What a handler receives and how it is run: the part of a registration that is not code.
#[derive(Debug, Clone)]
pub struct Receiver {
    name: String,
    senders: Vec<String>,
    signal: Signal,
    created: Option<bool>,
    columns: Vec<String>,
    timeout: Duration,
    concurrency: usize,
    retry: RetryPolicy,
    filter: Option<Expr>,
    max_depth: u32,
    kind: String,
    target: String,
}

impl Receiver {
    /// A receiver of every `post_save` event, with default limits.
    pub fn new(name: impl Into<String>) -> Self {
        Receiver {
            name: name.into(),
            senders: Vec::new(),
            signal: Signal::PostSave,
            created: None,
            columns: Vec::new(),
            timeout: Duration::from_secs(30),
            concurrency: 16,
            retry: RetryPolicy::default(),
            filter: None,
            max_depth: 1,
            kind: "rust".into(),
            target: "function".into(),
        }
    }

    /// Only events of this table (`schema.table`); call again to add more.
    pub fn sender(mut self, table: &TableName) -> Self {
        self.senders.push(table.to_string());
        self
    }

    /// `post_save` (the default) or `post_delete`.
    pub fn signal(mut self, signal: Signal) -> Self {
        self.signal = signal;
        self
    }

    /// `true`: creations only; `false`: updates only.
    pub fn created(mut self, created: bool) -> Self {
        self.created = Some(created);
        self
    }

    /// Updates reach the handler only if one of these columns changed.
    pub fn columns<I: IntoIterator<Item = S>, S: Into<String>>(mut self, columns: I) -> Self {
        self.columns = columns.into_iter().map(Into::into).collect();
        self
    }

    /// Longest one attempt may run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Most attempts running at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Retry policy of failed attempts.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Only events for which this CEL expression is true (see [`Expr`]).
    pub fn filter(mut self, filter: Expr) -> Self {
        self.filter = Some(filter);
        self
    }

    /// How deep a chain of saves caused by this handler's own writes may go before they stop
    /// reaching it; 1 (the default) means it never receives a save it caused.
    pub fn max_depth(mut self, depth: u32) -> Self {
        self.max_depth = depth.clamp(1, MAX_CHAIN_DEPTH);
        self
    }

    fn from_config(h: &HandlerConfig) -> Self {
        Receiver {
            name: h.name.clone(),
            senders: h.senders.iter().map(ToString::to_string).collect(),
            signal: h.signal,
            created: h.created,
            columns: h.columns.clone(),
            timeout: h.timeout,
            concurrency: h.concurrency,
            retry: h.retry,
            filter: h.filter.clone(),
            max_depth: h.max_depth,
            kind: h.kind.name().into(),
            target: h.kind.target(),
        }
    }

    /// Whether `event` goes to this receiver.
    pub fn accepts(&self, event: &SaveEvent) -> bool {
        if event.signal != self.signal {
            return false;
        }
        if !self.senders.is_empty() && !self.senders.contains(&event.sender) {
            return false;
        }
        match (self.created, event.op) {
            (Some(true), Op::Update) | (Some(false), Op::Insert) => return false,
            _ => {}
        }
        if event.op == Op::Update && !self.columns.is_empty() {
            let changed = event.update_fields.as_deref().unwrap_or_default();
            if !changed.iter().any(|c| self.columns.contains(c)) {
                return false;
            }
        }
        if let Some((origin, depth)) = event.origin.as_deref().and_then(parse_origin) {
            // The save was caused by a handler's write: stop loops.
            if depth >= MAX_CHAIN_DEPTH || (origin == self.name && depth >= self.max_depth) {
                return false;
            }
        }
        true
    }

    /// Whether the receiver's filter lets `event` through. A filter that cannot be evaluated
    /// for this event (a missing field, a type error) is an error: the caller makes the event a
    /// dead letter of this handler, so the save never vanishes for it.
    pub(crate) fn passes(&self, ctx: Option<&EventContext>) -> Result<bool, FilterError> {
        let (Some(filter), Some(ctx)) = (&self.filter, ctx) else {
            return Ok(true);
        };
        filter.matches(ctx).map_err(FilterError)
    }

    /// Whether the receiver has a filter (an [`EventContext`] is needed to apply it).
    pub(crate) fn has_filter(&self) -> bool {
        self.filter.is_some()
    }

    /// The receiver's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The timeout of one attempt.
    pub fn attempt_timeout(&self) -> Duration {
        self.timeout
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }
}

/// One registered handler.
pub(crate) struct Route {
    pub receiver: Receiver,
    pub handler: Arc<dyn Handler>,
    pub permits: Arc<Semaphore>,
    /// Deliveries of this handler that may run at once (`permits` holds as many).
    pub concurrency: usize,
}

/// A handler's filter could not be evaluated for an event; the delivery's dead letter keeps
/// this text as its `last_error`. It shows the expression's error itself (which has no source
/// of its own), so that error is not also its source: a chain would print it twice.
#[derive(Debug, thiserror::Error)]
#[error("filter {0}")]
pub(crate) struct FilterError(crate::expr::ExprError);

/// A handler name used twice.
#[derive(Debug, thiserror::Error)]
#[error("a handler named `{0}` is already registered")]
pub struct DuplicateHandler(pub String);

/// Every handler the daemon runs.
#[derive(Default)]
pub struct Registry {
    routes: Vec<Route>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// The handlers of a config. Fails when a handler cannot be built (a secret that cannot be
    /// read); nothing connects anywhere yet.
    pub fn from_config(config: &Config) -> Result<Self, BuildError> {
        let mut registry = Registry::new();
        for h in &config.handlers {
            // Config validation already rejected duplicate names.
            let _ = registry.add(Receiver::from_config(h), h.kind.build(&h.name)?);
        }
        Ok(registry)
    }

    /// What `handlers list` shows for a config, without building the handlers (no secret is
    /// read).
    pub fn describe_config(config: &Config) -> Vec<HandlerInfo> {
        config.handlers.iter().map(|h| HandlerInfo::from(&Receiver::from_config(h))).collect()
    }

    /// Registers a handler written in Rust.
    pub fn register(&mut self, receiver: Receiver, handler: impl Handler + 'static) -> Result<(), DuplicateHandler> {
        self.add(receiver, Arc::new(handler))
    }

    fn add(&mut self, receiver: Receiver, handler: Arc<dyn Handler>) -> Result<(), DuplicateHandler> {
        if self.routes.iter().any(|r| r.receiver.name == receiver.name) {
            return Err(DuplicateHandler(receiver.name));
        }
        let permits = Arc::new(Semaphore::new(receiver.concurrency));
        let concurrency = receiver.concurrency;
        self.routes.push(Route { receiver, handler, permits, concurrency });
        Ok(())
    }

    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Indexes of the routes `event` goes to. A route whose filter fails on the event goes to
    /// `failed` with the error instead (rare: the common path allocates nothing for it).
    pub(crate) fn matching(&self, event: &SaveEvent, failed: &mut Vec<(usize, FilterError)>) -> Vec<usize> {
        let mut ctx = None;
        let mut out = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            if !r.receiver.accepts(event) {
                continue;
            }
            if r.receiver.filter.is_some() && ctx.is_none() {
                ctx = Some(EventContext::new(event));
            }
            match r.receiver.passes(ctx.as_ref()) {
                Ok(true) => out.push(i),
                Ok(false) => {}
                Err(e) => failed.push((i, e)),
            }
        }
        out
    }

    /// A description of every handler, for `handlers list`.
    pub fn describe(&self) -> Vec<HandlerInfo> {
        self.routes.iter().map(|r| HandlerInfo::from(&r.receiver)).collect()
    }
}

/// One row of `handlers list`. Field names are stable (snake_case JSON).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HandlerInfo {
    /// Handler name.
    pub name: String,
    /// `log`, `exec`, … (`rust` for functions registered in code).
    pub kind: String,
    /// Senders; empty means every watched table.
    pub senders: Vec<String>,
    /// `post_save` or `post_delete`.
    pub signal: String,
    /// `true`: creations only; `false`: updates only; `null`: both.
    pub created: Option<bool>,
    /// Changed-column filter.
    pub columns: Vec<String>,
    /// Where events go; never a secret.
    pub target: String,
    /// Attempt timeout, humantime.
    pub timeout: String,
    /// Concurrency limit.
    pub concurrency: usize,
    /// Attempts before dead.
    pub max_attempts: u32,
    /// The CEL filter, if any.
    pub filter: Option<String>,
}

impl From<&Receiver> for HandlerInfo {
    fn from(r: &Receiver) -> Self {
        HandlerInfo {
            name: r.name.clone(),
            kind: r.kind.clone(),
            senders: r.senders.clone(),
            signal: r.signal.as_str().into(),
            created: r.created,
            columns: r.columns.clone(),
            target: r.target.clone(),
            timeout: humantime::format_duration(r.timeout).to_string(),
            concurrency: r.concurrency,
            max_attempts: r.retry.attempts,
            filter: r.filter.as_ref().map(|f| f.source().to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn event(op: &str, fields: &str) -> SaveEvent {
        let created = op == "insert";
        let payload = format!(
            r#"{{"id":1,"instance":{{"id":1}},"signal":"post_save","sender":"public.t","op":"{op}","created":{created},"pk":{{"id":1}},"update_fields":{fields},"raw":false,"using":"db","txid":1,"at":"x","actor":{{"role":"r","pid":1}}}}"#
        );
        serde_json::from_str(&payload).unwrap()
    }

    #[test]
    fn filters() {
        let t = TableName::new("public", "t");
        let insert = event("insert", "null");
        let update = event("update", r#"["status"]"#);
        assert!(Receiver::new("a").accepts(&insert));
        assert!(Receiver::new("a").sender(&t).accepts(&update));
        assert!(!Receiver::new("a").sender(&TableName::new("public", "u")).accepts(&insert));
        assert!(Receiver::new("a").created(true).accepts(&insert));
        assert!(!Receiver::new("a").created(true).accepts(&update));
        assert!(!Receiver::new("a").created(false).accepts(&insert));
        assert!(Receiver::new("a").columns(["status"]).accepts(&update));
        assert!(!Receiver::new("a").columns(["quantity"]).accepts(&update));
        assert!(Receiver::new("a").columns(["quantity"]).accepts(&insert));
        assert!(!Receiver::new("a").signal(Signal::PostDelete).accepts(&insert));
    }

    #[test]
    fn a_filter_that_fails_is_reported_not_dropped() {
        let mut registry = Registry::new();
        let ok = || crate::handler::handler_fn(|_| async { Ok::<(), crate::handler::HandlerError>(()) });
        let filter = |src: &str| Expr::compile(src).unwrap();
        registry.register(Receiver::new("gone").filter(filter("instance.discount > 0")), ok()).unwrap();
        registry.register(Receiver::new("no").filter(filter("instance.id > 1")), ok()).unwrap();
        registry.register(Receiver::new("yes").filter(filter("instance.id == 1")), ok()).unwrap();
        registry.register(Receiver::new("all"), ok()).unwrap();
        let mut failed = Vec::new();
        assert_eq!(registry.matching(&event("insert", "null"), &mut failed), [2, 3]);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, 0);
        let error = failed[0].1.to_string();
        assert!(error.starts_with("filter `instance.discount > 0`: "), "{error}");
    }
}
