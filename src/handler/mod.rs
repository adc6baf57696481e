//! Handlers: what runs for an event. One file per kind, one [`Handler`] trait.
//!
//! A kind reads its options from its `[[handler]]` table ([`KindOptions::parse`]) and builds a
//! [`Handler`]. Handlers only report what happened; the dispatcher owns timeouts, retries and
//! dead letters.

pub mod exec;
pub mod log;

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{ConfigError, Section};
use crate::event::SaveEvent;

/// What a handler knows about the delivery it is running.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The handler's name.
    pub handler: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Attempts in all before the delivery is dead.
    pub max_attempts: u32,
}

/// Something that runs for each event routed to it.
#[async_trait]
pub trait Handler: Send + Sync {
    /// Handles one event. `Ok` means done; an error is retried per the handler's policy.
    async fn handle(&self, event: &SaveEvent, delivery: &Delivery) -> Result<(), HandlerError>;
}

/// Whether a failure is worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Transient ("try again later"): retried while attempts remain.
    Retry,
    /// The attempt failed; retried while attempts remain, in case the cause was passing.
    Failed,
    /// Retrying cannot help: the delivery is dead at once.
    Permanent,
}

/// A failed attempt.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    /// Whether to try again.
    pub failure: Failure,
    /// What happened, for the log and the dead-letter list.
    pub message: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl HandlerError {
    /// A transient failure.
    pub fn retry(message: impl Into<String>) -> Self {
        HandlerError { failure: Failure::Retry, message: message.into(), source: None }
    }

    /// A failed attempt.
    pub fn failed(message: impl Into<String>) -> Self {
        HandlerError { failure: Failure::Failed, message: message.into(), source: None }
    }

    /// A failure that no retry can fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError { failure: Failure::Permanent, message: message.into(), source: None }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
}

/// A handler made from an async function: the `@receiver` of Rust programs.
///
/// ```
/// use post_save::handler::{handler_fn, HandlerError};
/// let h = handler_fn(|event| async move {
///     println!("{} saved", event.sender);
///     Ok::<(), HandlerError>(())
/// });
/// # let _ = h;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(SaveEvent) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    FnHandler(f)
}

/// See [`handler_fn`].
pub struct FnHandler<F>(F);

#[async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(SaveEvent) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    async fn handle(&self, event: &SaveEvent, _delivery: &Delivery) -> Result<(), HandlerError> {
        (self.0)(event.clone()).await
    }
}

/// The kind of a configured handler with its options.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum KindOptions {
    /// `kind = "log"`.
    Log(log::LogOptions),
    /// `kind = "exec"`.
    Exec(exec::ExecOptions),
}

impl KindOptions {
    /// Reads the options of `kind` from its handler table.
    pub fn parse(kind: &str, section: &mut Section) -> Result<KindOptions, ConfigError> {
        match kind {
            "log" => log::LogOptions::parse(section).map(KindOptions::Log),
            "exec" => exec::ExecOptions::parse(section).map(KindOptions::Exec),
            other => Err(section.error("kind", &format!("unknown handler kind `{other}`; expected log or exec"))),
        }
    }

    /// The kind's name.
    pub fn name(&self) -> &'static str {
        match self {
            KindOptions::Log(_) => "log",
            KindOptions::Exec(_) => "exec",
        }
    }

    /// Where events go, for `handlers list`; never contains a secret.
    pub fn target(&self) -> String {
        match self {
            KindOptions::Log(o) => format!("log at {}", o.level),
            KindOptions::Exec(o) => o.command.first().cloned().unwrap_or_default(),
        }
    }

    /// Builds the handler.
    pub fn build(&self) -> Arc<dyn Handler> {
        match self {
            KindOptions::Log(o) => Arc::new(log::LogHandler::new(o.clone())),
            KindOptions::Exec(o) => Arc::new(exec::ExecHandler::new(o.clone())),
        }
    }
}
