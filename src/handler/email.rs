//! `kind = "email"`: send a plain-text mail for each event, over SMTP.
//!
//! Recipients, subject and body are templates over the event (Jinja syntax, see
//! [`crate::template`]), so a recipient can come from the saved row itself.
//!
//! ```toml
//! [[handler]]
//! name = "new-order-mail"
//! sender = "public.shop_order"
//! created = true
//! kind = "email"
//! smtp = "smtp://mail.internal:587?tls=required"
//! username = "orders@shop.example"
//! password_env = "SMTP_PASSWORD"            # or password_file
//! from = "Shop <orders@shop.example>"
//! to = ["sales@shop.example", "{{ instance.email }}"]
//! cc = ["audit@shop.example"]              # optional; so is bcc
//! subject = "New order for {{ instance.product }}"
//! body = """
//! Order {{ instance.id }}: {{ instance.quantity }} × {{ instance.product }}.
//! """
//! ```
//!
//! `smtp` picks the transport security:
//!
//! | URL                                  | security                       | default port |
//! |--------------------------------------|--------------------------------|--------------|
//! | `smtp://host:port`                   | none (a local relay, tests)    | 25           |
//! | `smtp://host:port?tls=required`      | STARTTLS, required             | 587          |
//! | `smtp://host:port?tls=opportunistic` | STARTTLS when offered          | 587          |
//! | `smtps://host:port`                  | TLS from the start (implicit)  | 465          |
//!
//! Credentials never go in the URL. Each `to`/`cc`/`bcc` item may render to one address, a
//! comma-separated list, or nothing (skipped); the mail needs at least one `to` recipient.
//!
//! Failures: an address that does not parse or a template over a missing field is permanent (a
//! dead letter, no retry can fix the event); an SMTP 4xx reply and any connection or TLS
//! failure are retried; a 5xx reply is permanent, except 530/535 (authentication), which is
//! retried while attempts remain since it is the server's configuration, not the event.
//!
//! A durable event's mail carries the `Message-ID` `<post-save.<database>.<event id>.<handler>@
//! <host>>` on every attempt, so a receiver can tell a resent mail from a new one.

use super::hostname;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Mailboxes};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::{AsyncSmtpTransport, AsyncSmtpTransportBuilder};
use lettre::{AsyncTransport as _, Message, Tokio1Executor};
use secrecy::ExposeSecret as _;

use super::{BuildError, Delivery, Handler, HandlerError, SecretSource};
use crate::config::{ConfigError, Section};
use crate::event::SaveEvent;
use crate::expr::EventContext;
use crate::template::Template;

/// How long one SMTP command may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// How the connection to the SMTP server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain text (`smtp://`).
    None,
    /// STARTTLS, required (`smtp://…?tls=required`).
    StartTls,
    /// STARTTLS when the server offers it (`smtp://…?tls=opportunistic`).
    Opportunistic,
    /// TLS from the first byte (`smtps://`).
    Implicit,
}

/// Where mail goes: the parsed `smtp` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpServer {
    /// Host name or IP address (without IPv6 brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Transport security.
    pub security: Security,
}

impl SmtpServer {
    /// Parses `smtp://host[:port][?tls=required|opportunistic]` or `smtps://host[:port]`.
    pub fn parse(url: &str) -> Result<SmtpServer, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("`{url}` is not a URL"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err("an smtp URL has no path: smtp://host:port".to_owned());
        }
        if authority.contains('@') {
            return Err("credentials do not go in the URL: use `username` and `password_env`/`password_file`".into());
        }
        let tls = match query {
            None | Some("") => None,
            Some(q) => match q.strip_prefix("tls=") {
                Some(v @ ("required" | "opportunistic")) => Some(v),
                _ => return Err(format!("unknown query `{q}`; expected `tls=required` or `tls=opportunistic`")),
            },
        };
        let (security, default_port) = match (scheme, tls) {
            ("smtp", None) => (Security::None, 25),
            ("smtp", Some("required")) => (Security::StartTls, 587),
            ("smtp", Some(_)) => (Security::Opportunistic, 587),
            ("smtps", None) => (Security::Implicit, 465),
            ("smtps", Some(_)) => return Err("smtps:// is TLS already; `tls=` is for smtp:// (STARTTLS)".to_owned()),
            (other, _) => return Err(format!("unknown scheme `{other}`; expected smtp:// or smtps://")),
        };
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            None => default_port,
            Some(p) => p.parse().map_err(|_| format!("invalid port `{p}`"))?,
        };
        Ok(SmtpServer { host, port, security })
    }
}

impl std::fmt::Display for SmtpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.security == Security::Implicit { "smtps" } else { "smtp" };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{scheme}://{host}:{}", self.port)?;
        match self.security {
            Security::StartTls => f.write_str("?tls=required"),
            Security::Opportunistic => f.write_str("?tls=opportunistic"),
            Security::None | Security::Implicit => Ok(()),
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Result<(String, Option<&str>), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed `[` in the host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("expected `:port` after `]`")?),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the URL has no host".to_owned());
    }
    Ok((host.to_owned(), port))
}

