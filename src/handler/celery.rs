//! `kind = "celery"`: enqueue a Celery task for each event, over Celery's Redis broker (or
//! RabbitMQ, in a build with the `amqp` feature).
//!
//! The message is what `app.send_task(...)` would send: Celery message protocol v2. On Redis it
//! goes in kombu's Redis transport envelope, `LPUSH`ed onto the queue's list; on RabbitMQ it is
//! published to the default exchange with the queue as routing key, mandatory and confirmed (a
//! queue no worker has declared yet is an error, retried, not a lost task). Either way the
//! workers consuming that queue pick it up. No Python runs in the daemon; the worker needs
//! nothing special.
//!
//! ```toml
//! [[handler]]
//! name = "order-confirmation"
//! sender = "public.shop_order"
//! created = true
//! kind = "celery"
//! broker = "redis://127.0.0.1:6379/0"    # the worker's CELERY_BROKER_URL (default)
//! password_env = "REDIS_PASSWORD"        # or password_file; never in the URL
//! task = "shop.tasks.send_order_confirmation"
//! queue = "celery"                       # default
//! args = ["instance.id"]                 # CEL expressions over the event
//! kwargs = { product = "instance.product", user = "instance.user_id" }
//! ```
//!
//! The worker receives `send_order_confirmation(<id>, product=…, user=…)`.
//!
//! **Task ids are idempotency keys.** A durable event (one with a ledger id) is sent with the
//! task id `post-save:<database>:<event id>:<handler>`, the same on every attempt, so a task
//! can tell a redelivery (an attempt that timed out after the push, a daemon killed before its
//! acknowledgement) from a new event by `self.request.id`. Events of `notify` tables have no
//! ledger id and get a random UUID.
//!
//! Broker URLs: `redis://[user@]host[:port][/db]` as in Celery, `redis+unix:///path` for a
//! socket (Celery's `redis+socket://`); with the `amqp` feature also
//! `amqp://[user@]host[:port]/[vhost]` and `amqps://…` (`//` at the end is the vhost `/`, as in
//! Celery; the user defaults to `guest`, and so does the password when neither `password_env`
//! nor `password_file` is given).
//!
//! Not supported: kombu's `global_keyprefix` transport option, `rediss://` (the `redis`
//! crate's TLS feature is not in this build), priorities, countdown/ETA and result backends
//! (the handler never waits for a result; `reply_to` is empty).

use super::hostname;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use redis::IntoConnectionInfo as _;
use redis::aio::MultiplexedConnection;
use secrecy::ExposeSecret as _;
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use super::{BuildError, Delivery, Handler, HandlerError, SecretSource};
use crate::config::{ConfigError, Section};
use crate::event::SaveEvent;
use crate::expr::{EventContext, Expr};

#[cfg(feature = "amqp")]
mod amqp;

/// The broker when none is configured: Celery's own default.
pub const DEFAULT_BROKER: &str = "redis://127.0.0.1:6379/0";
/// Celery's default queue.
pub const DEFAULT_QUEUE: &str = "celery";

/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one command may wait for the broker's answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Celery's `argsrepr_maxsize` and `kwargsrepr_maxsize`.
const REPR_MAX: usize = 1024;

/// Options of a `celery` handler.
#[derive(Debug, Clone)]
pub struct CeleryOptions {
    /// The broker URL, `redis://[user@]host[:port][/db]` or (`amqp` feature) `amqp://…`; never
    /// with a password.
    pub broker: String,
    /// Where the broker password comes from (`password_env` / `password_file`).
    pub password: Option<SecretSource>,
    /// The registered task name (`@app.task(name=…)`).
    pub task: String,
    /// The queue the task goes to (the list key on Redis).
    pub queue: String,
    /// Positional arguments, one CEL expression each.
    pub args: Vec<Expr>,
    /// Keyword arguments: name → CEL expression.
    pub kwargs: Vec<(String, Expr)>,
}

impl CeleryOptions {
    /// Every key [`Self::parse`] reads: anything else in the table is an unknown key.
    pub(crate) const KEYS: &[&str] = &["broker", "password_file", "password_env", "task", "queue", "args", "kwargs"];

