//! `kind = "nats"`: publish each event to a NATS subject, plain or through JetStream.
//!
//! ```toml
//! [[handler]]
//! name = "orders-to-nats"
//! sender = "public.shop_order"
//! kind = "nats"
//! url = "nats://127.0.0.1:4222"              # the default; `nats://user:pass@host:4222` works too
//! subject = "shop.{{ sender }}.{{ op }}"      # a template over the event
//! jetstream = true                            # publish through JetStream and wait for its ack
//! headers = { "X-Source" = "post-save", "X-Op" = "{{ op }}" }
//! token_env = "NATS_TOKEN"                    # or token_file = "/run/credentials/post-save/nats"
//! # body = "{{ instance | tojson }}"          # the default body is the event JSON
//! ```
//!
//! With `jetstream = true` an attempt succeeds when the stream has stored the message (its
//! `PubAck`); every message carries `Nats-Msg-Id: <database>:<event id>` (the database name
//! keeps the ledger ids of two databases apart on one stream; a `Nats-Msg-Id` in `headers`
//! replaces it), so the stream drops the copy a retry may publish again within its duplicate
//! window. A subject no stream captures
//! fails the attempt with a message saying so. Plain NATS (`jetstream = false`) has no
//! acknowledgement: an attempt succeeds once the message is written to the server's socket, and
//! a message in flight when the connection breaks is lost. Use JetStream when every event must
//! arrive.
//!
//! The connection is opened on the first event, not at start. Once open, the client reconnects
//! by itself; while it is disconnected, attempts fail as transient and the dispatcher retries
//! them with its backoff.

use super::without_userinfo;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind as JetStreamErrorKind;
use async_nats::{ConnectOptions, HeaderMap, HeaderName, HeaderValue, ServerAddr};
use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

use super::{BuildError, Delivery, Handler, HandlerError, SecretSource};
use crate::config::{ConfigError, Section};
use crate::event::SaveEvent;
use crate::expr::EventContext;
use crate::template::Template;

/// The server used when `url` is not set.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// The header JetStream deduplicates on.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Longest wait for the server when connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of a `nats` handler.
#[derive(Clone)]
pub struct NatsOptions {
    /// Server URL; several, comma-separated, for a cluster. May hold a user and password.
    pub url: String,
    /// Subject, rendered per event.
    pub subject: Template,
    /// Publish through JetStream and wait for the stream's acknowledgement.
    pub jetstream: bool,
    /// Extra headers; values are templates.
    pub headers: Vec<(String, Template)>,
    /// Message body; `None`: the event JSON.
    pub body: Option<Template>,
    /// Authentication token.
    pub token: Option<SecretSource>,
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsOptions")
            .field("url", &display_urls(&self.url))
            .field("subject", &self.subject)
            .field("jetstream", &self.jetstream)
            .field("headers", &self.headers)
            .field("body", &self.body)
            .field("token", &self.token)
            .finish()
    }
}

impl NatsOptions {
    /// Every key [`Self::parse`] reads: anything else in the table is an unknown key.
    pub(crate) const KEYS: &[&str] = &["url", "subject", "jetstream", "headers", "body", "token_file", "token_env"];

    /// Reads the options from the handler's table.
    pub fn parse(s: &mut Section) -> Result<Self, ConfigError> {
        let url = s.take::<String>("url")?.unwrap_or_else(|| DEFAULT_URL.to_owned());
        servers(&url).map_err(|m| s.error("url", &m))?;
        let source: String = s.require("subject")?;
        let subject = compile(s, "subject", &source)?;
        if source.trim().is_empty() {
            return Err(s.error("subject", "a subject cannot be empty"));
        }
        let jetstream = s.take::<bool>("jetstream")?.unwrap_or(false);
        let mut headers = Vec::new();
        for (name, value) in s.take::<BTreeMap<String, String>>("headers")?.unwrap_or_default() {
            if HeaderName::from_str(&name).is_err() {
                return Err(s.error("headers", &format!("`{name}` is not a valid header name")));
            }
            headers.push((name, compile(s, "headers", &value)?));
        }
        let body = match s.take::<String>("body")? {
            Some(text) => Some(compile(s, "body", &text)?),
            None => None,
        };
        let token = SecretSource::parse(s, "token")?;
        Ok(NatsOptions { url, subject, jetstream, headers, body, token })
    }

    /// Where events go, for `handlers list`: servers without their credentials.
    pub fn target(&self) -> String {
        let mode = if self.jetstream { " (jetstream)" } else { "" };
        format!("{} subject {}{mode}", display_urls(&self.url), self.subject.source())
    }

