//! The broker kinds against real servers: `nats` (core and JetStream), `redis` and `amqp`
//! (RabbitMQ), fed by real PostgreSQL through the embedded daemon.
//!
//! The shared servers are the local ones: NATS with JetStream on 127.0.0.1:4222, Redis on 6379,
//! RabbitMQ on 5672 (guest/guest). Every test uses subjects, keys, exchanges and queues of its
//! own, so runs in parallel do not meet. The broker-down tests cut a path of their own: a private
//! `nats-server` or `redis-server` they stop and start again, or, for RabbitMQ, a TCP proxy.
#![cfg_attr(not(all(feature = "nats", feature = "redis", feature = "amqp")), allow(dead_code, unused_imports))]

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use post_save::SaveEvent;
use post_save::handler::{Delivery, Failure, Handler, HandlerError};
use tokio::process::{Child, Command};

use crate::support::child::binary;
use crate::support::db::TestDb;
use crate::support::{PATIENCE, Running, config, free_port, install, start, wait_for_sql, wait_until};

/// Rows each bulk test inserts, in one statement.
const ROWS: i64 = 1000;
/// How long a test waits for a message that must not come.
const QUIET: Duration = Duration::from_millis(500);
/// The handler's keys before the kind's own.
const HANDLER: &str = "name = \"broker\"\nsender = \"public.shop_order\"\ntimeout = \"10s\"\n";
/// Many quick retries: a broker that is down for a few seconds loses nothing.
const RETRY: &str = "retry = { attempts = 200, backoff = \"20ms\", max_backoff = \"300ms\" }\n";
/// Two quick attempts, for deliveries that must end dead.
const TWO_ATTEMPTS: &str = "retry = { attempts = 2, backoff = \"20ms\" }\n";