    /// Reads the options from the handler's table.
    pub fn parse(s: &mut Section) -> Result<Self, ConfigError> {
        let broker = s.take::<String>("broker")?.unwrap_or_else(|| DEFAULT_BROKER.to_owned());
        check_broker(&broker).map_err(|m| s.error("broker", &m))?;
        let password = SecretSource::parse(s, "password")?;
        let task: String = s.require("task")?;
        if task.trim().is_empty() {
            return Err(s.error("task", "needs the task's registered name, e.g. `shop.tasks.send_confirmation`"));
        }
        let queue = s.take::<String>("queue")?.unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
        if queue.is_empty() || queue.len() > 255 {
            return Err(s.error("queue", "must have 1 to 255 bytes"));
        }
        let args = s
            .take::<Vec<String>>("args")?
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, src)| Expr::compile(src).map_err(|e| s.error("args", &format!("argument {}: {e}", i + 1))))
            .collect::<Result<Vec<_>, _>>()?;
        let kwargs = s
            .take::<BTreeMap<String, String>>("kwargs")?
            .unwrap_or_default()
            .into_iter()
            .map(|(name, src)| match Expr::compile(&src) {
                Ok(expr) => Ok((name, expr)),
                Err(e) => Err(s.error("kwargs", &format!("`{name}`: {e}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CeleryOptions { broker, password, task, queue, args, kwargs })
    }

    /// Where events go, for `handlers list`: `<broker> task <name> queue <queue>`.
    pub fn target(&self) -> String {
        format!("{} task {} queue {}", self.broker, self.task, self.queue)
    }

    /// Builds the handler; reads the password, connects on the first event.
    pub fn build(&self, name: &str) -> Result<Arc<dyn Handler>, BuildError> {
        let password = match &self.password {
            Some(source) => Some(source.read().map_err(|m| BuildError::new(name, m))?),
            None => None,
        };
        #[cfg(feature = "amqp")]
        if amqp::is_amqp(&self.broker) {
            let broker = amqp::AmqpBroker::new(name, &self.broker, password).map_err(|m| BuildError::new(name, m))?;
            return Ok(self.handler(Broker::Amqp(broker)));
        }
        let mut info = self.broker.as_str().into_connection_info().map_err(|e| BuildError::new(name, e.to_string()))?;
        if let Some(secret) = password {
            let settings = info.redis_settings().clone().set_password(secret.expose_secret());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|e| BuildError::new(name, e.to_string()))?;
        Ok(self.handler(Broker::Redis(RedisBroker { url: self.broker.clone(), client, connection: Mutex::new(None) })))
    }

    fn handler(&self, broker: Broker) -> Arc<dyn Handler> {
        Arc::new(CeleryHandler { options: self.clone(), origin: format!("post-save@{}", hostname()), broker })
    }
}

/// Checks a broker URL: one this build can use, without a password in it.
fn check_broker(url: &str) -> Result<(), String> {
    #[cfg(feature = "amqp")]
    if amqp::is_amqp(url) {
        return amqp::check_url(url);
    }
    #[cfg(not(feature = "amqp"))]
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        return Err("an AMQP broker needs a build with the `amqp` feature; this one has Redis only".to_owned());
    }
    let parsed = redis::parse_redis_url(url)
        .ok_or_else(|| format!("`{url}` is not a Redis URL (redis://host:port/db or redis+unix:///path)"))?;
    if parsed.password().is_some() {
        return Err("put the password in `password_env` or `password_file`, not in the URL".to_owned());
    }
    url.into_connection_info().map(drop).map_err(|e| format!("invalid broker URL: {e}"))
}

/// Enqueues a Celery task per event.
struct CeleryHandler {
    options: CeleryOptions,
    origin: String,
    broker: Broker,
}

/// Where the tasks go.
enum Broker {
    Redis(RedisBroker),
    #[cfg(feature = "amqp")]
    Amqp(amqp::AmqpBroker),
}

#[async_trait]
impl Handler for CeleryHandler {
    async fn handle(&self, event: &SaveEvent, delivery: &Delivery) -> Result<(), HandlerError> {
        let task_id = task_id(event, &delivery.handler);
        let message = self.options.task_message(event, &task_id, &self.origin)?;
        match &self.broker {
            Broker::Redis(redis) => redis.send(&message, &self.options.queue).await?,
            #[cfg(feature = "amqp")]
            Broker::Amqp(amqp) => amqp.send(&message, &self.options.queue).await?,
        }
        tracing::debug!(handler = %delivery.handler, task = %self.options.task, task_id = %task_id, "celery task sent");
        Ok(())
    }
}

/// Celery's Redis broker: kombu's Redis transport.
struct RedisBroker {
    url: String,
    client: redis::Client,
    /// The open connection, shared by concurrent attempts; `None` until the first event and
    /// after a failure.
    connection: Mutex<Option<MultiplexedConnection>>,
}

impl RedisBroker {
    async fn connection(&self) -> Result<MultiplexedConnection, HandlerError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| {
            HandlerError::retry(format!("cannot connect to the celery broker {}: {e}", self.url)).with_source(e)
        })?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// `LPUSH`es the message in kombu's envelope onto the queue's list.
    async fn send(&self, message: &TaskMessage, queue: &str) -> Result<(), HandlerError> {
        let envelope = message.redis_envelope(queue).to_string();
        let mut conn = self.connection().await?;
        let pushed: Result<i64, redis::RedisError> =
            redis::cmd("LPUSH").arg(queue).arg(envelope).query_async(&mut conn).await;
        match pushed {
            Ok(_) => Ok(()),
            Err(e) => {
                // Whatever went wrong, a fresh connection costs little and may be what helps.
                *self.connection.lock().await = None;
                let transient = e.is_io_error() || e.is_timeout() || e.is_connection_dropped();
                let text = format!("cannot enqueue on the celery broker {}: {e}", self.url);
                Err(if transient { HandlerError::retry(text) } else { HandlerError::failed(text) }.with_source(e))
            }
        }
    }
}

/// The task id of `event` for handler `handler`: deterministic for a durable event (see the
/// module documentation), random otherwise.
pub fn task_id(event: &SaveEvent, handler: &str) -> String {
    match event.id {
        Some(id) => format!("post-save:{}:{id}:{handler}", event.using),
        None => uuid::Uuid::new_v4().to_string(),
    }
}

/// A Celery protocol v2 task message, before a transport wraps it.
#[derive(Debug, Clone)]
pub struct TaskMessage {
    /// The task id (also the correlation id).
    pub id: String,
    /// The protocol's headers (`task`, `id`, `argsrepr`, …).
    pub headers: Map<String, Value>,
    /// The JSON body: `[args, kwargs, embed]`.
    pub body: String,
}

impl TaskMessage {
    /// The message in kombu's Redis envelope, as a worker reads it from `queue`'s list.
    pub fn redis_envelope(&self, queue: &str) -> Value {
        json!({
            "body": base64::engine::general_purpose::STANDARD.encode(&self.body),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": self.headers,
            "properties": {
                "correlation_id": self.id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": uuid::Uuid::new_v4().to_string(),
            },
        })
    }
}

impl CeleryOptions {
    /// The task message for `event`. Fails (permanently) when an argument cannot be computed.
    pub fn task_message(&self, event: &SaveEvent, task_id: &str, origin: &str) -> Result<TaskMessage, HandlerError> {
        let ctx = EventContext::new(event);
        let eval = |what: String, expr: &Expr| {
            expr.eval(&ctx).map_err(|e| HandlerError::permanent(format!("celery {what}: {e}")).with_source(e))
        };
        let args = self
            .args
            .iter()
            .enumerate()
            .map(|(i, expr)| eval(format!("argument {}", i + 1), expr))
            .collect::<Result<Vec<_>, _>>()?;
        let mut kwargs = Map::new();
        for (name, expr) in &self.kwargs {
            kwargs.insert(name.clone(), eval(format!("keyword argument `{name}`"), expr)?);
        }
        let (args, kwargs) = (Value::Array(args), Value::Object(kwargs));
        let headers = [
            ("lang", json!("py")),
            ("task", json!(self.task)),
            ("id", json!(task_id)),
            ("shadow", Value::Null),
            ("eta", Value::Null),
            ("expires", Value::Null),
            ("group", Value::Null),
            ("group_index", Value::Null),
            ("retries", json!(0)),
            ("timelimit", json!([null, null])),
            ("root_id", json!(task_id)),
            ("parent_id", Value::Null),
            ("argsrepr", json!(py_repr_limited(&args))),
            ("kwargsrepr", json!(py_repr_limited(&kwargs))),
            ("origin", json!(origin)),
            ("ignore_result", json!(false)),
            ("replaced_task_nesting", json!(0)),
            ("stamped_headers", Value::Null),
            ("stamps", json!({})),
        ];
        let headers = headers.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let body = json!([args, kwargs, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]);
        Ok(TaskMessage { id: task_id.to_owned(), headers, body: body.to_string() })
    }
}

/// [`py_repr`] cut to Celery's `argsrepr_maxsize`, as `saferepr` does.
fn py_repr_limited(value: &Value) -> String {
    let mut text = String::new();
    py_repr(value, &mut text);
    if text.len() > REPR_MAX {
        let mut end = REPR_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// The Python `repr` of a JSON value, for the `argsrepr`/`kwargsrepr` headers that Flower and
/// the worker's log show.
fn py_repr(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => py_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_str(k, out);
                out.push_str(": ");
                py_repr(v, out);
            }
            out.push('}');
        }
    }
}