/// Options of an `email` handler.
#[derive(Debug, Clone)]
pub struct EmailOptions {
    /// The SMTP server.
    pub smtp: SmtpServer,
    /// The SMTP user, if the server wants authentication.
    pub username: Option<String>,
    /// Where the SMTP password comes from (`password_env` / `password_file`).
    pub password: Option<SecretSource>,
    /// The sender.
    pub from: Mailbox,
    /// Recipients, templates.
    pub to: Vec<Template>,
    /// Copy recipients, templates.
    pub cc: Vec<Template>,
    /// Blind-copy recipients, templates.
    pub bcc: Vec<Template>,
    /// The subject, a template.
    pub subject: Template,
    /// The text/plain body, a template.
    pub body: Template,
}

impl EmailOptions {
    /// Every key [`Self::parse`] reads: anything else in the table is an unknown key.
    pub(crate) const KEYS: &[&str] =
        &["smtp", "username", "password_file", "password_env", "from", "to", "cc", "bcc", "subject", "body"];

    /// Reads the options from the handler's table.
    pub fn parse(s: &mut Section) -> Result<Self, ConfigError> {
        let url: String = s.require("smtp")?;
        let smtp = SmtpServer::parse(&url).map_err(|m| s.error("smtp", &m))?;
        let username = s.take::<String>("username")?;
        let password = SecretSource::parse(s, "password")?;
        if password.is_some() && username.is_none() {
            return Err(s.error("username", "a password needs a `username`"));
        }
        let from: String = s.require("from")?;
        let from = from.parse::<Mailbox>().map_err(|e| s.error("from", &format!("invalid address `{from}`: {e}")))?;
        let to = templates(s, "to")?;
        if to.is_empty() {
            return Err(s.error("to", "needs at least one recipient"));
        }
        let cc = templates(s, "cc")?;
        let bcc = templates(s, "bcc")?;
        let subject = template(s, "subject")?;
        let body = template(s, "body")?;
        Ok(EmailOptions { smtp, username, password, from, to, cc, bcc, subject, body })
    }

    /// Where events go, for `handlers list`: `<smtp url> to <recipients>`.
    pub fn target(&self) -> String {
        let to: Vec<&str> = self.to.iter().map(Template::source).collect();
        format!("{} to {}", self.smtp, to.join(", "))
    }