/// A name no other test run uses: `ps_<pid>_<random>`.
fn nonce() -> String {
    format!("ps_{}_{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A database with `shop_order` watched in durable mode, and the daemon running `handler` (the
/// kind's own keys, and `retry` unless it is [`RETRY`]).
async fn shop(handler: &str) -> (TestDb, Running) {
    let retry = if handler.contains("retry =") { "" } else { RETRY };
    let db = TestDb::new().await;
    db.psql_ok("CREATE TABLE shop_order (id bigserial PRIMARY KEY, product text NOT NULL)");
    let config = config(&format!(
        "[daemon]\nsweep_interval = \"1h\"\n[[watch]]\ntable = \"public.shop_order\"\nmode = \"durable\"\n\
         [[handler]]\n{HANDLER}{retry}{handler}\n"
    ));
    install(&db, &config).await;
    let daemon = start(&db, config).await;
    (db, daemon)
}

fn insert(db: &TestDb, rows: std::ops::RangeInclusive<i64>) {
    db.psql_ok(&format!(
        "INSERT INTO shop_order (id, product) SELECT g, 'item ' || g FROM generate_series({}, {}) g",
        rows.start(),
        rows.end()
    ));
}

/// Asserts that `events` are the inserts of exactly the rows `rows`, each once, with distinct
/// ledger ids.
fn assert_once_each(events: &[SaveEvent], rows: std::ops::RangeInclusive<i64>) {
    let pks: Vec<i64> = events.iter().map(|e| e.pk["id"].as_i64().expect("pk id")).collect();
    let unique: HashSet<i64> = pks.iter().copied().collect();
    assert_eq!(pks.len(), unique.len(), "a row arrived twice");
    assert_eq!(unique, rows.collect::<HashSet<_>>(), "rows missing or unexpected");
    let ids: HashSet<i64> = events.iter().map(|e| e.id.expect("durable events have an id")).collect();
    assert_eq!(ids.len(), events.len(), "ledger ids are not distinct");
    assert!(events.iter().all(|e| e.sender == "public.shop_order" && e.created));
}

fn event(body: &[u8]) -> SaveEvent {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("body is not an event ({e}): {}", String::from_utf8_lossy(body)))
}

/// Every ledger event handled, none dead.
async fn assert_all_handled(db: &TestDb) {
    wait_for_sql(db, "SELECT count(*) FROM post_save.event WHERE handled_at IS NULL", 0).await;
    wait_for_sql(db, "SELECT count(*) FROM post_save.dead_letter", 0).await;
}

/// The handler of a one-handler config (`handler`: the kind's keys), built as the daemon builds
/// it: without connecting anywhere.
fn build(handler: &str) -> Arc<dyn Handler> {
    let config =
        config(&format!("[[watch]]\ntable = \"public.shop_order\"\n[[handler]]\nname = \"direct\"\n{handler}"));
    config.handlers[0].kind.build("direct").unwrap_or_else(|e| panic!("build: {e}"))
}

/// An insert into `shop_order` with ledger id `id`, as the daemon hands it to handlers.
fn sample_event(id: i64) -> SaveEvent {
    serde_json::from_value(serde_json::json!({
        "id": id, "signal": "post_save", "sender": "public.shop_order", "op": "insert", "created": true,
        "pk": {"id": id}, "instance": {"id": id, "product": "direct"}, "raw": false, "using": "direct",
        "txid": 1, "at": "2026-11-25T00:00:00Z", "actor": {"role": "test", "pid": 1}
    }))
    .expect("an event")
}

/// One attempt of `handler` for `event`, as the dispatcher runs it.
async fn attempt(handler: &dyn Handler, event: &SaveEvent) -> Result<(), HandlerError> {
    let delivery = Delivery { handler: "direct".into(), attempt: 1, max_attempts: 1 };
    tokio::time::timeout(PATIENCE, handler.handle(event, &delivery)).await.expect("the attempt did not end")
}

/// Asserts that an attempt failed as transient (the dispatcher retries it).
#[track_caller]
fn assert_transient(result: Result<(), HandlerError>) {
    match result {
        Err(e) => assert_eq!(e.failure, Failure::Retry, "{e}"),
        Ok(()) => panic!("the attempt succeeded with the server down"),
    }
}

/// Waits until the daemon has failed an attempt: the event met the broker down.
async fn wait_for_a_failed_attempt(daemon: &Running) {
    let stats = &daemon.stats;
    wait_until("a failed attempt", move || async move { stats.snapshot().failed_attempts > 0 }).await;
}

/// Receives exactly `n` items from `messages`, then asserts nothing more comes within [`QUIET`].
async fn exactly<S: Stream + Unpin>(n: usize, messages: &mut S) -> Vec<S::Item> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(item)) => out.push(item),
            Ok(None) => panic!("the subscription ended after {} of {n} messages", out.len()),
            Err(_) => panic!("got {} of {n} messages", out.len()),
        }
    }
    if let Ok(Some(_)) = tokio::time::timeout(QUIET, messages.next()).await {
        panic!("a message beyond the {n} expected");
    }
    out
}

/// A private server process, stopped and started again by a test. Killed when dropped.
struct Server {
    program: &'static str,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
}

impl Server {
    async fn new(program: &'static str, port: u16, args: &[&str]) -> Server {
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut server = Server { program, args, port, child: None };
        server.start().await;
        server
    }

    /// Starts the server and waits until it accepts connections.
    async fn start(&mut self) {
        let child = Command::new(self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.program));
        self.child = Some(child);
        let port = self.port;
        let what = format!("{} to listen", self.program);
        wait_until(&what, move || async move { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() })
            .await;
    }

    /// Stops the server (SIGTERM) and waits for it to exit.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().and_then(|id| i32::try_from(id).ok()).expect("the server's pid");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            tokio::time::timeout(PATIENCE, child.wait()).await.expect("the server did not stop").expect("waiting");
        }
    }
}

