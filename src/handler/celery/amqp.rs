//! Celery over RabbitMQ (`broker = "amqp://…"`): what kombu's py-amqp transport sends.
//!
//! The task is published to the default exchange with the queue as routing key, body the raw
//! JSON `[args, kwargs, embed]`, the protocol's headers as AMQP headers. The channel is in
//! confirm mode and the publish is mandatory: an attempt succeeds when the broker has the
//! message in the queue. A queue that does not exist (no worker has declared it yet) is a failed
//! attempt, retried, rather than a task dropped by the broker. The queue is never declared
//! here: the workers own its arguments.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Confirmation};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Map, Value};

use super::TaskMessage;
use crate::handler::HandlerError;
use crate::handler::amqp::Links;

/// Whether `url` names an AMQP broker.
pub(super) fn is_amqp(url: &str) -> bool {
    url.starts_with("amqp://") || url.starts_with("amqps://")
}

/// Checks an AMQP URL: valid, and without a password in it.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    if authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':')) {
        return Err("put the password in `password_env` or `password_file`, not in the URL".to_owned());
    }
    url.parse::<AMQPUri>().map(drop).map_err(|e| format!("`{url}` is not a valid AMQP URL: {e}"))
}

/// A RabbitMQ broker, connected on first use and again after a failure.
pub(super) struct AmqpBroker {
    url: String,
    links: Links,
}

impl AmqpBroker {
    /// A broker for handler `name` at `url` (checked by [`check_url`]); does not connect.
    pub(super) fn new(name: &str, url: &str, password: Option<SecretString>) -> Result<AmqpBroker, String> {
        let mut uri: AMQPUri = url.parse().map_err(|e| format!("`{url}` is not a valid AMQP URL: {e}"))?;
        if let Some(secret) = password {
            uri.authority.userinfo.password = secret.expose_secret().to_owned();
        }
        Ok(AmqpBroker { url: url.to_owned(), links: Links::new(name, uri, format!("the celery broker {url}"), None) })
    }

    /// Publishes the task to `queue` and waits for the broker's confirm.
    pub(super) async fn send(&self, message: &TaskMessage, queue: &str) -> Result<(), HandlerError> {
        let short = |what: &str, s: &str| {
            ShortString::try_new(s)
                .map_err(|_| HandlerError::permanent(format!("celery {what} is longer than AMQP allows (255 bytes)")))
        };
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_headers(field_table(&message.headers)?)
            .with_delivery_mode(2)
            .with_priority(0)
            .with_correlation_id(short("task id", &message.id)?);
        let routing_key = short("queue", queue)?;
        let link = self.links.get().await?;
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let sent =
            link.channel.basic_publish("".into(), routing_key, options, message.body.as_bytes(), properties).await;
        let confirmation = match sent {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        };
        match confirmation {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) => Err(HandlerError::failed(format!(
                "no queue `{queue}` on the celery broker {} (has a worker declared it?): {} {}",
                self.url, returned.reply_code, returned.reply_text
            ))),
            Ok(Confirmation::Nack(_)) => Err(HandlerError::retry("the celery broker refused the task (nack)")),
            Ok(Confirmation::NotRequested) => Err(HandlerError::failed("the channel is not in confirm mode")),
            Err(e) => {
                // A channel or connection error closes what it broke: the next attempt starts over.
                self.links.forget(&link).await;
                Err(HandlerError::retry(format!("cannot publish on the celery broker {}: {e}", self.url))
                    .with_source(e))
            }
        }
    }
}

/// The protocol's headers as an AMQP table, typed as py-amqp would send them.
fn field_table(map: &Map<String, Value>) -> Result<FieldTable, HandlerError> {
    let mut table = FieldTable::default();
    for (key, value) in map {
        let key = ShortString::try_new(key.as_str())
            .map_err(|_| HandlerError::permanent(format!("header name `{key}` is too long for AMQP")))?;
        table.insert(key, amqp_value(value)?);
    }
    Ok(table)
}

fn amqp_value(value: &Value) -> Result<AMQPValue, HandlerError> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::LongString(LongString::from(n.to_string())),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => {
            AMQPValue::FieldArray(FieldArray::from(items.iter().map(amqp_value).collect::<Result<Vec<_>, _>>()?))
        }
        Value::Object(map) => AMQPValue::FieldTable(field_table(map)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(check_url("amqp://guest@127.0.0.1:5672//").is_ok());
        assert!(check_url("amqp://localhost").is_ok());
        let e = check_url("amqp://guest:hunter2@localhost//").unwrap_err();
        assert!(e.contains("password_env") && !e.contains("hunter2"), "{e}");
        assert!(is_amqp("amqps://x") && !is_amqp("redis://x"));
    }

    #[test]
    fn headers_keep_their_types() {
        let map: Map<String, Value> =
            serde_json::from_str(r#"{"a": null, "b": false, "c": 3, "d": 2.5, "e": "x", "f": [null, 1], "g": {}}"#)
                .unwrap();
        let table = field_table(&map).unwrap();
        let inner = table.inner();
        assert_eq!(inner.get("a"), Some(&AMQPValue::Void));
        assert_eq!(inner.get("c"), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(inner.get("d"), Some(&AMQPValue::Double(2.5)));
        assert_eq!(
            inner.get("f"),
            Some(&AMQPValue::FieldArray(vec![AMQPValue::Void, AMQPValue::LongLongInt(1)].into()))
        );
    }
}
