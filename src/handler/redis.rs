//! `kind = "redis"`: append each event to a Redis stream, publish it on a channel, or push it
//! onto a list.
//!
//! ```toml
//! [[handler]]
//! name = "orders-to-redis"
//! sender = "public.shop_order"
//! kind = "redis"
//! url = "redis://127.0.0.1:6379/0"        # the default (plain TCP; `rediss://` TLS is not in this build)
//! command = "xadd"                        # the default; or "publish", "lpush"
//! key = "post_save:{{ sender }}"          # stream, channel or list name: a template
//! maxlen = 100000                         # XADD only: trim the stream to about this length
//! password_env = "REDIS_PASSWORD"         # or password_file = "/run/credentials/post-save/redis"
//! # body = "{{ instance | tojson }}"      # the default body is the event JSON
//! ```
//!
//! `xadd` adds an entry with the fields `event` (the body), `id` (the ledger id, when the event
//! has one), `sender` and `op`; `publish` sends the body on the channel; `lpush` pushes it onto
//! the list. An attempt succeeds when Redis has answered the command. If the connection breaks
//! after Redis ran the command but before its answer arrived, the retry adds the event again:
//! consumers that must see each event once deduplicate on `id`. `publish` reaches only the
//! subscribers connected at that moment.
//!
//! The connection is opened on the first event, not at start, and re-opened after it breaks;
//! attempts that fail on a broken connection are retried by the dispatcher with its backoff.

use super::without_userinfo;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError};
use secrecy::ExposeSecret;
use tokio::sync::Mutex;

use super::{BuildError, Delivery, Handler, HandlerError, SecretSource};
use crate::config::{ConfigError, Section};
use crate::event::{Op, SaveEvent};
use crate::expr::EventContext;
use crate::template::Template;

/// The server used when `url` is not set.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// Longest wait for the server when connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for the answer to a command.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a `redis` handler does with each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisCommand {
    /// `XADD key [MAXLEN ~ n] * event … id … sender … op …`.
    Xadd,
    /// `PUBLISH key body`.
    Publish,
    /// `LPUSH key body`.
    Lpush,
}

impl RedisCommand {
    /// The command's name, as Redis spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisCommand::Xadd => "XADD",
            RedisCommand::Publish => "PUBLISH",
            RedisCommand::Lpush => "LPUSH",
        }
    }
}

/// Options of a `redis` handler.
#[derive(Clone)]
pub struct RedisOptions {
    /// Server URL; may hold a user and password.
    pub url: String,
    /// The command run per event.
    pub command: RedisCommand,
    /// The stream, channel or list, rendered per event.
    pub key: Template,
    /// `XADD` only: trim the stream to about this many entries.
    pub maxlen: Option<u64>,
    /// The body; `None`: the event JSON.
    pub body: Option<Template>,
    /// Password, overriding one in the URL.
    pub password: Option<SecretSource>,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &without_userinfo(&self.url))
            .field("command", &self.command)
            .field("key", &self.key)
            .field("maxlen", &self.maxlen)
            .field("body", &self.body)
            .field("password", &self.password)
            .finish()
    }
}

impl RedisOptions {
    /// Every key [`Self::parse`] reads: anything else in the table is an unknown key.
    pub(crate) const KEYS: &[&str] = &["url", "command", "key", "maxlen", "body", "password_file", "password_env"];

    /// Reads the options from the handler's table.
    pub fn parse(s: &mut Section) -> Result<Self, ConfigError> {
        let url = s.take::<String>("url")?.unwrap_or_else(|| DEFAULT_URL.to_owned());
        if url.as_str().into_connection_info().is_err() {
            // The parser's message may quote the URL, password included.
            let msg = format!("`{}` is not a valid Redis URL", without_userinfo(&url));
            return Err(s.error("url", &msg));
        }
        let command = match s.take::<String>("command")?.as_deref() {
            None | Some("xadd") => RedisCommand::Xadd,
            Some("publish") => RedisCommand::Publish,
            Some("lpush") => RedisCommand::Lpush,
            Some(other) => {
                return Err(s.error("command", &format!("unknown command `{other}`; expected xadd, publish or lpush")));
            }
        };
        let source: String = s.require("key")?;
        let key = compile(s, "key", &source)?;
        if source.trim().is_empty() {
            return Err(s.error("key", "a key cannot be empty"));
        }
        let maxlen = s.take::<u64>("maxlen")?;
        if maxlen.is_some() && command != RedisCommand::Xadd {
            return Err(s.error("maxlen", "`maxlen` applies to command = \"xadd\" only"));
        }
        if maxlen == Some(0) {
            return Err(s.error("maxlen", "must be at least 1"));
        }
        let body = match s.take::<String>("body")? {
            Some(text) => Some(compile(s, "body", &text)?),
            None => None,
        };
        let password = SecretSource::parse(s, "password")?;
        Ok(RedisOptions { url, command, key, maxlen, body, password })
    }

    /// Where events go, for `handlers list`: the server without its credentials.
    pub fn target(&self) -> String {
        format!("{} {} {}", without_userinfo(&self.url), self.command.as_str(), self.key.source())
    }

    /// Builds the handler. Reads the password; does not connect.
    pub fn build(&self, name: &str) -> Result<Arc<dyn Handler>, BuildError> {
        let mut info = self.url.as_str().into_connection_info().map_err(|_| {
            BuildError::new(name, format!("`{}` is not a valid Redis URL", without_userinfo(&self.url)))
        })?;
        if let Some(source) = &self.password {
            let password = source.read().map_err(|m| BuildError::new(name, m))?;
            let settings = info.redis_settings().clone().set_password(password.expose_secret());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|e| BuildError::new(name, e.to_string()))?;
        Ok(Arc::new(RedisHandler {
            name: name.to_owned(),
            options: self.clone(),
            client,
            connection: Mutex::new(None),
        }))
    }
}

