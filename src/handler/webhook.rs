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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::{DecodePaddingMode, Engine};
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretSlice};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{BuildError, Delivery, Handler, HandlerError, SecretSource};
use crate::config::{ConfigError, Section};
use crate::event::{Op, SaveEvent};

/// How long connecting may take unless `connect_timeout` says otherwise.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How much of an error answer's body is kept for the log and the dead-letter list.
const EXCERPT_BYTES: usize = 256;

/// How much of a successful answer's body is read, and for how long, to reuse its connection.
const DRAIN_BYTES: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

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

/// Standard base64 that accepts a secret with or without its `=` padding.
const SECRET_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type HmacSha256 = Hmac<Sha256>;

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

/// Classifies the receiver's answer.
async fn outcome(response: reqwest::Response) -> Result<(), HandlerError> {
    let status = response.status();
    if status.is_success() {
        // Read the (usually tiny) answer on the side, so the connection goes back to the pool
        // for the next event; the delivery is done either way. The task is bounded in time and
        // owns nothing the daemon waits for at shutdown.
        tokio::spawn(tokio::time::timeout(DRAIN_TIME, read_body(response, DRAIN_BYTES)));
        return Ok(());
    }
    if status.is_redirection() {
        let location = response.headers().get(LOCATION).map(|v| excerpt(v.as_bytes())).unwrap_or_default();
        return Err(HandlerError::permanent(format!(
            "receiver answered {status} (redirects are not followed); location: {location}"
        )));
    }
    let wait = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, SystemTime::now()));
    let body = body_excerpt(response).await;
    let message = format!("receiver answered {status}: {body}");
    if status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let error = HandlerError::retry(message);
        Err(match wait {
            Some(delay) => error.retry_after(delay),
            None => error,
        })
    } else {
        Err(HandlerError::permanent(message))
    }
}

/// A failure to get an answer at all: worth retrying. The error is shown without its URL,
/// which may hold credentials.
fn transport_error(error: reqwest::Error) -> HandlerError {
    let error = error.without_url();
    let what = if error.is_timeout() {
        "request timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    HandlerError::retry(format!("{what}: {}", chain(&error))).with_source(error)
}

/// The first [`EXCERPT_BYTES`] of the answer's body, on one line.
async fn body_excerpt(response: reqwest::Response) -> String {
    let kept = read_body(response, EXCERPT_BYTES + 1).await;
    if kept.is_empty() {
        return "(empty body)".to_owned();
    }
    excerpt(&kept)
}

/// The answer's body up to the end, an error, or the first chunk that makes it `limit` bytes.
async fn read_body(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    while kept.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    kept
}

/// Up to [`EXCERPT_BYTES`] of `bytes` as one line of text, `…` marking a cut.
fn excerpt(bytes: &[u8]) -> String {
    let cut = bytes.len() > EXCERPT_BYTES;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(EXCERPT_BYTES)]);
    // A character split by the cut decodes as U+FFFD: drop it.
    let text = if cut { text.trim_end_matches('\u{FFFD}') } else { &text };
    let mut line = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if cut {
        line.push('…');
    }
    line
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

/// The HMAC key of a Standard Webhooks secret: `whsec_` (optional) and the key in base64.
/// Errors never show the secret.
fn signing_key(secret: &str) -> Result<HmacSha256, String> {
    let encoded = secret.trim();
    let encoded = encoded.strip_prefix("whsec_").unwrap_or(encoded);
    let key: SecretSlice<u8> = SECRET_BASE64
        .decode(encoded)
        .map_err(|_| "the webhook secret is not `whsec_` followed by base64".to_owned())?
        .into();
    if key.expose_secret().is_empty() {
        return Err("the webhook secret is empty".to_owned());
    }
    HmacSha256::new_from_slice(key.expose_secret()).map_err(|_| "the webhook secret cannot be an HMAC key".to_owned())
}