/// Python's `repr` of a `str`: single quotes unless the text has `'` and no `"`.
fn py_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repr(v: Value) -> String {
        py_repr_limited(&v)
    }

    #[test]
    fn python_repr_of_json() {
        assert_eq!(repr(json!([1, "a", null, true, false, 2.5])), "[1, 'a', None, True, False, 2.5]");
        assert_eq!(repr(json!({"product": "widget", "n": [1]})), "{'product': 'widget', 'n': [1]}");
        assert_eq!(
            repr(json!(["it's", "say \"hi\"", "both ' \"", "a\\b\nc\u{1}"])),
            r#"["it's", 'say "hi"', 'both \' "', 'a\\b\nc\x01']"#
        );
        assert_eq!(repr(json!(["é"])), "['é']");
    }

    #[test]
    fn long_reprs_are_cut() {
        let text = repr(json!(["x".repeat(5000)]));
        assert_eq!(text.len(), REPR_MAX + 3);
        assert!(text.ends_with("..."));
    }

    #[test]
    fn broker_urls_are_checked() {
        assert!(check_broker("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_broker("redis://cache.internal/3").is_ok());
        assert!(check_broker("redis+unix:///run/redis.sock").is_ok());
        assert!(check_broker("http://x").is_err());
        let e = check_broker("redis://:hunter2@127.0.0.1/0").unwrap_err();
        assert!(e.contains("password_env") && !e.contains("hunter2"), "{e}");
    }
}
