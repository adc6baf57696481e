//! The event's unit tests: decoding, row images, the written form.

use std::sync::Arc;

use serde::de::DeserializeSeed;
use serde_json::value::RawValue;

use super::decode::{KeyOf, array_elements, leading_integer_key};
use super::image::may_hold_inexact_numbers;
use super::*;

const INSERT: &str = r#"{"instance":{ "id" : 7, "user_id" : 1, "product" : "book" },"old":null,"signal" : "post_save", "sender" : "public.shop_order", "op" : "insert", "created" : true, "pk" : { "id" : 7 }, "update_fields" : null, "raw" : false, "using" : "shop", "txid" : 740, "at" : "2026-11-25T02:17:22.59878+00:00", "actor" : {"role" : "app", "application_name" : "psql", "client_addr" : null, "pid" : 8200, "actor" : null}, "origin" : null}"#;

#[test]
fn event_fields_name_every_field_an_event_is_written_with() {
    let Notice::Event(e) = decode_notice(INSERT, "shop").unwrap() else { panic!("not an event") };
    let Value::Object(written) = serde_json::from_str(&e.to_json()).unwrap() else { panic!("not an object") };
    let written: Vec<&str> = written.keys().map(String::as_str).collect();
    assert_eq!(written, EVENT_FIELDS);
    let mut reread = (*e).clone();
    reread.reread = true;
    assert!(serde_json::to_value(&reread).unwrap().get("reread").is_some(), "reread is written only when true");
}

#[test]
fn decodes_a_notify_event() {
    let Notice::Event(e) = decode_notice(INSERT, "shop").unwrap() else { panic!("not an event") };
    assert_eq!(e.sender, "public.shop_order");
    assert!(e.created);
    assert_eq!(e.op, Op::Insert);
    assert_eq!(e.instance["product"], "book");
    assert_eq!(e.id, None);
    assert_eq!(e.row_key(), "public.shop_order\u{0}{\"id\":7}");
}

#[test]
fn events_of_one_row_share_a_digest_and_other_rows_do_not() {
    let Notice::Event(e) = decode_notice(INSERT, "shop").unwrap() else { panic!("not an event") };
    let mut same = e.clone();
    same.instance = RowImage::default();
    same.op = Op::Update;
    assert_eq!(e.row_digest(), same.row_digest());
    let mut other_row = e.clone();
    other_row.pk.insert("id".into(), Value::from(8));
    let mut other_table = e.clone();
    other_table.sender = "public.shop_orders".into();
    let mut digests: Vec<u64> = [&e, &other_row, &other_table].iter().map(|e| e.row_digest()).collect();
    digests.dedup();
    assert_eq!(digests.len(), 3, "{digests:?}");
    // a fixed seed: the same row has the same digest in every decode
    let Notice::Event(again) = decode_notice(INSERT, "shop").unwrap() else { panic!("not an event") };
    assert_eq!(e.row_digest(), again.row_digest());
}

