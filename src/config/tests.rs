//! Parsing and validating the configuration: the errors' line, key and suggestion, and each
//! handler kind's declared keys.

use std::time::Duration;

use super::handler::HANDLER_KEYS;
use super::*;
use crate::handler::KindOptions;

const GOOD: &str = r#"
[[watch]]
table = "public.shop_order"
redact = ["card"]

[[handler]]
name = "log-orders"
sender = "public.shop_order"
created = true
kind = "log"
"#;

#[test]
fn parses_a_small_config() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.watches.len(), 1);
    assert_eq!(c.watches[0].mode, Mode::Durable);
    assert!(c.watches[0].operations.insert && !c.watches[0].operations.delete);
    assert_eq!(c.handlers[0].created, Some(true));
    assert_eq!(c.handlers[0].retry, RetryPolicy::default());
}

#[test]
fn the_removed_read_pause_names_line_and_key_and_says_it_was_removed() {
    let e = Config::parse("[daemon]\nwal_read_pause = \"0s\"\n").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("daemon.wal_read_pause"));
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("removed"), "{}", e.message);
    assert!(Config::parse("").is_ok());
}

#[test]
fn unknown_top_level_key_names_line_and_key() {
    let e = Config::parse("[daemon]\nmax_in_flight = 5\nbogus = 1\n").unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    assert_eq!(e.key.as_deref(), Some("daemon.bogus"));
    assert!(e.message.starts_with("unknown key; expected one of `max_in_flight`"), "{e}");
}

#[test]
fn unknown_handler_key_names_line_and_key() {
    let text = format!("{GOOD}colour = \"red\"\n");
    let e = Config::parse(&text).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("handler[0].colour"));
    assert_eq!(e.line, Some(text.lines().count()));
    assert_eq!(e.to_string(), format!("config:{}: key `handler[0].colour`: unknown key", e.line.unwrap()));
}

#[test]
fn wrong_type_and_bad_duration() {
    let e = Config::parse(&GOOD.replace("created = true", "created = \"yes\"")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("handler[0].created"));
    assert_eq!(e.line, Some(9));
    let e = Config::parse(&format!("{GOOD}timeout = \"soon\"\n")).unwrap_err();
    assert!(e.message.contains("invalid duration"), "{e}");
}

#[test]
fn sender_must_be_watched() {
    let e = Config::parse(&GOOD.replace("sender = \"public.shop_order\"", "sender = \"public.nope\"")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("handler[0].sender"));
    assert_eq!(e.line, Some(8));
}

#[test]
fn watch_errors() {
    let e = Config::parse("[[watch]]\ntable = \"t\"\noperations = [\"upsert\"]\n").unwrap_err();
    assert_eq!((e.line, e.key.as_deref()), (Some(3), Some("watch[0].operations")));
    let e = Config::parse("[[watch]]\ntable = \"t\"\n[[watch]]\ntable = \"u\"\nmode = \"fast\"\n").unwrap_err();
    assert_eq!((e.line, e.key.as_deref()), (Some(5), Some("watch[1].mode")), "{e}");
    let e = Config::parse("[[watch]]\ntable = \"t\"\n[[watch]]\ntable = \"public.t\"\n").unwrap_err();
    assert!(e.message.contains("twice"), "{e}");
}

/// The error for `text` as `(line, key, message)`.
fn error_of(text: &str) -> (Option<usize>, Option<String>, String) {
    let e = Config::parse(text).expect_err("the config is invalid");
    (e.line, e.key, e.message)
}

fn meant(valid: &str) -> String {
    format!("unknown key; did you mean `{valid}`?")
}

const WATCH: &str = "[[watch]]\ntable = \"public.shop_order\"\n";

#[test]
fn a_misspelt_required_key_is_named_with_the_nearest_valid_one() {
    for (kind, typo, valid) in [
        ("exec", "comand = [\"/bin/true\"]", "command"),
        ("webhook", "ulr = \"http://127.0.0.1:1/\"", "url"),
        ("sql", "statment = \"SELECT 1\"", "statement"),
        ("nats", "subjct = \"orders\"", "subject"),
        ("redis", "kye = \"orders\"", "key"),
        ("celery", "tasks = \"shop.tasks.confirm\"", "task"),
        ("email", "smpt = \"smtp://127.0.0.1:25\"", "smtp"),
    ] {
        if KindOptions::keys(kind).is_none() {
            continue; // not in this build
        }
        let text = format!("{WATCH}\n[[handler]]\nname = \"h\"\nkind = \"{kind}\"\n{typo}\n");
        let typo_key = typo.split(' ').next().unwrap();
        assert_eq!(error_of(&text), (Some(7), Some(format!("handler[0].{typo_key}")), meant(valid)), "{kind}: {typo}");
    }
}