/// `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`: the `webhook-signature` value.
fn sign(key: &HmacSha256, id: &str, timestamp: u64, body: &str) -> String {
    let mut mac = key.clone();
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The message id: the ledger id, else a UUID derived from the whole event, so every attempt
/// at one event carries the same id and receivers can drop repeats.
fn message_id(event: &SaveEvent) -> String {
    if let Some(id) = event.id {
        return id.to_string();
    }
    let digest = Sha256::digest(event.to_json().as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid().to_string()
}

/// The event as a CloudEvents 1.0 structured-mode JSON document.
fn cloud_event(event: &SaveEvent, id: &str) -> String {
    let op = match event.op {
        Op::Insert => "insert",
        Op::Update => "update",
        Op::Delete => "delete",
    };
    let subject = match event.pk.values().next() {
        Some(Value::String(s)) if event.pk.len() == 1 => s.clone(),
        Some(v) if event.pk.len() == 1 => v.to_string(),
        _ => Value::Object(event.pk.clone()).to_string(),
    };
    json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("postgres://{}/{}", percent_encode(&event.using), percent_encode(&event.sender)),
        "type": format!("post_save.{op}"),
        "subject": subject,
        "time": event.at,
        "datacontenttype": "application/json",
        "data": event,
    })
    .to_string()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How long a `Retry-After` value asks to wait: delta-seconds or an HTTP date (IMF-fixdate).
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = UNIX_EPOCH + Duration::from_secs(http_date(value)?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Unix seconds of an IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 §5.6.7).
fn http_date(text: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let fields: Vec<&str> = text.split_ascii_whitespace().collect();
    let [weekday, day, month, year, time, "GMT"] = fields[..] else { return None };
    if !weekday.ends_with(',') {
        return None;
    }
    let day: u64 = day.parse().ok()?;
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let year: u64 = year.parse().ok()?;
    let mut hms = time.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm), for years from
/// 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An error with its sources: "a: b: c".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signing example of the Standard Webhooks reference libraries' tests.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn parse(table: &str) -> Result<WebhookOptions, ConfigError> {
        let mut section = Section::from_document(table, "handler[0]")?;
        let options = WebhookOptions::parse(&mut section)?;
        section.finish()?;
        Ok(options)
    }

    fn event(id: Option<i64>) -> SaveEvent {
        serde_json::from_value(json!({
            "id": id, "signal": "post_save", "sender": "public.shop order", "op": "insert", "created": true,
            "pk": {"id": 7}, "instance": {"id": 7, "product": "book"}, "raw": false, "using": "shop",
            "txid": 740, "at": "2026-11-25T02:17:22.59878+00:00",
            "actor": {"role": "app", "application_name": "psql", "client_addr": null, "pid": 8200, "actor": null}
        }))
        .unwrap()
    }

    #[test]
    fn signs_the_spec_example() {
        let key = signing_key(SPEC_SECRET).unwrap();
        let signature = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, r#"{"test": 2432232314}"#);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_without_prefix_or_padding_give_the_same_key() {
        let sign_with = |secret: &str| sign(&signing_key(secret).unwrap(), "id", 1, "body");
        let reference = sign_with(SPEC_SECRET);
        assert_eq!(sign_with("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n"), reference);
        // 25 key bytes: base64 with and without its padding.
        assert_eq!(
            sign_with("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGA=="),
            sign_with("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGA")
        );
    }

    #[test]
    fn bad_secrets_are_rejected_without_showing_them() {
        for bad in ["whsec_not base64!", "whsec_", "", "hunter2-hunter2"] {
            let Err(message) = signing_key(bad) else { panic!("accepted {bad:?}") };
            let value = bad.trim_start_matches("whsec_");
            assert!(value.is_empty() || !message.contains(value), "{message}");
        }
    }

    #[test]
    fn parses_every_key() {
        let o = parse(
            "url = \"https://hooks.example.com/in\"\nsecret_env = \"HOOK_SECRET\"\nheaders = { \"X-Tenant\" = \"shop\" }\n\
             format = \"cloudevents\"\nconnect_timeout = \"2s\"\nrequest_timeout = \"10s\"\n",
        )
        .unwrap();
        assert_eq!(o.secret, Some(SecretSource::Env("HOOK_SECRET".into())));
        assert_eq!(o.headers["X-Tenant"], "shop");
        assert_eq!(o.format, Format::CloudEvents);
        assert_eq!(o.connect_timeout, Duration::from_secs(2));
        assert_eq!(o.request_timeout, Some(Duration::from_secs(10)));
        let defaults = parse("url = \"http://127.0.0.1:8080/hook\"\n").unwrap();
        assert_eq!((defaults.format, defaults.secret, defaults.request_timeout), (Format::Event, None, None));
        assert_eq!(defaults.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    }

    #[test]
    fn bad_options_name_their_key() {
        for (table, key, words) in [
            ("", "url", "missing"),
            ("url = \"ftp://example.com/x\"", "url", "scheme `ftp`"),
            ("url = \"/relative\"", "url", "not a valid URL"),
            ("url = \"http://h/\"\nheaders = { \"Webhook-Signature\" = \"v1,x\" }", "headers", "cannot be replaced"),
            ("url = \"http://h/\"\nheaders = { \"content-type\" = \"text/plain\" }", "headers", "cannot be replaced"),
            ("url = \"http://h/\"\nheaders = { \"bad name\" = \"x\" }", "headers", "not a valid header name"),
            ("url = \"http://h/\"\nheaders = { \"X-A\" = \"line\\nbreak\" }", "headers", "not a valid header value"),
            ("url = \"http://h/\"\nformat = \"xml\"", "format", "expected event or cloudevents"),
            ("url = \"http://h/\"\nconnect_timeout = \"0s\"", "connect_timeout", "more than 0"),
            ("url = \"http://h/\"\nsecret_file = \"/a\"\nsecret_env = \"B\"", "secret_env", "not both"),
        ] {
            let e = parse(table).expect_err(table);
            assert_eq!(e.key.as_deref(), Some(format!("handler[0].{key}").as_str()), "{table}: {e}");
            assert!(e.message.contains(words), "{table}: {e}");
        }
    }

    #[test]
    fn target_and_debug_hide_credentials() {
        let o = parse(
            "url = \"https://user:p4ss@Hooks.Example.com:8443/in/orders?token=t0ken#frag\"\n\
             headers = { Authorization = \"Bearer b34rer\" }\nsecret_file = \"/run/secret\"\n",
        )
        .unwrap();
        assert_eq!(o.target(), "POST https://hooks.example.com:8443/in/orders");
        assert_eq!(parse("url = \"https://h.example/\"").unwrap().target(), "POST https://h.example/");
        let debug = format!("{o:?}");
        for secret in ["p4ss", "user", "t0ken", "b34rer"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("Authorization") && debug.contains("/run/secret"), "{debug}");
    }

    #[test]
    fn build_reports_an_unreadable_secret_by_where_it_looked() {
        let o = parse("url = \"http://h/\"\nsecret_file = \"/nonexistent/post-save-secret\"").unwrap();
        let Err(e) = o.build("hook") else { panic!("built without its secret") };
        assert!(e.to_string().contains("/nonexistent/post-save-secret"), "{e}");
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after("99999999999999999999999", now), Some(Duration::from_secs(u64::MAX)));
        for bad in ["", "-1", "1.5", "soon", "Sun, 06 Nov 1994 08:49:37 UTC", "Sun, 32 Nov 1994 08:49:37 GMT"] {
            assert_eq!(retry_after(bad, now), None, "{bad:?}");
        }
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(http_date("Tue, 29 Feb 2000 12:00:00 GMT"), Some(951_825_600));
    }

    #[test]
    fn message_ids_are_ledger_ids_or_stable_uuids() {
        assert_eq!(message_id(&event(Some(42))), "42");
        let first = message_id(&event(None));
        assert_eq!(first, message_id(&event(None)), "the same on every attempt");
        assert!(uuid::Uuid::parse_str(&first).is_ok(), "{first}");
        let mut other = event(None);
        other.txid += 1;
        assert_ne!(message_id(&other), first);
    }

    #[test]
    fn cloud_events_have_the_documented_shape() {
        let e = event(Some(42));
        let doc: Value = serde_json::from_str(&cloud_event(&e, "42")).unwrap();
        assert_eq!(doc["specversion"], "1.0");
        assert_eq!(doc["id"], "42");
        assert_eq!(doc["source"], "postgres://shop/public.shop%20order");
        assert_eq!(doc["type"], "post_save.insert");
        assert_eq!(doc["subject"], "7");
        assert_eq!(doc["time"], "2026-11-25T02:17:22.59878+00:00");
        assert_eq!(doc["datacontenttype"], "application/json");
        assert_eq!(doc["data"], serde_json::from_str::<Value>(&e.to_json()).unwrap());
        let mut two = e.clone();
        two.pk.insert("line".into(), json!("a"));
        let doc: Value = serde_json::from_str(&cloud_event(&two, "42")).unwrap();
        assert_eq!(doc["subject"], r#"{"id":7,"line":"a"}"#);
    }

    #[test]
    fn excerpts_are_one_short_line() {
        assert_eq!(excerpt(b"  bad\r\n request\t here "), "bad request here");
        let long = excerpt("aé".repeat(100).as_bytes());
        // 256 bytes end after an `a`; the `é` the cut split is dropped.
        assert!(long.ends_with("éa…") && long.len() <= EXCERPT_BYTES + 3, "{long}");
        assert!(!excerpt(&[b'x'; 255].iter().chain("é".as_bytes()).copied().collect::<Vec<_>>()).contains('\u{FFFD}'));
    }
}
