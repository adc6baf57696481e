//! `kind = "amqp"`: publish each event to an AMQP 0-9-1 exchange (RabbitMQ).
//!
//! ```toml
//! [[handler]]
//! name = "orders-to-rabbitmq"
//! sender = "public.shop_order"
//! kind = "amqp"
//! url = "amqp://app@127.0.0.1:5672/%2f"   # the default is amqp://guest:guest@127.0.0.1:5672/%2f
//! password_env = "AMQP_PASSWORD"          # or password_file = "/run/credentials/post-save/amqp"
//! exchange = "shop"                       # "" is the default exchange (routing key = queue name)
//! routing_key = "{{ sender }}.{{ op }}"   # a template over the event
//! declare = true                          # declare the exchange (durable, topic) on connect
//! mandatory = true                        # the default: a message no queue takes is an error
//! # body = "{{ instance | tojson }}"      # the default body is the event JSON
//! ```
//!
//! Messages are persistent (`delivery_mode = 2`), `content_type = application/json`, with the
//! ledger id as `message_id`. The channel is in confirm mode: an attempt succeeds when the
//! broker has confirmed the message; a negative confirm is retried. With `mandatory` (the
//! default) a message that no queue is bound to take comes back from the broker and fails the
//! attempt, instead of vanishing. A message whose confirm was lost with the connection is
//! published again by the retry: consumers that must see each event once deduplicate on
//! `message_id`.
//!
//! The connection is opened on the first event, not at start, and dropped after it fails; the
//! next attempt opens a new one. The dispatcher retries failed attempts with its backoff.

use super::without_userinfo;
use std::sync::Arc;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use secrecy::ExposeSecret;
use tokio::sync::Mutex;

use super::{BuildError, Delivery, Handler, HandlerError, SecretSource};
use crate::config::{ConfigError, Section};
use crate::event::SaveEvent;
use crate::expr::EventContext;
use crate::template::Template;

/// The broker used when `url` is not set.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Longest routing key AMQP allows (a short string).
const MAX_ROUTING_KEY: usize = 255;

/// Options of an `amqp` handler.
#[derive(Clone)]
pub struct AmqpOptions {
    /// Broker URL; may hold a user and password.
    pub url: String,
    /// Password, overriding one in the URL.
    pub password: Option<SecretSource>,
    /// Exchange; `""`: the default exchange.
    pub exchange: String,
    /// Routing key, rendered per event.
    pub routing_key: Template,
    /// Declare the exchange (durable, topic) when connecting.
    pub declare: bool,
    /// A message no queue takes fails the attempt.
    pub mandatory: bool,
    /// Message body; `None`: the event JSON.
    pub body: Option<Template>,
}

impl std::fmt::Debug for AmqpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpOptions")
            .field("url", &without_userinfo(&self.url))
            .field("password", &self.password)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("declare", &self.declare)
            .field("mandatory", &self.mandatory)
            .field("body", &self.body)
            .finish()
    }
}

impl AmqpOptions {
    /// Every key [`Self::parse`] reads: anything else in the table is an unknown key.
    pub(crate) const KEYS: &[&str] =
        &["url", "password_file", "password_env", "exchange", "routing_key", "declare", "mandatory", "body"];

    /// Reads the options from the handler's table.
    pub fn parse(s: &mut Section) -> Result<Self, ConfigError> {
        let url = s.take::<String>("url")?.unwrap_or_else(|| DEFAULT_URL.to_owned());
        parse_uri(&url).map_err(|m| s.error("url", &m))?;
        let password = SecretSource::parse(s, "password")?;
        let exchange: String = s.require("exchange")?;
        if exchange.len() > MAX_ROUTING_KEY {
            return Err(s.error("exchange", "an exchange name is at most 255 bytes"));
        }
        let source: String = s.require("routing_key")?;
        let routing_key = Template::compile(&source).map_err(|m| s.error("routing_key", &m))?;
        let declare = s.take::<bool>("declare")?.unwrap_or(false);
        if declare && exchange.is_empty() {
            return Err(s.error("declare", "the default exchange (\"\") always exists and cannot be declared"));
        }
        let mandatory = s.take::<bool>("mandatory")?.unwrap_or(true);
        let body = match s.take::<String>("body")? {
            Some(text) => Some(Template::compile(&text).map_err(|m| s.error("body", &m))?),
            None => None,
        };
        Ok(AmqpOptions { url, password, exchange, routing_key, declare, mandatory, body })
    }