#[test]
fn a_misspelt_key_is_reported_before_the_required_key_it_hides() {
    // `timout` is a common key, `inherit_envs` an exec one; `command` is missing in both.
    for (typo, valid) in [("timout = \"3s\"", "timeout"), ("inherit_envs = [\"HOME\"]", "inherit_env")] {
        let text = format!("{WATCH}[[handler]]\nname = \"h\"\nkind = \"exec\"\n{typo}\n");
        let (line, key, message) = error_of(&text);
        assert_eq!((line, message), (Some(6), meant(valid)), "{typo}");
        assert_eq!(key.as_deref(), Some(format!("handler[0].{}", typo.split(' ').next().unwrap()).as_str()));
    }
    // The first of two in file order, even with `name` missing too.
    let text = format!("{WATCH}[[handler]]\nkind = \"exec\"\nlog_outptu = true\ncomand = [\"x\"]\n");
    assert_eq!(error_of(&text), (Some(5), Some("handler[0].log_outptu".into()), meant("log_output")));
    // `kind` itself: any kind's keys are valid until the kind is known.
    let text = format!("{WATCH}[[handler]]\nname = \"h\"\nkidn = \"exec\"\ncommand = [\"x\"]\n");
    assert_eq!(error_of(&text), (Some(5), Some("handler[0].kidn".into()), meant("kind")));
    // A key of another kind is unknown for this one.
    let text = format!("{WATCH}[[handler]]\nname = \"h\"\nkind = \"log\"\ncommand = [\"x\"]\n");
    assert_eq!(error_of(&text), (Some(6), Some("handler[0].command".into()), "unknown key".into()));
}

#[test]
fn misspelt_keys_of_the_serde_tables_are_named_with_the_nearest_valid_one() {
    let cases = [
        ("[database]\nulr = \"postgres://x\"\n", 2, "database.ulr", "url"),
        ("[daemon]\nmax_inflight = 5\n", 2, "daemon.max_inflight", "max_in_flight"),
        (
            "[daemon]\nshutdown_grace = \"1s\"\nsweep_intervall = \"1s\"\n",
            3,
            "daemon.sweep_intervall",
            "sweep_interval",
        ),
        // `table` is missing too: the misspelling is what is reported.
        ("[[watch]]\ntabel = \"public.t\"\n", 2, "watch[0].tabel", "table"),
        (
            "[[watch]]\ntable = \"public.t\"\n[[watch]]\ntable = \"public.u\"\nredcat = [\"x\"]\n",
            5,
            "watch[1].redcat",
            "redact",
        ),
        ("[deamon]\nliveness = \"5s\"\n", 1, "deamon", "daemon"),
        ("[[handlers]]\nname = \"h\"\n", 1, "handlers", "handler"),
    ];
    for (text, line, key, valid) in cases {
        assert_eq!(error_of(text), (Some(line), Some(key.to_owned()), meant(valid)), "{text}");
    }
    assert_eq!(
        error_of("[[watch]]\ninclude_old = true\n"),
        (Some(1), Some("watch[0].table".into()), "missing required key".into())
    );
}

#[test]
fn a_retry_key_is_named_with_the_nearest_valid_one() {
    let e = Config::parse(&format!("{GOOD}retry = {{ atempts = 3 }}\n")).unwrap_err();
    assert_eq!((e.key.as_deref(), e.message.as_str()), (Some("handler[0].retry.atempts"), meant("attempts").as_str()));
}

#[test]
fn suggestions_are_near_misses_only() {
    use section::did_you_mean;
    let keys = ["command", "columns", "concurrency", "timeout", "url", "kind"];
    assert_eq!(did_you_mean("comand", keys), Some("command"));
    assert_eq!(did_you_mean("Command", keys), Some("command"));
    assert_eq!(did_you_mean("uri", keys), Some("url"));
    assert_eq!(did_you_mean("knid", keys), Some("kind"));
    assert_eq!(did_you_mean("colour", keys), None);
    assert_eq!(did_you_mean("x", keys), None);
}

/// Each kind's `KEYS` is exactly what its parser reads: a key read but not declared would be
/// rejected as unknown before the parser saw it, a key declared but not read would pass the
/// check and fail as unknown at the end.
#[test]
fn every_kind_declares_the_keys_its_parser_reads() {
    let mut seen = std::collections::BTreeMap::<String, Vec<String>>::new();
    for text in [include_str!("../../config.example.toml"), include_str!("../../examples/handlers.toml")] {
        let raw: RawConfig = toml::from_str(text).unwrap();
        let watches: Vec<Watch> = raw
            .watch
            .into_iter()
            .map(|w| {
                let span = w.span();
                w.into_inner().validate(text, span, "watch").unwrap()
            })
            .collect();
        for h in raw.handler {
            let span = h.span();
            let mut section = Section::new(text, span, "handler".into(), h.into_inner());
            let Some(kind) = section.peek_str("kind").map(str::to_owned) else { continue };
            if KindOptions::keys(&kind).is_none() {
                continue; // not in this build
            }
            parse_handler(&mut section, &watches).unwrap_or_else(|e| panic!("{kind}: {e}"));
            let mut read: Vec<String> =
                section.asked().iter().filter(|k| !HANDLER_KEYS.contains(&k.as_str())).cloned().collect();
            read.sort();
            seen.insert(kind, read);
        }
    }
    for kind in crate::handler::KINDS {
        let read = seen.get(*kind).unwrap_or_else(|| panic!("no example of kind `{kind}`"));
        let mut declared: Vec<String> = KindOptions::keys(kind).unwrap().into_iter().map(str::to_owned).collect();
        declared.sort();
        assert_eq!(&declared, read, "kind `{kind}`");
    }
}

#[test]
fn retry_table() {
    let c = Config::parse(&format!("{GOOD}retry = {{ attempts = 3, backoff = \"10ms\" }}\n")).unwrap();
    assert_eq!(c.handlers[0].retry.attempts, 3);
    assert_eq!(c.handlers[0].retry.backoff, Duration::from_millis(10));
    let e = Config::parse(&format!("{GOOD}retry = {{ tries = 3 }}\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("handler[0].retry.tries"));
}