    /// Builds the handler. Reads the token; does not connect.
    pub fn build(&self, name: &str) -> Result<Arc<dyn Handler>, BuildError> {
        let servers = servers(&self.url).map_err(|m| BuildError::new(name, m))?;
        let token = self.token.as_ref().map(SecretSource::read).transpose().map_err(|m| BuildError::new(name, m))?;
        Ok(Arc::new(NatsHandler {
            name: name.to_owned(),
            options: self.clone(),
            servers,
            token,
            link: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
        }))
    }
}

fn compile(s: &Section, key: &str, source: &str) -> Result<Template, ConfigError> {
    Template::compile(source).map_err(|m| s.error(key, &m))
}

/// The server addresses in `url` (comma-separated).
fn servers(url: &str) -> Result<Vec<ServerAddr>, String> {
    let list: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    if list.is_empty() {
        return Err("needs at least one server URL".to_owned());
    }
    // The parser's message may quote the URL, password included: say only which one failed.
    list.iter()
        .map(|u| {
            ServerAddr::from_str(u).map_err(|_| format!("`{}` is not a valid NATS server URL", without_userinfo(u)))
        })
        .collect()
}

/// `url` for display: each server without user, password or query.
fn display_urls(url: &str) -> String {
    url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(without_userinfo).collect::<Vec<_>>().join(",")
}

/// One connection: the client and, in JetStream mode, its context.
struct Link {
    generation: u64,
    client: async_nats::Client,
    jetstream: Option<async_nats::jetstream::Context>,
}

/// Publishes events to NATS.
pub struct NatsHandler {
    name: String,
    options: NatsOptions,
    servers: Vec<ServerAddr>,
    token: Option<SecretString>,
    link: Mutex<Option<Arc<Link>>>,
    generation: std::sync::atomic::AtomicU64,
}

impl NatsHandler {
    /// The open connection, opened now if there is none.
    async fn link(&self) -> Result<Arc<Link>, HandlerError> {
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref() {
            return Ok(Arc::clone(link));
        }
        let mut options = ConnectOptions::new()
            .name(format!("post-save {}", self.name))
            .connection_timeout(CONNECT_TIMEOUT)
            // The attempt is retried by the dispatcher, with its backoff.
            .max_reconnects(None);
        if let Some(token) = &self.token {
            options = options.token(token.expose_secret().to_owned());
        }
        let client = options.connect(self.servers.clone()).await.map_err(|e| {
            HandlerError::retry(format!("cannot connect to NATS at {}: {e}", display_urls(&self.options.url)))
                .with_source(e)
        })?;
        tracing::info!(handler = %self.name, url = %display_urls(&self.options.url), "connected to nats");
        let jetstream = self.options.jetstream.then(|| async_nats::jetstream::new(client.clone()));
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let link = Arc::new(Link { generation, client, jetstream });
        *slot = Some(Arc::clone(&link));
        Ok(link)
    }

    /// Drops connection `generation` (if it is still the current one): the next attempt opens
    /// a new one.
    async fn forget(&self, generation: u64) {
        let mut slot = self.link.lock().await;
        if slot.as_ref().is_some_and(|l| l.generation == generation) {
            *slot = None;
        }
    }

    fn headers(&self, event: &SaveEvent, ctx: &EventContext) -> Result<HeaderMap, HandlerError> {
        let mut headers = HeaderMap::new();
        if let Some(id) = event.id {
            headers.insert(MSG_ID_HEADER, format!("{}:{id}", event.using).as_str());
        }
        for (name, template) in &self.options.headers {
            let value = render(template, ctx)?;
            let value = HeaderValue::from_str(&value)
                .map_err(|e| HandlerError::permanent(format!("header {name}: invalid value: {e}")))?;
            headers.insert(name.as_str(), value);
        }
        Ok(headers)
    }

    async fn publish(
        &self,
        link: &Link,
        subject: String,
        headers: HeaderMap,
        payload: String,
    ) -> Result<(), HandlerError> {
        let Some(jetstream) = &link.jetstream else {
            return self.publish_core(link, subject, headers, payload).await;
        };
        let ack = jetstream
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
            .map_err(|e| jetstream_error(&subject, e))?
            .await
            .map_err(|e| jetstream_error(&subject, e))?;
        tracing::debug!(
            handler = %self.name, stream = %ack.stream, sequence = ack.sequence, duplicate = ack.duplicate,
            "stored in jetstream"
        );
        Ok(())
    }