fn compile(s: &Section, key: &str, source: &str) -> Result<Template, ConfigError> {
    Template::compile(source).map_err(|m| s.error(key, &m))
}

/// Runs a Redis command per event.
pub struct RedisHandler {
    name: String,
    options: RedisOptions,
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
}

impl RedisHandler {
    /// The connection, opened now if there is none. Once open, the connection manager re-opens
    /// it by itself after an I/O error.
    async fn connection(&self) -> Result<ConnectionManager, HandlerError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            // One try per attempt: the dispatcher retries with its own backoff.
            .set_number_of_retries(0)
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let connection = ConnectionManager::new_with_config(self.client.clone(), config).await.map_err(|e| {
            HandlerError::retry(format!("cannot connect to redis at {}: {e}", without_userinfo(&self.options.url)))
                .with_source(e)
        })?;
        tracing::info!(handler = %self.name, url = %without_userinfo(&self.options.url), "connected to redis");
        *slot = Some(connection.clone());
        Ok(connection)
    }

    fn command(&self, event: &SaveEvent, key: &str, body: &str) -> redis::Cmd {
        let mut cmd = redis::cmd(self.options.command.as_str());
        cmd.arg(key);
        if self.options.command != RedisCommand::Xadd {
            cmd.arg(body);
            return cmd;
        }
        if let Some(n) = self.options.maxlen {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*").arg("event").arg(body);
        if let Some(id) = event.id {
            cmd.arg("id").arg(id);
        }
        cmd.arg("sender").arg(&event.sender).arg("op").arg(op_name(event.op));
        cmd
    }

    async fn failed(&self, e: RedisError) -> HandlerError {
        let what = format!("redis {}", self.options.command.as_str());
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
            return HandlerError::retry(format!("{what}: {e}")).with_source(e);
        }
        if e.is_unrecoverable_error() {
            // For example a failed authentication: start over with a new connection.
            *self.connection.lock().await = None;
        }
        HandlerError::failed(format!("{what}: {e}")).with_source(e)
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Insert => "insert",
        Op::Update => "update",
        Op::Delete => "delete",
    }
}

fn render(template: &Template, ctx: &EventContext) -> Result<String, HandlerError> {
    // The same event renders the same way on every attempt: retrying cannot help.
    template.render(ctx).map_err(|e| HandlerError::permanent(e.to_string()).with_source(e))
}

#[async_trait]
impl Handler for RedisHandler {
    async fn handle(&self, event: &SaveEvent, _delivery: &Delivery) -> Result<(), HandlerError> {
        let ctx = EventContext::new(event);
        let key = render(&self.options.key, &ctx)?;
        let body = match &self.options.body {
            Some(body) => render(body, &ctx)?,
            None => event.to_json(),
        };
        let cmd = self.command(event, &key, &body);
        let mut connection = self.connection().await?;
        match cmd.query_async::<redis::Value>(&mut connection).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed(e).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<RedisOptions, ConfigError> {
        let doc = format!("kind = \"redis\"\n{body}");
        let mut s = Section::from_document(&doc, "handler[0]")?;
        let _ = s.take::<String>("kind")?;
        let options = RedisOptions::parse(&mut s)?;
        s.finish()?;
        Ok(options)
    }

    #[test]
    fn defaults_and_target() {
        let o = parse("key = \"post_save:{{ sender }}\"").unwrap();
        assert_eq!(o.command, RedisCommand::Xadd);
        assert_eq!(o.target(), "redis://127.0.0.1:6379 XADD post_save:{{ sender }}");
        let o = parse("url = \"redis://u:s3cret@h:1/2\"\ncommand = \"lpush\"\nkey = \"q\"").unwrap();
        assert_eq!(o.target(), "redis://h:1/2 LPUSH q");
        assert!(!format!("{o:?}").contains("s3cret"));
    }

    #[test]
    fn errors_name_their_key() {
        let key = |body: &str| parse(body).unwrap_err().key.unwrap();
        assert_eq!(key("command = \"xadd\""), "handler[0].key");
        assert_eq!(key("key = \"k\"\ncommand = \"set\""), "handler[0].command");
        assert_eq!(key("key = \"k\"\ncommand = \"publish\"\nmaxlen = 5"), "handler[0].maxlen");
        assert_eq!(key("key = \"{{ nope }}\""), "handler[0].key");
        assert_eq!(key("key = \"k\"\nurl = \"http://u:s3cret@h\""), "handler[0].url");
        assert!(!parse("key = \"k\"\nurl = \"http://u:s3cret@h\"").unwrap_err().message.contains("s3cret"));
    }

    #[test]
    fn xadd_fields() {
        let o = parse("key = \"k\"\nmaxlen = 10").unwrap();
        let h = RedisHandler {
            name: "r".into(),
            client: redis::Client::open(DEFAULT_URL).unwrap(),
            options: o,
            connection: Mutex::new(None),
        };
        let event: SaveEvent = serde_json::from_value(serde_json::json!({
            "id": 7, "signal": "post_save", "sender": "public.t", "op": "update", "created": false,
            "pk": {"id": 1}, "instance": {}, "raw": false, "using": "db", "txid": 1, "at": "x",
            "actor": {"role": "r", "pid": 1}
        }))
        .unwrap();
        let args: Vec<String> = h
            .command(&event, "k", "{}")
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<other>".into(),
            })
            .collect();
        assert_eq!(
            args,
            ["XADD", "k", "MAXLEN", "~", "10", "*", "event", "{}", "id", "7", "sender", "public.t", "op", "update"]
        );
    }
}
