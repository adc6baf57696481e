//! `kind = "webhook"`: POST each event to an HTTP endpoint, signed per
//! [Standard Webhooks](https://www.standardwebhooks.com).
//!
//! ```toml
//! [[handler]]
//! name = "orders-to-billing"
//! sender = "public.shop_order"
//! kind = "webhook"
//! url = "https://billing.example.com/hooks/orders"   # http or https; required
//! secret_file = "/run/credentials/post-save/billing"  # or secret_env = "BILLING_WEBHOOK_SECRET"
//! headers = { "X-Tenant" = "shop" }                  # extra request headers
//! format = "event"                                   # or "cloudevents"
//! connect_timeout = "5s"                             # default 5s
//! request_timeout = "10s"                            # default: the handler's `timeout` cuts it
//! ```
//!
//! **Body.** `format = "event"` (the default) sends the event JSON as handlers receive it
//! (`Content-Type: application/json`). `format = "cloudevents"` sends a
//! [CloudEvents 1.0](https://github.com/cloudevents/spec) structured-mode event
//! (`Content-Type: application/cloudevents+json`) with `id` the message id below,
//! `source = "postgres://<database>/<schema.table>"` (percent-encoded),
//! `type = "post_save.<op>"` (`post_save.insert`, `post_save.update`, `post_save.delete`),
//! `subject` the primary key (the value of a one-column key, else the key as compact JSON),
//! `time` the trigger time, `datacontenttype = "application/json"` and `data` the event.
//!
//! **Signing.** Every request carries `webhook-id` (the event's ledger id; `notify`-table events
//! have none and get a UUID derived from the event, the same on every attempt) and
//! `webhook-timestamp` (Unix seconds). With a secret it also carries
//! `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`. The secret is a
//! Standard Webhooks secret: `whsec_` followed by the base64 of the key (the prefix is optional).
//! The secret is read when the handler is built and never logged; custom `headers` may not
//! replace `webhook-*` or `Content-Type`. User info in the URL becomes Basic authentication.
//!
//! **Outcome.** 2xx is done. Connection errors, timeouts, 408, 429 and 5xx are retried, waiting
//! as long as the receiver's `Retry-After` asks (seconds or an HTTP date; capped at the retry
//! policy's `max_backoff`). Any other 4xx dead-letters the delivery at once, with the status and
//! the start of the answer. Redirects are not followed: a 3xx dead-letters it too, naming its
//! `Location`. Without `request_timeout`, the handler's `timeout` ends a hanging request (the
//! attempt is dropped, which closes its connection) and the attempt is retried.

mod answer;
mod message;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use secrecy::ExposeSecret;

use super::{BuildError, Delivery, Handler, HandlerError, SecretSource};
use crate::config::{ConfigError, Section};
use crate::event::SaveEvent;
use answer::{chain, outcome, transport_error};
use message::{HmacSha256, cloud_event, message_id, sign, signing_key};

/// How long connecting may take unless `connect_timeout` says otherwise.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Headers the handler sets itself, which `headers` may not replace.
const RESERVED_HEADERS: [&str; 7] = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
];

/// What the request body holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The event JSON (`application/json`).
    Event,
    /// A CloudEvents 1.0 structured-mode event whose `data` is the event
    /// (`application/cloudevents+json`).
    CloudEvents,
}

/// Options of a `webhook` handler.
#[derive(Clone)]
pub struct WebhookOptions {
    /// Where to POST (http or https).
    pub url: Url,
    /// The Standard Webhooks signing secret; without one, requests are not signed.
    pub secret: Option<SecretSource>,
    /// Extra request headers (validated names and values).
    pub headers: BTreeMap<String, String>,
    /// What the body holds.
    pub format: Format,
    /// Longest a connection may take to open.
    pub connect_timeout: Duration,
    /// Longest one request may take; `None` leaves it to the handler's `timeout`.
    pub request_timeout: Option<Duration>,
}