    /// Builds the handler; reads the password, connects on the first event.
    pub fn build(&self, name: &str) -> Result<Arc<dyn Handler>, BuildError> {
        let server = &self.smtp;
        let tls = |host: &str| TlsParameters::new(host.to_owned()).map_err(|e| BuildError::new(name, e.to_string()));
        let tls = match server.security {
            Security::None => Tls::None,
            Security::StartTls => Tls::Required(tls(&server.host)?),
            Security::Opportunistic => Tls::Opportunistic(tls(&server.host)?),
            Security::Implicit => Tls::Wrapper(tls(&server.host)?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(server.host.clone())
            .port(server.port)
            .tls(tls)
            .timeout(Some(SMTP_TIMEOUT));
        if let Some(user) = &self.username {
            let password = match &self.password {
                Some(source) => source.read().map_err(|m| BuildError::new(name, m))?,
                None => secrecy::SecretString::from(String::new()),
            };
            builder = builder.credentials(Credentials::new(user.clone(), password.expose_secret().to_owned()));
        }
        Ok(Arc::new(EmailHandler { options: self.clone(), builder, transport: OnceLock::new(), host: hostname() }))
    }
}

fn template(s: &mut Section, key: &str) -> Result<Template, ConfigError> {
    let source: String = s.require(key)?;
    Template::compile(&source).map_err(|e| s.error(key, &e))
}

/// A list of templates; a single string is a list of one.
fn templates(s: &mut Section, key: &str) -> Result<Vec<Template>, ConfigError> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let sources = match s.take::<OneOrMany>(key)? {
        None => Vec::new(),
        Some(OneOrMany::One(one)) => vec![one],
        Some(OneOrMany::Many(many)) => many,
    };
    sources.iter().map(|src| Template::compile(src).map_err(|e| s.error(key, &e))).collect()
}

/// Sends a mail per event.
struct EmailHandler {
    options: EmailOptions,
    builder: AsyncSmtpTransportBuilder,
    /// Built on the first event (its connection pool needs the runtime); the pool reconnects
    /// by itself.
    transport: OnceLock<AsyncSmtpTransport<Tokio1Executor>>,
    host: String,
}

#[async_trait]
impl Handler for EmailHandler {
    async fn handle(&self, event: &SaveEvent, delivery: &Delivery) -> Result<(), HandlerError> {
        let message = self.options.message(event, &delivery.handler, &self.host)?;
        let transport = self.transport.get_or_init(|| self.builder.clone().build());
        match transport.send(message).await {
            Ok(_) => {
                tracing::debug!(handler = %delivery.handler, "mail sent");
                Ok(())
            }
            Err(e) => Err(classify(&self.options.smtp, e)),
        }
    }
}

/// An SMTP failure as retry (4xx, connection, TLS, timeout) or permanent (5xx).
fn classify(server: &SmtpServer, e: lettre::transport::smtp::Error) -> HandlerError {
    let code = e.status().map(|c| c.to_string());
    let text = format!("smtp {server}: {e}");
    let error = match code.as_deref() {
        // Authentication: a server configuration problem, not this event's.
        Some("530" | "535") => HandlerError::failed(text),
        _ if e.is_permanent() => HandlerError::permanent(text),
        _ => HandlerError::retry(text),
    };
    error.with_source(e)
}

impl EmailOptions {
    /// The mail for `event`. Fails (permanently) on a template over a missing field or an
    /// invalid rendered address.
    pub fn message(&self, event: &SaveEvent, handler: &str, host: &str) -> Result<Message, HandlerError> {
        let ctx = EventContext::new(event);
        let render = |what: &str, t: &Template| {
            t.render(&ctx).map_err(|e| HandlerError::permanent(format!("email {what}: {e}")).with_source(e))
        };
        let mut builder = Message::builder().from(self.from.clone()).header(ContentType::TEXT_PLAIN);
        let mut recipients = 0;
        for (what, list) in [("to", &self.to), ("cc", &self.cc), ("bcc", &self.bcc)] {
            for t in list {
                let text = render(what, t)?;
                let boxes = text.trim().parse::<Mailboxes>().map_err(|e| {
                    HandlerError::permanent(format!(
                        "email {what}: invalid address `{text}` from `{}`: {e}",
                        t.source()
                    ))
                })?;
                for mailbox in boxes {
                    if what == "to" {
                        recipients += 1;
                    }
                    builder = match what {
                        "to" => builder.to(mailbox),
                        "cc" => builder.cc(mailbox),
                        _ => builder.bcc(mailbox),
                    };
                }
            }
        }
        if recipients == 0 {
            return Err(HandlerError::permanent(
                "email: no `to` recipient for this event (every template rendered empty)",
            ));
        }
        // One line: a newline in a field must not start a header of its own.
        let subject = render("subject", &self.subject)?.replace(['\r', '\n'], " ");
        let body = render("body", &self.body)?;
        if let Some(id) = event.id {
            builder = builder.message_id(Some(format!(
                "<post-save.{}.{id}.{}@{}>",
                atom(&event.using),
                atom(handler),
                atom(host)
            )));
        }
        builder
            .subject(subject)
            .body(body)
            .map_err(|e| HandlerError::permanent(format!("email: cannot build the message: {e}")).with_source(e))
    }
}

/// `text` with only characters a Message-ID's parts may hold.
fn atom(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') { c } else { '-' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls() {
        let s = SmtpServer::parse("smtp://127.0.0.1:2525").unwrap();
        assert_eq!((s.host.as_str(), s.port, s.security), ("127.0.0.1", 2525, Security::None));
        assert_eq!(SmtpServer::parse("smtp://mail.example").unwrap().port, 25);
        let s = SmtpServer::parse("smtp://mail.example?tls=required").unwrap();
        assert_eq!((s.port, s.security), (587, Security::StartTls));
        assert_eq!(s.to_string(), "smtp://mail.example:587?tls=required");
        let s = SmtpServer::parse("smtps://mail.example/").unwrap();
        assert_eq!((s.port, s.security), (465, Security::Implicit));
        assert_eq!(SmtpServer::parse("smtp://[::1]:2525").unwrap().to_string(), "smtp://[::1]:2525");
        assert_eq!(SmtpServer::parse("smtp://h?tls=opportunistic").unwrap().security, Security::Opportunistic);
    }

    #[test]
    fn bad_smtp_urls() {
        for (url, needle) in [
            ("mail.example", "not a URL"),
            ("http://mail.example", "unknown scheme"),
            ("smtp://user:pw@mail.example", "password_env"),
            ("smtp://mail.example?tls=maybe", "unknown query"),
            ("smtps://mail.example?tls=required", "TLS already"),
            ("smtp://mail.example:x", "invalid port"),
            ("smtp://:25", "no host"),
            ("smtp://mail.example/helo", "no path"),
        ] {
            let e = SmtpServer::parse(url).unwrap_err();
            assert!(e.contains(needle), "{url}: {e}");
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn message_id_parts_are_atoms() {
        assert_eq!(atom("shop db/1"), "shop-db-1");
    }
}