#[test]
fn durable_payloads_are_wake_ups() {
    assert_eq!(decode_notice(r#"{"wake":"ledger"}"#, "shop").unwrap(), Notice::Wake);
    let payload = format!("{{\"id\":42,{}", &INSERT[1..]);
    assert_eq!(decode_notice(&payload, "shop").unwrap(), Notice::Wake);
    assert!(decode_notice(r#"{"wake":"soon"}"#, "shop").is_err());
}

#[test]
fn hostile_payloads_are_rejected() {
    for bad in [
        "",
        "not json",
        "[1,2]",
        "null",
        r#"{"id":"42"}"#,
        r#"{"id":-1}"#,
        r#"{"id":1e400}"#,
        r#"{"id":99999999999999999999999}"#,
        r#"{"sender":5}"#,
        &INSERT.replace("\"created\" : true", "\"created\" : false"),
        &INSERT.replace("\"pk\" : { \"id\" : 7 }", "\"pk\" : {}"),
        &INSERT.replace("\"txid\" : 740", "\"txid\" : 1e999"),
    ] {
        assert!(decode_notice(bad, "shop").is_err(), "accepted {bad}");
    }
}

#[test]
fn inexact_numbers_become_strings() {
    let payload = INSERT.replace(
        "\"user_id\" : 1,",
        "\"user_id\" : 9007199254740993, \"price\" : 12.50, \"big\" : 1234567890.1234567891, \"small\" : -5,",
    );
    let Notice::Event(e) = decode_notice(&payload, "shop").unwrap() else { panic!() };
    assert_eq!(e.instance["user_id"], "9007199254740993");
    assert_eq!(e.instance["big"], "1234567890.1234567891");
    assert!(e.instance["price"].is_number());
    assert_eq!(e.instance["small"], -5);
    assert!(fits_double("9007199254740992"));
    assert!(!fits_double("1e400"));
    // significant digits counted across the point, zeros at either end not counted
    for fits in
        ["0", "0.000", "-0.5", "100000000000000000000e-5", "0.000000000000000000123456789012345", "1234567.12345678"]
    {
        assert!(fits_double(fits), "{fits}");
    }
    for inexact in ["1234567.123456789", "0.1234567890123456", "-12345678901234.56", "1000000000000001.0"] {
        assert!(!fits_double(inexact), "{inexact}");
    }
}

#[test]
fn a_lazy_image_is_built_once_when_first_read_with_exact_numbers() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let builds = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&builds);
    let image = RowImage::lazy(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        serde_json::json!({"id": 1, "big": 9_007_199_254_740_993u64})
    });
    let copy = image.clone();
    assert_eq!(builds.load(Ordering::SeqCst), 0, "nothing read yet");
    assert_eq!(image["big"], "9007199254740993");
    assert_eq!(image["id"], 1);
    assert!(serde_json::to_string(&image).unwrap().contains("\"9007199254740993\""));
    assert_eq!(builds.load(Ordering::SeqCst), 1, "built once");
    assert_eq!(*copy, *image);
    assert_eq!(builds.load(Ordering::SeqCst), 2, "a clone read before it was built builds its own");
}

#[test]
fn by_reference_payloads_decode_without_instance() {
    let head = INSERT.split_once(",\"signal\"").unwrap().1;
    let payload = format!("{{\"reread\":true,\"signal\"{head}");
    let Notice::Event(e) = decode_notice(&payload, "shop").unwrap() else { panic!() };
    assert!(e.reread && e.instance.is_null());
    let without_flag = format!("{{\"signal\"{head}");
    assert!(decode_notice(&without_flag, "shop").is_err(), "no instance and not flagged");
}

#[test]
fn row_images_from_the_ledger_are_written_as_captured_and_read_exactly() {
    let head = r#"{"raw" : false, "txid" : 7, "at" : "t", "actor" : {"role" : "app", "pid" : 1}}"#;
    let rows = r#"[[{"id" : 1}, {"id":1,"note":"a  b","q":2}, null, null], [{"id" : 2}, {"id":2,"q":12345678901234567890}, {"id":2,"q":1.5e3}, ["q"]]]"#;
    let events = decode_ledger_row(1, "public.t", "update", head, rows, "shop").unwrap();
    // no number to rewrite: the text PostgreSQL wrote, spacing and key order kept
    assert!(events[0].to_json().contains(r#""instance":{"id":1,"note":"a  b","q":2},"old":null,"#));
    // an inexact number: decoded and rewritten, in JSON as in reads
    let json: Value = serde_json::from_str(&events[1].to_json()).unwrap();
    assert_eq!(json["instance"]["q"], "12345678901234567890");
    assert_eq!(events[1].instance["q"], "12345678901234567890");
    assert_eq!(json["old"]["q"], 1500.0);
    // any other serializer sees the decoded value
    assert_eq!(serde_json::to_value(&events[1]).unwrap()["instance"]["q"], "12345678901234567890");
    assert_eq!(
        serde_json::to_value(&events[0]).unwrap()["instance"],
        serde_json::json!({"id": 1, "note": "a  b", "q": 2})
    );
    assert!(events[0].old.is_null());
    // a change is what is written from then on
    let mut event = events[0].clone();
    event.instance["q"] = serde_json::json!(3);
    assert!(event.to_json().contains(r#""instance":{"id":1,"note":"a  b","q":3}"#));
    assert_ne!(event, events[0]);
    assert_eq!(events[0].clone(), events[0]);
}

#[test]
fn instance_only_rows_take_their_key_from_the_head_keys() {
    let head = r#"{"raw" : false, "txid" : 7, "at" : "t", "actor" : {"role" : "app", "pid" : 1}, "origin" : null, "keys" : ["b", "a"]}"#;
    // json_agg's own spacing between elements
    let rows = "[{\"a\":1,\"b\":\"x\",\"c\":{\"a\":9}}, \n {\"a\":2,\"b\":\"y\",\"c\":null}]";
    let events = decode_ledger_row(5001, "public.t", "insert", head, rows, "shop").unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(serde_json::to_string(&events[0].pk).unwrap(), r#"{"b":"x","a":1}"#, "key order, not column order");
    assert_eq!(events[1].pk["a"], 2);
    assert_eq!(events[0].instance["c"]["a"], 9);
    assert!(events[0].old.is_null() && events[0].update_fields.is_none());
    assert_eq!(events[1].id, Some(5002));
    assert_eq!(events[0].row_key(), "public.t\u{0}{\"b\":\"x\",\"a\":1}");
    // no keys, or a key column missing from the row
    let no_keys = head.replace(r#", "keys" : ["b", "a"]"#, "");
    assert!(decode_ledger_row(1, "public.t", "insert", &no_keys, rows, "shop").is_err());
    let missing = r#"[{"a":1,"c":2}]"#;
    let e = decode_ledger_row(1, "public.t", "insert", head, missing, "shop").unwrap_err();
    assert!(e.to_string().contains("key column `b` missing"), "{e}");
    // both shapes in one ledger row
    let mixed = r#"[{"a":1,"b":"x"}, [{"id":3},{"id":3},null,null]]"#;
    let events = decode_ledger_row(1, "public.t", "insert", head, mixed, "shop").unwrap();
    assert_eq!(events[1].pk["id"], 3);
}

#[test]
fn array_elements_are_split_as_the_parser_splits_them() {
    for text in [
        "[]",
        " [ ] ",
        r#"[{"id":1,"a":"x"}, {"id":2,"a":"y, ]}"}]"#,
        r#"[{"s":"a \"quoted\" ] , string\\","n":[1,[2,{"x":[]}]]},null,3,"str",[{"id":1},{"id":1},null,["a"]]]"#,
        "[\n  {\"a\" : 1} ,\n\t{\"b\":\"\\u00e9t\\u00e9 ❄\"}\n]",
        "[-1.5e3, true, false]",
    ] {
        let parsed: Vec<&str> =
            serde_json::from_str::<Vec<&RawValue>>(text).unwrap().into_iter().map(RawValue::get).collect();
        assert_eq!(array_elements(text), Some(parsed), "{text}");
    }
    for text in ["", "{}", "[1,2", "[1,]", "[,1]", "[1}", "[1] x", r#"["open]"#, "[[1]"] {
        assert_eq!(array_elements(text), None, "{text}");
    }
}

#[test]
fn a_leading_integer_key_is_read_as_the_parser_reads_it() {
    let keys = ["id".to_owned()];
    let parsed = |text: &str| KeyOf(&keys).deserialize(&mut serde_json::Deserializer::from_str(text)).unwrap();
    for text in [r#"{"id":42,"a":"b"}"#, r#"{"id":-7}"#, r#"{"id":0,"x":[1]}"#, r#"{"id":999999999999999,"y":1}"#] {
        let fast = leading_integer_key(&keys, text).unwrap_or_else(|| panic!("{text} not read"));
        assert_eq!(fast, parsed(text), "{text}");
        assert_eq!(serde_json::to_string(&fast).unwrap(), serde_json::to_string(&parsed(text)).unwrap());
    }
    // any other shape is left to the parser
    for text in [
        r#"{"a":1,"id":42}"#,
        r#"{"id" : 42}"#,
        r#"{"id":"42"}"#,
        r#"{"id":4.5}"#,
        r#"{"id":1e3}"#,
        r#"{"id":-0}"#,
        r#"{"id":1234567890123456}"#,
        r#"{"idx":1,"id":2}"#,
        r#"{"id":null}"#,
    ] {
        assert_eq!(leading_integer_key(&keys, text), None, "{text}");
    }
    assert_eq!(leading_integer_key(&["a".to_owned(), "b".to_owned()], r#"{"a":1,"b":2}"#), None);
}

#[test]
fn numbers_that_may_be_inexact_are_found_in_text() {
    for text in [
        r#"{"a":9007199254740993}"#,
        r#"{"a":1234567890.1234567891}"#,
        r#"{"a":1e5}"#,
        r#"{"a":2E-3}"#,
        r#"{"s":"1234567890123456"}"#,
    ] {
        assert!(may_hold_inexact_numbers(text), "{text}");
    }
    for text in [
        r#"{"a":900719925474099,"b":-12.5,"c":"2026-12-02T04:47:34.272382+00:00"}"#,
        r#"{"e":"eee","x":"1.2.3"}"#,
        "[]",
    ] {
        assert!(!may_hold_inexact_numbers(text), "{text}");
    }
}

#[test]
fn ledger_rows_expand_into_events() {
    let head = r#"{"raw" : false, "txid" : 7, "at" : "2026-11-25T02:17:22.59878+00:00", "actor" : {"role" : "app", "application_name" : "psql", "client_addr" : null, "pid" : 1, "actor" : "user:1"}, "origin" : null}"#;
    let rows =
        r#"[[{"id":1},{"id":1,"q":2},{"id":1,"q":1},["q"]], [{"id":2},{"id":2,"q":99999999999999999999},null,["q"]]]"#;
    let events = decode_ledger_row(1001, "public.t", "update", head, rows, "shop").unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].id, Some(1001));
    assert_eq!(events[1].id, Some(1002));
    assert_eq!(events[0].signal, Signal::PostSave);
    assert!(!events[0].created);
    assert_eq!(events[0].old["q"], 1);
    assert_eq!(events[1].instance["q"], "99999999999999999999");
    assert_eq!(events[1].update_fields.as_deref(), Some(&["q".to_owned()][..]));
    assert_eq!(events[0].actor.actor.as_deref(), Some("user:1"));
    assert_eq!(events[0].using, "shop");
    assert!(events[0].to_json().starts_with("{\"id\":1001,"));
    assert!(decode_ledger_row(1, "public.t", "upsert", head, rows, "shop").is_err());
    assert!(decode_ledger_row(1, "public.t", "insert", "{}", rows, "shop").is_err());
    assert!(decode_ledger_row(1, "public.t", "insert", head, "[[{}, {}, null, null]]", "shop").is_err());
}

const HEAD: &str = r#"{"raw" : false, "txid" : 9, "at" : "2026-12-06T01:00:00+00:00", "actor" : {"role" : "app", "application_name" : "psql", "client_addr" : null, "pid" : 3, "actor" : null}, "origin" : null, "keys" : ["id"]}"#;

#[test]
fn a_note_of_a_statement_is_its_events() {
    let note = format!(
        r#"{{"sender":"public.shop_order","op":"insert","head":{HEAD},"rows":[{{"id":1,"product":"a"}},{{"id":2,"product":"b"}}]}}"#
    );
    let Notice::Events(events) = decode_notice(&note, "shop").unwrap() else { panic!("not events") };
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.id.is_none() && e.created && e.using == "shop" && e.txid == 9));
    assert_eq!(events[1].pk["id"], 2);
    assert_eq!(events[1].instance["product"], "b");
    assert_eq!(events[0].sender, "public.shop_order");
    // a row-level note: the full item, update_fields included
    let note = format!(
        r#"{{"sender":"public.shop_order","op":"update","head":{HEAD},"rows":[[{{"id":1}},{{"id":1,"q":2}},{{"id":1,"q":1}},["q"]]]}}"#
    );
    let Notice::Events(events) = decode_notice(&note, "shop").unwrap() else { panic!("not events") };
    assert_eq!(events[0].update_fields.as_deref(), Some(&["q".to_owned()][..]));
    assert_eq!(events[0].old["q"], 1);
    assert!(!events[0].created);
}

#[test]
fn a_reread_note_names_the_row_by_its_key() {
    let note = format!(
        r#"{{"sender":"public.shop_order","op":"update","head":{HEAD},"reread":true,"pk":{{"id":99999999999999999999}},"update_fields":["product"]}}"#
    );
    let Notice::Event(e) = decode_notice(&note, "shop").unwrap() else { panic!("not an event") };
    assert!(e.reread && e.instance.is_null() && e.id.is_none());
    assert_eq!(e.pk["id"], "99999999999999999999");
    assert_eq!(e.update_fields.as_deref(), Some(&["product".to_owned()][..]));
    assert_eq!(e.op, Op::Update);
}

#[test]
fn malformed_notes_are_rejected() {
    let start = format!(r#"{{"sender":"public.t","op":"insert","head":{HEAD}"#);
    for bad in [
        format!("{start}}}"),
        format!(r#"{start},"rows":[{{"id":1}}],"reread":true,"pk":{{"id":1}}}}"#),
        format!(r#"{start},"reread":true}}"#),
        format!(r#"{start},"reread":true,"pk":{{}}}}"#),
        format!(r#"{start},"rows":[{{"no_id":1}}]}}"#),
        format!(r#"{start},"rows":{{"id":1}}}}"#),
        format!(r#"{start},"rows":[{{"id":1}}],"extra":1}}"#),
        format!(r#"{start},"rows":[[{{"id":1}},5,null,null]]}}"#),
        format!(r#"{start},"rows":[[{{"id":1}},{{"id":1}},[],null]]}}"#),
        r#"{"sender":"public.t","op":"upsert","head":{},"rows":[]}"#.to_owned(),
        format!(r#"{start},"rows":[{{"id":1}}]"#),
    ] {
        assert!(decode_notice(&bad, "shop").is_err(), "accepted {bad}");
    }
}