/// The `post-save` binary, for `handlers list`.
fn handlers_list_json(config: &Path) -> serde_json::Value {
    let out = assert_cmd::Command::from_std(binary())
        .args(["--config", config.to_str().expect("UTF-8 path")])
        .args(["--database-url", "host=/nonexistent", "handlers", "list", "--json"])
        .timeout(PATIENCE)
        .output()
        .expect("running post-save");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    assert!(out.status.success(), "handlers list failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("s3cret") && !stdout.contains("guest:guest"), "a secret in the listing:\n{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

#[cfg(all(feature = "nats", feature = "redis", feature = "amqp"))]
#[test]
fn handlers_list_shows_broker_targets_without_secrets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("brokers.toml");
    std::fs::write(
        &path,
        r#"
[[watch]]
table = "public.shop_order"

[[handler]]
name = "nats"
kind = "nats"
url = "nats://alice:s3cret@127.0.0.1:4222"
subject = "shop.{{ sender }}.{{ op }}"
jetstream = true
token_env = "UNSET_NATS_TOKEN"

[[handler]]
name = "redis"
kind = "redis"
url = "redis://:s3cret@127.0.0.1:6379/2"
key = "post_save:{{ sender }}"
password_file = "/nonexistent/secret"

[[handler]]
name = "amqp-default"
kind = "amqp"
exchange = "shop"
routing_key = "{{ sender }}.{{ op }}"

[[handler]]
name = "amqp"
kind = "amqp"
url = "amqps://app:s3cret@mq.example:5671/prod?heartbeat=10"
exchange = ""
routing_key = "orders"
"#,
    )
    .expect("writing the config");
    let list = handlers_list_json(&path);
    let targets: Vec<(&str, &str)> = list
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|h| (h["kind"].as_str().unwrap(), h["target"].as_str().unwrap()))
        .collect();
    assert_eq!(
        targets,
        [
            ("nats", "nats://127.0.0.1:4222 subject shop.{{ sender }}.{{ op }} (jetstream)"),
            ("redis", "redis://127.0.0.1:6379/2 XADD post_save:{{ sender }}"),
            ("amqp", "amqp://127.0.0.1:5672 exchange shop key {{ sender }}.{{ op }}"),
            ("amqp", "amqps://mq.example:5671/prod exchange \"\" key orders"),
        ]
    );
}

#[cfg(feature = "nats")]
mod nats {
    use super::*;
    use async_nats::jetstream::{self, stream};

    const SHARED: &str = "nats://127.0.0.1:4222";

    async fn client(url: &str) -> async_nats::Client {
        async_nats::connect(url).await.unwrap_or_else(|e| panic!("cannot connect to nats at {url}: {e}"))
    }

    /// A JetStream stream capturing `<prefix>.>`.
    async fn create_stream(js: &jetstream::Context, prefix: &str, storage: stream::StorageType) -> stream::Stream {
        js.create_stream(stream::Config {
            name: prefix.to_uppercase(),
            subjects: vec![format!("{prefix}.>")],
            storage,
            ..Default::default()
        })
        .await
        .expect("create stream")
    }

    async fn stored(stream: &stream::Stream) -> u64 {
        stream.get_info().await.expect("stream info").state.messages
    }

    /// The stream's messages from sequence 1: subject, `Nats-Msg-Id` header and event.
    async fn messages(stream: &stream::Stream, n: u64) -> Vec<(String, String, SaveEvent)> {
        let mut out = Vec::new();
        for seq in 1..=n {
            let m = stream.get_raw_message(seq).await.expect("stream message");
            let id = m.headers.get(post_save::testing::kinds::MSG_ID_HEADER).map(|v| v.as_str().to_owned());
            out.push((m.subject.to_string(), id.expect("a Nats-Msg-Id header"), event(&m.payload)));
        }
        out
    }

    #[tokio::test]
    async fn core_nats_delivers_one_message_per_event_on_the_rendered_subject() {
        let prefix = nonce();
        let subscriber = client(SHARED).await;
        let mut sub = subscriber.subscribe(format!("{prefix}.>")).await.expect("subscribe");
        subscriber.flush().await.expect("flush the subscription");
        let (db, daemon) = shop(&format!(
            "kind = \"nats\"\nurl = \"{SHARED}\"\nsubject = \"{prefix}.{{{{ sender }}}}.{{{{ op }}}}\"\n\
             headers = {{ \"X-Op\" = \"{{{{ op }}}}\" }}\n"
        ))
        .await;
        insert(&db, 1..=ROWS);
        let messages = exactly(ROWS as usize, &mut sub).await;
        let subject = format!("{prefix}.public.shop_order.insert");
        assert!(messages.iter().all(|m| m.subject.as_str() == subject), "subjects: {:?}", messages[0].subject);
        let events: Vec<SaveEvent> = messages.iter().map(|m| event(&m.payload)).collect();
        assert_once_each(&events, 1..=ROWS);
        for (m, e) in messages.iter().zip(&events) {
            let headers = m.headers.as_ref().expect("headers");
            assert_eq!(headers.get("X-Op").map(|v| v.as_str()), Some("insert"));
            let want = format!("{}:{}", db.name, e.id.unwrap());
            assert_eq!(headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some(want.as_str()));
        }
        assert_all_handled(&db).await;
        daemon.stop().await;
    }

    #[tokio::test]
    async fn jetstream_stores_each_event_once_with_its_dedup_id() {
        let prefix = nonce();
        let nc = client(SHARED).await;
        let js = jetstream::new(nc);
        let stream = create_stream(&js, &prefix, stream::StorageType::Memory).await;
        let (db, daemon) =
            shop(&format!("kind = \"nats\"\nsubject = \"{prefix}.{{{{ sender }}}}.{{{{ op }}}}\"\njetstream = true\n"))
                .await;
        insert(&db, 1..=ROWS);
        let s = &stream;
        wait_until("1000 messages in the stream", move || async move { stored(s).await >= ROWS as u64 }).await;
        assert_all_handled(&db).await;
        daemon.stop().await;
        assert_eq!(stored(&stream).await, ROWS as u64);
        let messages = messages(&stream, ROWS as u64).await;
        for (subject, msg_id, e) in &messages {
            assert_eq!(subject, &format!("{prefix}.public.shop_order.insert"));
            assert_eq!(msg_id, &format!("{}:{}", db.name, e.id.unwrap()));
        }
        let events: Vec<SaveEvent> = messages.into_iter().map(|(_, _, e)| e).collect();
        assert_once_each(&events, 1..=ROWS);
        // A retry publishes with the same id: the stream keeps the first copy only.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{}:{}", db.name, events[0].id.unwrap()).as_str());
        let subject = format!("{prefix}.public.shop_order.insert");
        let ack = js.publish_with_headers(subject, headers, "again".into()).await.unwrap().await.unwrap();
        assert!(ack.duplicate, "the stream took a second copy of an event");
        assert_eq!(stored(&stream).await, ROWS as u64);
        js.delete_stream(prefix.to_uppercase()).await.expect("delete stream");
    }

    #[tokio::test]
    async fn jetstream_without_a_stream_ends_dead_with_a_clear_message() {
        let prefix = nonce();
        let (db, daemon) =
            shop(&format!("kind = \"nats\"\nsubject = \"{prefix}.nowhere\"\njetstream = true\n{TWO_ATTEMPTS}")).await;
        insert(&db, 1..=1);
        wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 1).await;
        let client = db.client().await;
        let error: String = client.query_one("SELECT last_error FROM post_save.dead_letter", &[]).await.unwrap().get(0);
        assert!(error.contains(&format!("no JetStream stream captures subject `{prefix}.nowhere`")), "{error}");
        daemon.stop().await;
    }

    #[tokio::test]
    async fn an_event_that_meets_the_server_down_is_stored_when_it_is_back() {
        let port = free_port();
        let store = tempfile::tempdir().expect("temp dir");
        let args = ["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd", store.path().to_str().unwrap()];
        let mut server = Server::new("nats-server", port, &args).await;
        let url = format!("nats://127.0.0.1:{port}");
        let prefix = nonce();
        let stream = create_stream(&jetstream::new(client(&url).await), &prefix, stream::StorageType::File).await;
        let (db, daemon) =
            shop(&format!("kind = \"nats\"\nurl = \"{url}\"\nsubject = \"{prefix}.{{{{ op }}}}\"\njetstream = true\n"))
                .await;
        insert(&db, 1..=1);
        let s = &stream;
        wait_until("the first event in the stream", move || async move { stored(s).await == 1 }).await;

        server.stop().await;
        insert(&db, 2..=50);
        wait_for_a_failed_attempt(&daemon).await;
        server.start().await;

        // The test's own client reconnects by itself, as the handler's does.
        wait_until("50 messages in the stream", move || async move {
            s.get_info().await.is_ok_and(|i| i.state.messages >= 50)
        })
        .await;
        assert_all_handled(&db).await;
        daemon.stop().await;
        assert_eq!(stored(&stream).await, 50);
        let events: Vec<SaveEvent> = messages(&stream, 50).await.into_iter().map(|(_, _, e)| e).collect();
        assert_once_each(&events, 1..=50);
    }
    #[tokio::test]
    async fn a_server_down_at_the_first_event_fails_it_as_transient_and_the_next_attempt_connects() {
        let port = free_port();
        let prefix = nonce();
        let url = format!("nats://127.0.0.1:{port}");
        let handler = build(&format!("kind = \"nats\"\nurl = \"{url}\"\nsubject = \"{prefix}.{{{{ op }}}}\"\n"));
        let saved = sample_event(1);
        assert_transient(attempt(&*handler, &saved).await);
        let _server = Server::new("nats-server", port, &["-a", "127.0.0.1", "-p", &port.to_string()]).await;
        let subscriber = client(&url).await;
        let mut sub = subscriber.subscribe(format!("{prefix}.>")).await.expect("subscribe");
        subscriber.flush().await.expect("flush the subscription");
        attempt(&*handler, &saved).await.expect("the attempt once the server is up");
        let got = exactly(1, &mut sub).await;
        assert_eq!(got[0].subject.as_str(), format!("{prefix}.insert"));
        assert_eq!(event(&got[0].payload), saved);
    }
}