    async fn publish_core(
        &self,
        link: &Link,
        subject: String,
        headers: HeaderMap,
        payload: String,
    ) -> Result<(), HandlerError> {
        use async_nats::client::PublishErrorKind;
        match link.client.publish_with_headers(subject.clone(), headers, payload.into()).await {
            Ok(()) => {}
            Err(e) => {
                return Err(match e.kind() {
                    PublishErrorKind::InvalidSubject => {
                        HandlerError::permanent(format!("`{subject}` is not a valid NATS subject")).with_source(e)
                    }
                    PublishErrorKind::MaxPayloadExceeded => HandlerError::permanent(e.to_string()).with_source(e),
                    _ => {
                        // The client's task is gone: start over with a new connection.
                        self.forget(link.generation).await;
                        HandlerError::retry(format!("nats client stopped: {e}")).with_source(e)
                    }
                });
            }
        }
        link.client.flush().await.map_err(|e| HandlerError::retry(format!("nats flush failed: {e}")).with_source(e))
    }
}

fn jetstream_error(subject: &str, e: async_nats::jetstream::context::PublishError) -> HandlerError {
    match e.kind() {
        JetStreamErrorKind::StreamNotFound => HandlerError::failed(format!(
            "no JetStream stream captures subject `{subject}`: add a stream for it, or set `jetstream = false`"
        ))
        .with_source(e),
        JetStreamErrorKind::MaxPayloadExceeded => HandlerError::permanent(e.to_string()).with_source(e),
        JetStreamErrorKind::TimedOut | JetStreamErrorKind::BrokenPipe | JetStreamErrorKind::MaxAckPending => {
            HandlerError::retry(format!("jetstream publish to `{subject}`: {e}")).with_source(e)
        }
        _ => HandlerError::failed(format!("jetstream publish to `{subject}`: {e}")).with_source(e),
    }
}

fn render(template: &Template, ctx: &EventContext) -> Result<String, HandlerError> {
    // The same event renders the same way on every attempt: retrying cannot help.
    template.render(ctx).map_err(|e| HandlerError::permanent(e.to_string()).with_source(e))
}

#[async_trait]
impl Handler for NatsHandler {
    async fn handle(&self, event: &SaveEvent, _delivery: &Delivery) -> Result<(), HandlerError> {
        let ctx = EventContext::new(event);
        let subject = render(&self.options.subject, &ctx)?;
        let payload = match &self.options.body {
            Some(body) => render(body, &ctx)?,
            None => event.to_json(),
        };
        let headers = self.headers(event, &ctx)?;
        let link = self.link().await?;
        // A message handed to a disconnected client would wait in its buffer, and be lost if the
        // daemon stopped: fail the attempt instead, while the client reconnects.
        if link.client.connection_state() != State::Connected {
            return Err(HandlerError::retry("not connected to nats; the client is reconnecting"));
        }
        self.publish(&link, subject, headers, payload).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<NatsOptions, ConfigError> {
        let doc = format!("kind = \"nats\"\n{body}");
        let mut s = Section::from_document(&doc, "handler[0]")?;
        let _ = s.take::<String>("kind")?;
        let options = NatsOptions::parse(&mut s)?;
        s.finish()?;
        Ok(options)
    }

    #[test]
    fn defaults_and_target() {
        let o = parse("subject = \"shop.{{ sender }}.{{ op }}\"").unwrap();
        assert_eq!(o.url, DEFAULT_URL);
        assert!(!o.jetstream);
        assert_eq!(o.target(), "nats://127.0.0.1:4222 subject shop.{{ sender }}.{{ op }}");
        let o = parse("url = \"nats://u:p4ss@h:4222?x=1\"\nsubject = \"s\"\njetstream = true").unwrap();
        assert_eq!(o.target(), "nats://h:4222 subject s (jetstream)");
        assert!(!format!("{o:?}").contains("p4ss"));
    }

    #[test]
    fn errors_name_their_key() {
        let key = |body: &str| parse(body).unwrap_err().key.unwrap();
        assert_eq!(key("url = \"x\"\n"), "handler[0].subject");
        assert_eq!(key("subject = \"{{ nope }}\""), "handler[0].subject");
        assert_eq!(key("subject = \"s\"\nurl = \"http://h\""), "handler[0].url");
        assert_eq!(key("subject = \"s\"\nheaders = { \"bad name\" = \"x\" }"), "handler[0].headers");
        assert_eq!(key("subject = \"s\"\ntoken_env = \"A\"\ntoken_file = \"/f\""), "handler[0].token_env");
        assert_eq!(key("subject = \"s\"\nstream = \"x\""), "handler[0].stream");
    }

    #[test]
    fn url_errors_do_not_show_the_password() {
        let e = parse("subject = \"s\"\nurl = \"http://u:s3cret@h\"").unwrap_err();
        assert!(!e.message.contains("s3cret"), "{}", e.message);
    }

    #[test]
    fn userinfo_is_stripped() {
        assert_eq!(without_userinfo("nats://a:b@h:1/p?q=1"), "nats://h:1/p");
        assert_eq!(without_userinfo("h:1"), "h:1");
        assert_eq!(display_urls("nats://a@h1, nats://h2"), "nats://h1,nats://h2");
    }
}
