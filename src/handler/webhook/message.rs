//! What a request carries: the message id, the CloudEvents document and the Standard Webhooks
//! signature.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::{DecodePaddingMode, Engine};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::event::{Op, SaveEvent};

/// Standard base64 that accepts a secret with or without its `=` padding.
const SECRET_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub(super) type HmacSha256 = Hmac<Sha256>;

/// The HMAC key of a Standard Webhooks secret: `whsec_` (optional) and the key in base64.
/// Errors never show the secret.
pub(super) fn signing_key(secret: &str) -> Result<HmacSha256, String> {
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
pub(super) fn sign(key: &HmacSha256, id: &str, timestamp: u64, body: &str) -> String {
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
pub(super) fn message_id(event: &SaveEvent) -> String {
    if let Some(id) = event.id {
        return id.to_string();
    }
    let digest = Sha256::digest(event.to_json().as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid().to_string()
}

/// The event as a CloudEvents 1.0 structured-mode JSON document.
pub(super) fn cloud_event(event: &SaveEvent, id: &str) -> String {
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