#[cfg(feature = "redis")]
mod redis_kind {
    use redis::AsyncCommands;
    use redis::streams::StreamRangeReply;

    use super::*;

    const SHARED: &str = "redis://127.0.0.1:6379";

    async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(url).expect("redis url");
        client.get_multiplexed_async_connection().await.unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
    }

    /// The stream's entries: fields `event`, `id`, `sender`, `op`.
    async fn entries(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<SaveEvent> {
        let reply: StreamRangeReply = conn.xrange_all(key).await.expect("XRANGE");
        reply
            .ids
            .iter()
            .map(|entry| {
                let e = event(entry.get::<String>("event").expect("event field").as_bytes());
                assert_eq!(entry.get::<i64>("id"), e.id, "id field");
                assert_eq!(entry.get::<String>("sender").as_deref(), Some("public.shop_order"));
                assert_eq!(entry.get::<String>("op").as_deref(), Some("insert"));
                e
            })
            .collect()
    }

    async fn xlen(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> usize {
        conn.xlen(key).await.unwrap_or(0)
    }

    #[tokio::test]
    async fn xadd_appends_one_entry_per_event_to_the_rendered_stream() {
        let prefix = nonce();
        let (db, daemon) =
            shop(&format!("kind = \"redis\"\nkey = \"{prefix}:{{{{ sender }}}}\"\nmaxlen = 100000\n")).await;
        insert(&db, 1..=ROWS);
        let key = format!("{prefix}:public.shop_order");
        let mut conn = connection(SHARED).await;
        wait_until("1000 entries", || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move { xlen(&mut conn, &key).await >= ROWS as usize }
        })
        .await;
        assert_all_handled(&db).await;
        daemon.stop().await;
        let events = entries(&mut conn, &key).await;
        assert_eq!(events.len(), ROWS as usize);
        assert_once_each(&events, 1..=ROWS);
        let _: () = conn.del(&key).await.expect("DEL");
    }

    #[tokio::test]
    async fn publish_reaches_a_subscriber_once_per_event() {
        let channel = format!("{}:{{{{ sender }}}}", nonce());
        let rendered = channel.replace("{{ sender }}", "public.shop_order");
        let client = redis::Client::open(SHARED).expect("redis url");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
        pubsub.subscribe(&rendered).await.expect("SUBSCRIBE");
        let mut messages = std::pin::pin!(pubsub.on_message());
        let (db, daemon) = shop(&format!("kind = \"redis\"\ncommand = \"publish\"\nkey = \"{channel}\"\n")).await;
        insert(&db, 1..=ROWS);
        let got = exactly(ROWS as usize, &mut messages).await;
        assert!(got.iter().all(|m| m.get_channel_name() == rendered));
        let events: Vec<SaveEvent> = got.iter().map(|m| event(m.get_payload_bytes())).collect();
        assert_once_each(&events, 1..=ROWS);
        assert_all_handled(&db).await;
        daemon.stop().await;
    }

    #[tokio::test]
    async fn lpush_pushes_the_rendered_body() {
        let key = nonce();
        let (db, daemon) = shop(&format!(
            "kind = \"redis\"\ncommand = \"lpush\"\nkey = \"{key}\"\nbody = \"{{{{ instance.id }}}}:{{{{ instance.product }}}}\"\n"
        ))
        .await;
        insert(&db, 1..=3);
        assert_all_handled(&db).await;
        daemon.stop().await;
        let mut conn = connection(SHARED).await;
        let mut items: Vec<String> = conn.lrange(&key, 0, -1).await.expect("LRANGE");
        items.sort();
        assert_eq!(items, ["1:item 1", "2:item 2", "3:item 3"]);
        let _: () = conn.del(&key).await.expect("DEL");
    }

    #[tokio::test]
    async fn an_event_that_meets_the_server_down_is_added_when_it_is_back() {
        let port = free_port();
        let args = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        let mut server = Server::new("redis-server", port, &args).await;
        let url = format!("redis://127.0.0.1:{port}");
        let key = nonce();
        let (db, daemon) = shop(&format!("kind = \"redis\"\nurl = \"{url}\"\nkey = \"{key}\"\n")).await;
        insert(&db, 1..=1);
        let conn = connection(&url).await;
        wait_until("the first entry", || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move { xlen(&mut conn, &key).await == 1 }
        })
        .await;

        server.stop().await; // Without persistence: the server comes back empty.
        insert(&db, 2..=50);
        wait_for_a_failed_attempt(&daemon).await;
        server.start().await;

        let mut conn = connection(&url).await;
        wait_until("49 entries", || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move { xlen(&mut conn, &key).await >= 49 }
        })
        .await;
        assert_all_handled(&db).await;
        daemon.stop().await;
        let events = entries(&mut conn, &key).await;
        assert_once_each(&events, 2..=50);
    }
    #[tokio::test]
    async fn a_server_down_at_the_first_event_fails_it_as_transient_and_the_next_attempt_connects() {
        let port = free_port();
        let key = nonce();
        let url = format!("redis://127.0.0.1:{port}");
        let handler = build(&format!("kind = \"redis\"\nurl = \"{url}\"\nkey = \"{key}\"\n"));
        let saved = sample_event(1);
        assert_transient(attempt(&*handler, &saved).await);
        let args = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        let _server = Server::new("redis-server", port, &args).await;
        attempt(&*handler, &saved).await.expect("the attempt once the server is up");
        let mut conn = connection(&url).await;
        assert_eq!(entries(&mut conn, &key).await, [saved]);
    }
}

