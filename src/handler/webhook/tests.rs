//! The webhook handler's options, signature, message ids, CloudEvents document and reading of
//! the receiver's answer.

use serde_json::{Value, json};

use super::answer::{EXCERPT_BYTES, excerpt, http_date, retry_after};
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
