//! Handlers: what runs for an event. One file per kind, one [`Handler`] trait.
//!
//! A kind reads its options from its `[[handler]]` table ([`KindOptions::parse`]) and builds a
//! [`Handler`]. Handlers only report what happened; the dispatcher owns timeouts, retries and
//! dead letters.

#[cfg(feature = "amqp")]
pub(crate) mod amqp;
#[cfg(feature = "celery")]
pub(crate) mod celery;
#[cfg(feature = "email")]
pub(crate) mod email;
pub(crate) mod exec;
pub(crate) mod log;
#[cfg(feature = "nats")]
pub(crate) mod nats;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "sql")]
pub(crate) mod sql;
#[cfg(feature = "webhook")]
pub(crate) mod webhook;

/// The kinds' items post-save's own tests use ([`crate::testing`]).
pub(crate) mod kinds {
    #[cfg(feature = "celery")]
    pub use super::celery::CeleryOptions;
    #[cfg(feature = "email")]
    pub use super::email::EmailOptions;
    #[cfg(feature = "nats")]
    pub use super::nats::MSG_ID_HEADER;
}

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
    /// When to try again, if the handler knows better than the backoff (HTTP `Retry-After`).
    /// Capped at the retry policy's `max_backoff`.
    pub retry_after: Option<std::time::Duration>,
}

impl HandlerError {
    /// A transient failure.
    pub fn retry(message: impl Into<String>) -> Self {
        HandlerError { failure: Failure::Retry, message: message.into(), source: None, retry_after: None }
    }

    /// A failed attempt.
    pub fn failed(message: impl Into<String>) -> Self {
        HandlerError { failure: Failure::Failed, message: message.into(), source: None, retry_after: None }
    }