#[cfg(feature = "amqp")]
mod amqp {
    use futures_util::StreamExt;
    use lapin::message::Delivery;
    use lapin::options::{
        BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;

    use super::*;

    const SHARED: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    async fn channel() -> (Connection, Channel) {
        let conn = Connection::connect(SHARED, ConnectionProperties::default()).await.expect("connect to rabbitmq");
        let channel = conn.create_channel().await.expect("channel");
        (conn, channel)
    }

    /// An exclusive queue named `queue`, consumed without acknowledgements.
    async fn consume(channel: &Channel, queue: &str) -> impl Stream<Item = Delivery> + Unpin + use<> {
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        channel.queue_declare(queue.into(), options, FieldTable::default()).await.expect("queue declare");
        let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let consumer =
            channel.basic_consume(queue.into(), "test".into(), options, FieldTable::default()).await.expect("consume");
        consumer.map(|d| d.expect("a delivery"))
    }

    fn checked(delivery: &Delivery, routing_key: &str) -> SaveEvent {
        let e = event(&delivery.data);
        let p = &delivery.properties;
        assert_eq!(delivery.routing_key.as_str(), routing_key);
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
        assert_eq!(p.message_id().as_ref().map(|m| m.to_string()), e.id.map(|i| i.to_string()));
        e
    }

    #[tokio::test]
    async fn a_topic_exchange_routes_one_message_per_event_with_the_rendered_key() {
        let name = nonce();
        let (_conn, channel) = channel().await;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(name.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await
            .unwrap();
        let mut consumer = consume(&channel, &name).await;
        let bind = (QueueBindOptions::default(), FieldTable::default());
        channel
            .queue_bind(name.as_str().into(), name.as_str().into(), "public.shop_order.*".into(), bind.0, bind.1)
            .await
            .unwrap();
        let (db, daemon) = shop(&format!(
            "kind = \"amqp\"\nexchange = \"{name}\"\nrouting_key = \"{{{{ sender }}}}.{{{{ op }}}}\"\ndeclare = true\n"
        ))
        .await;
        insert(&db, 1..=ROWS);
        let deliveries = exactly(ROWS as usize, &mut consumer).await;
        let events: Vec<SaveEvent> = deliveries.iter().map(|d| checked(d, "public.shop_order.insert")).collect();
        assert_once_each(&events, 1..=ROWS);
        assert_all_handled(&db).await;
        daemon.stop().await;
        channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()).await.expect("delete exchange");
    }

    #[tokio::test]
    async fn a_missing_exchange_ends_dead_with_a_clear_message() {
        let name = nonce();
        let (db, daemon) =
            shop(&format!("kind = \"amqp\"\nexchange = \"{name}\"\nrouting_key = \"k\"\n{TWO_ATTEMPTS}")).await;
        insert(&db, 1..=1);
        wait_for_sql(&db, "SELECT count(*) FROM post_save.dead_letter", 1).await;
        let client = db.client().await;
        let error: String = client.query_one("SELECT last_error FROM post_save.dead_letter", &[]).await.unwrap().get(0);
        assert!(error.contains(&format!("exchange `{name}` does not exist")), "{error}");
        daemon.stop().await;
    }

    /// A TCP proxy to the local RabbitMQ that a test stops (closing every connection through
    /// it, and the port) and starts again: a real cut of the path, not a mock.
    struct Proxy {
        port: u16,
        running: Option<(CancellationToken, JoinHandle<()>)>,
    }

    impl Proxy {
        async fn start(port: u16) -> Proxy {
            let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("proxy port");
            let port = listener.local_addr().expect("proxy address").port();
            let stop = CancellationToken::new();
            let task = tokio::spawn(Self::serve(listener, stop.clone()));
            Proxy { port, running: Some((stop, task)) }
        }

        async fn serve(listener: TcpListener, stop: CancellationToken) {
            let mut links = tokio::task::JoinSet::new();
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                links.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
            // Dropping the tasks drops both sockets of every link.
            links.shutdown().await;
        }

        async fn stop(&mut self) {
            if let Some((stop, task)) = self.running.take() {
                stop.cancel();
                task.await.expect("proxy task");
            }
        }
    }

    #[tokio::test]
    async fn an_event_that_meets_the_broker_unreachable_is_published_when_it_is_back() {
        let queue = nonce();
        let (_conn, channel) = channel().await;
        let mut consumer = consume(&channel, &queue).await;
        let mut proxy = Proxy::start(0).await;
        let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
        let (db, daemon) =
            shop(&format!("kind = \"amqp\"\nurl = \"{url}\"\nexchange = \"\"\nrouting_key = \"{queue}\"\n")).await;
        insert(&db, 1..=1);
        let first = tokio::time::timeout(PATIENCE, consumer.next()).await.expect("the first message");
        let mut events = vec![checked(&first.expect("a delivery"), &queue)];
        // The broker's confirm of the first must be back before the proxy cuts the line: one cut
        // between the publish and its confirm is retried and delivered twice (at least once).
        assert_all_handled(&db).await;

        proxy.stop().await;
        insert(&db, 2..=50);
        wait_for_a_failed_attempt(&daemon).await;
        let port = proxy.port;
        proxy = Proxy::start(port).await;

        let rest = exactly(49, &mut consumer).await;
        events.extend(rest.iter().map(|d| checked(d, &queue)));
        assert_once_each(&events, 1..=50);
        assert_all_handled(&db).await;
        daemon.stop().await;
        proxy.stop().await;
    }

    #[tokio::test]
    async fn a_broker_unreachable_at_the_first_event_fails_it_as_transient_and_the_next_attempt_connects() {
        let queue = nonce();
        let (_conn, channel) = channel().await;
        let mut consumer = consume(&channel, &queue).await;
        let port = free_port();
        let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        let handler = build(&format!("kind = \"amqp\"\nurl = \"{url}\"\nexchange = \"\"\nrouting_key = \"{queue}\"\n"));
        let saved = sample_event(1);
        assert_transient(attempt(&*handler, &saved).await);
        let mut proxy = Proxy::start(port).await;
        attempt(&*handler, &saved).await.expect("the attempt once the broker is reachable");
        let got = exactly(1, &mut consumer).await;
        assert_eq!(checked(&got[0], &queue), saved);
        drop(handler);
        proxy.stop().await;
    }
}