    /// Where events go, for `handlers list`: the broker without its credentials.
    pub fn target(&self) -> String {
        let exchange = if self.exchange.is_empty() { "\"\"" } else { &self.exchange };
        let url = without_userinfo(&self.url);
        // The default virtual host goes without saying.
        let url = url.strip_suffix("/%2f").or_else(|| url.strip_suffix("/%2F")).unwrap_or(&url);
        format!("{url} exchange {exchange} key {}", self.routing_key.source())
    }

    /// Builds the handler. Reads the password; does not connect.
    pub fn build(&self, name: &str) -> Result<Arc<dyn Handler>, BuildError> {
        let mut uri = parse_uri(&self.url).map_err(|m| BuildError::new(name, m))?;
        if let Some(source) = &self.password {
            uri.authority.userinfo.password =
                source.read().map_err(|m| BuildError::new(name, m))?.expose_secret().to_owned();
        }
        let broker = format!("amqp at {}", without_userinfo(&self.url));
        let declare = self.declare.then(|| self.exchange.clone());
        Ok(Arc::new(AmqpHandler { options: self.clone(), links: Links::new(name, uri, broker, declare) }))
    }
}

fn parse_uri(url: &str) -> Result<AMQPUri, String> {
    // The parser's message may quote the URL, password included: say only which one failed.
    url.parse::<AMQPUri>().map_err(|_| format!("`{}` is not a valid AMQP URL", without_userinfo(url)))
}

/// One connection and its confirm-mode channel.
pub(crate) struct Link {
    // Kept for its lifetime: dropping the last handle closes the connection.
    _connection: Connection,
    pub(crate) channel: Channel,
}

/// A connection to one broker with a confirm-mode channel, opened on first use and again after
/// it broke. Shared by the `amqp` handler and Celery over RabbitMQ.
pub(crate) struct Links {
    /// The connection's name at the broker: `post-save <handler>`.
    connection_name: String,
    uri: AMQPUri,
    /// How messages name the broker ("amqp at host:5672", "the celery broker amqp://…").
    broker: String,
    /// An exchange to declare (durable, topic) on every new connection before it is used.
    declare: Option<String>,
    slot: Mutex<Option<Arc<Link>>>,
}

impl Links {
    /// Links for handler `handler` to the broker at `uri`; does not connect.
    pub(crate) fn new(handler: &str, uri: AMQPUri, broker: String, declare: Option<String>) -> Links {
        Links { connection_name: format!("post-save {handler}"), uri, broker, declare, slot: Mutex::new(None) }
    }

    /// The open channel, connecting now if there is none or it broke.
    pub(crate) async fn get(&self) -> Result<Arc<Link>, HandlerError> {
        let mut slot = self.slot.lock().await;
        if let Some(link) = slot.as_ref() {
            if link.channel.status().connected() {
                return Ok(Arc::clone(link));
            }
            *slot = None;
        }
        let broker = &self.broker;
        let properties = ConnectionProperties::default().with_connection_name(self.connection_name.clone().into());
        let connection = Connection::connect_uri(self.uri.clone(), properties)
            .await
            .map_err(|e| HandlerError::retry(format!("cannot connect to {broker}: {e}")).with_source(e))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| HandlerError::retry(format!("cannot open a channel on {broker}: {e}")).with_source(e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| HandlerError::retry(format!("cannot turn on publisher confirms: {e}")).with_source(e))?;
        if let Some(exchange) = &self.declare {
            let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
            channel
                .exchange_declare(exchange.as_str().into(), ExchangeKind::Topic, options, FieldTable::default())
                .await
                .map_err(|e| {
                    HandlerError::failed(format!("cannot declare exchange `{exchange}`: {e}")).with_source(e)
                })?;
        }
        tracing::info!(connection = %self.connection_name, broker = %broker, "connected");
        let link = Arc::new(Link { _connection: connection, channel });
        *slot = Some(Arc::clone(&link));
        Ok(link)
    }

    /// Drops `link`'s connection if it is still the current one: the next attempt opens a new one.
    pub(crate) async fn forget(&self, link: &Link) {
        let mut slot = self.slot.lock().await;
        // the caller's handle keeps `link` alive, so the current one is at the same address only
        // if it is the same link
        if slot.as_deref().is_some_and(|current| std::ptr::eq(current, link)) {
            *slot = None;
        }
    }
}

/// Publishes events to an AMQP exchange.
pub struct AmqpHandler {
    options: AmqpOptions,
    links: Links,
}