    /// A failure that no retry can fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError { failure: Failure::Permanent, message: message.into(), source: None, retry_after: None }
    }

    /// Asks for the next attempt after `delay` instead of the policy's backoff.
    pub fn retry_after(mut self, delay: std::time::Duration) -> Self {
        self.retry_after = Some(delay);
        self
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

/// The value a handler marks its own writes with, `SELECT post_save.set_origin($1)` in the
/// transaction before it writes (a bare `set_config('post_save.origin', …)` is not believed),
/// so the saves it causes carry it in their `origin` field: `<handler>@<depth>`, where
/// depth is 1 for a write caused by an ordinary save and one more than the event's own depth
/// when the event was itself caused by a handler. The router uses it to stop loops (see
/// `max_depth` of a handler).
pub fn origin_for(handler: &str, event: &SaveEvent) -> String {
    let depth = event.origin.as_deref().and_then(parse_origin).map_or(0, |(_, d)| d);
    format!("{handler}@{}", depth + 1)
}

/// Splits an origin `<handler>@<depth>` into its parts (an origin without a depth counts as 1).
pub fn parse_origin(origin: &str) -> Option<(&str, u32)> {
    if origin.is_empty() {
        return None;
    }
    match origin.rsplit_once('@') {
        Some((name, depth)) => match depth.parse() {
            Ok(d) => Some((name, d)),
            Err(_) => Some((origin, 1)),
        },
        None => Some((origin, 1)),
    }
}

/// Declares the configured kinds: one variant per kind, each behind its cargo feature.
macro_rules! kinds {
    ($( $(#[$cfg:meta])* $variant:ident($module:ident :: $options:ident) = $name:literal ),* $(,)?) => {
        /// The kind of a configured handler with its options.
        #[derive(Debug, Clone)]
        #[non_exhaustive]
        pub enum KindOptions {
            $( $(#[$cfg])* #[doc = concat!("`kind = \"", $name, "\"`.")] $variant($module::$options), )*
        }

        /// Every kind this build knows, in the order `config check` lists them.
        pub const KINDS: &[&str] = &[$( $(#[$cfg])* $name, )*];

        /// Kinds that exist but were left out of this build (cargo feature off).
        const ALL_KINDS: &[&str] = &[$( $name, )*];

        impl KindOptions {
            /// Reads the options of `kind` from its handler table.
            pub fn parse(kind: &str, section: &mut Section) -> Result<KindOptions, ConfigError> {
                match kind {
                    $( $(#[$cfg])* $name => $module::$options::parse(section).map(KindOptions::$variant), )*
                    other if ALL_KINDS.contains(&other) => Err(section.error(
                        "kind",
                        &format!("handler kind `{other}` is not in this build (rebuild with `--features {other}`)"),
                    )),
                    other => Err(section.error(
                        "kind",
                        &format!("unknown handler kind `{other}`; expected one of: {}", KINDS.join(", ")),
                    )),
                }
            }

            /// The keys a handler of `kind` may have besides the common ones; `None` for a kind
            /// this build does not know.
            pub(crate) fn keys(kind: &str) -> Option<Vec<&'static str>> {
                match kind {
                    $( $(#[$cfg])* $name => Some($module::$options::KEYS.to_vec()), )*
                    _ => None,
                }
            }

            /// The keys of every kind in this build.
            pub(crate) fn all_keys() -> Vec<&'static str> {
                let mut keys = Vec::new();
                $( $(#[$cfg])* keys.extend_from_slice($module::$options::KEYS); )*
                keys.sort_unstable();
                keys.dedup();
                keys
            }

            /// The kind's name.
            pub fn name(&self) -> &'static str {
                match self {
                    $( $(#[$cfg])* KindOptions::$variant(_) => $name, )*
                }
            }

            /// Where events go, for `handlers list`; never contains a secret.
            pub fn target(&self) -> String {
                match self {
                    $( $(#[$cfg])* KindOptions::$variant(o) => o.target(), )*
                }
            }

            /// Builds the handler. Builds never connect anywhere: connections are opened on
            /// the first event and re-opened after a failure, so a broker that is down at start
            /// only delays delivery.
            pub fn build(&self, name: &str) -> Result<Arc<dyn Handler>, BuildError> {
                match self {
                    $( $(#[$cfg])* KindOptions::$variant(o) => o.build(name), )*
                }
            }
        }
    };
}

kinds! {
    Log(log::LogOptions) = "log",
    Exec(exec::ExecOptions) = "exec",
    #[cfg(feature = "webhook")]
    Webhook(webhook::WebhookOptions) = "webhook",
    #[cfg(feature = "sql")]
    Sql(sql::SqlOptions) = "sql",
    #[cfg(feature = "nats")]
    Nats(nats::NatsOptions) = "nats",
    #[cfg(feature = "redis")]
    Redis(redis::RedisOptions) = "redis",
    #[cfg(feature = "amqp")]
    Amqp(amqp::AmqpOptions) = "amqp",
    #[cfg(feature = "celery")]
    Celery(celery::CeleryOptions) = "celery",
    #[cfg(feature = "email")]
    Email(email::EmailOptions) = "email",
}

impl KindOptions {
    /// Gives kinds that write to PostgreSQL the daemon's connection settings, used when their
    /// options name no database.
    pub fn default_database(&mut self, pg: &crate::db::Settings) {
        #[cfg(feature = "sql")]
        if let KindOptions::Sql(o) = self {
            o.default_database(pg);
        }
        let _ = pg;
    }
}

/// A handler that could not be built from its (valid) options, for example a secret file that
/// cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("handler `{handler}`: {message}")]
pub struct BuildError {
    /// The handler's name.
    pub handler: String,
    /// What went wrong.
    pub message: String,
}

impl BuildError {
    /// An error building handler `handler`.
    pub fn new(handler: &str, message: impl Into<String>) -> Self {
        BuildError { handler: handler.to_owned(), message: message.into() }
    }
}

/// A secret named in the config: read from a file (`*_file`, e.g. a systemd credential) or an
/// environment variable (`*_env`), never written in the config itself and never logged.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Read the file, trailing newline removed.
    File(std::path::PathBuf),
    /// Read the environment variable.
    Env(String),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "file {}", p.display()),
            SecretSource::Env(v) => write!(f, "env {v}"),
        }
    }
}

impl SecretSource {
    /// Reads `<key>_file` or `<key>_env` from `section` (at most one of them).
    pub fn parse(section: &mut Section, key: &str) -> Result<Option<SecretSource>, ConfigError> {
        let file_key = format!("{key}_file");
        let env_key = format!("{key}_env");
        let file = section.take::<String>(&file_key)?;
        let env = section.take::<String>(&env_key)?;
        match (file, env) {
            (Some(_), Some(_)) => Err(section.error(&env_key, &format!("give `{file_key}` or `{env_key}`, not both"))),
            (Some(f), None) => Ok(Some(SecretSource::File(f.into()))),
            (None, Some(e)) => Ok(Some(SecretSource::Env(e))),
            (None, None) => Ok(None),
        }
    }

    /// Reads the secret. The error names where it looked, never the value.
    pub fn read(&self) -> Result<secrecy::SecretString, String> {
        match self {
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| secrecy::SecretString::from(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("cannot read secret file {}: {e}", p.display())),
            SecretSource::Env(v) => std::env::var(v)
                .map(secrecy::SecretString::from)
                .map_err(|_| format!("secret environment variable {v} is not set")),
        }
    }
}

/// `scheme://host:port/path` of a broker URL: user, password, query and fragment left out, for
/// `handlers list` and error messages.
#[cfg(any(feature = "nats", feature = "redis", feature = "amqp"))]
pub(crate) fn without_userinfo(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or(url);
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if scheme.is_empty() { format!("{host}{path}") } else { format!("{scheme}://{host}{path}") }
}

/// This machine's host name, for message ids and origins.
#[cfg(any(feature = "celery", feature = "email"))]
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}