/// Shows neither the URL's user info or query nor header values: they may hold credentials.
impl std::fmt::Debug for WebhookOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookOptions")
            .field("url", &self.shown_url())
            .field("secret", &self.secret)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("format", &self.format)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl WebhookOptions {
    /// Every key [`Self::parse`] reads: anything else in the table is an unknown key.
    pub(crate) const KEYS: &[&str] =
        &["url", "secret_file", "secret_env", "headers", "format", "connect_timeout", "request_timeout"];

    /// Reads the options from the handler's table.
    pub fn parse(s: &mut Section) -> Result<Self, ConfigError> {
        let text: String = s.require("url")?;
        let url = parse_url(&text).map_err(|m| s.error("url", &m))?;
        let secret = SecretSource::parse(s, "secret")?;
        let headers = s.take::<BTreeMap<String, String>>("headers")?.unwrap_or_default();
        for (name, value) in &headers {
            header(name, value).map_err(|m| s.error("headers", &m))?;
        }
        let format = match s.take::<String>("format")?.as_deref() {
            None | Some("event") => Format::Event,
            Some("cloudevents") => Format::CloudEvents,
            Some(other) => {
                return Err(s.error("format", &format!("unknown format `{other}`; expected event or cloudevents")));
            }
        };
        let connect_timeout = s.take_duration("connect_timeout")?.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        if connect_timeout.is_zero() {
            return Err(s.error("connect_timeout", "must be more than 0"));
        }
        let request_timeout = s.take_duration("request_timeout")?;
        if request_timeout.is_some_and(|t| t.is_zero()) {
            return Err(s.error("request_timeout", "must be more than 0"));
        }
        Ok(WebhookOptions { url, secret, headers, format, connect_timeout, request_timeout })
    }

    /// Where events go, for `handlers list`: `POST https://host:port/path`, without user info
    /// or query.
    pub fn target(&self) -> String {
        format!("POST {}", self.shown_url())
    }

    /// The URL without user info, query or fragment: fit for logs and listings.
    fn shown_url(&self) -> String {
        format!("{}{}", self.url.origin().ascii_serialization(), self.url.path())
    }

    /// Builds the handler: reads the secret and makes the HTTP client. Connects nowhere.
    pub fn build(&self, name: &str) -> Result<Arc<dyn Handler>, BuildError> {
        let key = match &self.secret {
            None => None,
            Some(source) => {
                let secret = source.read().map_err(|m| BuildError::new(name, m))?;
                Some(signing_key(secret.expose_secret()).map_err(|m| BuildError::new(name, m))?)
            }
        };
        let mut headers = HeaderMap::new();
        for (name_text, value) in &self.headers {
            let (header_name, header_value) = header(name_text, value).map_err(|m| BuildError::new(name, m))?;
            headers.insert(header_name, header_value);
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("post-save/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers);
        if let Some(timeout) = self.request_timeout {
            builder = builder.timeout(timeout);
        }
        let client = builder
            .build()
            .map_err(|e| BuildError::new(name, format!("cannot make the HTTP client: {}", chain(&e))))?;
        Ok(Arc::new(WebhookHandler { client, url: self.url.clone(), format: self.format, key }))
    }
}

/// Posts events to one URL.
struct WebhookHandler {
    client: reqwest::Client,
    url: Url,
    format: Format,
    key: Option<HmacSha256>,
}

#[async_trait]
impl Handler for WebhookHandler {
    async fn handle(&self, event: &SaveEvent, _delivery: &Delivery) -> Result<(), HandlerError> {
        let id = message_id(event);
        let (body, content_type) = match self.format {
            Format::Event => (event.to_json(), "application/json"),
            Format::CloudEvents => (cloud_event(event, &id), "application/cloudevents+json"),
        };
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, content_type)
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(key) = &self.key {
            request = request.header("webhook-signature", sign(key, &id, timestamp, &body));
        }
        // Dropping this future (the handler's timeout, shutdown) closes the connection.
        let response = request.body(body).send().await.map_err(transport_error)?;
        outcome(response).await
    }
}

/// Checks a URL from the config. Messages never repeat it: it may hold credentials.
fn parse_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("not a valid URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(format!("scheme `{other}` is not supported; expected http or https")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_owned());
    }
    Ok(url)
}

/// A custom header, checked; its value is marked sensitive (kept out of HTTP/2 header
/// compression tables and of `Debug`).
fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let header_name =
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("`{name}` is not a valid header name"))?;
    if RESERVED_HEADERS.contains(&header_name.as_str()) {
        return Err(format!("header `{name}` is set by the handler and cannot be replaced"));
    }
    let mut header_value = HeaderValue::from_str(value)
        .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
    header_value.set_sensitive(true);
    Ok((header_name, header_value))
}