impl AmqpHandler {
    async fn publish(
        &self,
        link: &Link,
        routing_key: String,
        body: String,
        event: &SaveEvent,
    ) -> Result<(), HandlerError> {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_app_id("post-save".into());
        if let Some(id) = event.id {
            properties = properties.with_message_id(id.to_string().into());
        }
        let options = BasicPublishOptions { mandatory: self.options.mandatory, ..BasicPublishOptions::default() };
        let exchange = self.options.exchange.as_str();
        let sent = link.channel.basic_publish(
            exchange.into(),
            routing_key.as_str().into(),
            options,
            body.as_bytes(),
            properties,
        );
        let confirmation = match sent.await {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        };
        match confirmation {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) => Err(HandlerError::failed(format!(
                "exchange `{exchange}` routed key `{routing_key}` to no queue ({} {})",
                returned.reply_code, returned.reply_text
            ))),
            Ok(Confirmation::Nack(_)) => Err(HandlerError::retry("the broker refused the message (nack)")),
            Ok(Confirmation::NotRequested) => Err(HandlerError::failed("the channel is not in confirm mode")),
            Err(e) => {
                // A channel error (a missing exchange) closes the channel; a connection error the
                // connection: either way the next attempt starts over.
                self.links.forget(link).await;
                Err(publish_error(exchange, e))
            }
        }
    }
}

fn publish_error(exchange: &str, e: lapin::Error) -> HandlerError {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind() {
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) {
            let msg = format!("exchange `{exchange}` does not exist: declare it, or set `declare = true`: {e}");
            return HandlerError::failed(msg).with_source(e);
        }
        if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) {
            return HandlerError::failed(format!("amqp publish: {e}")).with_source(e);
        }
    }
    HandlerError::retry(format!("amqp publish: {e}")).with_source(e)
}

fn render(template: &Template, ctx: &EventContext) -> Result<String, HandlerError> {
    // The same event renders the same way on every attempt: retrying cannot help.
    template.render(ctx).map_err(|e| HandlerError::permanent(e.to_string()).with_source(e))
}

#[async_trait]
impl Handler for AmqpHandler {
    async fn handle(&self, event: &SaveEvent, _delivery: &Delivery) -> Result<(), HandlerError> {
        let ctx = EventContext::new(event);
        let routing_key = render(&self.options.routing_key, &ctx)?;
        if routing_key.len() > MAX_ROUTING_KEY {
            return Err(HandlerError::permanent(format!(
                "routing key is {} bytes; AMQP allows at most {MAX_ROUTING_KEY}",
                routing_key.len()
            )));
        }
        let body = match &self.options.body {
            Some(body) => render(body, &ctx)?,
            None => event.to_json(),
        };
        let link = self.links.get().await?;
        self.publish(&link, routing_key, body, event).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<AmqpOptions, ConfigError> {
        let doc = format!("kind = \"amqp\"\n{body}");
        let mut s = Section::from_document(&doc, "handler[0]")?;
        let _ = s.take::<String>("kind")?;
        let options = AmqpOptions::parse(&mut s)?;
        s.finish()?;
        Ok(options)
    }

    #[test]
    fn defaults_and_target_without_the_password() {
        let o = parse("exchange = \"shop\"\nrouting_key = \"{{ sender }}.{{ op }}\"").unwrap();
        assert!(o.mandatory && !o.declare);
        assert_eq!(o.target(), "amqp://127.0.0.1:5672 exchange shop key {{ sender }}.{{ op }}");
        assert!(!format!("{o:?}").contains("guest:guest"));
        let o = parse("url = \"amqps://app:s3cret@mq:5671/prod?heartbeat=5\"\nexchange = \"\"\nrouting_key = \"q\"")
            .unwrap();
        assert_eq!(o.target(), "amqps://mq:5671/prod exchange \"\" key q");
    }

    #[test]
    fn errors_name_their_key() {
        let key = |body: &str| parse(body).unwrap_err().key.unwrap();
        assert_eq!(key("routing_key = \"k\""), "handler[0].exchange");
        assert_eq!(key("exchange = \"x\""), "handler[0].routing_key");
        assert_eq!(key("exchange = \"\"\nrouting_key = \"k\"\ndeclare = true"), "handler[0].declare");
        assert_eq!(key("exchange = \"x\"\nrouting_key = \"{{ nope }}\""), "handler[0].routing_key");
        assert_eq!(key("exchange = \"x\"\nrouting_key = \"k\"\nurl = \"::\""), "handler[0].url");
    }
}
